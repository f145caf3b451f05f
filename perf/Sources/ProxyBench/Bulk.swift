import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

/// Times full downloads: connect, send one byte, read `--size` bytes (until EOF), with plain blocking
/// sockets so the client adds as little as possible. Prints every run and the median.
struct BulkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bulk", abstract: "Time bulk downloads.")

    @Option(help: "host:port (IPv4).") var target: HostPort
    @Option(help: "Expected bytes per download.") var size = 4 * 1024 * 1024
    @Option(help: "Downloads to time.") var runs = 21
    @Option(help: "Untimed downloads first.") var warmup = 3
    @Option(help: "Label printed with the results.") var label = "target"

    func run() throws {
        var times: [Double] = []
        for i in 0..<(self.warmup + self.runs) {
            let t = try self.download()
            if i >= self.warmup { times.append(t) }
        }
        times.sort()
        let median = times[times.count / 2]
        let p90 = times[min(times.count - 1, times.count * 9 / 10)]
        print(
            "bulk \(self.label): median \(format(median)) ms, min \(format(times[0])) ms, p90 \(format(p90)) ms"
                + " (\(self.runs) x \(self.size) bytes)"
        )
    }

    private func download() throws -> Double {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("socket: \(errno)") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(self.target.port).bigEndian)
        inet_pton(AF_INET, self.target.host, &address.sin_addr)
        var buffer = [UInt8](repeating: 0, count: 256 * 1024)
        let start = monotonicNanoseconds()
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else { throw ValidationError("connect \(self.target): errno \(errno)") }
        var one: UInt8 = 1
        _ = send(fd, &one, 1, 0)
        var total = 0
        while true {
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { break }
            total += n
        }
        let elapsed = Double(monotonicNanoseconds() - start) / 1e6
        guard total == self.size else {
            throw ValidationError("got \(total) bytes from \(self.target), wanted \(self.size)")
        }
        return elapsed
    }
}

func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func format(_ value: Double, _ digits: Int = 2) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let rounded = (value * scale).rounded() / scale
    return "\(rounded)"
}
