import Logging
import MeshCore
import NIOCore
import NIOHTTP1
import NIOPosix

/// The L7 HTTP/1.1 proxy for `http` routes.
enum HTTPProxy {
    /// Sets up one accepted client connection (inside the child channel initialiser, on its loop): the
    /// request decoder (`HTTPParser`) with the header limits, and the proxy handler, which writes responses as bytes
    /// it serialises itself (`HTTPWire`), answers parse errors (400/431), holds pipelined requests back until
    /// the one in flight is answered, and quiesces. Two handlers only: every handler between the socket and
    /// the proxy costs a hop (and a dynamic cast of the boxed message) for every part of every message.
    static func initialize(channel: any Channel, handle: RouteHandle, environment: ProxyEnvironment) throws {
        let configuration = environment.configuration.http
        let decoder = HTTPDecodingHandler(
            requestLimits: HTTPParser.Limits(
                headBytes: configuration.maxHeaderListSize,
                fieldBytes: configuration.maxHeaderFieldSize
            )
        )
        let proxy = HTTPProxyHandler(handle: handle, environment: environment, decoder: decoder)
        decoder.receiver = proxy
        let sync = channel.pipeline.syncOperations
        try sync.addHandler(decoder)
        try sync.addHandler(proxy)
        handle.connectionOpened()
        channel.closeFuture.whenComplete { _ in handle.connectionClosed() }
    }

    static func isIdempotent(_ method: HTTPMethod) -> Bool {
        switch method {
        case .GET, .HEAD, .OPTIONS, .PUT, .DELETE, .TRACE: return true
        default: return false
        }
    }
}

/// The client side of one HTTP connection: takes each request, picks a backend for it, borrows a pooled
/// upstream connection of this event loop (or opens one), streams the request body up and the response
/// body down with back-pressure both ways, retries what may be retried, and answers 502/503/504 itself.
final class HTTPProxyHandler: ChannelInboundHandler, RemovableChannelHandler, HTTPPartReceiver {
    /// (Parts come from the decoder by direct call, `receive(_:)`; bytes only after an upgrade, for the glue.)
    /// Inbound only: NIO's outbound operations (every autoRead `read()`, writes) pass it by, no hop each;
    /// reading is held back by turning autoRead off (`updateReading`).
    typealias InboundIn = ByteBuffer

    /// One request/response exchange.
    private final class Exchange {
        /// The request head as the client sent it.
        let head: HTTPHead
        /// The request head as it goes upstream (serialised once, sent again on a retry).
        let upstreamHead: ByteBuffer
        /// The request body goes up chunked (as it came: the parser takes a request with Transfer-Encoding
        /// only when its final coding is chunked); otherwise as it came, by Content-Length, or there is none.
        let chunkedRequest: Bool
        /// How the response body goes to the client.
        var responseFraming = HTTPWire.Framing.raw
        let method: HTTPMethod
        let clientVersion: HTTPVersion
        var keepAlive: Bool
        let isUpgrade: Bool
        let hash: UInt64
        var pendingBody: [ByteBuffer] = []
        /// The request's trailers, when it ended before it could be sent.
        var pendingTrailers: ByteBuffer?
        /// The client sent `.end`.
        var requestEnded = false
        /// `.end` went upstream.
        var requestSent = false
        var bodyBytesSent = false
        var headSent = false
        var responseHeadSent = false
        var responseEnded = false
        var upstreamKeepAlive = true
        /// The backends tried so far: the first inline (no allocation for a request that is not retried).
        var firstTried: BackendID?
        var moreTried: [BackendID] = []
        var pick: Pick?
        /// The current pick is still counted in flight by the balancer.
        var pickInFlight = false
        /// The response head reported success; told to the balancer with the end of the pick (one lock, not
        /// two, per request).
        var successPending = false
        var retries = 0
        var inRetryBudget = false
        var upstream: UpstreamConnection?
        /// When the response head must have arrived (set once the request is sent).
        var responseDeadline: NIODeadline?
        var upstreamStarted = NIODeadline.uptimeNanoseconds(0)
        var connectTimedOut = false
        /// A 101 arrived for an upgrade request; the switch happens at its `.end` (the decoder's last part).
        var upgradeResponse: HTTPHead?

        init(
            head: HTTPHead,
            upstreamHead: ByteBuffer,
            chunkedRequest: Bool,
            keepAlive: Bool,
            isUpgrade: Bool,
            hash: UInt64
        ) {
            self.head = head
            self.upstreamHead = upstreamHead
            self.chunkedRequest = chunkedRequest
            self.method = head.method
            self.clientVersion = head.version
            self.keepAlive = keepAlive
            self.isUpgrade = isUpgrade
            self.hash = hash
        }

        var canStreamBody: Bool { self.upstream != nil && self.headSent }

        var triedCount: Int { (self.firstTried == nil ? 0 : 1) + self.moreTried.count }

        var tried: [BackendID] {
            guard let first = self.firstTried else { return [] }
            return [first] + self.moreTried
        }

        func noteTried(_ id: BackendID) {
            if self.firstTried == nil { self.firstTried = id } else { self.moreTried.append(id) }
        }
    }

    /// What arrived from the client behind a request still in flight (pipelining), replayed in order once it
    /// is answered.
    private enum Queued {
        case part(HTTPPart)
        case inputClosed
        case error(any Error)
    }

    private enum State {
        case idle
        case active(Exchange)
        /// Answered before the request ended: the rest of its (small) body is read and dropped.
        case discarding
        case upgraded
        case closed
    }

    private let handle: RouteHandle
    private let environment: ProxyEnvironment
    private let decoder: HTTPDecodingHandler
    private var state: State = .idle
    private var context: ChannelHandlerContext?
    /// autoRead is off: the client is not read while `mayRead` is false.
    private var readingPaused = false
    private var upstreamNeedsFlush = false
    /// One timer per connection, re-armed every `tick` (a quarter of the shortest timeout): it checks the
    /// deadlines below, so no timer is scheduled or cancelled per request.
    private var timer: Scheduled<Void>?
    /// Since when the connection has had no exchange (connect, or the end of the last response), as seen by
    /// the connection timer: the end of an exchange only counts (`exchangesEnded`), and the timer's next tick
    /// takes the time, so a request costs no clock read for it.
    private var idleSince = NIODeadline.now()
    private var exchangesEnded = 0
    private var exchangesEndedSeen = 0
    /// The last bytes from the client (for a stalled request body), as seen by the timer: reads are counted,
    /// the timer's tick takes the time when the count moved.
    private var lastClientRead = NIODeadline.now()
    private var clientReads = 0
    private var clientReadsSeen = 0
    private var servedRequests = 0
    /// Response bytes for the client (a head, the body and the end behind it go out as one write).
    private var clientOut = HTTPOutbox()
    /// The route's instruments and this loop's upstream pool, looked up once per connection.
    private lazy var metrics: RouteMetrics = self.handle.metrics
    private var pool: LoopPool?
    /// The channel's allocator, taken once (`context.channel.allocator` is an existential call per use).
    private var allocator = ByteBufferAllocator()
    private var rng = FastRandom()
    private var clientIP: IPAddress?
    /// The client IP as text, for X-Forwarded-For (made once per connection).
    private var clientIPText: String?
    /// Pipelined requests (and a half-close or parse error behind them); reads are held while there are any.
    private var queued: [Queued] = []
    private var replaying = false
    /// Asked to finish (a route removed, shutdown): the exchange in flight is answered with
    /// `connection: close`, then the connection closes.
    private var quiescing = false

    init(handle: RouteHandle, environment: ProxyEnvironment, decoder: HTTPDecodingHandler) {
        self.handle = handle
        self.environment = environment
        self.decoder = decoder
    }

    private var configuration: HTTPConfiguration { self.environment.configuration.http }

    var clientIsWritable: Bool { self.context?.channel.isWritable ?? false }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.pool = self.environment.pools.pool(for: context.eventLoop)
        self.allocator = context.channel.allocator
        self.clientIP = context.channel.remoteAddress.flatMap(IPAddress.init(socketAddress:))
        self.clientIPText = self.clientIP.map { "\($0)" }
        self.armTimer()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        if case .active(let exchange) = self.state {
            self.state = .closed
            self.abandon(exchange)
        }
        self.state = .closed
        self.queued.removeAll()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard error is HTTPParseError else {
            // A reset or the like: the connection is over.
            context.close(promise: nil)
            return
        }
        if !self.queued.isEmpty {
            self.queued.append(.error(error))
            return
        }
        if case .active(let exchange) = self.state, exchange.requestEnded {
            // Garbage behind a request in flight (pipelined): answered once that request is.
            self.queued.append(.error(error))
            return
        }
        self.answerParseError(error, context: context)
    }

    /// 431 when the head is over the size limits, 400 otherwise, always with `connection: close`, then closes;
    /// if a response is already under way it just closes.
    private func answerParseError(_ error: any Error, context: ChannelHandlerContext) {
        self.metrics.error(.badRequest)
        self.queued.removeAll()
        var responseUnderWay = false
        if case .active(let exchange) = self.state {
            responseUnderWay = exchange.responseHeadSent && !exchange.responseEnded
            self.state = .closed
            self.abandon(exchange)
        }
        self.state = .closed
        guard !responseUnderWay, let parserError = error as? HTTPParseError else {
            context.close(promise: nil)
            return
        }
        let status: HTTPResponseStatus = parserError.isTooLarge ? .requestHeaderFieldsTooLarge : .badRequest
        Self.writeStatusResponse(
            context: context,
            status: status,
            reason: status == .badRequest ? "bad request: \(parserError)" : "request header fields too large",
            keepAlive: false
        )
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            if self.queued.isEmpty {
                self.inputClosed(context: context)
            } else {
                self.queued.append(.inputClosed)
            }
        } else if event is ChannelShouldQuiesceEvent {
            self.quiesce(context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// The client is done sending. With nothing in flight, close; otherwise finish the exchange first.
    private func inputClosed(context: ChannelHandlerContext) {
        switch self.state {
        case .idle, .discarding: context.close(promise: nil)
        case .active(let exchange): exchange.keepAlive = false
        case .upgraded, .closed: break
        }
    }

    /// Finish the request in flight (its response says `connection: close`), drop pipelined ones, close.
    private func quiesce(context: ChannelHandlerContext) {
        self.quiescing = true
        self.queued.removeAll()
        switch self.state {
        case .idle:
            self.state = .closed
            context.close(promise: nil)
        case .active(let exchange):
            exchange.keepAlive = false
        case .discarding, .upgraded, .closed:
            break
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, case .active(let exchange) = self.state {
            exchange.upstream?.handler.resumeRead()
        }
        context.fireChannelWritabilityChanged()
    }

    /// Whether the client may be read: not while pipelined requests wait (they are taken one at a time), nor
    /// while a request body has nowhere to go (no upstream yet, or it pushes back).
    private var mayRead: Bool {
        if !self.queued.isEmpty { return false }
        if case .active(let exchange) = self.state, !exchange.requestEnded,
            !(exchange.canStreamBody && exchange.upstream!.handler.isWritable)
        {
            return false
        }
        return true
    }

    /// Turns autoRead off or on to match `mayRead`: at the end of each read burst (before NIO would read
    /// again), and when something that held reading back has changed. A change costs an `epoll_ctl`; the usual
    /// request changes nothing.
    private func updateReading() {
        let pause = !self.mayRead
        guard pause != self.readingPaused, let context = self.context else { return }
        self.readingPaused = pause
        try? context.channel.syncOptions?.setOption(.autoRead, value: !pause)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireChannelRead(data)
    }

    /// A part of a request, from the decoder.
    func receive(_ part: HTTPPart) {
        guard let context = self.context else { return }
        guard self.queued.isEmpty else {
            self.queued.append(.part(part))
            return
        }
        self.handle(part, context: context)
    }

    /// (Nested switches rather than one over a (state, part) tuple: the tuple copied both, head included.)
    private func handle(_ part: HTTPPart, context: ChannelHandlerContext) {
        switch part {
        case .head(let head):
            switch self.state {
            case .idle:
                self.start(head, context: context)
            case .active:
                // The client pipelined the next request: it waits until this one is answered.
                self.queued.append(.part(part))
            case .closed, .upgraded:
                break
            case .discarding:
                // The decoder delivers head, body..., end: anything else is a bug: close.
                context.close(promise: nil)
            }
        case .body(let buffer):
            switch self.state {
            case .active(let exchange):
                if exchange.canStreamBody {
                    let upstream = exchange.upstream!.handler
                    upstream.sendBody(buffer, chunked: exchange.chunkedRequest)
                    exchange.bodyBytesSent = exchange.bodyBytesSent || buffer.readableBytes > 0
                    self.flushUpstreamSoon(upstream)
                } else {
                    exchange.pendingBody.append(buffer)
                }
            case .discarding, .closed, .upgraded:
                break
            case .idle:
                context.close(promise: nil)
            }
        case .end(let trailers):
            switch self.state {
            case .active(let exchange):
                exchange.requestEnded = true
                if exchange.canStreamBody {
                    let upstream = exchange.upstream!.handler
                    upstream.sendEnd(trailers: trailers, chunked: exchange.chunkedRequest)
                    exchange.requestSent = true
                    self.flushUpstreamSoon(upstream)
                    exchange.responseDeadline = .now() + self.configuration.upstreamResponseTimeout
                } else {
                    exchange.pendingTrailers = trailers
                }
                self.finishIfDone(exchange)
            case .discarding:
                self.becomeIdle()
            case .closed, .upgraded:
                break
            case .idle:
                context.close(promise: nil)
            }
        }
    }

    /// Takes what was queued behind the exchange that just ended, in order, until another exchange is in
    /// flight; then lets the client's reads go on.
    private func replayQueued() {
        guard !self.replaying, let context = self.context else { return }
        self.replaying = true
        defer { self.replaying = false }
        while let next = self.queued.first {
            switch (self.state, next) {
            case (.closed, _), (.upgraded, _):
                self.queued.removeAll()
                return
            case (.active, .part(.head)), (.active, .error), (.discarding, .part(.head)), (.discarding, .error):
                return
            case (_, .part(let part)):
                self.queued.removeFirst()
                self.handle(part, context: context)
            case (_, .inputClosed):
                self.queued.removeFirst()
                self.inputClosed(context: context)
            case (_, .error(let error)):
                self.queued.removeFirst()
                self.answerParseError(error, context: context)
            }
        }
        self.updateReading()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.readComplete()
        context.fireChannelReadComplete()
    }

    /// The end of a client read burst (from the decoder).
    func readComplete() {
        self.clientReads &+= 1
        if self.upstreamNeedsFlush {
            self.upstreamNeedsFlush = false
            if case .active(let exchange) = self.state { exchange.upstream?.handler.flush() }
        }
        self.updateReading()
    }

    /// What was just sent upstream goes out at the end of the client's read burst when a part it brought
    /// caused it (once for the head, body and end the burst brought), at once otherwise (a connection that
    /// just opened, a pipelined request replayed when the response before it ended).
    private func flushUpstreamSoon(_ upstream: UpstreamHTTPHandler) {
        if self.decoder.isDecodingRead {
            self.upstreamNeedsFlush = true
        } else {
            upstream.flush()
        }
    }

    // MARK: request

    private func start(_ requestHead: HTTPHead, context: ChannelHandlerContext) {
        if case .CONNECT = requestHead.method {
            // A tunnel request: not what a service route is for (and what follows it is not HTTP).
            self.metrics.error(.badRequest)
            self.state = .closed
            Self.writeStatusResponse(
                context: context,
                status: .notImplemented,
                reason: "CONNECT is not supported",
                keepAlive: false
            )
            return
        }
        self.servedRequests += 1
        self.handle.stats.requests.add(1, ordering: .relaxed)
        self.handle.stats.activeRequests.add(1, ordering: .relaxed)
        self.metrics.requests.increment()

        // The parser noted every field the proxy looks at. The head goes upstream as HTTP/1.1, without
        // hop-by-hop fields, with the upgrade's own, the client's address in X-Forwarded-For and a request id
        // added: serialised here, once.
        let isUpgrade = requestHead.isUpgradeRequest
        var edits = HTTPWire.RequestEdits()
        if requestHead.hasHopByHop { edits.hopByHop = HTTPWire.HopByHop(requestHead) }
        if isUpgrade { edits.upgrade = requestHead.upgradeField }
        if self.configuration.addForwardedFor, let ip = self.clientIPText {
            edits.forwardedFor = ip
            edits.priorForwardedFor = requestHead.forwardedForField
        }
        if self.configuration.addRequestID, requestHead.requestIDField == nil {
            edits.requestID = (self.rng.next(), self.rng.next())
        }
        let exchange = Exchange(
            head: requestHead,
            upstreamHead: HTTPWire.requestHead(requestHead, edits: edits, allocator: self.allocator),
            chunkedRequest: requestHead.body == .chunked,
            keepAlive: requestHead.isKeepAlive && !isUpgrade,
            isUpgrade: isUpgrade,
            hash: self.hashKey(requestHead)
        )
        self.state = .active(exchange)
        self.dispatch(exchange)
    }

    private func hashKey(_ head: HTTPHead) -> UInt64 {
        guard self.handle.hashesRequests, case .consistentHash(let key) = self.handle.policy else { return 0 }
        switch key {
        case .header(let name):
            if let value = head.first(name: name) { return StableHash.hash(value) }
        case .cookie(let name):
            for header in head.values(name: "cookie") {
                for pair in header.split(separator: ";") {
                    let kv = pair.split(separator: "=", maxSplits: 1)
                    if kv.count == 2, kv[0].trimmingSpaces == name[...] { return StableHash.hash(kv[1].trimmingSpaces) }
                }
            }
        case .sourceIP:
            break
        }
        return self.clientIP.map { StableHash.hash($0) } ?? 0
    }

    /// Picks a backend and gets a connection to it (pooled or new).
    private func dispatch(_ exchange: Exchange) {
        guard let context = self.context else { return }
        guard let pick = self.handle.pick(hash: exchange.hash, excluding: exchange.tried) else {
            if exchange.firstTried == nil {
                self.metrics.error(.noBackend)
                self.fail(exchange, .serviceUnavailable, "no healthy upstream")
            } else if exchange.connectTimedOut {
                self.fail(exchange, .gatewayTimeout, "upstream connect timeout")
            } else {
                self.fail(exchange, .badGateway, "upstream connect error")
            }
            return
        }
        exchange.noteTried(pick.id)
        exchange.pick = pick
        exchange.pickInFlight = true
        exchange.upstreamStarted = .now()
        let loop = context.eventLoop
        guard let pool = self.pool else {
            self.fail(exchange, .serviceUnavailable, "no upstream pool")
            return
        }
        if !exchange.isUpgrade, let connection = pool.takeIdle(pick.id) {
            self.attach(exchange, connection, now: exchange.upstreamStarted)
            return
        }
        guard pool.reserve(pick.id) else {
            self.finishPick(exchange, .neutral)
            self.metrics.error(.overflow)
            self.fail(exchange, .serviceUnavailable, "upstream connection limit")
            return
        }
        pool.connect(to: pick.address, backend: pick.id, on: loop).assumeIsolated().whenComplete { result in
            switch result {
            case .success(let connection):
                guard case .active(let current) = self.state, current === exchange, exchange.pick?.id == pick.id else {
                    // The client left meanwhile: keep the connection for the next one.
                    pool.release(connection)
                    return
                }
                self.attach(exchange, connection, now: nil)
            case .failure(let error):
                pool.forget(pick.id)
                self.metrics.error(.connectFailure)
                self.finishPick(exchange, .failure)
                if case .active(let current) = self.state, current === exchange {
                    if let e = error as? ChannelError, case .connectTimeout = e { exchange.connectTimedOut = true }
                    self.environment.logger.debug(
                        "upstream connect failed",
                        metadata: ["service": "\(self.handle.service)", "backend": "\(pick.id)", "error": "\(error)"]
                    )
                    self.retryOrFail(
                        exchange,
                        status: exchange.connectTimedOut ? .gatewayTimeout : .badGateway,
                        reason: exchange.connectTimedOut ? "upstream connect timeout" : "upstream connect error"
                    )
                }
            }
        }
    }

    /// `now`: the time, when the caller just took it.
    private func attach(_ exchange: Exchange, _ connection: UpstreamConnection, now: NIODeadline?) {
        exchange.upstream = connection
        connection.handler.owner = self
        let handler = connection.handler
        handler.sendHead(exchange.upstreamHead, method: exchange.method)
        exchange.headSent = true
        for buffer in exchange.pendingBody {
            handler.sendBody(buffer, chunked: exchange.chunkedRequest)
            exchange.bodyBytesSent = exchange.bodyBytesSent || buffer.readableBytes > 0
        }
        exchange.pendingBody = []
        if exchange.requestEnded {
            handler.sendEnd(trailers: exchange.pendingTrailers, chunked: exchange.chunkedRequest)
            exchange.requestSent = true
            exchange.responseDeadline = (now ?? .now()) + self.configuration.upstreamResponseTimeout
        }
        self.flushUpstreamSoon(handler)
        self.updateReading()
    }

    /// Retries on another backend when allowed (connect failures always may; an upstream reset before any
    /// response only for idempotent requests whose body has not been sent), within the retry budget.
    private func retryOrFail(_ exchange: Exchange, status: HTTPResponseStatus, reason: String) {
        let attemptsLeft =
            exchange.triedCount
            < max(self.environment.configuration.connectAttempts, 1 + self.configuration.maxRetries)
        if attemptsLeft, exchange.retries < self.configuration.maxRetries, self.takeRetryBudget(exchange) {
            exchange.retries += 1
            self.handle.stats.retries.add(1, ordering: .relaxed)
            exchange.upstream = nil
            exchange.headSent = false
            exchange.requestSent = false
            self.dispatch(exchange)
        } else {
            self.fail(exchange, status, reason)
        }
    }

    private func takeRetryBudget(_ exchange: Exchange) -> Bool {
        if exchange.inRetryBudget { return true }
        let active = self.handle.stats.activeRequests.load(ordering: .relaxed)
        let retrying = self.handle.stats.activeRetries.load(ordering: .relaxed)
        let budget = max(
            self.configuration.minRetryConcurrency,
            Int(Double(active) * self.configuration.retryBudgetPercent / 100)
        )
        guard retrying < budget else { return false }
        self.handle.stats.activeRetries.add(1, ordering: .relaxed)
        exchange.inRetryBudget = true
        return true
    }

    // MARK: response (called by UpstreamHTTPHandler)

    func upstreamRead(_ part: HTTPPart, from connection: UpstreamConnection) {
        guard case .active(let exchange) = self.state, exchange.upstream === connection, let context = self.context
        else { return }
        switch part {
        case .head(let response) where response.status < 200 && response.status != 101:
            // 100 Continue and friends: passed on (not to an HTTP/1.0 client), the final response follows.
            guard exchange.clientVersion != .http1_0 else { return }
            Self.writeUnedited(response, context: context)
        case .head(let response):
            exchange.responseDeadline = nil
            self.metrics.upstreamLatency.recordNanoseconds(
                (NIODeadline.now() - exchange.upstreamStarted).nanoseconds
            )
            let failed = response.status >= 500 && self.environment.configuration.outlier.countHTTP5xx
            if let pick = exchange.pick {
                if failed || exchange.isUpgrade || !exchange.pickInFlight {
                    self.handle.report(pick, outcome: failed ? .failure : .success)
                } else {
                    exchange.successPending = true
                }
            }
            if exchange.isUpgrade && response.status == 101 {
                exchange.upgradeResponse = response
                return
            }
            exchange.upstreamKeepAlive = response.isKeepAlive
            let head = self.clientResponseHead(response, exchange: exchange, allocator: self.allocator)
            exchange.responseHeadSent = true
            self.clientOut.queue(head, context: context)
        case .body(let buffer):
            guard exchange.upgradeResponse == nil, exchange.responseHeadSent else { return }
            switch exchange.responseFraming {
            case .raw: self.clientOut.queue(buffer, context: context)
            case .chunked: self.clientOut.queueChunk(buffer, context: context)
            case .none: break
            }
        case .end(let trailers):
            guard exchange.responseHeadSent || exchange.upgradeResponse != nil else {
                // The end of an interim (1xx) response: the final one follows.
                return
            }
            if let response = exchange.upgradeResponse {
                self.upgrade(exchange, response: response, context: context)
                return
            }
            exchange.responseEnded = true
            if exchange.responseFraming == .chunked {
                self.clientOut.queueLastChunk(trailers: trailers, context: context)
            }
            if !exchange.requestEnded {
                // Answered before the request was fully sent: neither side can be reused, and the rest of the
                // request has nowhere to go. End both.
                self.clientOut.write(context: context)
                let done = context.writeAndFlush(NIOAny(context.channel.allocator.buffer(capacity: 0)))
                self.endAccounting(exchange)
                self.finishPick(exchange, .neutral)
                exchange.upstream = nil
                connection.handler.owner = nil
                connection.channel.close(promise: nil)
                self.state = .closed
                done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
                return
            }
            self.clientOut.flush(context: context)
            self.finishIfDone(exchange)
        }
    }

    /// The final response head as it goes to the client, and how its body will follow
    /// (`exchange.responseFraming`): in the client's HTTP version, without hop-by-hop headers, with
    /// `connection: close` when the client connection ends after it; a body delimited by the end of the
    /// upstream connection is chunked for an HTTP/1.1 client (which keeps its connection), an HTTP/1.0
    /// client gets bodies unchunked and the connection closed behind them.
    private func clientResponseHead(
        _ response: HTTPHead,
        exchange: Exchange,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var edits = HTTPWire.ResponseEdits(hopByHop: HTTPWire.HopByHop(response))
        let http10 = exchange.clientVersion == .http1_0
        var framing = HTTPWire.Framing.raw
        switch response.body {
        case .none:
            // (A response to HEAD, or a 304, may say how a full body would be framed: Transfer-Encoding is left
            // out all the same; Content-Length stays.)
            framing = .none
            edits.dropTransferEncoding = true
        case .length:
            edits.dropTransferEncoding = http10
        case .chunked:
            if http10 {
                edits.dropTransferEncoding = true
                exchange.keepAlive = false
            } else {
                framing = .chunked
            }
        case .untilClose(let transferCoded):
            if http10 || transferCoded {
                // (An HTTP/1.1 client gets the codings as they are, and the end of the connection as their end.)
                edits.dropTransferEncoding = http10
                exchange.keepAlive = false
            } else {
                framing = .chunked
                edits.addChunked = true
            }
        }
        exchange.responseFraming = framing
        if exchange.isUpgrade { exchange.keepAlive = false }
        if !exchange.keepAlive {
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

    /// The end of an upstream read burst: what it brought for the client goes out now (a response that ended
    /// in it went out with its end already).
    func upstreamReadComplete() {
        guard let context = self.context, self.clientOut.needsFlush else { return }
        self.clientOut.flush(context: context)
    }

    func upstreamBecameWritable() {
        self.updateReading()
    }

    func upstreamClosed(_ connection: UpstreamConnection, error: (any Error)?) {
        guard case .active(let exchange) = self.state, exchange.upstream === connection else { return }
        exchange.upstream = nil
        exchange.responseDeadline = nil
        if exchange.responseEnded { return }
        self.finishPick(exchange, .failure)
        self.metrics.error(.reset)
        if exchange.responseHeadSent {
            // Part of the response is out: all that can be done is to end the client connection too.
            self.context?.close(promise: nil)
            return
        }
        let retryable = HTTPProxy.isIdempotent(exchange.method) && !exchange.bodyBytesSent && !exchange.isUpgrade
        if retryable {
            self.retryOrFail(exchange, status: .badGateway, reason: "upstream connection reset")
        } else {
            self.fail(exchange, .badGateway, "upstream connection reset")
        }
    }

    // MARK: endings

    private func finishPick(_ exchange: Exchange, _ outcome: LoadBalancer.Outcome) {
        guard exchange.pickInFlight, let pick = exchange.pick else { return }
        exchange.pickInFlight = false
        if exchange.successPending {
            exchange.successPending = false
            if outcome == .neutral {
                // The usual end of an exchange: the head's success and the end in one call.
                self.handle.finish(pick, outcome: .success)
                return
            }
            self.handle.report(pick, outcome: .success)
        }
        self.handle.finish(pick, outcome: outcome)
    }

    private func endAccounting(_ exchange: Exchange) {
        exchange.responseDeadline = nil
        self.handle.stats.activeRequests.subtract(1, ordering: .relaxed)
        if exchange.inRetryBudget {
            exchange.inRetryBudget = false
            self.handle.stats.activeRetries.subtract(1, ordering: .relaxed)
        }
    }

    private func finishIfDone(_ exchange: Exchange) {
        guard exchange.requestEnded, exchange.responseEnded, let context = self.context else { return }
        self.endAccounting(exchange)
        self.finishPick(exchange, .neutral)
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            upstream.handler.owner = nil
            if exchange.upstreamKeepAlive && exchange.requestSent,
                let pool = self.pool
            {
                pool.release(upstream)
            } else {
                upstream.channel.close(promise: nil)
            }
        }
        if exchange.keepAlive {
            self.becomeIdle()
        } else {
            self.state = .closed
            context.close(promise: nil)
        }
    }

    /// Answers the exchange with a short plain-text error (when no response has started) and ends it.
    private func fail(_ exchange: Exchange, _ status: HTTPResponseStatus, _ reason: String) {
        guard let context = self.context else { return }
        self.endAccounting(exchange)
        self.finishPick(exchange, .neutral)
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            upstream.handler.owner = nil
            upstream.channel.close(promise: nil)
        }
        if exchange.responseHeadSent {
            self.state = .closed
            context.close(promise: nil)
            return
        }
        // The rest of the request is read and dropped when it is small; a large one would cost more than a
        // new connection: close instead.
        let smallRest: Bool
        switch exchange.head.body {
        case .none: smallRest = true
        case .length(let length): smallRest = length <= 64 * 1024
        case .chunked, .untilClose: smallRest = false
        }
        let keepAlive = exchange.keepAlive && (exchange.requestEnded || smallRest)
        exchange.responseHeadSent = true
        exchange.responseEnded = true
        Self.writeStatusResponse(context: context, status: status, reason: reason, keepAlive: keepAlive)
        if !keepAlive {
            self.state = .closed
        } else if exchange.requestEnded {
            self.becomeIdle()
        } else {
            self.state = .discarding
            self.idleSince = .now()
            self.updateReading()
        }
    }

    /// The client went away mid-exchange.
    private func abandon(_ exchange: Exchange) {
        self.endAccounting(exchange)
        self.finishPick(exchange, .neutral)
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            upstream.handler.owner = nil
            upstream.channel.close(promise: nil)
        }
    }

    /// Writes a response head to the client as the backend sent it (a 1xx, or the 101 of an upgrade).
    private static func writeUnedited(_ response: HTTPHead, context: ChannelHandlerContext) {
        context.writeAndFlush(NIOAny(response.bytes), promise: nil)
    }

    static func writeStatusResponse(
        context: ChannelHandlerContext,
        status: HTTPResponseStatus,
        reason: String,
        keepAlive: Bool
    ) {
        let response = HTTPWire.statusResponse(
            status: status,
            text: "\(status.code) \(reason)\n",
            keepAlive: keepAlive,
            allocator: context.channel.allocator
        )
        let done = context.writeAndFlush(NIOAny(response))
        if !keepAlive {
            done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
        }
    }

    private func becomeIdle() {
        self.state = .idle
        self.exchangesEnded &+= 1
        if self.quiescing {
            self.state = .closed
            self.context?.close(promise: nil)
            return
        }
        if !self.queued.isEmpty { self.replayQueued() }
    }

    private func armTimer() {
        guard let context = self.context else { return }
        let c = self.configuration
        let shortest = min(c.requestHeadTimeout, c.clientIdleTimeout, c.upstreamResponseTimeout)
        let tick = TimeAmount.nanoseconds(max(shortest.nanoseconds / 4, TimeAmount.milliseconds(1).nanoseconds))
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: tick) { self.checkTimeouts() }
    }

    /// The connection timer: a request head too slow to come (or an idle keep-alive connection), a response
    /// too slow to start (504), a request body that stalled.
    private func checkTimeouts() {
        guard let context = self.context else { return }
        let now = NIODeadline.now()
        let c = self.configuration
        // What happened since the last tick, timed now (at most a tick late: the timeouts are several ticks).
        if self.exchangesEnded != self.exchangesEndedSeen {
            self.exchangesEndedSeen = self.exchangesEnded
            self.idleSince = now
        }
        if self.clientReads != self.clientReadsSeen {
            self.clientReadsSeen = self.clientReads
            self.lastClientRead = now
        }
        switch self.state {
        case .idle, .discarding:
            let limit = self.servedRequests == 0 ? c.requestHeadTimeout : c.clientIdleTimeout
            if now - self.idleSince >= limit {
                self.state = .closed
                context.close(promise: nil)
                return
            }
        case .active(let exchange):
            if let deadline = exchange.responseDeadline, now >= deadline, !exchange.responseHeadSent {
                self.metrics.error(.timeout)
                self.finishPick(exchange, .failure)
                if let upstream = exchange.upstream {
                    exchange.upstream = nil
                    upstream.handler.owner = nil
                    upstream.channel.close(promise: nil)
                }
                self.fail(exchange, .gatewayTimeout, "upstream response timeout")
            } else if !exchange.requestEnded, now - self.lastClientRead >= c.clientIdleTimeout {
                self.abandon(exchange)
                self.state = .closed
                context.close(promise: nil)
                return
            }
        case .upgraded, .closed:
            return
        }
        self.armTimer()
    }

    // MARK: upgrade

    /// The backend accepted the upgrade: forward the 101, then turn both connections into a byte tunnel
    /// (the TCP glue), leaving HTTP behind.
    private func upgrade(_ exchange: Exchange, response: HTTPHead, context: ChannelHandlerContext) {
        guard let upstream = exchange.upstream else { return }
        exchange.responseHeadSent = true
        exchange.responseEnded = true
        self.endAccounting(exchange)
        // The 101 as it came (its Connection and Upgrade headers are the point of it).
        Self.writeUnedited(response, context: context)
        self.state = .upgraded
        if self.readingPaused {
            // The tunnel reads as it likes (autoRead on, as the glue expects).
            self.readingPaused = false
            try? context.channel.syncOptions?.setOption(.autoRead, value: true)
        }
        exchange.upstream = nil
        upstream.handler.owner = nil
        self.pool?.detach(upstream)

        let meter = GlueMeter(handle: self.handle, counters: self.environment.counters)
        let clientGlue = GlueHandler(side: .client, meter: meter)
        let upstreamGlue = GlueHandler(side: .upstream, meter: meter)
        let clientChannel = context.channel
        let upstreamChannel = upstream.channel
        if let pick = exchange.pick, exchange.pickInFlight {
            // The tunnel keeps the backend busy until it closes.
            exchange.pickInFlight = false
            let handle = self.handle
            upstreamChannel.closeFuture.whenComplete { _ in handle.finish(pick, outcome: .neutral) }
        }
        do {
            try clientChannel.pipeline.syncOperations.addHandler(clientGlue)
            try upstreamChannel.pipeline.syncOperations.addHandler(upstreamGlue)
            GlueHandler.join(clientGlue, upstreamGlue)
            // The decoders go last: bytes behind the upgrade they hold go to the glue.
            let upstreamSync = upstreamChannel.pipeline.syncOperations
            upstreamSync.removeHandler(upstream.handler, promise: nil)
            upstreamSync.removeHandler(upstream.handler.decoder, promise: nil)
            let clientSync = clientChannel.pipeline.syncOperations
            clientSync.removeHandler(context: context, promise: nil)
            clientSync.removeHandler(self.decoder, promise: nil)
        } catch {
            self.environment.logger.debug("upgrade failed", metadata: ["error": "\(error)"])
            clientChannel.close(promise: nil)
            upstreamChannel.close(promise: nil)
            return
        }
        IdleTimer.start(
            on: clientChannel,
            meter: meter,
            timeout: self.environment.configuration.tcpIdleTimeout,
            close: { clientGlue.close() }
        )
        clientChannel.read()
        upstreamChannel.read()
    }
}

extension Substring {
    fileprivate var trimmingSpaces: Substring {
        var s = self
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return s
    }
}
