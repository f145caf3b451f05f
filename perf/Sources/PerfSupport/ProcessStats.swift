import Foundation

/// What the benchmarks read about a process from /proc.
public enum ProcessStats {
    /// VmRSS of process `pid` in bytes (0 when it cannot be read).
    public static func rss(_ pid: Int32) -> Int { self.status(pid, "VmRSS:") }

    /// RssAnon of process `pid` in bytes: its resident heap and anonymous mappings, without the pages
    /// of its binary and libraries (0 when it cannot be read).
    public static func rssAnon(_ pid: Int32) -> Int { self.status(pid, "RssAnon:") }

    /// A kB field of /proc/PID/status, in bytes.
    static func status(_ pid: Int32, _ field: String) -> Int {
        guard pid > 0, let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix(field) {
            return (line.split(separator: " ").compactMap { Int($0) }.first ?? 0) * 1024
        }
        return 0
    }

    /// utime + stime of process `pid` in seconds (from /proc/PID/stat; 0 when it cannot be read).
    public static func cpuSeconds(_ pid: Int32) -> Double {
        guard pid > 0, let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let u = Double(fields[11]), let s = Double(fields[12]) else { return 0 }
        return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }
}
