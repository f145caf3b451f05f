import CLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The part every epoll thread of ours shares (the agent's splice loops, the relay's circuit loops): an epoll
/// set, an eventfd that wakes it (token 0), and the tasks other threads hand it. Everything but `execute(_:)`
/// and `stop()` is called on the loop's own thread; a token is the address of the object an event is for.
public final class EpollCore: @unchecked Sendable {
    public struct Failure: Error, CustomStringConvertible {
        public let call: String
        public let code: Int32

        public init(_ call: String, _ code: Int32) {
            self.call = call
            self.code = code
        }

        public var description: String { "\(self.call): \(String(cString: strerror(self.code))) (errno \(self.code))" }
    }

    /// epoll event bits as `UInt32`.
    public enum Events {
        public static let input = UInt32(EPOLLIN.rawValue)
        public static let output = UInt32(EPOLLOUT.rawValue)
        public static let readHangUp = UInt32(EPOLLRDHUP.rawValue)
        public static let hangUp = UInt32(EPOLLHUP.rawValue)
        public static let error = UInt32(EPOLLERR.rawValue)
        public static let edge = UInt32(EPOLLET.rawValue)
        public static let exclusive = UInt32(EPOLLEXCLUSIVE.rawValue)
        /// A connected socket: readable, writable, peer shut down, edge-triggered (registered once, never
        /// modified: no `epoll_ctl` per message).
        public static let stream = input | output | readHangUp | edge
        /// End of input or an error: the read that follows must not stop at a short read.
        public static let closing = readHangUp | hangUp | error
    }

    public let epoll: Int32
    private let wakeFD: Int32
    private let inbox = Mutex<Inbox>(Inbox())

    private struct Inbox {
        var tasks: [@Sendable () -> Void] = []
        var stopping = false
        var stopped = false
        var signalled = false
    }

    public init() throws(Failure) {
        let epoll = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epoll >= 0 else { throw Failure("epoll_create1", errno) }
        let wake = eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK))
        guard wake >= 0 else {
            let code = errno
            close(epoll)
            throw Failure("eventfd", code)
        }
        var event = epoll_event()
        event.events = Events.input
        event.data.u64 = 0
        guard epoll_ctl(epoll, EPOLL_CTL_ADD, wake, &event) == 0 else {
            let code = errno
            close(epoll)
            close(wake)
            throw Failure("epoll_ctl", code)
        }
        self.epoll = epoll
        self.wakeFD = wake
    }

    @inlinable
    public static func monotonic() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    // MARK: any thread

    /// Runs `task` on the loop's thread. Returns false (and drops the task) once the loop is stopping.
    @discardableResult
    public func execute(_ task: @escaping @Sendable () -> Void) -> Bool {
        let signal = self.inbox.withLock { inbox -> Bool? in
            guard !inbox.stopping else { return nil }
            inbox.tasks.append(task)
            defer { inbox.signalled = true }
            return !inbox.signalled
        }
        guard let signal else { return false }
        if signal { self.wake() }
        return true
    }

    /// Asks the loop to stop (its next `runTasks()` says so); returns at once.
    public func stop() {
        let wasRunning = self.inbox.withLock { inbox -> Bool in
            defer { inbox.stopping = true }
            return !inbox.stopping
        }
        if wasRunning { self.wake() }
    }

    /// Whether the loop has finished (`finish()`).
    public var hasStopped: Bool { self.inbox.withLock { $0.stopped } }

    private func wake() {
        var one: UInt64 = 1
        _ = write(self.wakeFD, &one, 8)
    }

    // MARK: loop thread

    /// Waits for events (at most `timeout` ms; 0: poll): how many arrived (0 after EINTR), or nil when
    /// `epoll_wait` failed otherwise (the loop must end).
    @inlinable
    public func wait(_ events: UnsafeMutablePointer<epoll_event>, capacity: Int32, timeout: Int32) -> Int? {
        let count = epoll_wait(self.epoll, events, capacity, timeout)
        if count < 0 { return errno == EINTR ? 0 : nil }
        return Int(count)
    }

    /// Hands each of `count` events' token and bits to `ready`, except the wake-up's (token 0): returns
    /// whether it was among them (then `runTasks()`).
    @inlinable @inline(__always)
    public func dispatch(
        _ events: UnsafeMutablePointer<epoll_event>,
        count: Int,
        _ ready: (UInt64, UInt32) -> Void
    )
        -> Bool
    {
        var woken = false
        for i in 0..<count {
            let token = events[i].data.u64
            if token == 0 {
                woken = true
            } else {
                ready(token, events[i].events)
            }
        }
        return woken
    }

    /// Runs the tasks handed over; true when the loop must stop.
    public func runTasks() -> Bool {
        var value: UInt64 = 0
        _ = read(self.wakeFD, &value, 8)
        let (tasks, stopping) = self.inbox.withLock { inbox -> ([@Sendable () -> Void], Bool) in
            defer {
                inbox.tasks = []
                inbox.signalled = false
            }
            return (inbox.tasks, inbox.stopping)
        }
        for task in tasks { task() }
        return stopping
    }

    /// Closes the epoll set and the wake-up; `hasStopped` is true from now on. The loop's last call.
    public func finish() {
        close(self.epoll)
        close(self.wakeFD)
        self.inbox.withLock { $0.stopped = true }
    }

    /// Adds `fd` with `events`; `token` is never 0 (the wake-up's).
    public func register(_ fd: Int32, token: UInt64, events: UInt32) throws(Failure) {
        var event = epoll_event()
        event.events = events
        event.data.u64 = token
        guard epoll_ctl(self.epoll, EPOLL_CTL_ADD, fd, &event) == 0 else { throw Failure("epoll_ctl(ADD)", errno) }
    }

    /// Adds `fd` with `events`, its token the address of `object` (which the caller keeps alive while `fd` is
    /// registered); ``object(_:as:)`` turns an event's token back into it.
    public func register(_ fd: Int32, object: AnyObject, events: UInt32) throws(Failure) {
        try self.register(
            fd,
            token: UInt64(UInt(bitPattern: Unmanaged.passUnretained(object).toOpaque())),
            events: events
        )
    }

    /// The object whose address an event's token is (``register(_:object:events:)``).
    @inlinable @inline(__always)
    public static func object<T: AnyObject>(_ token: UInt64, as type: T.Type) -> T {
        Unmanaged<T>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(token))!).takeUnretainedValue()
    }

    public func deregister(_ fd: Int32) {
        var event = epoll_event()
        _ = epoll_ctl(self.epoll, EPOLL_CTL_DEL, fd, &event)
    }

    /// Takes a registered socket out of the epoll set, then closes it. Closing alone is not enough: epoll
    /// forgets a socket only when every descriptor of it is closed, and a process forked at that moment
    /// (posix_spawn, before its exec closes the CLOEXEC ones) still holds one, so a later event would name an
    /// object that is gone.
    public func closeSocket(_ fd: Int32) {
        self.deregister(fd)
        close(fd)
    }
}

/// The byte moving of a splice, as the agent's TCP splice and the relay's circuits do it: one `recv` into the
/// loop's buffer and one `send` of what it read, per burst, until the source is drained, the target pushes
/// back, or `maxBursts` full reads have moved (then the loop comes back to it after the other ready sockets).
public enum SocketPump {
    public enum Outcome {
        /// The source has nothing more now.
        case drained
        /// `maxBursts` reads moved and there may be more: run it again after the other ready sockets.
        case again
        /// The target took only part of the last read: these bytes (inside the buffer) are left for it.
        case held(UnsafeRawBufferPointer)
        /// The source's input ended.
        case end
        case failed(Int32)
    }

    /// Moves bytes from `source` to `target`; `readable` is the source's edge flag (cleared when a short read
    /// proves it drained, unless `closing`: after an end of input or an error a short read proves nothing).
    /// Returns the bytes read and how it stopped.
    @inlinable @inline(__always)
    public static func pump(
        from source: Int32,
        to target: Int32,
        through buffer: UnsafeMutableRawBufferPointer,
        readable: inout Bool,
        closing: Bool,
        maxBursts: Int = 16
    ) -> (moved: Int, outcome: Outcome) {
        let base = buffer.baseAddress!
        var moved = 0
        var bursts = 0
        while readable {
            let n = recv(source, base, buffer.count, 0)
            if n > 0 {
                moved &+= n
                if n < buffer.count && !closing { readable = false }
                let sent = send(target, base, n, Int32(MSG_NOSIGNAL))
                if sent == n {
                    bursts &+= 1
                    if bursts == maxBursts && readable { return (moved, .again) }
                    continue
                }
                if sent < 0 {
                    let code = errno
                    guard code == EAGAIN || code == EWOULDBLOCK || code == EINTR else { return (moved, .failed(code)) }
                    return (moved, .held(UnsafeRawBufferPointer(start: base, count: n)))
                }
                return (moved, .held(UnsafeRawBufferPointer(start: base + sent, count: n - sent)))
            } else if n == 0 {
                readable = false
                return (moved, .end)
            } else {
                let code = errno
                if code == EAGAIN || code == EWOULDBLOCK {
                    readable = false
                    return (moved, .drained)
                }
                if code == EINTR { continue }
                return (moved, .failed(code))
            }
        }
        return (moved, .drained)
    }

    /// Writes what is left of `pending` from `start` on: nil when all of it went or the socket is full (`start`
    /// says how far it got, `done` which), else the error code.
    @inlinable
    public static func flush(
        _ fd: Int32,
        _ pending: UnsafeMutableRawBufferPointer,
        from start: inout Int
    ) -> (done: Bool, error: Int32?) {
        while start < pending.count {
            let sent = send(fd, pending.baseAddress! + start, pending.count - start, Int32(MSG_NOSIGNAL))
            if sent < 0 {
                let code = errno
                if code == EINTR { continue }
                if code == EAGAIN || code == EWOULDBLOCK { return (false, nil) }
                return (false, code)
            }
            start += sent
        }
        return (true, nil)
    }
}
