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

/// One thread that carries peer links off NIO: an epoll set (``EpollCore``) holding each link's socket and
/// the local sockets of its streams, so that a proxied request crosses a link with one `recv` and one `send`
/// per socket and no pipeline (LinkLoop/README.md). Sessions (``LinkLoopSession``) are adopted onto it once
/// their TLS handshake is done; everything else about them runs on this thread.
public final class LinkLoop: @unchecked Sendable {
    let logger: Logger
    let core: EpollCore
    /// Sessions on the loop (for tests and a loop's own stop).
    public let sessionCount = Atomic<Int>(0)

    // Loop-thread state.
    private(set) var now: UInt64
    private var sessions: [ObjectIdentifier: LinkLoopSession] = [:]
    /// Sessions with frames to seal and send at the end of this wake-up.
    private var dirty: [LinkLoopSession] = []
    /// Streams that stopped after their burst limit with input left.
    private var again: [LinkLoopStream] = []
    /// Streams dialing their local endpoint (their deadlines are checked by the sweep).
    private var dials: [LinkLoopStream] = []
    /// Objects closed during the current batch of events, kept until it is done (a later event may name them).
    private var retired: [EpollPollable] = []
    private var nextSweep: UInt64
    private static let sweepInterval: UInt64 = 100_000_000

    private init(logger: Logger) throws {
        self.logger = logger
        self.core = try EpollCore()
        self.now = EpollCore.monotonic()
        self.nextSweep = self.now &+ Self.sweepInterval
    }

    /// Starts a loop on a thread of its own named `name`.
    public static func start(name: String, logger: Logger = Logger(label: "mesh.link")) throws -> LinkLoop {
        let loop = try LinkLoop(logger: logger)
        DedicatedThread.start(name: name) { loop.run() }
        return loop
    }

    /// Runs `task` on the loop's thread; false (task dropped) once the loop is stopping.
    @discardableResult
    public func execute(_ task: @escaping @Sendable () -> Void) -> Bool { self.core.execute(task) }

    /// Stops the loop: every session on it closes (its streams reset).
    public func stop() { self.core.stop() }

    public var hasStopped: Bool { self.core.hasStopped }

    // MARK: loop thread

    func register(_ fd: Int32, _ object: EpollPollable) throws(EpollCore.Failure) {
        try self.core.register(fd, object: object, events: EpollCore.Events.stream)
    }

    func closeSocket(_ fd: Int32) { self.core.closeSocket(fd) }

    func adopt(_ session: LinkLoopSession) {
        self.sessions[ObjectIdentifier(session)] = session
        self.sessionCount.add(1, ordering: .relaxed)
    }

    func remove(_ session: LinkLoopSession) {
        guard let removed = self.sessions.removeValue(forKey: ObjectIdentifier(session)) else { return }
        self.retired.append(removed)
        self.sessionCount.subtract(1, ordering: .relaxed)
    }

    func retire(_ stream: LinkLoopStream) { self.retired.append(stream) }

    func markDirty(_ session: LinkLoopSession) {
        guard !session.isDirty else { return }
        session.isDirty = true
        self.dirty.append(session)
    }

    func runAgain(_ stream: LinkLoopStream) { self.again.append(stream) }

    func dialing(_ stream: LinkLoopStream) { self.dials.append(stream) }

    private func run() {
        let capacity: Int32 = 64
        let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: Int(capacity))
        defer { events.deallocate() }
        while true {
            let timeout: Int32 = self.again.isEmpty ? self.untilSweep() : 0
            guard let count = self.core.wait(events, capacity: capacity, timeout: timeout) else {
                self.logger.critical("link loop: epoll_wait failed", metadata: ["errno": "\(errno)"])
                break
            }
            self.now = EpollCore.monotonic()
            let woken = self.core.dispatch(events, count: count) { token, bits in
                EpollCore.object(token, as: EpollPollable.self).ready(bits)
            }
            if !self.again.isEmpty {
                let pending = self.again
                self.again = []
                for stream in pending { stream.session?.resume(stream) }
            }
            if woken, self.core.runTasks() { break }
            self.flushDirty()
            if self.now >= self.nextSweep { self.sweep() }
            self.retired.removeAll(keepingCapacity: true)
        }
        for session in Array(self.sessions.values) { session.shutDown(.sessionClosed, notifyPeer: true) }
        self.retired.removeAll()
        self.core.finish()
    }

    /// Seals and sends what the sessions queued during this wake-up: one write per link.
    private func flushDirty() {
        while !self.dirty.isEmpty {
            let sessions = self.dirty
            self.dirty = []
            for session in sessions {
                session.isDirty = false
                session.flush()
            }
        }
    }

    private func untilSweep() -> Int32 {
        guard self.nextSweep > self.now else { return 0 }
        return Int32(min((self.nextSweep - self.now + 999_999) / 1_000_000, 60_000))
    }

    private func sweep() {
        self.nextSweep = self.now &+ Self.sweepInterval
        guard !self.dials.isEmpty else { return }
        var still: [LinkLoopStream] = []
        for stream in self.dials {
            guard case .dialing(let deadline) = stream.state, let session = stream.session else { continue }
            if self.now >= deadline {
                session.dialTimedOut(stream)
            } else {
                still.append(stream)
            }
        }
        self.dials = still
        self.flushDirty()
    }
}
