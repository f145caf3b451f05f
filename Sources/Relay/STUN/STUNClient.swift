import MeshCore
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The transport a STUN binding went over.
public enum STUNTransport: String, Sendable, Hashable, Codable {
    case udp
    case tcp
}

/// One answered Binding request: who answered, from which local address, what it saw.
public struct STUNBinding: Sendable, Hashable {
    public var server: SocketAddress
    public var transport: STUNTransport
    /// The local address the request left from.
    public var local: SocketAddress?
    /// The reflexive address: the request's source as the server saw it (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS).
    public var mapped: STUNAddress
    /// Request to answer.
    public var rtt: Duration
}

/// Why a binding request got no usable answer.
public enum STUNClientError: Error, Sendable, Hashable, CustomStringConvertible {
    /// No answer within the timeout (UDP: after every retransmission).
    case timedOut(server: String, STUNTransport)
    /// The server answered with an error response.
    case errorResponse(server: String, code: Int, reason: String)
    /// The answer had no (XOR-)MAPPED-ADDRESS, or was not STUN.
    case badAnswer(server: String, String)
    /// The connection failed or closed before the answer.
    case connection(server: String, String)

    public var description: String {
        switch self {
        case .timedOut(let s, let t): return "STUN \(t) binding to \(s): no answer"
        case .errorResponse(let s, let c, let r): return "STUN binding to \(s): error \(c) \(r)"
        case .badAnswer(let s, let why): return "STUN binding to \(s): \(why)"
        case .connection(let s, let why): return "STUN binding to \(s): \(why)"
        }
    }
}

/// A STUN Binding client (RFC 8489) over UDP or TCP, sending from a chosen local port, so that the
/// reflexive address it learns is the mapping of that very port (the link port a punch will use).
///
/// The TCP request's socket is bound with SO_REUSEADDR and SO_REUSEPORT (the link listener holds the port
/// too) and closed with SO_LINGER 0, so no TIME_WAIT keeps the 4-tuple from the next discovery.
public struct STUNClient: Sendable {
    public let group: any EventLoopGroup
    /// Per request (TCP: connect and answer; UDP: all retransmissions).
    public var timeout: TimeAmount = .seconds(2)
    /// UDP: the request is sent again after this, doubling (RFC 8489 §6.2.1, shortened for a LAN or a
    /// relay a few ms away).
    public var udpRetransmit: TimeAmount = .milliseconds(250)

    public init(group: any EventLoopGroup) {
        self.group = group
    }

    static let reusePort = ChannelOptions.Types.SocketOption(level: .socket, name: .init(rawValue: SO_REUSEPORT))

    /// A Binding request over TCP from `local` (port 0: any) to `server`.
    public func bindingTCP(server: SocketAddress, local: SocketAddress? = nil) async throws -> STUNBinding {
        let request = STUNMessage(type: .bindingRequest, transactionID: .random(), attributes: [.fingerprint])
        let bytes = try request.encode()
        let name = "\(server)"
        let start = ContinuousClock.now
        let answer = self.group.next().makePromise(of: STUNMessage.self)
        var bootstrap = ClientBootstrap(group: self.group)
            .connectTimeout(self.timeout)
            .channelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .channelOption(Self.reusePort, value: 1)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        STUNAnswerHandler(transaction: request.transactionID, server: name, answer: answer)
                    )
                }
            }
        if let local { bootstrap = bootstrap.bind(to: local) }
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(to: server).get()
        } catch {
            answer.fail(STUNClientError.connection(server: name, "\(error)"))
            throw STUNClientError.connection(server: name, "\(error)")
        }
        let timeout = channel.eventLoop.scheduleTask(in: self.timeout) {
            answer.fail(STUNClientError.timedOut(server: name, .tcp))
        }
        let localAddress = channel.localAddress
        let result: Result<STUNMessage, any Error>
        do {
            try await channel.writeAndFlush(ByteBuffer(bytes: bytes)).get()
            result = .success(try await answer.futureResult.get())
        } catch {
            result = .failure(error)
        }
        timeout.cancel()
        // No TIME_WAIT, and closed before this returns: the next discovery (or punch) may reuse this 4-tuple
        // at once, and a socket still closing would make its connect fail with EADDRNOTAVAIL.
        if let provider = channel as? any SocketOptionProvider {
            try? await provider.setSoLinger(linger(l_onoff: 1, l_linger: 0)).get()
        }
        try? await channel.close()
        return try Self.binding(result.get(), server: server, transport: .tcp, local: localAddress, start: start)
    }

    /// A Binding request over UDP from `local` (port 0: any) to `server`, retransmitted until answered or
    /// `timeout`.
    public func bindingUDP(server: SocketAddress, local: SocketAddress? = nil) async throws -> STUNBinding {
        let request = STUNMessage(type: .bindingRequest, transactionID: .random(), attributes: [.fingerprint])
        let bytes = try request.encode()
        let name = "\(server)"
        let start = ContinuousClock.now
        let answer = self.group.next().makePromise(of: STUNMessage.self)
        let bindTo =
            try local
            ?? (server.protocol == .inet6
                ? SocketAddress(ipAddress: "::", port: 0) : SocketAddress(ipAddress: "0.0.0.0", port: 0))
        let channel = try await DatagramBootstrap(group: self.group)
            .channelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .channelOption(Self.reusePort, value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        STUNDatagramAnswerHandler(transaction: request.transactionID, server: server, answer: answer)
                    )
                }
            }
            .bind(to: bindTo).get()
        let localAddress = channel.localAddress
        let loop = channel.eventLoop
        let deadline = NIODeadline.now() + self.timeout
        let send: @Sendable () -> Void = {
            channel.writeAndFlush(
                AddressedEnvelope(remoteAddress: server, data: ByteBuffer(bytes: bytes)),
                promise: nil
            )
        }
        // Retransmissions: at t, 2t, 4t... until the deadline.
        let retransmit = self.udpRetransmit
        let timer = loop.submit {
            var next = retransmit
            var at = NIODeadline.now()
            var tasks: [Scheduled<Void>] = []
            while at + next < deadline {
                at = at + next
                tasks.append(loop.scheduleTask(deadline: at) { send() })
                next = next * 2
            }
            tasks.append(
                loop.scheduleTask(deadline: deadline) { answer.fail(STUNClientError.timedOut(server: name, .udp)) }
            )
            return tasks
        }
        send()
        let result: Result<STUNMessage, any Error>
        do {
            let scheduled = try await timer.get()
            defer { for t in scheduled { t.cancel() } }
            result = .success(try await answer.futureResult.get())
        } catch {
            result = .failure(error)
        }
        // Closed before this returns, as over TCP: a socket still open on the same port (SO_REUSEPORT) could
        // take the answer to the next binding from it.
        try? await channel.close()
        let message = try result.get()
        return try Self.binding(message, server: server, transport: .udp, local: localAddress, start: start)
    }

    static func binding(
        _ message: STUNMessage,
        server: SocketAddress,
        transport: STUNTransport,
        local: SocketAddress?,
        start: ContinuousClock.Instant
    ) throws -> STUNBinding {
        let name = "\(server)"
        if message.type == .bindingError {
            if case .errorCode(let e)? = message.first(STUNAttributeType.errorCode) {
                throw STUNClientError.errorResponse(server: name, code: e.code, reason: e.reason)
            }
            throw STUNClientError.errorResponse(server: name, code: 0, reason: "(no ERROR-CODE)")
        }
        let mapped: STUNAddress
        if case .xorMappedAddress(let a)? = message.first(STUNAttributeType.xorMappedAddress) {
            mapped = a
        } else if case .mappedAddress(let a)? = message.first(STUNAttributeType.mappedAddress) {
            mapped = a
        } else {
            throw STUNClientError.badAnswer(server: name, "a success response without a mapped address")
        }
        return STUNBinding(
            server: server,
            transport: transport,
            local: local,
            mapped: mapped,
            rtt: ContinuousClock.now - start
        )
    }
}

/// Reads one framed STUN answer off a TCP stream (RFC 8489 §6.2.2) for a transaction.
final class STUNAnswerHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let transaction: STUNTransactionID
    private let server: String
    private let answer: EventLoopPromise<STUNMessage>
    private var buffer = ByteBuffer()

    init(transaction: STUNTransactionID, server: String, answer: EventLoopPromise<STUNMessage>) {
        self.transaction = transaction
        self.server = server
        self.answer = answer
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.buffer.writeBuffer(&bytes)
        while true {
            let view = self.buffer.readableBytesView
            let length: Int?
            do {
                length = try view.withUnsafeBytes { try STUNMessage.frameLength($0) }
            } catch {
                self.answer.fail(STUNClientError.badAnswer(server: self.server, "not STUN: \(error)"))
                context.close(promise: nil)
                return
            }
            guard let length, self.buffer.readableBytes >= length else { return }
            let frame = self.buffer.readBytes(length: length)!
            guard let message = try? STUNMessage.decode(frame) else { continue }
            if message.transactionID == self.transaction {
                self.answer.succeed(message)
                return
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.answer.fail(STUNClientError.connection(server: self.server, "closed before the answer"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.answer.fail(STUNClientError.connection(server: self.server, "\(error)"))
        context.close(promise: nil)
    }
}

/// Takes the first datagram from `server` that is a STUN answer to the transaction.
final class STUNDatagramAnswerHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    private let transaction: STUNTransactionID
    private let server: SocketAddress
    private let answer: EventLoopPromise<STUNMessage>

    init(transaction: STUNTransactionID, server: SocketAddress, answer: EventLoopPromise<STUNMessage>) {
        self.transaction = transaction
        self.server = server
        self.answer = answer
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = self.unwrapInboundIn(data)
        guard envelope.remoteAddress == self.server else { return }
        let bytes = Array(envelope.data.readableBytesView)
        guard let message = try? STUNMessage.decode(bytes), message.transactionID == self.transaction else { return }
        self.answer.succeed(message)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // An ICMP error (port unreachable) on a UDP socket: keep waiting for a retransmission's answer.
    }
}
