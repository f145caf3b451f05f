import MeshCore
import NIOCore
import Synchronization

/// A `MeshClock` whose time moves only when the test says so (`advance(by:)`).
///
/// It starts at the real now (both clocks), so times it produces look like today's. Sleepers wake
/// when an advance reaches their deadline. `advance(by:)` then waits until every sleeper it woke is
/// asleep again (or gone), so that when it returns, the loops it drove have done their pass: a test
/// asserts on their work without sleeping.
public final class ManualClock: MeshClock {
    struct Sleeper {
        var deadline: Duration
        var continuation: CheckedContinuation<Void, any Error>
    }

    struct State {
        var offset: Duration = .zero
        var nextID = 0
        var sleepers: [Int: Sleeper] = [:]
        /// Sleeps that ended by cancellation (their loops are gone, not asleep again).
        var cancelled = 0
        /// Sleeps started so far.
        var started = 0
    }

    private let base: ContinuousClock.Instant
    private let baseMillis: Int64
    private let baseDeadline: NIODeadline
    private let state = Mutex(State())

    public init() {
        self.base = .now
        self.baseMillis = SystemClock().epochMillis
        self.baseDeadline = .now()
    }

    /// How far the test has moved this clock.
    public var elapsed: Duration { self.state.withLock { $0.offset } }

    public var now: ContinuousClock.Instant { self.base + self.elapsed }

    public var epochMillis: Int64 {
        let (s, atto) = self.elapsed.components
        return self.baseMillis + s * 1000 + atto / 1_000_000_000_000_000
    }

    /// Now as a NIO deadline (for parts that take `() -> NIODeadline`, as the DNS forwarder's cache does).
    public var deadline: NIODeadline {
        let (s, atto) = self.elapsed.components
        return self.baseDeadline + .nanoseconds(s * 1_000_000_000 + atto / 1_000_000_000)
    }

    /// How many tasks sleep on this clock now.
    public var sleepers: Int { self.state.withLock { $0.sleepers.count } }

    public func sleep(for duration: Duration) async throws {
        let id = self.state.withLock { s -> Int in
            s.nextID += 1
            return s.nextID
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let resume = self.state.withLock { s -> Result<Void, any Error>? in
                    s.started += 1
                    if Task.isCancelled {
                        s.cancelled += 1
                        return .failure(CancellationError())
                    }
                    if duration <= .zero { return .success(()) }
                    s.sleepers[id] = Sleeper(deadline: s.offset + duration, continuation: continuation)
                    return nil
                }
                if let resume { continuation.resume(with: resume) }
            }
        } onCancel: {
            let sleeper = self.state.withLock { s -> Sleeper? in
                guard let sleeper = s.sleepers.removeValue(forKey: id) else { return nil }
                s.cancelled += 1
                return sleeper
            }
            sleeper?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Moves the clock on by `duration`, wakes every sleeper whose deadline that reaches, and waits
    /// (up to `settle`, real time) until each of them sleeps again or was cancelled. Returns whether
    /// they all settled.
    @discardableResult
    public func advance(by duration: Duration, settle: Duration = .seconds(30)) async -> Bool {
        let (woken, startedBefore, cancelledBefore) = self.state.withLock { s in
            s.offset += duration
            let due = s.sleepers.filter { $0.value.deadline <= s.offset }
            for id in due.keys { s.sleepers[id] = nil }
            return (due.values.map(\.continuation), s.started, s.cancelled)
        }
        for c in woken { c.resume() }
        guard !woken.isEmpty else { return true }
        let deadline = ContinuousClock.now + settle
        while ContinuousClock.now < deadline {
            let settled = self.state.withLock { s in
                (s.started - startedBefore) + (s.cancelled - cancelledBefore) >= woken.count
            }
            if settled { return true }
            if Task.isCancelled { return false }
            try? await Task.sleep(for: .milliseconds(2))
        }
        return false
    }

    /// Advances in `step`s until `total` has passed (each step settles as `advance(by:)` does).
    public func advance(by total: Duration, in step: Duration) async {
        var left = total
        while left > .zero {
            let d = min(step, left)
            await self.advance(by: d)
            left -= d
        }
    }

    /// Waits (real time, bounded) until at least `count` tasks sleep on this clock: the loops under
    /// test have started and reached their first wait.
    @discardableResult
    public func waitForSleepers(_ count: Int = 1, timeout: Duration = .seconds(30)) async -> Bool {
        await eventually(timeout: timeout, every: .milliseconds(2)) { self.sleepers >= count }
    }
}
