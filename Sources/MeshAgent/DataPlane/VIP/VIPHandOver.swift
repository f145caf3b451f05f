import MeshCore
import NIOCore
import NIOPosix

/// Where the VIP listener hands an accepted connection of an HTTP route to the HTTP proxy: one function, the
/// seam an HTTP engine plugs into. On the epoll engine the socket stays on the splice loop that accepted it
/// and becomes an `HTTPLoopClient` counted by the route's unbound splice listener, as a per-service epoll
/// listener's connections do. On NIO it becomes a NIO channel on `eventLoop` (the event loop the accepting
/// splice loop was started from) with the options and handlers a per-service HTTP listener gives its child
/// channels.
enum VIPHandOver {
    /// Serves the accepted, non-blocking client socket `fd` (ownership passes here) of peer `clientIP` as a
    /// connection of `route`'s HTTP route. Called on `loop`'s thread.
    static func serveHTTP(
        socket fd: Int32,
        route: RedirectedRoute,
        clientIP: IPAddress?,
        loop: SpliceLoop,
        on eventLoop: any EventLoop,
        environment: ProxyEnvironment
    ) {
        let configuration = environment.configuration
        if configuration.http.engine == .epoll {
            HTTPLoopClient(state: loop.http, listener: route.splice, fd: fd, clientIP: clientIP).start()
            return
        }
        let handle = route.handle
        let connections = route.connections
        ClientBootstrap(group: eventLoop)
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelOption(.tcpOption(.tcp_nodelay), value: 1)
            .channelOption(.allowRemoteHalfClosure, value: true)
            .channelOption(
                .writeBufferWaterMark,
                value: .init(low: configuration.writeBufferLowWaterMark, high: configuration.writeBufferHighWaterMark)
            )
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    environment.counters.track(channel, upstream: false)
                    connections.insert(channel)
                    try HTTPProxy.initialize(channel: channel, handle: handle, environment: environment)
                }
            }
            .withConnectedSocket(fd)
            .whenFailure { error in
                environment.logger.debug(
                    "VIP listener: HTTP hand-over failed",
                    metadata: ["listener": "\(handle.key)", "error": "\(error)"]
                )
            }
    }
}
