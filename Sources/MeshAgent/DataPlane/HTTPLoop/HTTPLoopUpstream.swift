import CLinux
import Logging
import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One upstream HTTP/1.1 connection of the epoll engine: a non-blocking socket registered once with its loop
/// (edge-triggered, input, output and peer shutdown), its response parser (`HTTPParser.nextResponsePart`: one
/// response per request), and the bytes not written yet. Owned by the client connection whose exchange it
/// carries, or idle in its loop's pool (`HTTPLoopPool`), where any input or end of input closes it (bytes a
/// backend sends too many never reach the next client).
final class HTTPLoopUpstream: SplicePollable {
    unowned(unsafe) let state: HTTPLoopState
    /// Its backend's entry in the loop's pool.
    let pool: HTTPLoopBackendPool
    var backend: BackendID { self.pool.id }
    private(set) var fd: Int32
    private var parser = HTTPParser(kind: .response)
    /// Bytes read and not parsed yet (bytes behind a 101 are the tunnel's).
    var inbound: ByteBuffer?
    var out = HTTPLoopOutput()
    /// An edge said there is input (or an end or error) not read yet.
    private(set) var readable = false
    private var closing = false
    private(set) var connected: Bool
    private(set) var closed = false
    /// The client connection whose exchange this carries; nil while idle in the pool.
    var owner: HTTPLoopClient?
    /// In the pool's idle list, since `idleSince`.
    var isIdle = false
    var idleSince: UInt64 = 0
    /// Counted in the pool's total for `backend` (until closed or upgraded).
    var counted = true
    private(set) var lastError: (any Error)?
    /// In the loop's list of sockets to read again after the others (`HTTPLoopState.readsPerTurn`).
    private var yielded = false

    init(state: HTTPLoopState, pool: HTTPLoopBackendPool, fd: Int32, connected: Bool) {
        self.state = state
        self.pool = pool
        self.fd = fd
        self.connected = connected
    }

    /// Bytes can be queued without going over the high water mark.
    var isWritable: Bool { self.out.bytes < self.state.configuration.writeBufferHighWaterMark }

    // MARK: sending

    func sendHead(_ bytes: ByteBuffer, method: HTTPMethod) {
        self.parser.expectResponse(to: method)
        self.out.append(bytes)
    }

    func sendBody(_ bytes: ByteBuffer, chunked: Bool, allocator: ByteBufferAllocator) {
        if chunked {
            self.out.appendChunk(bytes, allocator: allocator)
        } else {
            self.out.append(bytes)
        }
    }

    func sendEnd(trailers: ByteBuffer?, chunked: Bool, allocator: ByteBufferAllocator) {
        guard chunked else { return }
        self.out.appendLastChunk(trailers: trailers, allocator: allocator)
    }

    /// Writes what is queued (once connected); a failure closes the connection.
    func flush() {
        guard self.connected, !self.closed, !self.out.isEmpty else { return }
        if case .failed(let code) = self.out.flush(self.fd) {
            self.lastError = SpliceLoop.Failure("send", code)
            self.close()
        }
    }

    // MARK: events

    override func ready(_ events: UInt32) {
        guard !self.closed else { return }
        if events & (SpliceEvents.input | SpliceEvents.closing) != 0 { self.readable = true }
        if events & SpliceEvents.closing != 0 { self.closing = true }
        if !self.connected {
            guard events & (SpliceEvents.output | SpliceEvents.error | SpliceEvents.hangUp) != 0 else { return }
            var code: Int32 = 0
            var length = socklen_t(MemoryLayout<Int32>.size)
            if getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &code, &length) != 0 { code = errno }
            if code == 0, events & SpliceEvents.hangUp != 0 { code = ECONNREFUSED }
            if code != 0 {
                let owner = self.owner
                self.owner = nil
                self.close()
                owner?.upstreamConnectFailed(self, code: code)
                return
            }
            self.connected = true
            self.owner?.upstreamConnected(self)
            guard !self.closed else { return }
        } else if events & SpliceEvents.output != 0, !self.out.isEmpty {
            self.flush()
            guard !self.closed else { return }
            if self.isWritable { self.owner?.upstreamBecameWritable() }
        }
        if self.readable { self.read() }
    }

    /// Reads and parses while the owner's client can take more (back-pressure: otherwise the response is
    /// not read until it can, `resumeReading`).
    func read() {
        guard self.connected, !self.closed else { return }
        guard let owner = self.owner else {
            // Idle in the pool: input now is a protocol error or the backend closing; either way it is done.
            if self.readable { self.close() }
            return
        }
        let scratch = self.state.loop.scratch
        // Until drained, the client pushes back (its output edge resumes this, `resumeReading`), or this
        // turn's reads are used up (the loop comes back after the other ready sockets); what a round brought
        // goes to the client before the next.
        var turnReads = 0
        while true {
            var reads = 0
            while self.readable, !self.closed, self.owner === owner, owner.clientIsWritable {
                if turnReads >= HTTPLoopState.readsPerTurn { break }
                let n = httpLoopRead(self.fd, scratch: scratch, into: &self.inbound)
                if n > 0 {
                    turnReads &+= 1
                    reads &+= 1
                    if n < scratch.count && !self.closing { self.readable = false }
                    owner.upstreamReadTime = self.state.loop.now
                    self.parse(owner)
                } else if n == 0 {
                    reads &+= 1
                    self.readable = false
                    self.endOfInput(owner)
                } else {
                    let code = errno
                    if code == EAGAIN || code == EWOULDBLOCK {
                        self.readable = false
                    } else if code != EINTR {
                        self.lastError = SpliceLoop.Failure("recv", code)
                        self.close()
                    }
                }
            }
            if reads > 0 { owner.upstreamReadComplete() }
            guard reads > 0, self.readable, !self.closed, self.owner === owner, owner.clientIsWritable else { return }
            if turnReads >= HTTPLoopState.readsPerTurn {
                if !self.yielded {
                    self.yielded = true
                    self.state.yield(self)
                }
                return
            }
        }
    }

    /// The loop's next turn after this connection yielded: read on where it stopped.
    func resumeAfterYield() {
        self.yielded = false
        if !self.closed, self.readable { self.read() }
    }

    /// Hands the parts of the bytes read to the owner, one at a time, while it stays the owner.
    private func parse(_ owner: HTTPLoopClient) {
        guard var buffer = self.inbound.take() else { return }
        do {
            while self.owner === owner, !self.closed {
                guard let part = try self.parser.nextResponsePart(&buffer, held: 0) else { break }
                if case .end = part, self.parser.isPaused {
                    // A 101 ended: what follows it is the new protocol's, for the tunnel.
                    self.inbound = buffer.readableBytes > 0 ? buffer : nil
                    owner.upstreamRead(part, from: self)
                    return
                }
                owner.upstreamRead(part, from: self)
            }
        } catch {
            self.lastError = error
            self.close()
            return
        }
        if buffer.readableBytes > 0, !self.closed { self.inbound = buffer }
    }

    /// The response ended exactly at the end of the bytes read, and none are waiting in the socket.
    var endedAtBoundary: Bool { self.parser.endedAtBoundary && !self.readable && self.inbound == nil }

    private func endOfInput(_ owner: HTTPLoopClient) {
        var buffer = self.inbound.take() ?? httpLoopEmptyBuffer
        do {
            while self.owner === owner, !self.closed,
                let part = try self.parser.nextResponsePart(&buffer, held: 0)
            {
                owner.upstreamRead(part, from: self)
            }
            if self.owner === owner, !self.closed {
                try self.parser.finish(&buffer)
                while self.owner === owner, !self.closed, let part = try self.parser.next(&buffer) {
                    owner.upstreamRead(part, from: self)
                }
            }
        } catch {
            self.lastError = error
        }
        self.close()
    }

    /// Reading again after the owner's client drained.
    func resumeReading() {
        if self.readable { self.read() }
    }

    // MARK: closing

    /// Closes the socket; the owner (if any) hears `upstreamClosed`, the pool forgets it. Idempotent.
    func close() {
        guard !self.closed else { return }
        self.closed = true
        self.state.loop.closeSocket(self.fd)
        self.fd = -1
        self.out.removeAll()
        self.inbound = nil
        self.state.loop.counters.upstreamChannels.subtract(1, ordering: .relaxed)
        self.state.pool.closed(self)
        self.state.retire(self)
        if let owner = self.owner {
            self.owner = nil
            owner.upstreamClosed(self, error: self.lastError)
        }
    }

    /// Leaves HTTP for a tunnel: the socket is out of the epoll set and belongs to the caller.
    func detach() -> Int32 {
        let fd = self.fd
        self.state.loop.deregister(fd)
        self.closed = true
        self.fd = -1
        self.owner = nil
        self.state.pool.detach(self)
        self.state.retire(self)
        return fd
    }
}

/// One backend's upstream connections in one loop's pool: the idle ones (most recently used last) and the
/// count of all of them. A connection keeps its entry, so handing it back costs no lookup.
final class HTTPLoopBackendPool {
    let id: BackendID
    var idle: [HTTPLoopUpstream] = []
    var total = 0

    init(id: BackendID) {
        self.id = id
    }
}

/// The keep-alive upstream connections of one loop, per backend (`HTTPLoopBackendPool`): the count of all is
/// bounded by `maxConnectionsPerBackend`, the idle ones by `maxIdleConnectionsPerBackend`; idle ones close
/// after `upstreamIdleTimeout` (checked at the loop's HTTP tick). A backend's entry lives while it has
/// connections. One lookup by `BackendID` per request at most (hashing one costs ~300 instructions), none
/// when the request goes to the backend of the last lookup, as a keep-alive client's usually does.
final class HTTPLoopPool {
    private let configuration: DataPlaneConfiguration
    private var backends: [BackendID: HTTPLoopBackendPool] = [:]
    /// The entry of the last lookup.
    private var last: HTTPLoopBackendPool?
    private var idleCount = 0
    private var closedForGood = false

    init(configuration: DataPlaneConfiguration) {
        self.configuration = configuration
    }

    var isEmpty: Bool { self.idleCount == 0 }

    private func entry(_ backend: BackendID) -> HTTPLoopBackendPool? {
        if let last = self.last, last.id == backend { return last }
        guard let found = self.backends[backend] else { return nil }
        self.last = found
        return found
    }

    /// An idle, open connection to `backend`, if any.
    func takeIdle(_ backend: BackendID) -> HTTPLoopUpstream? {
        guard self.idleCount > 0, let entry = self.entry(backend) else { return nil }
        while let connection = entry.idle.popLast() {
            self.idleCount -= 1
            connection.isIdle = false
            if !connection.closed { return connection }
        }
        return nil
    }

    /// Whether one more connection to `backend` may be opened; if so, counts it in the entry returned,
    /// which the new connection keeps.
    func reserve(_ backend: BackendID) -> HTTPLoopBackendPool? {
        let limit = self.configuration.http.maxConnectionsPerBackend
        guard !self.closedForGood, limit > 0 else { return nil }
        let entry: HTTPLoopBackendPool
        if let found = self.entry(backend) {
            guard found.total < limit else { return nil }
            entry = found
        } else {
            entry = HTTPLoopBackendPool(id: backend)
            self.backends[backend] = entry
            self.last = entry
        }
        entry.total += 1
        return entry
    }

    /// A reserved connection that did not come about, or one closed or taken out of HTTP.
    func forget(_ entry: HTTPLoopBackendPool) {
        entry.total -= 1
        guard entry.total <= 0 else { return }
        entry.total = 0
        if self.backends[entry.id] === entry { self.backends[entry.id] = nil }
        if self.last === entry { self.last = nil }
    }

    /// Back into the pool after a clean exchange, or closed when the pool is full or shutting down.
    func release(_ connection: HTTPLoopUpstream, now: UInt64) {
        connection.owner = nil
        let entry = connection.pool
        guard !self.closedForGood, !connection.closed, connection.inbound == nil, connection.counted,
            entry.idle.count < self.configuration.http.maxIdleConnectionsPerBackend
        else {
            connection.close()
            return
        }
        connection.isIdle = true
        connection.idleSince = now
        entry.idle.append(connection)
        self.idleCount += 1
        // Input that came meanwhile (a backend closing, or bytes too many) ends it now.
        if connection.readable { connection.read() }
    }

    /// A connection closed: out of the idle list and the count.
    func closed(_ connection: HTTPLoopUpstream) {
        if connection.isIdle {
            connection.isIdle = false
            let entry = connection.pool
            if let i = entry.idle.firstIndex(where: { $0 === connection }) {
                entry.idle.remove(at: i)
                self.idleCount -= 1
            }
        }
        self.detach(connection)
    }

    /// A connection taken out of HTTP for good (upgraded to a tunnel).
    func detach(_ connection: HTTPLoopUpstream) {
        if connection.counted {
            connection.counted = false
            self.forget(connection.pool)
        }
    }

    /// Closes the connections idle longer than `upstreamIdleTimeout`.
    func sweep(now: UInt64) {
        guard self.idleCount > 0 else { return }
        let timeout = UInt64(max(self.configuration.http.upstreamIdleTimeout.nanoseconds, 0))
        var expired: [HTTPLoopUpstream] = []
        for entry in self.backends.values {
            for connection in entry.idle where now &- connection.idleSince >= timeout { expired.append(connection) }
        }
        for connection in expired { connection.close() }
    }

    func closeAll() {
        self.closedForGood = true
        let all = self.backends.values.flatMap(\.idle)
        for connection in all { connection.close() }
    }
}
