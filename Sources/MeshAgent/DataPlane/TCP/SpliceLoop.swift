import CLinux
import Logging
import MeshNIO
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Something registered with a splice loop's epoll set (`MeshNIO.EpollPollable`: its epoll token is the
/// object's address, so an event costs no look-up).
typealias SplicePollable = EpollPollable

/// A listening socket watched by a splice loop, which the loop can pause (out of descriptors) and resume.
protocol SpliceListeningSocket: SplicePollable {
    var fd: Int32 { get }
    var detached: Bool { get }
}

/// One thread running an epoll loop for the L4 TCP splice: it accepts on the listeners registered with it,
/// connects upstream, and moves bytes between the two sockets of each connection with one `recv` and one
/// `send` per burst into a shared 64 KiB buffer. There is no per-message object, no pipeline and no
/// promise on this path; a connection costs two sockets, one small object per side, and at most one read's
/// worth of bytes held while the receiving side cannot take them.
///
/// Thread model: everything but `execute(_:)` and `stop()` runs on the loop's own thread. Other threads hand
/// work over with `execute(_:)` (a mutex-protected queue plus an eventfd wake-up).
final class SpliceLoop: @unchecked Sendable {
    /// A system call that failed: its name and errno (the epoll core's error, one type for both).
    typealias Failure = EpollCore.Failure

    let configuration: DataPlaneConfiguration
    let counters: DataPlaneCounters
    let logger: Logger
    /// The epoll set, its wake-up and the tasks handed over (shared with the relay's circuit loops).
    private let core: EpollCore

    // MARK: loop-thread state

    /// The buffer every splice of this loop reads into (64 KiB).
    let scratch: UnsafeMutableRawBufferPointer
    /// Open connections, owned here (epoll holds only unretained tokens).
    private var live: [ObjectIdentifier: SpliceConnection] = [:]
    /// Connections closed during the current batch of events: kept alive until the batch is done, since a
    /// later event in the same batch may name them.
    @exclusivity(unchecked) private var retired: [SpliceConnection] = []
    /// Connections whose pump stopped at its per-event bound with bytes still to read.
    @exclusivity(unchecked) private var again: [SpliceConnection] = []
    /// Connections waiting for their upstream connect, checked against their deadline.
    private var connecting: [SpliceConnection] = []
    @exclusivity(unchecked) private var nextConnectDeadline = UInt64.max
    /// Idle sweep: every eighth of the idle timeout, every connection's activity count is compared with the
    /// previous sweep's; reads cost no clock read.
    private let sweepInterval: UInt64
    @exclusivity(unchecked) private var nextSweep: UInt64
    /// Acceptors paused after EMFILE/ENFILE, with the time to resume them.
    private var paused: [(acceptor: any SpliceListeningSocket, until: UInt64)] = []
    /// The earliest `until` in `paused` (max when none), so that a wake-up does not walk the array.
    @exclusivity(unchecked) private var nextResume = UInt64.max
    @exclusivity(unchecked) private(set) var now: UInt64
    /// The HTTP connections and upstream pool of this loop (the epoll HTTP engine, `HTTPLoop/`), made on first use.
    @exclusivity(unchecked) private(set) var httpState: HTTPLoopState?

    /// This loop's HTTP state, made on first use (loop thread).
    var http: HTTPLoopState {
        if let state = self.httpState { return state }
        let state = HTTPLoopState(loop: self)
        self.httpState = state
        return state
    }

    private init(configuration: DataPlaneConfiguration, counters: DataPlaneCounters, logger: Logger) throws {
        self.configuration = configuration
        self.counters = counters
        self.logger = logger
        self.core = try EpollCore()
        self.scratch = .allocate(byteCount: 64 * 1024, alignment: 16)
        let timeout = UInt64(max(configuration.tcpIdleTimeout.nanoseconds, 1_000_000))
        self.sweepInterval = max(timeout / 8, 1_000_000)
        self.now = SpliceLoop.monotonic()
        self.nextSweep = self.now &+ self.sweepInterval
    }

    deinit {
        self.scratch.deallocate()
    }

    /// Starts a loop on a new thread. The thread is created by the calling thread, so it is in the calling
    /// thread's network namespace: call it from the event loop whose namespace the splice must use.
    static func start(
        index: Int,
        configuration: DataPlaneConfiguration,
        counters: DataPlaneCounters,
        logger: Logger
    ) throws -> SpliceLoop {
        let loop = try SpliceLoop(configuration: configuration, counters: counters, logger: logger)
        DedicatedThread.start(name: "mesh-splice-\(index)") { loop.run() }
        return loop
    }

    static func monotonic() -> UInt64 { EpollCore.monotonic() }

    // MARK: any thread

    /// Runs `task` on the loop's thread. Returns false (and drops the task) once the loop has stopped.
    @discardableResult
    func execute(_ task: @escaping @Sendable () -> Void) -> Bool { self.core.execute(task) }

    /// Asks the loop to close every connection and exit; returns at once.
    func stop() { self.core.stop() }

    /// Whether the loop thread has finished (after `stop()`).
    var hasStopped: Bool { self.core.hasStopped }

    // MARK: loop thread

    private func run() {
        let capacity: Int32 = 64
        let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: Int(capacity))
        defer { events.deallocate() }
        while true {
            let yielded = !self.again.isEmpty || self.httpState?.hasYielded == true
            let timeout = yielded ? 0 : self.timeoutMilliseconds()
            guard let count = self.core.wait(events, capacity: capacity, timeout: timeout) else {
                self.logger.critical("splice loop: epoll_wait failed", metadata: ["errno": "\(errno)"])
                break
            }
            self.now = SpliceLoop.monotonic()
            let wake = self.core.dispatch(events, count: count) { token, bits in
                EpollCore.object(token, as: SplicePollable.self).ready(bits)
            }
            if !self.again.isEmpty {
                let pending = self.again
                self.again = []
                for connection in pending { connection.resume() }
            }
            if let http = self.httpState, http.hasYielded { http.resumeYielded() }
            if wake, self.core.runTasks() { break }
            if self.now >= self.nextConnectDeadline { self.expireConnects() }
            if self.now >= self.nextSweep { self.sweep() }
            if self.now >= self.nextResume { self.resumeAcceptors() }
            self.retired.removeAll(keepingCapacity: true)
            self.httpState?.afterBatch()
        }
        self.httpState?.closeAll()
        for connection in Array(self.live.values) { connection.close() }
        self.retired.removeAll()
        self.core.finish()
    }

    @inline(__always)
    private func timeoutMilliseconds() -> Int32 {
        var deadline = min(self.nextSweep, self.nextConnectDeadline, self.nextResume)
        if let http = self.httpState { deadline = min(deadline, http.deadline) }
        // The time of this wake-up: at most one batch of work old, against deadlines kept in milliseconds.
        let now = self.now
        guard deadline > now else { return 0 }
        let ms = (deadline - now + 999_999) / 1_000_000
        return Int32(min(ms, 60_000))
    }

    // MARK: registration (loop thread)

    /// Adds `fd` to the epoll set with `events`; the token is `object`'s address (never 0: that is the wake-up).
    func register(_ fd: Int32, _ object: SplicePollable, events: UInt32) throws {
        try self.core.register(fd, object: object, events: events)
    }

    func deregister(_ fd: Int32) { self.core.deregister(fd) }

    /// Out of the epoll set, then closed (`EpollCore.closeSocket`).
    func closeSocket(_ fd: Int32) { self.core.closeSocket(fd) }

    func adopt(_ connection: SpliceConnection) {
        self.live[ObjectIdentifier(connection)] = connection
    }

    func retire(_ connection: SpliceConnection) {
        if let removed = self.live.removeValue(forKey: ObjectIdentifier(connection)) {
            self.retired.append(removed)
        }
    }

    func runAgain(_ connection: SpliceConnection) {
        self.again.append(connection)
    }

    func connectStarted(_ connection: SpliceConnection) {
        self.connecting.append(connection)
        self.nextConnectDeadline = min(self.nextConnectDeadline, connection.connectDeadline)
    }

    /// The next connection on `acceptor`'s listening socket; nil when it has none left (EAGAIN) or cannot accept
    /// now (out of descriptors or memory). In that case it is level-triggered, so it is not watched for 100 ms
    /// rather than spin; `message` is logged at most every 10 s per socket.
    func accept(
        on acceptor: any SpliceListeningSocket,
        lastWarning: inout UInt64,
        _ message: @autoclosure () -> Logger.Message,
        metadata: @autoclosure () -> Logger.Metadata = [:]
    ) -> (fd: Int32, address: sockaddr_storage)? {
        switch SpliceSocket.accept(acceptor.fd) {
        case .socket(let fd, let address):
            return (fd, address)
        case .drained:
            return nil
        case .failed(let code):
            if self.now &- lastWarning > 10_000_000_000 || lastWarning == 0 {
                lastWarning = self.now
                self.logger.warning(message(), metadata: metadata().merging(["errno": "\(code)"]) { a, _ in a })
            }
            self.pause(acceptor, for: 100_000_000)
            return nil
        }
    }

    func pause(_ acceptor: any SpliceListeningSocket, for nanoseconds: UInt64) {
        self.deregister(acceptor.fd)
        self.paused.append((acceptor, self.now &+ nanoseconds))
        self.nextResume = min(self.nextResume, self.now &+ nanoseconds)
    }

    /// Closes every connection accepted for `listener` on this loop.
    func closeAll(of listener: SpliceListener) {
        for connection in Array(self.live.values) where connection.listener === listener {
            connection.close()
        }
    }

    private func expireConnects() {
        var next = UInt64.max
        let now = self.now
        var expired: [SpliceConnection] = []
        self.connecting.removeAll { connection in
            guard connection.isConnecting else { return true }
            if connection.connectDeadline <= now {
                expired.append(connection)
                return true
            }
            next = min(next, connection.connectDeadline)
            return false
        }
        self.nextConnectDeadline = next
        for connection in expired { connection.connectTimedOut() }
    }

    private func sweep() {
        let timeout = UInt64(max(self.configuration.tcpIdleTimeout.nanoseconds, 1_000_000))
        let now = self.now
        var quiet: [SpliceConnection] = []
        for connection in self.live.values where connection.checkIdle(now: now, timeout: timeout) {
            quiet.append(connection)
        }
        for connection in quiet { connection.close() }
        self.nextSweep = now &+ self.sweepInterval
    }

    private func resumeAcceptors() {
        let now = self.now
        var resumed: [any SpliceListeningSocket] = []
        self.paused.removeAll { entry in
            guard entry.until <= now else { return false }
            resumed.append(entry.acceptor)
            return true
        }
        self.nextResume = self.paused.lazy.map(\.until).min() ?? .max
        for acceptor in resumed where !acceptor.detached {
            try? self.register(acceptor.fd, acceptor, events: SpliceEvents.input | SpliceEvents.exclusive)
        }
    }
}

/// epoll event bits as `UInt32`.
typealias SpliceEvents = EpollCore.Events
