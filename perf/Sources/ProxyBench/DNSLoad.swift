import ArgumentParser
import CLinux
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A closed-loop DNS load generator that costs the generator little per query, so that a server's maximum
/// is the server's and not the generator's: dnsperf (one thread, one `sendto` and one `recvfrom` per query)
/// saturates its CPU near 300k queries/s on this machine while our responder still has ~15% of its CPU left
/// (perf/dns/RESULTS.md). Here every socket keeps `outstanding / sockets` queries in flight; answers are
/// taken 64 at a time (`recvmmsg`) and each one sends the next query at once, 64 at a time (`sendmmsg`).
/// A query unanswered after `--timeout` seconds is counted lost and its slot sends again.
struct DNSLoadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dns-load",
        abstract: "Closed-loop DNS queries over UDP (batched), as fast as the server answers; prints one JSON line."
    )

    static let batch = 64

    @Option(help: "Server host:port (IPv4).") var target: HostPort
    @Option(help: "File of queries, one `name TYPE` per line (dnsperf's format; A and AAAA).") var queries: String
    @Option(help: "Measured seconds.") var duration = 10.0
    @Option(help: "Seconds of load before measuring.") var warmup = 1.0
    @Option(help: "UDP sockets.") var sockets = 4
    @Option(help: "Queries in flight, over all sockets.") var outstanding = 256
    @Option(help: "Seconds after which an unanswered query is lost.") var timeout = 1.0

    func validate() throws {
        try validateLoadWindow(duration: self.duration, warmup: self.warmup)
        guard (1...64).contains(self.sockets) else { throw ValidationError("--sockets: 1 to 64") }
        guard self.outstanding >= self.sockets, self.outstanding / self.sockets <= 1024 else {
            throw ValidationError("--outstanding: at least one and at most 1,024 per socket")
        }
    }

    func run() throws {
        let templates = try Self.templates(from: self.queries)
        guard !templates.isEmpty else { throw ValidationError("no queries in \(self.queries)") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(self.target.port).bigEndian)
        guard inet_pton(AF_INET, self.target.host, &address.sin_addr) == 1 else {
            throw ValidationError("--target: an IPv4 address and a port")
        }
        let window = self.outstanding / self.sockets
        var flows: [Flow] = []
        for _ in 0..<self.sockets { flows.append(try Flow(to: address, window: window)) }
        defer { for flow in flows { close(flow.fd) } }

        let pollfds = UnsafeMutablePointer<pollfd>.allocate(capacity: flows.count)
        defer { pollfds.deallocate() }
        for (i, flow) in flows.enumerated() { pollfds[i] = pollfd(fd: flow.fd, events: Int16(POLLIN), revents: 0) }

        var tally = Tally()
        var next = 0
        let start = Self.now()
        let measureFrom = start &+ UInt64(self.warmup * 1e9)
        let end = measureFrom &+ UInt64(self.duration * 1e9)
        let timeoutNanos = UInt64(self.timeout * 1e9)
        var lastSweep = start
        for flow in flows { flow.fill(templates: templates, next: &next, now: start) }
        var measuring = false
        while true {
            let now = Self.now()
            if now >= end { break }
            if !measuring, now >= measureFrom {
                measuring = true
                tally = Tally()
            }
            _ = poll(pollfds, nfds_t(flows.count), 10)
            let at = Self.now()
            for (i, flow) in flows.enumerated() where pollfds[i].revents != 0 {
                flow.receive(templates: templates, next: &next, now: at, tally: &tally)
            }
            if at &- lastSweep >= 10_000_000 {
                lastSweep = at
                for flow in flows {
                    flow.sweep(olderThan: timeoutNanos, templates: templates, next: &next, now: at, tally: &tally)
                }
            }
        }
        let seconds = Double(Self.now() &- measureFrom) / 1e9
        let qps = Double(tally.completed) / seconds
        let averageMs = tally.completed > 0 ? Double(tally.latencyNanos) / Double(tally.completed) / 1e6 : 0
        print(
            "{\"completed\": \(tally.completed), \"noerror\": \(tally.noError), \"lost\": \(tally.lost), "
                + "\"qps\": \(String(format: "%.1f", qps)), \"avg_ms\": \(String(format: "%.4f", averageMs)), "
                + "\"seconds\": \(String(format: "%.3f", seconds))}"
        )
    }

    struct Tally {
        var completed = 0
        var noError = 0
        var lost = 0
        var latencyNanos: UInt64 = 0
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// Each line's query in wire form with ID 0 and RD set (RFC 1035 4.1: header, QNAME, QTYPE, QCLASS IN).
    static func templates(from path: String) throws -> [[UInt8]] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        return try text.split(whereSeparator: \.isNewline).compactMap { line -> [UInt8]? in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let name = fields.first else { return nil }
            let type: UInt16
            switch fields.count > 1 ? fields[1].uppercased() : "A" {
            case "A": type = 1
            case "AAAA": type = 28
            default: throw ValidationError("unsupported query type in \(line)")
            }
            var wire: [UInt8] = [0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]
            for label in name.split(separator: ".") {
                let bytes = Array(label.utf8)
                guard (1...63).contains(bytes.count) else { throw ValidationError("bad name \(name)") }
                wire.append(UInt8(bytes.count))
                wire += bytes
            }
            wire += [0, UInt8(type >> 8), UInt8(type & 0xff), 0, 1]
            return wire
        }
    }

    /// One connected UDP socket and its slots: the query ID is the slot's index plus a generation above it, so
    /// a late answer to a query already counted lost is not taken for its successor's.
    final class Flow {
        let fd: Int32
        let window: Int
        private var sentAt: [UInt64]
        private var generation: [UInt16]
        /// `batch` messages of up to 512 bytes each way, and their headers: set up once, so a `sendmmsg` or
        /// `recvmmsg` of a batch only sets the lengths of what it sends.
        private let out = Batch()
        private let received = Batch()
        private var queued: [Int] = []

        final class Batch {
            let bytes = UnsafeMutableRawPointer.allocate(byteCount: DNSLoadCommand.batch * 512, alignment: 16)
            let vecs = UnsafeMutablePointer<iovec>.allocate(capacity: DNSLoadCommand.batch)
            let msgs = UnsafeMutablePointer<mesh_mmsghdr>.allocate(capacity: DNSLoadCommand.batch)

            init() {
                for i in 0..<DNSLoadCommand.batch {
                    self.vecs[i] = iovec(iov_base: self.bytes + i * 512, iov_len: 512)
                    self.msgs[i] = mesh_mmsghdr()
                    self.msgs[i].msg_hdr.msg_iov = self.vecs + i
                    self.msgs[i].msg_hdr.msg_iovlen = 1
                }
            }

            deinit {
                self.bytes.deallocate()
                self.vecs.deallocate()
                self.msgs.deallocate()
            }
        }

        init(to address: sockaddr_in, window: Int) throws {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { throw ValidationError("socket: errno \(errno)") }
            var size: Int32 = 4 << 20
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            var target = address
            let rc = withUnsafePointer(to: &target) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard rc == 0 else {
                let code = errno
                close(fd)
                throw ValidationError("connect: errno \(code)")
            }
            self.fd = fd
            self.window = window
            self.sentAt = [UInt64](repeating: 0, count: window)
            self.generation = [UInt16](repeating: 0, count: window)
        }

        func fill(templates: [[UInt8]], next: inout Int, now: UInt64) {
            for slot in 0..<self.window { self.queued.append(slot) }
            self.flush(templates: templates, next: &next, now: now)
        }

        func receive(templates: [[UInt8]], next: inout Int, now: UInt64, tally: inout Tally) {
            while true {
                let count = mesh_recvmmsg(
                    self.fd,
                    self.received.msgs,
                    UInt32(DNSLoadCommand.batch),
                    Int32(MSG_DONTWAIT)
                )
                guard count > 0 else { break }
                for i in 0..<Int(count) {
                    let length = Int(self.received.msgs[i].msg_len)
                    guard length >= 12 else { continue }
                    let bytes = self.received.bytes + i * 512
                    let id =
                        Int(bytes.load(fromByteOffset: 0, as: UInt8.self)) << 8
                        | Int(bytes.load(fromByteOffset: 1, as: UInt8.self))
                    let slot = id & 0x3ff
                    guard slot < self.window, UInt16(id >> 10) == self.generation[slot], self.sentAt[slot] != 0
                    else { continue }
                    tally.completed += 1
                    tally.latencyNanos &+= now &- self.sentAt[slot]
                    let flags = bytes.load(fromByteOffset: 3, as: UInt8.self)
                    let answers = bytes.load(fromByteOffset: 7, as: UInt8.self)
                    if flags & 0x0f == 0, answers > 0 { tally.noError += 1 }
                    self.sentAt[slot] = 0
                    self.queued.append(slot)
                }
                self.flush(templates: templates, next: &next, now: now)
                if count < Int32(DNSLoadCommand.batch) { break }
            }
        }

        func sweep(olderThan timeout: UInt64, templates: [[UInt8]], next: inout Int, now: UInt64, tally: inout Tally) {
            for slot in 0..<self.window where self.sentAt[slot] != 0 && now &- self.sentAt[slot] >= timeout {
                tally.lost += 1
                self.sentAt[slot] = 0
                self.queued.append(slot)
            }
            self.flush(templates: templates, next: &next, now: now)
        }

        /// Sends a query from every queued slot, `batch` per `sendmmsg`.
        private func flush(templates: [[UInt8]], next: inout Int, now: UInt64) {
            while !self.queued.isEmpty {
                let take = min(self.queued.count, DNSLoadCommand.batch)
                for i in 0..<take {
                    let slot = self.queued[i]
                    self.generation[slot] = (self.generation[slot] &+ 1) & 0x3f
                    let id = UInt16(slot) | (self.generation[slot] << 10)
                    let template = templates[next]
                    next = next + 1 == templates.count ? 0 : next + 1
                    let at = self.out.bytes + i * 512
                    template.withUnsafeBytes { at.copyMemory(from: $0.baseAddress!, byteCount: min($0.count, 512)) }
                    at.storeBytes(of: UInt8(id >> 8), toByteOffset: 0, as: UInt8.self)
                    at.storeBytes(of: UInt8(id & 0xff), toByteOffset: 1, as: UInt8.self)
                    self.out.vecs[i].iov_len = min(template.count, 512)
                    self.sentAt[slot] = now
                }
                let sent = Int(max(mesh_sendmmsg(self.fd, self.out.msgs, UInt32(take), 0), 0))
                // Not sent (the socket's buffer is full): those slots stay queued, not in flight, for the next
                // flush (the next answers or the next sweep), so they are neither waited for nor counted lost.
                for i in sent..<take { self.sentAt[self.queued[i]] = 0 }
                self.queued.removeFirst(sent)
                if sent < take { break }
            }
        }
    }
}
