import Foundation
import Logging
import MeshCore
import MeshTestSupport
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import MeshAgent

/// Root, `ip netns`, and iptables' nat table work here.
private let canRedirect: Bool = {
    guard getuid() == 0 else { return false }
    let probe = "vipt-probe-\(getpid())"
    guard (try? sh("ip", "netns", "add", probe))?.status == 0 else { return false }
    defer { _ = try? sh("ip", "netns", "del", probe) }
    return (try? sh("ip", "netns", "exec", probe, "iptables", "-w", "-t", "nat", "-S"))?.status == 0
}()

private let namespaceCounter = Atomic<Int>(0)

/// A network namespace named uniquely for this run, with `lo` up; deleted when `body` ends.
private func withNamespace<T>(_ body: (String) async throws -> T) async throws -> T {
    let name = "vipt-\(getpid())-\(namespaceCounter.add(1, ordering: .relaxed).newValue)"
    try #require(try sh("ip", "netns", "add", name).status == 0)
    defer { _ = try? sh("ip", "netns", "del", name) }
    try sh("ip", "-n", name, "link", "set", "lo", "up")
    return try await body(name)
}

/// An event loop group of two threads, each inside `namespace`.
private func namespacedGroup(_ namespace: String) async throws -> MultiThreadedEventLoopGroup {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    for loop in group.makeIterator() {
        try await loop.submit { try NetworkNamespace.enter(namespace) }.get()
    }
    return group
}

/// `iptables -t nat -S` in `namespace` (IPv4, or IPv6 with `v6`).
private func natRules(_ namespace: String, v6: Bool = false) throws -> [String] {
    try sh("ip", "netns", "exec", namespace, v6 ? "ip6tables" : "iptables", "-w", "-t", "nat", "-S").output
        .split(separator: "\n").map(String.init)
}

/// Listening TCP sockets in `namespace` (`ss -Hltn`).
private func listeningSockets(_ namespace: String) throws -> Int {
    try sh("ip", "netns", "exec", namespace, "ss", "-Hltn").output.split(separator: "\n").count
}

/// What one blocking TCP exchange inside `namespace` got: the bytes until EOF, or the errno that ended it.
private enum Exchange: Equatable {
    case reply(String)
    case failed(Int32)
}

/// Connects to `host:port` from a thread inside `namespace`, sends `send` (if any) and shuts its side down,
/// reads until EOF (5 s at most).
private func exchange(_ namespace: String, _ host: String, _ port: Int, _ send: String) async throws -> Exchange {
    try await NetworkNamespace.run(namespace) {
        let address = try SocketAddress(ipAddress: host, port: port)
        let fd = socket(address.protocol.rawValue, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return .failed(errno) }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard SpliceSocket.withSockAddr(address, { connect(fd, $0, $1) }) == 0 else { return .failed(errno) }
        var bytes = Array(send.utf8)
        guard bytes.isEmpty || write(fd, &bytes, bytes.count) == bytes.count else { return .failed(errno) }
        shutdown(fd, Int32(SHUT_WR))
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n == 0 { return .reply(String(decoding: received, as: UTF8.self)) }
            if n < 0 { return .failed(errno) }
            received += buffer[0..<n]
        }
    }
}

/// `exchange`, with a thrown error as `.failed(-1)` (for `#expect`).
private func connectTo(_ namespace: String, _ host: String, _ port: Int, _ send: String) async -> Exchange {
    (try? await exchange(namespace, host, port, send)) ?? .failed(-1)
}

/// A TCP backend inside the group's namespace that writes `name` on connect and closes.
private func greeter(_ name: String, group: any EventLoopGroup) async throws -> any Channel {
    try await group.next().flatSubmit {
        ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(GreeterHandler(name: name))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
    }.get()
}

/// An HTTP backend inside the group's namespace answering every request with 200 and body `name`.
private func httpBackend(_ name: String, group: any EventLoopGroup) async throws -> any Channel {
    try await group.next().flatSubmit {
        ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(FixedHTTPResponder(body: name))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
    }.get()
}

private func backend(_ channel: any Channel) -> Backend {
    Backend(ip: IPAddress("127.0.0.1")!, port: channel.localAddress!.port!)
}

private func httpGet(_ namespace: String, _ vip: String, _ port: Int) async throws -> Exchange {
    try await exchange(namespace, vip, port, "GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
}

@Suite("VIP listener: one socket for every VIP:port (nat REDIRECT, SO_ORIGINAL_DST)", .rationed)
struct VIPRulesTests {
    @Test("the prefix cover is exact and small for VIPs handed out in a row")
    func cover() {
        let base = IPAddress("198.19.0.0")!
        guard case .v4(let start) = base else { return }
        // 1..1000 (the network address is never a VIP), one hole at 500.
        let vips = (UInt32(1)...1000).filter { $0 != 500 }.map { start + $0 }
        let prefixes = VIPRules.cover(vips)
        #expect(prefixes.count < 25)
        // Expanding the prefixes gives back exactly the addresses.
        var expanded: Set<UInt32> = []
        for prefix in prefixes {
            let parts = prefix.split(separator: "/")
            guard case .v4(let network) = IPAddress(parts[0])!, let length = Int(parts[1]) else { continue }
            for offset in 0..<(UInt32(1) << (32 - length)) { expanded.insert(network + offset) }
        }
        #expect(expanded == Set(vips))
        #expect(VIPRules.cover([]) == [])
        #expect(VIPRules.cover([start + 7]) == ["198.19.0.7/32"])
        #expect(VIPRules.cover([start + 4, start + 5, start + 6, start + 7]) == ["198.19.0.4/30"])
        #expect(VIPRules.prefixes([IPAddress("2001:2::1")!, base], v6: true) == ["2001:2::1/128"])
    }

    @Test("iptables-restore input: the chain, its rules, the hooks only at install")
    func restoreInput() {
        let text = VIPRules.restoreInput(chain: "MESH-VIP", prefixes: ["198.19.0.0/30"], port: 4242, hook: true)
        #expect(
            text == """
                *nat
                :MESH-VIP - [0:0]
                -A MESH-VIP -d 198.19.0.0/30 -p tcp -j REDIRECT --to-ports 4242
                -I OUTPUT 1 -j MESH-VIP
                -I PREROUTING 1 -j MESH-VIP
                COMMIT

                """
        )
        #expect(!VIPRules.restoreInput(chain: "C", prefixes: [], port: 1, hook: false).contains("OUTPUT"))
    }
}

@Suite(
    "VIP listener in a network namespace (real iptables, real sockets)",
    .enabled(if: canRedirect, "needs root, `ip netns` and iptables' nat table; skipped otherwise"),
    .timeLimit(.minutes(3)),
    .rationed,
)
struct VIPListenerNamespaceTests {
    @Test(
        "VIPs and ports of TCP and HTTP routes reach their backends through one listener; routes come and go without a socket"
    )
    func routesThroughOneListener() async throws {
        try await withNamespace { ns in
            let group = try await namespacedGroup(ns)
            defer { group.shutdownGracefully { _ in } }
            let a = try await greeter("alpha", group: group)
            let b = try await greeter("bravo", group: group)
            let h = try await httpBackend("hotel", group: group)
            let i = try await httpBackend("india", group: group)
            let configuration = DataPlaneConfiguration(
                bindMode: .meshInterface(name: "mesh0"),
                drainTimeout: .seconds(1)
            )
            let dp = DataPlane(configuration: configuration, eventLoopGroup: group, logger: testLogger)
            var routes = [
                Route(service: service("a"), vip: IPAddress("198.19.1.1")!, port: 80, backends: [backend(a)]),
                Route(service: service("b"), vip: IPAddress("198.19.1.2")!, port: 5432, backends: [backend(b)]),
                Route(service: service("a2"), vip: IPAddress("198.19.1.1")!, port: 81, backends: [backend(b)]),
                Route(
                    service: service("h"),
                    vip: IPAddress("198.19.1.3")!,
                    port: 80,
                    proto: .http,
                    backends: [backend(h)]
                ),
                Route(
                    service: service("i"),
                    vip: IPAddress("198.19.1.4")!,
                    port: 8080,
                    proto: .http,
                    backends: [backend(i)]
                ),
                Route(service: service("v6"), vip: IPAddress("2001:2::9")!, port: 80, backends: [backend(a)]),
            ]
            try await dp.apply(RouteTable(routes: routes))
            #expect(dp.snapshot().routes.allSatisfy { $0.listening })
            let ports = dp.vipListenerPorts
            #expect(ports.count == 2, "one listener per address family")
            let sockets = try listeningSockets(ns)

            #expect(await connectTo(ns, "198.19.1.1", 80, "") == .reply("alpha"))
            #expect(await connectTo(ns, "198.19.1.2", 5432, "") == .reply("bravo"))
            #expect(await connectTo(ns, "198.19.1.1", 81, "") == .reply("bravo"))
            #expect(await connectTo(ns, "2001:2::9", 80, "") == .reply("alpha"))
            guard case .reply(let hotel) = try await httpGet(ns, "198.19.1.3", 80) else {
                Issue.record("no HTTP response from 198.19.1.3:80")
                return
            }
            #expect(hotel.hasPrefix("HTTP/1.1 200") && hotel.hasSuffix("hotel"))
            guard case .reply(let india) = try await httpGet(ns, "198.19.1.4", 8080) else {
                Issue.record("no HTTP response from 198.19.1.4:8080")
                return
            }
            #expect(india.hasPrefix("HTTP/1.1 200") && india.hasSuffix("india"))

            // A VIP:port without a route: reset at once, counted.
            #expect(dp.unroutedConnections == 0)
            #expect(await connectTo(ns, "198.19.1.2", 81, "") == .failed(ECONNRESET))
            #expect(dp.unroutedConnections == 1)

            // A route added, one removed: same sockets, the change in effect at once.
            routes.removeFirst()
            routes.append(
                Route(service: service("c"), vip: IPAddress("198.19.1.5")!, port: 7000, backends: [backend(a)])
            )
            try await dp.apply(RouteTable(routes: routes))
            #expect(await connectTo(ns, "198.19.1.5", 7000, "") == .reply("alpha"))
            #expect(await connectTo(ns, "198.19.1.1", 80, "") == .failed(ECONNRESET))
            #expect(await connectTo(ns, "198.19.1.1", 81, "") == .reply("bravo"))
            #expect(dp.unroutedConnections == 2)
            let socketsNow = try listeningSockets(ns)
            #expect(socketsNow == sockets)
            #expect(dp.vipListenerPorts == ports)

            // The chain holds the cover of the VIPs, and only that.
            let rules = try natRules(ns)
            #expect(rules.contains("-A OUTPUT -j MESH-VIP"))
            #expect(rules.contains("-A PREROUTING -j MESH-VIP"))
            #expect(rules.contains { $0.contains("-d 198.19.1.4/31") && $0.contains("--to-ports \(ports[0])") })
            #expect(!rules.contains { $0.contains("169.254.96.16") })

            await dp.shutdown()
            #expect(dp.openChannels == 0)
            for channel in [a, b, h, i] { try await channel.close() }
        }
    }

    @Test(
        "HTTP routes through the one listener on either engine: pipelined keep-alive requests answered and counted",
        arguments: HTTPEngine.allCases
    )
    func httpThroughOneListener(engine: HTTPEngine) async throws {
        try await withNamespace { ns in
            let group = try await namespacedGroup(ns)
            defer { group.shutdownGracefully { _ in } }
            let h = try await httpBackend("hotel", group: group)
            let i = try await httpBackend("india", group: group)
            var configuration = DataPlaneConfiguration(
                bindMode: .meshInterface(name: "mesh0"),
                drainTimeout: .seconds(1)
            )
            // epoll: `VIPHandOver` hands the socket to an `HTTPLoopClient` on the accepting splice loop.
            configuration.http.engine = engine
            let dp = DataPlane(configuration: configuration, eventLoopGroup: group, logger: testLogger)
            try await dp.apply(
                RouteTable(routes: [
                    Route(
                        service: service("h"),
                        vip: IPAddress("198.19.2.1")!,
                        port: 80,
                        proto: .http,
                        backends: [backend(h)]
                    ),
                    Route(
                        service: service("i"),
                        vip: IPAddress("198.19.2.2")!,
                        port: 8080,
                        proto: .http,
                        backends: [backend(i)]
                    ),
                ])
            )
            let two = "GET /a HTTP/1.1\r\nHost: svc\r\n\r\nGET /b HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
            guard case .reply(let hotel) = try await exchange(ns, "198.19.2.1", 80, two) else {
                Issue.record("no HTTP response from 198.19.2.1:80")
                return
            }
            #expect(hotel.components(separatedBy: "HTTP/1.1 200 OK").count == 3, "two responses: \(hotel)")
            #expect(hotel.hasSuffix("hotel"))
            guard case .reply(let india) = try await httpGet(ns, "198.19.2.2", 8080) else {
                Issue.record("no HTTP response from 198.19.2.2:8080")
                return
            }
            #expect(india.hasPrefix("HTTP/1.1 200") && india.hasSuffix("india"))
            let requests = Dictionary(uniqueKeysWithValues: dp.snapshot().routes.map { ($0.port, $0.requests) })
            #expect(requests == [80: 2, 8080: 1])
            await dp.shutdown()
            #expect(dp.openChannels == 0)
            for channel in [h, i] { try await channel.close() }
        }
    }

    @Test("a stale chain from a crashed run is replaced at start; the chain is gone after shutdown")
    func staleChainReplacedAndRemoved() async throws {
        try await withNamespace { ns in
            for v6 in [false, true] {
                let tool = v6 ? "ip6tables" : "iptables"
                let stale = v6 ? "2001:2::99/128" : "198.19.9.9/32"
                try sh("ip", "netns", "exec", ns, tool, "-w", "-t", "nat", "-N", "MESH-VIP")
                try sh(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    tool,
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "MESH-VIP",
                    "-d",
                    stale,
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "9"
                )
                for _ in 0..<2 {
                    try sh("ip", "netns", "exec", ns, tool, "-w", "-t", "nat", "-A", "OUTPUT", "-j", "MESH-VIP")
                }
            }
            let group = try await namespacedGroup(ns)
            defer { group.shutdownGracefully { _ in } }
            let a = try await greeter("alpha", group: group)
            let dp = DataPlane(
                configuration: DataPlaneConfiguration(bindMode: .meshInterface(name: "mesh0")),
                eventLoopGroup: group,
                logger: testLogger
            )
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("a"), vip: IPAddress("198.19.2.1")!, port: 80, backends: [backend(a)])
                ])
            )
            for v6 in [false, true] {
                let rules = try natRules(ns, v6: v6)
                #expect(rules.filter { $0 == "-A OUTPUT -j MESH-VIP" }.count == 1)
                #expect(rules.filter { $0 == "-A PREROUTING -j MESH-VIP" }.count == 1)
                #expect(!rules.contains { $0.contains("198.19.9.9") || $0.contains("2001:2::99") })
            }
            #expect(await connectTo(ns, "198.19.2.1", 80, "") == .reply("alpha"))
            await dp.shutdown()
            for v6 in [false, true] {
                let after = try natRules(ns, v6: v6)
                #expect(!after.contains { $0.contains("MESH-VIP") })
            }
            try await a.close()
        }
    }

    @Test("1,000 services: the same listening sockets as one, a few rules (15), every route served")
    func thousandServices() async throws {
        try await withNamespace { ns in
            let group = try await namespacedGroup(ns)
            defer { group.shutdownGracefully { _ in } }
            let a = try await greeter("alpha", group: group)
            let dp = DataPlane(
                configuration: DataPlaneConfiguration(bindMode: .meshInterface(name: "mesh0")),
                eventLoopGroup: group,
                logger: testLogger
            )
            func vip(_ n: Int) -> IPAddress { .v4(0xC613_0000 | UInt32(n + 1)) }  // 198.19.0.1 on
            try await dp.apply(
                RouteTable(routes: [Route(service: service("s0"), vip: vip(0), port: 80, backends: [backend(a)])])
            )
            let one = try listeningSockets(ns)
            try await dp.apply(
                RouteTable(
                    routes: (0..<1000).map {
                        Route(service: service("s\($0)"), vip: vip($0), port: 80, backends: [backend(a)])
                    }
                )
            )
            #expect(dp.snapshot().routes.count == 1000)
            #expect(dp.snapshot().routes.allSatisfy { $0.listening })
            let socketsNow = try listeningSockets(ns)
            #expect(socketsNow == one)
            let prefixes = dp.redirectedPrefixes.first ?? []
            // At most two prefixes per bit of the range: 198.19.0.1 to 198.19.3.232 is 15.
            #expect(prefixes.count <= 20, "\(prefixes)")
            for n in [0, 1, 511, 999] {
                #expect(await connectTo(ns, "\(vip(n))", 80, "") == .reply("alpha"))
            }
            await dp.shutdown()
            try await a.close()
        }
    }
}

/// Answers every request head with `200` and `body` (keep-alive).
private final class FixedHTTPResponder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let body: String
    private var seen = ""

    init(body: String) { self.body = body }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.seen += String(buffer: self.unwrapInboundIn(data))
        while let end = self.seen.range(of: "\r\n\r\n") {
            self.seen.removeSubrange(self.seen.startIndex..<end.upperBound)
            let response = "HTTP/1.1 200 OK\r\nContent-Length: \(self.body.utf8.count)\r\n\r\n\(self.body)"
            context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: response)), promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
