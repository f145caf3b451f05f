import CLinux
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// What every daemon sets up about its own process before it serves, in one place (`Daemon.run`
/// calls `prepare`): as many file descriptors as the system allows it, and an allocator that gives
/// large request bodies back to the system once they are handled.
public enum ProcessResources {
    /// Allocations at least this large get their own mapping (glibc: `M_MMAP_THRESHOLD`), so a
    /// freed request body leaves the process at once.
    public static let mmapThreshold = 256 * 1024
    /// Request bodies at least this large are followed by `releaseFreeMemory()`.
    public static let largeBody = 256 * 1024

    /// Raises the open-files limit and tunes the allocator; logs what it changed.
    public static func prepare(logger: Logger) {
        switch Self.raiseOpenFileLimit() {
        case .success(let (from, to)) where from != to:
            logger.debug("open-files limit raised from \(from) to \(to) (the hard limit)")
        case .success:
            break
        case .failure(let message):
            logger.warning("cannot raise the open-files limit: \(message)")
        }
        _ = mesh_set_mmap_threshold(Int32(Self.mmapThreshold))
    }

    /// Sets the soft RLIMIT_NOFILE to the hard limit: (old soft, new soft).
    public static func raiseOpenFileLimit() -> Result<(UInt64, UInt64), LimitError> {
        var limit = rlimit()
        let resource = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0 else {
            return .failure(LimitError("getrlimit failed (errno \(errno))"))
        }
        let old = UInt64(limit.rlim_cur)
        guard limit.rlim_cur < limit.rlim_max else { return .success((old, old)) }
        limit.rlim_cur = limit.rlim_max
        guard setrlimit(resource, &limit) == 0 else {
            return .failure(LimitError("setrlimit to \(limit.rlim_max) failed (errno \(errno))"))
        }
        return .success((old, UInt64(limit.rlim_max)))
    }

    public struct LimitError: Error, CustomStringConvertible {
        public let description: String
        init(_ d: String) { self.description = d }
    }

    /// The malloc heap's bytes in use and free (free: inside the heap, resident where touched), from glibc's
    /// mallinfo2 (every arena).
    public static func heapUsage() -> (used: Int, free: Int)? {
        var used: UInt = 0
        var free: UInt = 0
        mesh_malloc_usage(&used, &free)
        return (Int(used), Int(free))
    }

    /// Every `interval`, gives the heap's free pages back to the system (`malloc_trim`) when the free bytes
    /// inside it grew by at least `minimumFree` and an eighth of what is in use since the last trim (or the
    /// start); `report` gets the free and used bytes each time it trims. A storm (10,000 agents registering
    /// and connecting at once) leaves the heap fragmented: ~100 MiB of free chunks between live ones,
    /// resident, which glibc gives back only on `malloc_trim` (on its own, only the heap's top). The free
    /// count stays as it was after a trim (the chunks stay free, their pages go), hence "grew since".
    /// Until cancelled.
    public static func trimWhenFragmented(
        every interval: Duration,
        minimumFree: Int = 8 << 20,
        usage: @Sendable () -> (used: Int, free: Int)? = { ProcessResources.heapUsage() },
        trim: @Sendable () -> Void = { _ = mesh_malloc_trim() },
        report: @Sendable (_ free: Int, _ used: Int) -> Void = { _, _ in }
    ) async {
        var policy = HeapTrimPolicy(minimumFree: minimumFree)
        while !Task.isCancelled {
            do { try await Task.sleep(for: interval) } catch { return }
            guard let now = usage(), policy.shouldTrim(used: now.used, free: now.free) else { continue }
            trim()
            report(now.free, now.used)
        }
    }

    private static let trim = Mutex<(last: ContinuousClock.Instant?, scheduled: Bool)>((nil, false))

    /// Gives the allocator's free pages back to the system (glibc `malloc_trim`), at most once a
    /// second: a burst of large requests trims once, and once more a second after the burst.
    public static func releaseFreeMemory() {
        let now = ContinuousClock.now
        let action = Self.trim.withLock { t -> Int in
            if let last = t.last, now - last < .seconds(1) {
                if t.scheduled { return 0 }
                t.scheduled = true
                return 2
            }
            t.last = now
            return 1
        }
        switch action {
        case 1:
            _ = mesh_malloc_trim()
        case 2:
            Task.detached {
                try? await Task.sleep(for: .seconds(1))
                Self.trim.withLock { t in
                    t.scheduled = false
                    t.last = .now
                }
                _ = mesh_malloc_trim()
            }
        default:
            break
        }
    }
}

/// When to trim the heap: the free bytes grew by `minimumFree` and an eighth of the bytes in use since the
/// last trim. The baseline follows the free count down (chunks reused), so growth after that counts.
public struct HeapTrimPolicy: Sendable {
    public let minimumFree: Int
    private var baseline = 0

    public init(minimumFree: Int) { self.minimumFree = minimumFree }

    public mutating func shouldTrim(used: Int, free: Int) -> Bool {
        self.baseline = min(self.baseline, free)
        guard free - self.baseline >= max(self.minimumFree, used / 8) else { return false }
        self.baseline = free
        return true
    }
}
