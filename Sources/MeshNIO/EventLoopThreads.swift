import NIOCore

#if canImport(Glibc)
import CLinux
import Glibc
#endif

/// How many event loops (and, in the agent, splice loops: one per event loop) the process runs.
public enum EventLoopThreads {
    /// The CPUs this process may run on (sched_getaffinity(2): `taskset`, a cpuset), nil when unknown.
    public static func affinityCount() -> Int? {
        #if canImport(Glibc)
        let count = Int(mesh_affinity_cpu_count())
        return count > 0 ? count : nil
        #else
        return nil
        #endif
    }

    /// Sizes NIO's singleton event-loop group by the CPUs this process may use: NIO's own count
    /// (`System.coreCount`) follows cgroup quotas and cpusets but not the affinity mask, so an agent started
    /// with `taskset -c 1` ran two loops on one CPU, switching between them on every request. Call first
    /// in `main`, before anything uses a NIO singleton; `NIO_SINGLETON_GROUP_LOOP_COUNT` in the
    /// environment wins (NIO reads it). Returns the count set, or nil when left to NIO.
    @discardableResult
    public static func fitToAffinity() -> Int? {
        guard getenv("NIO_SINGLETON_GROUP_LOOP_COUNT") == nil, let allowed = Self.affinityCount() else {
            return nil
        }
        let count = max(1, min(System.coreCount, allowed))
        guard count < System.coreCount else { return nil }
        NIOSingletons.groupLoopCountSuggestion = count
        return count
    }
}
