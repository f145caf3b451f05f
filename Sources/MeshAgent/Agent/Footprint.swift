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
/// - `idleTrimSeconds` (default 5): most of an idle agent's resident set is clean pages of files: its own
///   text and read-only data, libc's, libsqlite3's. Start-up, a sync or a burst of reports touches code
///   that idle never runs again, and the kernel maps 64 KiB around every page touched (fault-around); those
///   pages stay mapped until memory runs short. Every `idleTrimSeconds`, when the agent used under 1% of a
///   core since the last check and its file pages grew by 256 KiB or more since the last trim, `mesh-agent`
///   drops its mappings of read-only file pages that hold no private copy (MADV_DONTNEED on mappings
///   without anonymous pages: their contents are the file's, so nothing is lost; the relocated RELRO
///   pages and all writable data are never touched). The pages stay in the page cache; what runs next
///   faults them back in (minor faults, no disk). The cost: the first request after an idle trim faults
///   in the code it runs (a few hundred microseconds, once); under traffic the agent is not idle and
///   nothing is trimmed.
extension AgentConfig {
    public static let defaultStoreCacheKiB = 256
    public static let defaultMallocArenas = 1
    public static let defaultIdleTrimSeconds = 5

    /// Checks ``storeCacheKiB``, ``mallocArenas`` and ``idleTrimSeconds``.
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
        guard (0...3600).contains(self.idleTrimSeconds) else {
            throw ManifestError(
                "idleTrimSeconds: must be between 0 (never) and 3600 (default \(AgentConfig.defaultIdleTrimSeconds)), not \(self.idleTrimSeconds)"
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

    /// Drops the process's mappings of read-only file pages that hold no private copy: every mapping of a
    /// file that is neither writable nor has anonymous (copied-on-write) pages, per /proc/self/smaps, gets
    /// MADV_DONTNEED; its pages are the file's and fault back in from the page cache when used. Returns the
    /// resident KiB of the mappings dropped.
    @discardableResult
    public static func dropCleanFilePages() -> Int {
        #if canImport(Glibc)
        guard let smaps = fopen("/proc/self/smaps", "r") else { return 0 }
        var candidates: [(start: UInt, end: UInt, rssKiB: Int, anonymousKiB: Int)] = []
        var current: (start: UInt, end: UInt, rssKiB: Int, anonymousKiB: Int)?
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        while getline(&line, &capacity, smaps) > 0, let line {
            let fields = String(cString: line).split(separator: " ", omittingEmptySubsequences: true)
            guard let first = fields.first else { continue }
            if first.contains("-"), fields.count >= 5 {
                // start-end perms offset dev inode [path]: a new mapping.
                if let c = current { candidates.append(c) }
                current = nil
                let range = first.split(separator: "-")
                guard fields.count >= 6, fields[5].hasPrefix("/"), fields[1].hasPrefix("r"),
                    !fields[1].contains("w"), range.count == 2,
                    let start = UInt(range[0], radix: 16), let end = UInt(range[1], radix: 16), end > start
                else { continue }
                current = (start, end, 0, 0)
            } else if current != nil, fields.count >= 2, let kib = Int(fields[1]) {
                if first == "Rss:" { current?.rssKiB = kib }
                if first == "Anonymous:" { current?.anonymousKiB = kib }
            }
        }
        if let c = current { candidates.append(c) }
        free(line)
        fclose(smaps)
        var dropped = 0
        for m in candidates where m.anonymousKiB == 0 && m.rssKiB > 0 {
            guard let address = UnsafeMutableRawPointer(bitPattern: m.start) else { continue }
            if madvise(address, Int(m.end - m.start), MADV_DONTNEED) == 0 { dropped += m.rssKiB }
        }
        return dropped
        #else
        return 0
        #endif
    }

    /// Every `interval`: when the process used under 1% of a core since the last check and its resident
    /// file pages grew by 256 KiB or more since the last trim, ``dropCleanFilePages()``. Until cancelled.
    public static func trimWhenIdle(every interval: Duration) async {
        #if canImport(Glibc)
        let seconds = Double(interval.components.seconds) + Double(interval.components.attoseconds) / 1e18
        var lastCPU = Self.cpuSeconds()
        var filePagesAfterTrim = 0
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            let cpu = Self.cpuSeconds()
            defer { lastCPU = cpu }
            let filePages = Self.residentFilePages()
            guard cpu - lastCPU < seconds / 100, filePages - filePagesAfterTrim >= 64 else { continue }
            Self.dropCleanFilePages()
            filePagesAfterTrim = Self.residentFilePages()
        }
        #endif
    }

    #if canImport(Glibc)
    /// User + system CPU seconds of the process.
    static func cpuSeconds() -> Double {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec)
            + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
    }

    /// Resident file-backed pages (the third field of /proc/self/statm, 4 KiB pages).
    static func residentFilePages() -> Int {
        guard let statm = fopen("/proc/self/statm", "r") else { return 0 }
        defer { fclose(statm) }
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(line) }
        guard getline(&line, &capacity, statm) > 0, let line else { return 0 }
        let fields = String(cString: line).split(separator: " ")
        return fields.count >= 3 ? Int(fields[2]) ?? 0 : 0
    }
    #endif

    /// M_ARENA_MAX of <malloc.h>.
    static let mArenaMax: Int32 = -8
}

#if canImport(Glibc)
// glibc's mallopt(3) from <malloc.h>, which the Glibc module does not export (as malloc_trim in
// AgentServer.swift): two C ints in, one out.
@_silgen_name("mallopt")
func glibcMallopt(_ param: Int32, _ value: Int32) -> Int32
#endif
