import Logging
import MeshCore
import MeshNIO
import Metrics
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// Where and how the STUN server listens. Every field has a default.
public struct STUNServerConfiguration: Sendable {
    /// Addresses to serve; each gets a UDP socket and (with ``tcp``) a TCP listener on the same port.
    /// Port 0 picks a free port (the same for UDP and TCP).
    public var listen: [ListenAddress]
    /// Also serve STUN over TCP (RFC 8489 §6.2.2: messages back to back, framed by their length field).
    public var tcp: Bool
    /// What answers say about the server (SOFTWARE).
    public var policy: STUNResponderPolicy
    /// Datagrams read per system call (recvmmsg).
    public var udpReadBatch: Int
    /// A TCP connection that sends nothing for this long is closed.
    public var tcpIdleTimeout: TimeAmount
    /// Open TCP connections at most; further ones are closed at once.
    public var maxTCPConnections: Int
    /// Largest message accepted over TCP; a longer one closes the connection.
    public var maxTCPMessageSize: Int

    public init(
        listen: [ListenAddress] = [ListenAddress(host: "127.0.0.1", port: 3478)],
        tcp: Bool = true,
        policy: STUNResponderPolicy = STUNResponderPolicy(),
        udpReadBatch: Int = 16,
        tcpIdleTimeout: TimeAmount = .seconds(30),
        maxTCPConnections: Int = 1024,
        maxTCPMessageSize: Int = 2048
    ) {
        self.listen = listen
        self.tcp = tcp
        self.policy = policy
        self.udpReadBatch = udpReadBatch
        self.tcpIdleTimeout = tcpIdleTimeout
        self.maxTCPConnections = maxTCPConnections
        self.maxTCPMessageSize = maxTCPMessageSize
    }
}

/// The sockets one listen address got.
public struct STUNListener: Sendable {
    public var udp: SocketAddress
    /// nil when TCP is off.
    public var tcp: SocketAddress?
}

/// A STUN Binding server (RFC 8489, RFC 5389, RFC 3489 clients) as a swift-service-lifecycle
/// `Service`: answers each Binding request over UDP or TCP with the address it came from
/// (XOR-MAPPED-ADDRESS; MAPPED-ADDRESS for RFC 3489), drops and counts everything else.
///
/// ```swift
/// let stun = STUNServer(configuration: .init(listen: [ListenAddress(host: "0.0.0.0", port: 3478)]))
/// try await ServiceGroup(services: [stun], gracefulShutdownSignals: [.sigterm], logger: logger).run()
/// ```
public final class STUNServer: ServiceLifecycle.Service, Sendable {
    public let configuration: STUNServerConfiguration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let metrics: STUNMetrics
    private let bound = AsyncOnce<[STUNListener]>()
    private let listening = Mutex(false)

    public init(
        configuration: STUNServerConfiguration = STUNServerConfiguration(),
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "mesh.stun"),
        metricsFactory: (any MetricsFactory)? = nil
    ) {
        self.configuration = configuration
        self.group = eventLoopGroup
        self.logger = logger
        self.metrics = STUNMetrics(factory: metricsFactory ?? MetricsSystem.factory)
    }

    /// The sockets, in the order of ``STUNServerConfiguration/listen``, once ``run()`` has bound
    /// them (waits until then; throws if binding failed).
    public func listeners() async throws -> [STUNListener] { try await self.bound.value() }

    /// Whether every socket is bound and serving (false before and after).
    public var isListening: Bool { self.listening.withLock { $0 } }

    public func run() async throws {
        let connections = ConnectionRegistry(limit: self.configuration.maxTCPConnections)
        var channels: [any Channel] = []
        var listeners: [STUNListener] = []
        do {
            guard !self.configuration.listen.isEmpty else {
                throw ManifestError("stunListen: give at least one address")
            }
            for address in self.configuration.listen {
                let (udp, tcp) = try await self.bind(address, connections: connections)
                channels.append(udp)
                if let tcp { channels.append(tcp) }
                listeners.append(STUNListener(udp: udp.localAddress!, tcp: tcp?.localAddress))
            }
        } catch {
            for c in channels { try? await c.close() }
            self.bound.fail(error)
            throw error
        }
        for l in listeners {
            self.logger.info(
                "stun: listening",
                metadata: ["udp": "\(l.udp)", "tcp": "\(l.tcp.map { "\($0)" } ?? "off")"]
            )
        }
        // Listening before the listeners are announced: whoever waited for them sees `isListening` true.
        self.listening.withLock { $0 = true }
        self.bound.set(listeners)
        let open = channels

        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                for c in open { try? await c.closeFuture.get() }
            } onCancel: {
                for c in open { c.close(promise: nil) }
            }
        } onGracefulShutdown: {
            for c in open { c.close(promise: nil) }
        }
        self.listening.withLock { $0 = false }
        for c in open { c.close(promise: nil) }
        await connections.closeAll()
        self.logger.info("stun: stopped")
    }

    private func bind(
        _ address: ListenAddress,
        connections: ConnectionRegistry
    ) async throws -> (any Channel, (any Channel)?) {
        let config = self.configuration
        let batch = max(1, config.udpReadBatch)
        let metrics = self.metrics
        let logger = self.logger
        @Sendable func udp(_ port: Int) async throws -> any Channel {
            try await DatagramBootstrap(group: self.group)
                .channelOption(.datagramVectorReadMessageCount, value: batch)
                .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: batch * 2048))
                .channelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHandler(
                            STUNUDPHandler(policy: config.policy, metrics: metrics, logger: logger)
                        )
                    }
                }
                .bind(host: address.host, port: port)
                .get()
        }
        guard config.tcp else { return (try await udp(address.port), nil) }
        let bound = try await bindUDPAndTCP(
            port: address.port,
            udp: udp,
            tcp: { port in
                try await ServerBootstrap(group: self.group)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(.backlog, value: 256)
                    .childChannelInitializer { ch in
                        guard connections.admit(ch) else {
                            metrics.tcpRejected.increment()
                            return ch.close()
                        }
                        metrics.tcpConnections.increment()
                        return ch.eventLoop.makeCompletedFuture {
                            let ops = ch.pipeline.syncOperations
                            try ops.addHandler(IdleStateHandler(readTimeout: config.tcpIdleTimeout))
                            try ops.addHandler(
                                ByteToMessageHandler(STUNFrameDecoder(maxMessageSize: config.maxTCPMessageSize))
                            )
                            try ops.addHandler(STUNTCPHandler(policy: config.policy, metrics: metrics))
                        }
                    }
                    .bind(host: address.host, port: port)
                    .get()
            }
        )
        return (bound.udp, bound.tcp)
    }
}

extension STUNAddress {
    /// The address of a socket; an IPv4-mapped IPv6 address (a dual-stack socket's IPv4 peer)
    /// becomes the IPv4 address, which is what the client knows itself by. Nil for Unix sockets.
    public init?(_ socketAddress: SocketAddress) {
        guard let port = socketAddress.port else { return nil }
        let ip: IPAddress?
        switch socketAddress {
        case .v4(let a): ip = withUnsafeBytes(of: a.address.sin_addr) { IPAddress(bytes: $0) }
        case .v6(let a): ip = withUnsafeBytes(of: a.address.sin6_addr) { IPAddress(bytes: $0) }
        case .unixDomainSocket: ip = nil
        }
        guard var ip else { return nil }
        if case .v6(let hi, let lo) = ip, hi == 0, lo >> 32 == 0xFFFF {
            ip = .v4(UInt32(truncatingIfNeeded: lo))
        }
        self.init(ip: ip, port: UInt16(port))
    }

    /// The socket's address unless it is a wildcard (0.0.0.0, ::), which says nothing about
    /// where an answer leaves from.
    static func specific(_ socketAddress: SocketAddress?) -> STUNAddress? {
        guard let socketAddress, let a = STUNAddress(socketAddress) else { return nil }
        switch a.ip {
        case .v4(0), .v6(0, 0): return nil
        default: return a
        }
    }
}

/// Answers Binding requests in datagrams, on the event loop.
final class STUNUDPHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>

    private let policy: STUNResponderPolicy
    private let metrics: STUNMetrics
    private let logger: Logger
    private var local: STUNAddress?
    private var needsFlush = false

    init(policy: STUNResponderPolicy, metrics: STUNMetrics, logger: Logger) {
        self.policy = policy
        self.metrics = metrics
        self.logger = logger
    }

    func channelActive(context: ChannelHandlerContext) {
        self.local = STUNAddress.specific(context.channel.localAddress)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = Self.unwrapInboundIn(data)
        self.metrics.udpMessages.increment()
        guard let source = STUNAddress(envelope.remoteAddress) else { return }
        let policy = self.policy
        let local = self.local
        let response = envelope.data.withUnsafeReadableBytes {
            STUNResponder.respond(to: $0, from: source, local: local, policy: policy)
        }
        self.metrics.count(response.outcome)
        guard !response.bytes.isEmpty else { return }
        let out = context.channel.allocator.buffer(bytes: response.bytes)
        context.write(
            Self.wrapOutboundOut(AddressedEnvelope(remoteAddress: envelope.remoteAddress, data: out)),
            promise: nil
        )
        self.needsFlush = true
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.needsFlush {
            self.needsFlush = false
            context.flush()
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // UDP errors (an ICMP unreachable from a client that went away) do not end the listener.
        self.logger.debug("stun: udp error", metadata: ["error": "\(error)"])
    }
}

/// Splits a TCP byte stream into STUN messages by their length field; throws (and the connection
/// closes) on bytes that cannot start a STUN message or a message over the limit.
struct STUNFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    let maxMessageSize: Int

    struct TooLarge: Error {}

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let length = try buffer.withUnsafeReadableBytes { (raw: UnsafeRawBufferPointer) throws -> Int? in
            try STUNMessage.frameLength(raw)
        }
        guard let length else { return .needMoreData }
        guard length <= self.maxMessageSize else { throw TooLarge() }
        guard let frame = buffer.readSlice(length: length) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(frame))
        return .continue
    }

    mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws -> DecodingState {
        while try self.decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}

/// Answers framed STUN messages on one TCP connection, in order.
final class STUNTCPHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let policy: STUNResponderPolicy
    private let metrics: STUNMetrics
    private var needsFlush = false

    init(policy: STUNResponderPolicy, metrics: STUNMetrics) {
        self.policy = policy
        self.metrics = metrics
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = Self.unwrapInboundIn(data)
        self.metrics.tcpMessages.increment()
        guard let source = context.channel.remoteAddress.flatMap({ STUNAddress($0) }) else { return }
        let local = STUNAddress.specific(context.channel.localAddress)
        let policy = self.policy
        let response = frame.withUnsafeReadableBytes {
            STUNResponder.respond(to: $0, from: source, local: local, policy: policy)
        }
        self.metrics.count(response.outcome)
        guard !response.bytes.isEmpty else { return }
        context.write(Self.wrapOutboundOut(context.channel.allocator.buffer(bytes: response.bytes)), promise: nil)
        self.needsFlush = true
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if self.needsFlush {
            self.needsFlush = false
            context.flush()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // The stream is not STUN (or a message is too large): nothing after it can be framed. Send
        // the answers to the messages before it, then close.
        self.metrics.tcpGarbage.increment()
        self.needsFlush = false
        context.flush()
        context.close(promise: nil)
    }
}

/// The server's counters, created once.
struct STUNMetrics: Sendable {
    let udpMessages: Counter
    let tcpMessages: Counter
    let bindingRFC5389: Counter
    let bindingRFC3489: Counter
    let badRequest: Counter
    let unknownAttribute: Counter
    let dropped: [STUNDropReason: Counter]
    let tcpConnections: Counter
    let tcpRejected: Counter
    let tcpGarbage: Counter

    init(factory: any MetricsFactory) {
        func c(_ label: String, _ dims: [(String, String)] = []) -> Counter {
            Counter(label: label, dimensions: dims, factory: factory)
        }
        self.udpMessages = c("stun_messages_total", [("transport", "udp")])
        self.tcpMessages = c("stun_messages_total", [("transport", "tcp")])
        self.bindingRFC5389 = c("stun_binding_responses_total", [("version", "rfc5389")])
        self.bindingRFC3489 = c("stun_binding_responses_total", [("version", "rfc3489")])
        self.badRequest = c("stun_error_responses_total", [("code", "400")])
        self.unknownAttribute = c("stun_error_responses_total", [("code", "420")])
        var dropped: [STUNDropReason: Counter] = [:]
        for r in STUNDropReason.allCases { dropped[r] = c("stun_dropped_total", [("reason", r.rawValue)]) }
        self.dropped = dropped
        self.tcpConnections = c("stun_tcp_connections_total")
        self.tcpRejected = c("stun_tcp_connections_rejected_total")
        self.tcpGarbage = c("stun_tcp_streams_closed_malformed_total")
    }

    func count(_ outcome: STUNResponse.Outcome) {
        switch outcome {
        case .binding(let classic): (classic ? self.bindingRFC3489 : self.bindingRFC5389).increment()
        case .error(let code):
            (code == STUNErrorCode.unknownAttribute ? self.unknownAttribute : self.badRequest).increment()
        case .dropped(let reason): self.dropped[reason]?.increment()
        }
    }
}
