import Logging
import MeshCore
import NIOCore
import NIOPosix

/// One bound VIP:port and the connections it accepted: TCP routes on the splice loops (`SpliceListener`), HTTP
/// routes on a NIO server channel, UDP routes on a NIO datagram channel.
final class Listener: Sendable {
    let handle: RouteHandle
    private let kind: Kind

    private enum Kind: Sendable {
        case channel(any Channel, ChannelSet)
        case splice(SpliceListener)
        /// Served by the data plane's one VIP listener (mesh-interface mode): no socket of its own.
        case redirected(RedirectedRoute)
    }

    private init(handle: RouteHandle, kind: Kind) {
        self.handle = handle
        self.kind = kind
    }

    /// A TCP or HTTP route served through `vipListener` (in its table from now on).
    static func redirected(handle: RouteHandle, vipListener: VIPListener) -> Listener {
        Listener(handle: handle, kind: .redirected(vipListener.add(handle)))
    }

    static func bind(
        handle: RouteHandle,
        environment: ProxyEnvironment,
        group: any EventLoopGroup
    ) async throws -> Listener {
        let key = handle.key
        let address = try SocketAddress(ipAddress: key.vip.description, port: key.port)
        let configuration = environment.configuration
        let epollHTTP = handle.proto == .http && configuration.http.engine == .epoll
        if handle.proto == .tcp || epollHTTP {
            let splice = try await SpliceListener.bind(
                handle: handle,
                address: address,
                backlog: configuration.backlog,
                loops: try await environment.splice.loops(on: group),
                group: group,
                upstreams: environment.upstreams,
                http: epollHTTP,
                traces: environment.traces
            )
            return Listener(handle: handle, kind: .splice(splice))
        }
        let connections = ChannelSet()
        // Sockets are created on an event-loop thread (not the caller's), so they live in the network
        // namespace of the event loops.
        let loop = group.next()
        if key.datagram {
            let channel = try await loop.flatSubmit {
                DatagramBootstrap(group: loop)
                    .channelOption(.socketOption(.so_reuseaddr), value: 1)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(
                                UDPProxyHandler(handle: handle, environment: environment)
                            )
                        }
                    }
                    .bind(to: address)
            }.get()
            return Listener(handle: handle, kind: .channel(channel, connections))
        }
        let channel = try await loop.flatSubmit {
            ServerBootstrap(group: loop, childGroup: group)
                .serverChannelOption(.backlog, value: Int32(configuration.backlog))
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .serverChannelOption(.maxMessagesPerRead, value: 16)
                .childChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .childChannelOption(
                    .writeBufferWaterMark,
                    value: .init(
                        low: configuration.writeBufferLowWaterMark,
                        high: configuration.writeBufferHighWaterMark
                    )
                )
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        guard
                            handle.stats.activeConnections.load(ordering: .relaxed)
                                < configuration.maxConnectionsPerListener
                        else {
                            handle.metrics.error(.overflow)
                            throw ProxyError.tooManyConnections
                        }
                        environment.counters.track(channel, upstream: false)
                        connections.insert(channel)
                        try HTTPProxy.initialize(channel: channel, handle: handle, environment: environment)
                    }
                }
                .bind(to: address)
        }.get()
        return Listener(handle: handle, kind: .channel(channel, connections))
    }

    /// Served through the data plane's one VIP listener (its VIP is in the redirect rules).
    var isRedirected: Bool {
        if case .redirected = self.kind { return true }
        return false
    }

    /// Connections open right now (client side).
    var openConnections: Int {
        switch self.kind {
        case .channel(_, let connections): return connections.count
        case .splice(let splice): return splice.openConnections
        case .redirected(let route): return route.openConnections
        }
    }

    /// Stops accepting (closes the bound socket) and asks the open connections to finish: HTTP connections
    /// answer the request in flight with `connection: close` and close (NIO's quiescing); TCP connections
    /// carry on until they end or `drainTimeout` passes.
    func stopAccepting() async {
        switch self.kind {
        case .channel(let channel, let connections):
            try? await channel.close()
            for channel in connections.all {
                channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
            }
        case .splice(let splice):
            await splice.stopAccepting()
            await splice.quiesce()
        case .redirected(let route):
            await route.stopAccepting()
        }
    }

    /// Closes every connection still open.
    func closeAll() async {
        switch self.kind {
        case .channel(_, let connections): connections.closeAll()
        case .splice(let splice): await splice.closeAll()
        case .redirected(let route): await route.closeAll()
        }
    }

    /// Stops accepting, and closes whatever is still open after `drain`, without waiting for it.
    func stop(drain: TimeAmount) async {
        await self.stopAccepting()
        guard self.openConnections > 0 else { return }
        Task {
            try? await Task.sleep(for: .nanoseconds(drain.nanoseconds))
            await self.closeAll()
        }
    }
}
