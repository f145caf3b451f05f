#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The time a long-running part reads and sleeps on: grace periods, intervals and expiries.
///
/// Production code takes one, defaulting to `SystemClock` (the monotonic clock for intervals, the
/// wall clock for times that are stored or shown). Tests pass a clock they advance by hand
/// (`ManualClock` in MeshTestSupport), so that a one-second grace period passes when the test says
/// so, not when a loaded machine gets round to it.
public protocol MeshClock: Sendable {
    /// Now on the monotonic clock: what intervals and grace periods are measured on.
    var now: ContinuousClock.Instant { get }
    /// Now on the wall clock, in milliseconds since the Unix epoch: what stored times are made of.
    var epochMillis: Int64 { get }
    /// Suspends for `duration` of this clock's time; throws `CancellationError` when cancelled.
    func sleep(for duration: Duration) async throws
}

extension MeshClock {
    /// Now on the wall clock, in whole seconds since the Unix epoch.
    public var epochSeconds: Int { Int(self.epochMillis / 1000) }
}

/// The real clocks: `ContinuousClock` and the system's wall clock.
public struct SystemClock: MeshClock {
    public init() {}

    public var now: ContinuousClock.Instant { .now }

    public var epochMillis: Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    public func sleep(for duration: Duration) async throws {
        try await Task.sleep(for: duration)
    }
}

extension MeshClock where Self == SystemClock {
    /// The real clocks.
    public static var system: SystemClock { SystemClock() }
}
