import Logging
import MeshCore
import NIOCore
import NIOPosix

/// One bound VIP:port (TCP for `tcp` and `http` routes, UDP for `udp`) and the connections it accepted.
final class Listener: Sendable {
    let handle: RouteHandle
    let channel: any Channel
    let connections: ChannelSet

    private init(handle: RouteHandle, channel: any Channel, connections: ChannelSet) {
        self.handle = handle
        self.channel = channel
        self.connections = connections
    }

    static func bind(
        handle: RouteHandle,
        environment: ProxyEnvironment,
        group: any EventLoopGroup
    ) async throws -> Listener {
        let key = handle.key
        let address = try SocketAddress(ipAddress: key.vip.description, port: key.port)
        let connections = ChannelSet()
        let configuration = environment.configuration
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
            return Listener(handle: handle, channel: channel, connections: connections)
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
                        switch handle.proto {
                        case .http:
                            try HTTPProxy.initialize(channel: channel, handle: handle, environment: environment)
                        case .tcp, .udp:
                            try TCPProxy.initialize(channel: channel, handle: handle, environment: environment)
                        }
                    }
                }
                .bind(to: address)
        }.get()
        return Listener(handle: handle, channel: channel, connections: connections)
    }

    /// Stops accepting (closes the bound socket) and asks the open connections to finish: HTTP connections
    /// answer the request in flight with `connection: close` and close (NIO's quiescing); TCP connections
    /// carry on until they end or `drainTimeout` passes.
    func stopAccepting() async {
        try? await self.channel.close()
        for channel in self.connections.all {
            channel.pipeline.fireUserInboundEventTriggered(ChannelShouldQuiesceEvent())
        }
    }

    /// Stops accepting, and closes whatever is still open after `drain`, without waiting for it.
    func stop(drain: TimeAmount) async {
        await self.stopAccepting()
        guard self.connections.count > 0 else { return }
        let connections = self.connections
        self.channel.eventLoop.scheduleTask(in: drain) { connections.closeAll() }
    }
}
