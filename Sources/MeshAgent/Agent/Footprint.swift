import MeshCore

#if canImport(Glibc)
import Glibc
#endif

/// The agent's memory settings (perf/edge-twins measures them: the edge process with 100 devices and 10
/// workloads, and its resident set by kind of mapping).
///
/// - `storeCacheKiB` (default 256): SQLite keeps up to 2000 KiB of each file in its own page cache by
///   default, and after a few thousand twin reports `edge.db`'s cache is full: ~2 MiB of heap per file that
///   the kernel's page cache holds again anyway. The agent's statements touch a few pages each (one device's
///   twins, the head of the outbox), so a small cache costs reads from the page cache, not the disk.
/// - `mallocArenas` (default 1): glibc gives each thread that allocates an arena of its own, up to 8 per
///   core, and freed memory stays in the arena it came from: each keeps its own free chunks and top pad.
///   With one arena the agent's allocations share one heap. Small allocations still go through each
///   thread's tcache (no lock); the data plane's hot path allocates little (the splice loops, none).
extension AgentConfig {
    public static let defaultStoreCacheKiB = 256
    public static let defaultMallocArenas = 1

    /// Checks ``storeCacheKiB`` and ``mallocArenas``.
    public func validateFootprint() throws {
        guard (16...1_048_576).contains(self.storeCacheKiB) else {
            throw ManifestError(
                "storeCacheKiB: must be between 16 and 1048576 (default \(AgentConfig.defaultStoreCacheKiB)), not \(self.storeCacheKiB)"
            )
        }
        guard (0...64).contains(self.mallocArenas) else {
            throw ManifestError(
                "mallocArenas: must be between 0 (glibc's default) and 64 (default \(AgentConfig.defaultMallocArenas)), not \(self.mallocArenas)"
            )
        }
    }
}

/// Process-wide memory settings, applied once by the `mesh-agent` executable at start (not by
/// `AgentServer`, which tests run inside their own process).
public enum AgentProcessMemory {
    /// Limits glibc's malloc to `arenas` arenas (mallopt M_ARENA_MAX); 0 leaves glibc's default. Threads
    /// that already have an arena keep it. Returns whether it was applied (false elsewhere than glibc).
    @discardableResult
    public static func limitMallocArenas(_ arenas: Int) -> Bool {
        #if canImport(Glibc)
        guard arenas > 0 else { return false }
        return glibcMallopt(mArenaMax, Int32(clamping: arenas)) == 1
        #else
        return false
        #endif
    }

    /// M_ARENA_MAX of <malloc.h>.
    static let mArenaMax: Int32 = -8
}

#if canImport(Glibc)
// glibc's mallopt(3) from <malloc.h>, which the Glibc module does not export (as malloc_trim in
// AgentServer.swift): two C ints in, one out.
@_silgen_name("mallopt")
func glibcMallopt(_ param: Int32, _ value: Int32) -> Int32
#endif
