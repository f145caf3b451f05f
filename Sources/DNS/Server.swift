import Logging
import MeshNIO
import Metrics
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// Where and how the responder listens. Every field has a default.
public struct DNSServerConfiguration: Sendable {
    /// Listen address (UDP and TCP on the same port).
    public var host: String
    /// Listen port; 0 picks a free port (the same one for UDP and TCP).
    public var port: Int
    /// Datagrams read per system call (recvmmsg) and answers sent per system call (sendmmsg).
    public var udpReadBatch: Int
    /// Largest UDP response sent, whatever size a client's EDNS offers.
    public var maxUDPResponseSize: Int
    /// A TCP connection that sends nothing for this long is closed.
    public var tcpIdleTimeout: TimeAmount
    /// Open TCP connections at most; further ones are closed at once.
    public var maxTCPConnections: Int
    /// Upstream forwarding for names outside the zone; nil answers them REFUSED.
    public var forwarding: DNSForwardingConfiguration?

    public init(
        host: String = "127.0.0.1",
        port: Int = 5353,
        udpReadBatch: Int = 16,
        maxUDPResponseSize: Int = 1232,
        tcpIdleTimeout: TimeAmount = .seconds(10),
        maxTCPConnections: Int = 256,
        forwarding: DNSForwardingConfiguration? = DNSForwardingConfiguration()
    ) {
        self.host = host
        self.port = port
        self.udpReadBatch = udpReadBatch
        self.maxUDPResponseSize = maxUDPResponseSize
        self.tcpIdleTimeout = tcpIdleTimeout
        self.maxTCPConnections = maxTCPConnections
        self.forwarding = forwarding
    }
}

/// The DNS responder as a swift-service-lifecycle `Service`: answers the service zone from a
/// ``DNSZoneStore`` over UDP and TCP and forwards every other name upstream (cached).
///
/// ```swift
/// let zones = DNSZoneStore()
/// try zones.update(ZoneInput(services: services))        // again on every change
/// let dns = DNSServer(configuration: .init(), zones: zones, logger: logger)
/// let group = ServiceGroup(services: [dns], gracefulShutdownSignals: [.sigterm], logger: logger)
/// try await group.run()
/// ```
public final class DNSServer: Service {
    public let configuration: DNSServerConfiguration
    public let zones: DNSZoneStore
    private let group: any EventLoopGroup
    private let logger: Logger
    private let metrics: DNSMetrics
    private let bound: EventLoopPromise<[SocketAddress]>
    /// The answer policy and forwarder while ``run()`` serves (``explain(name:type:)`` uses them).
    let serving = Mutex<(policy: AnswerPolicy, forwarder: DNSForwarder?)?>(nil)

    /// - Parameters:
    ///   - eventLoopGroup: the UDP socket and the forwarder live on one loop of it; TCP connections
    ///     spread over all of them.
    ///   - metricsFactory: where the counters go (default: the global `MetricsSystem`).
    public init(
        configuration: DNSServerConfiguration = DNSServerConfiguration(),
        zones: DNSZoneStore,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "mesh.dns"),
        metricsFactory: (any MetricsFactory)? = nil
    ) {
        self.configuration = configuration
        self.zones = zones
        self.group = eventLoopGroup
        self.logger = logger
        self.metrics = DNSMetrics(factory: metricsFactory ?? MetricsSystem.factory)
        self.bound = eventLoopGroup.any().makePromise(of: [SocketAddress].self)
    }

    deinit {
        // A server that never ran must not leave its promise pending (NIO traps on leaked promises).
        self.bound.fail(CancellationError())
    }

    /// The UDP and TCP addresses once ``run()`` has bound them (waits until then; throws if binding failed).
    public func listeningAddresses() async throws -> (udp: SocketAddress, tcp: SocketAddress) {
        let a = try await self.bound.futureResult.get()
        return (a[0], a[1])
    }

    public func run() async throws {
        let loop = self.group.next()
        let policy = AnswerPolicy(
            maxUDPSize: max(512, self.configuration.maxUDPResponseSize),
            forwarding: self.configuration.forwarding != nil
        )
        var forwarder: DNSForwarder? = nil
        let udp: DNSUDPLoop
        let tcp: any Channel
        let connections = ConnectionRegistry(limit: self.configuration.maxTCPConnections)
        do {
            if let f = self.configuration.forwarding {
                let upstreams = f.resolveUpstreams()
                if upstreams.isEmpty {
                    self.logger.warning("dns: no upstream resolvers; names outside the zone get SERVFAIL")
                }
                let fw = DNSForwarder(
                    configuration: f,
                    upstreams: upstreams,
                    eventLoop: loop,
                    logger: self.logger,
                    metrics: self.metrics
                )
                try await fw.start()
                forwarder = fw
            }
            (udp, tcp) = try await self.bind(loop: loop, policy: policy, forwarder: forwarder, connections: connections)
            if let forwarder {
                do {
                    try await forwarder.exclude([udp.localAddress, tcp.localAddress].compactMap { $0 })
                } catch {
                    udp.stop()
                    tcp.close(promise: nil)
                    throw error
                }
            }
        } catch {
            self.bound.fail(error)
            await forwarder?.shutdown()
            throw error
        }
        udp.start()
        let addresses = [udp.localAddress, tcp.localAddress!]
        self.logger.info(
            "dns: listening",
            metadata: ["udp": "\(addresses[0])", "tcp": "\(addresses[1])"]
        )
        self.serving.withLock { $0 = (policy, forwarder) }
        self.bound.succeed(addresses)

        // Either side stopping (shutdown, or an error) ends the service.
        udp.finished.futureResult.whenComplete { _ in tcp.close(promise: nil) }
        tcp.closeFuture.whenComplete { _ in udp.stop() }
        await withGracefulShutdownHandler {
            await withTaskCancellationHandler {
                try? await udp.finished.futureResult.get()
                try? await tcp.closeFuture.get()
            } onCancel: {
                udp.stop()
                tcp.close(promise: nil)
            }
        } onGracefulShutdown: {
            udp.stop()
            tcp.close(promise: nil)
        }
        udp.stop()
        tcp.close(promise: nil)
        try? await udp.finished.futureResult.get()
        self.serving.withLock { $0 = nil }
        await connections.closeAll()
        await forwarder?.shutdown()
        self.logger.info("dns: stopped")
    }

    /// Binds the UDP loop and the TCP listener on one port (port 0: the UDP socket picks it, retried
    /// when TCP finds that port taken). The UDP thread starts later (``DNSUDPLoop/start()``).
    private func bind(
        loop: any EventLoop,
        policy: AnswerPolicy,
        forwarder: DNSForwarder?,
        connections: ConnectionRegistry
    ) async throws -> (DNSUDPLoop, any Channel) {
        let zones = self.zones
        let metrics = self.metrics
        let idle = self.configuration.tcpIdleTimeout
        var lastError: (any Error)? = nil
        for _ in 0..<20 {
            let address = try SocketAddress.makeAddressResolvingHost(
                self.configuration.host,
                port: self.configuration.port
            )
            let udp = try DNSUDPLoop(
                address: address,
                batch: self.configuration.udpReadBatch,
                zones: zones,
                policy: policy,
                forwarder: forwarder,
                metrics: metrics,
                logger: self.logger,
                eventLoop: loop
            )
            do {
                let tcp = try await ServerBootstrap(group: self.group)
                    .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                    .serverChannelOption(.backlog, value: 256)
                    .childChannelInitializer { ch in
                        guard connections.admit(ch) else {
                            metrics.tcpConnectionsRejected.increment()
                            return ch.close()
                        }
                        return ch.eventLoop.makeCompletedFuture {
                            let ops = ch.pipeline.syncOperations
                            try ops.addHandler(IdleStateHandler(readTimeout: idle))
                            try ops.addHandler(ByteToMessageHandler(DNSTCPFrameDecoder()))
                            try ops.addHandler(
                                DNSTCPHandler(
                                    zones: zones,
                                    policy: policy,
                                    forwarder: forwarder,
                                    metrics: metrics
                                )
                            )
                        }
                    }
                    .bind(host: self.configuration.host, port: udp.localAddress.port ?? 0)
                    .get()
                return (udp, tcp)
            } catch {
                lastError = error
                udp.stop()
                if self.configuration.port != 0 { throw error }
            }
        }
        throw lastError ?? ChannelError.inappropriateOperationForState
    }
}

extension Answerer {
    /// The client's response for a forwarded question (`result` nil: SERVFAIL).
    static func composeForwarded(
        _ req: ForwardRequest,
        result: DNSMessage?,
        overTCP: Bool,
        policy: AnswerPolicy
    )
        -> [UInt8]
    {
        var m = DNSMessage(
            header: DNSHeader(
                id: req.id,
                isResponse: true,
                opcode: 0,
                recursionDesired: req.flags & 0x0100 != 0,
                recursionAvailable: true,
                checkingDisabled: req.flags & 0x0010 != 0
            ),
            questions: [req.question]
        )
        if let cname = req.cname { m.answers.append(cname) }
        if var result {
            // The cache is shared by clients asking in any case: each gets its own case back.
            result = restoringCase(result, of: req.upstreamQuestion.name)
            m.answers += result.answers
            m.authorities = result.authorities
            m.additionals = result.additionals
            m.header.rcodeLow = result.header.rcodeLow
        } else {
            m.header.rcodeLow = UInt8(DNSRCode.servFail.rawValue)
        }
        var limit = 65535
        if let e = req.clientEDNS {
            m.edns = DNSEDNS(udpPayloadSize: UInt16(clamping: policy.maxUDPSize), dnssecOK: e.dnssecOK)
            if !overTCP { limit = min(max(512, Int(e.udpPayloadSize)), policy.maxUDPSize) }
        } else if !overTCP {
            limit = 512
        }
        if let bytes = try? m.encode(maxSize: limit) { return bytes }
        // Upstream data we cannot re-encode: SERVFAIL rather than garbage.
        m.answers = []
        m.authorities = []
        m.additionals = []
        m.header.rcodeLow = UInt8(DNSRCode.servFail.rawValue)
        return (try? m.encode(maxSize: limit)) ?? []
    }
}

/// Answers framed TCP queries; pipelined queries are answered as they complete (RFC 7766).
final class DNSTCPHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let zones: DNSZoneStore
    private let policy: AnswerPolicy
    private let forwarder: DNSForwarder?
    private let metrics: DNSMetrics
    private let scratch = AnswerScratch()
    private var needsFlush = false

    init(zones: DNSZoneStore, policy: AnswerPolicy, forwarder: DNSForwarder?, metrics: DNSMetrics) {
        self.zones = zones
        self.policy = policy
        self.forwarder = forwarder
        self.metrics = metrics
    }

    static func frame(_ bytes: [UInt8], allocator: ByteBufferAllocator) -> ByteBuffer {
        var out = allocator.buffer(capacity: bytes.count + 2)
        out.writeInteger(UInt16(truncatingIfNeeded: bytes.count))
        out.writeBytes(bytes)
        return out
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let message = Self.unwrapInboundIn(data)
        self.metrics.queriesTCP.increment()
        let zone = self.zones.zone
        let scratch = self.scratch
        let policy = self.policy
        let disposition = message.withUnsafeReadableBytes {
            Answerer.answer($0, zone: zone, overTCP: true, policy: policy, scratch: scratch)
        }
        if scratch.malformed { self.metrics.malformed.increment() }
        switch disposition {
        case .reply:
            if scratch.response.count >= 12, scratch.response[2] & 0x04 != 0 {
                self.metrics.answeredFromZone.increment()
            }
            context.write(
                Self.wrapOutboundOut(Self.frame(scratch.response, allocator: context.channel.allocator)),
                promise: nil
            )
            self.needsFlush = true
        case .forward(let request):
            guard let forwarder = self.forwarder else { return }
            let channel = context.channel
            forwarder.resolve(request.upstreamQuestion).whenSuccess { result in
                let bytes = Answerer.composeForwarded(request, result: result, overTCP: true, policy: policy)
                guard !bytes.isEmpty else { return }
                channel.writeAndFlush(Self.frame(bytes, allocator: channel.allocator), promise: nil)
            }
        case .drop:
            break
        }
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
        context.close(promise: nil)
    }
}
