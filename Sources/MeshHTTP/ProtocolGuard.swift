import NIOCore
import NIOHTTP1

/// Renders an error the server produces itself (malformed request, timeout) into a body.
public typealias ErrorRenderer = @Sendable (HTTPResponseStatus, String) -> (contentType: String, body: ByteBuffer)

/// Guards one server connection against bad clients, below the request handler:
/// - a malformed request gets 400 (431 for oversized headers) with a message saying what was wrong;
/// - a request whose body stops arriving gets 408 after `requestTimeout`;
/// - a connection with no request in progress is closed after `idleTimeout` (also ends slow-loris
///   clients that dribble a header);
/// - a client that half-closes before its body is complete gets 400; one that closes while its
///   response is streaming completes `inputClosed`, so the streamer stops.
final class ProtocolGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private enum State {
        case idle
        case receivingBody
        case responding
    }

    private var state = State.idle
    private var responseStarted = false
    private var lastActivity: NIODeadline
    private var timer: Scheduled<Void>?
    private let requestTimeout: TimeAmount
    private let idleTimeout: TimeAmount
    private let render: ErrorRenderer
    let inputClosed: EventLoopPromise<Void>

    init(eventLoop: any EventLoop, requestTimeout: TimeAmount, idleTimeout: TimeAmount, render: @escaping ErrorRenderer)
    {
        self.requestTimeout = requestTimeout
        self.idleTimeout = idleTimeout
        self.render = render
        self.inputClosed = eventLoop.makePromise()
        self.lastActivity = eventLoop.now
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { self.armTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        self.armTimer(context: context)
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.inputClosed.succeed()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.inputClosed.succeed()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.lastActivity = context.eventLoop.now
        switch self.unwrapInboundIn(data) {
        case .head:
            if self.state == .idle { self.state = .receivingBody }
        case .body:
            break
        case .end:
            if self.state == .receivingBody {
                // Nothing to time while the answer is made and written (for a watch, the connection's
                // life): no timer per streaming connection.
                self.state = .responding
                self.timer?.cancel()
                self.timer = nil
            }
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch self.unwrapOutboundIn(data) {
        case .head(let head) where head.status.code >= 200:
            self.responseStarted = true
        case .end:
            self.responseStarted = false
            self.lastActivity = context.eventLoop.now
            // A response sent before the request ended (413, early errors) leaves no request in progress.
            self.state = .idle
            if self.timer == nil && context.channel.isActive { self.armTimer(context: context) }
        default:
            break
        }
        context.write(data, promise: promise)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ShutdownEvent {
            // Idle connections close now; a response under way finishes (streams are told to stop).
            if self.state == .idle && !self.responseStarted {
                context.close(promise: nil)
            } else {
                self.inputClosed.succeed()
            }
            return
        }
        if case .some(.inputClosed) = event as? ChannelEvent {
            self.inputClosed.succeed()
            switch self.state {
            case .idle:
                context.close(promise: nil)
            case .receivingBody:
                self.fail(context: context, .badRequest, "the request ended before its body was complete")
            case .responding:
                break  // finish the response; the connection closes after it
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parseError = error as? HTTPParserError else {
            context.fireErrorCaught(error)
            return
        }
        switch parseError {
        case .headerOverflow:
            self.fail(context: context, .requestHeaderFieldsTooLarge, "request headers are too large")
        case .invalidEOFState:
            self.fail(context: context, .badRequest, "the request ended before its body was complete")
        default:
            self.fail(context: context, .badRequest, "malformed HTTP request: \(parseError.debugDescription)")
        }
        context.fireErrorCaught(error)
    }

    /// Sends an error response when no other response is under way, then closes.
    private func fail(context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ message: String) {
        guard context.channel.isActive else { return }
        if !self.responseStarted && self.state != .responding {
            let (contentType, body) = self.render(status, message)
            let headers = HTTPHeaders([
                ("Connection", "close"), ("Content-Type", contentType), ("Content-Length", "\(body.readableBytes)"),
            ])
            context.write(
                self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))),
                promise: nil
            )
            context.write(self.wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
            let channel = context.channel
            context.writeAndFlush(self.wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
        } else {
            context.close(promise: nil)
        }
        self.state = .responding
    }

    private func armTimer(context: ChannelHandlerContext) {
        let tick = min(self.requestTimeout, self.idleTimeout)
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: tick) { [self] in
            self.checkTimeouts(context: context)
        }
    }

    private func checkTimeouts(context: ChannelHandlerContext) {
        guard context.channel.isActive else { return }
        let quiet = context.eventLoop.now - self.lastActivity
        switch self.state {
        case .idle where quiet >= self.idleTimeout:
            context.close(promise: nil)
            return
        case .receivingBody where quiet >= self.requestTimeout:
            let seconds = self.requestTimeout.nanoseconds / 1_000_000_000
            self.fail(
                context: context,
                .requestTimeout,
                "timed out after \(seconds)s waiting for the rest of the request"
            )
            return
        default:
            break
        }
        self.armTimer(context: context)
    }
}
