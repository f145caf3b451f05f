import NIOCore
import NIOHTTP1

/// The exchange of the NIO engine.
typealias HTTPExchange = HTTPExchangeOf<UpstreamConnection>

/// One request/response exchange of a client connection, as a state machine: the proxy handler
/// (`HTTPProxyHandler`) feeds it what happens (a part of the request, an upstream attached, a part of the
/// response, the upstream closed, the timer) and does what it answers (send, hold, forward, retry, fail,
/// close), so that every decision is here and tested without a channel (`HTTPExchangeTests`), as NIO's own
/// protocol state machines are. (A final class, not a struct: held in the handler as a struct, every
/// event was a dynamic exclusivity check on the handler's stored property plus copies of the whole value,
/// 7,800 instructions more per request under perf/proxy/profile; as a class its fields are reached by
/// plain loads and stores, whose checks the optimiser removes. It is owned by one handler on one event
/// loop and never shared.)
///
/// The rules that keep one client's bytes from reaching another:
/// - the upstream connection goes back to the pool only when the response ended exactly where the bytes
///   read from it end (`responseEnd(atBoundary:)`), its request went up whole, and both sides said
///   keep-alive; anything else closes it;
/// - a 101 to a request that asked for no upgrade is refused (502), and its connection closed;
/// - a malformed response is a 502 of its own, never retried (the backend may have acted on the request).
///
/// Generic over the upstream connection it is attached to, so that both engines drive the same machine: NIO's
/// (`HTTPExchange`, with `UpstreamConnection`) and the epoll loops' (`HTTPLoopExchange`, with `HTTPLoopUpstream`).
final class HTTPExchangeOf<Upstream: AnyObject> {
    /// Tells this exchange from a later one of the same connection (a connect that completes late).
    let id: UInt64
    let head: HTTPHead
    /// The request head as it goes upstream (serialised once, sent again on a retry).
    let upstreamHead: ByteBuffer
    /// The request body goes up chunked (as it came); otherwise as it came, by Content-Length, or there is
    /// none.
    let chunkedRequest: Bool
    let isUpgrade: Bool
    let hash: UInt64
    /// The client connection carries another request after this one.
    var keepAlive: Bool
    /// A backend was asked for (at the head; for a buffered body, at its end or once it outgrew the buffer).
    var dispatched: Bool
    private(set) var bufferedBytes = 0
    /// Request body not sent yet (no upstream yet, or buffered), and the trailers of a request that ended.
    private(set) var pendingBody: [ByteBuffer] = []
    private(set) var pendingTrailers: ByteBuffer?
    /// The client sent `.end`; `.end` went upstream; body bytes went upstream; the head went upstream.
    private(set) var requestEnded = false
    private(set) var requestSent = false
    private(set) var bodyBytesSent = false
    private(set) var headSent = false
    var upstream: Upstream?
    /// How the response body goes to the client.
    private(set) var responseFraming = HTTPWire.Framing.raw
    private(set) var responseHeadSent = false
    private(set) var responseEnded = false
    /// The upstream connection may carry another request (the response said keep-alive, and nothing about
    /// this exchange makes it doubtful).
    private(set) var upstreamReusable = true
    /// The backends tried so far: the first inline (no allocation for a request that is not retried).
    private(set) var firstTried: BackendID?
    private(set) var moreTried: [BackendID] = []
    var pick: Pick?
    /// The current pick is still counted in flight by the balancer.
    var pickInFlight = false
    /// The response head reported success; told to the balancer with the end of the pick.
    var successPending = false
    /// Head and body bytes sent to the current attempt's backend and forwarded from it (chunk framing
    /// aside), for its per-endpoint counters and the route's when the pick ends.
    var tally = ByteTally()
    private(set) var retries = 0
    var inRetryBudget = false
    /// When the response head must have arrived (set once the request is sent).
    private(set) var responseDeadline: NIODeadline?
    var upstreamStarted = NIODeadline.uptimeNanoseconds(0)
    var connectTimedOut = false
    /// What `meshctl trace` sees of this request; nil unless it carries `x-mesh-trace`.
    var trace: TraceRecording?
    /// A 101 arrived for an upgrade request; the switch happens at its `.end` (the decoder's last part).
    private(set) var upgradeResponse: HTTPHead?

    init(id: UInt64, head: HTTPHead, upstreamHead: ByteBuffer, plan: HTTPRequestPolicy.Plan, hash: UInt64) {
        self.id = id
        self.head = head
        self.upstreamHead = upstreamHead
        self.chunkedRequest = head.body == .chunked
        self.isUpgrade = plan.isUpgrade
        self.hash = hash
        self.keepAlive = plan.keepAlive
        self.dispatched = !plan.bufferBody
        // An upgrade's connection is fresh and ends with the tunnel or the refusal.
        self.upstreamReusable = !plan.isUpgrade
    }

    var method: HTTPMethod { self.head.method }
    var clientVersion: HTTPVersion { self.head.version }

    /// Body bytes can go straight up (an upstream is attached and has the head).
    var canStreamBody: Bool { self.upstream != nil && self.headSent }

    var triedCount: Int { (self.firstTried == nil ? 0 : 1) + self.moreTried.count }

    var tried: [BackendID] {
        guard let first = self.firstTried else { return [] }
        return [first] + self.moreTried
    }

    func noteTried(_ id: BackendID) {
        if self.firstTried == nil { self.firstTried = id } else { self.moreTried.append(id) }
    }

    // MARK: the request

    enum BodyAction: Equatable {
        /// Send it up now.
        case send
        /// Keep it (`pendingBody`) until an upstream is attached.
        case hold
        /// Kept, and the buffer is full: pick a backend now and stream the rest.
        case dispatch
    }

    /// A part of the request body from the client.
    func requestBody(_ buffer: ByteBuffer, bufferLimit: Int) -> BodyAction {
        if self.canStreamBody {
            self.bodyBytesSent = self.bodyBytesSent || buffer.readableBytes > 0
            return .send
        }
        self.pendingBody.append(buffer)
        self.bufferedBytes += buffer.readableBytes
        if !self.dispatched && self.bufferedBytes > bufferLimit {
            self.dispatched = true
            return .dispatch
        }
        return .hold
    }

    enum EndAction: Equatable {
        /// Send the end up now; the response is awaited from `now` on.
        case send
        case hold
        /// The whole (buffered) request is in: pick a backend now.
        case dispatch
    }

    /// The end of the request from the client.
    func requestEnd(
        trailers: ByteBuffer?,
        now: @autoclosure () -> NIODeadline,
        responseTimeout: TimeAmount
    )
        -> EndAction
    {
        self.requestEnded = true
        if self.canStreamBody {
            self.requestSent = true
            self.responseDeadline = now() + responseTimeout
            return .send
        }
        self.pendingTrailers = trailers
        if !self.dispatched {
            self.dispatched = true
            return .dispatch
        }
        return .hold
    }

    /// What goes up on a connection just attached: the head, the body held so far and, if the request
    /// ended, its end.
    struct Sending {
        var body: [ByteBuffer]
        var end: Bool
        var trailers: ByteBuffer?
    }

    /// An upstream connection was attached (pooled or new); `now`, when the caller just took the time.
    func attach(
        _ connection: Upstream,
        now: @autoclosure () -> NIODeadline,
        responseTimeout: TimeAmount
    ) -> Sending {
        self.upstream = connection
        self.headSent = true
        let body = self.pendingBody
        if !body.isEmpty {
            self.pendingBody = []
            self.bodyBytesSent = self.bodyBytesSent || body.contains { $0.readableBytes > 0 }
        }
        var sending = Sending(body: body, end: false, trailers: nil)
        if self.requestEnded {
            sending.end = true
            sending.trailers = self.pendingTrailers
            self.requestSent = true
            self.responseDeadline = now() + responseTimeout
        }
        return sending
    }

    // MARK: the response

    enum ResponseHeadAction {
        /// An interim (1xx) response for the client: these bytes (edited), or nothing for an HTTP/1.0 client.
        case interim(ByteBuffer?)
        /// A 101 to an upgrade request: the switch happens at its end.
        case awaitUpgrade
        /// A response the client must not get: answer 502 with this reason, close the upstream.
        case refuse(String)
        /// The final response head, edited for the client.
        case forward(ByteBuffer)
    }

    /// A response head from the upstream.
    func responseHead(_ response: HTTPHead, allocator: ByteBufferAllocator) -> ResponseHeadAction {
        if response.status == 101 {
            guard self.isUpgrade else {
                self.upstreamReusable = false
                return .refuse("upstream switched protocols unasked (101 to a request without an upgrade)")
            }
            self.responseDeadline = nil
            self.upgradeResponse = response
            return .awaitUpgrade
        }
        if response.status < 200 {
            // 100 Continue and friends: passed on (not to an HTTP/1.0 client), the final response follows.
            guard self.clientVersion != .http1_0 else { return .interim(nil) }
            var edits = HTTPWire.ResponseEdits(hopByHop: HTTPWire.HopByHop(response))
            edits.dropTransferEncoding = true
            return .interim(
                HTTPWire.responseHead(version: .http1_1, response, edits: edits, allocator: allocator)
            )
        }
        self.responseDeadline = nil
        if !response.isKeepAlive || (response.version == .http1_0 && response.hasTransferEncoding) {
            // (An HTTP/1.0 message with Transfer-Encoding is framed faultily: RFC 9112 6.1, close after it.)
            self.upstreamReusable = false
        }
        self.responseHeadSent = true
        return .forward(self.clientResponseHead(response, allocator: allocator))
    }

    /// A part of the response body: how it goes to the client (`.none`: it is dropped).
    func responseBodyFraming() -> HTTPWire.Framing? {
        guard self.upgradeResponse == nil, self.responseHeadSent else { return nil }
        return self.responseFraming
    }

    enum ResponseEndAction: Equatable {
        /// The end of an interim response: the final one follows.
        case interim
        /// The 101 of an upgrade ended: forward it and make both connections a tunnel.
        case upgrade
        /// The response ended before the request did: end both connections (`lastChunk`: end the chunked
        /// body first).
        case closeBoth(lastChunk: Bool)
        /// The response ended (`lastChunk` as above); the exchange is done when the request is.
        case finish(lastChunk: Bool)
    }

    /// The end of the response; `atBoundary`: the upstream's bytes ended exactly with it (the decoder holds
    /// nothing behind it, and is not paused).
    func responseEnd(atBoundary: Bool) -> ResponseEndAction {
        if self.upgradeResponse != nil { return .upgrade }
        guard self.responseHeadSent else { return .interim }
        self.responseEnded = true
        if !atBoundary { self.upstreamReusable = false }
        let lastChunk = self.responseFraming == .chunked
        if !self.requestEnded {
            self.upstreamReusable = false
            return .closeBoth(lastChunk: lastChunk)
        }
        return .finish(lastChunk: lastChunk)
    }

    /// Both the request and the response have ended.
    var isDone: Bool { self.requestEnded && self.responseEnded }

    /// The upstream connection goes back to the pool (rather than being closed) at the end.
    var upstreamReturnsToPool: Bool { self.upstreamReusable && self.requestSent && self.responseEnded }

    enum UpstreamClosedAction: Equatable {
        /// Nothing to do (the response had ended).
        case none
        /// Part of the response is out: all that can be done is to end the client connection too.
        case closeClient
        /// Try another backend if allowed, else answer this.
        case retry(HTTPResponseStatus, String)
        case fail(HTTPResponseStatus, String)
    }

    /// The upstream connection closed (`error`: why, when known) before the exchange was done.
    func upstreamClosed(error: (any Error)?) -> UpstreamClosedAction {
        self.upstream = nil
        self.responseDeadline = nil
        if self.responseEnded { return .none }
        if self.responseHeadSent { return .closeClient }
        if let error = error as? HTTPParseError {
            // The backend answered, badly: it may have acted on the request, which is not sent again.
            return .fail(.badGateway, "invalid upstream response: \(error)")
        }
        let retryable = HTTPProxy.isIdempotent(self.method) && !self.bodyBytesSent && !self.isUpgrade
        return retryable
            ? .retry(.badGateway, "upstream connection reset") : .fail(.badGateway, "upstream connection reset")
    }

    /// Another attempt is allowed by the counts (the retry budget is the caller's).
    func mayRetry(connectAttempts: Int, maxRetries: Int) -> Bool {
        self.triedCount < max(connectAttempts, 1 + maxRetries) && self.retries < maxRetries
    }

    /// Starts another attempt: nothing went up yet.
    func retry() {
        self.retries += 1
        self.upstream = nil
        self.headSent = false
        self.requestSent = false
    }

    // MARK: the proxy's own answers and the timer

    enum FailAction: Equatable {
        /// A response is under way: close the client connection.
        case close
        /// Answer, keep the connection (`discardRest`: the rest of the request is read and dropped first).
        case answer(keepAlive: Bool, discardRest: Bool)
    }

    /// The proxy answers the exchange itself (502/503/504): the rest of the request is read and dropped
    /// when it is small; a large one would cost more than a new connection: close instead.
    func fail() -> FailAction {
        self.upstream = nil
        if self.responseHeadSent { return .close }
        let smallRest: Bool
        switch self.head.body {
        case .none: smallRest = true
        case .length(let length): smallRest = length - self.bufferedBytes <= 64 * 1024
        case .chunked, .untilClose: smallRest = false
        }
        let keepAlive = self.keepAlive && (self.requestEnded || smallRest)
        self.responseHeadSent = true
        self.responseEnded = true
        return .answer(keepAlive: keepAlive, discardRest: keepAlive && !self.requestEnded)
    }

    enum Timeout: Equatable {
        /// The response head did not come in time: 504.
        case response
        /// The client stopped sending the request body: close.
        case requestBody
        /// The upstream stopped sending the response body: close both.
        case responseBody
    }

    /// What the connection timer finds at `now`, given when the client and the upstream were last read.
    func timeout(
        now: NIODeadline,
        lastClientRead: NIODeadline,
        lastUpstreamRead: NIODeadline,
        requestBodyTimeout: TimeAmount,
        responseBodyTimeout: TimeAmount
    ) -> Timeout? {
        if let deadline = self.responseDeadline, now >= deadline, !self.responseHeadSent { return .response }
        if !self.requestEnded, now - lastClientRead >= requestBodyTimeout { return .requestBody }
        if self.responseHeadSent, !self.responseEnded, self.upgradeResponse == nil,
            now - lastUpstreamRead >= responseBodyTimeout
        {
            return .responseBody
        }
        return nil
    }

    /// The final response head as it goes to the client, and how its body will follow (`responseFraming`):
    /// in the client's HTTP version, without hop-by-hop headers, with one canonical Content-Length, with
    /// `connection: close` when the client connection ends after it; a body delimited by the end of the
    /// upstream connection is chunked for an HTTP/1.1 client (which keeps its connection), an HTTP/1.0
    /// client gets bodies unchunked and the connection closed behind them.
    private func clientResponseHead(_ response: HTTPHead, allocator: ByteBufferAllocator) -> ByteBuffer {
        var edits = HTTPWire.ResponseEdits(hopByHop: HTTPWire.HopByHop(response))
        let http10 = self.clientVersion == .http1_0
        var framing = HTTPWire.Framing.raw
        switch response.body {
        case .none:
            // (A response to HEAD, or a 304, may say how a full body would be framed: Transfer-Encoding is left
            // out all the same; Content-Length stays.)
            framing = .none
            edits.dropTransferEncoding = true
        case .length(let length):
            edits.dropTransferEncoding = http10
            if !response.contentLengthCanonical { edits.contentLength = length }
        case .chunked:
            if http10 {
                edits.dropTransferEncoding = true
                self.keepAlive = false
            } else {
                framing = .chunked
            }
        case .untilClose(let transferCoded):
            if http10 || transferCoded {
                // (An HTTP/1.1 client gets the codings as they are, and the end of the connection as their end.)
                edits.dropTransferEncoding = http10
                self.keepAlive = false
            } else {
                framing = .chunked
                edits.addChunked = true
            }
        }
        if response.body == .none, !response.contentLengthCanonical, let length = response.contentLength {
            // (A HEAD's or 304's Content-Length, made canonical too; a conflicting one was refused.)
            edits.contentLength = length
        }
        self.responseFraming = framing
        if self.isUpgrade { self.keepAlive = false }
        if !self.keepAlive {
            edits.connectionClose = true
        } else if http10 {
            edits.connectionClose = false
        }
        return HTTPWire.responseHead(
            version: http10 ? .http1_0 : .http1_1,
            response,
            edits: edits,
            allocator: allocator,
            reserving: framing == .none ? 0 : 512
        )
    }
}
