import Foundation
import Logging
import MeshCore
import MeshTestSupport
import NIOCore
import NIOPosix
import Synchronization
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent
@testable import NodeAgent

/// Runs a command, returning its exit status and standard output (also used by VIPListenerTests).
@discardableResult
func sh(_ arguments: String...) throws -> (status: Int32, output: String) {
    try runBlocking(arguments)
}

/// Root, and `ip netns` works here.
private let canUseNamespaces: Bool = {
    guard getuid() == 0 else { return false }
    let probe = "dpt-probe-\(getpid())"
    guard (try? sh("ip", "netns", "add", probe))?.status == 0 else { return false }
    _ = try? sh("ip", "netns", "del", probe)
    return true
}()

private let namespaceCounter = Atomic<Int>(0)

/// A network namespace named uniquely for this run, with `lo` up; deleted when `body` ends.
private func withNamespace<T>(_ body: (String) async throws -> T) async throws -> T {
    let name = "dpt-\(getpid())-\(namespaceCounter.add(1, ordering: .relaxed).newValue)"
    try #require(try sh("ip", "netns", "add", name).status == 0)
    defer { _ = try? sh("ip", "netns", "del", name) }
    try sh("ip", "-n", name, "link", "set", "lo", "up")
    return try await body(name)
}

/// The addresses `ip` shows on `link` in `namespace` (nil when the link does not exist).
private func addresses(_ namespace: String, _ link: String = "mesh0") throws -> Set<String>? {
    let result = try sh("ip", "-n", namespace, "-o", "addr", "show", "dev", link)
    guard result.status == 0 else { return nil }
    var set: Set<String> = []
    for line in result.output.split(separator: "\n") {
        let fields = line.split(separator: " ")
        if let i = fields.firstIndex(where: { $0 == "inet" || $0 == "inet6" }), i + 1 < fields.count {
            let address = String(fields[i + 1].split(separator: "/")[0])
            if !address.hasPrefix("fe80:") { set.insert(address) }
        }
    }
    return set
}

private func linkExists(_ namespace: String, _ link: String = "mesh0") throws -> Bool {
    try sh("ip", "-n", namespace, "link", "show", "dev", link).status == 0
}

/// An event loop group whose thread has entered `namespace`: sockets (listeners, upstream connections,
/// netlink) made on it live there.
private func namespacedGroup(_ namespace: String) async throws -> MultiThreadedEventLoopGroup {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    try await group.next().submit { try NetworkNamespace.enter(namespace) }.get()
    return group
}

@Suite(
    "Mesh interface over netlink (in a private network namespace)",
    .enabled(if: canUseNamespaces, "needs root and `ip netns` (iproute2); skipped otherwise"),
    .timeLimit(.minutes(1)),
    .awaitedTeardown,
    .rationed,
)
struct InterfaceNetlinkTests {
    @Test("create, reconcile, reuse with stale addresses, destroy")
    func lifecycle() async throws {
        try await withNamespace { ns in
            let interface = try await NetworkNamespace.run(ns) {
                try MeshInterface.open(name: "mesh0", logger: testLogger)
            }
            #expect(try linkExists(ns))
            let wanted: Set<IPAddress> = [
                IPAddress("169.254.96.16")!, IPAddress("198.18.7.1")!, IPAddress("2001:2::7")!,
            ]
            try interface.reconcile(wanted)
            #expect(try addresses(ns) == ["169.254.96.16", "198.18.7.1", "2001:2::7"])
            #expect(try interface.addresses() == wanted)
            try interface.reconcile([IPAddress("169.254.96.16")!, IPAddress("2001:2::7")!])
            #expect(try addresses(ns) == ["169.254.96.16", "2001:2::7"])

            // A restart: the link is reused and a stale address left by someone else goes.
            try sh("ip", "-n", ns, "addr", "add", "198.18.99.99/32", "dev", "mesh0")
            let again = try await NetworkNamespace.run(ns) { try MeshInterface.open(name: "mesh0", logger: testLogger) }
            #expect(again.index == interface.index)
            let changes = try again.reconcile([IPAddress("169.254.96.16")!])
            #expect(changes.removed == [IPAddress("198.18.99.99")!, IPAddress("2001:2::7")!])
            #expect(try addresses(ns) == ["169.254.96.16"])
            try again.destroy()
            #expect(try !linkExists(ns))
            try again.destroy()  // idempotent
        }
    }

    @Test("the data plane in mesh-interface mode: VIPs on mesh0, served, removed with their route, no mesh0 after stop")
    func dataPlaneInNamespace() async throws {
        try await withNamespace { ns in
            let group = try await namespacedGroup(ns)
            defer { group.shutdownGracefully { _ in } }
            // A backend inside the namespace.
            let backend = try await group.next().flatSubmit {
                ServerBootstrap(group: group)
                    .childChannelOption(.allowRemoteHalfClosure, value: true)
                    .childChannelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(EchoHandler())
                        }
                    }
                    .bind(host: "127.0.0.1", port: 0)
            }.get()
            let port = backend.localAddress!.port!
            let configuration = DataPlaneConfiguration(
                bindMode: .meshInterface(name: "mesh0"),
                // Longer than any pause load can put between the route's removal and the held connection's
                // close: the VIP must leave when that connection closes, not when the drain times out.
                drainTimeout: .seconds(300)
            )
            let dp = DataPlane(configuration: configuration, eventLoopGroup: group, logger: testLogger)
            let echo = Backend(ip: IPAddress("127.0.0.1")!, port: port)
            let v4 = IPAddress("198.18.42.1")!
            let v6 = IPAddress("2001:2::42")!
            let other = IPAddress("198.18.42.2")!
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("a"), vip: v4, port: 80, backends: [echo]),
                    Route(service: service("b"), vip: v6, port: 80, backends: [echo]),
                    Route(service: service("c"), vip: other, port: 53, proto: .udp, backends: [echo]),
                ])
            )
            #expect(dp.snapshot().mode == .meshInterface("mesh0"))
            #expect(try addresses(ns) == ["169.254.96.16", "198.18.42.1", "2001:2::42", "198.18.42.2"])
            let allListening = dp.snapshot().routes.allSatisfy { $0.listening }
            #expect(allListening)

            // Traffic to the VIP inside the namespace reaches the backend through the proxy.
            for vip in [v4, v6] {
                let address = try SocketAddress(ipAddress: vip.description, port: 80)
                let loop = group.next()
                let reply = loop.makePromise(of: String.self)
                _ = try await loop.flatSubmit {
                    ClientBootstrap(group: loop)
                        .channelInitializer { channel in
                            channel.eventLoop.makeCompletedFuture {
                                try channel.pipeline.syncOperations.addHandler(EchoProbe(reply: reply))
                            }
                        }
                        .connect(to: address)
                }.get()
                #expect(try await reply.futureResult.get() == "ping")
            }
            #expect(dp.snapshot().routes.first { $0.service == "a" }?.totalConnections == 1)
            // The probes closed their ends; the data plane's ends close after. Counted open, they would let
            // the wait below pass before the held connection is accepted (its route's removal then resets it).
            #expect(await eventually { dp.openClientChannels == 0 })

            // A connection that stays open on the first VIP.
            let loop = group.next()
            let late = loop.makePromise(of: String.self)
            let held = try await loop.flatSubmit {
                ClientBootstrap(group: loop)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(FirstReply(reply: late))
                        }
                    }
                    .connect(to: try! SocketAddress(ipAddress: v4.description, port: 80))
            }.get()
            // The client's connect returns once the kernel has queued the connection; the data plane owns it
            // (and will drain it) only once a loop has accepted it. Under load that comes later.
            #expect(await eventually { dp.openClientChannels == 1 })

            // Routes go: their VIPs leave mesh0, except the one whose connection drains, until it has drained.
            try await dp.apply(RouteTable(routes: [Route(service: service("b"), vip: v6, port: 80, backends: [echo])]))
            #expect(try addresses(ns) == ["169.254.96.16", "2001:2::42", "198.18.42.1"])
            // The draining connection still carries bytes both ways (its VIP keeps its redirect rule).
            try await held.writeAndFlush(ByteBuffer(string: "draining"))
            #expect(try await late.futureResult.get() == "draining")
            try await held.close()
            #expect(await eventually(60) { (try? addresses(ns)) == ["169.254.96.16", "2001:2::42"] })

            await dp.shutdown()
            #expect(try !linkExists(ns))
            #expect(dp.openChannels == 0)
            try await backend.close()
        }
    }

    @Test("host address changes arrive on the watch stream")
    func hostAddressWatch() async throws {
        try await withNamespace { ns in
            let stream = try await NetworkNamespace.run(ns) { try HostAddressWatcher.events(logger: testLogger) }
            try sh("ip", "-n", ns, "link", "add", "w0", "type", "bridge")
            try sh("ip", "-n", ns, "link", "set", "w0", "up")
            try sh("ip", "-n", ns, "addr", "add", "198.18.77.1/24", "dev", "w0")
            try sh("ip", "-n", ns, "addr", "del", "198.18.77.1/24", "dev", "w0")
            let events = try await withTimeout(30) {
                var seen: [HostAddressEvent] = []
                for await event in stream {
                    seen.append(event)
                    if event.kind == .removed && event.address == IPAddress("198.18.77.1")! { break }
                }
                return seen
            }
            // 127.0.0.1 and ::1 come first (present at start), then the change.
            #expect(events.contains { $0.kind == .added && $0.address == IPAddress("127.0.0.1")! })
            let added = try #require(events.first { $0.kind == .added && $0.address == IPAddress("198.18.77.1")! })
            #expect(added.prefixLength == 24)
        }
    }

    @Test("the host's addresses are read one interface at a time: the mesh interface's and a down one's left out")
    func hostAddressesPerInterface() async throws {
        try await withNamespace { ns in
            for (link, up) in [("eth9", true), ("eth8", false), ("meshx", true)] {
                try sh("ip", "-n", ns, "link", "add", link, "type", "bridge")
                if up { try sh("ip", "-n", ns, "link", "set", link, "up") }
            }
            try sh("ip", "-n", ns, "addr", "add", "198.18.5.1/24", "dev", "eth9")
            try sh("ip", "-n", ns, "addr", "add", "198.18.5.9/32", "dev", "eth9")
            try sh("ip", "-n", ns, "addr", "add", "198.18.7.1/24", "dev", "eth8")
            // A few hundred VIPs on the mesh interface, as a table puts there.
            let batch = (1...200).map { "addr add 198.18.6.\($0)/32 dev meshx" }.joined(separator: "\n")
            let file = FileManager.default.temporaryDirectory.appendingPathComponent("vips-\(ns).batch")
            try batch.write(to: file, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: file) }
            #expect(try sh("ip", "-n", ns, "-batch", file.path).status == 0)

            let (dumped, listed, withMesh) = try await NetworkNamespace.run(ns) {
                (
                    LinkAddressDump.addresses(excluding: ["meshx"]),
                    HostAddresses.fromGetifaddrs(excludingInterfaces: ["meshx"]),
                    LinkAddressDump.addresses(excluding: [])
                )
            }
            let expected: Set<IPAddress> = [IPAddress("198.18.5.1")!, IPAddress("198.18.5.9")!]
            let perInterface = try #require(dumped, "the per-interface dump failed (no NETLINK_GET_STRICT_CHK?)")
            #expect(Set(perInterface.filter(HostAddresses.isAdvertisable)) == expected)
            #expect(listed == expected)  // getifaddrs agrees
            // And nothing is lost when meshx is not left out.
            #expect(Set(try #require(withMesh).filter(HostAddresses.isAdvertisable)).count == 202)
        }
    }

    @Test("automatic mode falls back to loopback when the link cannot be made")
    func automaticFallback() async throws {
        // An interface name the kernel refuses (over 15 bytes): the same path as a missing CAP_NET_ADMIN.
        let configuration = DataPlaneConfiguration(bindMode: .automatic(name: "mesh-name-too-long-for-linux"))
        let dp = DataPlane(configuration: configuration, eventLoopGroup: testGroup, logger: testLogger)
        let backend = try await TestServers.echo()
        onTeardown { await backend.close() }
        let vip = TestAddresses.vip()
        try await dp.apply(
            RouteTable(routes: [Route(service: service("fb"), vip: vip, port: 8080, backends: [backend.backend()])])
        )
        #expect(dp.snapshot().mode == .loopback)
        let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080), send: "lo", halfClose: true)
        #expect(String(buffer: reply) == "lo")
        await dp.shutdown()
        #expect(dp.openChannels == 0)
    }
}

/// Sends "ping", reports the first reply, closes.
/// Passes on the first bytes read, and leaves the connection open.
private final class FirstReply: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let reply: EventLoopPromise<String>

    init(reply: EventLoopPromise<String>) { self.reply = reply }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.reply.succeed(String(buffer: self.unwrapInboundIn(data)))
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.reply.fail(ChannelError.ioOnClosedChannel)
    }
}

private final class EchoProbe: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let reply: EventLoopPromise<String>

    init(reply: EventLoopPromise<String>) { self.reply = reply }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: "ping")), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.reply.succeed(String(buffer: self.unwrapInboundIn(data)))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.reply.fail(ChannelError.ioOnClosedChannel)
    }
}
