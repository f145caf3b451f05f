import CLinux
import MeshCore
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What carries the data plane's HTTP routes.
public enum HTTPEngine: String, StrictEnum, Hashable {
    /// NIO channels (`HTTP/HTTPProxy.swift`).
    case nio
    /// The epoll splice loops that carry TCP (`HTTPLoop/`): the same parser, request policy and exchange state
    /// machine, driven by non-blocking sockets without NIO's per-message machinery.
    case epoll
}

/// The exchange of the epoll engine.
typealias HTTPLoopExchange = HTTPExchangeOf<HTTPLoopUpstream>

/// The HTTP side of one splice loop: its client connections, its upstream keep-alive pool, and one timer
/// tick (a quarter of the shortest HTTP timeout) that checks every deadline; no timer is scheduled or
/// cancelled per request, and times are the loop's wake-up time (`SpliceLoop.now`), no clock read per event.
/// Everything here runs on the loop's thread.
final class HTTPLoopState {
    unowned(unsafe) let loop: SpliceLoop
    let configuration: DataPlaneConfiguration
    let pool: HTTPLoopPool
    /// Open client connections (epoll holds only unretained tokens).
    private var live: [ObjectIdentifier: HTTPLoopClient] = [:]
    /// Objects closed during the current batch of events: a later event of the batch may name them.
    private var retired: [SplicePollable] = []
    let tick: UInt64
    private(set) var nextTick: UInt64
    /// Sockets whose reads stopped at the per-turn bound (`readsPerTurn`) with input left: read again after
    /// the other ready sockets of the batch (`resumeYielded`), as the TCP splice's `runAgain`.
    private var yieldedClients: [HTTPLoopClient] = []
    private var yieldedUpstreams: [HTTPLoopUpstream] = []
    /// Full reads one socket may take per turn before the loop serves the others (the TCP splice's 16).
    static let readsPerTurn = 16

    init(loop: SpliceLoop) {
        self.loop = loop
        self.configuration = loop.configuration
        let http = loop.configuration.http
        let shortest = min(
            http.requestHeadTimeout,
            http.clientIdleTimeout,
            http.upstreamResponseTimeout,
            http.responseBodyTimeout,
            http.upstreamIdleTimeout,
            loop.configuration.connectTimeout
        )
        let tick = UInt64(max(shortest.nanoseconds / 4, 1_000_000))
        self.tick = tick
        self.nextTick = loop.now &+ tick
        self.pool = HTTPLoopPool(configuration: loop.configuration)
    }

    /// When the loop must wake for this state's timers.
    var deadline: UInt64 { self.live.isEmpty && self.pool.isEmpty ? .max : self.nextTick }

    func adopt(_ client: HTTPLoopClient) {
        self.live[ObjectIdentifier(client)] = client
        if self.nextTick == .max || self.live.count == 1 { self.nextTick = self.loop.now &+ self.tick }
    }

    func retire(_ client: HTTPLoopClient) {
        if let removed = self.live.removeValue(forKey: ObjectIdentifier(client)) { self.retired.append(removed) }
    }

    func retire(_ upstream: HTTPLoopUpstream) {
        self.retired.append(upstream)
    }

    /// Whether a socket waits to be read again: the loop polls without blocking.
    var hasYielded: Bool { !self.yieldedClients.isEmpty || !self.yieldedUpstreams.isEmpty }

    func yield(_ client: HTTPLoopClient) {
        self.loop.counters.httpLoopYields.add(1, ordering: .relaxed)
        self.yieldedClients.append(client)
    }

    func yield(_ upstream: HTTPLoopUpstream) {
        self.loop.counters.httpLoopYields.add(1, ordering: .relaxed)
        self.yieldedUpstreams.append(upstream)
    }

    /// Reads on the sockets that yielded during the last batch (each one turn more; they may yield again).
    func resumeYielded() {
        let clients = self.yieldedClients
        let upstreams = self.yieldedUpstreams
        self.yieldedClients = []
        self.yieldedUpstreams = []
        for client in clients { client.resumeAfterYield() }
        for upstream in upstreams { upstream.resumeAfterYield() }
    }

    /// After each batch of events: drop what closed in it, and run the timers when due.
    func afterBatch() {
        if !self.retired.isEmpty { self.retired.removeAll(keepingCapacity: true) }
        let now = self.loop.now
        guard now >= self.nextTick else { return }
        self.nextTick = now &+ self.tick
        for client in Array(self.live.values) { client.checkTimeouts(now: now) }
        self.pool.sweep(now: now)
        self.retired.removeAll(keepingCapacity: true)
    }

    /// The request in flight of each connection of `listener` is answered with `connection: close`; idle ones
    /// close now.
    func quiesce(of listener: SpliceListener) {
        for client in Array(self.live.values) where client.listener === listener { client.quiesce() }
    }

    func closeAll(of listener: SpliceListener) {
        for client in Array(self.live.values) where client.listener === listener { client.close() }
    }

    /// The loop is stopping.
    func closeAll() {
        for client in Array(self.live.values) { client.close() }
        self.pool.closeAll()
        self.yieldedClients = []
        self.yieldedUpstreams = []
        self.retired.removeAll()
    }
}

/// Bytes bound for one socket, written in order with one `send` or `writev` per flush; what the socket does
/// not take stays queued until its next output edge.
struct HTTPLoopOutput {
    private(set) var buffers: [ByteBuffer] = []
    private(set) var bytes = 0

    var isEmpty: Bool { self.buffers.isEmpty }

    mutating func append(_ buffer: ByteBuffer) {
        let count = buffer.readableBytes
        guard count > 0 else { return }
        self.buffers.append(buffer)
        self.bytes &+= count
    }

    /// Appends `body` as one chunk of a chunked body (nothing for an empty one: it would end the body).
    mutating func appendChunk(_ body: ByteBuffer, allocator: ByteBufferAllocator) {
        let count = body.readableBytes
        guard count > 0 else { return }
        var header = allocator.buffer(capacity: count <= 4096 ? count + 24 : 24)
        HTTPWire.writeChunkHeader(count, into: &header)
        if count <= 4096 {
            var body = body
            header.writeBuffer(&body)
            header.writeStaticString("\r\n")
            self.append(header)
        } else {
            self.append(header)
            self.append(body)
            self.append(ByteBuffer(staticString: "\r\n"))
        }
    }

    mutating func appendLastChunk(trailers: ByteBuffer?, allocator: ByteBufferAllocator) {
        var buffer = allocator.buffer(capacity: 32)
        HTTPWire.writeLastChunk(trailers: trailers, into: &buffer)
        self.append(buffer)
    }

    mutating func removeAll() {
        self.buffers.removeAll()
        self.bytes = 0
    }

    enum Flush {
        /// Everything went out.
        case done
        /// The socket took part: the rest waits for its output edge.
        case blocked
        case failed(Int32)
    }

    /// Writes what is queued to `fd`.
    mutating func flush(_ fd: Int32) -> Flush {
        while !self.buffers.isEmpty {
            let count = min(self.buffers.count, 16)
            let written: Int
            if count == 1 {
                written = self.buffers[0].withUnsafeReadableBytes {
                    send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL))
                }
            } else {
                written = Self.writev(fd, self.buffers, count: count)
            }
            if written < 0 {
                let code = errno
                if code == EINTR { continue }
                if code == EAGAIN || code == EWOULDBLOCK { return .blocked }
                return .failed(code)
            }
            var left = written
            self.bytes &-= written
            var consumed = 0
            while consumed < count {
                let size = self.buffers[consumed].readableBytes
                if left >= size {
                    left -= size
                    consumed += 1
                } else {
                    self.buffers[consumed].moveReaderIndex(forwardBy: left)
                    left = 0
                    break
                }
            }
            if consumed == self.buffers.count {
                self.buffers.removeAll(keepingCapacity: true)
            } else if consumed > 0 {
                self.buffers.removeFirst(consumed)
            }
            if !self.buffers.isEmpty && consumed < count { return .blocked }
        }
        return .done
    }

    /// One `writev` of the first `count` buffers (their storage stays alive in `buffers` meanwhile).
    private static func writev(_ fd: Int32, _ buffers: [ByteBuffer], count: Int) -> Int {
        withUnsafeTemporaryAllocation(of: iovec.self, capacity: count) { vectors in
            for i in 0..<count {
                let (base, size) = buffers[i].withUnsafeReadableBytes { ($0.baseAddress, $0.count) }
                vectors[i] = iovec(iov_base: UnsafeMutableRawPointer(mutating: base), iov_len: size)
            }
            var message = msghdr()
            message.msg_iov = vectors.baseAddress
            message.msg_iovlen = count
            return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
        }
    }
}

/// An empty buffer to parse when nothing is held (the parser may have parts ready): shared, no allocation.
let httpLoopEmptyBuffer = ByteBuffer()

/// Reads from a non-blocking socket into the loop's buffer and appends to `inbound`: how much was read
/// (0: end of input), or -1 with `errno` (EAGAIN: drained).
@inline(__always)
func httpLoopRead(_ fd: Int32, scratch: UnsafeMutableRawBufferPointer, into inbound: inout ByteBuffer?) -> Int {
    let n = recv(fd, scratch.baseAddress, scratch.count, 0)
    guard n > 0 else { return n }
    let bytes = UnsafeRawBufferPointer(start: scratch.baseAddress, count: n)
    if inbound == nil {
        inbound = ByteBuffer(bytes: bytes)
    } else {
        inbound!.writeBytes(bytes)
    }
    return n
}
