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
    let metrics: RouteMetrics
    let configuration: HTTPConfiguration
    private let settings: HTTPRequestPolicy.Settings
    let retryBudget: HTTPRetryBudget
    let allocator = ByteBufferAllocator()
    var fd: Int32
    private var parser: HTTPParser
    /// Bytes read and not parsed yet: a head split over reads, or a request pipelined behind the one in flight.
    var inbound: ByteBuffer?
    var readable = false
    var closing = false
    /// The client's input ended (EOF read); `eofHandled`: the parser and the exchange were told.
    var eof = false
    var eofHandled = false
    var out = HTTPLoopOutput()
    /// Close once `out` is written (a response with `connection: close`).
    var closeWhenFlushed = false
    var phase = Phase.idle
    var exchange: HTTPLoopExchange?
    private var exchangeIDs: UInt64 = 0
    var servedRequests = 0
    var quiescing = false
    private var rng = FastRandom()
    private let clientIP: IPAddress?
    private let clientIPText: String?
    /// The upstream connection being opened for the exchange in flight (not attached yet).
    var pendingConnect: HTTPLoopUpstream?
    /// Times (the loop's wake-up time): the end of the last exchange, the last client and upstream reads.
    var idleSince: UInt64
    var clientReadTime: UInt64
    var upstreamReadTime: UInt64
    /// Parts are being handed out of a client read (upstream bytes they cause go out at its end).
    var inRead = false
    /// Reads of this turn (`HTTPLoopState.readsPerTurn`), and whether the loop has this connection in its
    /// list of sockets to read again after the others.
    private var turnReads = 0
    private var yielded = false

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

    var loop: SpliceLoop { self.state.loop }
    var now: UInt64 { self.state.loop.now }
    var deadlineNow: NIODeadline { .uptimeNanoseconds(self.state.loop.now) }

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
    func service() {
        guard !self.inRead else { return }
        self.turnReads = 0
        repeat {
            self.serviceOnce()
            // A body whose upstream took what this burst brought: read on (edge-triggered, nothing else will),
            // unless this turn's reads are used up (the loop comes back after the other ready sockets).
        } while self.phase == .active && self.readable && self.mayRead && !self.yielded
    }

    /// The loop's next turn after this connection yielded: read on where it stopped.
    func resumeAfterYield() {
        self.yielded = false
        guard self.fd >= 0, self.phase != .closed, self.phase != .upgraded else { return }
        if self.readable || self.inbound != nil || (self.eof && !self.eofHandled) { self.service() }
    }

    private func serviceOnce() {
        self.inRead = true
        while self.phase != .closed, self.phase != .upgraded {
            if !self.parseHeld() { break }
            guard self.readable, self.mayRead else { break }
            if self.turnReads >= HTTPLoopState.readsPerTurn {
                // One connection's transfer does not hold the loop: the others' ready sockets go first.
                if !self.yielded {
                    self.yielded = true
                    self.state.yield(self)
                }
                break
            }
            let n = httpLoopRead(self.fd, scratch: self.loop.scratch, into: &self.inbound)
            if n > 0 {
                self.turnReads &+= 1
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
    var mayRead: Bool {
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
}
