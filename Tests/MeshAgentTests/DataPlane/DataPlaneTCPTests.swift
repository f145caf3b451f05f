import MeshCore
import MeshTestSupport
import NIOCore
import NIOPosix
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

/// Ejection long enough that a machine loaded by the rest of the suite still sees the endpoint
/// ejected right after the failures, short enough to watch it come back.
private let slowEjection = testConfiguration(
    outlier: .init(
        consecutiveFailures: 3,
        baseEjectionTime: .seconds(3),
        maxEjectionTime: .seconds(10),
        maxEjectionPercent: 10
    )
)

@Suite("Data plane: TCP proxy over real sockets", .timeLimit(.minutes(1)), .awaitedTeardown, .rationed)
struct DataPlaneTCPTests {
    @Test("TCP echo through an IPv4 VIP in 127.0.0.0/8")
    func echoIPv4() async throws {
        let backend = try await TestServers.echo()
        onTeardown { await backend.close() }
        try await withDataPlane { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("echo"), vip: vip, port: 8080, backends: [backend.backend()])
                ])
            )
            let reply = try await TestClient.exchange(
                TestClient.vipAddress(vip, 8080),
                send: "hello mesh",
                halfClose: true
            )
            #expect(String(buffer: reply) == "hello mesh")
            let snapshot = dp.snapshot()
            #expect(snapshot.mode == .loopback)
            let route = try #require(snapshot.routes.first)
            #expect(route.listening && route.vip == vip.description && route.port == 8080 && route.proto == "tcp")
            #expect(route.totalConnections == 1)
            #expect(
                await eventually {
                    dp.snapshot().routes.first?.bytesIn == 10 && dp.snapshot().routes.first?.bytesOut == 10
                }
            )
            #expect(await eventually { dp.openClientChannels == 0 })
        }
    }

    @Test("IPv6: a ::1 VIP to an IPv6 backend, and an IPv4 VIP to the same IPv6 backend")
    func ipv6() async throws {
        let backend = try await TestServers.echo(host: "::1")
        onTeardown { await backend.close() }
        try await withDataPlane { dp in
            let v4 = TestAddresses.vip()
            let port = try await TestAddresses.applyOnFreeIPv6Port(dp) {
                RouteTable(routes: [
                    Route(service: service("v6"), vip: IPAddress("::1")!, port: $0, backends: [backend.backend()]),
                    Route(service: service("v4to6"), vip: v4, port: 8080, backends: [backend.backend()]),
                ])
            }
            let a = try await TestClient.exchange(
                try SocketAddress(ipAddress: "::1", port: port),
                send: "six",
                halfClose: true
            )
            #expect(String(buffer: a) == "six")
            let b = try await TestClient.exchange(TestClient.vipAddress(v4, 8080), send: "four", halfClose: true)
            #expect(String(buffer: b) == "four")
            let allListening = dp.snapshot().routes.allSatisfy { $0.listening }
            #expect(allListening)
        }
    }

    @Test("round robin is exact over N connections")
    func roundRobinExact() async throws {
        let servers = try await [TestServers.greeter("a"), TestServers.greeter("b"), TestServers.greeter("c")]
        onTeardown { for s in servers { await s.close() } }
        try await withDataPlane { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("rr"), vip: vip, port: 8080, backends: servers.map { $0.backend() })
                ])
            )
            var counts: [String: Int] = [:]
            for _ in 0..<30 {
                let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080))
                counts[String(buffer: reply), default: 0] += 1
            }
            #expect(counts == ["a": 10, "b": 10, "c": 10])
        }
    }

    @Test("weights are honoured (round robin 3:1 exact, random 3:1 within 0.15 of its share)")
    func weights() async throws {
        let servers = try await [TestServers.greeter("heavy"), TestServers.greeter("light")]
        onTeardown { for s in servers { await s.close() } }
        try await withDataPlane { dp in
            let vipRR = TestAddresses.vip()
            let vipRandom = TestAddresses.vip()
            let list = [servers[0].backend(weight: 3), servers[1].backend(weight: 1)]
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("w-rr"), vip: vipRR, port: 8080, policy: .roundRobin, backends: list),
                    Route(service: service("w-rand"), vip: vipRandom, port: 8080, policy: .random, backends: list),
                ])
            )
            var rr: [String: Int] = [:]
            var random: [String: Int] = [:]
            for _ in 0..<40 {
                rr[String(buffer: try await TestClient.exchange(TestClient.vipAddress(vipRR, 8080))), default: 0] += 1
            }
            // 200 draws of a 0.75 share: its standard deviation is 0.031, so 0.15 is 4.9 of them (a false
            // failure about once in a million runs; 0.1, 3.3 of them, failed once in a CI run), and a policy
            // that ignored the weights (0.5) is 8 away. Eight at a time: one after another, 400 draws ran past
            // the test's time limit on a loaded machine (a connection through the proxy waits on the scheduler).
            let target = TestClient.vipAddress(vipRandom, 8080)
            for _ in 0..<25 {
                let replies = try await withThrowingTaskGroup(of: String.self) { group in
                    for _ in 0..<8 { group.addTask { String(buffer: try await TestClient.exchange(target)) } }
                    return try await group.reduce(into: [String]()) { $0.append($1) }
                }
                for r in replies { random[r, default: 0] += 1 }
            }
            #expect(rr == ["heavy": 30, "light": 10])
            let share = Double(random["heavy", default: 0]) / 200
            #expect(abs(share - 0.75) < 0.15, "heavy share \(share)")
        }
    }

    @Test("an endpoint that refuses connections is retried around, ejected, and comes back")
    func ejectionAndRecovery() async throws {
        let good = try await TestServers.greeter("good")
        onTeardown { await good.close() }
        let refused = try await TestServers.refusedBackend()
        try await withDataPlane(slowEjection) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("eject"), vip: vip, port: 8080, backends: [good.backend(), refused])
                ])
            )
            // Every connection succeeds: a refused connect is retried on the next endpoint.
            for _ in 0..<8 {
                let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080))
                // On a failure, the backends' state says which attempt went wrong.
                #expect(String(buffer: reply) == "good", "backends: \(dp.snapshot().routes.first?.backends ?? [])")
            }
            let ejected = try #require(dp.snapshot().routes.first?.backends.first { $0.port == refused.port })
            // Ejected once by now. The ejection itself (3 s) may already have run out when the machine is so
            // loaded that the 8 exchanges took longer (a run of every suite in one process under two busy
            // loops): what it did is counted, and while it lasts the endpoint is not healthy.
            #expect(ejected.ejections == 1 && ejected.failures >= 3, "\(ejected)")
            if ejected.ejected { #expect(!ejected.healthy) }

            // Something listens there now; after the ejection time it gets traffic again.
            let revived = try await TestServers.tcp(name: "revived") { GreeterHandler(name: "revived") }
            await revived.close()
            let back = try await TestServers.tcp(host: "127.0.0.1", name: "back") { GreeterHandler(name: "back") }
            onTeardown { await back.close() }
            try await dp.apply(
                RouteTable(routes: [
                    Route(
                        service: service("eject"),
                        vip: vip,
                        port: 8080,
                        backends: [good.backend(), refused, back.backend()]
                    )
                ])
            )
            #expect(
                await eventually(12) {
                    dp.snapshot().routes.first?.backends.first { $0.port == refused.port }?.healthy == true
                }
            )
            let snapshot = try #require(dp.snapshot().routes.first?.backends.first { $0.port == refused.port })
            #expect(!snapshot.ejected && snapshot.ejections == 1)
        }
    }

    @Test("a refusing endpoint that starts listening again is used again after its ejection")
    func recoveredEndpointGetsTraffic() async throws {
        let good = try await TestServers.greeter("good")
        onTeardown { await good.close() }
        // Reserve a port, then free it: refused until the test binds it again. On an address of its own: a port
        // freed on 127.0.0.1 can be taken by another test's server meanwhile (seen under load: the exchange then
        // met a server that never answers).
        let flakyIP = TestAddresses.vip()
        let flaky = try await TestServers.greeter("flaky", host: flakyIP.description)
        let flakyPort = flaky.port
        await flaky.close()
        let flakyBackend = Backend(ip: flakyIP, port: flakyPort, node: "flaky")
        // By its node, not its port: a port picked on the flaky address can be the good server's port on
        // 127.0.0.1 (seen once: the lookups found the good backend).
        let isFlaky: @Sendable (BackendSnapshot) -> Bool = { $0.node == "flaky" }
        try await withDataPlane(slowEjection) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("flaky"), vip: vip, port: 8080, backends: [good.backend(), flakyBackend])
                ])
            )
            for _ in 0..<6 { _ = try await TestClient.exchange(TestClient.vipAddress(vip, 8080)) }
            #expect(dp.snapshot().routes[0].backends.first(where: isFlaky)?.ejected == true)
            let reborn = try await ServerBootstrap(group: testGroup)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(GreeterHandler(name: "flaky"))
                    }
                }
                .bind(host: flakyIP.description, port: flakyPort)
                .get()
            onTeardown { try? await reborn.close() }
            #expect(
                await eventually(12) {
                    dp.snapshot().routes[0].backends.first(where: isFlaky)?.healthy == true
                }
            )
            var seen: Set<String> = []
            for _ in 0..<6 {
                seen.insert(String(buffer: try await TestClient.exchange(TestClient.vipAddress(vip, 8080))))
            }
            #expect(seen == ["good", "flaky"])
        }
    }

    @Test("locality: same-site backends only, the other site when the local one is not ready")
    func locality() async throws {
        let local = try await TestServers.greeter("local")
        let remote = try await TestServers.greeter("remote")
        onTeardown {
            await local.close()
            await remote.close()
        }
        try await withDataPlane { dp in
            let vip = TestAddresses.vip()
            func table(localReady: Bool) -> RouteTable {
                RouteTable(
                    routes: [
                        Route(
                            service: service("loc"),
                            vip: vip,
                            port: 8080,
                            backends: [
                                local.backend(site: "edge-1", ready: localReady), remote.backend(site: "cloud"),
                            ]
                        )
                    ],
                    localSite: "edge-1"
                )
            }
            try await dp.apply(table(localReady: true))
            for _ in 0..<6 {
                #expect(String(buffer: try await TestClient.exchange(TestClient.vipAddress(vip, 8080))) == "local")
            }
            try await dp.apply(table(localReady: false))
            for _ in 0..<4 {
                #expect(String(buffer: try await TestClient.exchange(TestClient.vipAddress(vip, 8080))) == "remote")
            }
            try await dp.apply(table(localReady: true))
            #expect(String(buffer: try await TestClient.exchange(TestClient.vipAddress(vip, 8080))) == "local")
        }
    }

    @Test("half-close: the client shuts its write side and still receives the full reply")
    func halfClose() async throws {
        let size = 3 * 1024 * 1024
        let backend = try await TestServers.tcp(name: "eof") { ReplyOnEOFHandler(size: size) }
        onTeardown { await backend.close() }
        try await withDataPlane { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [Route(service: service("hc"), vip: vip, port: 8080, backends: [backend.backend()])])
            )
            let request = String(repeating: "q", count: 100_000)
            let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080), send: request, halfClose: true)
            let header = "got 100000\n"
            #expect(reply.readableBytes == header.utf8.count + size)
            #expect(reply.getString(at: 0, length: header.utf8.count) == header)
            #expect(await eventually { dp.openClientChannels == 0 })
        }
    }

    @Test("all endpoints down: the connection is closed fast")
    func allDown() async throws {
        let a = try await TestServers.refusedBackend()
        let b = try await TestServers.refusedBackend()
        // A connect timeout longer than anything load can cause: "fast" means the refusals are not waited
        // out as timeouts would be (3 attempts x 60 s), so the connection ends within one connect timeout.
        try await withDataPlane(testConfiguration(connectTimeout: .seconds(60))) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [Route(service: service("down"), vip: vip, port: 8080, backends: [a, b])])
            )
            let start = ContinuousClock.now
            // EOF, or a reset since the proxy never read what the client sent: either way, closed, no data.
            do {
                let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080), send: "anyone?")
                #expect(reply.readableBytes == 0)
            } catch let error as IOError {
                #expect(error.errnoCode == ECONNRESET)
            }
            #expect(ContinuousClock.now - start < .seconds(60))
            // No backend at all: closed at once too.
            try await dp.apply(
                RouteTable(routes: [Route(service: service("down"), vip: vip, port: 8080, backends: [])])
            )
            let empty = try await TestClient.exchange(TestClient.vipAddress(vip, 8080))
            #expect(empty.readableBytes == 0)
            #expect(await eventually { dp.openClientChannels == 0 })
        }
    }

    @Test("a client that connects and never sends is closed by the idle timeout")
    func idleTimeout() async throws {
        let backend = try await TestServers.echo()
        onTeardown { await backend.close() }
        try await withDataPlane(testConfiguration(tcpIdleTimeout: .seconds(1))) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("idle"), vip: vip, port: 8080, backends: [backend.backend()])
                ])
            )
            let start = ContinuousClock.now
            let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080))
            let elapsed = ContinuousClock.now - start
            #expect(reply.readableBytes == 0)
            // Closed by the idle timer (not before it), well before the client's own 10 s limit.
            #expect(elapsed >= .milliseconds(950) && elapsed < .seconds(8), "closed after \(elapsed)")
            #expect(await eventually { dp.openClientChannels == 0 })
        }
    }

    @Test("apply: backends swap without dropping connections; a removed route stops accepting but drains")
    func applySwapsAndDrains() async throws {
        let first = try await TestServers.echo(name: "first")
        let second = try await TestServers.greeter("second")
        onTeardown {
            await first.close()
            await second.close()
        }
        try await withDataPlane(testConfiguration(drainTimeout: .seconds(5))) { dp in
            let vip = TestAddresses.vip()
            let address = TestClient.vipAddress(vip, 8080)
            try await dp.apply(
                RouteTable(routes: [Route(service: service("swap"), vip: vip, port: 8080, backends: [first.backend()])])
            )
            // A long-lived connection through the first backend.
            let channel = try await ClientBootstrap(group: testGroup).connect(to: address) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                }
            }
            try await channel.executeThenClose { inbound, outbound in
                var iterator = inbound.makeAsyncIterator()
                try await outbound.write(ByteBuffer(string: "one"))
                #expect(try await iterator.next().map { String(buffer: $0) } == "one")

                // New backends: new connections go there, the open one keeps working.
                try await dp.apply(
                    RouteTable(routes: [
                        Route(service: service("swap"), vip: vip, port: 8080, backends: [second.backend()])
                    ])
                )
                #expect(String(buffer: try await TestClient.exchange(address)) == "second")
                try await outbound.write(ByteBuffer(string: "two"))
                #expect(try await iterator.next().map { String(buffer: $0) } == "two")

                // Route gone: the VIP:port refuses new connections; the open one still drains.
                try await dp.apply(RouteTable())
                await #expect(throws: (any Error).self) { _ = try await TestClient.exchange(address, timeout: 2) }
                try await outbound.write(ByteBuffer(string: "three"))
                #expect(try await iterator.next().map { String(buffer: $0) } == "three")
                #expect(dp.snapshot().routes.isEmpty)
            }
            #expect(await eventually { dp.openClientChannels == 0 })
        }
    }

    @Test("a listener that cannot bind is reported and does not hold back the others")
    func bindFailure() async throws {
        let backend = try await TestServers.echo()
        onTeardown { await backend.close() }
        try await withDataPlane { dp in
            let good = TestAddresses.vip()
            let table = RouteTable(routes: [
                Route(service: service("ok"), vip: good, port: 8080, backends: [backend.backend()]),
                // Not a local address in loopback mode.
                Route(
                    service: service("bad"),
                    vip: IPAddress("192.0.2.10")!,
                    port: 8080,
                    backends: [backend.backend()]
                ),
            ])
            await #expect(throws: DataPlaneError.self) { try await dp.apply(table) }
            let snapshot = dp.snapshot()
            #expect(snapshot.routes.count == 2)
            #expect(snapshot.routes.first { $0.service == "ok" }?.listening == true)
            let bad = try #require(snapshot.routes.first { $0.service == "bad" })
            #expect(!bad.listening && bad.error?.contains("loopback mode") == true)
            let reply = try await TestClient.exchange(TestClient.vipAddress(good, 8080), send: "x", halfClose: true)
            #expect(String(buffer: reply) == "x")
        }
    }
}
