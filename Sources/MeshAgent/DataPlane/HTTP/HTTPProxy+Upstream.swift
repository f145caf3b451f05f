import NIOCore
import NIOHTTP1

/// The response side of `HTTPProxyHandler` (called by `UpstreamHTTPHandler`), the ends of an exchange, and
/// the connection timer.
extension HTTPProxyHandler {
    // MARK: response

    func upstreamRead(_ part: HTTPPart, from connection: UpstreamConnection) {
        guard self.state == .active, let exchange = self.exchange, exchange.upstream === connection,
            let context = self.context
        else { return }
        switch part {
        case .head(let response):
            if response.status >= 200 || (response.status == 101 && exchange.isUpgrade) {
                self.noteFinalHead(response, exchange)
            }
            switch exchange.responseHead(response, allocator: self.allocator) {
            case .interim(let bytes):
                if let bytes {
                    exchange.tally.received &+= bytes.readableBytes
                    context.writeAndFlush(NIOAny(bytes), promise: nil)
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
                self.clientOut.queue(head, context: context)
            }
        case .body(let buffer):
            switch exchange.responseBodyFraming() {
            case .raw?:
                exchange.tally.received &+= buffer.readableBytes
                self.clientOut.queue(buffer, context: context)
            case .chunked?:
                exchange.tally.received &+= buffer.readableBytes
                self.clientOut.queueChunk(buffer, context: context)
            case .none?, nil: break
            }
        case .end(let trailers):
            switch exchange.responseEnd(atBoundary: connection.handler.decoder.endedAtBoundary) {
            case .interim:
                break
            case .upgrade:
                self.upgrade(context: context)
            case .closeBoth(let lastChunk):
                // Answered before the request was fully sent: neither side can be reused, and the rest of the
                // request has nowhere to go. End both.
                if lastChunk { self.clientOut.queueLastChunk(trailers: trailers, context: context) }
                self.clientOut.write(context: context)
                let done = context.writeAndFlush(NIOAny(self.allocator.buffer(capacity: 0)))
                self.endAccounting()
                self.finishPick(.neutral)
                self.closeUpstream()
                self.state = .closed
                self.exchange = nil
                done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
            case .finish(let lastChunk):
                if lastChunk { self.clientOut.queueLastChunk(trailers: trailers, context: context) }
                self.clientOut.flush(context: context)
                self.finishIfDone()
            }
        }
    }

    /// A final response head arrived: its latency, and its outcome for the balancer (a success is told with
    /// the end of the pick: one lock, not two, per request).
    private func noteFinalHead(_ response: HTTPHead, _ exchange: HTTPExchange) {
        let now = NIODeadline.now()
        self.metrics.upstreamLatency.recordNanoseconds((now - exchange.upstreamStarted).nanoseconds)
        exchange.trace?.firstByte(status: response.status, now: now)
        guard let pick = exchange.pick else { return }
        let failed = response.status >= 500 && self.environment.configuration.outlier.countHTTP5xx
        if failed || exchange.isUpgrade || !exchange.pickInFlight {
            self.handle.report(pick, outcome: failed ? .failure : .success)
        } else {
            exchange.successPending = true
        }
    }

    /// The end of an upstream read burst: what it brought for the client goes out now (a response that ended
    /// in it went out with its end already).
    func upstreamReadComplete() {
        self.upstreamReads &+= 1
        guard let context = self.context, self.clientOut.needsFlush else { return }
        self.clientOut.flush(context: context)
    }

    func upstreamBecameWritable() {
        self.updateReading()
    }

    func upstreamClosed(_ connection: UpstreamConnection, error: (any Error)?) {
        guard self.state == .active, self.exchange!.upstream === connection else { return }
        switch self.exchange!.upstreamClosed(error: error) {
        case .none:
            return
        case .closeClient:
            self.finishPick(.failure)
            self.metrics.error(.reset)
            self.context?.close(promise: nil)
        case .retry(let status, let reason):
            self.exchange!.trace?.attemptFailed(reason)
            self.finishPick(.failure)
            self.metrics.error(.reset)
            self.retryOrFail(status: status, reason: reason)
        case .fail(let status, let reason):
            self.finishPick(.failure)
            self.metrics.error(.reset)
            self.environment.logger.debug(
                "upstream failed",
                metadata: ["service": "\(self.handle.service)", "reason": "\(reason)"]
            )
            self.fail(status, reason)
        }
    }

    // MARK: endings

    func finishPick(_ outcome: LoadBalancer.Outcome) {
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
                // The usual end of an exchange: the head's success and the end in one call.
                self.handle.finish(pick, outcome: .success, bytes: tally)
                return
            }
            self.handle.report(pick, outcome: .success)
        }
        self.handle.finish(pick, outcome: outcome, bytes: tally)
    }

    func endAccounting() {
        self.handle.stats.activeRequests.subtract(1, ordering: .relaxed)
        if let trace = self.exchange!.trace {
            self.exchange!.trace = nil
            self.environment.traces.record(trace.finish(now: .now()))
        }
        if self.exchange!.inRetryBudget {
            self.exchange!.inRetryBudget = false
            self.retryBudget.give(self.handle.stats)
        }
    }

    /// Detaches the exchange's upstream connection and closes it.
    func closeUpstream() {
        guard let upstream = self.exchange!.upstream else { return }
        self.exchange!.upstream = nil
        upstream.handler.owner = nil
        upstream.channel.close(promise: nil)
    }

    /// Ends the exchange when both its request and its response have: the upstream connection goes back to
    /// the pool only when the exchange says it is clean (`HTTPExchange.upstreamReturnsToPool`).
    func finishIfDone() {
        guard self.state == .active, let exchange = self.exchange, exchange.isDone, let context = self.context else {
            return
        }
        self.endAccounting()
        self.finishPick(.neutral)
        if let upstream = exchange.upstream {
            exchange.upstream = nil
            upstream.handler.owner = nil
            if exchange.upstreamReturnsToPool, let pool = self.pool {
                pool.release(upstream)
            } else {
                upstream.channel.close(promise: nil)
            }
        }
        if exchange.keepAlive {
            self.becomeIdle()
        } else {
            self.state = .closed
            self.exchange = nil
            context.close(promise: nil)
        }
    }

    /// Answers the exchange with a short plain-text error (when no response has started) and ends it.
    func fail(_ status: HTTPResponseStatus, _ reason: String) {
        guard let context = self.context, self.state == .active else { return }
        self.exchange!.trace?.failed(status: Int(status.code), reason: reason)
        self.endAccounting()
        self.finishPick(.neutral)
        self.closeUpstream()
        switch self.exchange!.fail() {
        case .close:
            self.state = .closed
            self.exchange = nil
            context.close(promise: nil)
        case .answer(let keepAlive, let discardRest):
            Self.writeStatusResponse(context: context, status: status, reason: reason, keepAlive: keepAlive)
            if !keepAlive {
                self.state = .closed
                self.exchange = nil
            } else if !discardRest {
                self.becomeIdle()
            } else {
                self.state = .discarding
                self.exchange = nil
                self.idleSince = .now()
                self.updateReading()
            }
        }
    }

    /// The client went away mid-exchange.
    func abandon() {
        guard self.exchange != nil else { return }
        self.endAccounting()
        self.finishPick(.neutral)
        self.closeUpstream()
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

    func becomeIdle() {
        self.state = .idle
        self.exchange = nil
        self.exchangesEnded &+= 1
        if self.quiescing {
            self.state = .closed
            self.context?.close(promise: nil)
            return
        }
        if !self.queued.isEmpty { self.replayQueued() }
    }

    // MARK: timer

    func armTimer() {
        guard let context = self.context else { return }
        let c = self.configuration
        let shortest = min(
            c.requestHeadTimeout,
            c.clientIdleTimeout,
            c.upstreamResponseTimeout,
            c.responseBodyTimeout
        )
        let tick = TimeAmount.nanoseconds(max(shortest.nanoseconds / 4, TimeAmount.milliseconds(1).nanoseconds))
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: tick) { self.checkTimeouts() }
    }

    /// The connection timer: a request head too slow to come (or an idle keep-alive connection), a response
    /// too slow to start (504), a request or response body that stalled.
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
        if self.upstreamReads != self.upstreamReadsSeen {
            self.upstreamReadsSeen = self.upstreamReads
            self.lastUpstreamRead = now
        }
        switch self.state {
        case .idle, .discarding:
            let limit = self.servedRequests == 0 ? c.requestHeadTimeout : c.clientIdleTimeout
            if now - self.idleSince >= limit {
                self.state = .closed
                context.close(promise: nil)
                return
            }
        case .active:
            let timeout = self.exchange!.timeout(
                now: now,
                lastClientRead: self.lastClientRead,
                lastUpstreamRead: self.lastUpstreamRead,
                requestBodyTimeout: c.clientIdleTimeout,
                responseBodyTimeout: c.responseBodyTimeout
            )
            switch timeout {
            case .response?:
                self.metrics.error(.timeout)
                self.finishPick(.failure)
                self.closeUpstream()
                self.fail(.gatewayTimeout, "upstream response timeout")
            case .requestBody?:
                self.abandon()
                self.state = .closed
                self.exchange = nil
                context.close(promise: nil)
                return
            case .responseBody?:
                self.metrics.error(.timeout)
                self.finishPick(.failure)
                self.abandon()
                self.state = .closed
                self.exchange = nil
                context.close(promise: nil)
                return
            case nil:
                break
            }
        case .upgraded, .closed:
            return
        }
        self.armTimer()
    }
}
