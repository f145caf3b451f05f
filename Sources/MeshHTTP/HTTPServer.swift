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

    public func run() async throws {
        let config = self.configuration
        let server: NIOAsyncChannel<NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, Never>
        let slots = self.slots
        let logger = self.logger
        let accepted = AcceptedConnections()
        let releases = self.releases
        let sealedCount = self.sealed
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
                .bind(host: config.host, port: config.port) { channel in
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
                        var limits = NIOHTTPDecoderLimitConfiguration()
                        limits.maxHeaderListSize = config.maxHeaderBytes
                        limits.maxHeaderFieldSize = config.maxHeaderBytes
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
                        let connection = try NIOAsyncChannel(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(
                                inboundType: HTTPServerRequestPart.self,
                                outboundType: HTTPServerResponsePart.self
                            )
                        )
                        accepted.hold(connection)
                        return connection
                    }
                }
        } catch {
            self.listening.fail(error)
            self.logger.error("cannot listen on \(config.host):\(config.port): \(error)")
            throw error
        }
        let address = server.channel.localAddress
        if let address {
            self.listening.set(address)
        } else {
            self.listening.fail(ChannelError.inappropriateOperationForState)
        }
        self.logger.info("listening on \(config.tls == nil ? "http" : "https")://\(address.map(hostPort) ?? "?")")

        try await withGracefulShutdownHandler {
            try await withThrowingDiscardingTaskGroup { group in
                try await server.executeThenClose { inbound in
                    for try await connection in inbound {
                        accepted.delivered(connection)
                        group.addTask { await self.serve(connection) }
                    }
                }
                // Connections accepted while the listener closed never reached the loop: close them
                // properly (a dropped one would trap on its unfinished writer).
                for connection in accepted.close() {
                    group.addTask { try? await connection.executeThenClose { _, _ in } }
                }
                // The listener is closed: give in-flight requests the drain time, then close the rest.
                let open = self.slots.drain()
                if !open.isEmpty {
                    try? await Task.sleep(for: .nanoseconds(config.drainTimeout.nanoseconds))
                    for channel in self.slots.open {
                        channel.close(promise: nil)
                    }
                }
            }
        } onGracefulShutdown: {
            self.logger.info("shutting down: no new connections")
            server.channel.close(promise: nil)
            // Idle connections and streams close now; requests being answered finish first.
            for channel in self.slots.drain() {
                channel.eventLoop.execute { channel.pipeline.fireUserInboundEventTriggered(ShutdownEvent()) }
            }
        }
    }

    private func serve(_ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>) async {
        let channel = connection.channel
        let admitted = self.slots.contains(channel)
        let draining = self.slots.isDraining
        let inputClosed: EventLoopFuture<Void>
        do {
            inputClosed = try await channel.pipeline.handler(type: ProtocolGuard.self).map {
                $0.inputClosed.futureResult
            }
            .get()
        } catch {
            return
        }
        do {
            try await connection.executeThenClose { inbound, outbound in
                var parts = inbound.makeAsyncIterator()
                if !admitted || draining {
                    // Answer the first request (HTTP has no way to answer before one), then close.
                    if case .head = try await parts.next() {
                        try await self.writeError(
                            outbound,
                            .serviceUnavailable,
                            "the server is at its connection limit or shutting down"
                        )
                    }
                    return
                }
                var peer: TLSPeer?
                while let part = try await parts.next() {
                    guard case .head(let head) = part else { continue }
                    // A request arrives after the handshake: the client's certificate is known by now.
                    if peer == nil { peer = try await self.peerIdentity(channel) }
                    guard
                        let (bodyBytes, keepAlive) = try await self.handle(
                            head,
                            &parts,
                            outbound,
                            peer: peer,
                            inputClosed: inputClosed,
                            channel: channel
                        )
                    else { return }
                    // The body and the response are released by now: give large ones back to the system.
                    if bodyBytes >= ProcessResources.largeBody { ProcessResources.releaseFreeMemory() }
                    if !keepAlive { return }
                }
            }
        } catch {
            self.logger.debug("connection \(channel.remoteAddress.map(hostPort) ?? "?") ended: \(error)")
        }
    }

    /// Reads one request and answers it: the size of its body and whether the connection stays open
    /// (nil: the connection is done).
    private func handle(
        _ head: HTTPRequestHead,
        _ parts: inout NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator,
        _ outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        peer: TLSPeer?,
        inputClosed: EventLoopFuture<Void>,
        channel: any Channel
    ) async throws -> (Int, Bool)? {
        guard var request = try await self.collect(head, &parts, outbound, remote: channel.remoteAddress) else {
            return nil
        }
        request.peerIdentity = peer?.identity
        request.peerCertificateSerial = peer?.serial
        let size = request.body.readableBytes
        // In a child task: the responder's frames (routing, decoding, the store) get stack slabs of
        // their own, freed when it returns. Run in the connection's task they would stay allocated
        // for the connection's life (a task keeps the slabs of its deepest call), which for an idle
        // agent's connection was most of its memory.
        let responder = self.responder
        let complete = request
        let response = await withTaskGroup(of: HTTPResponse.self) { group in
            group.addTask { await responder.respond(to: complete) }
            return await group.next()!
        }
        let keepAlive = head.isKeepAlive && !self.slots.isDraining
        try await self.write(
            response,
            to: outbound,
            version: head.version,
            keepAlive: keepAlive,
            inputClosed: inputClosed,
            channel: channel
        )
        return (size, keepAlive)
    }

    /// The identity of the client's verified certificate, and its serial (nil: plain HTTP or none), as the
    /// handshake left them (NIOSSL may have left the connection since: the mesh record layer).
    private func peerIdentity(_ channel: any Channel) async throws -> TLSPeer {
        guard self.configuration.tls != nil else { return TLSPeer(identity: nil, serial: nil) }
        return try await channel.eventLoop.submit {
            try channel.pipeline.syncOperations.handler(type: HTTPRecordSwitch.self).peer
                ?? TLSPeer(identity: nil, serial: nil)
        }.get()
    }

    /// Reads the body of the request that `head` starts, up to the limit. Nil: the connection is done.
    private func collect(
        _ head: HTTPRequestHead,
        _ parts: inout NIOAsyncChannelInboundStream<HTTPServerRequestPart>.AsyncIterator,
        _ outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        remote: SocketAddress?
    ) async throws -> HTTPRequest? {
        let limit = self.configuration.maxBodyBytes
        if let length = head.headers.first(name: "content-length").flatMap({ Int($0) }), length > limit {
            try await self.writeError(
                outbound,
                .payloadTooLarge,
                "request body of \(length) bytes is over the limit of \(limit)"
            )
            return nil
        }
        var body = ByteBuffer()
        // One allocation of the announced size, not a doubling series up to the limit.
        if let length = head.headers.first(name: "content-length").flatMap({ Int($0) }), length > 0 {
            body.reserveCapacity(length)
        }
        while let part = try await parts.next() {
            switch part {
            case .body(var chunk):
                guard body.readableBytes + chunk.readableBytes <= limit else {
                    try await self.writeError(
                        outbound,
                        .payloadTooLarge,
                        "request body is over the limit of \(limit) bytes"
                    )
                    return nil
                }
                body.writeBuffer(&chunk)
            case .end:
                return HTTPRequest(
                    method: head.method,
                    uri: head.uri,
                    headers: head.headers,
                    body: body,
                    remoteAddress: remote
                )
            case .head:
                return nil
            }
        }
        return nil
    }

    private func write(
        _ response: HTTPResponse,
        to outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        version: HTTPVersion,
        keepAlive: Bool,
        inputClosed: EventLoopFuture<Void>,
        channel: any Channel
    ) async throws {
        var head = HTTPResponseHead(version: version, status: response.status, headers: response.headers)
        if !keepAlive { head.headers.replaceOrAdd(name: "Connection", value: "close") }
        switch response.body {
        case .bytes(let bytes):
            head.headers.replaceOrAdd(name: "Content-Length", value: "\(bytes.readableBytes)")
            try await outbound.write(contentsOf: [.head(head), .body(.byteBuffer(bytes)), .end(nil)])
        case .stream(let produce):
            head.headers.remove(name: "Content-Length")
            try await outbound.write(.head(head))
            let writer = HTTPBodyWriter(clientClosed: inputClosed) { chunk in
                try await outbound.write(.body(.byteBuffer(chunk)))
            }
            try await produce(writer)
            try await outbound.write(.end(nil))
        }
    }

    private func writeError(
        _ outbound: NIOAsyncChannelOutboundWriter<HTTPServerResponsePart>,
        _ status: HTTPResponseStatus,
        _ message: String
    ) async throws {
        let (contentType, body) = self.configuration.renderError(status, message)
        let head = HTTPResponseHead(
            version: .http1_1,
            status: status,
            headers: [
                "Content-Type": contentType, "Content-Length": "\(body.readableBytes)", "Connection": "close",
            ]
        )
        try await outbound.write(contentsOf: [.head(head), .body(.byteBuffer(body)), .end(nil)])
    }
}

/// Sent down a connection's pipeline when the server begins to shut down.
public struct ShutdownEvent: Sendable {}

/// The connections the listener accepted that its accept loop has not taken yet. A connection accepted
/// while the listener closes is never delivered to the loop, and NIO traps when such a connection's
/// writer is dropped unfinished: this holds each until the loop takes it, and hands the rest to be
/// closed once the loop has ended (later ones are closed at once).
final class AcceptedConnections: Sendable {
    typealias Connection = NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>
    private let state = Mutex<(held: [ObjectIdentifier: Connection], closed: Bool)>(([:], false))

    func hold(_ connection: Connection) {
        let late = self.state.withLock { s -> Bool in
            if s.closed { return true }
            s.held[ObjectIdentifier(connection.channel)] = connection
            return false
        }
        if late { Task { try? await connection.executeThenClose { _, _ in } } }
    }

    func delivered(_ connection: Connection) {
        _ = self.state.withLock { $0.held.removeValue(forKey: ObjectIdentifier(connection.channel)) }
    }

    /// Stops holding: returns the connections never delivered.
    func close() -> [Connection] {
        self.state.withLock { s in
            s.closed = true
            defer { s.held = [:] }
            return Array(s.held.values)
        }
    }
}
