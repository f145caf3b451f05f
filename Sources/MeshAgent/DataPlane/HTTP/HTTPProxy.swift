import Logging
import MeshCore
import NIOCore
import NIOHTTP1
import NIOPosix

/// The L7 HTTP/1.1 proxy for `http` routes.
enum HTTPProxy {
    /// Sets up one accepted client connection (inside the child channel initialiser, on its loop):
    /// response encoder, request decoder with the header limits, and the proxy handler, which also answers
    /// parse errors (400/431), holds pipelined requests back until the one in flight is answered, and
    /// quiesces. Three handlers only: every handler between the codec and the proxy costs a hop (and a
    /// dynamic cast of the boxed message) for every part of every request and response.
    static func initialize(channel: any Channel, handle: RouteHandle, environment: ProxyEnvironment) throws {
        let configuration = environment.configuration.http
        var limits = NIOHTTPDecoderLimitConfiguration()
        limits.maxHeaderListSize = configuration.maxHeaderListSize
        limits.maxHeaderFieldSize = configuration.maxHeaderFieldSize
        let encoder = HTTPResponseEncoder()
        let decoder = ByteToMessageHandler(
            HTTPRequestDecoder(
                leftOverBytesStrategy: .forwardBytes,
                informationalResponseStrategy: .drop,
                limitConfiguration: limits
            )
        )
        let proxy = HTTPProxyHandler(
            handle: handle,
            environment: environment,
            httpHandlers: [encoder, decoder]
        )
        let sync = channel.pipeline.syncOperations
        try sync.addHandler(encoder)
        try sync.addHandler(decoder)
        try sync.addHandler(proxy)
        handle.connectionOpened()
        channel.closeFuture.whenComplete { _ in handle.connectionClosed() }
    }

    /// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded.
    static let hopByHop: [String] = [
        "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authenticate",
        "proxy-authorization",
    ]

    /// Removes hop-by-hop headers, including those the Connection header names. One pass to find out
    /// whether there is anything to remove (usually not), removals only then.
    static func stripHopByHop(_ headers: inout HTTPHeaders) {
        var found = false
        for (name, _) in headers where Self.isHopByHop(name) {
            found = true
            break
        }
        guard found else { return }
        let named = headers[canonicalForm: "connection"].map { $0.lowercased() }
        for name in Self.hopByHop { headers.remove(name: name) }
        for name in named where name != "close" && name != "keep-alive" { headers.remove(name: String(name)) }
    }

    static func isHopByHop(_ name: String) -> Bool {
        // Cheap length filter before the case-insensitive comparison.
        switch name.utf8.count {
        case 2, 7, 10, 16, 18, 19:
            return Self.hopByHop.contains { $0.utf8.count == name.utf8.count && $0.asciiCaseInsensitiveEquals(name) }
        default:
            return false
        }
    }

    /// Whether a comma-separated header value holds `token` (ASCII case-insensitive, spaces trimmed).
    static func listContainsToken(_ value: String, _ token: String) -> Bool {
        for item in value.utf8.split(separator: UInt8(ascii: ",")) {
            var element = item[...]
            let blank = { (byte: UInt8) in byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") }
            while let first = element.first, blank(first) { element = element.dropFirst() }
            while let last = element.last, blank(last) { element = element.dropLast() }
            if element.count == token.utf8.count,
                zip(element, token.utf8).allSatisfy({ asciiLower($0) == asciiLower($1) })
            {
                return true
            }
        }
        return false
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
final class HTTPProxyHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    /// One request/response exchange.
    private final class Exchange {
        var head: HTTPRequestHead
        let method: HTTPMethod
        let clientVersion: HTTPVersion
        var keepAlive: Bool
        let isUpgrade: Bool
        let hash: UInt64
        var pendingBody: [ByteBuffer] = []
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
        var upgradeResponse: HTTPResponseHead?

        init(head: HTTPRequestHead, keepAlive: Bool, isUpgrade: Bool, hash: UInt64) {
            self.head = head
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
        case part(HTTPServerRequestPart)
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
    private let httpHandlers: [any RemovableChannelHandler]
    private var state: State = .idle
    private var context: ChannelHandlerContext?
    private var pendingRead = false
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
    /// Response parts were written to the client and not flushed yet.
    private var clientNeedsFlush = false
    /// The route's instruments and this loop's upstream pool, looked up once per connection.
    private lazy var metrics: RouteMetrics = self.handle.metrics
    private var pool: LoopPool?
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

    init(handle: RouteHandle, environment: ProxyEnvironment, httpHandlers: [any RemovableChannelHandler]) {
        self.handle = handle
        self.environment = environment
        self.httpHandlers = httpHandlers
    }

    private var configuration: HTTPConfiguration { self.environment.configuration.http }

    var clientIsWritable: Bool { self.context?.channel.isWritable ?? false }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.pool = self.environment.pools.pool(for: context.eventLoop)
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
        guard error is HTTPParserError else {
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
        self.pendingRead = false
        var responseUnderWay = false
        if case .active(let exchange) = self.state {
            responseUnderWay = exchange.responseHeadSent && !exchange.responseEnded
            self.state = .closed
            self.abandon(exchange)
        }
        self.state = .closed
        guard !responseUnderWay, let parserError = error as? HTTPParserError else {
            context.close(promise: nil)
            return
        }
        let status: HTTPResponseStatus = parserError == .headerOverflow ? .requestHeaderFieldsTooLarge : .badRequest
        Self.writeStatusResponse(
            context: context,
            status: status,
            reason: status == .badRequest ? "bad request: \(parserError)" : "request header fields too large",
            keepAlive: false,
            wrap: self.wrapOutboundOut
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

    func read(context: ChannelHandlerContext) {
        if !self.queued.isEmpty {
            // Pipelined requests wait: read no more until they are taken.
            self.pendingRead = true
            return
        }
        if case .active(let exchange) = self.state, !exchange.requestEnded,
            !(exchange.canStreamBody && exchange.upstream!.handler.isWritable)
        {
            self.pendingRead = true
            return
        }
        context.read()
    }

    private func resumeClientRead() {
        if self.pendingRead, let context = self.context {
            self.pendingRead = false
            context.read()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let part = self.unwrapInboundIn(data)
        guard self.queued.isEmpty else {
            self.queued.append(.part(part))
            return
        }
        self.handle(part, context: context)
    }

    /// (Nested switches rather than one over a (state, part) tuple: the tuple copied both, head included.)
    private func handle(_ part: HTTPServerRequestPart, context: ChannelHandlerContext) {
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
                    exchange.upstream!.handler.write(.body(.byteBuffer(buffer)))
                    exchange.bodyBytesSent = exchange.bodyBytesSent || buffer.readableBytes > 0
                    self.upstreamNeedsFlush = true
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
                    exchange.upstream!.handler.write(.end(trailers))
                    exchange.requestSent = true
                    self.upstreamNeedsFlush = true
                    exchange.responseDeadline = .now() + self.configuration.upstreamResponseTimeout
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
        self.resumeClientRead()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.clientReads &+= 1
        if self.upstreamNeedsFlush, case .active(let exchange) = self.state {
            self.upstreamNeedsFlush = false
            exchange.upstream?.handler.flush()
        }
        context.fireChannelReadComplete()
    }

    // MARK: request

    private func start(_ requestHead: HTTPRequestHead, context: ChannelHandlerContext) {
        self.servedRequests += 1
        self.handle.stats.requests.add(1, ordering: .relaxed)
        self.handle.stats.activeRequests.add(1, ordering: .relaxed)
        self.metrics.requests.increment()

        // One pass over the headers for everything the proxy looks at (usually none of them is there).
        var connectionUpgrade = false
        var upgradeValue: String?
        var hopByHop = false
        var forwardedFor: String?
        var hasRequestID = false
        for (name, value) in requestHead.headers {
            switch name.utf8.count {
            case 7 where upgradeValue == nil && name.asciiCaseInsensitiveEquals("upgrade"):
                upgradeValue = value
                hopByHop = true
            case 10 where name.asciiCaseInsensitiveEquals("connection"):
                hopByHop = true
                connectionUpgrade = connectionUpgrade || HTTPProxy.listContainsToken(value, "upgrade")
            case 12 where !hasRequestID && name.asciiCaseInsensitiveEquals("x-request-id"):
                hasRequestID = true
            case 15 where forwardedFor == nil && name.asciiCaseInsensitiveEquals("x-forwarded-for"):
                forwardedFor = value
            default:
                hopByHop = hopByHop || HTTPProxy.isHopByHop(name)
            }
        }
        let isUpgrade = connectionUpgrade && upgradeValue != nil
        var head = requestHead
        if hopByHop { HTTPProxy.stripHopByHop(&head.headers) }
        if isUpgrade, let upgradeValue {
            head.headers.add(name: "connection", value: "upgrade")
            head.headers.add(name: "upgrade", value: upgradeValue)
        }
        // (Set only when it differs: the head's method, URI and version share a copy-on-write box.)
        if head.version != .http1_1 { head.version = .http1_1 }
        if self.configuration.addForwardedFor, let ip = self.clientIPText {
            if let forwardedFor {
                head.headers.replaceOrAdd(name: "x-forwarded-for", value: "\(forwardedFor), \(ip)")
            } else {
                head.headers.add(name: "x-forwarded-for", value: ip)
            }
        }
        if self.configuration.addRequestID, !hasRequestID {
            head.headers.add(name: "x-request-id", value: self.newRequestID())
        }
        let exchange = Exchange(
            head: head,
            keepAlive: requestHead.isKeepAlive && !isUpgrade,
            isUpgrade: isUpgrade,
            hash: self.hashKey(requestHead)
        )
        self.state = .active(exchange)
        self.dispatch(exchange)
    }

    private func hashKey(_ head: HTTPRequestHead) -> UInt64 {
        guard self.handle.hashesRequests, case .consistentHash(let key) = self.handle.policy else { return 0 }
        switch key {
        case .header(let name):
            if let value = head.headers.first(name: name) { return StableHash.hash(value) }
        case .cookie(let name):
            for header in head.headers[canonicalForm: "cookie"] {
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

    /// 128 random bits as 32 lowercase hex digits.
    private func newRequestID() -> String {
        let a = self.rng.next()
        let b = self.rng.next()
        return String(unsafeUninitializedCapacity: 32) { buffer in
            let digits: StaticString = "0123456789abcdef"
            digits.withUTF8Buffer { hex in
                for i in 0..<16 {
                    buffer[i] = hex[Int(a >> (60 - 4 * UInt64(i)) & 0xf)]
                    buffer[16 + i] = hex[Int(b >> (60 - 4 * UInt64(i)) & 0xf)]
                }
            }
            return 32
        }
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
        handler.write(.head(exchange.head))
        exchange.headSent = true
        for buffer in exchange.pendingBody {
            handler.write(.body(.byteBuffer(buffer)))
            exchange.bodyBytesSent = exchange.bodyBytesSent || buffer.readableBytes > 0
        }
        exchange.pendingBody = []
        if exchange.requestEnded {
            handler.write(.end(nil))
            exchange.requestSent = true
            exchange.responseDeadline = (now ?? .now()) + self.configuration.upstreamResponseTimeout
        }
        handler.flush()
        self.resumeClientRead()
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

    func upstreamRead(_ part: HTTPClientResponsePart, from connection: UpstreamConnection) {
        guard case .active(let exchange) = self.state, exchange.upstream === connection, let context = self.context
        else { return }
        switch part {
        case .head(let response)
        where (100..<200).contains(response.status.code) && response.status != .switchingProtocols:
            // 100 Continue and friends: passed on, the final response follows.
            context.writeAndFlush(self.wrapOutboundOut(.head(response)), promise: nil)
        case .head(let response):
            exchange.responseDeadline = nil
            self.metrics.upstreamLatency.recordNanoseconds(
                (NIODeadline.now() - exchange.upstreamStarted).nanoseconds
            )
            let failed = response.status.code >= 500 && self.environment.configuration.outlier.countHTTP5xx
            if let pick = exchange.pick {
                if failed || exchange.isUpgrade || !exchange.pickInFlight {
                    self.handle.report(pick.id, outcome: failed ? .failure : .success)
                } else {
                    exchange.successPending = true
                }
            }
            if exchange.isUpgrade && response.status == .switchingProtocols {
                exchange.upgradeResponse = response
                return
            }
            var head = response
            HTTPProxy.stripHopByHop(&head.headers)
            exchange.upstreamKeepAlive = response.isKeepAlive
            if head.version != exchange.clientVersion { head.version = exchange.clientVersion }
            if exchange.clientVersion == .http1_0 {
                if head.headers.contains(name: "transfer-encoding") {
                    head.headers.remove(name: "transfer-encoding")
                    exchange.keepAlive = false
                }
                if exchange.keepAlive { head.headers.replaceOrAdd(name: "connection", value: "keep-alive") }
            }
            if exchange.isUpgrade { exchange.keepAlive = false }
            if !exchange.keepAlive { head.headers.replaceOrAdd(name: "connection", value: "close") }
            if exchange.method == .HEAD { head.headers.remove(name: "transfer-encoding") }
            exchange.responseHeadSent = true
            context.write(self.wrapOutboundOut(.head(head)), promise: nil)
            self.clientNeedsFlush = true
        case .body(let buffer):
            guard exchange.upgradeResponse == nil else { return }
            context.write(self.wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            self.clientNeedsFlush = true
        case .end(let trailers):
            if let response = exchange.upgradeResponse {
                self.upgrade(exchange, response: response, context: context)
                return
            }
            exchange.responseEnded = true
            if !exchange.requestEnded {
                // Answered before the request was fully sent: neither side can be reused, and the rest of the
                // request has nowhere to go. End both.
                self.clientNeedsFlush = false
                let done = context.writeAndFlush(self.wrapOutboundOut(.end(trailers)))
                self.endAccounting(exchange)
                self.finishPick(exchange, .neutral)
                exchange.upstream = nil
                connection.handler.owner = nil
                connection.channel.close(promise: nil)
                self.state = .closed
                done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
                return
            }
            self.clientNeedsFlush = false
            context.writeAndFlush(self.wrapOutboundOut(.end(trailers)), promise: nil)
            self.finishIfDone(exchange)
        }
    }

    /// The end of an upstream read burst: what it wrote to the client goes out now (a response that ended
    /// in it was flushed with its end already).
    func upstreamReadComplete() {
        guard self.clientNeedsFlush else { return }
        self.clientNeedsFlush = false
        self.context?.flush()
    }

    func upstreamBecameWritable() {
        self.resumeClientRead()
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
                self.handle.finish(pick.id, outcome: .success)
                return
            }
            self.handle.report(pick.id, outcome: .success)
        }
        self.handle.finish(pick.id, outcome: outcome)
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
        let length = exchange.head.headers.first(name: "content-length").flatMap { Int($0) }
        let smallRest = !exchange.head.headers.contains(name: "transfer-encoding") && (length ?? 0) <= 64 * 1024
        let keepAlive = exchange.keepAlive && (exchange.requestEnded || smallRest)
        exchange.responseHeadSent = true
        exchange.responseEnded = true
        Self.writeStatusResponse(
            context: context,
            status: status,
            reason: reason,
            keepAlive: keepAlive,
            wrap: self.wrapOutboundOut
        )
        if !keepAlive {
            self.state = .closed
            self.pendingRead = false
        } else if exchange.requestEnded {
            self.becomeIdle()
        } else {
            self.state = .discarding
            self.idleSince = .now()
            self.resumeClientRead()
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

    static func writeStatusResponse(
        context: ChannelHandlerContext,
        status: HTTPResponseStatus,
        reason: String,
        keepAlive: Bool,
        wrap: (HTTPServerResponsePart) -> NIOAny
    ) {
        let body = ByteBuffer(string: "\(status.code) \(reason)\n")
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        headers.add(name: "content-length", value: "\(body.readableBytes)")
        headers.add(name: "connection", value: keepAlive ? "keep-alive" : "close")
        context.write(wrap(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrap(.body(.byteBuffer(body))), promise: nil)
        let done = context.writeAndFlush(wrap(.end(nil)))
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
    private func upgrade(_ exchange: Exchange, response: HTTPResponseHead, context: ChannelHandlerContext) {
        guard let upstream = exchange.upstream else { return }
        exchange.responseHeadSent = true
        exchange.responseEnded = true
        self.endAccounting(exchange)
        var head = response
        head.version = .http1_1
        context.write(self.wrapOutboundOut(.head(head)), promise: nil)
        context.writeAndFlush(self.wrapOutboundOut(.end(nil)), promise: nil)
        self.state = .upgraded
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
            upstreamChannel.closeFuture.whenComplete { _ in handle.finish(pick.id, outcome: .neutral) }
        }
        do {
            try clientChannel.pipeline.syncOperations.addHandler(clientGlue)
            try upstreamChannel.pipeline.syncOperations.addHandler(upstreamGlue)
            GlueHandler.join(clientGlue, upstreamGlue)
            let upstreamSync = upstreamChannel.pipeline.syncOperations
            let upstreamHTTP: [any RemovableChannelHandler] = [
                upstream.handler,
                try upstreamSync.handler(type: HTTPRequestEncoder.self),
                try upstreamSync.handler(type: ByteToMessageHandler<HTTPResponseDecoder>.self),
            ]
            for handler in upstreamHTTP { upstreamSync.removeHandler(handler, promise: nil) }
            let clientSync = clientChannel.pipeline.syncOperations
            clientSync.removeHandler(context: context, promise: nil)
            for handler in self.httpHandlers.reversed() where !(handler is HTTPResponseEncoder) {
                clientSync.removeHandler(handler, promise: nil)
            }
            if let encoder = self.httpHandlers.first(where: { $0 is HTTPResponseEncoder }) {
                clientSync.removeHandler(encoder, promise: nil)
            }
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

@inline(__always)
private func asciiLower(_ byte: UInt8) -> UInt8 {
    byte &- 65 < 26 ? byte | 0x20 : byte
}

extension String {
    /// ASCII case-insensitive equality.
    fileprivate func asciiCaseInsensitiveEquals(_ other: String) -> Bool {
        guard self.utf8.count == other.utf8.count else { return false }
        for (a, b) in zip(self.utf8, other.utf8) where a != b {
            if asciiLower(a) != asciiLower(b) { return false }
        }
        return true
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
