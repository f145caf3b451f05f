import CLinux
import Logging
import MeshCore
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The splice loops of one data plane, one per event loop of its group, started on first use (an agent with
/// no TCP route runs no splice thread).
final class SpliceEngine: Sendable {
    private let configuration: DataPlaneConfiguration
    private let counters: DataPlaneCounters
    private let logger: Logger
    private let state = Mutex<[SpliceLoop]?>(nil)

    init(configuration: DataPlaneConfiguration, counters: DataPlaneCounters, logger: Logger) {
        self.configuration = configuration
        self.counters = counters
        self.logger = logger
    }

    /// The loops, starting them first if needed. Each is started from one of `group`'s event-loop threads,
    /// so it lives in that thread's network namespace.
    func loops(on group: any EventLoopGroup) async throws -> [SpliceLoop] {
        if let loops = self.state.withLock({ $0 }) { return loops }
        var started: [SpliceLoop] = []
        for (index, eventLoop) in group.makeIterator().enumerated() {
            let configuration = self.configuration
            let counters = self.counters
            let logger = self.logger
            started.append(
                try await eventLoop.submit {
                    try SpliceLoop.start(
                        index: index,
                        configuration: configuration,
                        counters: counters,
                        logger: logger
                    )
                }.get()
            )
        }
        let (loops, extra) = self.state.withLock { state -> ([SpliceLoop], [SpliceLoop]) in
            if let existing = state { return (existing, started) }
            state = started
            return (started, [])
        }
        for loop in extra { loop.stop() }
        return loops
    }

    /// Splice threads running (0 until the first TCP route, and after `shutdown()` once they have exited).
    var runningLoops: Int { self.state.withLock { $0?.count(where: { !$0.hasStopped }) ?? 0 } }

    /// Stops every loop (closing what is still open) and waits up to 2 s for the threads to finish.
    func shutdown() async {
        guard
            let loops = self.state.withLock({ state -> [SpliceLoop]? in
                defer { state = nil }
                return state
            })
        else { return }
        for loop in loops { loop.stop() }
        let deadline = ContinuousClock.now + .seconds(2)
        while loops.contains(where: { !$0.hasStopped }), ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(2))
        }
    }
}

/// A TCP route's listening socket, watched by every splice loop of the data plane (EPOLLEXCLUSIVE: one loop
/// is woken per connection), and the count of its open connections.
final class SpliceListener: Sendable {
    let handle: RouteHandle
    let fd: Int32
    /// Where a backend at another site is reached (the peer links).
    let upstreams: Upstreams
    /// An `http` route on the epoll engine: accepted sockets become `HTTPLoopClient`s.
    let http: Bool
    /// Where traced HTTP requests are recorded.
    let traces: TraceLog?
    private let loops: [SpliceLoop]
    private let acceptors: [SpliceAcceptor.Box]
    private let open = Atomic<Int>(0)
    private let stopped = Atomic<Bool>(false)

    /// Binds and listens on `address` from a thread of `group` (its network namespace), and starts
    /// accepting on `loops`.
    static func bind(
        handle: RouteHandle,
        address: SocketAddress,
        backlog: Int,
        loops: [SpliceLoop],
        group: any EventLoopGroup,
        upstreams: Upstreams,
        http: Bool = false,
        traces: TraceLog? = nil
    ) async throws -> SpliceListener {
        let fd = try await group.next().submit { try SpliceSocket.listen(on: address, backlog: backlog) }.get()
        let listener = SpliceListener(
            handle: handle,
            fd: fd,
            loops: loops,
            upstreams: upstreams,
            http: http,
            traces: traces
        )
        do {
            try await listener.start()
        } catch {
            // Loops that registered it forget it before the socket closes.
            await listener.stopAccepting()
            throw error
        }
        return listener
    }

    /// A listener without a socket of its own: the VIP listener (`VIP/VIPListener.swift`) hands it the
    /// connections of its route, TCP ones and (epoll engine) HTTP ones alike. `stopAccepting` only marks it;
    /// `closeAll` closes its connections; `quiesce` asks its HTTP connections to finish.
    static func unbound(
        handle: RouteHandle,
        loops: [SpliceLoop],
        upstreams: Upstreams,
        traces: TraceLog? = nil
    ) -> SpliceListener {
        SpliceListener(handle: handle, fd: -1, loops: loops, upstreams: upstreams, http: false, traces: traces)
    }

    private init(
        handle: RouteHandle,
        fd: Int32,
        loops: [SpliceLoop],
        upstreams: Upstreams,
        http: Bool,
        traces: TraceLog?
    ) {
        self.handle = handle
        self.fd = fd
        self.upstreams = upstreams
        self.http = http
        self.traces = traces
        self.loops = loops
        self.acceptors = fd < 0 ? [] : loops.map { _ in SpliceAcceptor.Box() }
    }

    private func start() async throws {
        for (loop, box) in zip(self.loops, self.acceptors) {
            try await Self.onLoop(loop) {
                let acceptor = SpliceAcceptor(listener: self, loop: loop)
                try loop.register(
                    self.fd,
                    acceptor,
                    events: SpliceEvents.input | SpliceEvents.exclusive
                )
                box.set(acceptor)
            }
        }
    }

    /// Open connections accepted here.
    var openConnections: Int { self.open.load(ordering: .relaxed) }

    func opened() { self.open.add(1, ordering: .relaxed) }
    func closed() { self.open.subtract(1, ordering: .relaxed) }

    /// Stops accepting and closes the listening socket; open connections carry on. Idempotent.
    func stopAccepting() async {
        guard !self.stopped.exchange(true, ordering: .relaxed) else { return }
        for (loop, box) in zip(self.loops, self.acceptors) {
            try? await Self.onLoop(loop) {
                guard let acceptor = box.take() else { return }
                acceptor.detached = true
                loop.deregister(self.fd)
            }
        }
        if self.fd >= 0 { Glibc.close(self.fd) }
    }

    /// Closes every open connection accepted here.
    func closeAll() async {
        for loop in self.loops {
            try? await Self.onLoop(loop) {
                loop.closeAll(of: self)
                loop.httpState?.closeAll(of: self)
            }
        }
    }

    /// HTTP (epoll engine): the request in flight of each connection is answered with `connection: close`,
    /// idle connections close. (An unbound listener may carry HTTP connections whatever its route's protocol
    /// was when it was made: the VIP listener reads the protocol per connection.)
    func quiesce() async {
        guard self.http || self.fd < 0 else { return }
        for loop in self.loops {
            try? await Self.onLoop(loop) { loop.httpState?.quiesce(of: self) }
        }
    }

    /// Runs `body` on `loop`'s thread and waits for it.
    private static func onLoop(_ loop: SpliceLoop, _ body: @escaping @Sendable () throws -> Void) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let queued = loop.execute { continuation.resume(with: Result { try body() }) }
            if !queued { continuation.resume(throwing: SpliceLoop.Failure("splice loop stopped", ESHUTDOWN)) }
        }
    }
}

/// A listening socket as seen by one splice loop.
final class SpliceAcceptor: SplicePollable, SpliceListeningSocket {
    /// Holds a loop's acceptor for the listener (set and taken on that loop's thread only).
    final class Box: @unchecked Sendable {
        private var acceptor: SpliceAcceptor?
        func set(_ acceptor: SpliceAcceptor) { self.acceptor = acceptor }
        func take() -> SpliceAcceptor? {
            defer { self.acceptor = nil }
            return self.acceptor
        }
    }

    let listener: SpliceListener
    unowned(unsafe) let loop: SpliceLoop
    var detached = false
    var fd: Int32 { self.listener.fd }
    private var lastWarning: UInt64 = 0

    init(listener: SpliceListener, loop: SpliceLoop) {
        self.listener = listener
        self.loop = loop
    }

    /// Accepts up to 16 connections per wake-up (level-triggered: more wake the loop again).
    override func ready(_ events: UInt32) {
        guard !self.detached else { return }
        let handle = self.listener.handle
        for _ in 0..<16 {
            guard
                let (fd, storage) = self.loop.accept(
                    on: self,
                    lastWarning: &self.lastWarning,
                    "splice: accept failed, pausing the listener for 100 ms",
                    metadata: ["listener": "\(handle.key)"]
                )
            else { return }
            guard SpliceSocket.admit(fd, to: handle, self.loop.configuration) else { continue }
            if self.listener.http {
                HTTPLoopClient(
                    state: self.loop.http,
                    listener: self.listener,
                    fd: fd,
                    clientIP: SpliceSocket.ip(of: storage)
                ).start()
                continue
            }
            SpliceConnection.splice(client: fd, address: storage, listener: self.listener, loop: self.loop)
        }
    }
}

extension SpliceConnection {
    /// Splices an accepted client socket to a backend of `listener`'s route, picked by the client's address when
    /// the route hashes it.
    static func splice(client fd: Int32, address: sockaddr_storage, listener: SpliceListener, loop: SpliceLoop) {
        var hash: UInt64 = 0
        if listener.handle.hashesRequests, let ip = SpliceSocket.ip(of: address) {
            hash = StableHash.hash(ip)
        }
        SpliceConnection(loop: loop, listener: listener, clientFD: fd, hash: hash).start()
    }
}

/// The socket calls the splice makes, with errors that say what failed.
enum SpliceSocket {
    /// What `accept` found on a listening socket.
    enum Accepted {
        case socket(Int32, sockaddr_storage)
        /// Nothing left to accept (EAGAIN).
        case drained
        /// The listener cannot accept now (out of descriptors or memory): the errno.
        case failed(Int32)
    }

    /// `accept4` (non-blocking, close-on-exec) past the errors that concern one connection only (EINTR,
    /// ECONNABORTED, EPROTO).
    static func accept(_ listener: Int32) -> Accepted {
        while true {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            let fd = withUnsafeMutablePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    mesh_accept4(listener, $0, &length, Int32(SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue))
                }
            }
            if fd >= 0 { return .socket(fd, storage) }
            let code = errno
            switch code {
            case EAGAIN, EWOULDBLOCK: return .drained
            case EINTR, ECONNABORTED, EPROTO: continue
            default: return .failed(code)
            }
        }
    }

    /// Takes an accepted socket for `handle`'s route: closes it (an overflow) when the route already has
    /// `maxConnectionsPerListener` connections, else sets TCP_NODELAY. True when taken.
    static func admit(_ fd: Int32, to handle: RouteHandle, _ configuration: DataPlaneConfiguration) -> Bool {
        guard handle.stats.activeConnections.load(ordering: .relaxed) < configuration.maxConnectionsPerListener else {
            handle.metrics.error(.overflow)
            Glibc.close(fd)
            return false
        }
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        return true
    }

    /// A non-blocking TCP socket of `address`'s family with `option` (level, name) set to 1.
    private static func stream(for address: SocketAddress, _ what: String, option: (Int32, Int32)) throws -> Int32 {
        let family: Int32
        switch address {
        case .v4: family = AF_INET
        case .v6: family = AF_INET6
        case .unixDomainSocket: throw SpliceLoop.Failure("\(what) a unix socket", EAFNOSUPPORT)
        }
        let fd = socket(family, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SpliceLoop.Failure("socket", errno) }
        var one: Int32 = 1
        _ = setsockopt(fd, option.0, option.1, &one, socklen_t(MemoryLayout<Int32>.size))
        return fd
    }

    static func listen(on address: SocketAddress, backlog: Int) throws -> Int32 {
        let fd = try Self.stream(for: address, "listen on", option: (SOL_SOCKET, SO_REUSEADDR))
        let rc = Self.withSockAddr(address) { Glibc.bind(fd, $0, $1) }
        guard rc == 0 else {
            let code = errno
            Glibc.close(fd)
            throw SpliceLoop.Failure("bind \(address)", code)
        }
        guard Glibc.listen(fd, Int32(clamping: backlog)) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw SpliceLoop.Failure("listen \(address)", code)
        }
        return fd
    }

    /// A non-blocking socket connecting to `address` (the connect is under way or done when it returns).
    static func connect(to address: SocketAddress) throws -> Int32 {
        let fd = try Self.stream(for: address, "connect to", option: (Int32(IPPROTO_TCP), TCP_NODELAY))
        let rc = Self.withSockAddr(address) { Glibc.connect(fd, $0, $1) }
        if rc != 0 {
            let code = errno
            guard code == EINPROGRESS || code == EINTR else {
                Glibc.close(fd)
                throw SpliceLoop.Failure("connect \(address)", code)
            }
        }
        return fd
    }

    static func withSockAddr<T>(
        _ address: SocketAddress,
        _ body: (UnsafePointer<sockaddr>, socklen_t) -> T
    ) -> T {
        switch address {
        case .v4(let a):
            var storage = a.address
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    body($0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        case .v6(let a):
            var storage = a.address
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    body($0, socklen_t(MemoryLayout<sockaddr_in6>.size))
                }
            }
        case .unixDomainSocket:
            preconditionFailure("unix sockets are refused before")
        }
    }

    /// The IP address of an accepted peer.
    static func ip(of storage: sockaddr_storage) -> IPAddress? {
        var storage = storage
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                    IPAddress.v4(UInt32(bigEndian: $0.pointee.sin_addr.s_addr))
                }
            }
        case AF_INET6:
            return withUnsafePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { pointer -> IPAddress? in
                    var address = pointer.pointee.sin6_addr
                    return withUnsafeBytes(of: &address) { IPAddress(bytes: Array($0)) }
                }
            }
        default:
            return nil
        }
    }
}
