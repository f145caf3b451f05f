import ArgumentParser
import Histogram

#if canImport(Glibc)
import Glibc
#endif

/// The load generator.
///
/// Open loop (`--rate R`, wrk2 style): requests are due at fixed intervals whatever happened before, spread
/// round robin over keep-alive connections, and each one's latency runs from its intended send time, so a
/// stall shows up in the latency of every request it delayed (no coordinated omission).
///
/// Closed loop (`--rate 0`): every connection sends its next request as soon as the previous response has
/// arrived, for the highest throughput the target sustains; latency then runs from the actual send time.
///
/// The generator is one thread busy-polling non-blocking sockets (poll(2) with a zero timeout): kernel timer
/// wake-ups in this VM land ~0.6 ms late, which would swamp the tens of microseconds being measured. Pin it
/// to its own CPU. Bounded: at most `maxLoadSeconds` seconds of load, `maxRate` requests per second and
/// `maxConnections` connections, and it gives up 10 s after the last request was due.
struct LatencyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "latency",
        abstract: "Load at a fixed rate (open loop) or as fast as the target goes (--rate 0, closed loop)."
    )

    static let maxRate = 1_000_000
    static let maxConnections = 1024

    enum Mode: String, ExpressibleByArgument {
        case tcp
        case http
    }

    @Option(help: "host:port (IPv4).") var target: HostPort
    @Option(help: "tcp (echo ping-pong of --payload bytes) | http (GET, keep-alive).") var mode: Mode
    @Option(help: "Requests per second; 0: closed loop (maximum throughput).") var rate = 2000
    @Option(help: "Measured seconds.") var duration = 10.0
    @Option(help: "Seconds of load before measuring.") var warmup = 1.0
    @Option(help: "Keep-alive connections.") var connections = 16
    @Option(help: "tcp: bytes per request (the echo backend answers as many).") var payload = 64
    @Option(help: "http: request path.") var path = "/"
    @Option(parsing: .upToNextOption, help: "PIDs whose CPU time per request to report (the system under test).")
    var sutPid: [Int32] = []
    @Option(
        parsing: .upToNextOption,
        help: "PIDs sharing the SUT's CPU (the backend) whose CPU time per request to report beside it."
    )
    var neighborPid: [Int32] = []
    @Option(help: "Label printed with the results.") var label = "target"
    @Option(
        parsing: .upToNextOption,
        help: "PIDs that belong to the benchmark: other processes' CPU during the measurement is reported as noise."
    )
    var ignore: [Int32] = []
    @Option(help: "Also write the results (with the percentile curve) as JSON to this file.") var json: String?

    func validate() throws {
        try validateLoadWindow(duration: self.duration, warmup: self.warmup)
        guard (0...Self.maxRate).contains(self.rate) else { throw ValidationError("rate must be 0-\(Self.maxRate)") }
        guard (1...Self.maxConnections).contains(self.connections) else {
            throw ValidationError("connections must be 1-\(Self.maxConnections)")
        }
        guard (1...1_048_576).contains(self.payload) else { throw ValidationError("payload must be 1 B-1 MiB") }
    }

    func run() throws {
        let request: [UInt8]
        switch self.mode {
        case .tcp: request = [UInt8](repeating: UInt8(ascii: "p"), count: self.payload)
        case .http: request = Array("GET \(self.path) HTTP/1.1\r\nhost: bench\r\n\r\n".utf8)
        }
        var conns: [Connection] = []
        var pollfds: [pollfd] = []
        for _ in 0..<self.connections {
            let fd = try self.connect()
            pollfds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
            conns.append(Connection(fd: fd))
        }
        defer { for c in conns { close(c.fd) } }

        let closedLoop = self.rate == 0
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        // Open loop: a fixed number of requests, each due at its time. Closed loop: until the time is up.
        let total = closedLoop ? Int.max : Int((self.warmup + self.duration) * Double(self.rate))
        let warmupCount = closedLoop ? 0 : Int(self.warmup * Double(self.rate))
        let interval = closedLoop ? 0 : 1e9 / Double(self.rate)
        var issued = 0
        var completed = 0
        var measured = 0
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        let start = monotonicNanoseconds()
        let measureFrom = start + UInt64(self.warmup * 1e9)
        let measureUntil = start + UInt64((self.warmup + self.duration) * 1e9)
        let giveUp = measureUntil + 10_000_000_000
        var measuring = false
        var cpuBefore: [UInt64: UInt64] = [:]
        var neighborBefore: [UInt64: UInt64] = [:]
        var ticksBefore: (user: UInt64, system: UInt64) = (0, 0)
        var selfBefore = 0.0
        var othersBefore: [Int32: UInt64] = [:]
        var measuredFrom = start
        func beginMeasuring() {
            measuring = true
            cpuBefore = threadCPUNanoseconds(self.sutPid)
            neighborBefore = threadCPUNanoseconds(self.neighborPid)
            ticksBefore = userSystemTicks(self.sutPid)
            othersBefore = QuietCommand.othersTicks(ignoring: self.ignore + self.sutPid + self.neighborPid)
            selfBefore = ownCPUSeconds()
            measuredFrom = monotonicNanoseconds()
        }
        if warmupCount == 0 && !closedLoop { beginMeasuring() }

        func send(_ c: Int, _ item: Pending) {
            conns[c].outstanding = item
            let n = request.withUnsafeBytes { Glibc.send(conns[c].fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            precondition(n == request.count, "short send")
        }

        if closedLoop {
            for c in conns.indices {
                send(c, Pending(intended: monotonicNanoseconds(), index: issued))
                issued += 1
            }
        }
        var open = conns.count
        loop: while true {
            let now = monotonicNanoseconds()
            guard now < giveUp else { throw ValidationError("not all responses arrived (\(completed)/\(issued))") }
            if closedLoop {
                if !measuring && now >= measureFrom { beginMeasuring() }
                if open == 0 { break loop }
            } else {
                if completed >= total { break loop }
                // Requests whose intended time has come: index i is due at start + i x interval.
                let due = min(total, Int(Double(now - start) / interval) + 1)
                while issued < due {
                    let item = Pending(intended: start + UInt64(Double(issued) * interval), index: issued)
                    let c = issued % conns.count
                    if conns[c].outstanding == nil { send(c, item) } else { conns[c].queue.append(item) }
                    issued += 1
                }
            }
            let ready = poll(&pollfds, nfds_t(pollfds.count), 0)
            guard ready > 0 else { continue }
            for c in pollfds.indices where pollfds[c].revents != 0 {
                let n = buffer.withUnsafeMutableBytes { recv(conns[c].fd, $0.baseAddress, $0.count, 0) }
                guard n > 0 else { throw ValidationError("connection closed by \(self.target)") }
                conns[c].received.append(contentsOf: buffer[0..<n])
                while let item = conns[c].outstanding, conns[c].consumeResponse(mode: self.mode, payload: self.payload)
                {
                    let done = monotonicNanoseconds()
                    completed += 1
                    conns[c].outstanding = nil
                    if closedLoop {
                        if measuring && done <= measureUntil && item.intended >= measuredFrom {
                            _ = histogram.record(done - item.intended)
                            measured += 1
                        }
                        if done < measureUntil {
                            send(c, Pending(intended: done, index: issued))
                            issued += 1
                        } else {
                            pollfds[c].events = 0
                            open -= 1
                        }
                        continue
                    }
                    if item.index >= warmupCount {
                        _ = histogram.record(done - item.intended)
                        measured += 1
                    }
                    if completed == warmupCount { beginMeasuring() }
                    if let next = conns[c].dequeue() { send(c, next) }
                }
            }
        }
        let end = monotonicNanoseconds()
        let cpuUsed = cpuNanosecondsSince(cpuBefore, self.sutPid)
        let neighborUsed = cpuNanosecondsSince(neighborBefore, self.neighborPid)
        let ticksAfter = userSystemTicks(self.sutPid)
        let selfAfter = ownCPUSeconds()
        let othersAfter = QuietCommand.othersTicks(ignoring: self.ignore + self.sutPid + self.neighborPid)
        var othersUsed: UInt64 = 0
        for (pid, ticks) in othersAfter { othersUsed += ticks - min(ticks, othersBefore[pid] ?? ticks) }
        // The closed loop's window ends when the time is up (responses after it are not counted).
        // On a starved machine the warm-up can end after the deadline: the window is then empty, not negative.
        let windowEnd = closedLoop ? measureUntil : end
        let window = Double(windowEnd - min(windowEnd, measuredFrom)) / 1e9
        let cpuWindow = Double(end - min(end, measuredFrom)) / 1e9
        let hz = Double(sysconf(Int32(_SC_CLK_TCK)))
        let noise = Double(othersUsed) / hz / max(cpuWindow, 0.001)
        let achieved = Double(measured) / max(window, 0.001)
        let sutCPU =
            measured > 0 && !self.sutPid.isEmpty ? Double(cpuUsed) / 1000 / Double(measured) : nil
        let neighborCPU =
            measured > 0 && !self.neighborPid.isEmpty ? Double(neighborUsed) / 1000 / Double(measured) : nil
        // The kernel's share of the SUT's CPU (stime of utime + stime: 10 ms ticks, so read it at high load).
        let userTicks = ticksAfter.user - min(ticksAfter.user, ticksBefore.user)
        let systemTicks = ticksAfter.system - min(ticksAfter.system, ticksBefore.system)
        let kernelShare =
            userTicks + systemTicks >= 50 ? Double(systemTicks) / Double(userTicks + systemTicks) : nil
        let generatorCPU = measured > 0 ? (selfAfter - selfBefore) * 1e6 / Double(measured) : 0
        func us(_ p: Double) -> Double { Double(histogram.valueAtPercentile(p)) / 1000 }
        let rateText = closedLoop ? "max" : "\(self.rate)"
        var line =
            "latency \(self.label) \(self.mode) @\(rateText)/s x\(self.connections): n \(measured),"
            + " rate \(format(achieved, 0))/s, p50 \(format(us(50), 1)) us, p90 \(format(us(90), 1)) us,"
            + " p99 \(format(us(99), 1)) us, p99.9 \(format(us(99.9), 1)) us,"
            + " max \(format(Double(histogram.max) / 1000, 1)) us"
        if let sutCPU { line += ", cpu \(format(sutCPU, 1)) us/req (SUT)" }
        if let kernelShare { line += " (\(format(kernelShare * 100, 0))% in the kernel)" }
        if let neighborCPU { line += ", neighbours \(format(neighborCPU, 1)) us/req" }
        line += ", generator \(format(generatorCPU, 1)) us/req, noise \(format(noise, 3)) cores"
        print(line)

        if let path = self.json {
            var curve: [String] = []
            // Percentiles spaced evenly on a log scale of 1 / (1 - p), as HdrHistogram plots them.
            for k in 0...40 {
                let p = 100 * (1 - pow(10, -Double(k) / 8))
                curve.append("[\(format(p, 5)), \(format(us(p), 1))]")
            }
            curve.append("[100, \(format(Double(histogram.max) / 1000, 1))]")
            var fields = [
                "\"label\": \"\(self.label)\"", "\"mode\": \"\(self.mode)\"",
                "\"rate\": \(self.rate)", "\"connections\": \(self.connections)",
                "\"duration\": \(self.duration)", "\"n\": \(measured)", "\"achieved_rate\": \(format(achieved, 1))",
                "\"p50\": \(format(us(50), 1))", "\"p90\": \(format(us(90), 1))", "\"p99\": \(format(us(99), 1))",
                "\"p99_9\": \(format(us(99.9), 1))", "\"max\": \(format(Double(histogram.max) / 1000, 1))",
                "\"mean\": \(format(histogram.mean / 1000, 1))",
                "\"generator_cpu_us_per_req\": \(format(generatorCPU, 2))", "\"noise_cores\": \(format(noise, 3))",
                "\"curve\": [\(curve.joined(separator: ", "))]",
            ]
            if let sutCPU { fields.append("\"sut_cpu_us_per_req\": \(format(sutCPU, 2))") }
            if let kernelShare { fields.append("\"sut_kernel_share\": \(format(kernelShare, 3))") }
            if let neighborCPU { fields.append("\"neighbor_cpu_us_per_req\": \(format(neighborCPU, 2))") }
            let text = "{" + fields.joined(separator: ", ") + "}\n"
            guard let file = fopen(path, "w") else { throw ValidationError("cannot write \(path)") }
            fputs(text, file)
            fclose(file)
        }
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

/// A request: when it was due (open loop) or sent (closed loop), and its number.
private struct Pending {
    var intended: UInt64
    var index: Int
}

/// One keep-alive connection: one request outstanding, the rest queued with their intended send times.
private struct Connection {
    let fd: Int32
    var outstanding: Pending?
    var queue: [Pending] = []
    var head = 0
    /// Bytes received and not yet consumed start at `readIndex`; the header search resumes at `scanned`.
    var received: [UInt8] = []
    var readIndex = 0
    var scanned = 0

    init(fd: Int32) { self.fd = fd }

    mutating func dequeue() -> Pending? {
        guard self.head < self.queue.count else { return nil }
        let next = self.queue[self.head]
        self.head += 1
        if self.head == self.queue.count {
            self.queue.removeAll(keepingCapacity: true)
            self.head = 0
        }
        return next
    }

    /// Consumes one complete response from `received` if there is one.
    mutating func consumeResponse(mode: LatencyCommand.Mode, payload: Int) -> Bool {
        let available = self.received.count - self.readIndex
        switch mode {
        case .tcp:
            guard available >= payload else { return false }
            self.consume(payload)
            return true
        case .http:
            guard let end = self.headerEnd() else { return false }
            let length = self.contentLength(headerEnd: end)
            let total = end + 4 + length - self.readIndex
            guard available >= total else { return false }
            self.consume(total)
            return true
        }
    }

    private mutating func consume(_ n: Int) {
        self.readIndex += n
        self.scanned = self.readIndex
        if self.readIndex == self.received.count {
            self.received.removeAll(keepingCapacity: true)
            self.readIndex = 0
            self.scanned = 0
        }
    }

    /// The index of the `\r\n\r\n` ending the head that starts at `readIndex`.
    private mutating func headerEnd() -> Int? {
        let r = self.received
        guard r.count >= 4 else { return nil }
        var i = max(self.scanned, self.readIndex)
        while i + 3 < r.count {
            if r[i] == 13 && r[i + 1] == 10 && r[i + 2] == 13 && r[i + 3] == 10 { return i }
            i += 1
        }
        self.scanned = i
        return nil
    }

    /// The Content-Length of the head in `readIndex..<end` (0 when there is none).
    private func contentLength(headerEnd end: Int) -> Int {
        let name = Array("\r\ncontent-length:".utf8)
        let r = self.received
        var i = self.readIndex
        while i + name.count <= end {
            var match = true
            for j in 0..<name.count {
                var b = r[i + j]
                if b >= 65 && b <= 90 { b += 32 }
                if b != name[j] {
                    match = false
                    break
                }
            }
            if match {
                var k = i + name.count
                var value = 0
                while k < end, r[k] == 32 { k += 1 }
                while k < end, r[k] >= 48 && r[k] <= 57 {
                    value = value * 10 + Int(r[k] - 48)
                    k += 1
                }
                return value
            }
            i += 1
        }
        return 0
    }
}

/// utime + stime of the PIDs, in clock ticks.
func cpuTicks(_ pids: [Int32]) -> UInt64 {
    let ticks = userSystemTicks(pids)
    return ticks.user + ticks.system
}

/// utime and stime of the PIDs, in clock ticks.
func userSystemTicks(_ pids: [Int32]) -> (user: UInt64, system: UInt64) {
    var total: (user: UInt64, system: UInt64) = (0, 0)
    for pid in pids {
        guard let file = fopen("/proc/\(pid)/stat", "r") else { continue }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 1024)
        guard fgets(&line, Int32(line.count), file) != nil else { continue }
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        // Fields after the parenthesised command start with the state (field 3); utime, stime are 14, 15.
        guard let close = text.lastIndex(of: ")") else { continue }
        let fields = text[text.index(after: close)...].split(separator: " ")
        if fields.count > 12, let u = UInt64(fields[11]), let s = UInt64(fields[12]) {
            total.user += u
            total.system += s
        }
    }
    return total
}

/// CPU time of each thread of the PIDs in nanoseconds (/proc/PID/task/TID/schedstat: time on a CPU, nanosecond
/// resolution, where /proc/PID/stat counts 10 ms ticks), keyed by PID << 32 | TID.
func threadCPUNanoseconds(_ pids: [Int32]) -> [UInt64: UInt64] {
    var times: [UInt64: UInt64] = [:]
    for pid in pids {
        guard let dir = opendir("/proc/\(pid)/task") else { continue }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard let tid = UInt32(name), let file = fopen("/proc/\(pid)/task/\(name)/schedstat", "r") else { continue }
            var ns: UInt64 = 0
            if readFirstNumber(file, &ns) { times[UInt64(UInt32(bitPattern: pid)) << 32 | UInt64(tid)] = ns }
            fclose(file)
        }
    }
    return times
}

/// CPU time the PIDs' threads used since `before` (from `threadCPUNanoseconds`): per thread, so a thread that
/// exits in between (an idle pool thread) takes its time out of neither side; a new thread counts from zero.
func cpuNanosecondsSince(_ before: [UInt64: UInt64], _ pids: [Int32]) -> UInt64 {
    var total: UInt64 = 0
    for (thread, now) in threadCPUNanoseconds(pids) {
        let then = before[thread] ?? 0
        total += now - min(now, then)
    }
    return total
}

private func readFirstNumber(_ file: UnsafeMutablePointer<FILE>, _ value: inout UInt64) -> Bool {
    var line = [CChar](repeating: 0, count: 128)
    guard fgets(&line, Int32(line.count), file) != nil else { return false }
    let text = String(decoding: line.prefix { $0 != 0 && $0 != 32 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    guard let v = UInt64(text) else { return false }
    value = v
    return true
}

/// This process's CPU time (user + system), in seconds, at microsecond resolution.
func ownCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6 + Double(usage.ru_stime.tv_sec)
        + Double(usage.ru_stime.tv_usec) / 1e6
}
