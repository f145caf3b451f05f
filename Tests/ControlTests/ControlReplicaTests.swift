import Control
import Foundation
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import Synchronization
import Testing

/// Several `mesh-control` replicas over one real etcd: shared liveness, unique VIPs under racing
/// writers, and watchers that fail over to another replica without relisting.
@Suite(.serialized, .awaitedTeardown, .rationed) struct ControlReplicaTests {
    static func replicas(
        _ n: Int,
        etcd: EtcdCluster,
        clock: any MeshClock = .system,
        configure: (inout ControlConfig) -> Void = { _ in }
    )
        async throws -> [RunningControl]
    {
        var out: [RunningControl] = []
        for i in 0..<n {
            let cp = try await RunningControl(clock: clock) { c in
                c.store = "etcd"
                c.etcdEndpoints = etcd.endpoints
                c.etcdPrefix = "/replicas/"
                c.replicaName = "r\(i)"
                configure(&c)
            }
            // Stopped on every path: a replica left running by a failed test kept retrying its gone etcd
            // and logging it for the rest of the run.
            onTeardown { try? await cp.stop() }
            out.append(cp)
        }
        return out
    }

    func node(_ name: String) -> Node {
        Node(metadata: ObjectMeta(name: name), spec: NodeSpec(site: "a"))
    }

    @Test func replicasShareOneCAAndVIPsStayUniqueUnderRacingWriters() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let cps = try await Self.replicas(3, etcd: etcd)
        #expect(Set(cps.map(\.pki.caPEM)).count == 1)
        // 3 replicas × 20 services at once, each replica proposing from its own cursor.
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (r, cp) in cps.enumerated() {
                for i in 0..<20 {
                    group.addTask { _ = try await cp.client.create(service("s\(r)-\(i)")) }
                }
            }
            try await group.waitForAll()
        }
        for cp in cps {
            let items = try await cp.client.list(MeshService.self).items
            #expect(items.count == 60)
            let vips = items.compactMap(\.spec.clusterIP)
            #expect(vips.count == 60)
            #expect(Set(vips).count == 60, "every VIP once")
        }
        for cp in cps { try await cp.stop() }
    }

    /// On one `ManualClock` shared by the replicas: the grace periods, check and share intervals pass
    /// when the test advances it, and the test waits on what the replicas show, never on time.
    @Test func anyReplicaTakesABeatAndAllAgreeOnReadyAndNotReady() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let clock = ManualClock()
        let cps = try await Self.replicas(3, etcd: etcd, clock: clock) { c in
            c.nodeGracePeriodSeconds = 3
            c.nodeStartupGracePeriodSeconds = 0
        }
        // Each replica's lifecycle loop and beat-sharing loop sleep on the clock.
        #expect(await clock.waitForSleepers(6), "the replicas' lifecycle loops never started")
        let created = try await cps[0].client.create(self.node("edge-a"))
        #expect(created.status?.phase == .unknown)
        let watch = NodeWatch(cps[2].client, after: Int64(created.metadata.resourceVersion!)!)
        // A beat on replica 1: Ready, seen by every replica.
        try await cps[1].client.heartbeat(node: "edge-a")
        for cp in cps {
            #expect(
                try await eventually { try await cp.client.get(Node.self, name: "edge-a").status?.phase == .ready }
            )
        }
        // Beats only on replica 2, one a second for three graces (9 s of the clock, the replicas
        // looking every 750 ms and sharing every second): replicas 0 and 1 hear of each beat through
        // etcd (waited for before the clock moves on) and none marks the node NotReady.
        for _ in 0..<9 {
            let beatAt = clock.epochSeconds
            try await cps[2].client.heartbeat(node: "edge-a")
            await clock.advance(by: .seconds(1), in: .milliseconds(250))
            for cp in cps[0...1] {
                #expect(
                    try await eventually {
                        let seen = try await cp.client.get(Node.self, name: "edge-a").status?.lastHeartbeatTime
                        return (seen.flatMap(Timestamp.parse) ?? 0) >= beatAt
                    },
                    "replica 2's beat did not reach \(cp.url)"
                )
            }
        }
        for cp in cps { #expect(try await cp.client.get(Node.self, name: "edge-a").status?.phase == .ready) }
        // Silence past the grace: NotReady everywhere, written once (one MODIFIED event), though all
        // three saw it.
        await clock.advance(by: .seconds(4), in: .milliseconds(250))
        for cp in cps {
            #expect(
                try await eventually {
                    try await cp.client.get(Node.self, name: "edge-a").status?.phase == .notReady
                }
            )
        }
        // More passes of every replica's loop (each advance returns once they have run), then a
        // marker object: the watch delivers in etcd's order, so a second NotReady write from any
        // replica would be seen before the marker.
        await clock.advance(by: .seconds(2), in: .milliseconds(250))
        try await cps[0].client.create(self.node("marker"))
        #expect(await eventually { watch.changes.contains { $0.name == "marker" } })
        #expect(watch.changes.filter { $0.name == "edge-a" }.map(\.phase) == [.ready, .notReady])
        watch.stop()
        for cp in cps { try await cp.stop() }
    }

    @Test func aReplicaStoppedUnder1000WatchersTheyAllResumeOnAnotherWithoutRelisting() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let cps = try await Self.replicas(2, etcd: etcd)
        let (a, b) = (cps[0], cps[1])
        try await b.client.create(service("before"))
        let watchers = 1000
        let log = WatcherLog(watchers)
        var logger = Logger(label: "watchers")
        logger.logLevel = .error
        let tls = try HTTPClientTLS(mesh: MeshTLS.client(a.pki.admin.load(), expect: .controlPlane))
        let client = ControlClient(endpoints: [a.endpoint, b.endpoint], tls: tls)
        var tasks: [Task<Void, Never>] = []
        for w in 0..<watchers {
            // As an agent watches: several kinds over one stream (MultiReflector).
            var reflector = MultiReflector(
                client: client,
                kinds: [
                    .of(MeshService.self, from: nil) { update in log.record(w, update) },
                    .of(Endpoints.self, from: nil) { _ in },
                ],
                logger: logger
            )
            reflector.backoff.initial = .milliseconds(50)
            tasks.append(Task { await reflector.run() })
        }
        defer { for t in tasks { t.cancel() } }
        // Every watcher listed once (on replica a) and is watching. The bounds below only end a hung run: 1,000
        // watchers' handshakes and lists took 60-110 s under 2x `yes` with the suite, and once over 120 s.
        #expect(await eventually(timeout: .seconds(300), every: .milliseconds(100)) { log.listed == watchers })
        var expected: [Int64] = []
        for i in 0..<5 {
            expected.append(Int64(try await b.client.create(service("x\(i)")).metadata.resourceVersion!)!)
        }
        #expect(
            await eventually(timeout: .seconds(300), every: .milliseconds(100)) { log.allSaw(expected) },
            "\(log.summary(expected))"
        )
        // Replica a goes away (its watch streams end); changes keep coming through b.
        try await a.stop()
        for i in 5..<10 {
            expected.append(Int64(try await b.client.create(service("x\(i)")).metadata.resourceVersion!)!)
        }
        #expect(
            await eventually(timeout: .seconds(300), every: .milliseconds(100)) { log.allSaw(expected) },
            "\(log.summary(expected))"
        )
        // None missed an event (each saw exactly these, in order) and none listed again.
        #expect(log.exactly(expected))
        #expect(log.listed == watchers)
        #expect(log.maxLists == 1)
        try await b.stop()
    }
}

extension ControlReplicaTests {
    /// An agent's one connection (its watch with its beats behind it) moves whole when its replica goes: the
    /// watch resumes on the other without a list and misses nothing, and the beats follow it there, on the same
    /// connection again.
    @Test func aNodesOneConnectionFailsOverWholeWatchAndBeatsTogether() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let cps = try await Self.replicas(2, etcd: etcd)
        let (a, b) = (cps[0], cps[1])
        try await b.client.create(self.node("edge-f"))
        let tls = try HTTPClientTLS(mesh: MeshTLS.client(a.pki.admin.load(), expect: .controlPlane))
        let client = ControlClient(endpoints: [a.endpoint, b.endpoint], tls: tls).carryingWatches()
        let log = WatcherLog(1)
        var logger = Logger(label: "watcher")
        logger.logLevel = .error
        var reflector = MultiReflector(
            client: client,
            kinds: [
                .of(MeshService.self, from: nil) { update in log.record(0, update) },
                .of(Endpoints.self, from: nil) { _ in },
            ],
            logger: logger
        )
        reflector.backoff.initial = .milliseconds(50)
        let task = Task { await reflector.run() }
        defer { task.cancel() }
        #expect(await eventually { log.listed == 1 })
        // Beats between changes: each ends the watch for a moment; the watch resumes on the same connection.
        var expected: [Int64] = []
        for i in 0..<3 {
            try await client.heartbeat(node: "edge-f")
            expected.append(Int64(try await b.client.create(service("f\(i)")).metadata.resourceVersion!)!)
        }
        #expect(await eventually { log.allSaw(expected) }, "\(log.summary(expected))")
        #expect(await eventually { establishedTCPConnections(toPort: a.port) == 1 })
        try await a.stop()
        for i in 3..<6 {
            expected.append(Int64(try await b.client.create(service("f\(i)")).metadata.resourceVersion!)!)
            // A beat in the moment of the fail-over may fail once; the next goes through.
            #expect(await eventually { (try? await client.heartbeat(node: "edge-f")) != nil })
        }
        #expect(await eventually { log.allSaw(expected) }, "\(log.summary(expected))")
        #expect(log.exactly(expected))
        #expect(log.maxLists == 1)
        // The kept connection moved with the watch: one connection to b carries both.
        #expect(client.session?.endpoint == b.endpoint)
        try await client.heartbeat(node: "edge-f")
        #expect(
            await eventually { establishedTCPConnections(toPort: b.port) == 1 },
            "\(establishedTCPConnections(toPort: b.port)) connections to b"
        )
        task.cancel()
        try await b.stop()
    }
}

/// What each of many reflectors saw: how often it listed, and the versions of the changes.
final class WatcherLog: Sendable {
    struct Entry {
        var lists = 0
        var changes: [Int64] = []
    }
    private let state: Mutex<[Entry]>

    init(_ n: Int) { self.state = Mutex(Array(repeating: Entry(), count: n)) }

    func record(_ w: Int, _ update: ReflectorUpdate<MeshService>) {
        self.state.withLock { s in
            switch update {
            case .replaced: s[w].lists += 1
            case .changed(.added(let o)), .changed(.modified(let o)), .changed(.deleted(let o)):
                if let v = o.metadata.version { s[w].changes.append(v) }
            case .changed: break
            }
        }
    }

    var listed: Int { self.state.withLock { $0.filter { $0.lists > 0 }.count } }
    var maxLists: Int { self.state.withLock { $0.map(\.lists).max() ?? 0 } }
    func allSaw(_ rvs: [Int64]) -> Bool {
        self.state.withLock { s in s.allSatisfy { $0.changes.count >= rvs.count } }
    }
    func exactly(_ rvs: [Int64]) -> Bool { self.state.withLock { s in s.allSatisfy { $0.changes == rvs } } }
    func summary(_ rvs: [Int64]) -> String {
        self.state.withLock { s in
            let behind = s.filter { $0.changes.count < rvs.count }.count
            return "\(behind) of \(s.count) watchers behind; first: \(s.first.map { "\($0.changes)" } ?? "-")"
        }
    }
}
