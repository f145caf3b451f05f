import Logging
import MeshWire
import NIOCore
import NIOPosix

/// Decides whether this node serves a stream's target (the agent's service table). nil accepts; a refusal
/// is sent back to the peer, which surfaces it as ``LinkError/refused(_:)``. `from` is the peer's node.
public typealias LinkTargetCheck = @Sendable (_ target: StreamTarget, _ from: String) -> StreamRefusal?

/// The sending side of a stream: writes the ``StreamTarget`` header when the stream becomes active, holds
/// the peer's bytes until its ``StreamOpenReply``, then gets out of the way (bytes after the reply go on
/// to the handlers behind it). A refusal fails `reply` and closes the stream.
final class StreamOpenSender: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let header: ByteBuffer
    private let reply: EventLoopPromise<Void>
    private var buffer = ByteBuffer()
    private var done = false

    init(target: StreamTarget, reply: EventLoopPromise<Void>) throws {
        var header = ByteBuffer()
        try target.encode(into: &header)
        self.header = header
        self.reply = reply
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(self.wrapOutboundOut(self.header), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.done else {
            context.fireChannelRead(data)
            return
        }
        var bytes = self.unwrapInboundIn(data)
        self.buffer.writeBuffer(&bytes)
        let decoded: StreamOpenReply?
        do {
            decoded = try StreamOpenReply.decode(from: &self.buffer)
        } catch {
            self.finish(.failure(LinkError.refused(StreamRefusal(.malformedHeader, "a malformed reply: \(error)"))))
            context.close(promise: nil)
            return
        }
        switch decoded {
        case nil:
            return
        case .accepted:
            self.finish(.success(()))
            let rest = self.buffer
            self.buffer = ByteBuffer()
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            if rest.readableBytes > 0 {
                context.fireChannelRead(NIOAny(rest))
                context.fireChannelReadComplete()
            }
        case .refused(let refusal):
            self.finish(.failure(LinkError.refused(refusal)))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.finish(.failure(LinkError.closedBeforeReply))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !self.done {
            self.finish(.failure(LinkError.closedBeforeReply))
            context.close(promise: nil)
            return
        }
        context.fireErrorCaught(error)
    }

    private func finish(_ result: Result<Void, any Error>) {
        guard !self.done else { return }
        self.done = true
        self.reply.completeWith(result)
    }
}

/// The receiving side of a stream the peer opened: reads the ``StreamTarget`` header, asks `check`, dials
/// the endpoint locally over TCP and splices the stream to it after answering `accepted`; otherwise
/// answers `refused` with the reason and ends the stream.
final class StreamOpenReceiver: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let peer: String
    private let check: LinkTargetCheck
    private let connectTimeout: TimeAmount
    private let onRefused: @Sendable (StreamRefusal) -> Void
    private let logger: Logger
    private let control: LinkManager.ControlHandler?
    private var buffer = ByteBuffer()
    private var target: StreamTarget?
    private var finished = false
    private var inputClosed = false

    init(
        peer: String,
        check: @escaping LinkTargetCheck,
        connectTimeout: TimeAmount,
        logger: Logger,
        control: LinkManager.ControlHandler? = nil,
        onRefused: @escaping @Sendable (StreamRefusal) -> Void
    ) {
        self.peer = peer
        self.check = check
        self.connectTimeout = connectTimeout
        self.logger = logger
        self.control = control
        self.onRefused = onRefused
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.buffer.writeBuffer(&bytes)
        guard self.target == nil, !self.finished else { return }  // dialing: hold the bytes
        let target: StreamTarget
        do {
            guard let t = try StreamTarget.decode(from: &self.buffer) else { return }
            target = t
        } catch {
            self.refuse(context, StreamRefusal(.malformedHeader, "malformed stream-open header: \(error)"))
            return
        }
        self.target = target
        if target == .linkControl, let control = self.control {
            // The link's own control stream (hole punching): accepted here, handed over as it is.
            let rest = self.answerAccepted(context)
            let stream = context.channel
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            control(stream, self.peer, rest)
            return
        }
        if let refusal = self.check(target, self.peer) {
            self.refuse(context, refusal)
            return
        }
        let address: SocketAddress
        do {
            address = try SocketAddress(ipAddress: target.endpoint.description, port: Int(target.endpointPort))
        } catch {
            self.refuse(context, StreamRefusal(.malformedHeader, "bad endpoint address \(target.endpoint)"))
            return
        }
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
        let stream = context.channel
        if target.transport == .udp {
            self.dialUDP(context, stream: stream, address: address)
            return
        }
        ClientBootstrap(group: context.eventLoop)
            .connectTimeout(self.connectTimeout)
            .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .channelInitializer { local in
                // Holds what the endpoint sends first (a server-speaks-first protocol) until the splice.
                local.eventLoop.makeCompletedFuture { try local.pipeline.syncOperations.addHandler(HoldHandler()) }
            }
            .connect(to: address)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let local):
                    self.spliced(context, stream: stream, local: local)
                case .failure(let error):
                    self.refuse(
                        context,
                        StreamRefusal(.dialFailed, "\(target.endpoint):\(target.endpointPort): \(error)")
                    )
                }
            }
    }

    /// A UDP flow: a connected UDP socket to the endpoint; the stream carries its datagrams framed.
    private func dialUDP(_ context: ChannelHandlerContext, stream: any Channel, address: SocketAddress) {
        DatagramBootstrap(group: context.eventLoop)
            .connect(to: address)
            .assumeIsolated()
            .whenComplete { result in
                switch result {
                case .success(let socket):
                    guard let rest = self.accept(context, stream: stream, local: socket) else { return }
                    do {
                        let flow = DatagramStreamHandler(socket: socket)
                        try socket.pipeline.syncOperations.addHandler(DatagramSocketHandler(stream: stream))
                        try stream.pipeline.syncOperations.addHandler(flow)
                        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
                        if rest.readableBytes > 0 {
                            stream.pipeline.fireChannelRead(rest)
                        }
                        if self.inputClosed { stream.close(promise: nil) }
                        _ = stream.setOption(ChannelOptions.autoRead, value: true)
                    } catch {
                        socket.close(promise: nil)
                        stream.close(promise: nil)
                    }
                case .failure(let error):
                    self.refuse(context, StreamRefusal(.dialFailed, "udp \(address): \(error)"))
                }
            }
    }

    /// The local side is up: answers the stream `accepted` and returns the bytes read ahead of it, or nil
    /// (and closes `local`) when the stream went away meanwhile.
    private func accept(_ context: ChannelHandlerContext, stream: any Channel, local: any Channel) -> ByteBuffer? {
        guard stream.isActive else {
            local.close(promise: nil)
            return nil
        }
        return self.answerAccepted(context)
    }

    /// Answers the stream `accepted`, marks it finished, and returns the bytes read ahead of the answer.
    private func answerAccepted(_ context: ChannelHandlerContext) -> ByteBuffer {
        var reply = ByteBuffer()
        StreamOpenReply.accepted.encode(into: &reply)
        context.writeAndFlush(self.wrapOutboundOut(reply), promise: nil)
        let rest = self.buffer
        self.buffer = ByteBuffer()
        self.finished = true
        return rest
    }

    private func spliced(_ context: ChannelHandlerContext, stream: any Channel, local: any Channel) {
        guard let rest = self.accept(context, stream: stream, local: local) else { return }
        do {
            let (a, b) = StreamSpliceHandler.pair()
            try local.pipeline.syncOperations.addHandler(b)
            try stream.pipeline.syncOperations.addHandler(a)
            if rest.readableBytes > 0 {
                local.writeAndFlush(rest, promise: nil)
            }
            if self.inputClosed {  // the peer's FIN came while dialing
                local.close(mode: .output, promise: nil)
            }
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            let hold = try local.pipeline.syncOperations.context(handlerType: HoldHandler.self)
            local.pipeline.syncOperations.removeHandler(context: hold, promise: nil)
            if !local.isActive { stream.close(promise: nil) }
            _ = stream.setOption(ChannelOptions.autoRead, value: true)
        } catch {
            local.close(promise: nil)
            stream.close(promise: nil)
        }
    }

    private func refuse(_ context: ChannelHandlerContext, _ refusal: StreamRefusal) {
        guard !self.finished else { return }
        self.finished = true
        self.onRefused(refusal)
        self.logger.info(
            "refused a stream",
            metadata: [
                "peer": "\(self.peer)", "target": "\(self.target.map { "\($0)" } ?? "-")",
                "reason": "\(refusal.reason)",
            ]
        )
        var reply = ByteBuffer()
        StreamOpenReply.refused(refusal).encode(into: &reply)
        let channel = context.channel
        context.writeAndFlush(self.wrapOutboundOut(reply)).whenComplete { _ in
            channel.close(mode: .output, promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            self.inputClosed = true
            if self.target == nil { context.close(promise: nil) }  // FIN before a whole header
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.finished = true
        context.fireChannelInactive()
    }
}

/// Joins two channels of the same event loop byte for byte, with back-pressure (a side reads only while
/// the other is writable) and half-close (one side's end of input ends the other's output). Set
/// `allowRemoteHalfClosure` on both channels for half-close; without it, one side closing closes both.
public final class StreamSpliceHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private var partner: StreamSpliceHandler?
    private var context: ChannelHandlerContext?
    private var pendingRead = false

    private init() {}

    /// Two handlers, one for each channel.
    public static func pair() -> (StreamSpliceHandler, StreamSpliceHandler) {
        let a = StreamSpliceHandler()
        let b = StreamSpliceHandler()
        a.partner = b
        b.partner = a
        return (a, b)
    }

    /// Splices `a` and `b` (same event loop; call on it).
    public static func splice(_ a: any Channel, _ b: any Channel) throws {
        precondition(a.eventLoop === b.eventLoop, "a splice joins channels of one event loop")
        let (x, y) = Self.pair()
        try a.pipeline.syncOperations.addHandler(x)
        try b.pipeline.syncOperations.addHandler(y)
    }

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.partner = nil
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.partner?.partnerWrite(data)
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.partner?.partnerFlush()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        self.partner?.partnerClose()
        context.fireChannelInactive()
    }

    public func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            self.partner?.partnerCloseOutput()
        }
        context.fireUserInboundEventTriggered(event)
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.partner?.partnerBecameWritable()
        }
        context.fireChannelWritabilityChanged()
    }

    public func read(context: ChannelHandlerContext) {
        if self.partner?.partnerWritable ?? false {
            context.read()
        } else {
            self.pendingRead = true
        }
    }

    private func partnerWrite(_ data: NIOAny) {
        self.context?.write(data, promise: nil)
    }

    private func partnerFlush() {
        self.context?.flush()
    }

    private func partnerClose() {
        self.context?.close(promise: nil)
    }

    private func partnerCloseOutput() {
        guard let context = self.context else { return }
        context.flush()
        let channel = context.channel
        context.close(mode: .output).whenFailure { _ in channel.close(promise: nil) }
    }

    private var partnerWritable: Bool {
        self.context?.channel.isWritable ?? false
    }

    private func partnerBecameWritable() {
        if self.pendingRead {
            self.pendingRead = false
            self.context?.read()
        }
    }
}

/// Holds a channel's bytes (and its end of input) until a splice is in place behind it; removing it
/// hands them on. Added when the channel is set up, so that nothing it reads before the splice is lost.
final class HoldHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private var held: [NIOAny] = []
    private var inputClosed = false

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.held.append(data)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            self.inputClosed = true
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func removeHandler(context: ChannelHandlerContext, removalToken: ChannelHandlerContext.RemovalToken) {
        let held = self.held
        self.held = []
        for data in held { context.fireChannelRead(data) }
        if !held.isEmpty { context.fireChannelReadComplete() }
        if self.inputClosed { context.fireUserInboundEventTriggered(ChannelEvent.inputClosed) }
        context.leavePipeline(removalToken: removalToken)
    }
}

/// On a UDP flow's stream: deframes datagrams (`DatagramFraming`) and sends each on the connected UDP
/// socket; the stream's end closes the socket. A malformed frame ends the stream.
final class DatagramStreamHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let socket: any Channel
    private var buffer = ByteBuffer()

    init(socket: any Channel) {
        self.socket = socket
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.buffer.writeBuffer(&bytes)
        do {
            while let datagram = try DatagramFraming.decode(from: &self.buffer) {
                self.socket.write(datagram, promise: nil)
            }
        } catch {
            context.close(promise: nil)
            return
        }
        self.buffer.discardReadBytes()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.socket.flush()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            context.close(promise: nil)  // the sender ended the flow
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.socket.close(promise: nil)
        context.fireChannelInactive()
    }
}

/// On a UDP flow's socket: frames each datagram from the endpoint onto the stream. Datagrams beyond what
/// the stream can take (not writable) are dropped, as a congested UDP path drops them.
final class DatagramSocketHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>

    private let stream: any Channel

    init(stream: any Channel) {
        self.stream = stream
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let envelope = self.unwrapInboundIn(data)
        guard self.stream.isWritable else { return }
        var framed = ByteBuffer()
        do {
            try DatagramFraming.encode(envelope.data, into: &framed)
        } catch {
            return
        }
        self.stream.write(framed, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.stream.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.stream.close(promise: nil)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ECONNREFUSED from an ICMP port unreachable: the endpoint is not listening (yet); keep the flow.
    }
}
