import NIOCore
import NIOHTTP1
import NIOPosix

/// Keep-alive upstream connections, one pool per event loop (a client connection only ever uses the pool of
/// its own loop, so nothing here is shared between threads and no lock is taken on the request path).
final class HTTPUpstreamPools: Sendable {
    private let pools: [ObjectIdentifier: NIOLoopBoundBox<LoopPool>]
    private let loops: [any EventLoop]

    init(group: any EventLoopGroup, configuration: DataPlaneConfiguration, counters: DataPlaneCounters) {
        var pools: [ObjectIdentifier: NIOLoopBoundBox<LoopPool>] = [:]
        var loops: [any EventLoop] = []
        for loop in group.makeIterator() {
            loops.append(loop)
            pools[ObjectIdentifier(loop)] = NIOLoopBoundBox.makeBoxSendingValue(
                LoopPool(configuration: configuration, counters: counters),
                eventLoop: loop
            )
        }
        self.pools = pools
        self.loops = loops
    }

    /// The pool of `loop`; call on that loop.
    func pool(for loop: any EventLoop) -> LoopPool? {
        self.pools[ObjectIdentifier(loop)]?.value
    }

    /// Closes every pooled connection and refuses to pool more (shutdown).
    func closeAll() {
        for loop in self.loops {
            guard let box = self.pools[ObjectIdentifier(loop)] else { continue }
            loop.execute { box.value.closeAll() }
        }
    }
}

/// One upstream HTTP/1.1 connection.
final class UpstreamConnection {
    let channel: any Channel
    let handler: UpstreamHTTPHandler
    let backend: BackendID
    /// The pool's sweep count when it went back into the pool (the sweep closes it after `upstreamIdleTimeout`).
    fileprivate var idleTick = 0
    fileprivate(set) var isIdle = false
    /// The pool's list for `backend`, remembered (no hashing of the backend per release).
    fileprivate var idleList: IdleList?

    init(channel: any Channel, handler: UpstreamHTTPHandler, backend: BackendID) {
        self.channel = channel
        self.handler = handler
        self.backend = backend
    }
}

/// The pool of one event loop: idle connections per backend (most recently used first) and a count of all
/// connections per backend, bounded by `maxConnectionsPerBackend`. Idle connections are closed after
/// `upstreamIdleTimeout` by one sweep timer per pool (ticking at a quarter of the timeout while anything is
/// idle), not by a timer per connection that every request would schedule and cancel. A release notes the
/// sweep's count rather than the time (no clock read per request): a connection is closed at the fifth sweep
/// after its release, when it has been idle for more than the timeout and at most a tick longer.
final class LoopPool {
    private let configuration: DataPlaneConfiguration
    private let counters: DataPlaneCounters
    /// Idle connections per backend, each list a class: taking and returning a connection is one look-up
    /// and no in-place dictionary mutation (whose generic accessor cost more than the look-up).
    private var idle: [BackendID: IdleList] = [:]
    /// The list last looked up: a request usually goes to the backend the one before went to, and comparing
    /// a backend costs far less than hashing it.
    private var recent: IdleList?
    private var total: [BackendID: Int] = [:]
    private var closed = false
    private var sweep: Scheduled<Void>?
    private var sweeps = 0

    init(configuration: DataPlaneConfiguration, counters: DataPlaneCounters) {
        self.configuration = configuration
        self.counters = counters
    }

    /// An idle, still open connection to `backend`, if any.
    func takeIdle(_ backend: BackendID) -> UpstreamConnection? {
        // Popped in place (no copy of the list); an emptied list stays, for the next release.
        guard let list = self.lookUp(backend) else { return nil }
        while let connection = list.connections.popLast() {
            connection.isIdle = false
            if connection.channel.isActive { return connection }
        }
        return nil
    }

    /// Whether one more connection to `backend` may be opened; if so, counts it.
    func reserve(_ backend: BackendID) -> Bool {
        guard !self.closed else { return false }
        let n = self.total[backend, default: 0]
        guard n < self.configuration.http.maxConnectionsPerBackend else { return false }
        self.total[backend] = n + 1
        return true
    }

    /// A reserved connection that did not come about (connect failed) or left the pool for good (closed,
    /// upgraded to a tunnel).
    func forget(_ backend: BackendID) {
        let n = self.total[backend, default: 0] - 1
        self.total[backend] = n > 0 ? n : nil
    }

    /// Opens a connection to `pick` (a socket, or a stream over the peer link: `Upstreams`), counted against
    /// its backend (the caller reserved it).
    func connect(
        to pick: Pick,
        service: ServiceKey,
        servicePort: Int,
        on loop: any EventLoop,
        upstreams: Upstreams
    ) -> EventLoopFuture<UpstreamConnection> {
        let handler = UpstreamHTTPHandler(decoder: HTTPDecodingHandler())
        handler.decoder.receiver = handler
        let bound = NIOLoopBound(handler, eventLoop: loop)
        let backend = pick.id
        return upstreams.connectStream(
            to: pick,
            service: service,
            servicePort: servicePort,
            on: loop,
            configuration: self.configuration
        ) { channel in
            channel.eventLoop.makeCompletedFuture {
                // The response decoder (`HTTPParser`) and the handler; requests go out as bytes (`HTTPWire`).
                let sync = channel.pipeline.syncOperations
                try sync.addHandler(bound.value.decoder)
                try sync.addHandler(bound.value)
            }
        }
        .assumeIsolated()
        .map { channel in
            self.counters.track(channel, upstream: true)
            let connection = UpstreamConnection(channel: channel, handler: handler, backend: backend)
            handler.connection = connection
            handler.pool = self
            return connection
        }
        .nonisolated()
    }

    /// Back into the pool after a complete exchange, or closed when the pool for it is full.
    func release(_ connection: UpstreamConnection) {
        connection.handler.owner = nil
        guard !self.closed, connection.channel.isActive else {
            connection.channel.close(promise: nil)
            return
        }
        let list: IdleList
        if let known = connection.idleList, known.inPool {
            list = known
        } else {
            list = self.idleList(for: connection.backend)
            connection.idleList = list
        }
        guard list.append(connection, max: self.maxIdle) else {
            connection.channel.close(promise: nil)
            return
        }
        connection.isIdle = true
        connection.idleTick = self.sweeps
        if self.sweep == nil { self.armSweep(on: connection.channel.eventLoop) }
    }

    private var maxIdle: Int { self.configuration.http.maxIdleConnectionsPerBackend }

    private func lookUp(_ backend: BackendID) -> IdleList? {
        if let recent = self.recent, recent.backend == backend { return recent }
        guard let list = self.idle[backend] else { return nil }
        self.recent = list
        return list
    }

    private func idleList(for backend: BackendID) -> IdleList {
        if let list = self.lookUp(backend) { return list }
        let list = IdleList(backend: backend)
        self.idle[backend] = list
        self.recent = list
        return list
    }

    private func armSweep(on loop: any EventLoop) {
        let timeout = self.configuration.http.upstreamIdleTimeout.nanoseconds
        let tick = TimeAmount.nanoseconds(max(timeout / 4, TimeAmount.milliseconds(1).nanoseconds))
        self.sweep = loop.assumeIsolated().scheduleTask(in: tick) {
            self.sweep = nil
            self.sweepIdle(on: loop)
        }
    }

    /// Closes the connections idle for longer than `upstreamIdleTimeout` (five ticks of a quarter of it since
    /// their release); re-arms while any stay idle.
    private func sweepIdle(on loop: any EventLoop) {
        guard !self.closed else { return }
        self.sweeps += 1
        var stillIdle = false
        for (_, list) in self.idle {
            for connection in list.connections {
                if self.sweeps - connection.idleTick >= 5 {
                    connection.channel.close(promise: nil)
                } else {
                    stillIdle = true
                }
            }
        }
        if stillIdle { self.armSweep(on: loop) }
    }

    /// A connection closed: out of the idle list and the count.
    func closed(_ connection: UpstreamConnection) {
        if connection.isIdle, let list = self.lookUp(connection.backend) {
            list.connections.removeAll { $0 === connection }
            if list.connections.isEmpty {
                list.inPool = false
                self.idle[connection.backend] = nil
                if self.recent === list { self.recent = nil }
            }
        }
        connection.isIdle = false
        self.forget(connection.backend)
    }

    /// A connection taken out of HTTP use for good (upgraded to a tunnel): no longer counted here.
    func detach(_ connection: UpstreamConnection) {
        connection.handler.pool = nil
        self.forget(connection.backend)
    }

    func closeAll() {
        self.closed = true
        self.sweep?.cancel()
        self.sweep = nil
        let all = self.idle.values.flatMap { $0.connections }
        for list in self.idle.values { list.inPool = false }
        self.idle = [:]
        self.recent = nil
        for connection in all { connection.channel.close(promise: nil) }
    }
}

/// The idle connections of one backend in a pool, most recently used last.
private final class IdleList {
    let backend: BackendID
    var connections: [UpstreamConnection] = []
    /// Still the pool's list for `backend` (an emptied list leaves the pool when a connection closes).
    var inPool = true

    init(backend: BackendID) {
        self.backend = backend
    }

    /// Appends when the list has room.
    func append(_ connection: UpstreamConnection, max: Int) -> Bool {
        // (One access to the property for the check and the append: each is checked for exclusivity.)
        Self.append(connection, to: &self.connections, max: max)
    }

    private static func append(
        _ connection: UpstreamConnection,
        to connections: inout [UpstreamConnection],
        max: Int
    ) -> Bool {
        guard connections.count < max else { return false }
        connections.append(connection)
        return true
    }
}
