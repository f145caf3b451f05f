import ArgumentParser
import Histogram

#if canImport(Glibc)
import Glibc
#endif

/// Open-loop latency (wrk2 style): requests are due at fixed intervals whatever happened before, spread
/// round robin over keep-alive connections, and each one's latency runs from its intended send time, so a
/// stall shows up in the latency of every request it delayed.
///
/// The generator is one thread busy-polling non-blocking sockets (poll(2) with a zero timeout): kernel timer
/// wake-ups in this VM land ~0.6 ms late, which would swamp the tens of microseconds being measured. Pin it
/// to its own CPU.
struct LatencyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "latency",
        abstract: "Open-loop latency at a fixed rate."
    )

    enum Mode: String, ExpressibleByArgument {
        case tcp
        case http
    }

    @Option(help: "host:port (IPv4).") var target: HostPort
    @Option(help: "tcp (echo ping-pong of --payload bytes) | http (GET, keep-alive).") var mode: Mode
    @Option(help: "Requests per second.") var rate = 2000
    @Option(help: "Measured seconds.") var duration = 10.0
    @Option(help: "Seconds of load before measuring.") var warmup = 1.0
    @Option(help: "Keep-alive connections.") var connections = 16
    @Option(help: "tcp: bytes per request.") var payload = 64
    @Option(parsing: .upToNextOption, help: "PIDs whose CPU time per request to report (the system under test).")
    var sutPid: [Int32] = []
    @Option(help: "Label printed with the results.") var label = "target"
    @Option(
        parsing: .upToNextOption,
        help: "PIDs that belong to the benchmark: other processes' CPU during the measurement is reported as noise."
    )
    var ignore: [Int32] = []

    func run() throws {
        let request: [UInt8]
        switch self.mode {
        case .tcp: request = [UInt8](repeating: UInt8(ascii: "p"), count: self.payload)
        case .http: request = Array("GET / HTTP/1.1\r\nhost: bench\r\n\r\n".utf8)
        }
        var conns: [Connection] = []
        var pollfds: [pollfd] = []
        for _ in 0..<self.connections {
            let fd = try self.connect()
            pollfds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
            conns.append(Connection(fd: fd))
        }
        defer { for c in conns { close(c.fd) } }

        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        let total = Int((self.warmup + self.duration) * Double(self.rate))
        let warmupCount = Int(self.warmup * Double(self.rate))
        let interval = 1e9 / Double(self.rate)
        var issued = 0
        var completed = 0
        var measured = 0
        var cpuBefore: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        let start = monotonicNanoseconds()
        let giveUp = start + UInt64((self.warmup + self.duration + 10) * 1e9)
        var othersBefore: [Int32: UInt64] = [:]
        var measuredFrom = start
        if warmupCount == 0 {
            cpuBefore = cpuTicks(self.sutPid)
            othersBefore = QuietCommand.othersTicks(ignoring: self.ignore + self.sutPid)
        }

        func send(_ c: Int, _ item: (intended: UInt64, index: Int)) {
            conns[c].outstanding = item
            let n = request.withUnsafeBytes { Glibc.send(conns[c].fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            precondition(n == request.count, "short send")
        }

        while completed < total {
            let now = monotonicNanoseconds()
            guard now < giveUp else { throw ValidationError("not all responses arrived (\(completed)/\(total))") }
            // Requests whose intended time has come: index i is due at start + i x interval.
            let due = min(total, Int(Double(now - start) / interval) + 1)
            while issued < due {
                let item = (intended: start + UInt64(Double(issued) * interval), index: issued)
                let c = issued % conns.count
                if conns[c].outstanding == nil { send(c, item) } else { conns[c].queue.append(item) }
                issued += 1
            }
            let ready = poll(&pollfds, nfds_t(pollfds.count), 0)
            guard ready > 0 else { continue }
            for c in pollfds.indices where pollfds[c].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { recv(conns[c].fd, $0.baseAddress, $0.count, 0) }
                guard n > 0 else { throw ValidationError("connection closed by \(self.target)") }
                conns[c].received.append(contentsOf: buffer[0..<n])
                while let item = conns[c].outstanding, conns[c].consumeResponse(mode: self.mode, payload: self.payload)
                {
                    let latency = monotonicNanoseconds() - item.intended
                    completed += 1
                    if item.index >= warmupCount {
                        _ = histogram.record(latency)
                        measured += 1
                    }
                    if completed == warmupCount {
                        cpuBefore = cpuTicks(self.sutPid)
                        othersBefore = QuietCommand.othersTicks(ignoring: self.ignore + self.sutPid)
                        measuredFrom = monotonicNanoseconds()
                    }
                    conns[c].outstanding = nil
                    if conns[c].head < conns[c].queue.count {
                        let next = conns[c].queue[conns[c].head]
                        conns[c].head += 1
                        send(c, next)
                    }
                }
            }
        }
        let cpuAfter = cpuTicks(self.sutPid)
        let othersAfter = QuietCommand.othersTicks(ignoring: self.ignore + self.sutPid)
        var othersUsed: UInt64 = 0
        for (pid, ticks) in othersAfter { othersUsed += ticks - min(ticks, othersBefore[pid] ?? ticks) }
        let window = Double(monotonicNanoseconds() - measuredFrom) / 1e9
        let noise = Double(othersUsed) / Double(sysconf(Int32(_SC_CLK_TCK))) / max(window, 0.001)
        func us(_ p: Double) -> String { format(Double(histogram.valueAtPercentile(p)) / 1000, 1) }
        var line =
            "latency \(self.label) \(self.mode) @\(self.rate)/s x\(self.connections): n \(measured), p50 \(us(50)) us,"
            + " p90 \(us(90)) us, p99 \(us(99)) us, p99.9 \(us(99.9)) us, max \(format(Double(histogram.max) / 1000, 1)) us"
        if !self.sutPid.isEmpty, measured > 0 {
            let perRequest =
                Double(cpuAfter - cpuBefore) / Double(sysconf(Int32(_SC_CLK_TCK))) * 1e6 / Double(measured)
            line += ", cpu \(format(perRequest, 1)) us/req (SUT)"
        }
        line += ", noise \(format(noise, 3)) cores"
        print(line)
    }

    private func connect() throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ValidationError("socket: \(errno)") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(self.target.port).bigEndian)
        inet_pton(AF_INET, self.target.host, &address.sin_addr)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard rc == 0 else { throw ValidationError("connect \(self.target): errno \(errno)") }
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        return fd
    }
}

/// One keep-alive connection: one request outstanding, the rest queued with their intended send times.
private struct Connection {
    let fd: Int32
    var outstanding: (intended: UInt64, index: Int)?
    var queue: [(intended: UInt64, index: Int)] = []
    var head = 0
    var received: [UInt8] = []

    init(fd: Int32) { self.fd = fd }

    /// Removes one complete response from `received` if there is one.
    mutating func consumeResponse(mode: LatencyCommand.Mode, payload: Int) -> Bool {
        switch mode {
        case .tcp:
            guard self.received.count >= payload else { return false }
            self.received.removeFirst(payload)
            return true
        case .http:
            guard let end = self.headerEnd() else { return false }
            var length = 0
            let headers = String(decoding: self.received[0..<end], as: UTF8.self).lowercased()
            for line in headers.split(separator: "\r\n") where line.hasPrefix("content-length:") {
                length = Int(line.dropFirst("content-length:".count).filter { $0 != " " }) ?? 0
            }
            guard self.received.count >= end + 4 + length else { return false }
            self.received.removeFirst(end + 4 + length)
            return true
        }
    }

    private func headerEnd() -> Int? {
        let r = self.received
        guard r.count >= 4 else { return nil }
        for i in 0...(r.count - 4) where r[i] == 13 && r[i + 1] == 10 && r[i + 2] == 13 && r[i + 3] == 10 {
            return i
        }
        return nil
    }
}

/// utime + stime of the PIDs, in clock ticks.
func cpuTicks(_ pids: [Int32]) -> UInt64 {
    var total: UInt64 = 0
    for pid in pids {
        guard let file = fopen("/proc/\(pid)/stat", "r") else { continue }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 1024)
        guard fgets(&line, Int32(line.count), file) != nil else { continue }
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // Fields after the parenthesised command start with the state (field 3); utime, stime are 14, 15.
        guard let close = text.lastIndex(of: ")") else { continue }
        let fields = text[text.index(after: close)...].split(separator: " ")
        if fields.count > 12, let u = UInt64(fields[11]), let s = UInt64(fields[12]) { total += u + s }
    }
    return total
}
