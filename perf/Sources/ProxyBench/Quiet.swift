import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

/// Waits until the machine is quiet: the CPU time of all other processes (per process, from
/// /proc/PID/stat) over a window stays under a share of one core. Exit status 1 when it never was.
struct QuietCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "quiet", abstract: "Wait for a quiet machine.")

    @Option(help: "Window in seconds.") var window = 3.0
    @Option(help: "Allowed CPU of other processes, in cores.") var maxCores = 0.05
    @Option(help: "Give up after this many seconds.") var timeout = 120.0
    @Option(parsing: .upToNextOption, help: "PIDs to ignore (ours).") var ignore: [Int32] = []

    func run() throws {
        let deadline = monotonicNanoseconds() + UInt64(self.timeout * 1e9)
        let hz = Double(sysconf(Int32(_SC_CLK_TCK)))
        var busiest = 0.0
        repeat {
            let before = Self.othersTicks(ignoring: self.ignore)
            usleep(UInt32(self.window * 1e6))
            let after = Self.othersTicks(ignoring: self.ignore)
            var used: UInt64 = 0
            for (pid, ticks) in after { used += ticks - min(ticks, before[pid] ?? ticks) }
            let cores = Double(used) / hz / self.window
            busiest = cores
            if cores <= self.maxCores {
                print("quiet: others used \(format(cores, 3)) cores over \(self.window) s")
                return
            }
        } while monotonicNanoseconds() < deadline
        print("NOT quiet: others used \(format(busiest, 3)) cores (limit \(self.maxCores)); results are suspect")
        throw ExitCode(1)
    }

    static func othersTicks(ignoring: [Int32]) -> [Int32: UInt64] {
        var result: [Int32: UInt64] = [:]
        guard let dir = opendir("/proc") else { return result }
        defer { closedir(dir) }
        let me = getpid()
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard let pid = Int32(name), pid != me, !ignoring.contains(pid) else { continue }
            result[pid] = cpuTicks([pid])
        }
        return result
    }
}
