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

// The request side of `HTTPLoopClient` towards the backends: pick, connect or borrow a pooled connection,
// attach it, retry within the budget.
extension HTTPLoopClient {
    /// Picks a backend and gets a connection to it (pooled or new).
    func dispatch() {
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
        guard let entry = pool.reserve(pick.id) else {
            self.finishPick(.neutral)
            self.metrics.error(.overflow)
            self.fail(.serviceUnavailable, "upstream connection limit")
            return
        }
        let connection: HTTPLoopUpstream
        do {
            connection = try self.open(pick, entry)
        } catch {
            pool.forget(entry)
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
    private func open(_ pick: Pick, _ entry: HTTPLoopBackendPool) throws -> HTTPLoopUpstream {
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
                throw SpliceLoop.Failure("socketpair", errno)
            }
            let connection = HTTPLoopUpstream(state: self.state, pool: entry, fd: pair[0], connected: true)
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
        let connection = HTTPLoopUpstream(state: self.state, pool: entry, fd: fd, connected: false)
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

    func connectFailed(_ pick: Pick, reason: String, timedOut: Bool) {
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

    func retryOrFail(status: HTTPResponseStatus, reason: String) {
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
}
