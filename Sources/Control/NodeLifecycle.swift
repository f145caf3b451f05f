import Logging
import MeshCore
import Metrics
import NIOCore
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Node liveness, kept cheap at scale (README "Node heartbeats and liveness").
///
/// A heartbeat only touches memory: the node's last beat (monotonic and wall clock). The Node
/// object is written, and so a MODIFIED event reaches watchers, only when its phase changes:
/// Ready on the first beat after NotReady/Unknown, NotReady once no beat came for the grace
/// period. Beat times reach the store in batches (`heartbeats` side table, no version, no event)
/// every `flushInterval` and at shutdown, so "since when" survives a restart. After a start, every
/// known node gets `startupGracePeriod` before it can be marked NotReady: agents need a moment
/// to find the control plane again, and it must not flip the whole fleet at once.
public final class NodeLifecycle: Sendable {
    public struct Configuration: Sendable {
        /// No heartbeat for this long: NotReady.
        public var gracePeriod: Duration = .seconds(60)
        /// After the control plane starts, how long nodes it already knows have to send a beat.
        public var startupGracePeriod: Duration = .seconds(60)
        /// How often beat times are saved to the store.
        public var flushInterval: Duration = .seconds(60)
        /// With replicas (an etcd store): how often the beats taken here are shared with the others.
        public var shareInterval: Duration = .seconds(1)

        public init() {}

        /// How often the loop looks for silent nodes: a quarter of the grace, between 50 ms and 5 s.
        var checkInterval: Duration {
            min(.seconds(5), max(.milliseconds(50), self.gracePeriod / 4))
        }
    }

    struct Entry {
        var phase: NodeStatus.Phase?
        /// The instant the grace is counted from (last beat, creation, or this process's start).
        var watchFrom: ContinuousClock.Instant
        var allowance: Duration
        /// The last beat this process took (ms since the epoch), or the one saved before a restart.
        var lastBeatMillis: Int64?
        var dirty = false
        /// A status write for this node is in flight: beats and the loop leave it alone.
        var writing = false
        /// The relay last written to its status by a beat (`relayKnown`: since this process knows).
        var relay: String?
        var relayKnown = false
        /// The candidates last written by a beat (known when `relayKnown` is).
        var candidates: NodeCandidates?
        /// The links last written by a beat (known when `relayKnown` is).
        var links: [NodeLink]?
    }

    struct State {
        var nodes: [String: Entry] = [:]
        var forgotten: Set<String> = []
        /// Beats taken here since they were last shared with the other replicas (shared stores only).
        var toShare: [String: Int64] = [:]
        /// The version `load()` listed the nodes at (phases are followed from there when shared).
        var listedAt: Int64 = 0
    }

    public let configuration: Configuration
    let store: any Store
    let logger: Logger
    let startedAt: ContinuousClock.Instant
    let startedAtMillis: Int64
    let state = Mutex(State())
    /// The store is shared by replicas (etcd): beats are shared, node phases followed (NodeLifecycleSharing).
    let shared: EtcdStore?
    /// What grace periods are counted on and the loops sleep on (tests advance one by hand).
    let clock: any MeshClock
    /// Beats taken (`mesh_control_node_heartbeats_total`), made once rather than per beat.
    let beats = Counter(label: "mesh_control_node_heartbeats_total")

    public init(store: any Store, configuration: Configuration, logger: Logger, clock: any MeshClock = .system) {
        self.store = store
        self.configuration = configuration
        self.logger = logger
        self.clock = clock
        self.startedAt = clock.now
        self.startedAtMillis = clock.epochMillis
        self.shared = store as? EtcdStore
    }

    func nowMillis() -> Int64 { self.clock.epochMillis }

    static func format(_ millis: Int64) -> String { Timestamp.format(secondsSinceEpoch: Int(millis / 1000)) }

    static func seconds(_ d: Duration) -> Double {
        let (s, atto) = d.components
        return Double(s) + Double(atto) / 1e18
    }

    static func describe(_ d: Duration) -> String {
        let s = Self.seconds(d)
        return s == s.rounded() ? "\(Int(s))s" : "\(s)s"
    }

    /// Loads every node's phase and its last saved beat. Call once, before serving.
    public func load() async throws {
        let (items, listedAt) = try await self.store.list(resource: Node.resource.plural, namespace: "")
        let saved = try await self.store.loadHeartbeats()
        var nodes: [String: Entry] = [:]
        for item in items {
            let node = try? item.decode(Node.self)
            nodes[item.key.name] = Entry(
                phase: node?.status?.phase,
                watchFrom: self.startedAt,
                allowance: self.configuration.startupGracePeriod,
                lastBeatMillis: saved[item.key.name]
                    ?? node?.status?.lastHeartbeatTime.flatMap(Timestamp.parse).map { Int64($0) * 1000 }
            )
        }
        let forgotten = Set(saved.keys).subtracting(nodes.keys)
        self.state.withLock {
            $0.nodes = nodes
            $0.forgotten = forgotten
            $0.listedAt = listedAt
        }
        let ready = nodes.values.filter { $0.phase == .ready }.count
        self.logger.info(
            "node lifecycle: \(nodes.count) nodes (\(ready) Ready); grace \(Self.describe(self.configuration.gracePeriod)), \(Self.describe(self.configuration.startupGracePeriod)) after this start"
        )
    }

    // MARK: what the API tells it

    /// The last beat of `name` this control plane knows (ms since the epoch).
    func lastBeat(_ name: String) -> Int64? {
        self.state.withLock { $0.nodes[name]?.lastBeatMillis }
    }

    /// A beat that needs no write: a known node, Ready or being written Ready. Recorded and answered at once
    /// (`ControlAPI.respondAtOnce`, on a connection's event loop). Nil: nothing is recorded, and `beat` takes it.
    func beatAtOnce(_ name: String) -> NodeHeartbeat? {
        let millis = self.nowMillis()
        let (known, transition) = self.record(name, now: self.clock.now, millis: millis, steadyOnly: true)
        guard known, !transition else { return nil }
        self.beats.increment()
        return self.answer(name, millis)
    }

    /// The answer to a beat taken at `millis`.
    private func answer(_ name: String, _ millis: Int64) -> NodeHeartbeat {
        NodeHeartbeat(
            nodeName: name,
            time: Self.format(millis),
            phase: .ready,
            gracePeriodSeconds: Self.seconds(self.configuration.gracePeriod)
        )
    }

    /// Records a beat in memory: whether the node is known, and whether it must be written Ready (it is then
    /// marked as being written).
    /// `steadyOnly`: a beat that would be a transition is left unrecorded (reported as known and transition).
    func record(
        _ name: String,
        now: ContinuousClock.Instant,
        millis: Int64,
        steadyOnly: Bool = false
    ) -> (known: Bool, transition: Bool) {
        self.state.withLock { s in
            guard var e = s.nodes[name] else { return (false, false) }
            if steadyOnly, e.phase != .ready, !e.writing { return (true, true) }
            e.watchFrom = now
            e.allowance = self.configuration.gracePeriod
            e.lastBeatMillis = millis
            e.dirty = true
            if self.shared != nil { s.toShare[name] = millis }
            let transition = e.phase != .ready && !e.writing
            if transition { e.writing = true }
            s.nodes[name] = e
            return (true, transition)
        }
    }

    /// A Node was created or replaced through the API with this phase (a node registering itself
    /// counts as a beat: `beat` is true).
    func observed(_ name: String, phase: NodeStatus.Phase?, beat: Bool) {
        let now = self.clock.now
        self.state.withLock { s in
            s.forgotten.remove(name)
            var e =
                s.nodes[name]
                ?? Entry(phase: nil, watchFrom: now, allowance: self.configuration.gracePeriod)
            e.phase = phase
            e.relayKnown = false  // the Node was rewritten: compare the next report with the store
            if beat {
                e.watchFrom = now
                e.allowance = self.configuration.gracePeriod
                e.lastBeatMillis = self.nowMillis()
                e.dirty = true
                if self.shared != nil { s.toShare[name] = e.lastBeatMillis }
            }
            s.nodes[name] = e
        }
    }

    /// A Node was deleted.
    func deleted(_ name: String) {
        self.state.withLock { s in
            s.nodes[name] = nil
            s.forgotten.insert(name)
        }
    }

    /// Whether a node of that name is known (in memory, else in the store).
    private func ensureKnown(_ name: String) async throws -> Bool {
        if self.state.withLock({ $0.nodes[name] != nil }) { return true }
        let key = ObjectKey(resource: Node.resource.plural, namespace: "", name: name)
        guard let stored = try await self.store.get(key) else { return false }
        let node = try? stored.decode(Node.self)
        let now = self.clock.now
        self.state.withLock { s in
            if s.nodes[name] == nil {
                s.nodes[name] = Entry(
                    phase: node?.status?.phase,
                    watchFrom: now,
                    allowance: self.configuration.gracePeriod
                )
            }
        }
        return true
    }

    /// Takes a heartbeat of `name`: memory only, unless the node was not Ready or its `report` changes
    /// the status (its relay): then one status write. Throws a 404 `Status` for a node that is not
    /// registered.
    public func beat(_ name: String, report: NodeHeartbeatReport? = nil) async throws -> NodeHeartbeat {
        let now = self.clock.now
        let millis = self.nowMillis()
        var (known, transition) = self.record(name, now: now, millis: millis)
        if !known {
            guard try await self.ensureKnown(name) else {
                throw Status(
                    code: 404,
                    reason: .notFound,
                    message: "node \"\(name)\" is not registered: PUT /apis/mesh.edge/v1/nodes/\(name) first",
                    details: .init(name: name, kind: Node.resource.plural)
                )
            }
            (known, transition) = self.record(name, now: now, millis: millis)
        }
        self.beats.increment()
        if transition {
            let time = Self.format(millis)
            do {
                let written = try await self.writeStatus(name) { old in
                    var s = old ?? NodeStatus()
                    s.phase = .ready
                    s.lastHeartbeatTime = time
                    s.message = "heartbeating since \(time)"
                    s.relay = report.map { $0.relay } ?? old?.relay
                    s.candidates = report?.candidates ?? old?.candidates
                    s.links = report?.links ?? old?.links
                    return s
                }
                self.finishWrite(name, phase: written == nil ? nil : .ready, gone: written == nil)
                if let written {
                    self.logger.info("node \(name) is Ready")
                    if report != nil { self.reportWritten(name, written.status) }
                }
            } catch {
                self.finishWrite(name, phase: nil, gone: false)
                throw error
            }
        } else if let report, let relayMoved = self.reportChanges(name, report) {
            let written = try await self.writeStatus(name) { old in
                guard var status = old else { return old }
                status.relay = report.relay
                if let c = report.candidates { status.candidates = c }
                if let l = report.links { status.links = l }
                return status
            }
            if let written {
                self.reportWritten(name, written.status)
                if relayMoved { self.logger.info("node \(name) is homed on relay \(report.relay ?? "(none)")") }
            }
        }
        return self.answer(name, millis)
    }

    /// Whether `report` changes what this process last wrote for `name` (or it does not know): its relay,
    /// and its candidates or links when it has them. Nil: nothing to write; otherwise whether the relay moved.
    private func reportChanges(_ name: String, _ report: NodeHeartbeatReport) -> Bool? {
        self.state.withLock { s in
            guard let e = s.nodes[name] else { return nil }
            let relayMoved = !e.relayKnown || e.relay != report.relay
            let changed =
                relayMoved || (report.candidates != nil && e.candidates != report.candidates)
                || (report.links != nil && e.links != report.links)
            return changed ? relayMoved : nil
        }
    }

    /// What a beat's write left in `name`'s status, to compare the next reports with.
    private func reportWritten(_ name: String, _ status: NodeStatus?) {
        self.state.withLock { s in
            s.nodes[name]?.relay = status?.relay
            s.nodes[name]?.candidates = status?.candidates
            s.nodes[name]?.links = status?.links
            s.nodes[name]?.relayKnown = true
        }
    }

    private func finishWrite(_ name: String, phase: NodeStatus.Phase?, gone: Bool) {
        self.state.withLock { s in
            if gone {
                s.nodes[name] = nil
                return
            }
            guard var e = s.nodes[name] else { return }
            e.writing = false
            if let p = phase { e.phase = p }
            s.nodes[name] = e
        }
    }

    /// Rewrites the stored Node's status (conditional on its version, retried on conflict). Returns
    /// the node as written (unchanged when `change` changes nothing), nil when it no longer exists.
    func writeStatus(_ name: String, _ change: @Sendable (NodeStatus?) -> NodeStatus?) async throws -> Node? {
        try await Self.writeStatus(name, in: self.store, change)
    }

    /// `writeStatus` on any store (`NodeReports` writes a node's workload instances with it).
    static func writeStatus(
        _ name: String,
        in store: any Store,
        _ change: @Sendable (NodeStatus?) -> NodeStatus?
    ) async throws -> Node? {
        let key = ObjectKey(resource: Node.resource.plural, namespace: "", name: name)
        for _ in 0..<16 {
            guard let stored = try await store.get(key) else { return nil }
            let node = try stored.decode(Node.self)
            let status = change(node.status)
            if status == node.status { return node }
            var updated = node
            updated.status = status
            let final = updated
            do {
                let written = try await store.commit(
                    Write(
                        key: key,
                        expect: .version(stored.resourceVersion),
                        operation: .put { rv in
                            var o = final
                            o.metadata.resourceVersion = String(rv)
                            return (ControlAPI.encode(o), o.metadata.labels ?? [:])
                        }
                    )
                )
                var out = final
                out.metadata.resourceVersion = String(written.resourceVersion)
                return out
            } catch StoreError.conflict {
                continue
            }
        }
        throw Status.conflict("node \(name) is changing too fast to update its status; retry")
    }

    // MARK: the loop

    /// Marks silent nodes NotReady and saves beat times, until cancelled; then saves them once more.
    public func run() async {
        let sharing = self.shared.map { store in Task { await self.share(store) } }
        defer { sharing?.cancel() }
        var lastFlush = self.clock.now
        while !Task.isCancelled {
            try? await self.clock.sleep(for: self.configuration.checkInterval)
            if Task.isCancelled { break }
            await self.markSilentNodes()
            if self.clock.now - lastFlush >= self.configuration.flushInterval {
                lastFlush = self.clock.now
                await self.flush()
            }
        }
        // The last save runs outside this (cancelled) task so that the store takes it.
        await Task { await self.flush() }.value
    }

    /// One pass: every node past its grace that is not NotReady yet is written NotReady.
    func markSilentNodes() async {
        let now = self.clock.now
        let expired = self.state.withLock { s -> [(String, Int64?)] in
            var out: [(String, Int64?)] = []
            for (name, var e) in s.nodes where e.phase != .notReady && !e.writing && now - e.watchFrom > e.allowance {
                e.writing = true
                s.nodes[name] = e
                out.append((name, e.lastBeatMillis))
            }
            var counts: [NodeStatus.Phase: Int] = [:]
            for e in s.nodes.values { counts[e.phase ?? .unknown, default: 0] += 1 }
            for phase in [NodeStatus.Phase.ready, .notReady, .unknown] {
                Gauge(label: "mesh_control_nodes", dimensions: [("phase", phase.rawValue)]).record(counts[phase] ?? 0)
            }
            return out
        }
        for (name, last) in expired {
            let grace = Self.describe(self.configuration.gracePeriod)
            let message =
                last.map { "no heartbeat since \(Self.format($0)) (grace period \(grace))" }
                ?? "no heartbeat received yet (grace period \(grace))"
            let lastTime = last.map(Self.format)
            do {
                let written = try await self.writeStatus(name) { old in
                    // A beat that came in meanwhile wins: nothing to write.
                    if self.state.withLock({ s in s.nodes[name].map { $0.watchFrom > now } ?? false }) { return old }
                    // Its candidates and links are stale once it is silent; its workloads' last reports stay.
                    var s = old ?? NodeStatus()
                    s.phase = .notReady
                    s.lastHeartbeatTime = lastTime ?? old?.lastHeartbeatTime
                    s.message = message
                    s.candidates = nil
                    s.links = nil
                    return s
                }
                let marked = written?.status?.phase == .notReady
                self.finishWrite(name, phase: marked ? .notReady : nil, gone: written == nil)
                if marked { self.logger.notice("node \(name) is NotReady: \(message)") }
            } catch {
                self.finishWrite(name, phase: nil, gone: false)
                self.logger.warning("node \(name): could not mark it NotReady: \(error)")
            }
        }
    }

    /// Saves the beat times taken since the last flush, in one batch.
    public func flush() async {
        let (beats, forget) = self.state.withLock { s -> ([String: Int64], [String]) in
            var out: [String: Int64] = [:]
            for (name, var e) in s.nodes where e.dirty {
                e.dirty = false
                s.nodes[name] = e
                if let m = e.lastBeatMillis { out[name] = m }
            }
            defer { s.forgotten.removeAll() }
            return (out, Array(s.forgotten))
        }
        do {
            try await self.store.saveHeartbeats(beats, forget: forget)
        } catch {
            // Only "since when" after a restart depends on it; the next flush tries again.
            self.state.withLock { s in
                for name in beats.keys { s.nodes[name]?.dirty = true }
                s.forgotten.formUnion(forget)
            }
            self.logger.warning("could not save \(beats.count) heartbeat times: \(error)")
        }
    }
}
