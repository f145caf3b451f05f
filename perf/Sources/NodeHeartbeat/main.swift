import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import PerfSupport
import Synchronization

/// N simulated nodes heartbeating against a running mesh-control, each on its own kept-alive TLS
/// connection as a node agent does, each at a fixed interval (open loop across nodes): the beats/s
/// sustained, their latency, the server's CPU per beat and its memory, and how many watch events
/// the beats caused (none: the phase does not change).
@main
struct NodeHeartbeatBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node-heartbeat-bench",
        abstract: "Measure node heartbeats against a running mesh-control (see perf/node-heartbeat)."
    )

    @Option(help: "Control plane URL.") var server = "https://127.0.0.1:7701"
    @Option(help: "mesh-control's pki folder (ca.crt, admin.crt, admin.key).") var pki: String
    @Option(help: "PID of mesh-control, for its CPU time and RSS.") var pid: Int32 = 0
    @Option(help: "Simulated nodes, one connection each (at most 15000).") var nodes = 10_000
    @Option(help: "Seconds between one node's beats (the offered rate is nodes/interval).") var interval = 2.0
    @Option(help: "Seconds measured after every node has registered and beaten once.") var duration = 30.0
    @Option(help: "Concurrent registrations while setting up.") var concurrency = 64
    @Option(
        help:
            "beat: POST .../heartbeat (the design); put: every beat a PUT of the Node with a new label (a store write and a watch event each), for comparison."
    ) var mode = "beat"
    @Option(help: "Write the figures as JSON to this file.") var json: String?

    func run() async throws {
        guard (1...15_000).contains(self.nodes), self.interval >= 0.01, (1...600).contains(self.duration) else {
            throw ValidationError("nodes must be 1-15000, interval at least 0.01, duration 1-600")
        }
        guard ["beat", "put"].contains(self.mode) else { throw ValidationError("mode is beat or put") }
        guard let endpoint = HTTPEndpoint(url: self.server, defaultTLS: true) else {
            throw ValidationError("bad --server")
        }
        let admin = try CredentialFiles(directory: self.pki, name: "admin").load()
        let base = ControlClient(endpoint: endpoint, tls: HTTPClientTLS(context: try MeshTLS.clientContext(admin)))
        let count = self.nodes
        let names = (0..<count).map { String(format: "sim-%05d", $0) }
        let rssIdle = ProcessStats.rss(self.pid)

        // Set-up: register every node (as the admin, so it is Unknown) and beat once (Ready): two
        // store writes per node, the cost of a fleet coming online.
        let setupStart = ContinuousClock.now
        let sessions = names.map { _ in base.keepingAlive() }
        let mode = self.mode
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func add() {
                let i = next
                next += 1
                group.addTask {
                    let c = sessions[i]
                    let node = Node(
                        metadata: ObjectMeta(name: names[i], labels: ["bench": "node-heartbeat"]),
                        spec: NodeSpec(
                            site: "s\(i % 100)",
                            addresses: [NodeAddress(type: .internalIP, address: "198.18.\(i / 250).\(i % 250 + 1)")]
                        )
                    )
                    try await c.apply(node)
                    if mode == "beat" { try await c.heartbeat(node: names[i]) }
                }
            }
            for _ in 0..<min(self.concurrency, count) { add() }
            while try await group.next() != nil {
                if next < count { add() }
            }
        }
        let setup = ContinuousClock.now - setupStart
        print("set-up: \(count) nodes registered\(mode == "beat" ? " and Ready" : "") in \(setup)")
        let rssConnected = ProcessStats.rss(self.pid)

        // One watcher on nodes counts the events the beats cause.
        let rv = Int64(try await base.list(Node.self, labelSelector: "bench=node-heartbeat").metadata.resourceVersion)!
        let events = Tally()
        let watcher = Task {
            try? await base.watch(Node.self, after: rv) { event in
                if case .modified = event { events.add() }
                return true
            }
        }
        try await Task.sleep(for: .milliseconds(300))

        // The measured window: every node beats every `interval`, starting at its own offset.
        let intervalNanos = Int64(self.interval * 1e9)
        let rounds = max(1, Int(self.duration / self.interval))
        let cpuBefore = Self.cpuSeconds(self.pid)
        let windowStart = ContinuousClock.now
        let failures = Tally()
        let results = try await withThrowingTaskGroup(of: [Int64].self) { group -> [[Int64]] in
            for i in 0..<count {
                let offset = intervalNanos * Int64(i) / Int64(count)
                group.addTask {
                    var latencies: [Int64] = []
                    latencies.reserveCapacity(rounds)
                    let c = sessions[i]
                    for k in 0..<rounds {
                        let due = windowStart + .nanoseconds(offset + Int64(k) * intervalNanos)
                        try? await Task.sleep(until: due, clock: .continuous)
                        let t0 = ContinuousClock.now
                        do {
                            if mode == "beat" {
                                try await c.heartbeat(node: names[i])
                            } else {
                                var node = try await c.get(Node.self, name: names[i])
                                node.metadata.labels?["bench/beat"] = "\(k)"
                                try await c.apply(node)
                            }
                            latencies.append(Self.nanos(ContinuousClock.now - t0))
                        } catch {
                            failures.add()
                        }
                    }
                    return latencies
                }
            }
            var all: [[Int64]] = []
            for try await r in group { all.append(r) }
            return all
        }
        let window = ContinuousClock.now - windowStart
        let cpuAfter = Self.cpuSeconds(self.pid)
        let rssEnd = ProcessStats.rss(self.pid)
        try await Task.sleep(for: .milliseconds(300))
        watcher.cancel()
        for s in sessions { s.session?.close() }

        var latencies = results.flatMap { $0 }
        latencies.sort()
        let beats = latencies.count
        let seconds = Double(Self.nanos(window)) / 1e9
        let cpu = cpuAfter - cpuBefore
        func pct(_ p: Double) -> Double {
            guard !latencies.isEmpty else { return .nan }
            return Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]) / 1e6
        }
        let figures: [(String, String)] = [
            ("mode", mode), ("nodes (one connection each)", "\(count)"),
            ("interval per node (s)", String(format: "%g", self.interval)),
            ("offered beats/s", String(format: "%.0f", Double(count) / self.interval)),
            ("set-up: register + first beat (s)", String(format: "%.1f", Double(Self.nanos(setup)) / 1e9)),
            ("beats answered", "\(beats)"), ("beats failed", "\(failures.value)"),
            ("window (s)", String(format: "%.1f", seconds)),
            ("sustained beats/s", String(format: "%.0f", Double(beats) / seconds)),
            ("latency p50 (ms)", String(format: "%.2f", pct(0.50))),
            ("latency p99 (ms)", String(format: "%.2f", pct(0.99))),
            ("latency max (ms)", String(format: "%.2f", latencies.isEmpty ? .nan : Double(latencies.last!) / 1e6)),
            ("control CPU (cores)", String(format: "%.2f", cpu / seconds)),
            ("control CPU per beat (us)", String(format: "%.1f", beats == 0 ? .nan : cpu / Double(beats) * 1e6)),
            ("MODIFIED events seen by a watcher", "\(events.value)"),
            ("control RSS idle (MiB)", String(format: "%.1f", Double(rssIdle) / 1_048_576)),
            ("control RSS, nodes connected (MiB)", String(format: "%.1f", Double(rssConnected) / 1_048_576)),
            ("control RSS at end (MiB)", String(format: "%.1f", Double(rssEnd) / 1_048_576)),
        ]
        for (k, v) in figures { print(k.padding(toLength: 36, withPad: " ", startingAt: 0) + v) }
        if let path = self.json {
            let obj = Dictionary(uniqueKeysWithValues: figures)
            try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]).write(
                to: URL(fileURLWithPath: path)
            )
        }
        if failures.value > 0 { throw ExitCode(2) }
    }

    static func nanos(_ d: Duration) -> Int64 {
        let (s, atto) = d.components
        return s * 1_000_000_000 + atto / 1_000_000_000
    }

    /// utime + stime of a process, in seconds (from /proc/PID/stat).
    static func cpuSeconds(_ pid: Int32) -> Double {
        guard pid > 0, let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return 0 }
        let fields = text[text.index(after: close)...].split(separator: " ")
        // After the name: state is field 3, utime 14 and stime 15 (1-based), so 11 and 12 here.
        guard fields.count > 12, let u = Double(fields[11]), let s = Double(fields[12]) else { return 0 }
        return (u + s) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

}

/// A counter tasks share.
final class Tally: Sendable {
    private let count = Atomic<Int>(0)
    func add() { self.count.add(1, ordering: .relaxed) }
    var value: Int { self.count.load(ordering: .relaxed) }
}
