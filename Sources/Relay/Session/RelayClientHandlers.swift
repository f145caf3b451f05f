import NIOCore
import NIOSSL

/// What an agent's control session with its relay reports, after the `welcome`.
enum RelayControlEvent: Sendable {
    /// Node `from` asks for circuit `circuit`: open a new connection and `accept` it.
    case open(circuit: UInt64, from: String)
    /// The session ended (the reason, for people).
    case closed(String)
}

/// The agent's end of a control session (behind the outer TLS): sends `hello` is the caller's job;
/// this waits for `welcome`, answers the relay's pings, pings it every `pingInterval` (at most the
/// welcome's keepalive) and closes the session when a ping is not answered within `pongTimeout`.
/// `open` requests go to `events`.
final class RelayControlHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let welcome: EventLoopPromise<(relay: String, keepaliveSeconds: UInt16)>
    let events: AsyncStream<RelayControlEvent>.Continuation
    let maxPingInterval: TimeAmount
    let pongTimeout: TimeAmount
    let tlsRefusal: @Sendable () -> String?
    var buffer: [UInt8] = []
    var welcomed = false
    var lastRead = NIODeadline.now()
    var pinger: RepeatedTask?
    var reason: String?
    var nextPing: UInt64 = 1

    init(
        welcome: EventLoopPromise<(relay: String, keepaliveSeconds: UInt16)>,
        events: AsyncStream<RelayControlEvent>.Continuation,
        maxPingInterval: TimeAmount,
        pongTimeout: TimeAmount,
        tlsRefusal: @escaping @Sendable () -> String?
    ) {
        self.welcome = welcome
        self.events = events
        self.maxPingInterval = maxPingInterval
        self.pongTimeout = pongTimeout
        self.tlsRefusal = tlsRefusal
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.buffer += bytes.readBytes(length: bytes.readableBytes) ?? []
        self.lastRead = .now()
        while !self.buffer.isEmpty, context.channel.isActive {
            let decoded: (message: RelaySessionMessage, length: Int)?
            do {
                decoded = try RelaySessionMessage.decode(self.buffer)
            } catch {
                self.end(context, "the relay sent a malformed message: \(error)")
                return
            }
            guard let (message, length) = decoded else { return }
            self.buffer.removeFirst(length)
            self.handle(context, message)
        }
    }

    private func handle(_ context: ChannelHandlerContext, _ message: RelaySessionMessage) {
        switch (self.welcomed, message) {
        case (false, .welcome(let relay, let keepalive)):
            self.welcomed = true
            self.welcome.succeed((relay, keepalive))
            self.startPinging(context, keepalive: keepalive)
        case (_, .ping(let value)):
            if let frame = try? RelaySessionMessage.pong(value).encode() {
                context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(bytes: frame)), promise: nil)
            }
        case (true, .pong):
            break
        case (true, .open(let circuit, let from)):
            self.events.yield(.open(circuit: circuit, from: from))
        case (_, .refused(let code, let text)):
            self.end(context, "the relay refused the session (\(code)): \(text)")
        default:
            self.end(context, "the relay sent \(message.kind) where it is not allowed")
        }
    }

    private func startPinging(_ context: ChannelHandlerContext, keepalive: UInt16) {
        let asked = TimeAmount.seconds(Int64(max(keepalive, 1)))
        let interval = min(asked, self.maxPingInterval)
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        self.pinger = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            let (handler, context) = bound.value
            handler.ping(context)
        }
    }

    private func ping(_ context: ChannelHandlerContext) {
        guard context.channel.isActive, let frame = try? RelaySessionMessage.ping(self.nextPing).encode() else {
            return
        }
        self.nextPing &+= 1
        let sent = NIODeadline.now()
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(bytes: frame)), promise: nil)
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let timeout = self.pongTimeout
        context.eventLoop.scheduleTask(in: timeout) {
            let (handler, context) = bound.value
            if handler.lastRead < sent {
                handler.end(context, "the relay did not answer a ping within \(timeout.nanoseconds / 1_000_000) ms")
            }
        }
    }

    /// Records why, then closes (channelInactive reports it).
    func end(_ context: ChannelHandlerContext, _ why: String) {
        if self.reason == nil { self.reason = why }
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.end(context, self.tlsRefusal() ?? "\(error)")
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.pinger?.cancel()
        let why = self.reason ?? self.tlsRefusal() ?? "the relay closed the session"
        self.welcome.fail(RelayClientError.closed(why))
        self.events.yield(.closed(why))
        self.events.finish()
        context.fireChannelInactive()
    }
}

/// One half of a circuit on the agent's side (behind the outer TLS): the caller writes `connect` or
/// `accept`; this waits for `ready` (or `refused`). At `ready` it ends the session's TLS (close_notify
/// both ways, `NIOSSLHandler.stopTLS`): the connection goes on as plain TCP, and the link's own TLS
/// rides it end to end, encrypted once. The relay sends its close_notify right behind `ready`, so
/// while the half waits the channel allows remote half-closure: that close_notify, read with `ready`,
/// must not close the connection (it is set back once the TLS is gone). From then on, the bytes are the link's: they
/// are held here until the link's handlers are in place, then handed on in order. The handler leaves
/// the pipeline right after `onReady` (which installs the link synchronously) or, without one, on the
/// first outbound write (the link's TLS ClientHello: its handlers are in place by then).
final class RelayCircuitHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum State {
        case waiting
        /// `ready` came: leaving the session's TLS.
        case unwrapping
        case ready
        /// Leaving on the next tick (the link's first write).
        case leaving
        case removing
    }

    let ready: EventLoopPromise<UInt64>
    let onReady: (@Sendable (any Channel) -> Void)?
    let tlsRefusal: @Sendable () -> String?
    var state = State.waiting
    var buffer: [UInt8] = []
    var held: [ByteBuffer] = []

    init(
        ready: EventLoopPromise<UInt64>,
        onReady: (@Sendable (any Channel) -> Void)?,
        tlsRefusal: @escaping @Sendable () -> String?
    ) {
        self.ready = ready
        self.onReady = onReady
        self.tlsRefusal = tlsRefusal
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // NIOSSL reads it when the relay's close_notify arrives, before it hands on `ready` read with it.
        try? context.channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let channelEvent = event as? ChannelEvent, case .inputClosed = channelEvent {
            switch self.state {
            case .unwrapping:
                // The relay's close_notify came before our stopTLS ran: it completes at once.
                return
            case .waiting:
                self.fail(context, RelayClientError.closed(self.tlsRefusal() ?? "the relay closed the connection"))
                return
            default:
                context.close(promise: nil)
                return
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        guard case .waiting = self.state else {
            self.held.append(bytes)
            return
        }
        self.buffer += bytes.readBytes(length: bytes.readableBytes) ?? []
        let decoded: (message: RelaySessionMessage, length: Int)?
        do {
            decoded = try RelaySessionMessage.decode(self.buffer)
        } catch {
            self.fail(context, RelayClientError.protocolError("the relay sent a malformed message: \(error)"))
            return
        }
        guard let (message, length) = decoded else { return }
        switch message {
        case .ready(let circuit):
            guard self.buffer.count == length else {
                self.fail(context, RelayClientError.protocolError("the relay sent bytes after ready inside its TLS"))
                return
            }
            self.buffer = []
            self.state = .unwrapping
            self.unwrap(context, circuit)
        case .refused(let code, let text):
            self.fail(context, RelayClientError.refused(code, text))
        default:
            self.fail(context, RelayClientError.protocolError("the relay sent \(message.kind) instead of ready"))
        }
    }

    /// Ends the session's TLS (our close_notify, then the relay's), then the circuit is ready: what
    /// follows the relay's close_notify is the link's, in the clear (held until the link is in place).
    private func unwrap(_ context: ChannelHandlerContext, _ circuit: UInt64) {
        let loop = context.eventLoop
        let done = loop.makePromise(of: Void.self)
        let bound = NIOLoopBound((self, context), eventLoop: loop)
        if let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLHandler.self) {
            // Not inside NIOSSL's read, which delivered `ready`.
            let boundTLS = NIOLoopBound(tls, eventLoop: loop)
            loop.execute { boundTLS.value.stopTLS(promise: done) }
        } else {
            // No session TLS below this handler (its tests): nothing to leave.
            loop.execute { done.succeed(()) }
        }
        done.futureResult.whenComplete { result in
            let (handler, context) = bound.value
            guard case .unwrapping = handler.state else { return }
            switch result {
            case .failure(let error):
                handler.fail(
                    context,
                    RelayClientError.protocolError("could not leave the relay session's TLS after ready: \(error)")
                )
            case .success:
                handler.state = .ready
                // Plain TCP now: the link's TLS handles the end of the connection as on any other.
                try? context.channel.syncOptions?.setOption(ChannelOptions.allowRemoteHalfClosure, value: false)
                handler.ready.succeed(circuit)
                if let onReady = handler.onReady {
                    onReady(context.channel)
                    handler.leave(context)
                }
            }
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        context.write(data, promise: promise)
        if case .ready = self.state {
            // The link's TLS speaks: its handlers sit behind this one. Leave on the next tick, not
            // inside the write that is under way.
            self.state = .leaving
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            context.eventLoop.execute {
                let (handler, context) = bound.value
                handler.leave(context)
            }
        }
    }

    /// Leaves the pipeline, handing on the bytes held since `ready` (once; on the event loop).
    func leave(_ context: ChannelHandlerContext) {
        switch self.state {
        case .ready, .leaving:
            self.state = .removing
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        case .waiting, .unwrapping, .removing:
            break
        }
    }

    /// The bytes held since `ready`, taken out (once; on the event loop) when the connection leaves NIO (a relay
    /// forwarding a circuit moves it to its splice) instead of this handler leaving the pipeline.
    func takeHeld() -> [UInt8] {
        self.state = .removing
        defer { self.held = [] }
        return self.held.flatMap { Array(buffer: $0) }
    }

    func removeHandler(context: ChannelHandlerContext, removalToken: ChannelHandlerContext.RemovalToken) {
        let held = self.held
        self.held = []
        for bytes in held { context.fireChannelRead(self.wrapInboundOut(bytes)) }
        if !held.isEmpty { context.fireChannelReadComplete() }
        context.leavePipeline(removalToken: removalToken)
    }

    private func fail(_ context: ChannelHandlerContext, _ error: RelayClientError) {
        self.state = .removing
        self.ready.fail(error)
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        switch self.state {
        case .waiting, .unwrapping:
            self.fail(context, RelayClientError.closed(self.tlsRefusal() ?? "\(error)"))
        default:
            context.fireErrorCaught(error)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        switch self.state {
        case .waiting, .unwrapping:
            self.state = .removing
            self.ready.fail(RelayClientError.closed(self.tlsRefusal() ?? "the relay closed the connection"))
        default:
            break
        }
        context.fireChannelInactive()
    }
}
