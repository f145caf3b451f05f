import CLinux
import Logging
import MeshCore
import MeshNIO
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One socket of a spliced connection (`MeshNIO.SpliceEnd`). Its epoll token is this object; what it reads
/// goes to `peer`.
final class SpliceSide: SpliceEnd {
    unowned(unsafe) let connection: SpliceConnection
    let isClient: Bool

    init(connection: SpliceConnection, isClient: Bool) {
        self.connection = connection
        self.isClient = isClient
        super.init()
    }

    override func ready(_ events: UInt32) {
        self.connection.ready(self, events)
    }
}

/// A proxied TCP connection: the accepted client socket and its upstream socket, both on one splice loop.
///
/// Bytes move in bursts: on an edge, read into the loop's buffer and send to the other socket at once; a
/// short read means the socket is drained (a new edge comes with new data), so a 64-byte request costs one
/// `recv` and one `send`. When the other socket cannot take everything, the rest is copied aside and this
/// side is not read again until it has gone (back-pressure: at most 64 KiB held per direction). An EOF on
/// one side becomes `shutdown(SHUT_WR)` on the other once its pending bytes are written; the connection
/// closes when both directions have ended, on any error, on the idle timeout, or when its route's drain ends.
final class SpliceConnection {
    unowned(unsafe) let loop: SpliceLoop
    let listener: SpliceListener
    private(set) var client: SpliceSide!
    private(set) var upstream: SpliceSide!
    private let metrics: RouteMetrics
    private let hash: UInt64

    private enum State {
        case connecting
        case open
        case closed
    }

    private var state = State.connecting
    private var tried: [BackendID] = []
    /// The backend being connected to or in use (finished by its balancer slot, see `RouteHandle.finish`).
    private var pick: Pick?
    private var connectStarted: UInt64 = 0
    private(set) var connectDeadline: UInt64 = .max
    private var errorReported = false
    /// Read bursts, for the idle sweep.
    private var idle: IdleTracker
    /// Bytes this connection carried each way, for its backend's counters when it ends.
    private var tally = ByteTally()

    var isConnecting: Bool { self.state == .connecting }

    init(loop: SpliceLoop, listener: SpliceListener, clientFD: Int32, hash: UInt64, tried: [BackendID] = []) {
        self.loop = loop
        self.listener = listener
        self.metrics = listener.handle.metrics
        self.hash = hash
        self.tried = tried
        self.idle = IdleTracker(now: loop.now)
        self.client = SpliceSide(connection: self, isClient: true)
        self.upstream = SpliceSide(connection: self, isClient: false)
        self.client.fd = clientFD
    }

    /// A connection the HTTP engine upgraded (`HTTPLoopClient.upgrade`): both sockets connected, the client
    /// one already counted open (by the HTTP connection), `pick` (if still in flight) finished when it ends.
    init(loop: SpliceLoop, listener: SpliceListener, clientFD: Int32, upgradedFrom upstreamFD: Int32, pick: Pick?) {
        self.loop = loop
        self.listener = listener
        self.metrics = listener.handle.metrics
        self.hash = 0
        self.idle = IdleTracker(now: loop.now)
        self.client = SpliceSide(connection: self, isClient: true)
        self.upstream = SpliceSide(connection: self, isClient: false)
        self.client.fd = clientFD
        self.upstream.fd = upstreamFD
        self.pick = pick
        self.state = .open
    }

    /// Starts splicing an upgraded connection: `toClient` (the 101 and what came behind it) and `toUpstream`
    /// (what the client sent behind its request) go first, held like any bytes a side did not take yet.
    func startUpgraded(toClient: [ByteBuffer], toUpstream: [ByteBuffer]) {
        self.loop.adopt(self)
        for (side, buffers) in [(self.client!, toClient), (self.upstream!, toUpstream)] {
            let count = buffers.reduce(0) { $0 + $1.readableBytes }
            guard count > 0 else { continue }
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 1)
            var at = 0
            for buffer in buffers {
                buffer.withUnsafeReadableBytes { bytes in
                    UnsafeMutableRawBufferPointer(rebasing: copy[at..<(at + bytes.count)]).copyMemory(from: bytes)
                    at += bytes.count
                }
            }
            side.hold(taking: copy)
        }
        do {
            try self.loop.register(self.client.fd, self.client, events: SpliceEvents.stream)
            try self.loop.register(self.upstream.fd, self.upstream, events: SpliceEvents.stream)
        } catch {
            self.loop.logger.warning("splice: cannot watch an upgraded connection", metadata: ["error": "\(error)"])
            self.close()
            return
        }
        // Registering reports what is ready now: each side's output edge writes what is held for it.
        for side in [self.client!, self.upstream!] where self.state == .open && side.pending != nil {
            if self.flushPending(side) { self.pump(from: side.peer(self), to: side) }
        }
    }

    /// Registers the client socket and starts connecting upstream.
    func start() {
        let handle = self.listener.handle
        self.loop.adopt(self)
        self.listener.opened()
        handle.connectionOpened()
        self.loop.counters.downstreamChannels.add(1, ordering: .relaxed)
        do {
            try self.loop.register(self.client.fd, self.client, events: SpliceEvents.stream)
        } catch {
            self.loop.logger.warning("splice: cannot watch an accepted socket", metadata: ["error": "\(error)"])
            self.close()
            return
        }
        self.attempt()
    }

    // MARK: connecting

    /// Tries backends one after another (up to `connectAttempts`) until one accepts.
    private func attempt() {
        let handle = self.listener.handle
        guard self.state == .connecting else { return }
        guard let pick = handle.pick(hash: self.hash, excluding: self.tried) else {
            self.metrics.error(self.tried.isEmpty ? .noBackend : .connectFailure)
            self.loop.logger.debug(
                "no backend for connection",
                metadata: ["service": "\(handle.service)", "tried": "\(self.tried.count)"]
            )
            self.close()
            return
        }
        self.tried.append(pick.id)
        if pick.id.via != nil {
            self.handOver(pick)
            return
        }
        self.pick = pick
        self.connectStarted = SpliceLoop.monotonic()
        let fd: Int32
        do {
            fd = try SpliceSocket.connect(to: pick.address)
        } catch {
            self.connectFailed(error)
            return
        }
        self.upstream.fd = fd
        self.loop.counters.upstreamChannels.add(1, ordering: .relaxed)
        do {
            try self.loop.register(fd, self.upstream, events: SpliceEvents.stream)
        } catch {
            self.connectFailed(error)
            return
        }
        self.connectDeadline =
            self.connectStarted &+ UInt64(max(self.loop.configuration.connectTimeout.nanoseconds, 0))
        self.loop.connectStarted(self)
    }

    /// A backend at another site: the client's socket (not read yet) leaves this loop for the peer link,
    /// which registers it with NIO on the link's event loop and splices it to a stream (`Upstreams.splice`).
    /// This connection object ends here; the link counts the stream's bytes (`/peers`) and tells them at its
    /// end for the route's and the endpoint's counters (which also count it active until then). When the link refuses
    /// or cannot be reached before it took the socket, the socket comes back to this loop for the next
    /// backend (up to `connectAttempts`), as a failed connect does.
    private func handOver(_ pick: Pick) {
        let handle = self.listener.handle
        let listener = self.listener
        let loop = self.loop
        let fd = self.client.fd
        let hash = self.hash
        let tried = self.tried
        let attempts = loop.configuration.connectAttempts
        let upstreams = listener.upstreams
        loop.deregister(fd)
        self.client.fd = -1
        self.close()
        let started = SpliceLoop.monotonic()
        // Active again while the link carries it: it ends (bytes, the pick's end) when the splice does.
        handle.connectionResumed()
        Task {
            do {
                try await upstreams.splice(
                    client: fd,
                    service: handle.service,
                    servicePort: handle.key.port,
                    pick: pick
                ) { fromClient, toClient in
                    handle.countBytes(fromClient: fromClient, toClient: toClient)
                    handle.finish(pick, outcome: .neutral, bytes: ByteTally(sent: fromClient, received: toClient))
                    handle.connectionClosed()
                }
                handle.metrics.upstreamLatency.recordNanoseconds(Int64(clamping: SpliceLoop.monotonic() &- started))
                handle.report(pick, outcome: .success)
            } catch {
                handle.connectionClosed()
                handle.finish(pick, outcome: .failure)
                handle.metrics.error(.connectFailure)
                loop.logger.debug(
                    "peer stream failed",
                    metadata: ["service": "\(handle.service)", "backend": "\(pick.id)", "error": "\(error)"]
                )
                let queued = loop.execute {
                    if tried.count < attempts {
                        SpliceConnection(loop: loop, listener: listener, clientFD: fd, hash: hash, tried: tried).start()
                    } else {
                        Glibc.close(fd)
                    }
                }
                if !queued { Glibc.close(fd) }
            }
        }
    }

    private func connectFailed(_ error: any Error) {
        let handle = self.listener.handle
        if let pick = self.pick {
            handle.finish(pick, outcome: .failure)
            self.pick = nil
        }
        self.metrics.error(.connectFailure)
        self.loop.logger.debug(
            "upstream connect failed",
            metadata: [
                "service": "\(handle.service)", "backend": "\(self.tried.last.map { "\($0)" } ?? "-")",
                "error": "\(error)",
            ]
        )
        self.closeUpstreamSocket()
        self.upstream.readable = false
        self.upstream.closing = false
        if self.tried.count < self.loop.configuration.connectAttempts {
            self.attempt()
        } else {
            self.close()
        }
    }

    func connectTimedOut() {
        guard self.state == .connecting, self.upstream.fd >= 0 else { return }
        self.connectFailed(SpliceLoop.Failure("connect", ETIMEDOUT))
    }

    private func connected() {
        let handle = self.listener.handle
        self.state = .open
        self.connectDeadline = .max
        let elapsed = SpliceLoop.monotonic() &- self.connectStarted
        self.metrics.upstreamLatency.recordNanoseconds(Int64(clamping: elapsed))
        if let pick = self.pick { handle.report(pick, outcome: .success) }
        // Input that arrived while connecting, either way (server-first protocols too).
        self.pump(from: self.client, to: self.upstream)
        if self.state == .open { self.pump(from: self.upstream, to: self.client) }
    }

    private func closeUpstreamSocket() {
        guard self.upstream.fd >= 0 else { return }
        self.loop.closeSocket(self.upstream.fd)
        self.upstream.fd = -1
        self.loop.counters.upstreamChannels.subtract(1, ordering: .relaxed)
    }

    // MARK: events

    func ready(_ side: SpliceSide, _ events: UInt32) {
        switch self.state {
        case .closed:
            return
        case .connecting:
            if side.isClient {
                side.note(events)
                return
            }
            guard events & (SpliceEvents.output | SpliceEvents.error | SpliceEvents.hangUp) != 0 else { return }
            var code: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            let rc = getsockopt(side.fd, SOL_SOCKET, SO_ERROR, &code, &length)
            if rc != 0 { code = errno }
            if code != 0 {
                self.connectFailed(SpliceLoop.Failure("connect", code))
                return
            }
            side.note(events)
            self.connected()
        case .open:
            side.note(events)
            if events & SpliceEvents.output != 0, side.pending != nil {
                // Drained: what the peer held back can flow again. Not drained: this side's own input still
                // flows the other way below (a client that writes before it reads must not stall).
                if self.flushPending(side) { self.pump(from: side.peer(self), to: side) }
                guard self.state == .open else { return }
            }
            if side.readable { self.pump(from: side, to: side.peer(self)) }
        }
    }

    /// Continues a pump that stopped at its per-event bound.
    func resume() {
        guard self.state == .open else { return }
        if self.client.readable { self.pump(from: self.client, to: self.upstream) }
        if self.state == .open, self.upstream.readable { self.pump(from: self.upstream, to: self.client) }
    }

    // MARK: moving bytes

    /// Moves bytes from `source` to `target` (`SocketPump.move`: until `source` is drained, `target` pushes
    /// back, or 16 full reads have moved).
    private func pump(from source: SpliceSide, to target: SpliceSide) {
        let (moved, step) = SocketPump.move(from: source, to: target, through: self.loop.scratch)
        // Before anything below can end the connection: the tally goes to the backend when it ends.
        if source.isClient { self.tally.sent &+= moved } else { self.tally.received &+= moved }
        self.count(moved, fromClient: source.isClient)
        switch step {
        case .done:
            break
        case .again:
            self.loop.runAgain(self)
        case .held(let count):
            self.loop.counters.noteBuffered(count)
        case .failed(let code):
            self.fail(code)
            return
        }
        if SpliceEnd.bothEnded(self.client, self.upstream) { self.close() }
    }

    private func count(_ bytes: Int, fromClient: Bool) {
        guard bytes > 0 else { return }
        self.idle.touch()
        let handle = self.listener.handle
        if fromClient {
            handle.countStats(fromClient: bytes, toClient: 0)
            self.metrics.countBytes(fromClient: bytes, toClient: 0)
        } else {
            handle.countStats(fromClient: 0, toClient: bytes)
            self.metrics.countBytes(fromClient: 0, toClient: bytes)
        }
    }

    /// Writes what is pending for `side`; true when nothing is left.
    private func flushPending(_ side: SpliceSide) -> Bool {
        switch side.flushHeld(peerEnded: side.peer(self).eof) {
        case .blocked:
            return false
        case .failed(let code):
            self.fail(code)
            return false
        case .done:
            if SpliceEnd.bothEnded(self.client, self.upstream) {
                self.close()
                return false
            }
            return true
        }
    }

    private func fail(_ code: Int32) {
        if !self.errorReported, code == ECONNRESET || code == EPIPE {
            self.errorReported = true
            self.metrics.error(.reset)
        }
        self.close()
    }

    // MARK: closing

    /// True when the connection has been quiet for `timeout` (compared at sweeps, see `SpliceLoop`).
    func checkIdle(now: UInt64, timeout: UInt64) -> Bool { self.idle.isIdle(now: now, timeout: timeout) }

    /// Closes both sockets and settles the counters. Idempotent.
    func close() {
        guard self.state != .closed else { return }
        let wasOpen = self.state == .open
        self.state = .closed
        let handle = self.listener.handle
        if self.client.fd >= 0 {
            self.loop.closeSocket(self.client.fd)
            self.client.fd = -1
        }
        self.closeUpstreamSocket()
        self.client.dropPending()
        self.upstream.dropPending()
        if wasOpen, let pick = self.pick { handle.finish(pick, outcome: .neutral, bytes: self.tally) }
        self.pick = nil
        handle.connectionClosed()
        self.listener.closed()
        self.loop.counters.downstreamChannels.subtract(1, ordering: .relaxed)
        self.loop.retire(self)
    }
}

extension SpliceSide {
    /// The other socket of the connection.
    @inline(__always)
    func peer(_ connection: SpliceConnection) -> SpliceSide {
        self.isClient ? connection.upstream : connection.client
    }
}
