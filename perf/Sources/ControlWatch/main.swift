import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import PerfSupport

/// Fan-out delay of the control plane's watch: N watchers on endpoints, a burst of M updates, the
/// delay from each update's send to its arrival at each watcher; and the server's memory.
@main
struct ControlWatchBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "control-watch-bench",
        abstract: "Measure watch fan-out delay of a running mesh-control (see perf/control-watch)."
    )

    @Option(help: "Control plane URL.") var server = "https://127.0.0.1:7701"
    @Option(help: "mesh-control's pki folder (ca.crt, admin.crt, admin.key).") var pki: String
    @Option(help: "PID of mesh-control, for its RSS.") var pid: Int32 = 0
    @Option(help: "Concurrent watchers (at most 20000).") var watchers = 1000
    @Option(help: "Endpoint updates in the burst (at most 100000).") var updates = 200
    @Option(help: "Concurrent writers.") var writers = 4
    @Option(help: "Give up after this many seconds.") var timeout = 120
    @Option(help: "Write the figures as JSON to this file.") var json: String?

    func run() async throws {
        guard (1...20_000).contains(self.watchers), (1...100_000).contains(self.updates) else {
            throw ValidationError("watchers must be 1-20000 and updates 1-100000")
        }
        guard let endpoint = HTTPEndpoint(url: self.server, defaultTLS: true) else {
            throw ValidationError("bad --server")
        }
        let admin = try CredentialFiles(directory: self.pki, name: "admin").load()
        let client = ControlClient(endpoint: endpoint, tls: HTTPClientTLS(context: try MeshTLS.clientContext(admin)))
        let ns = "bench"
        // One Endpoints object per writer, updated in turn.
        for w in 0..<self.writers { try await client.apply(Self.endpoints(ns, w, sent: 0)) }
        let start = Int64(try await client.list(Endpoints.self, namespace: ns).metadata.resourceVersion)!
        let rssBefore = ProcessStats.rss(self.pid)
        let expected = self.updates
        let clock = ContinuousClock.now

        let pid = self.pid
        let writers = self.writers
        let timeout = self.timeout
        let watchers = self.watchers
        let (perWatcher, rssPeak) = try await withThrowingTaskGroup(of: [Int64].self) { group -> ([[Int64]], Int) in
            for _ in 0..<watchers {
                group.addTask {
                    var delays: [Int64] = []
                    delays.reserveCapacity(expected)
                    // A watcher that fails or is cut off by the deadline reports what it got.
                    try? await client.watchLines(Endpoints.resource, namespace: ns, after: start) { line in
                        guard let sent = Self.sentStamp(line) else { return true }
                        delays.append(Self.monotonicNanos() - sent)
                        return delays.count < expected
                    }
                    return delays
                }
            }
            // Let the watches connect before the burst.
            try await Task.sleep(for: .milliseconds(max(500, watchers)))
            let writeStart = ContinuousClock.now
            try await withThrowingTaskGroup(of: Void.self) { writersGroup in
                for w in 0..<writers {
                    let mine = (expected - w + writers - 1) / writers
                    writersGroup.addTask { () async throws -> Void in
                        for _ in 0..<mine {
                            _ = try await client.apply(Self.endpoints(ns, w, sent: Self.monotonicNanos()))
                        }
                    }
                }
                try await writersGroup.waitForAll()
            }
            print("burst of \(expected) updates written in \(ContinuousClock.now - writeStart)")
            let peak = ProcessStats.rss(pid)
            // A deadline in the group: its sentinel result cancels the watchers still waiting.
            group.addTask {
                try? await Task.sleep(for: .seconds(timeout))
                return [-1]
            }
            var all: [[Int64]] = []
            while all.count < watchers, let r = try await group.next() {
                if r == [-1] {
                    group.cancelAll()
                    continue
                }
                all.append(r)
            }
            group.cancelAll()
            return (all, peak)
        }
        let complete = perWatcher.filter { $0.count == expected }.count
        var delays = perWatcher.flatMap { $0 }
        delays.sort()
        func pct(_ p: Double) -> Double {
            guard !delays.isEmpty else { return .nan }
            return Double(delays[min(delays.count - 1, Int(Double(delays.count) * p))]) / 1e6
        }
        let rssAfter = ProcessStats.rss(self.pid)
        let elapsed = ContinuousClock.now - clock
        let figures: [(String, String)] = [
            ("watchers", "\(self.watchers)"), ("updates", "\(expected)"),
            ("watchers that saw every update", "\(complete)"), ("deliveries", "\(delays.count)"),
            ("fan-out delay p50 (ms)", String(format: "%.2f", pct(0.50))),
            ("fan-out delay p90 (ms)", String(format: "%.2f", pct(0.90))),
            ("fan-out delay p99 (ms)", String(format: "%.2f", pct(0.99))),
            ("fan-out delay max (ms)", String(format: "%.2f", delays.isEmpty ? .nan : Double(delays.last!) / 1e6)),
            ("server RSS before (MiB)", String(format: "%.1f", Double(rssBefore) / 1_048_576)),
            ("server RSS at end of burst (MiB)", String(format: "%.1f", Double(rssPeak) / 1_048_576)),
            ("server RSS after (MiB)", String(format: "%.1f", Double(rssAfter) / 1_048_576)),
            ("elapsed (s)", String(format: "%.1f", Double(elapsed.components.seconds))),
        ]
        for (k, v) in figures { print(k.padding(toLength: 34, withPad: " ", startingAt: 0) + v) }
        if let path = self.json {
            let obj = Dictionary(uniqueKeysWithValues: figures)
            try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]).write(
                to: URL(fileURLWithPath: path)
            )
        }
        if complete != self.watchers { throw ExitCode(2) }
    }

    static func endpoints(_ ns: String, _ w: Int, sent: Int64) -> Endpoints {
        Endpoints(
            metadata: ObjectMeta(name: "ep-\(w)", namespace: ns, annotations: ["bench/sent": "\(sent)"]),
            spec: EndpointsSpec(addresses: [EndpointAddress(ip: "198.18.0.\(w + 1)", ports: [EndpointPort(port: 8080)])]
            )
        )
    }

    /// The `bench/sent` annotation of a watch line, found without decoding the whole event.
    static func sentStamp(_ line: ByteBuffer) -> Int64? {
        let needle = Array(#""bench/sent":""#.utf8)
        let bytes = line.readableBytesView
        guard let r = bytes.firstRange(of: needle) else { return nil }
        var v: Int64 = 0
        var i = r.upperBound
        while i < bytes.endIndex, bytes[i] >= 48, bytes[i] <= 57 {
            v = v * 10 + Int64(bytes[i] - 48)
            i += 1
        }
        return v == 0 ? nil : v
    }

    static func monotonicNanos() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

}
