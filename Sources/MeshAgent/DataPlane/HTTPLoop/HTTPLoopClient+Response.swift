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

// `HTTPLoopClient`: the response from the upstream to the client, and how an exchange ends.
extension HTTPLoopClient {
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
                self.handle.finish(pick, outcome: .success, bytes: tally)
                return
            }
            self.handle.report(pick, outcome: .success)
        }
        self.handle.finish(pick, outcome: outcome, bytes: tally)
    }

    func endAccounting() {
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
    func closeUpstream() {
        guard let exchange = self.exchange, let upstream = exchange.upstream else { return }
        exchange.upstream = nil
        upstream.owner = nil
        upstream.close()
    }

    /// Ends the exchange when both its request and its response have: the upstream connection goes back to
    /// the pool only when the exchange says it is clean.
    func finishIfDone() {
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
    func fail(_ status: HTTPResponseStatus, _ reason: String) {
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
    func abandon() {
        guard self.exchange != nil else { return }
        self.endAccounting()
        self.finishPick(.neutral)
        self.closeUpstream()
    }

    func writeStatusResponse(_ status: HTTPResponseStatus, reason: String, keepAlive: Bool) {
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

    func becomeIdle() {
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
}
