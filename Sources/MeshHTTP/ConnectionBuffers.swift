import NIOCore
import NIOTLS
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// One TLS connection's large buffers, given back to the system while the connection is idle.
///
/// NIOSSL allocates two buffers per connection when its handler is added, from the channel's
/// allocator, and keeps them for the connection's life: the plaintext read buffer (32 KiB) and the
/// BIO's ciphertext output buffer (16 KiB). `LeanAllocator` maps them, so only the pages written
/// are resident, but every request and every watch event writes their first page: 8 KiB per idle
/// connection. Between bursts their bytes are dead: NIOSSL resets the read buffer after handing its
/// plaintext on (and `IdleBuffers` copies that plaintext, so nothing downstream points into it), and
/// the output buffer is cleared before its next record once the socket took what it held. So when a
/// connection has been quiet for a while, with nothing waiting to be written, `release()` drops
/// their pages (`madvise(MADV_DONTNEED)`); the next record faults a zeroed page back in.
///
/// The blocks tracked are the mapped ones (`LeanAllocator`, which must be the channel's allocator)
/// allocated on this thread while `tracking` runs (NIOSSL's handler being added), followed through
/// reallocation, and only those. A block NIOSSL obtains later by copy-on-write (its output buffer
/// while a socket write of the old one is still pending) is not tracked: it stays resident like any
/// other buffer.
public final class ConnectionBuffers: Sendable {
    private let blocks = Mutex<[(address: UInt, length: Int)]>([])

    public init() {}

    /// Runs `body` (adding NIOSSL's handler) with every mapped block this thread allocates meanwhile
    /// tracked.
    public func tracking<T>(_ body: () throws -> T) rethrows -> T {
        let previous = LeanAllocator.adopting.currentValue
        LeanAllocator.adopting.currentValue = self
        defer { LeanAllocator.adopting.currentValue = previous }
        return try body()
    }

    /// Blocks tracked now, and their mapped bytes.
    public var tracked: (blocks: Int, bytes: Int) {
        self.blocks.withLock { b in (b.count, b.reduce(0) { $0 + $1.length }) }
    }

    /// Drops the pages of every tracked block. Only call it when their bytes are dead (see the type's
    /// documentation); returns the bytes advised.
    @discardableResult
    public func release() -> Int {
        self.blocks.withLock { blocks in
            var advised = 0
            for b in blocks {
                if madvise(UnsafeMutableRawPointer(bitPattern: b.address), b.length, MADV_DONTNEED) == 0 {
                    advised += b.length
                }
            }
            return advised
        }
    }

    /// Bytes of the tracked blocks that are resident now (`mincore`).
    public var residentBytes: Int {
        self.blocks.withLock { blocks in
            let page = LeanAllocator.pageSize
            var resident = 0
            for b in blocks {
                var vector = [UInt8](repeating: 0, count: (b.length + page - 1) / page)
                guard mincore(UnsafeMutableRawPointer(bitPattern: b.address), b.length, &vector) == 0 else { continue }
                resident += vector.reduce(0) { $0 + Int($1 & 1) } * page
            }
            return resident
        }
    }

    func adopt(_ p: UnsafeMutableRawPointer, _ length: Int) {
        self.blocks.withLock { $0.append((UInt(bitPattern: p), length)) }
    }

    func forget(_ p: UnsafeMutableRawPointer) {
        let address = UInt(bitPattern: p)
        self.blocks.withLock { b in b.removeAll { $0.address == address } }
    }
}

/// Sits right after NIOSSL's handler and releases the connection's TLS buffers (`ConnectionBuffers`)
/// once it has been idle for `after`: no read, no write, nothing waiting in the socket's output
/// queue, and the handshake done.
///
/// It hands on a copy of every plaintext buffer NIOSSL reads (a small exact-size one from the heap),
/// so that nothing downstream (the HTTP decoder keeping a partial request) points into NIOSSL's
/// read buffer, whose bytes are then dead between reads. That copy also spares NIOSSL a
/// copy-on-write of its whole 32 KiB buffer whenever the decoder kept a partial request.
final class IdleBuffers: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = Any
    typealias OutboundOut = Any

    private let buffers: ConnectionBuffers
    private let after: TimeAmount
    private let counter: ReleaseCounter?
    private let heap = ByteBufferAllocator()
    private var timer: Scheduled<Void>?
    private var busy = false
    private var handshakeDone = false
    /// Releases done on this connection (for tests).
    private(set) var releases = 0

    init(buffers: ConnectionBuffers, after: TimeAmount, counter: ReleaseCounter? = nil) {
        self.buffers = buffers
        self.after = after
        self.counter = counter
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var plaintext = Self.unwrapInboundIn(data)
        var copy = self.heap.buffer(capacity: plaintext.readableBytes)
        copy.writeBuffer(&plaintext)
        self.touch(context)
        context.fireChannelRead(Self.wrapInboundOut(copy))
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        self.touch(context)
        context.write(data, promise: promise)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted = event as? TLSUserEvent {
            self.handshakeDone = true
            self.touch(context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
        self.timer = nil
    }

    /// Activity: the release waits for a quiet period of `after` from now on.
    private func touch(_ context: ChannelHandlerContext) {
        self.busy = true
        if self.timer == nil { self.arm(context) }
    }

    private func arm(_ context: ChannelHandlerContext) {
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: self.after) { [self] in
            self.timer = nil
            guard context.channel.isActive else { return }
            let queued = (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) ?? 1
            if self.busy || queued > 0 || !self.handshakeDone {
                self.busy = false
                self.arm(context)
                return
            }
            self.buffers.release()
            self.releases += 1
            self.counter?.add()
        }
    }
}

/// Releases of idle connections' TLS buffers, counted over a server.
final class ReleaseCounter: Sendable {
    private let count = Atomic<Int>(0)
    func add() { self.count.add(1, ordering: .relaxed) }
    var value: Int { self.count.load(ordering: .relaxed) }
}
