import NIOCore
import NIOHTTP1

/// Answers requests the decoder cannot parse: 431 when the head is over the size limits, 400 otherwise,
/// always with `connection: close`, then closes. If a response is already under way it just closes.
final class HTTPErrorResponder: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias InboundOut = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let metrics: RouteMetrics
    private var responseInFlight = false
    private var failed = false

    init(metrics: RouteMetrics) {
        self.metrics = metrics
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let parserError = error as? HTTPParserError else {
            context.fireErrorCaught(error)
            return
        }
        guard !self.failed else { return }
        self.failed = true
        self.metrics.error(.badRequest)
        guard !self.responseInFlight else {
            context.close(promise: nil)
            return
        }
        let status: HTTPResponseStatus =
            parserError == .headerOverflow ? .requestHeaderFieldsTooLarge : .badRequest
        HTTPProxyHandler.writeStatusResponse(
            context: context,
            status: status,
            reason: status == .badRequest ? "bad request: \(parserError)" : "request header fields too large",
            keepAlive: false,
            wrap: self.wrapOutboundOut
        )
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch self.unwrapOutboundIn(data) {
        case .head(let head) where !(100..<200).contains(head.status.code) || head.status == .switchingProtocols:
            self.responseInFlight = true
        case .end:
            self.responseInFlight = false
        default:
            break
        }
        context.write(data, promise: promise)
    }
}
