import Logging
import MeshCore
import NIOCore
import NIOHTTP1
import NIOPosix

/// The L7 HTTP/1.1 proxy for `http` routes.
enum HTTPProxy {
    /// Sets up one accepted client connection (inside the child channel initialiser, on its loop): the
    /// request decoder (`HTTPParser`) with the header limits, and the proxy handler, which writes responses as bytes
    /// it serialises itself (`HTTPWire`), answers parse errors (400/431/501), holds pipelined requests back
    /// until the one in flight is answered, and quiesces. Two handlers only: every handler between the socket
    /// and the proxy costs a hop (and a dynamic cast of the boxed message) for every part of every message.
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

/// The client side of one HTTP connection: takes each request, has the request policy admit it
/// (`HTTPRequestPolicy`), picks a backend for it, borrows a pooled upstream connection of this event loop (or
/// opens one), streams the request body up and the response body down with back-pressure both ways, retries
/// what may be retried, and answers 502/503/504 itself. Every decision about an exchange is the state
/// machine's (`HTTPExchange`); this class does the I/O it asks for. The response side is in
/// HTTPProxy+Upstream.swift, the switch to a tunnel in HTTPUpgradeTunnel.swift.
final class HTTPProxyHandler: ChannelInboundHandler, RemovableChannelHandler, HTTPPartReceiver {
    /// (Parts come from the decoder by direct call, `receive(_:)`; bytes only after an upgrade, for the glue.)
    /// Inbound only: NIO's outbound operations (every autoRead `read()`, writes) pass it by, no hop each;
    /// reading is held back by turning autoRead off (`updateReading`).
    typealias InboundIn = ByteBuffer

    /// What arrived from the client behind a request still in flight (pipelining), replayed in order once it
    /// is answered.
    enum Queued {
        case part(HTTPPart)
        case inputClosed
        case error(any Error)
    }

    enum State: Equatable {
        case idle
        /// `exchange` is in flight.
        case active
        /// Answered before the request ended: the rest of its (small) body is read and dropped.
        case discarding
        case upgraded
        case closed
    }

    let handle: RouteHandle
    let environment: ProxyEnvironment
    let decoder: HTTPDecodingHandler
    var state: State = .idle
    /// The exchange in flight (while `active`).
    var exchange: HTTPExchange?
    private var exchangeIDs: UInt64 = 0
    var context: ChannelHandlerContext?
    /// autoRead is off: the client is not read while `mayRead` is false.
    var readingPaused = false
    private var upstreamNeedsFlush = false
    /// One timer per connection, re-armed every `tick` (a quarter of the shortest timeout): it checks the
    /// deadlines, so no timer is scheduled or cancelled per request.
    var timer: Scheduled<Void>?
    /// Since when the connection has had no exchange (connect, or the end of the last response), as seen by
    /// the connection timer: the end of an exchange only counts (`exchangesEnded`), and the timer's next tick
    /// takes the time, so a request costs no clock read for it.
    var idleSince = NIODeadline.now()
    var exchangesEnded = 0
    var exchangesEndedSeen = 0
    /// The last bytes from the client (a stalled request body) and from the upstream (a stalled response
    /// body), as seen by the timer: reads are counted, the timer's tick takes the time when a count moved.
    var lastClientRead = NIODeadline.now()
    var clientReads = 0
    var clientReadsSeen = 0
    var lastUpstreamRead = NIODeadline.now()
    var upstreamReads = 0
    var upstreamReadsSeen = 0
    var servedRequests = 0
    /// Response bytes for the client (a head, the body and the end behind it go out as one write).
    var clientOut = HTTPOutbox()
    /// The route's instruments and this loop's upstream pool, looked up once per connection.
    lazy var metrics: RouteMetrics = self.handle.metrics
    var pool: LoopPool?
    /// The channel's allocator, taken once (`context.channel.allocator` is an existential call per use).
    var allocator = ByteBufferAllocator()
    private var rng = FastRandom()
    private var clientIP: IPAddress?
    /// The client IP as text, for X-Forwarded-For (made once per connection).
    private(set) var clientIPText: String?
    /// What the request policy needs of the configuration, and the retry budget (taken once).
    let settings: HTTPRequestPolicy.Settings
    let retryBudget: HTTPRetryBudget
    /// Pipelined requests (and a half-close or parse error behind them); reads are held while there are any.
    var queued: [Queued] = []
    private var replaying = false
    /// Asked to finish (a route removed, shutdown): the exchange in flight is answered with
    /// `connection: close`, then the connection closes.
    var quiescing = false

    init(handle: RouteHandle, environment: ProxyEnvironment, decoder: HTTPDecodingHandler) {
        self.handle = handle
        self.environment = environment
        self.decoder = decoder
        self.settings = HTTPRequestPolicy.Settings(environment.configuration.http)
        self.retryBudget = HTTPRetryBudget(environment.configuration.http)
    }

    var configuration: HTTPConfiguration { self.environment.configuration.http }

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
        if self.state == .active {
            self.state = .closed
            self.abandon()
        }
        self.state = .closed
        self.exchange = nil
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
        if self.state == .active, self.exchange!.requestEnded {
            // Garbage behind a request in flight (pipelined): answered once that request is.
            self.queued.append(.error(error))
            return
        }
        self.answerParseError(error, context: context)
    }

    /// 431 when the head is over the size limits, 501 for a transfer coding other than chunked, 400 otherwise,
    /// always with `connection: close`, then closes; if a response is already under way it just closes.
    private func answerParseError(_ error: any Error, context: ChannelHandlerContext) {
        self.metrics.error(.badRequest)
        self.queued.removeAll()
        var responseUnderWay = false
        if self.state == .active {
            responseUnderWay = self.exchange!.responseHeadSent && !self.exchange!.responseEnded
            self.state = .closed
            self.abandon()
        }
        self.state = .closed
        self.exchange = nil
        guard !responseUnderWay, let parserError = error as? HTTPParseError else {
            context.close(promise: nil)
            return
        }
        let status: HTTPResponseStatus =
            parserError.isTooLarge
            ? .requestHeaderFieldsTooLarge : parserError == .unsupportedTransferCoding ? .notImplemented : .badRequest
        Self.writeStatusResponse(
            context: context,
            status: status,
            reason: status == .requestHeaderFieldsTooLarge ? "request header fields too large" : "\(parserError)",
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
        case .active: self.exchange!.keepAlive = false
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
        case .active:
            self.exchange!.keepAlive = false
        case .discarding, .upgraded, .closed:
            break
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, self.state == .active {
            self.exchange!.upstream?.handler.resumeRead()
        }
        context.fireChannelWritabilityChanged()
    }

    /// Whether the client may be read: not while pipelined requests wait (they are taken one at a time), nor
    /// while a request body has nowhere to go (no upstream yet, or it pushes back). A body being buffered
    /// before dispatch is read on (the buffer is bounded: past it the request is dispatched).
    private var mayRead: Bool {
        if !self.queued.isEmpty { return false }
        guard self.state == .active, let exchange = self.exchange else { return true }
        return exchange.requestEnded || !exchange.dispatched
            || (exchange.canStreamBody && exchange.upstream!.handler.isWritable)
    }

    /// Turns autoRead off or on to match `mayRead`: at the end of each read burst (before NIO would read
    /// again), and when something that held reading back has changed. A change costs an `epoll_ctl`; the usual
    /// request changes nothing.
    func updateReading() {
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
            case .active:
                let exchange = self.exchange!
                switch exchange.requestBody(buffer, bufferLimit: self.settings.requestBufferSize) {
                case .send:
                    let upstream = exchange.upstream!.handler
                    exchange.tally.sent &+= buffer.readableBytes
                    upstream.sendBody(buffer, chunked: exchange.chunkedRequest)
                    self.flushUpstreamSoon(upstream)
                case .hold:
                    break
                case .dispatch:
                    self.dispatch()
                }
            case .discarding, .closed, .upgraded:
                break
            case .idle:
                context.close(promise: nil)
            }
        case .end(let trailers):
            switch self.state {
            case .active:
                let exchange = self.exchange!
                let action = exchange.requestEnd(
                    trailers: trailers,
                    now: .now(),
                    responseTimeout: self.configuration.upstreamResponseTimeout
                )
                switch action {
                case .send:
                    let upstream = exchange.upstream!.handler
                    upstream.sendEnd(trailers: trailers, chunked: exchange.chunkedRequest)
                    self.flushUpstreamSoon(upstream)
                case .hold:
                    break
                case .dispatch:
                    self.dispatch()
                }
                self.finishIfDone()
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
    func replayQueued() {
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
            if self.state == .active { self.exchange!.upstream?.handler.flush() }
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
            self.reject(.notImplemented, "CONNECT is not supported", context: context)
            return
        }
        var plan = HTTPRequestPolicy.Plan(keepAlive: requestHead.isKeepAlive)
        let refusal = HTTPRequestPolicy.admit(
            requestHead,
            settings: self.settings,
            clientAddress: self.clientIPText,
            fallbackHost: self.handle.key.hostText,
            upgradeProtocols: { self.handle.upgradeProtocols },
            into: &plan
        )
        if let refusal {
            self.reject(.badRequest, refusal, context: context)
            return
        }
        self.servedRequests += 1
        self.handle.stats.requests.add(1, ordering: .relaxed)
        self.handle.stats.activeRequests.add(1, ordering: .relaxed)
        self.metrics.requests.increment()

        // The head goes upstream as HTTP/1.1 with the policy's edits and a request id: serialised here, once.
        if self.configuration.addRequestID, requestHead.requestIDField == nil {
            plan.edits.requestID = (self.rng.next(), self.rng.next())
        }
        self.exchangeIDs &+= 1
        self.exchange = HTTPExchange(
            id: self.exchangeIDs,
            head: requestHead,
            upstreamHead: HTTPWire.requestHead(requestHead, edits: plan.edits, allocator: self.allocator),
            plan: plan,
            hash: self.hashKey(requestHead)
        )
        if requestHead.traceField != nil { self.exchange!.trace = self.traceRecording(requestHead) }
        self.state = .active
        if self.exchange!.dispatched { self.dispatch() }
    }

    /// A request the policy refused: answered, then the connection closes (what follows it is not trusted).
    private func reject(_ status: HTTPResponseStatus, _ reason: String, context: ChannelHandlerContext) {
        self.metrics.error(.badRequest)
        self.state = .closed
        self.queued.removeAll()
        Self.writeStatusResponse(context: context, status: status, reason: reason, keepAlive: false)
    }

    /// `ip:port` of an address (a Host for an HTTP/1.0 request without one: the address it was sent to).
    static func hostText(_ address: SocketAddress?) -> String {
        guard let address, let ip = IPAddress(socketAddress: address), let port = address.port else {
            return "localhost"
        }
        return ip.isIPv4 ? "\(ip):\(port)" : "[\(ip)]:\(port)"
    }

    private func hashKey(_ head: HTTPHead) -> UInt64 {
        guard self.handle.hashesRequests, case .consistentHash(let key) = self.handle.policy else { return 0 }
        if let hash = head.hashKey(key) { return hash }
        return self.clientIP.map { StableHash.hash($0) } ?? 0
    }

    /// Picks a backend and gets a connection to it (pooled or new).
    func dispatch() {
        guard let context = self.context, self.state == .active else { return }
        let exchange = self.exchange!
        guard let pick = self.handle.pick(hash: exchange.hash, excluding: exchange.tried) else {
            if exchange.triedCount == 0 {
                self.metrics.error(.noBackend)
                self.fail(.serviceUnavailable, "no healthy upstream")
            } else if exchange.connectTimedOut {
                self.fail(.gatewayTimeout, "upstream connect timeout")
            } else {
                self.fail(.badGateway, "upstream connect error")
            }
            return
        }
        exchange.noteTried(pick.id)
        exchange.pick = pick
        exchange.pickInFlight = true
        let started = NIODeadline.now()
        exchange.upstreamStarted = started
        let loop = context.eventLoop
        guard let pool = self.pool else {
            self.fail(.serviceUnavailable, "no upstream pool")
            return
        }
        let idle = exchange.isUpgrade ? nil : pool.takeIdle(pick.id)
        if let trace = exchange.trace {
            trace.attempt(self.handle.backend(pick.id), id: pick.id, pooled: idle != nil, now: started)
        }
        if let connection = idle {
            self.attach(connection, now: started)
            return
        }
        guard pool.reserve(pick.id) else {
            self.finishPick(.neutral)
            self.metrics.error(.overflow)
            self.fail(.serviceUnavailable, "upstream connection limit")
            return
        }
        let id = exchange.id
        pool.connect(
            to: pick,
            service: self.handle.service,
            servicePort: self.handle.key.port,
            on: loop,
            upstreams: self.environment.upstreams
        ).assumeIsolated().whenComplete { result in
            let current = self.state == .active && self.exchange!.id == id && self.exchange!.pick?.id == pick.id
            switch result {
            case .success(let connection):
                guard current else {
                    // The client left meanwhile: keep the connection for the next one.
                    pool.release(connection)
                    return
                }
                self.exchange!.trace?.connected(now: .now())
                self.attach(connection, now: nil)
            case .failure(let error):
                pool.forget(pick.id)
                if current { self.exchange!.trace?.attemptFailed("connect: \(error)") }
                self.metrics.error(.connectFailure)
                guard current else { return }
                self.finishPick(.failure)
                if let e = error as? ChannelError, case .connectTimeout = e { self.exchange!.connectTimedOut = true }
                self.environment.logger.debug(
                    "upstream connect failed",
                    metadata: ["service": "\(self.handle.service)", "backend": "\(pick.id)", "error": "\(error)"]
                )
                let timedOut = self.exchange!.connectTimedOut
                self.retryOrFail(
                    status: timedOut ? .gatewayTimeout : .badGateway,
                    reason: timedOut ? "upstream connect timeout" : "upstream connect error"
                )
            }
        }
    }

    /// `now`: the time, when the caller just took it.
    private func attach(_ connection: UpstreamConnection, now: NIODeadline?) {
        connection.handler.owner = self
        let handler = connection.handler
        let exchange = self.exchange!
        handler.sendHead(exchange.upstreamHead, method: exchange.method)
        exchange.tally = ByteTally(sent: exchange.upstreamHead.readableBytes)
        let sending = exchange.attach(
            connection,
            now: now ?? .now(),
            responseTimeout: self.configuration.upstreamResponseTimeout
        )
        let chunked = exchange.chunkedRequest
        for buffer in sending.body {
            exchange.tally.sent &+= buffer.readableBytes
            handler.sendBody(buffer, chunked: chunked)
        }
        if sending.end { handler.sendEnd(trailers: sending.trailers, chunked: chunked) }
        self.flushUpstreamSoon(handler)
        self.updateReading()
    }

    /// Retries on another backend when allowed (connect failures always may; an upstream reset before any
    /// response only for idempotent requests whose body has not been sent), within the retry budget.
    func retryOrFail(status: HTTPResponseStatus, reason: String) {
        let mayRetry = self.exchange!.mayRetry(
            connectAttempts: self.environment.configuration.connectAttempts,
            maxRetries: self.configuration.maxRetries
        )
        if mayRetry, self.takeRetryBudget() {
            self.exchange!.retry()
            self.handle.stats.retries.add(1, ordering: .relaxed)
            self.dispatch()
        } else {
            self.fail(status, reason)
        }
    }

    private func takeRetryBudget() -> Bool {
        if self.exchange!.inRetryBudget { return true }
        guard self.retryBudget.take(self.handle.stats) else { return false }
        self.exchange!.inRetryBudget = true
        return true
    }
}
