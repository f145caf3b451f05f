import CLinux
import CoreMetrics
import Logging
import MeshCore
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A VIP and TCP port, as a connection's original destination names it.
struct VIPPort: Hashable, Sendable {
    var vip: IPAddress
    var port: UInt16
}

/// The one listener of mesh-interface mode: one TCP socket per address family, on a port the kernel picks,
/// receives every connection to any VIP (the `REDIRECT` rules of `VIPRules`), reads where the connection was
/// going (`SO_ORIGINAL_DST`) and looks the route up in a table. TCP routes are spliced on the accepting splice
/// loop like a per-service listener's connections; HTTP routes are handed to the HTTP proxy
/// (`VIPHandOver.serveHTTP`: on the accepting splice loop for the epoll engine); a VIP:port without a route is reset at once and counted.
///
/// A route costs one `RedirectedRoute` (a few hundred bytes) in the table, not a socket: the table of 10,000
/// services is a dictionary of 10,000 entries.
final class VIPListener: Sendable {
    let environment: ProxyEnvironment
    let loops: [SpliceLoop]
    /// The event loop each splice loop was started from (same index): where its HTTP connections run.
    let eventLoops: [any EventLoop]
    private let group: any EventLoopGroup
    private let sockets: [(fd: Int32, v6: Bool, port: Int)]
    private let firewalls: [VIPFirewall]
    private let acceptors: [VIPAcceptor.Box]
    private let routes = Mutex<[VIPPort: RedirectedRoute]>([:])
    /// The prefixes installed per family (index as `sockets`), to skip unchanged updates.
    private let installed = Mutex<[[String]]>([])
    private let unroutedCount = Atomic<Int>(0)
    private let unroutedMetric: Counter
    private let stopped = Atomic<Bool>(false)

    /// Connections to a VIP:port without a route (reset on accept).
    var unrouted: Int { self.unroutedCount.load(ordering: .relaxed) }

    /// The listening sockets' ports (IPv4 first; IPv6 when the host has it).
    var ports: [Int] { self.sockets.map(\.port) }

    /// Routes in the table.
    var routeCount: Int { self.routes.withLock { $0.count } }

    /// Binds the sockets, installs the redirect chain `chain` (replacing a stale one), and starts accepting on
    /// every splice loop. Everything runs on one of `group`'s threads (its network namespace).
    static func start(
        environment: ProxyEnvironment,
        group: any EventLoopGroup,
        chain: String,
        metricsFactory: any MetricsFactory
    ) async throws -> VIPListener {
        let loops = try await environment.splice.loops(on: group)
        let logger = environment.logger
        let backlog = environment.configuration.backlog
        let (sockets, firewalls) = try await group.next().submit {
            () throws -> ([(fd: Int32, v6: Bool, port: Int)], [VIPFirewall]) in
            var sockets: [(fd: Int32, v6: Bool, port: Int)] = []
            var firewalls: [VIPFirewall] = []
            let v4 = try VIPSocket.listen(v6: false, backlog: backlog)
            let firewall4 = VIPFirewall(chain: chain, v6: false)
            do {
                try firewall4.install(prefixes: [], port: v4.port)
            } catch {
                close(v4.fd)
                throw error
            }
            sockets.append((v4.fd, false, v4.port))
            firewalls.append(firewall4)
            // IPv6 when the host has it and ip6tables' nat table works; IPv4 VIPs are served either way.
            do {
                let v6 = try VIPSocket.listen(v6: true, backlog: backlog)
                let firewall6 = VIPFirewall(chain: chain, v6: true)
                do {
                    try firewall6.install(prefixes: [], port: v6.port)
                    sockets.append((v6.fd, true, v6.port))
                    firewalls.append(firewall6)
                } catch {
                    close(v6.fd)
                    throw error
                }
            } catch {
                logger.notice("VIP listener: no IPv6 redirect", metadata: ["error": "\(error)"])
            }
            return (sockets, firewalls)
        }.get()
        let listener = VIPListener(
            environment: environment,
            group: group,
            loops: loops,
            sockets: sockets,
            firewalls: firewalls,
            metricsFactory: metricsFactory
        )
        try await listener.startAccepting()
        logger.info("VIP listener", metadata: ["ports": "\(listener.ports)", "chain": "\(chain)"])
        return listener
    }

    private init(
        environment: ProxyEnvironment,
        group: any EventLoopGroup,
        loops: [SpliceLoop],
        sockets: [(fd: Int32, v6: Bool, port: Int)],
        firewalls: [VIPFirewall],
        metricsFactory: any MetricsFactory
    ) {
        self.environment = environment
        self.group = group
        self.loops = loops
        self.eventLoops = Array(group.makeIterator())
        self.sockets = sockets
        self.firewalls = firewalls
        self.acceptors = (0..<(loops.count * sockets.count)).map { _ in VIPAcceptor.Box() }
        self.installed.withLock { $0 = Array(repeating: [], count: sockets.count) }
        self.unroutedMetric = Counter(
            label: "mesh_proxy_unrouted_connections_total",
            dimensions: [],
            factory: metricsFactory
        )
    }

    private func startAccepting() async throws {
        for (l, loop) in self.loops.enumerated() {
            let eventLoop = self.eventLoops[l % self.eventLoops.count]
            for (s, socket) in self.sockets.enumerated() {
                let box = self.acceptors[l * self.sockets.count + s]
                try await SpliceLoop.perform(on: loop) {
                    let acceptor = VIPAcceptor(
                        listener: self,
                        fd: socket.fd,
                        v6: socket.v6,
                        loop: loop,
                        eventLoop: eventLoop
                    )
                    try loop.register(socket.fd, acceptor, events: SpliceEvents.input | SpliceEvents.exclusive)
                    box.set(acceptor)
                }
            }
        }
    }

    // MARK: routes

    /// Serves `handle`'s route from now on (its VIP must be covered by the rules: `updateRules`).
    func add(_ handle: RouteHandle) -> RedirectedRoute {
        let route = RedirectedRoute(handle: handle, listener: self)
        let key = VIPPort(vip: handle.key.vip, port: UInt16(handle.key.port))
        self.routes.withLock { $0[key] = route }
        return route
    }

    /// Stops serving `route` (new connections to its VIP:port are reset); open ones carry on.
    func remove(_ route: RedirectedRoute) {
        let key = VIPPort(vip: route.handle.key.vip, port: UInt16(route.handle.key.port))
        self.routes.withLock {
            if $0[key] === route { $0[key] = nil }
        }
    }

    @inline(__always)
    func route(_ key: VIPPort) -> RedirectedRoute? {
        self.routes.withLock { $0[key] }
    }

    func countUnrouted() {
        self.unroutedCount.add(1, ordering: .relaxed)
        self.unroutedMetric.increment()
    }

    /// Redirects exactly `vips` (their exact prefix cover per family) to the listener; no-op when unchanged.
    func updateRules(vips: Set<IPAddress>) async throws {
        let wanted = self.sockets.map { VIPRules.prefixes(vips, v6: $0.v6) }
        let changed = self.installed.withLock { installed -> [Int] in
            wanted.indices.filter { wanted[$0] != installed[$0] }
        }
        guard !changed.isEmpty, !self.stopped.load(ordering: .relaxed) else { return }
        let sockets = self.sockets
        let firewalls = self.firewalls
        try await self.group.next().submit {
            for index in changed {
                try firewalls[index].update(prefixes: wanted[index], port: sockets[index].port)
            }
        }.get()
        self.installed.withLock { installed in
            for index in changed { installed[index] = wanted[index] }
        }
    }

    /// The prefixes redirected now, per family (IPv4 first).
    var redirectedPrefixes: [[String]] { self.installed.withLock { $0 } }

    /// Stops accepting, closes the sockets and removes the chain. Open connections are the routes'.
    func stop() async {
        guard !self.stopped.exchange(true, ordering: .relaxed) else { return }
        for (l, loop) in self.loops.enumerated() {
            for (s, socket) in self.sockets.enumerated() {
                let box = self.acceptors[l * self.sockets.count + s]
                try? await SpliceLoop.perform(on: loop) {
                    guard let acceptor = box.take() else { return }
                    acceptor.detached = true
                    loop.deregister(socket.fd)
                }
            }
        }
        for socket in self.sockets { close(socket.fd) }
        let firewalls = self.firewalls
        let removal = self.group.next().submit {
            for firewall in firewalls { firewall.remove() }
        }
        do {
            try await removal.get()
        } catch {
            // The group is gone: remove from this thread (the same namespace in the agent).
            for firewall in firewalls { firewall.remove() }
        }
        self.routes.withLock { $0 = [:] }
    }
}

/// A route served through the VIP listener: its handle, the splice listener (without a socket) its TCP
/// connections count against, and its HTTP connections. The protocol is read per connection, so a route that
/// changes between `tcp` and `http` serves new connections the new way at once.
///
/// The splice listener and the set of NIO HTTP channels are made on the route's first connection: most routes
/// of a large mesh never carry one through a given agent, and the two were ~150 of the ~200 bytes a route
/// cost here (1.5 MB at 10,000 services).
final class RedirectedRoute: Sendable {
    let handle: RouteHandle
    private let listener: VIPListener
    private let made = Mutex<(splice: SpliceListener?, connections: ChannelSet?)>((nil, nil))

    init(handle: RouteHandle, listener: VIPListener) {
        self.handle = handle
        self.listener = listener
    }

    /// The splice listener its connections count against, made now if this is the first.
    var splice: SpliceListener {
        self.made.withLock { made in
            if let splice = made.splice { return splice }
            let splice = SpliceListener.unbound(
                handle: self.handle,
                loops: self.listener.loops,
                upstreams: self.listener.environment.upstreams,
                traces: self.listener.environment.traces
            )
            made.splice = splice
            return splice
        }
    }

    /// The route's NIO HTTP channels (`httpEngine: nio`), made now if this is the first.
    var connections: ChannelSet {
        self.made.withLock { made in
            if let connections = made.connections { return connections }
            let connections = ChannelSet()
            made.connections = connections
            return connections
        }
    }

    /// What was made so far (nothing for a route that never had a connection).
    private var existing: (splice: SpliceListener?, connections: ChannelSet?) { self.made.withLock { $0 } }

    var openConnections: Int {
        let (splice, connections) = self.existing
        return (splice?.openConnections ?? 0) + (connections?.count ?? 0)
    }

    /// Out of the table (new connections are reset), HTTP connections asked to finish their request.
    func stopAccepting() async {
        self.listener.remove(self)
        let (splice, connections) = self.existing
        if let splice {
            await splice.stopAccepting()
            await splice.quiesce()
        }
        for channel in connections?.all ?? [] {
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
    }

    /// Closes what is open, including what a connection accepted while the route left the table brought.
    func closeAll() async {
        let (splice, connections) = self.existing
        await splice?.closeAll()
        connections?.closeAll()
    }
}

/// The VIP listener's socket as seen by one splice loop.
final class VIPAcceptor: SplicePollable, SpliceListeningSocket {
    /// Holds a loop's acceptor (set and taken on that loop's thread only).
    final class Box: @unchecked Sendable {
        private var acceptor: VIPAcceptor?
        func set(_ acceptor: VIPAcceptor) { self.acceptor = acceptor }
        func take() -> VIPAcceptor? {
            defer { self.acceptor = nil }
            return self.acceptor
        }
    }

    let fd: Int32
    var detached = false
    private let v6: Bool
    private let listener: VIPListener
    private unowned(unsafe) let loop: SpliceLoop
    private let eventLoop: any EventLoop
    private var lastWarning: UInt64 = 0

    init(listener: VIPListener, fd: Int32, v6: Bool, loop: SpliceLoop, eventLoop: any EventLoop) {
        self.listener = listener
        self.fd = fd
        self.v6 = v6
        self.loop = loop
        self.eventLoop = eventLoop
    }

    /// Accepts up to 16 connections per wake-up (level-triggered: more wake the loop again), each sent to its
    /// route by its original destination.
    override func ready(_ events: UInt32) {
        guard !self.detached else { return }
        for _ in 0..<16 {
            guard
                let (fd, storage) = self.loop.accept(
                    on: self,
                    lastWarning: &self.lastWarning,
                    "VIP listener: accept failed, pausing for 100 ms"
                )
            else { return }
            guard let destination = VIPSocket.originalDestination(fd, v6: self.v6),
                let route = self.listener.route(destination)
            else {
                self.listener.countUnrouted()
                VIPSocket.reset(fd)
                continue
            }
            let handle = route.handle
            guard SpliceSocket.admit(fd, to: handle, self.loop.configuration) else { continue }
            if handle.proto == .http {
                VIPHandOver.serveHTTP(
                    socket: fd,
                    route: route,
                    clientIP: SpliceSocket.ip(of: storage),
                    loop: self.loop,
                    on: self.eventLoop,
                    environment: self.listener.environment
                )
                continue
            }
            SpliceConnection.splice(client: fd, address: storage, listener: route.splice, loop: self.loop)
        }
    }
}

/// The socket calls of the VIP listener.
enum VIPSocket {
    /// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h).
    static let originalDestinationOption: Int32 = 80

    /// A non-blocking listening TCP socket on the wildcard address and a port the kernel picks (IPv6 only for
    /// `v6`), and that port.
    static func listen(v6: Bool, backlog: Int) throws -> (fd: Int32, port: Int) {
        let family = v6 ? AF_INET6 : AF_INET
        let fd = socket(family, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SpliceLoop.Failure("socket", errno) }
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var storage = sockaddr_storage()
        var length: socklen_t
        if v6 {
            _ = setsockopt(fd, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &one, socklen_t(MemoryLayout<Int32>.size))
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            withUnsafeBytes(of: &address) { source in
                withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: source) }
            }
        } else {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            length = socklen_t(MemoryLayout<sockaddr_in>.size)
            withUnsafeBytes(of: &address) { source in
                withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: source) }
            }
        }
        let bound = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0, Glibc.listen(fd, Int32(clamping: backlog)) == 0 else {
            let code = errno
            close(fd)
            throw SpliceLoop.Failure("VIP listener bind/listen", code)
        }
        var actual = sockaddr_storage()
        var actualLength = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &actualLength) }
        }
        let port = withUnsafePointer(to: &actual) {
            $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
        }
        return (fd, port)
    }

    /// Where an accepted (redirected) connection was going, from the NAT entry; nil when it has none.
    static func originalDestination(_ fd: Int32, v6: Bool) -> VIPPort? {
        if v6 {
            var address = sockaddr_in6()
            var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
            guard getsockopt(fd, Int32(IPPROTO_IPV6), Self.originalDestinationOption, &address, &length) == 0 else {
                return nil
            }
            var raw = address.sin6_addr
            guard let ip = withUnsafeBytes(of: &raw, { IPAddress(bytes: Array($0)) }) else { return nil }
            return VIPPort(vip: ip, port: UInt16(bigEndian: address.sin6_port))
        }
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        guard getsockopt(fd, Int32(IPPROTO_IP), Self.originalDestinationOption, &address, &length) == 0 else {
            return nil
        }
        return VIPPort(vip: .v4(UInt32(bigEndian: address.sin_addr.s_addr)), port: UInt16(bigEndian: address.sin_port))
    }

    /// Closes with a reset (SO_LINGER 0): the client sees ECONNRESET at once.
    static func reset(_ fd: Int32) {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        close(fd)
    }
}

extension SpliceLoop {
    /// Runs `body` on `loop`'s thread and waits for it.
    static func perform(on loop: SpliceLoop, _ body: @escaping @Sendable () throws -> Void) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let queued = loop.execute { continuation.resume(with: Result { try body() }) }
            if !queued { continuation.resume(throwing: SpliceLoop.Failure("splice loop stopped", ESHUTDOWN)) }
        }
    }
}

extension ListenerKey {
    /// `vip:port` (`[vip]:port`), the Host an HTTP/1.0 request without one gets.
    var hostText: String { self.vip.isIPv4 ? "\(self.vip):\(self.port)" : "[\(self.vip)]:\(self.port)" }
}
