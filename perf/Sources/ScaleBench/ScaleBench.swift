import ArgumentParser
import Foundation
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import PerfSupport
import Synchronization

/// perf/scale: N simulated agents against 1 or more mesh-control replicas over one etcd.
///
/// `drive` starts the replicas, then `sim` processes that each simulate a slice of the agents:
/// every agent holds its own TLS connection with one watch over the kinds a real agent follows but Nodes
/// (a `MultiReflector`, as the agent does, failing over between the replicas), and beats every `interval`
/// seconds on that same connection, as the agent does (each beat ends the watch for a moment; the watch
/// resumes from its last version). `--beats-on-watch false` is the agent before that: its beats went over a
/// second, kept-alive connection, simulated here by a few shared per process (this machine allows 20,000
/// descriptors per process, so 10,000 agents with two each would not fit on one replica).
/// The driver measures the replicas' RSS before and after the agents connect, their CPU while the
/// agents only beat, the delay of one Service change reaching every agent, and the time for all
/// agents of a killed replica to resume after it restarts.
@main
struct ScaleBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scale-bench",
        abstract: "Simulate N agents against mesh-control replicas (see perf/scale).",
        subcommands: [Drive.self, Sim.self, Idle.self, Workloads.self]
    )
}

/// Wall-clock nanoseconds (shared by the processes of one machine).
func wallNanos() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}

func adminClient(_ pki: String, _ urls: [String]) throws -> (ControlClient, HTTPClientTLS) {
    let admin = try CredentialFiles(directory: pki, name: "admin").load()
    // Offering the mesh record layer, as real agents do (it is the replica's `httpRecords` that decides).
    let tls = HTTPClientTLS(context: try MeshTLS.clientContext(admin, httpRecords: true))
    let endpoints = urls.compactMap { HTTPEndpoint(url: $0, defaultTLS: true) }
    return (ControlClient(endpoints: endpoints, tls: tls), tls)
}

/// `n` distinct loopback TCP ports that were free just now: bound together to port 0, then closed. (A port
/// picked at random from 21000-61000 could be one a client connection of this host holds: Linux hands out
/// ephemeral ports from 32768 up, and a replica then failed to start with "Address already in use".)
func freeLoopbackPorts(_ n: Int) throws -> [Int] {
    var sockets: [Int32] = []
    defer { for s in sockets { close(s) } }
    var ports: [Int] = []
    for _ in 0..<n {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard s >= 0 else { throw ValidationError("socket: \(String(cString: strerror(errno)))") }
        sockets.append(s)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(s, $0, length) == 0 && getsockname(s, $0, &length) == 0
            }
        }
        guard bound else { throw ValidationError("bind 127.0.0.1:0: \(String(cString: strerror(errno)))") }
        ports.append(Int(UInt16(bigEndian: address.sin_port)))
    }
    return ports
}

/// The admin's client of a replica once it answers `/readyz` (its pki folder written, its listener up),
/// polled every 100 ms for at most `timeout`; `log` names where to look when it does not come up. With
/// `process`, a replica that exits fails the wait at once.
func replicaReady(
    pki: String,
    url: String,
    timeout: Duration,
    log: String,
    process: Process? = nil
) async throws -> (ControlClient, HTTPClientTLS) {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if let process, !process.isRunning { throw ValidationError("the replica exited (log: \(log))") }
        if FileManager.default.fileExists(atPath: pki + "/admin.key"), let (c, tls) = try? adminClient(pki, [url]),
            (try? await c.raw(.GET, "/readyz")) != nil
        {
            return (c, tls)
        }
        try await Task.sleep(for: .milliseconds(100))
    }
    throw ValidationError("the replica did not become ready (log: \(log))")
}

/// Waits for `condition`, polled every `poll`, for at most `timeout`.
func waitUntil(
    _ what: String,
    timeout: Duration,
    poll: Duration = .milliseconds(50),
    _ condition: () async throws -> Bool
) async throws {
    let deadline = ContinuousClock.now + timeout
    while try await !condition() {
        guard ContinuousClock.now < deadline else { throw ValidationError("no \(what) within \(timeout)") }
        try await Task.sleep(for: poll)
    }
}

/// Runs `body(client, i)` for i in 0..<count over the clients, one lane each (lane l takes l, l + lanes, ...).
func inLanes(
    _ clients: [ControlClient],
    _ count: Int,
    _ body: @escaping @Sendable (ControlClient, Int) async throws -> Void
) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        for (l, c) in clients.enumerated() {
            group.addTask {
                for i in stride(from: l, to: count, by: clients.count) { try await body(c, i) }
            }
        }
        try await group.waitForAll()
    }
}

// MARK: sim

/// The first error of many, kept for the report.
final class FirstError: Sendable {
    private let first = Mutex<String?>(nil)
    func note(_ error: any Error) { self.first.withLock { $0 = $0 ?? "\(error)" } }
    var text: String? { self.first.withLock { $0 } }
}

struct Sim: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Simulate agents first..<first+count.")

    @Option(help: "Replica URLs, comma-separated.") var servers: String
    @Option(help: "A replica's pki folder (the admin credentials).") var pki: String
    @Option var first = 0
    @Option var count = 1000
    @Option(help: "Seconds between one agent's beats.") var interval = 20.0
    @Option(help: "Kept-alive connections for this process's registrations (and beats, without --beats-on-watch).")
    var beatConnections = 8
    @Option(
        help:
            "Beat over each agent's watch connection, as the agent does (false: over the shared connections, as the agent did with a second connection)."
    )
    var beatsOnWatch = true
    @Option(help: "Concurrent registrations.") var concurrency = 32
    @Option(help: "Follow Nodes too, as agents did before endpoints carried their node's site (the baseline).")
    var followNodes = false
    @Option(help: "Watch only this agent's own devices and workloads (?node=); false: every one, the baseline.")
    var ownDevices = true

    final class Agent: Sendable {
        struct State {
            var lists = 0
            var events: [(Int64, Int64)] = []
            /// When each watch stream started (wall nanoseconds).
            var streams: [Int64] = []
        }
        let state = Mutex(State())
    }

    /// An object's change (not a bookmark): what a delivery counter counts.
    static func isChange<T>(_ e: WatchEvent<T>) -> Bool {
        switch e {
        case .added, .modified, .deleted: return true
        case .bookmark, .error: return false
        }
    }

    func run() async throws {
        let urls = self.servers.split(separator: ",").map(String.init)
        let (admin, tls) = try adminClient(self.pki, urls)
        let endpoints = urls.compactMap { HTTPEndpoint(url: $0, defaultTLS: true) }
        var logger = Logger(label: "sim")
        // SCALE_SIM_LOG=info (or debug) shows the agents' reflector logs on stderr, run by hand.
        let level = ProcessInfo.processInfo.environment["SCALE_SIM_LOG"]
        logger.logLevel = level.flatMap { Logger.Level(rawValue: $0) } ?? .critical
        let names = (self.first..<self.first + self.count).map { String(format: "sim-%05d", $0) }
        // Register every node (as the admin: Unknown until its first beat).
        let pool = (0..<endpoints.count).map { r in
            (0..<self.beatConnections).map { _ in
                ControlClient(endpoints: Array(endpoints[r...] + endpoints[..<r]), tls: tls).keepingAlive()
            }
        }
        let firstIndex = self.first
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func add() {
                let i = next
                next += 1
                group.addTask {
                    let node = Node(metadata: ObjectMeta(name: names[i]), spec: NodeSpec(site: "s\(i % 100)"))
                    let c = pool[(firstIndex + i) % endpoints.count][i % pool[0].count]
                    for attempt in 0..<5 {
                        do {
                            try await c.apply(node)
                            return
                        } catch  where attempt < 4 {
                            try await Task.sleep(for: .milliseconds(200))
                        }
                    }
                }
            }
            for _ in 0..<min(self.concurrency, names.count) { add() }
            while try await group.next() != nil { if next < names.count { add() } }
        }
        _ = admin
        // Agents: one watch each, on their own connection, spread over the replicas, over the kinds a real
        // agent follows (its service table's and its edge part's), listed first as it does. No Nodes, as the
        // agent: endpoints carry their node's site and peers are looked up when a link is dialed (a real
        // agent that followed every Node cost N lists of N Nodes at set-up and N deliveries per Node change,
        // 10^8 at 10,000; perf/RESULTS.md). `--follow-nodes true` adds Nodes back, to measure that baseline.
        let nodeEvents = Counter()
        let deviceEvents = Counter()
        let agents = names.map { _ in Agent() }
        // Each agent's client: its watch, and its beats with --beats-on-watch (one connection, as the agent).
        let clients = names.indices.map { i in
            let r = (firstIndex + i) % endpoints.count
            let c = ControlClient(endpoints: Array(endpoints[r...] + endpoints[..<r]), tls: tls)
            return self.beatsOnWatch ? c.carryingWatches() : c
        }
        if self.beatsOnWatch { for c in pool.joined() { c.session?.close() } }
        var tasks: [Task<Void, Never>] = []
        for (i, agent) in agents.enumerated() {
            var reflector = MultiReflector(
                client: clients[i],
                kinds: [
                    .of(MeshService.self, from: nil) { update in
                        let now = wallNanos()
                        agent.state.withLock { s in
                            switch update {
                            case .replaced: s.lists += 1
                            case .changed(.bookmark): break
                            case .changed(let e):
                                if let rv = e.resourceVersion { s.events.append((rv, now)) }
                            }
                        }
                    },
                    .of(Endpoints.self, from: nil) { _ in },
                    .of(MeshCore.Relay.self, from: nil) { _ in },
                    .of(Workload.self, from: nil, node: self.ownDevices ? names[i] : nil) { _ in },
                    .of(DeviceModel.self, from: nil) { _ in },
                    .of(Device.self, from: nil, node: self.ownDevices ? names[i] : nil) { update in
                        if case .changed(let e) = update, Self.isChange(e) { deviceEvents.add() }
                    },
                ]
                    + (self.followNodes
                        ? [
                            .of(Node.self, from: nil) { update in
                                if case .changed(let e) = update, Self.isChange(e) { nodeEvents.add() }
                            }
                        ] : []),
                logger: logger
            )
            reflector.backoff.initial = .milliseconds(100)
            reflector.backoff.maximum = .seconds(2)
            reflector.watchTimeoutSeconds = 3600
            // Every stream's start (the first after a replica is killed is the agent's resumption).
            reflector.onStream = { _ in
                let now = wallNanos()
                agent.state.withLock { $0.streams.append(now) }
            }
            tasks.append(Task { await reflector.run() })
        }
        // Beats: each agent every `interval`, from its own offset, over the pool.
        let beatsOK = Counter()
        let beatsFailed = Counter()
        let firstBeatError = FirstError()
        let intervalNanos = Int64(self.interval * 1e9)
        let start = ContinuousClock.now
        let count = names.count
        let beatsOnWatch = self.beatsOnWatch
        let beater = Task {
            await withTaskGroup(of: Void.self) { group in
                for lane in 0..<min(64, count) {
                    group.addTask {
                        var k: Int64 = 0
                        while !Task.isCancelled {
                            for i in stride(from: lane, to: count, by: min(64, count)) {
                                let due =
                                    start + .nanoseconds(k * intervalNanos + intervalNanos * Int64(i) / Int64(count))
                                // A beat a quarter interval late is skipped, as an agent's timer would: the next
                                // one is due soon (no burst of missed beats after a slow set-up).
                                if ContinuousClock.now - due > .nanoseconds(intervalNanos / 4) { continue }
                                try? await Task.sleep(until: due, clock: .continuous)
                                if Task.isCancelled { return }
                                let c =
                                    beatsOnWatch
                                    ? clients[i] : pool[(firstIndex + i) % endpoints.count][lane % pool[0].count]
                                do {
                                    try await c.heartbeat(node: names[i])
                                    beatsOK.add()
                                } catch {
                                    beatsFailed.add()
                                    firstBeatError.note(error)
                                }
                            }
                            k += 1
                        }
                    }
                }
            }
        }
        // Ready once every agent has listed every kind and watches (its stream has started).
        while agents.contains(where: { $0.state.withLock { $0.streams.isEmpty } }) {
            try await Task.sleep(for: .milliseconds(100))
        }
        print("ready", terminator: "\n")
        fflush(nil)
        // Commands from the driver, one per line.
        while let line = readLine() {
            let words = line.split(separator: " ")
            switch words.first {
            case "stats":
                print("stats \(beatsOK.value) \(beatsFailed.value)")
            case "report":
                // report <killNanos> <rv>...: per rv the receive times, lists, the first stream after the kill.
                let kill = Int64(words[1]) ?? 0
                let rvs = Set(words.dropFirst(2).compactMap { Int64($0) })
                var events: [String: [Int64]] = [:]
                var lists: [Int] = []
                var reconnects: [Int64] = []
                for (i, a) in agents.enumerated() {
                    // Resumptions: of the agents on replica 0 (the one killed) only; the others' streams also start
                    // again at each beat.
                    let onKilled = (firstIndex + i) % endpoints.count == 0
                    a.state.withLock { s in
                        lists.append(s.lists)
                        for (rv, t) in s.events where rvs.contains(rv) { events[String(rv), default: []].append(t) }
                        if onKilled, let b = s.streams.first(where: { $0 > kill }) { reconnects.append(b - kill) }
                    }
                }
                let obj: [String: Any] = [
                    "events": events, "lists": lists, "reconnects": reconnects,
                    "beatsOK": beatsOK.value, "beatsFailed": beatsFailed.value,
                    "beatError": firstBeatError.text ?? "", "nodeEvents": nodeEvents.value,
                    "deviceEvents": deviceEvents.value,
                ]
                let data = try JSONSerialization.data(withJSONObject: obj)
                print("report " + String(decoding: data, as: UTF8.self))
            case "quit":
                beater.cancel()
                for t in tasks { t.cancel() }
                return
            default:
                break
            }
            fflush(nil)
        }
        beater.cancel()
        for t in tasks { t.cancel() }
    }
}

// MARK: drive

struct Drive: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Start replicas and simulators, measure.")

    @Option(help: "mesh-control binary.") var control: String
    @Option(help: "This binary (for the simulators).") var sim: String
    @Option(help: "etcd client URL.") var etcd: String
    @Option(help: "Working folder (replica data directories, logs).") var work: String
    @Option var replicas = 1
    @Option(help: "Simulated agents (at most 15000).") var nodes = 10_000
    @Option(help: "Simulator processes.") var processes = 3
    @Option(help: "Seconds between one agent's beats.") var interval = 20.0
    @Option(help: "Seconds of beats only, measured for CPU.") var window = 40.0
    @Option(help: "Service changes whose delay to every agent is measured.") var changes = 5
    @Option(help: "Write the figures as JSON to this file.") var json: String?
    @Option(help: "mesh-control's leanConnectionBuffers (false: the malloc heap, the baseline).") var lean = true
    @Option(help: "mesh-control's httpRecords (false: TLS records throughout, the baseline).") var records = true
    @Option(help: "Simulated agents follow Nodes too (the behaviour before endpoints carried sites).")
    var followNodes = false
    @Option(
        help:
            "Agents beat on their watch's connection, as the agent does (false: a second connection's beats, shared per simulator: the baseline)."
    )
    var beatsOnWatch = true
    @Option(help: "Twin reports posted (one device per agent), their CPU and deliveries measured; 0: none.")
    var reports = 0
    @Option(help: "Twin reports per second.") var reportRate = 50.0
    @Option(help: "Agents watch their own devices only (?node=); false: every device (the baseline).")
    var ownDevices = true

    final class Child: @unchecked Sendable {
        // Set once in init; Process and the pipe handles are used from one task at a time.
        let process = Process()
        let input = Pipe()
        let output = Pipe()
        private let lines = Mutex<[String]>([])
        private let partial = Mutex<String>("")

        /// `log`: its output and errors go there; else its output is read as commands' answers, and its errors go
        /// to `errors` (a simulator's crash is kept with the run's folder).
        init(_ path: String, _ args: [String], log: String?, errors: String? = nil) throws {
            self.process.executableURL = URL(fileURLWithPath: path)
            self.process.arguments = args
            self.process.standardInput = self.input
            /// A new empty file to write to.
            func file(_ path: String) -> FileHandle? {
                _ = FileManager.default.createFile(atPath: path, contents: nil)
                return FileHandle(forWritingAtPath: path)
            }
            if let log {
                let handle = file(log)
                self.process.standardOutput = handle
                self.process.standardError = handle
            } else {
                self.process.standardOutput = self.output
                self.process.standardError = errors.flatMap(file) ?? FileHandle.nullDevice
                self.output.fileHandleForReading.readabilityHandler = { [weak self] h in
                    guard let self else { return }
                    let text = String(decoding: h.availableData, as: UTF8.self)
                    let complete = self.partial.withLock { p -> [String] in
                        p += text
                        var parts = p.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
                        p = parts.removeLast()
                        return parts
                    }
                    self.lines.withLock { $0 += complete }
                }
            }
            try self.process.run()
        }

        func send(_ line: String) { self.input.fileHandleForWriting.write(Data((line + "\n").utf8)) }

        /// Waits for a line starting with `prefix` (bounded).
        func expect(_ prefix: String, timeout: Duration) async throws -> String {
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                if let l = self.lines.withLock({ ls -> String? in
                    guard let i = ls.firstIndex(where: { $0.hasPrefix(prefix) }) else { return nil }
                    return ls.remove(at: i)
                }) {
                    return l
                }
                if !self.process.isRunning { throw ValidationError("a simulator exited") }
                try await Task.sleep(for: .milliseconds(50))
            }
            throw ValidationError("no \(prefix) within \(timeout)")
        }
    }

    func run() async throws {
        guard (1...15_000).contains(self.nodes), (1...5).contains(self.replicas), (1...8).contains(self.processes)
        else {
            throw ValidationError("nodes 1-15000, replicas 1-5, processes 1-8")
        }
        let ports = try freeLoopbackPorts(self.replicas)
        let urls = ports.map { "https://127.0.0.1:\($0)" }
        let config = self.work + "/control.yaml"
        try """
        maxConnections: 16000
        nodeGracePeriodSeconds: 600
        nodeStartupGracePeriodSeconds: 600
        bookmarkIntervalSeconds: 3600
        idleTimeoutSeconds: 3600
        store: etcd
        etcdEndpoints: [\(self.etcd)]
        logLevel: warning
        leanConnectionBuffers: \(self.lean)
        httpRecords: \(self.records)

        """.write(toFile: config, atomically: true, encoding: .utf8)
        func startReplica(_ r: Int) throws -> Child {
            try Child(
                self.control,
                [
                    "--config", config, "--listen", "127.0.0.1:\(ports[r])", "--data-dir", self.work + "/r\(r)",
                    "--replica-name", "r\(r)",
                ],
                log: self.work + "/r\(r).log"
            )
        }
        var replicas: [Child] = []
        for r in 0..<self.replicas {
            replicas.append(try startReplica(r))
            try await self.waitReady(r, urls[r], replicas[r])
        }
        let pki = self.work + "/r0/pki"
        let (admin, _) = try adminClient(pki, urls)
        let rssBase = replicas.map { ProcessStats.rss($0.process.processIdentifier) }
        _ = try? await admin.create(
            MeshService(
                metadata: ObjectMeta(name: "probe", namespace: "default"),
                spec: ServiceSpec(ports: [ServicePort(port: 80)])
            )
        )

        // One device per agent when reports are measured, written before the agents list.
        if self.reports > 0 { try await self.createDevices(pki, urls) }

        // The simulators.
        let setupStart = ContinuousClock.now
        var sims: [Child] = []
        let per = (self.nodes + self.processes - 1) / self.processes
        for p in 0..<self.processes {
            let first = p * per
            let count = min(per, self.nodes - first)
            guard count > 0 else { break }
            sims.append(
                try Child(
                    self.sim,
                    [
                        "sim", "--servers", urls.joined(separator: ","), "--pki", pki, "--first", "\(first)",
                        "--count", "\(count)", "--interval", "\(self.interval)", "--follow-nodes",
                        "\(self.followNodes)", "--own-devices", "\(self.ownDevices)", "--beats-on-watch",
                        "\(self.beatsOnWatch)",
                    ],
                    log: nil,
                    errors: "\(self.work)/sim-\(p).log"
                )
            )
        }
        for s in sims { _ = try await s.expect("ready", timeout: .seconds(900)) }
        let setup = ContinuousClock.now - setupStart
        print("set-up: \(self.nodes) agents registered, listed and watching in \(setup)")

        // Idle but beating: memory and CPU, once every node's first beat (its Ready write) is past.
        try await Task.sleep(for: .seconds(self.interval + 3))
        let rssConnected = replicas.map { ProcessStats.rss($0.process.processIdentifier) }
        let cpu0 = Self.cpuSeconds(replicas)
        let simCPU0 = Self.cpuSeconds(sims)
        let beats0 = try await self.beats(sims)
        let w0 = ContinuousClock.now
        try await Task.sleep(for: .seconds(self.window))
        let elapsed = Double((ContinuousClock.now - w0).components.seconds)
        let cpu1 = Self.cpuSeconds(replicas)
        let simCPU1 = Self.cpuSeconds(sims)
        let beats1 = try await self.beats(sims)
        // What a change costs the replicas and the simulators: their CPU over the changes, less what beats
        // took over as long (the beat window's rate).
        let changeCPU0 = Self.cpuSeconds(replicas)
        let changeSimCPU0 = Self.cpuSeconds(sims)
        let changes0 = ContinuousClock.now

        // Changes: one Service update at a time, its delay to every agent.
        var changeRVs: [Int64] = []
        var changeStart: [Int64: Int64] = [:]
        for k in 0..<self.changes {
            var svc = try await admin.get(MeshService.self, namespace: "default", name: "probe")
            svc.metadata.labels = ["change": "\(k)"]
            let t0 = wallNanos()
            let written = try await admin.apply(svc).object
            let rv = Int64(written.metadata.resourceVersion!)!
            changeRVs.append(rv)
            changeStart[rv] = t0
            try await Task.sleep(for: .seconds(3))
        }
        let changeSeconds = (ContinuousClock.now - changes0).seconds
        let changeCPU = Self.cpuSeconds(replicas) - changeCPU0
        let changeSimCPU = Self.cpuSeconds(sims) - changeSimCPU0

        // Twin reports: each a Device write, posted as the node's report (the admin may post for a node).
        var reportCPU = 0.0
        var reportSeconds = 0.0
        var reportsApplied = 0
        var reportPosting = 0.0
        if self.reports > 0 {
            let cpuR0 = Self.cpuSeconds(replicas)
            let r0 = ContinuousClock.now
            reportsApplied = try await self.postReports(pki, urls)
            reportPosting = (ContinuousClock.now - r0).seconds
            try await Task.sleep(for: .seconds(2))  // delivery drains
            reportSeconds = Double((ContinuousClock.now - r0).components.seconds)
            reportCPU = Self.cpuSeconds(replicas) - cpuR0
        }

        // Restart replica 0: SIGKILL, then start again at once.
        let killAt = wallNanos()
        replicas[0].process.terminate()
        kill(replicas[0].process.processIdentifier, SIGKILL)
        replicas[0].process.waitUntilExit()
        replicas[0] = try startReplica(0)
        try await self.waitReady(0, urls[0], replicas[0])
        try await Task.sleep(for: .seconds(self.replicas == 1 ? 15 : 8))

        var delays: [Int64] = []
        var perChangeMax: [Double] = []
        var reconnects: [Int64] = []
        var relisted = 0
        var missing = 0
        var beatsFailed = 0
        var nodeEvents = 0
        var deviceEvents = 0
        var perChange: [Int64: [Int64]] = [:]
        for s in sims {
            s.send("report \(killAt) " + changeRVs.map(String.init).joined(separator: " "))
            let line = try await s.expect("report ", timeout: .seconds(120))
            let obj = try JSONSerialization.jsonObject(with: Data(line.dropFirst(7).utf8)) as! [String: Any]
            for (rv, times) in obj["events"] as! [String: [Int64]] {
                perChange[Int64(rv)!, default: []] += times
            }
            relisted += (obj["lists"] as! [Int]).filter { $0 > 1 }.count
            reconnects += obj["reconnects"] as! [Int64]
            beatsFailed += obj["beatsFailed"] as! Int
            nodeEvents += obj["nodeEvents"] as? Int ?? 0
            deviceEvents += obj["deviceEvents"] as? Int ?? 0
            if let e = obj["beatError"] as? String, !e.isEmpty { print("a simulator's first failed beat: \(e)") }
        }
        for rv in changeRVs {
            let times = perChange[rv] ?? []
            missing += self.nodes - times.count
            let d = times.map { $0 - changeStart[rv]! }
            delays += d
            perChangeMax.append(Double(d.max() ?? 0) / 1e6)
        }
        delays.sort()
        reconnects.sort()
        func pct(_ a: [Int64], _ p: Double) -> Double {
            a.isEmpty ? .nan : Double(a[min(a.count - 1, Int(Double(a.count) * p))]) / 1e6
        }
        for s in sims { s.send("quit") }
        for r in replicas { r.process.terminate() }

        let n = Double(self.nodes)
        let rssDelta = zip(rssConnected, rssBase).map { $0 - $1 }.reduce(0, +)
        let cpu = cpu1 - cpu0
        let figures: [(String, String)] = [
            ("replicas", "\(self.replicas)"), ("agents", "\(self.nodes)"), ("lean connection buffers", "\(self.lean)"),
            ("mesh record layer", "\(self.records)"),
            ("agents follow Nodes", "\(self.followNodes)"),
            ("agents beat on their watch's connection", "\(self.beatsOnWatch)"),
            ("Node changes delivered to agents", "\(nodeEvents)"),
            ("simulator processes", "\(sims.count)"),
            ("agents watch their own devices only", "\(self.ownDevices)"),
            ("twin reports applied", "\(reportsApplied)"),
            ("Device changes delivered to agents", "\(deviceEvents)"),
            (
                "control CPU per twin report (ms, all replicas)",
                String(format: "%.3f", reportsApplied > 0 ? reportCPU / Double(reportsApplied) * 1000 : .nan)
            ),
            (
                "twin reports/s achieved (posting, one after another in 8 lanes)",
                String(format: "%.1f", reportPosting > 0 ? Double(reportsApplied) / reportPosting : .nan)
            ),
            (
                "control CPU while reporting (cores, all replicas)",
                String(format: "%.3f", reportSeconds > 0 ? reportCPU / reportSeconds : .nan)
            ),
            ("set-up (s)", String(format: "%.1f", Double(setup.components.seconds))),
            (
                "control RSS before agents (MiB, all replicas)",
                String(format: "%.1f", Double(rssBase.reduce(0, +)) / 1_048_576)
            ),
            (
                "control RSS agents connected (MiB, all replicas)",
                String(format: "%.1f", Double(rssConnected.reduce(0, +)) / 1_048_576)
            ),
            ("control memory per agent (KiB)", String(format: "%.1f", Double(rssDelta) / n / 1024)),
            ("control RSS per 1,000 agents (MiB)", String(format: "%.1f", Double(rssDelta) / n * 1000 / 1_048_576)),
            ("heartbeats/s sustained", String(format: "%.0f", Double(beats1 - beats0) / elapsed)),
            ("heartbeats failed", "\(beatsFailed)"),
            ("control CPU while beating (cores, all replicas)", String(format: "%.3f", cpu / elapsed)),
            ("control CPU per 1,000 agents (cores)", String(format: "%.4f", cpu / elapsed / n * 1000)),
            (
                "control CPU per change (ms, beats taken out)",
                String(
                    format: "%.0f",
                    (changeCPU - cpu / elapsed * changeSeconds) / Double(max(1, self.changes)) * 1000
                )
            ),
            (
                "simulators' CPU per change (ms, beats out)",
                String(
                    format: "%.0f",
                    (changeSimCPU - (simCPU1 - simCPU0) / elapsed * changeSeconds) / Double(max(1, self.changes))
                        * 1000
                )
            ),
            ("change delay to all p50 (ms)", String(format: "%.1f", pct(delays, 0.50))),
            ("change delay to all p99 (ms)", String(format: "%.1f", pct(delays, 0.99))),
            (
                "change delay to the last agent, per change (ms)",
                perChangeMax.map { String(format: "%.0f", $0) }.joined(separator: " ")
            ),
            ("change events missed", "\(missing)"),
            ("agents that relisted", "\(relisted)"),
            ("agents resumed after restart of replica 0", "\(reconnects.count)"),
            ("resume after restart p50 (ms)", String(format: "%.0f", pct(reconnects, 0.50))),
            ("resume after restart p99 (ms)", String(format: "%.0f", pct(reconnects, 0.99))),
            (
                "resume after restart, all (ms)",
                String(format: "%.0f", reconnects.last.map { Double($0) / 1e6 } ?? .nan)
            ),
        ]
        for (k, v) in figures { print(k.padding(toLength: 50, withPad: " ", startingAt: 0) + v) }
        if let path = self.json {
            let obj = Dictionary(uniqueKeysWithValues: figures)
            try JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]).write(
                to: URL(fileURLWithPath: path)
            )
        }
    }

    static let deviceNamespace = "default"

    func deviceName(_ i: Int) -> String { String(format: "dev-%05d", i) }
    func nodeName(_ i: Int) -> String { String(format: "sim-%05d", i) }

    /// A model and one device per agent (32 writes at a time).
    func createDevices(_ pki: String, _ urls: [String]) async throws {
        let (admin, _) = try adminClient(pki, urls)
        _ = try? await admin.create(
            DeviceModel(
                metadata: ObjectMeta(name: "thermometer", namespace: Self.deviceNamespace),
                spec: DeviceModelSpec(properties: [
                    DeviceProperty(name: "temperature", type: .float, accessMode: .readOnly)
                ])
            )
        )
        let clients = (0..<32).map { _ in admin.keepingAlive() }
        defer { for c in clients { c.session?.close() } }
        try await inLanes(clients, self.nodes) { c, i in
            try await c.apply(
                Device(
                    metadata: ObjectMeta(name: self.deviceName(i), namespace: Self.deviceNamespace),
                    spec: DeviceSpec(model: "thermometer", node: self.nodeName(i))
                )
            )
        }
    }

    /// Posts `reports` twin reports at `reportRate` a second, each to the next agent's device; returns how many
    /// were applied.
    func postReports(_ pki: String, _ urls: [String]) async throws -> Int {
        let (admin, _) = try adminClient(pki, urls)
        let clients = (0..<8).map { _ in admin.keepingAlive() }
        defer { for c in clients { c.session?.close() } }
        let applied = Counter()
        let start = ContinuousClock.now
        let gap = 1.0 / self.reportRate
        try await inLanes(clients, self.reports) { c, k in
            try await Task.sleep(until: start + .seconds(Double(k) * gap), clock: .continuous)
            let i = k % self.nodes
            let batch = NodeReportBatch(
                epoch: "scale-bench",
                reports: [
                    NodeReport(
                        id: Int64(k / self.nodes + 1),
                        twin: TwinReport(
                            namespace: Self.deviceNamespace,
                            device: self.deviceName(i),
                            property: "temperature",
                            value: String(format: "%.1f", 20 + Double(k % 100) / 10),
                            version: Int64(k / self.nodes + 1),
                            time: nil
                        )
                    )
                ]
            )
            let path =
                ControlClient.path(Node.resource, namespace: nil, name: self.nodeName(i)) + "/reports"
            let answer = try await c.raw(
                .POST,
                path,
                body: ByteBuffer(bytes: try MeshJSON.encode(batch))
            ).body
            if String(buffer: answer).contains("\"applied\"") { applied.add() }
        }
        return applied.value
    }

    /// The CPU seconds of these processes, together.
    static func cpuSeconds(_ children: [Child]) -> Double {
        children.map { ProcessStats.cpuSeconds($0.process.processIdentifier) }.reduce(0, +)
    }

    func beats(_ sims: [Child]) async throws -> Int {
        var total = 0
        for s in sims {
            s.send("stats")
            let line = try await s.expect("stats ", timeout: .seconds(30))
            total += Int(line.split(separator: " ")[1]) ?? 0
        }
        return total
    }

    func waitReady(_ r: Int, _ url: String, _ replica: Child) async throws {
        _ = try await replicaReady(
            pki: self.work + "/r\(r)/pki",
            url: url,
            timeout: .seconds(60),
            log: "\(self.work)/r\(r).log",
            process: replica.process
        )
    }
}

/// A counter tasks share.
final class Counter: Sendable {
    private let count = Atomic<Int>(0)
    func add() { self.count.add(1, ordering: .relaxed) }
    var value: Int { self.count.load(ordering: .relaxed) }
}
