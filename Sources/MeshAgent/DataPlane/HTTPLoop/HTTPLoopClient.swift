import CLinux
import Logging
import MeshCore
import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The epoll engine's client connection for an `http` route: what `HTTPProxyHandler` does on NIO, on a
/// splice loop. The accepted socket is registered once (edge-triggered); a read burst goes through the
/// request parser (`HTTPParser`), each part to the exchange state machine (`HTTPExchangeOf`), which decides;
/// this class does the I/O it asks for: admit the request (`HTTPRequestPolicy`), pick a backend, borrow a
/// pooled upstream connection of this loop or open one, stream the body up and the response down with
/// back-pressure both ways, retry, answer 4xx/5xx itself, and switch to the TCP splice after an allowed
/// upgrade. What a burst queued for a socket goes out with one `send`/`writev` at its end.
///
/// Pipelined requests are taken one at a time without a queue: bytes behind a request in flight stay
/// unparsed in `inbound` (and the socket is not read while they are there) until its response has ended.
final class HTTPLoopClient: SplicePollable {
    enum Phase: Equatable {
        case idle
        /// `exchange` is in flight.
        case active
        /// Answered before the request ended: the rest of its (small) body is read and dropped.
        case discarding
        case upgraded
        case closed
    }

    unowned(unsafe) let state: HTTPLoopState
    let listener: SpliceListener
    let handle: RouteHandle
    private let metrics: RouteMetrics
    private let configuration: HTTPConfiguration
    private let settings: HTTPRequestPolicy.Settings
    private let retryBudget: HTTPRetryBudget
    private let allocator = ByteBufferAllocator()
    private(set) var fd: Int32
    private var parser: HTTPParser
    /// Bytes read and not parsed yet: a head split over reads, or a request pipelined behind the one in flight.
    private var inbound: ByteBuffer?
    private var readable = false
    private var closing = false
    /// The client's input ended (EOF read); `eofHandled`: the parser and the exchange were told.
    private var eof = false
    private var eofHandled = false
    private var out = HTTPLoopOutput()
    /// Close once `out` is written (a response with `connection: close`).
    private var closeWhenFlushed = false
    private(set) var phase = Phase.idle
    private var exchange: HTTPLoopExchange?
    private var exchangeIDs: UInt64 = 0
    private var servedRequests = 0
    private var quiescing = false
    private var rng = FastRandom()
    private let clientIP: IPAddress?
    private let clientIPText: String?
    /// The upstream connection being opened for the exchange in flight (not attached yet).
    private var pendingConnect: HTTPLoopUpstream?
    /// Times (the loop's wake-up time): the end of the last exchange, the last client and upstream reads.
    private var idleSince: UInt64
    private var clientReadTime: UInt64
    var upstreamReadTime: UInt64
    /// Parts are being handed out of a client read (upstream bytes they cause go out at its end).
    private var inRead = false

    init(state: HTTPLoopState, listener: SpliceListener, fd: Int32, clientIP: IPAddress?) {
        self.state = state
        self.listener = listener
        self.handle = listener.handle
        self.metrics = listener.handle.metrics
        let configuration = state.configuration.http
        self.configuration = configuration
        self.settings = HTTPRequestPolicy.Settings(configuration)
        self.retryBudget = HTTPRetryBudget(configuration)
        self.parser = HTTPParser(
            kind: .request,
            limits: HTTPParser.Limits(
                headBytes: configuration.maxHeaderListSize,
                fieldBytes: configuration.maxHeaderFieldSize
            )
        )
        self.fd = fd
        self.clientIP = clientIP
        self.clientIPText = clientIP.map { "\($0)" }
        let now = state.loop.now
        self.idleSince = now
        self.clientReadTime = now
        self.upstreamReadTime = now
    }

    private var loop: SpliceLoop { self.state.loop }
    private var now: UInt64 { self.state.loop.now }
    private var deadlineNow: NIODeadline { .uptimeNanoseconds(self.state.loop.now) }

    /// The client socket can take more response bytes.
    var clientIsWritable: Bool { self.out.bytes < self.state.configuration.writeBufferHighWaterMark }

    /// Registers the accepted socket and starts reading it.
    func start() {
        self.state.adopt(self)
        self.listener.opened()
        self.handle.connectionOpened()
        self.loop.counters.downstreamChannels.add(1, ordering: .relaxed)
        do {
            try self.loop.register(self.fd, self, events: SpliceEvents.stream)
        } catch {
            self.loop.logger.warning("http: cannot watch an accepted socket", metadata: ["error": "\(error)"])
            self.close()
        }
    }

    // MARK: events

    override func ready(_ events: UInt32) {
        guard self.phase != .closed || self.closeWhenFlushed else { return }
        if events & (SpliceEvents.input | SpliceEvents.closing) != 0 { self.readable = true }
        if events & SpliceEvents.closing != 0 { self.closing = true }
        if events & SpliceEvents.output != 0, !self.out.isEmpty {
            self.flushClient()
            guard self.fd >= 0 else { return }
            if self.clientIsWritable, self.phase == .active, let upstream = self.exchange?.upstream {
                upstream.resumeReading()
            }
        }
        if self.phase == .closed {
            // Waiting for a last response to go out: what the client sends now is not read.
            return
        }
        // (An output edge alone has nothing to read.)
        if self.readable || (self.eof && !self.eofHandled) { self.service() }
    }

    /// Parses what is held and reads while reading is allowed, then writes what that produced.
    private func service() {
        guard !self.inRead else { return }
        repeat {
            self.serviceOnce()
            // A body whose upstream took what this burst brought: read on (edge-triggered, nothing else will).
        } while self.phase == .active && self.readable && self.mayRead
    }

    private func serviceOnce() {
        self.inRead = true
        while self.phase != .closed, self.phase != .upgraded {
            if !self.parseHeld() { break }
            guard self.readable, self.mayRead else { break }
            let n = httpLoopRead(self.fd, scratch: self.loop.scratch, into: &self.inbound)
            if n > 0 {
                self.clientReadTime = self.now
                if n < self.loop.scratch.count && !self.closing { self.readable = false }
            } else if n == 0 {
                self.readable = false
                self.eof = true
            } else {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK {
                    self.readable = false
                } else if code != EINTR {
                    if code == ECONNRESET { self.metrics.error(.reset) }
                    self.inRead = false
                    self.close()
                    return
                }
            }
        }
        self.inRead = false
        if self.phase == .active, let upstream = self.exchange?.upstream { upstream.flush() }
        self.flushClient()
    }

    /// Whether the parser may take the next part: not behind a request in flight (pipelining: one at a time).
    private var mayParse: Bool {
        switch self.phase {
        case .idle, .discarding: return true
        case .active: return !self.exchange!.requestEnded
        case .upgraded, .closed: return false
        }
    }

    /// Whether the client may be read: not while a pipelined request waits unparsed, nor while a request body
    /// has nowhere to go (no upstream yet, or it pushes back). A body buffered before dispatch is read on.
    private var mayRead: Bool {
        if !self.mayParse, let inbound = self.inbound, inbound.readableBytes > 0 { return false }
        guard self.phase == .active, let exchange = self.exchange else { return true }
        return exchange.requestEnded || !exchange.dispatched
            || (exchange.canStreamBody && exchange.upstream!.isWritable)
    }

    /// Hands parsed parts on while parsing is allowed; then the end of input, when read and everything before
    /// it was taken. False when the connection is done.
    private func parseHeld() -> Bool {
        while self.mayParse {
            var buffer = self.inbound.take() ?? httpLoopEmptyBuffer
            let part: HTTPPart?
            do {
                part = try self.parser.next(&buffer)
            } catch {
                self.inbound = nil
                self.parseFailed(error)
                return false
            }
            if buffer.readableBytes > 0 { self.inbound = buffer }
            guard let part else { break }
            self.handle(part)
        }
        if self.eof, !self.eofHandled, self.mayParse || self.inbound == nil {
            self.endOfInput()
        }
        return self.phase != .closed && self.phase != .upgraded
    }

    /// The client is done sending: the parser finishes (a request cut off is an error), then with nothing in
    /// flight the connection closes; otherwise the exchange finishes first.
    private func endOfInput() {
        self.eofHandled = true
        var buffer = self.inbound.take() ?? httpLoopEmptyBuffer
        do {
            if self.mayParse {
                while self.mayParse, let part = try self.parser.next(&buffer) { self.handle(part) }
                if self.phase == .closed { return }
                try self.parser.finish(&buffer)
                while let part = try self.parser.next(&buffer) { self.handle(part) }
            }
        } catch {
            self.parseFailed(error)
            return
        }
        switch self.phase {
        case .idle, .discarding: self.close()
        case .active: self.exchange!.keepAlive = false
        case .upgraded, .closed: break
        }
    }

    /// 431 when the head is over the size limits, 501 for a transfer coding other than chunked, 400 otherwise,
    /// always with `connection: close`, then closes; if a response is already under way it just closes.
    private func parseFailed(_ error: any Error) {
        self.metrics.error(.badRequest)
        var responseUnderWay = false
        if self.phase == .active {
            responseUnderWay = self.exchange!.responseHeadSent && !self.exchange!.responseEnded
            self.abandon()
        }
        self.exchange = nil
        guard !responseUnderWay, let parserError = error as? HTTPParseError else {
            self.close()
            return
        }
        let status: HTTPResponseStatus =
            parserError.isTooLarge
            ? .requestHeaderFieldsTooLarge : parserError == .unsupportedTransferCoding ? .notImplemented : .badRequest
        self.writeStatusResponse(
            status,
            reason: status == .requestHeaderFieldsTooLarge ? "request header fields too large" : "\(parserError)",
            keepAlive: false
        )
    }

    /// Finish the request in flight (its response says `connection: close`), then close.
    func quiesce() {
        self.quiescing = true
        switch self.phase {
        case .idle: self.close()
        case .active: self.exchange!.keepAlive = false
        case .discarding, .upgraded, .closed: break
        }
    }

    // MARK: request

    private func handle(_ part: HTTPPart) {
        switch part {
        case .head(let head):
            switch self.phase {
            case .idle: self.start(head)
            case .discarding, .active: self.close()
            case .closed, .upgraded: break
            }
        case .body(let buffer):
            switch self.phase {
            case .active:
                let exchange = self.exchange!
                switch exchange.requestBody(buffer, bufferLimit: self.settings.requestBufferSize) {
                case .send:
                    exchange.tally.sent &+= buffer.readableBytes
                    exchange.upstream!.sendBody(buffer, chunked: exchange.chunkedRequest, allocator: self.allocator)
                case .hold:
                    break
                case .dispatch:
                    self.dispatch()
                }
            case .discarding, .closed, .upgraded:
                break
            case .idle:
                self.close()
            }
        case .end(let trailers):
            switch self.phase {
            case .active:
                let exchange = self.exchange!
                let action = exchange.requestEnd(
                    trailers: trailers,
                    now: self.deadlineNow,
                    responseTimeout: self.configuration.upstreamResponseTimeout
                )
                switch action {
                case .send:
                    exchange.upstream!.sendEnd(
                        trailers: trailers,
                        chunked: exchange.chunkedRequest,
                        allocator: self.allocator
                    )
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
                self.close()
            }
        }
    }

    private func start(_ requestHead: HTTPHead) {
        if case .CONNECT = requestHead.method {
            self.reject(.notImplemented, "CONNECT is not supported")
            return
        }
        var plan = HTTPRequestPolicy.Plan(keepAlive: requestHead.isKeepAlive)
        let key = self.handle.key
        let refusal = HTTPRequestPolicy.admit(
            requestHead,
            settings: self.settings,
            clientAddress: self.clientIPText,
            fallbackHost: key.vip.isIPv4 ? "\(key.vip):\(key.port)" : "[\(key.vip)]:\(key.port)",
            upgradeProtocols: { self.handle.upgradeProtocols },
            into: &plan
        )
        if let refusal {
            self.reject(.badRequest, refusal)
            return
        }
        self.servedRequests += 1
        self.handle.stats.requests.add(1, ordering: .relaxed)
        self.handle.stats.activeRequests.add(1, ordering: .relaxed)
        self.metrics.requests.increment()
        if self.configuration.addRequestID, requestHead.requestIDField == nil {
            plan.edits.requestID = (self.rng.next(), self.rng.next())
        }
        self.exchangeIDs &+= 1
        let exchange = HTTPLoopExchange(
            id: self.exchangeIDs,
            head: requestHead,
            upstreamHead: HTTPWire.requestHead(requestHead, edits: plan.edits, allocator: self.allocator),
            plan: plan,
            hash: self.hashKey(requestHead)
        )
        if requestHead.traceField != nil {
            exchange.trace = TraceRecording.start(requestHead, handle: self.handle, clientIPText: self.clientIPText)
        }
        self.exchange = exchange
        self.phase = .active
        if exchange.dispatched { self.dispatch() }
    }

    /// A request the policy refused: answered, then the connection closes.
    private func reject(_ status: HTTPResponseStatus, _ reason: String) {
        self.metrics.error(.badRequest)
        self.writeStatusResponse(status, reason: reason, keepAlive: false)
    }

    private func hashKey(_ head: HTTPHead) -> UInt64 {
        guard self.handle.hashesRequests, case .consistentHash(let key) = self.handle.policy else { return 0 }
        if let hash = head.hashKey(key) { return hash }
        return self.clientIP.map { StableHash.hash($0) } ?? 0
    }

    /// Picks a backend and gets a connection to it (pooled or new).
    private func dispatch() {
        guard self.phase == .active, let exchange = self.exchange else { return }
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
        exchange.upstreamStarted = self.deadlineNow
        let pool = self.state.pool
        let idle = exchange.isUpgrade ? nil : pool.takeIdle(pick.id)
        exchange.trace?.attempt(self.handle.backend(pick.id), id: pick.id, pooled: idle != nil, now: .now())
        if let connection = idle {
            self.attach(connection)
            return
        }
        guard pool.reserve(pick.id) else {
            self.finishPick(.neutral)
            self.metrics.error(.overflow)
            self.fail(.serviceUnavailable, "upstream connection limit")
            return
        }
        let connection: HTTPLoopUpstream
        do {
            connection = try self.open(pick)
        } catch {
            pool.forget(pick.id)
            self.connectFailed(pick, reason: "\(error)", timedOut: false)
            return
        }
        connection.owner = self
        self.pendingConnect = connection
        // Connected at once (a peer link's socket pair): the request goes now.
        if connection.connected { self.upstreamConnected(connection) }
    }

    /// A new connection to `pick`: a non-blocking connect (its deadline is checked at the tick), or for a
    /// backend at another site one end of a socket pair whose other end the peer link splices to a stream.
    private func open(_ pick: Pick) throws -> HTTPLoopUpstream {
        if pick.id.via != nil {
            var pair: [Int32] = [-1, -1]
            guard
                socketpair(
                    AF_UNIX,
                    Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue),
                    0,
                    &pair
                ) == 0
            else {
                throw SpliceLoop.Failure.system("socketpair", errno)
            }
            let connection = HTTPLoopUpstream(state: self.state, backend: pick.id, fd: pair[0], connected: true)
            self.loop.counters.upstreamChannels.add(1, ordering: .relaxed)
            do {
                try self.loop.register(pair[0], connection, events: SpliceEvents.stream)
            } catch {
                Glibc.close(pair[0])
                Glibc.close(pair[1])
                self.loop.counters.upstreamChannels.subtract(1, ordering: .relaxed)
                throw error
            }
            let other = pair[1]
            let upstreams = self.listener.upstreams
            let handle = self.handle
            Task {
                do {
                    try await upstreams.splice(
                        client: other,
                        service: handle.service,
                        servicePort: handle.key.port,
                        pick: pick
                    ) { _, _ in }
                } catch {
                    // The local end sees the end of input: a reset before any response.
                    Glibc.close(other)
                }
            }
            return connection
        }
        let fd = try SpliceSocket.connect(to: pick.address)
        let connection = HTTPLoopUpstream(state: self.state, backend: pick.id, fd: fd, connected: false)
        self.loop.counters.upstreamChannels.add(1, ordering: .relaxed)
        do {
            try self.loop.register(fd, connection, events: SpliceEvents.stream)
        } catch {
            self.loop.closeSocket(fd)
            self.loop.counters.upstreamChannels.subtract(1, ordering: .relaxed)
            throw error
        }
        return connection
    }

    /// A new upstream connection is up.
    func upstreamConnected(_ connection: HTTPLoopUpstream) {
        let expected = connection === self.pendingConnect
        if expected { self.pendingConnect = nil }
        guard expected, self.phase == .active, let exchange = self.exchange, exchange.upstream == nil else {
            // The client left meanwhile: kept for the next one.
            self.state.pool.release(connection, now: self.now)
            return
        }
        exchange.trace?.connected(now: .now())
        self.attach(connection)
        if !self.inRead { connection.flush() }
    }

    func upstreamConnectFailed(_ connection: HTTPLoopUpstream, code: Int32) {
        guard connection === self.pendingConnect else { return }
        self.pendingConnect = nil
        guard self.phase == .active, let exchange = self.exchange, let pick = exchange.pick,
            exchange.upstream == nil
        else { return }
        self.connectFailed(pick, reason: String(cString: strerror(code)), timedOut: code == ETIMEDOUT)
    }

    private func connectFailed(_ pick: Pick, reason: String, timedOut: Bool) {
        let exchange = self.exchange!
        exchange.trace?.attemptFailed("connect: \(reason)")
        self.metrics.error(.connectFailure)
        self.finishPick(.failure)
        if timedOut { exchange.connectTimedOut = true }
        self.loop.logger.debug(
            "upstream connect failed",
            metadata: ["service": "\(self.handle.service)", "backend": "\(pick.id)", "error": "\(reason)"]
        )
        let timedOutAny = exchange.connectTimedOut
        self.retryOrFail(
            status: timedOutAny ? .gatewayTimeout : .badGateway,
            reason: timedOutAny ? "upstream connect timeout" : "upstream connect error"
        )
    }

    private func attach(_ connection: HTTPLoopUpstream) {
        connection.owner = self
        let exchange = self.exchange!
        connection.sendHead(exchange.upstreamHead, method: exchange.method)
        exchange.tally = ByteTally(sent: exchange.upstreamHead.readableBytes)
        let sending = exchange.attach(
            connection,
            now: self.deadlineNow,
            responseTimeout: self.configuration.upstreamResponseTimeout
        )
        let chunked = exchange.chunkedRequest
        for buffer in sending.body {
            exchange.tally.sent &+= buffer.readableBytes
            connection.sendBody(buffer, chunked: chunked, allocator: self.allocator)
        }
        if sending.end { connection.sendEnd(trailers: sending.trailers, chunked: chunked, allocator: self.allocator) }
        if !self.inRead {
            connection.flush()
            // Reading may go on now that the body has somewhere to go.
            if self.readable, self.mayRead { self.service() }
        }
    }

    private func retryOrFail(status: HTTPResponseStatus, reason: String) {
        let exchange = self.exchange!
        let mayRetry = exchange.mayRetry(
            connectAttempts: self.state.configuration.connectAttempts,
            maxRetries: self.configuration.maxRetries
        )
        if mayRetry, self.takeRetryBudget() {
            exchange.retry()
            self.handle.stats.retries.add(1, ordering: .relaxed)
            self.dispatch()
        } else {
            self.fail(status, reason)
        }
    }

    private func takeRetryBudget() -> Bool {
        let exchange = self.exchange!
        if exchange.inRetryBudget { return true }
        guard self.retryBudget.take(self.handle.stats) else { return false }
        exchange.inRetryBudget = true
        return true
    }

    // MARK: response

    func upstreamRead(_ part: HTTPPart, from connection: HTTPLoopUpstream) {
        guard self.phase == .active, let exchange = self.exchange, exchange.upstream === connection else { return }
        switch part {
        case .head(let response):
            if response.status >= 200 || (response.status == 101 && exchange.isUpgrade) {
                self.noteFinalHead(response, exchange)
            }
            switch exchange.responseHead(response, allocator: self.allocator) {
            case .interim(let bytes):
                if let bytes {
                    exchange.tally.received &+= bytes.readableBytes
                    self.out.append(bytes)
                    self.flushClient()
                }
            case .awaitUpgrade:
                break
            case .refuse(let reason):
                self.metrics.error(.reset)
                self.finishPick(.failure)
                self.closeUpstream()
                self.fail(.badGateway, reason)
            case .forward(let head):
                exchange.tally.received &+= head.readableBytes
                self.out.append(head)
            }
        case .body(let buffer):
            switch exchange.responseBodyFraming() {
            case .raw?:
                exchange.tally.received &+= buffer.readableBytes
                self.out.append(buffer)
            case .chunked?:
                exchange.tally.received &+= buffer.readableBytes
                self.out.appendChunk(buffer, allocator: self.allocator)
            case .none?, nil: break
            }
        case .end(let trailers):
            switch exchange.responseEnd(atBoundary: connection.endedAtBoundary) {
            case .interim:
                break
            case .upgrade:
                self.upgrade()
            case .closeBoth(let lastChunk):
                if lastChunk { self.out.appendLastChunk(trailers: trailers, allocator: self.allocator) }
                self.endAccounting()
                self.finishPick(.neutral)
                self.closeUpstream()
                self.exchange = nil
                self.closeAfterFlush()
            case .finish(let lastChunk):
                if lastChunk { self.out.appendLastChunk(trailers: trailers, allocator: self.allocator) }
                self.finishIfDone()
                self.flushClient()
            }
        }
    }

    private func noteFinalHead(_ response: HTTPHead, _ exchange: HTTPLoopExchange) {
        let now = self.deadlineNow
        self.metrics.upstreamLatency.recordNanoseconds((now - exchange.upstreamStarted).nanoseconds)
        exchange.trace?.firstByte(status: response.status, now: .now())
        guard let pick = exchange.pick else { return }
        let failed = response.status >= 500 && self.state.configuration.outlier.countHTTP5xx
        if failed || exchange.isUpgrade || !exchange.pickInFlight {
            self.handle.report(pick, outcome: failed ? .failure : .success)
        } else {
            exchange.successPending = true
        }
    }

    /// The end of an upstream read burst: what it brought for the client goes out.
    func upstreamReadComplete() {
        self.flushClient()
    }

    func upstreamBecameWritable() {
        if self.readable, self.mayRead { self.service() }
    }

    func upstreamClosed(_ connection: HTTPLoopUpstream, error: (any Error)?) {
        guard self.phase == .active, let exchange = self.exchange, exchange.upstream === connection else { return }
        switch exchange.upstreamClosed(error: error) {
        case .none:
            return
        case .closeClient:
            self.finishPick(.failure)
            self.metrics.error(.reset)
            self.endAccounting()
            self.exchange = nil
            self.closeAfterFlush()
        case .retry(let status, let reason):
            exchange.trace?.attemptFailed(reason)
            self.finishPick(.failure)
            self.metrics.error(.reset)
            self.retryOrFail(status: status, reason: reason)
        case .fail(let status, let reason):
            self.finishPick(.failure)
            self.metrics.error(.reset)
            self.loop.logger.debug(
                "upstream failed",
                metadata: ["service": "\(self.handle.service)", "reason": "\(reason)"]
            )
            self.fail(status, reason)
        }
        if !self.inRead { self.flushClient() }
    }

    // MARK: endings

    private func finishPick(_ outcome: LoadBalancer.Outcome) {
        let exchange = self.exchange!
        guard exchange.pickInFlight, let pick = exchange.pick else { return }
        exchange.pickInFlight = false
        let tally = exchange.tally
        exchange.tally = ByteTally()
        self.handle.countStats(fromClient: tally.sent, toClient: tally.received)
        self.metrics.countBytes(fromClient: tally.sent, toClient: tally.received)
        if exchange.successPending {
            exchange.successPending = false
            if outcome == .neutral {
                self.handle.finish(pick, outcome: .success, bytes: tally)
                return
            }
            self.handle.report(pick, outcome: .success)
        }
        self.handle.finish(pick, outcome: outcome, bytes: tally)
    }

    private func endAccounting() {
        let exchange = self.exchange!
        self.handle.stats.activeRequests.subtract(1, ordering: .relaxed)
        if let trace = exchange.trace {
            exchange.trace = nil
            self.listener.traces?.record(trace.finish(now: .now()))
        }
        if exchange.inRetryBudget {
            exchange.inRetryBudget = false
            self.retryBudget.give(self.handle.stats)
        }
    }

    /// Detaches the exchange's upstream connection and closes it.
    private func closeUpstream() {
        guard let exchange = self.exchange, let upstream = exchange.upstream else { return }
        exchange.upstream = nil
        upstream.owner = nil
        upstream.close()
    }

    /// Ends the exchange when both its request and its response have: the upstream connection goes back to
    /// the pool only when the exchange says it is clean.
    private func finishIfDone() {
        guard self.phase == .active, let exchange = self.exchange, exchange.isDone else { return }
        self.endAccounting()
        self.finishPick(.neutral)
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            upstream.owner = nil
            if exchange.upstreamReturnsToPool {
                self.state.pool.release(upstream, now: self.now)
            } else {
                upstream.close()
            }
        }
        if exchange.keepAlive {
            self.becomeIdle()
        } else {
            self.exchange = nil
            self.closeAfterFlush()
        }
    }

    /// Answers the exchange with a short plain-text error (when no response has started) and ends it.
    private func fail(_ status: HTTPResponseStatus, _ reason: String) {
        guard self.phase == .active, let exchange = self.exchange else { return }
        exchange.trace?.failed(status: Int(status.code), reason: reason)
        self.endAccounting()
        self.finishPick(.neutral)
        self.closeUpstream()
        switch exchange.fail() {
        case .close:
            self.exchange = nil
            self.closeAfterFlush()
        case .answer(let keepAlive, let discardRest):
            self.exchange = nil
            self.writeStatusResponse(status, reason: reason, keepAlive: keepAlive)
            guard keepAlive else { return }
            if !discardRest {
                self.becomeIdle()
            } else {
                self.phase = .discarding
                self.idleSince = self.now
            }
        }
    }

    /// The client went away mid-exchange.
    private func abandon() {
        guard self.exchange != nil else { return }
        self.endAccounting()
        self.finishPick(.neutral)
        self.closeUpstream()
    }

    private func writeStatusResponse(_ status: HTTPResponseStatus, reason: String, keepAlive: Bool) {
        self.out.append(
            HTTPWire.statusResponse(
                status: status,
                text: "\(status.code) \(reason)\n",
                keepAlive: keepAlive,
                allocator: self.allocator
            )
        )
        if keepAlive {
            if !self.inRead { self.flushClient() }
        } else {
            self.exchange = nil
            self.closeAfterFlush()
        }
    }

    private func becomeIdle() {
        self.phase = .idle
        self.exchange = nil
        self.idleSince = self.now
        if self.quiescing {
            self.closeAfterFlush()
            return
        }
        // A request pipelined behind the one that ended, or reading held back for it.
        if !self.inRead, self.inbound != nil || (self.readable && self.mayRead) || (self.eof && !self.eofHandled) {
            self.service()
        }
    }

    // MARK: upgrade

    /// The 101 of an allowed upgrade ended: it goes to the client as it came, then both sockets leave HTTP for
    /// the TCP splice (`SpliceConnection`), with the bytes either side sent behind it.
    private func upgrade() {
        guard let exchange = self.exchange, let upstream = exchange.upstream,
            let response = exchange.upgradeResponse
        else { return }
        self.endAccounting()
        let pick = exchange.pickInFlight ? exchange.pick : nil
        exchange.pickInFlight = false
        self.phase = .upgraded
        self.exchange = nil
        exchange.upstream = nil
        var toClient: [ByteBuffer] = self.out.buffers
        toClient.append(response.bytes)
        if let behind = upstream.inbound.take() { toClient.append(behind) }
        var toUpstream: [ByteBuffer] = upstream.out.buffers
        if let behind = self.inbound.take() { toUpstream.append(behind) }
        self.out.removeAll()
        upstream.out.removeAll()
        let upstreamFD = upstream.detach()
        let clientFD = self.fd
        self.loop.deregister(clientFD)
        self.fd = -1
        self.state.retire(self)
        // The splice connection counts the client connection from now on (it was opened here).
        let splice = SpliceConnection(
            loop: self.loop,
            listener: self.listener,
            clientFD: clientFD,
            upgradedFrom: upstreamFD,
            pick: pick
        )
        splice.startUpgraded(toClient: toClient, toUpstream: toUpstream)
    }

    // MARK: writing and closing

    private func flushClient() {
        guard self.fd >= 0, !self.out.isEmpty else {
            if self.closeWhenFlushed, self.out.isEmpty { self.close() }
            return
        }
        switch self.out.flush(self.fd) {
        case .done:
            if self.closeWhenFlushed { self.close() }
        case .blocked:
            break
        case .failed(let code):
            if code == ECONNRESET || code == EPIPE { self.metrics.error(.reset) }
            self.close()
        }
    }

    /// Closes once what is queued went out (at once when nothing is).
    private func closeAfterFlush() {
        if self.phase == .active { self.abandon() }
        self.idleSince = self.now
        self.phase = .closed
        self.exchange = nil
        self.closeWhenFlushed = true
        if !self.inRead { self.flushClient() }
    }

    /// Closes the socket and ends what is in flight. Idempotent.
    func close() {
        guard self.fd >= 0 else {
            self.phase = .closed
            return
        }
        if self.phase == .active { self.abandon() }
        if let connecting = self.pendingConnect {
            // Its object goes with this one: its socket must not stay in the epoll set.
            self.pendingConnect = nil
            connecting.owner = nil
            connecting.close()
        }
        self.phase = .closed
        self.exchange = nil
        self.closeWhenFlushed = false
        self.loop.closeSocket(self.fd)
        self.fd = -1
        self.out.removeAll()
        self.inbound = nil
        self.handle.connectionClosed()
        self.listener.closed()
        self.loop.counters.downstreamChannels.subtract(1, ordering: .relaxed)
        self.state.retire(self)
    }

    // MARK: timer

    /// At the loop's tick: a request head too slow (or an idle keep-alive connection), a connect or a
    /// response too slow (504), a request or response body that stalled, a last response that does not go out.
    func checkTimeouts(now: UInt64) {
        let c = self.configuration
        switch self.phase {
        case .idle, .discarding:
            let limit = self.servedRequests == 0 ? c.requestHeadTimeout : c.clientIdleTimeout
            if now &- self.idleSince >= UInt64(max(limit.nanoseconds, 0)) { self.close() }
        case .active:
            let exchange = self.exchange!
            if exchange.upstream == nil, exchange.pickInFlight, let pick = exchange.pick,
                now &- UInt64(exchange.upstreamStarted.uptimeNanoseconds)
                    >= UInt64(max(self.state.configuration.connectTimeout.nanoseconds, 0))
            {
                // The connect of this attempt took too long: its socket goes, the next backend is tried.
                self.abandonConnect(pick)
                return
            }
            let timeout = exchange.timeout(
                now: .uptimeNanoseconds(now),
                lastClientRead: .uptimeNanoseconds(self.clientReadTime),
                lastUpstreamRead: .uptimeNanoseconds(self.upstreamReadTime),
                requestBodyTimeout: c.clientIdleTimeout,
                responseBodyTimeout: c.responseBodyTimeout
            )
            switch timeout {
            case .response?:
                self.metrics.error(.timeout)
                self.finishPick(.failure)
                self.closeUpstream()
                self.fail(.gatewayTimeout, "upstream response timeout")
                self.flushClient()
            case .requestBody?:
                self.close()
            case .responseBody?:
                self.metrics.error(.timeout)
                self.finishPick(.failure)
                self.close()
            case nil:
                break
            }
        case .closed:
            // A last response the client does not take.
            if self.closeWhenFlushed, now &- self.idleSince >= UInt64(max(c.clientIdleTimeout.nanoseconds, 0)) {
                self.close()
            }
        case .upgraded:
            break
        }
    }

    private func abandonConnect(_ pick: Pick) {
        if let connecting = self.pendingConnect {
            self.pendingConnect = nil
            connecting.owner = nil
            connecting.close()
        }
        self.connectFailed(pick, reason: "connect timed out", timedOut: true)
        if !self.inRead { self.flushClient() }
    }
}
