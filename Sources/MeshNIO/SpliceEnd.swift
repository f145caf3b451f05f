#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Something registered with an epoll set (`EpollCore.register`) whose token is the object's address, so an
/// event costs no look-up: the loop hands it the events.
open class EpollPollable {
    public init() {}

    /// Called on the loop's thread with the epoll events.
    open func ready(_ events: UInt32) {}
}

/// One socket of a splice, as the agent's proxied connections and the relay's circuits keep it: the edge
/// flags, the end of input, the shut write side, and the bytes read from the other socket that this one has
/// not taken yet (at most one read's worth: a side that holds bytes is not fed again until they have gone).
/// Used on its loop's thread only.
open class SpliceEnd: EpollPollable {
    public final var fd: Int32
    /// An edge said there is input (or an EOF or error) not read yet.
    public final var readable = false
    /// End of input or an error was signalled: read until EAGAIN, EOF or the error; a short read proves nothing.
    public final var closing = false
    /// Input ended (EOF read).
    public final var eof = false
    /// Its write side is shut down (after the other side's EOF and what was held for it).
    public final var shut = false
    /// Bytes from the other side that this socket has not taken yet.
    public final private(set) var pending: UnsafeMutableRawBufferPointer?
    @usableFromInline final var pendingStart = 0

    public init(fd: Int32 = -1) {
        self.fd = fd
    }

    /// Takes an event's input and closing bits.
    @inlinable @inline(__always)
    public final func note(_ events: UInt32) {
        if events & (EpollCore.Events.input | EpollCore.Events.closing) != 0 { self.readable = true }
        if events & EpollCore.Events.closing != 0 { self.closing = true }
    }

    /// Keeps a copy of `bytes` until the socket is writable again (nothing when empty).
    public final func hold(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 1)
        copy.copyMemory(from: bytes)
        self.hold(taking: copy)
    }

    /// Keeps `bytes` (now owned by this side) until the socket is writable again.
    public final func hold(taking bytes: UnsafeMutableRawBufferPointer) {
        self.dropPending()
        self.pending = bytes
        self.pendingStart = 0
    }

    public final func dropPending() {
        self.pending?.deallocate()
        self.pending = nil
        self.pendingStart = 0
    }

    /// Passes the other side's end of input on: `shutdown(SHUT_WR)`, once.
    public final func shutWrite() {
        guard !self.shut else { return }
        self.shut = true
        _ = shutdown(self.fd, Int32(SHUT_WR))
    }

    public enum Flush {
        /// Nothing is held any more (the write side was shut when `peerEnded`).
        case done
        /// The socket is full: the rest waits for its output edge.
        case blocked
        case failed(Int32)
    }

    /// Writes what is held (`SocketPump.flush`); when it has all gone and the other side's input has ended,
    /// shuts this side's write side.
    public final func flushHeld(peerEnded: Bool) -> Flush {
        guard let pending = self.pending else { return .done }
        let (done, error) = SocketPump.flush(self.fd, pending, from: &self.pendingStart)
        if let error { return .failed(error) }
        guard done else { return .blocked }
        self.dropPending()
        if peerEnded { self.shutWrite() }
        return .done
    }

    /// Both sides sent their end of input and both were passed on: nothing more can flow.
    @inlinable
    public static func bothEnded(_ a: SpliceEnd, _ b: SpliceEnd) -> Bool { a.eof && b.eof && a.shut && b.shut }
}

extension SocketPump {
    /// How `move` stopped.
    public enum Step {
        /// The source has nothing more now, or its input ended (and was passed on, or will be with the held bytes).
        case done
        /// The target took only part of the last read: this many bytes are held for it.
        case held(Int)
        /// `maxBursts` reads moved and there may be more: run it again after the other ready sockets.
        case again
        case failed(Int32)
    }

    /// `pump` between two splice ends, and what every splice does with its outcome: what the target could not
    /// take is held for it, and an end of input is passed on as `shutdown(SHUT_WR)` unless bytes are held
    /// (then `SpliceEnd.flushHeld` passes it on). Nothing moves while the target holds bytes or after the
    /// source's end of input. Returns the bytes read.
    @inlinable @inline(__always)
    public static func move(
        from source: SpliceEnd,
        to target: SpliceEnd,
        through buffer: UnsafeMutableRawBufferPointer
    ) -> (moved: Int, step: Step) {
        guard target.pending == nil, !source.eof else { return (0, .done) }
        let (moved, outcome) = SocketPump.pump(
            from: source.fd,
            to: target.fd,
            through: buffer,
            readable: &source.readable,
            closing: source.closing
        )
        switch outcome {
        case .drained:
            return (moved, .done)
        case .again:
            return (moved, .again)
        case .held(let rest):
            target.hold(rest)
            return (moved, .held(rest.count))
        case .end:
            source.eof = true
            if target.pending == nil { target.shutWrite() }
            return (moved, .done)
        case .failed(let code):
            return (moved, .failed(code))
        }
    }
}

/// Whether a spliced connection has been quiet for an idle timeout, without a clock read per byte: each read
/// burst counts one (`touch`), and a sweep (every fraction of the timeout) compares the count with the one
/// it saw last. Quiet means no burst between sweeps for `timeout`.
public struct IdleTracker {
    @usableFromInline var activity: UInt64 = 0
    private var swept: UInt64 = 0
    private var quietSince: UInt64

    public init(now: UInt64) {
        self.quietSince = now
    }

    @inlinable @inline(__always)
    public mutating func touch() { self.activity &+= 1 }

    /// True when nothing moved since the sweep that last saw a change, `timeout` or more ago (`now` and
    /// `timeout` in the same unit, nanoseconds of `EpollCore.monotonic()` in both splices).
    public mutating func isIdle(now: UInt64, timeout: UInt64) -> Bool {
        if self.activity != self.swept {
            self.swept = self.activity
            self.quietSince = now
            return false
        }
        return now &- self.quietSince >= timeout
    }
}
