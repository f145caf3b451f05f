import Logging
import MeshCore
import MeshNIO
import Metrics
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// Where and how an HTTP server listens; every field has a default.
public struct HTTPServerConfiguration: Sendable {
    public var host: String = "127.0.0.1"
    /// 0 picks a free port (see `HTTPServer.localAddress`).
    public var port: Int = 0
    /// Largest request body accepted; larger ones get 413.
    public var maxBodyBytes: Int = 3 * 1024 * 1024
    /// Largest request head (all header lines); larger ones get 431.
    public var maxHeaderBytes: Int = 64 * 1024
    /// How long a started request may pause before it gets 408.
    public var requestTimeout: TimeAmount = .seconds(30)
    /// How long a connection may sit with no request before it is closed.
    public var idleTimeout: TimeAmount = .seconds(120)
    /// Connections held at once. At the limit a new connection takes the slot of the oldest one
    /// that has not finished its TLS handshake (plain HTTP: sent nothing yet), else of the oldest
    /// TLS connection without a client certificate; when all hold certificates it gets 503.
    public var maxConnections: Int = 8192
    /// Connections the kernel queues before they are accepted (listen's backlog; the kernel caps it at
    /// net.core.somaxconn). A control plane's agents all reconnect at once when a replica restarts: with a
    /// short queue the kernel drops their SYNs, and each waits a retransmission (1 s, then 3 s) per drop.
    public var backlog: Int = 4096
    /// How long a new connection has to finish its TLS handshake before it is closed (HTTPS only).
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// Connections' large buffers (NIOSSL's 32 + 16 KiB per TLS connection) on pages of their own,
    /// so an idle connection keeps only what it touched resident (`LeanAllocator`).
    public var leanBuffers = true
    /// With `leanBuffers`: how long a TLS connection must be quiet (no read, no write, nothing queued
    /// to write) before the pages of its TLS buffers are given back (`ConnectionBuffers`); nil: never.
    public var releaseIdleBuffersAfter: TimeAmount? = .seconds(10)
    /// How long in-flight requests may finish after shutdown begins.
    public var drainTimeout: TimeAmount = .seconds(5)
    /// How the server's own errors (400, 408, 413, 431, 503) are written.
    public var renderError: ErrorRenderer = { status, message in
        ("text/plain; charset=utf-8", ByteBuffer(string: "\(status.code) \(status.reasonPhrase): \(message)\n"))
    }

    /// Serve HTTPS with this context (nil: plain HTTP).
    public var tls: HTTPServerTLS?

    public init() {}
}

/// HTTPS: the TLS context, and how a verified client certificate becomes the identity requests carry.
public struct HTTPServerTLS: Sendable {
    public var context: NIOSSLContext
    /// The client's identity from its (already verified) certificate; nil: anonymous.
    public var identify: @Sendable (NIOSSLCertificate) -> String?

    public init(context: NIOSSLContext, identify: @escaping @Sendable (NIOSSLCertificate) -> String?) {
        self.context = context
        self.identify = identify
    }
}

/// An HTTP/1.1 server over SwiftNIO: keep-alive, pipelining, limits, streaming responses, and
/// structured shutdown as a swift-service-lifecycle `Service`.
public final class HTTPServer: ServiceLifecycle.Service, Sendable {
    public let configuration: HTTPServerConfiguration
    let responder: any HTTPResponder
    let logger: Logger
    let group: any EventLoopGroup
    private let slots: ConnectionSlots
    private let releases = ReleaseCounter()
    private let sealed = ReleaseCounter()
    private let listening = AsyncOnce<SocketAddress>()
    private let jobs = ServerJobs()

    public init(
        configuration: HTTPServerConfiguration,
        responder: any HTTPResponder,
        logger: Logger,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) {
        self.configuration = configuration
        self.responder = responder
        self.logger = logger
        self.group = group
        self.slots = ConnectionSlots(
            limit: configuration.maxConnections,
            evictAnonymous: configuration.tls != nil,
            logger: logger
        )
    }

    /// The address the server listens on, once `run()` has bound it; throws if binding failed.
    public func localAddress() async throws -> SocketAddress {
        try await self.listening.value()
    }

    /// Open connections right now.
    public var connectionCount: Int { self.slots.count }

    /// Times an idle TLS connection gave the pages of its buffers back (`releaseIdleBuffersAfter`).
    public var idleBufferReleases: Int { self.releases.value }

    /// TLS connections whose records the mesh record layer seals since their handshake (`HTTPRecords`).
    public var sealedConnections: Int { self.sealed.value }

    /// Connections closed to make room for new ones (see `maxConnections`).
    public var evictedConnections: Int { self.slots.evictions }

    /// Requests being answered: each has a task while its responder works or its `.stream` body is written.
    /// Idle connections and `.push` bodies hold none.
    public var requestsInFlight: Int { self.jobs.count }

    public func run() async throws {
        let config = self.configuration
        let server: any Channel
        let slots = self.slots
        let logger = self.logger
        let releases = self.releases
        let sealedCount = self.sealed
        let jobs = self.jobs
        let limits = {
            var limits = NIOHTTPDecoderLimitConfiguration()
            limits.maxHeaderListSize = config.maxHeaderBytes
            limits.maxHeaderFieldSize = config.maxHeaderBytes
            return limits
        }()
        let shared = HTTPConnectionHandler.Shared(
            responder: self.responder,
            maxBodyBytes: config.maxBodyBytes,
            decoderLimits: limits,
            tls: config.tls != nil,
            renderError: config.renderError,
            slots: slots,
            jobs: jobs,
            wakeups: PushWakeups(),
            logger: logger
        )
        // On /metrics: how many connections the record layer took over (against all accepted: TLS records).
        let sealedMetric = Counter(label: "mesh_http_record_layer_connections_total")
        let onSealed: @Sendable () -> Void = {
            sealedCount.add()
            sealedMetric.increment()
        }
        do {
            server = try await ServerBootstrap(group: self.group)
                .serverChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(AcceptBackoff(slots: slots, logger: logger))
                    }
                }
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .serverChannelOption(.backlog, value: Int32(clamping: config.backlog))
                .serverChannelOption(.maxMessagesPerRead, value: 16)
                .childChannelOption(.allowRemoteHalfClosure, value: true)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                // A connection keeps its receive buffer at the size it last had (2 KiB with NIO's default
                // start): an idle agent's sends fit in 512 bytes; an upload grows it (doubling per full read).
                .childChannelOption(
                    .recvAllocator,
                    value: AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 512, maximum: 65536)
                )
                .childChannelOption(
                    .allocator,
                    value: config.leanBuffers ? LeanAllocator.allocator : ByteBufferAllocator()
                )
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        // A slot first (closing the oldest unfinished handshake at the limit); a
                        // connection without one is answered 503 after its first request.
                        _ = slots.admit(channel)
                        if let tls = config.tls {
                            let ops = channel.pipeline.syncOperations
                            if config.leanBuffers, let after = config.releaseIdleBuffersAfter {
                                // NIOSSL's buffers (mapped by LeanAllocator) are tracked, and their
                                // pages given back while the connection is idle (until the record layer
                                // takes over from NIOSSL, if it does).
                                let buffers = ConnectionBuffers()
                                let handler = buffers.tracking { NIOSSLServerHandler(context: tls.context) }
                                try HTTPRecordSwitch.addHandlers(
                                    handler,
                                    role: .server(identify: tls.identify),
                                    to: ops,
                                    onSealed: onSealed
                                ) {
                                    try ops.addHandler(IdleBuffers(buffers: buffers, after: after, counter: releases))
                                }
                            } else {
                                try HTTPRecordSwitch.addHandlers(
                                    NIOSSLServerHandler(context: tls.context),
                                    role: .server(identify: tls.identify),
                                    to: ops,
                                    onSealed: onSealed
                                )
                            }
                        }
                        try channel.pipeline.syncOperations.addHandler(
                            HandshakeWatch(
                                slots: slots,
                                deadline: config.tls == nil ? nil : config.handshakeTimeout,
                                tls: config.tls != nil
                            )
                        )
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(
                            withPipeliningAssistance: true,
                            withErrorHandling: false,
                            withEncoderConfiguration: .init(),
                            withDecoderLimitConfiguration: limits
                        )
                        let guardHandler = ProtocolGuard(
                            eventLoop: channel.eventLoop,
                            requestTimeout: config.requestTimeout,
                            idleTimeout: config.idleTimeout,
                            render: config.renderError
                        )
                        try channel.pipeline.syncOperations.addHandler(guardHandler)
                        // No task per connection: the handler answers each request in a task of the
                        // server's group, and an idle connection (or a pushed stream) holds none.
                        try channel.pipeline.syncOperations.addHandler(
                            HTTPConnectionHandler(shared: shared, inputClosed: guardHandler.inputClosed.futureResult)
                        )
                    }
                }
                .bind(host: config.host, port: config.port).get()
        } catch {
            self.listening.fail(error)
            self.logger.error("cannot listen on \(config.host):\(config.port): \(error)")
            throw error
        }
        let address = server.localAddress
        if let address {
            self.listening.set(address)
        } else {
            self.listening.fail(ChannelError.inappropriateOperationForState)
        }
        self.logger.info("listening on \(config.tls == nil ? "http" : "https")://\(address.map(hostPort) ?? "?")")

        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                group.addTask { await self.drain(after: server, jobs: jobs) }
                for await job in jobs.jobs {
                    group.addTask(operation: job)
                }
                // The jobs ended: every connection is closed, or the server's task was cancelled.
                server.close(promise: nil)
                for channel in self.slots.drain() { channel.close(promise: nil) }
            }
        } onGracefulShutdown: {
            self.logger.info("shutting down: no new connections")
            server.close(promise: nil)
            // Idle connections and streams close now; requests being answered finish first.
            for channel in self.slots.drain() {
                channel.eventLoop.execute { channel.pipeline.fireUserInboundEventTriggered(ShutdownEvent()) }
            }
        }
    }

    /// Once the listener has closed: gives in-flight requests the drain time, closes the connections left,
    /// and ends the server's jobs once every connection has closed.
    private func drain(after server: any Channel, jobs: ServerJobs) async {
        try? await server.closeFuture.get()
        let open = self.slots.drain()
        if !open.isEmpty {
            let closed = EventLoopFuture.andAllComplete(open.map(\.closeFuture), on: server.eventLoop)
            let drainTime = self.configuration.drainTimeout
            await withTaskGroup(of: Void.self) { race in
                race.addTask { try? await closed.get() }
                race.addTask { try? await Task.sleep(for: .nanoseconds(drainTime.nanoseconds)) }
                await race.next()
                race.cancelAll()
                for channel in self.slots.drain() { channel.close(promise: nil) }
            }
        }
        // Connections accepted while the listener closed: they were refused; close them too.
        let late = self.slots.drain()
        for channel in late { channel.close(promise: nil) }
        try? await EventLoopFuture.andAllComplete(late.map(\.closeFuture), on: server.eventLoop).get()
        jobs.finish()
    }
}

/// Sent down a connection's pipeline when the server begins to shut down.
public struct ShutdownEvent: Sendable {}
