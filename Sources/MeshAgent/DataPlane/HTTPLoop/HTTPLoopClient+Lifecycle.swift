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

// `HTTPLoopClient`: upgrade to the TCP splice, writing and closing, and the timeouts checked at the tick.
extension HTTPLoopClient {
    // MARK: upgrade

    /// The 101 of an allowed upgrade ended: it goes to the client as it came, then both sockets leave HTTP for
    /// the TCP splice (`SpliceConnection`), with the bytes either side sent behind it.
    func upgrade() {
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

    func flushClient() {
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
    func closeAfterFlush() {
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
