import Foundation

/// What the benchmarks read about a process from /proc.
public enum ProcessStats {
    /// VmRSS of process `pid` in bytes (0 when it cannot be read).
    public static func rss(_ pid: Int32) -> Int {
        guard pid > 0, let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return (line.split(separator: " ").compactMap { Int($0) }.first ?? 0) * 1024
        }
        return 0
    }
}
