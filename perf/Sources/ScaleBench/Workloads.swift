import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import NIOCore
import PerfSupport

/// `scale-bench workloads`: what the control plane's WorkloadController costs with many nodes and workloads.
///
/// One mesh-control (SQLite store) with N registered Ready nodes and W workloads, workload k on node k % N
/// (by name) with a port, so each has a service and Endpoints. Then:
/// 1. `idle`: the replica's CPU over `idle` seconds in which nothing changes;
/// 2. `reports`: R workload reports posted at a rate (each a node's instance going Running or restarting: the
///    node's status write, then the controller's write of the workload's sums and of its Endpoints), the
///    replica's CPU per report, and how long after the last post every reported workload shows it;
/// 3. `flaps`: F label changes of nodes (a label no workload selects, read then written back), the replica's
///    CPU per change: what a node's label change costs the controller when it concerns no workload (before
///    the selector index: a check of every workload's selector).
/// With `--baseline-control` the same runs against that binary first (another build, e.g. before a change),
/// in the same invocation, and the ratios are printed.
struct Workloads: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "CPU of the control plane's workload controller with N nodes and W workloads (see perf/scale)."
    )

    @Option(help: "mesh-control binary.") var control: String
    @Option(help: "Another mesh-control binary to run the same first, as the baseline.") var baselineControl: String?
    @Option(help: "Working folder (the replicas' data directories and logs).") var work: String
    @Option(help: "Registered Ready nodes.") var nodes = 2000
    @Option(help: "Workloads, workload k on node k % nodes.") var workloads = 2000
    @Option(help: "Seconds with no change, for the idle CPU.") var idle = 10.0
    @Option(help: "Workload reports posted.") var reports = 400
    @Option(help: "Workload reports per second.") var reportRate = 40.0
    @Option(help: "Node label changes made.") var flaps = 200
    @Option(help: "Node label changes per second.") var flapRate = 20.0
    @Option(help: "Write the figures as JSON to this file.") var json: String?

    struct Figures {
        var setUp = 0.0
        var idleCores = 0.0
        var cpuPerReportMs = 0.0
        var reportsPerSecond = 0.0
        var converged = 0.0
        var rssMiB = 0.0
        var cpuPerFlapMs = 0.0
    }

    func run() async throws {
        guard (1...20_000).contains(self.nodes), (1...100_000).contains(self.workloads),
            (0...100_000).contains(self.reports), (0...100_000).contains(self.flaps)
        else { throw ValidationError("nodes 1-20000, workloads 1-100000, reports 0-100000, flaps 0-100000") }
        var runs: [(String, Figures)] = []
        if let base = self.baselineControl {
            runs.append(("baseline", try await self.measure(base, label: "baseline")))
        }
        runs.append(("this", try await self.measure(self.control, label: "this")))
        var out: [String: String] = [
            "nodes": "\(self.nodes)", "workloads": "\(self.workloads)", "reports": "\(self.reports)",
            "report rate": "\(self.reportRate)",
        ]
        print("")
        print("| \(self.nodes) nodes, \(self.workloads) workloads | " + runs.map(\.0).joined(separator: " | ") + " |")
        print("|---|" + runs.map { _ in "---|" }.joined())
        func row(_ name: String, _ format: String, _ value: (Figures) -> Double) {
            print("| \(name) | " + runs.map { String(format: format, value($0.1)) }.joined(separator: " | ") + " |")
            for (label, f) in runs { out["\(label): \(name)"] = String(format: format, value(f)) }
        }
        row("set-up: nodes, workloads, all assigned (s)", "%.1f", \.setUp)
        row("replica CPU while nothing changes (cores)", "%.4f", \.idleCores)
        row("replica CPU per workload report (ms)", "%.2f", \.cpuPerReportMs)
        row("reports/s achieved", "%.1f", \.reportsPerSecond)
        row("every report shown, after the last post (s)", "%.2f", \.converged)
        row("replica CPU per node label change (ms)", "%.2f", \.cpuPerFlapMs)
        row("replica RSS at the end (MiB)", "%.1f", \.rssMiB)
        if runs.count == 2 {
            let (b, t) = (runs[0].1, runs[1].1)
            let cpu = t.cpuPerReportMs / b.cpuPerReportMs
            let idle = b.idleCores > 0 ? t.idleCores / b.idleCores : .nan
            let flap = t.cpuPerFlapMs / b.cpuPerFlapMs
            print(
                String(
                    format: "ratio this / baseline: CPU per report x%.3f, idle CPU x%.3f, CPU per label change x%.3f",
                    cpu,
                    idle,
                    flap
                )
            )
            out["ratio: CPU per report"] = String(format: "%.3f", cpu)
            out["ratio: idle CPU"] = String(format: "%.3f", idle)
            out["ratio: CPU per label change"] = String(format: "%.3f", flap)
        }
        if let path = self.json {
            try JSONSerialization.data(withJSONObject: out, options: [.prettyPrinted, .sortedKeys])
                .write(to: URL(fileURLWithPath: path))
        }
    }

    static func nodeName(_ i: Int) -> String { String(format: "wl-node-%05d", i) }
    static func workloadName(_ k: Int) -> String { String(format: "wl-%05d", k) }

    func measure(_ binary: String, label: String) async throws -> Figures {
        let dir = self.work + "/" + label
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let port = try freeLoopbackPorts(1)[0]
        let url = "https://127.0.0.1:\(port)"
        let configPath = dir + "/control.yaml"
        try [
            "nodeGracePeriodSeconds: 3600", "bookmarkIntervalSeconds: 3600", "logLevel: warning",
            "idleTimeoutSeconds: 3600",
        ].joined(separator: "\n").appending("\n").write(toFile: configPath, atomically: true, encoding: .utf8)
        let replica = try Drive.Child(
            binary,
            ["--config", configPath, "--listen", "127.0.0.1:\(port)", "--data-dir", dir + "/r0"],
            log: dir + "/r0.log"
        )
        defer {
            replica.process.terminate()
            replica.process.waitUntilExit()
        }
        let pid = replica.process.processIdentifier
        let pki = dir + "/r0/pki"
        let (admin, _) = try await replicaReady(
            pki: pki,
            url: url,
            timeout: .seconds(120),
            log: dir + "/r0.log",
            process: replica.process
        )
        var f = Figures()
        let start = ContinuousClock.now
        let lanes = (0..<8).map { _ in admin.keepingAlive() }
        defer { for c in lanes { c.session?.close() } }
        print("\(label): registering \(self.nodes) nodes, \(self.workloads) workloads")
        fflush(nil)
        try await inLanes(lanes, self.nodes) { c, i in
            let address = NodeAddress(type: .internalIP, address: "198.18.\(i / 250).\(i % 250 + 1)")
            try await c.apply(
                Node(
                    metadata: ObjectMeta(name: Self.nodeName(i)),
                    spec: NodeSpec(site: "s\(i % 100)", addresses: [address])
                )
            )
            try await c.heartbeat(node: Self.nodeName(i))
        }
        try await inLanes(lanes, self.workloads) { c, k in
            try await c.apply(
                Workload(
                    metadata: ObjectMeta(name: Self.workloadName(k), namespace: "default"),
                    spec: WorkloadSpec(
                        command: "/bin/true",
                        ports: [WorkloadPort(name: "http", port: 8080)],
                        nodeSelector: WorkloadNodeSelector(nodeNames: [Self.nodeName(k % self.nodes)])
                    )
                )
            )
        }
        try await waitUntil("every workload assigned", timeout: .seconds(600), poll: .milliseconds(500)) {
            let items = try await admin.list(Workload.self, namespace: "default").items
            return items.count == self.workloads && items.allSatisfy { $0.status?.nodes?.count == 1 }
        }
        f.setUp = (ContinuousClock.now - start).seconds
        print(String(format: "%@: set up in %.1f s; idle for %.0f s", label, f.setUp, self.idle))
        fflush(nil)

        // 1. Nothing changes.
        try await Task.sleep(for: .seconds(2))
        let idle0 = ProcessStats.cpuSeconds(pid)
        try await Task.sleep(for: .seconds(self.idle))
        f.idleCores = (ProcessStats.cpuSeconds(pid) - idle0) / self.idle

        // 2. Reports: the instance of workload k % W on its node, Running, restarts = k / W.
        let cpu0 = ProcessStats.cpuSeconds(pid)
        let posting = ContinuousClock.now
        let gap = 1.0 / self.reportRate
        let count = self.reports
        try await inLanes(lanes, count) { c, k in
            try await Task.sleep(until: posting + .seconds(Double(k) * gap), clock: .continuous)
            let w = k % self.workloads
            let node = Self.nodeName(w % self.nodes)
            let batch = NodeReportBatch(
                epoch: "scale-bench",
                reports: [
                    NodeReport(
                        id: Int64(k + 1),
                        workload: WorkloadReport(
                            namespace: "default",
                            name: Self.workloadName(w),
                            instance: WorkloadInstance(node: node, phase: .running, restarts: k / self.workloads)
                        )
                    )
                ]
            )
            let path = ControlClient.path(Node.resource, namespace: nil, name: node) + "/reports"
            let answer = try await c.raw(.POST, path, body: ByteBuffer(bytes: try MeshJSON.encode(batch))).body
            guard String(buffer: answer).contains("\"applied\"") else {
                throw ValidationError("report \(k) not applied: \(String(buffer: answer))")
            }
        }
        let posted = ContinuousClock.now
        f.reportsPerSecond = Double(count) / (posted - posting).seconds
        // Every reported workload shows its last report: Running, its restarts, its endpoint ready.
        var last: [Int: Int] = [:]
        for k in 0..<count { last[k % self.workloads] = k / self.workloads }
        try await waitUntil("every report shown", timeout: .seconds(600), poll: .milliseconds(500)) {
            let items = try await admin.list(Workload.self, namespace: "default").items
            let endpoints = try await admin.list(Endpoints.self, namespace: "default").items
            let readyServices = Set(endpoints.filter { $0.spec.addresses.first?.ready == true }.map(\.metadata.name))
            let byName = Dictionary(items.map { ($0.metadata.name, $0) }, uniquingKeysWith: { a, _ in a })
            return last.allSatisfy { w, restarts in
                let name = Self.workloadName(w)
                return byName[name]?.status?.running == 1 && byName[name]?.status?.restarts == restarts
                    && readyServices.contains(name)
            }
        }
        f.converged = (ContinuousClock.now - posted).seconds
        f.cpuPerReportMs = count > 0 ? (ProcessStats.cpuSeconds(pid) - cpu0) / Double(count) * 1000 : 0

        // 3. Label changes: node k % N gets `bench-flap: k`, which no workload selects.
        try await Task.sleep(for: .seconds(2))
        let flap0 = ProcessStats.cpuSeconds(pid)
        let flapping = ContinuousClock.now
        let flapGap = 1.0 / self.flapRate
        try await inLanes(lanes, self.flaps) { c, k in
            try await Task.sleep(until: flapping + .seconds(Double(k) * flapGap), clock: .continuous)
            var node = try await c.get(Node.self, name: Self.nodeName(k % self.nodes))
            node.metadata.labels = ["bench-flap": "\(k)"]
            try await c.apply(node)
        }
        // The controller's passes after the last change (coalesced within 100 ms) are counted too.
        try await Task.sleep(for: .seconds(2))
        f.cpuPerFlapMs = self.flaps > 0 ? (ProcessStats.cpuSeconds(pid) - flap0) / Double(self.flaps) * 1000 : 0
        f.rssMiB = Double(ProcessStats.rss(pid)) / 1_048_576
        print(
            String(
                format: "%@: %d reports at %.1f/s, %.2f ms CPU each, all shown %.2f s after the last; "
                    + "%.2f ms per label change",
                label,
                count,
                f.reportsPerSecond,
                f.cpuPerReportMs,
                f.converged,
                f.cpuPerFlapMs
            )
        )
        fflush(nil)
        return f
    }
}

extension Duration {
    /// In seconds, with the fraction.
    var seconds: Double {
        Double(self.components.seconds) + Double(self.components.attoseconds) / 1e18
    }
}
