import CLinux
import Logging
import MeshNIO
import Metrics
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// One half of a circuit leaving NIO for the splice: its socket (a duplicate that the splice owns from now on)
/// and the bytes it sent that its partner has not been given yet.
struct CircuitHalf: Sendable {
    let fd: Int32
    let held: [UInt8]
}

/// Splices relay circuits off NIO, on epoll threads (`mesh-circuit-N`, one per NIO event loop, started with the
/// first circuit): both sockets of a circuit on one thread, one `recv` and one `send` per burst into the
/// thread's 64 KiB buffer, at most one read's worth held while a side cannot take it. No pipeline, no
/// promise, no task hop between event loops per message (the NIO splice it replaces read on one half's
/// loop and wrote on the other's). An end of input becomes `shutdown(SHUT_WR)` on the other side once what
/// was held for it is written (a link's close_notify and FIN pass through in order); the circuit closes
/// when both directions have ended, on any error, or after `idleTimeout` without a byte.
final class CircuitSplicer: Sendable {
    private let threads: Int
    private let idleTimeout: TimeAmount
    private let logger: Logger
    private let state = Mutex<State>(State())

    private struct State {
        var loops: [CircuitLoop] = []
        var next = 0
        var stopped = false
    }

    init(threads: Int, idleTimeout: TimeAmount, logger: Logger) {
        self.threads = max(threads, 1)
        self.idleTimeout = idleTimeout
        self.logger = logger
    }

    /// Splices `a` and `b`; `ended` runs once, on the splice thread, when the circuit has closed. When the
    /// splicer has stopped (or cannot start a thread), both sockets are closed and `ended` runs at once.
    func splice(_ a: CircuitHalf, _ b: CircuitHalf, ended: @escaping @Sendable () -> Void) {
        let loop = self.state.withLock { state -> CircuitLoop? in
            guard !state.stopped else { return nil }
            if state.loops.isEmpty {
                for index in 0..<self.threads {
                    let loop = try? CircuitLoop.start(index: index, idleTimeout: self.idleTimeout, logger: self.logger)
                    guard let loop else { break }
                    state.loops.append(loop)
                }
            }
            guard !state.loops.isEmpty else { return nil }
            state.next = (state.next + 1) % state.loops.count
            return state.loops[state.next]
        }
        let queued =
            loop?.execute {
                Circuit(loop: loop!, a: a.fd, b: b.fd, ended: ended).start(heldForA: b.held, heldForB: a.held)
            } ?? false
        if !queued {
            if loop == nil { self.logger.warning("relay: no circuit splice thread; circuit closed") }
            close(a.fd)
            close(b.fd)
            ended()
        }
    }

    /// Circuits open now (read from every thread; for tests and status).
    var openCircuits: Int { self.state.withLock { $0.loops }.reduce(0) { $0 + $1.open.load(ordering: .relaxed) } }

    /// Closes every circuit and ends the threads; later circuits are closed at once.
    func stop() {
        let loops = self.state.withLock { state -> [CircuitLoop] in
            state.stopped = true
            defer { state.loops = [] }
            return state.loops
        }
        for loop in loops { loop.stop() }
    }
}

/// One socket of a circuit (`MeshNIO.SpliceEnd`), registered with its loop's epoll set by its address.
private final class CircuitSide: SpliceEnd {
    unowned(unsafe) let circuit: Circuit
    let isA: Bool

    init(circuit: Circuit, fd: Int32, isA: Bool) {
        self.circuit = circuit
        self.isA = isA
        super.init(fd: fd)
    }
}

/// One spliced circuit: two connected sockets on one loop.
private final class Circuit {
    unowned(unsafe) let loop: CircuitLoop
    private(set) var a: CircuitSide!
    private(set) var b: CircuitSide!
    private let ended: @Sendable () -> Void
    private var closed = false
    /// Read bursts, for the idle sweep.
    private var idle: IdleTracker

    init(loop: CircuitLoop, a: Int32, b: Int32, ended: @escaping @Sendable () -> Void) {
        self.loop = loop
        self.ended = ended
        self.idle = IdleTracker(now: loop.now)
        self.a = CircuitSide(circuit: self, fd: a, isA: true)
        self.b = CircuitSide(circuit: self, fd: b, isA: false)
    }

    private func peer(of side: CircuitSide) -> CircuitSide { side.isA ? self.b : self.a }

    /// Registers both sockets (loop thread). What each half sent before the splice goes to the other first;
    /// registering reports what is ready now, so bytes already waiting in a socket are read next.
    func start(heldForA: [UInt8], heldForB: [UInt8]) {
        self.loop.adopt(self)
        heldForA.withUnsafeBytes { self.a.hold($0) }
        heldForB.withUnsafeBytes { self.b.hold($0) }
        do {
            try self.loop.register(self.a)
            try self.loop.register(self.b)
        } catch {
            self.loop.logger.warning("relay: cannot watch a circuit's sockets", metadata: ["error": "\(error)"])
            self.close()
        }
    }

    func ready(_ side: CircuitSide, _ events: UInt32) {
        guard !self.closed else { return }
        side.note(events)
        if events & CircuitEvents.output != 0, side.pending != nil {
            if self.flushPending(side) { self.pump(from: self.peer(of: side), to: side) }
            guard !self.closed else { return }
        }
        if side.readable { self.pump(from: side, to: self.peer(of: side)) }
    }

    /// Continues a pump that stopped at its per-event bound.
    func resume() {
        guard !self.closed else { return }
        if self.a.readable { self.pump(from: self.a, to: self.b) }
        if !self.closed, self.b.readable { self.pump(from: self.b, to: self.a) }
    }

    /// Moves bytes from `source` to `target` (`SocketPump.move`).
    private func pump(from source: CircuitSide, to target: CircuitSide) {
        let (moved, step) = SocketPump.move(from: source, to: target, through: self.loop.scratch)
        if moved > 0 {
            self.idle.touch()
            self.loop.bytes.increment(by: moved)
        }
        switch step {
        case .done, .held:
            break
        case .again:
            self.loop.runAgain(self)
        case .failed:
            self.close()
            return
        }
        if SpliceEnd.bothEnded(self.a, self.b) { self.close() }
    }

    /// Writes what is held for `side`; true when nothing is left.
    private func flushPending(_ side: CircuitSide) -> Bool {
        switch side.flushHeld(peerEnded: self.peer(of: side).eof) {
        case .blocked:
            return false
        case .failed:
            self.close()
            return false
        case .done:
            if SpliceEnd.bothEnded(self.a, self.b) {
                self.close()
                return false
            }
            return true
        }
    }

    /// True when the circuit has been quiet for `timeout` (compared at sweeps).
    func checkIdle(now: UInt64, timeout: UInt64) -> Bool { self.idle.isIdle(now: now, timeout: timeout) }

    /// Closes both sockets and tells `ended`. Idempotent.
    func close() {
        guard !self.closed else { return }
        self.closed = true
        for side in [self.a!, self.b!] {
            self.loop.closeSocket(side.fd)
            side.dropPending()
        }
        self.loop.retire(self)
        self.ended()
    }

    fileprivate static func side(_ token: UInt64) -> CircuitSide {
        EpollCore.object(token, as: CircuitSide.self)
    }
}

private typealias CircuitEvents = EpollCore.Events

/// One splice thread: an epoll set, a wake-up eventfd for work handed over from other threads, the circuits it
/// owns and an idle sweep every eighth of the idle timeout.
private final class CircuitLoop: @unchecked Sendable {
    let logger: Logger
    let open = Atomic<Int>(0)
    let bytes = Counter(label: "relay_circuit_bytes_total")
    /// The epoll set, its wake-up and the tasks handed over (shared with the agent's splice loops).
    private let core: EpollCore
    private let idleTimeout: UInt64
    private let sweepInterval: UInt64

    // Loop-thread state.
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
    private(set) var now: UInt64
    private var nextSweep: UInt64
    private var live: [ObjectIdentifier: Circuit] = [:]
    /// Closed during the current batch of events: kept until it is done (a later event may name them).
    private var retired: [Circuit] = []
    private var again: [Circuit] = []

    private init(idleTimeout: TimeAmount, logger: Logger) throws {
        self.logger = logger
        self.core = try EpollCore()
        self.idleTimeout = UInt64(max(idleTimeout.nanoseconds, 1_000_000))
        self.sweepInterval = max(self.idleTimeout / 8, 1_000_000)
        self.now = EpollCore.monotonic()
        self.nextSweep = self.now &+ self.sweepInterval
    }

    deinit { self.scratch.deallocate() }

    static func start(index: Int, idleTimeout: TimeAmount, logger: Logger) throws -> CircuitLoop {
        let loop = try CircuitLoop(idleTimeout: idleTimeout, logger: logger)
        DedicatedThread.start(name: "mesh-circuit-\(index)") { loop.run() }
        return loop
    }

    /// Runs `task` on the loop's thread; false (task dropped) once the loop is stopping.
    func execute(_ task: @escaping @Sendable () -> Void) -> Bool { self.core.execute(task) }

    func stop() { self.core.stop() }

    // MARK: loop thread

    func register(_ side: CircuitSide) throws {
        try self.core.register(side.fd, object: side, events: CircuitEvents.stream)
    }

    /// Out of the epoll set, then closed (`EpollCore.closeSocket`).
    func closeSocket(_ fd: Int32) { self.core.closeSocket(fd) }

    func adopt(_ circuit: Circuit) {
        self.live[ObjectIdentifier(circuit)] = circuit
        self.open.add(1, ordering: .relaxed)
    }

    func retire(_ circuit: Circuit) {
        guard let removed = self.live.removeValue(forKey: ObjectIdentifier(circuit)) else { return }
        self.retired.append(removed)
        self.open.subtract(1, ordering: .relaxed)
    }

    func runAgain(_ circuit: Circuit) { self.again.append(circuit) }

    private func run() {
        let capacity: Int32 = 64
        let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: Int(capacity))
        defer { events.deallocate() }
        while true {
            let timeout: Int32 = self.again.isEmpty ? self.untilSweep() : 0
            guard let count = self.core.wait(events, capacity: capacity, timeout: timeout) else {
                self.logger.critical("relay: circuit loop: epoll_wait failed", metadata: ["errno": "\(errno)"])
                break
            }
            self.now = EpollCore.monotonic()
            let woken = self.core.dispatch(events, count: count) { token, bits in
                let side = Circuit.side(token)
                side.circuit.ready(side, bits)
            }
            if !self.again.isEmpty {
                let pending = self.again
                self.again = []
                for circuit in pending { circuit.resume() }
            }
            if woken, self.core.runTasks() { break }
            if self.now >= self.nextSweep { self.sweep() }
            self.retired.removeAll(keepingCapacity: true)
        }
        for circuit in Array(self.live.values) { circuit.close() }
        self.retired.removeAll()
        self.core.finish()
    }

    /// Milliseconds to the next sweep (rounded up), from the time of this wake-up.
    private func untilSweep() -> Int32 {
        guard self.nextSweep > self.now else { return 0 }
        return Int32(min((self.nextSweep - self.now + 999_999) / 1_000_000, 60_000))
    }

    private func sweep() {
        var quiet: [Circuit] = []
        for circuit in self.live.values where circuit.checkIdle(now: self.now, timeout: self.idleTimeout) {
            quiet.append(circuit)
        }
        for circuit in quiet {
            RelaySessionMetrics.count("relay_circuits_idle_closed_total")
            circuit.close()
        }
        self.nextSweep = self.now &+ self.sweepInterval
    }
}
