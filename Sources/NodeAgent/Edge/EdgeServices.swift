import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshSQLite
import NIOCore
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What the node agent's edge part does and where it keeps things.
public struct EdgeConfiguration: Sendable {
    public var nodeName: String
    /// `<dataDir>/edge.db` and `<dataDir>/workloads/*.log`.
    public var dataDir: String
    /// The MQTT broker the mappers use, `host:port` (nil: no mapper API).
    public var mqttBroker: String?
    /// Start mosquitto on `mqttBroker` (a loopback address) as a child of the agent.
    public var mqttStartBroker = false
    public var mosquittoPath = "mosquitto"
    /// How hard each commit of `edge.db` tries to reach the disk (full: a report acknowledged to the
    /// mapper survives power loss; normal: it survives a crash of the process).
    public var durability: Durability = .full
    /// SQLite's page cache for `edge.db`, KiB (nil: SQLite's default, 2000).
    public var storeCacheKiB: Int?
    /// Messages per outbox request.
    public var outboxBatch = 500
    public var initialBackoff: Duration = .milliseconds(200)
    public var maxBackoff: Duration = .seconds(10)
    public var supervisor: WorkloadSupervisorConfiguration
    /// Follow the edge's kinds here, over one watch. False: the caller follows `reflectedKinds()` in its own
    /// `MultiReflector` (the mesh agent's one watch for the service table and the edge).
    public var followsControlPlane = true

    public init(nodeName: String, dataDir: String) {
        self.nodeName = nodeName
        self.dataDir = dataDir
        self.supervisor = WorkloadSupervisorConfiguration(nodeName: nodeName, logDirectory: dataDir + "/workloads")
    }
}

/// The node agent's edge part, one `Service`: the workloads assigned to this node (supervised, started
/// from the store at once, so offline too), its devices' twins (desired values down over the watch,
/// reported values up through the durable outbox) and KubeEdge's mapper API over MQTT.
public final class EdgeServices: ServiceLifecycle.Service, Sendable {
    public let configuration: EdgeConfiguration
    public let store: EdgeStore
    public let supervisor: WorkloadSupervisor
    let client: ControlClient
    let logger: Logger
    public let mqtt: MQTTClient?
    private let wake: AsyncStream<Void>.Continuation
    private let wakeups: AsyncStream<Void>
    private let tally = Mutex(Counters())

    public struct Counters: Sendable, Equatable {
        /// Outbox messages the control plane answered (applied, duplicate or rejected).
        public var sent = 0
        public var rejectedByControl = 0
        /// Mapper updates refused here (malformed, unknown device, out of range).
        public var refused = 0
        public var accepted = 0
        public var deltas = 0
        public var lastError: String?
    }

    public init(configuration: EdgeConfiguration, client: ControlClient, logger: Logger) throws {
        self.configuration = configuration
        try StatePaths.ensureDirectory(configuration.dataDir)
        try StatePaths.ensureDirectory(configuration.supervisor.logDirectory)
        let store = try EdgeStore(
            path: configuration.dataDir + "/edge.db",
            durability: configuration.durability,
            cacheKiB: configuration.storeCacheKiB
        )
        self.store = store
        self.client = client.keepingAlive()
        self.logger = logger
        let (wakeups, wake) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        self.wakeups = wakeups
        self.wake = wake
        self.supervisor = WorkloadSupervisor(configuration: configuration.supervisor, store: store, logger: logger) {
            report in
            do {
                try store.enqueue(report)
                wake.yield()
            } catch {
                logger.error("workload \(report.namespace)/\(report.name): cannot queue its status: \(error)")
            }
        }
        if let broker = configuration.mqttBroker {
            let (host, port) = try Self.hostPort(broker)
            var mc = MQTTClientConfiguration(host: host, port: port, clientID: "mesh-node-\(configuration.nodeName)")
            mc.subscriptions = TwinTopics.subscriptions.map { MQTTSubscription(filter: $0, qos: 1) }
            self.mqtt = MQTTClient(configuration: mc, logger: logger)
        } else {
            self.mqtt = nil
        }
    }

    public var counters: Counters { self.tally.withLock { $0 } }

    static func hostPort(_ text: String) throws -> (String, Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]),
            (1...65535).contains(port)
        else { throw ManifestError("mqttBroker: \"\(text)\" must be host:port") }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }

    public func run() async throws {
        await self.supervisor.stopLeftovers()
        // What this node should run, from its store: started now, before the control plane answers.
        let kept = try self.store.workloads()
        if !kept.isEmpty {
            self.logger.info("edge: starting \(kept.count) workloads from the store")
        }
        await self.supervisor.update(kept)
        let broker = try self.startBroker()
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.supervisor.run() }
            if self.configuration.followsControlPlane {
                var reflector = MultiReflector(client: self.client, kinds: self.reflectedKinds(), logger: self.logger)
                reflector.backoff.maximum = self.configuration.maxBackoff
                group.addTask { await reflector.run() }
            }
            group.addTask { await self.sendOutbox() }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: .seconds(1))
                    self.wake.yield()
                }
            }
            if let mqtt = self.mqtt {
                group.addTask {
                    await mqtt.run(onConnect: { await self.publishAllDeltas() }) { await self.handle($0) }
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
        if let broker {
            broker.signalGroup(SIGTERM)
            while broker.exitStatus() == nil { try? await Task.sleep(for: .milliseconds(20)) }
        }
        self.client.session?.close()
    }

    // MARK: the broker

    /// mosquitto on the configured loopback address, when asked to; nil when not (or not installed).
    func startBroker() throws -> ChildProcess? {
        guard self.configuration.mqttStartBroker, let broker = self.configuration.mqttBroker else { return nil }
        let (host, port) = try Self.hostPort(broker)
        let conf = self.configuration.dataDir + "/mosquitto.conf"
        let text = """
            # Written by the mesh node agent: the mapper API's broker, on loopback only.
            listener \(port) \(host)
            allow_anonymous true
            max_queued_messages 100000
            queue_qos0_messages true
            persistence false

            """
        let fd = open(conf, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        if fd >= 0 {
            _ = text.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
            close(fd)
        }
        do {
            let p = try ChildProcess.spawn(
                command: self.configuration.mosquittoPath,
                args: ["-c", conf],
                environment: ["PATH": ProcessEnvironment.path + ":/usr/sbin:/sbin"],
                logPath: self.configuration.dataDir + "/mosquitto.log"
            )
            self.logger.info("edge: started mosquitto (pid \(p.pid)) on \(broker) for device mappers")
            return p
        } catch {
            self.logger.error(
                "edge: cannot start mosquitto: \(error) (install it: apt-get install mosquitto); the mapper API is off until a broker listens on \(broker)"
            )
            return nil
        }
    }

    // MARK: sync from the control plane

    /// One kind followed for `apply`, which gets every object of the kind (sorted by namespace/name) after
    /// each change.
    func reflected<T: MeshObject>(
        _ type: T.Type,
        node: String? = nil,
        _ apply: @escaping @Sendable ([T]) async throws -> Void
    ) -> ReflectedKind {
        let items = Mutex<[String: T]>([:])
        return .of(T.self, from: nil, node: node) { update in
            let all = items.withLock { items -> [T]? in
                switch update {
                case .replaced(let all, _):
                    items = Dictionary(
                        all.map { ("\($0.effectiveNamespace)/\($0.metadata.name)", $0) },
                        uniquingKeysWith: { a, _ in a }
                    )
                case .changed(.added(let o)), .changed(.modified(let o)):
                    items["\(o.effectiveNamespace)/\(o.metadata.name)"] = o
                case .changed(.deleted(let o)):
                    items["\(o.effectiveNamespace)/\(o.metadata.name)"] = nil
                case .changed:
                    return nil
                }
                return items.keys.sorted().map { items[$0]! }
            }
            if let all { try await apply(all) }
        }
    }

    /// The kinds the edge follows: workloads, device models, devices (models before devices, so that a
    /// first sync holds a device's model when the device arrives). Workloads and devices are this node's only
    /// (`?node=`): another node's twin reports and instance reports never reach this agent. (The filters
    /// below stay: a control plane from before node-scoped watches sends every one.)
    /// `EdgeConfiguration.followsControlPlane` false: the caller runs them in its own `MultiReflector`, beside
    /// other kinds, over one connection.
    public func reflectedKinds() -> [ReflectedKind] {
        let me = self.configuration.nodeName
        return [
            self.reflected(Workload.self, node: me) { all in
                let mine = all.filter { ($0.status?.nodes ?? []).contains(me) }
                let before = try self.store.workloads()
                let changed =
                    before.map(\.spec) != mine.map(\.spec) || before.map(\.metadata.name) != mine.map(\.metadata.name)
                try self.store.setWorkloads(mine)
                if changed { await self.supervisor.update(mine) }
            },
            self.reflected(DeviceModel.self) { all in try self.store.setModels(all) },
            self.reflected(Device.self, node: me) { all in
                let changed = try self.store.setDevices(all.filter { $0.spec.node == me })
                for id in changed { await self.publishDelta(id) }
            },
        ]
    }

    // MARK: the outbox

    func sendOutbox() async {
        let path = ControlClient.path(Node.resource, namespace: nil, name: self.configuration.nodeName) + "/reports"
        var delay = self.configuration.initialBackoff
        var failing = false
        var waits = self.wakeups.makeAsyncIterator()
        while !Task.isCancelled {
            let batch: [NodeReport]
            do {
                batch = try self.store.pending(limit: self.configuration.outboxBatch)
            } catch {
                self.logger.error("edge: cannot read the outbox: \(error)")
                batch = []
            }
            if batch.isEmpty {
                _ = await waits.next()
                continue
            }
            do {
                let body = ByteBuffer(
                    bytes: try MeshJSON.encode(NodeReportBatch(epoch: self.store.epoch, reports: batch))
                )
                let answer = try await self.client.raw(.POST, path, body: body).body
                let results = try JSONDecoder().decode(NodeReportResults.self, from: Data(answer.readableBytesView))
                try self.store.answered(results.results, sent: batch)
                let rejected = results.results.filter { $0.result == .rejected }
                for r in rejected {
                    self.logger.warning(
                        "edge: the control plane refused report \(r.id): \(r.message ?? "no reason given")"
                    )
                }
                self.tally.withLock {
                    $0.sent += results.results.count
                    $0.rejectedByControl += rejected.count
                }
                if failing {
                    self.logger.notice("edge: the control plane takes reports again")
                    failing = false
                }
                delay = self.configuration.initialBackoff
            } catch {
                if Task.isCancelled { return }
                if !failing {
                    self.logger.warning(
                        "edge: cannot send \(batch.count) reports: \(error); they stay in the outbox and are sent again"
                    )
                    failing = true
                }
                self.tally.withLock { $0.lastError = "\(error)" }
                try? await Task.sleep(for: .nanoseconds(Int64.random(in: 0...max(1, NodeAgent.nanos(delay)))))
                delay = min(delay * 2, self.configuration.maxBackoff)
            }
        }
    }

    // MARK: the mapper API

    func send(_ device: String, _ suffix: String, _ payload: some Encodable) async {
        guard let mqtt = self.mqtt else { return }
        do {
            try await mqtt.publish(topic: TwinTopics.prefix + device + suffix, payload: TwinPayloads.encode(payload))
        } catch {
            self.logger.debug("mqtt: cannot publish to \(device)\(suffix): \(error)")
        }
    }

    static func millis() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }

    static func msgTwins(_ twins: [EdgeStore.Twin]) -> [String: MsgTwin] {
        Dictionary(
            twins.map { t in
                (
                    t.property,
                    MsgTwin(
                        expected: t.desired.map { TwinValue(value: $0) },
                        actual: t.reported.map { TwinValue(value: $0, timestamp: t.reportedTime) },
                        metadata: MsgTwin.TypeMetadata(type: "Updated"),
                        expectedVersion: t.desired == nil ? nil : TwinVersion(cloud: t.desiredVersion, edge: 0),
                        actualVersion: t.reported == nil ? nil : TwinVersion(cloud: 0, edge: t.reportedVersion)
                    )
                )
            },
            uniquingKeysWith: { a, _ in a }
        )
    }

    /// Publishes `.../twin/update/delta` when a desired value differs from the reported one.
    func publishDelta(_ device: String) async {
        guard let twins = try? self.store.twins(device) else { return }
        var delta: [String: String] = [:]
        for t in twins where !t.converged { delta[t.property] = t.desired }
        guard !delta.isEmpty else { return }
        let message = DeviceTwinDelta(
            eventID: "delta-\(Self.millis())",
            timestamp: Self.millis(),
            twin: Self.msgTwins(twins),
            delta: delta
        )
        await self.send(device, TwinTopics.delta, message)
        self.tally.withLock { $0.deltas += 1 }
    }

    func publishAllDeltas() async {
        for id in (try? self.store.deviceIDs()) ?? [] { await self.publishDelta(id) }
    }

    /// One message from a mapper. Anything wrong gets a `.../result` with `code` and `reason`, and is
    /// logged; nothing is stored for it.
    func handle(_ p: MQTTPublish) async {
        guard let request = TwinTopics.parse(p.topic) else { return }
        switch request {
        case .update(let device):
            let update: DeviceTwinUpdate
            do {
                update = try TwinPayloads.decode(DeviceTwinUpdate.self, p.payload)
            } catch {
                await self.refuse(device, eventID: "", code: 400, "\(error)")
                return
            }
            let outcome: EdgeStore.ReportOutcome
            do {
                outcome = try self.store.acceptReport(
                    twinID: device,
                    eventID: update.eventID,
                    values: TwinPayloads.reported(update),
                    timestamp: update.timestamp > 0 ? update.timestamp : Self.millis()
                )
            } catch {
                self.logger.error("edge: cannot store a report of \(device): \(error)")
                await self.refuse(device, eventID: update.eventID, code: 500, "the node cannot store it: \(error)")
                return
            }
            switch outcome {
            case .accepted(let twins):
                self.tally.withLock { $0.accepted += 1 }
                self.wake.yield()
                await self.send(
                    device,
                    TwinTopics.updateResult,
                    DeviceTwinResult(eventID: update.eventID, timestamp: Self.millis(), twin: Self.msgTwins(twins))
                )
            case .duplicate:
                self.logger.debug("edge: event \(update.eventID) of \(device) was taken before")
            case .rejected(let why):
                await self.refuse(
                    device,
                    eventID: update.eventID,
                    code: why.hasPrefix("unknown device") ? 404 : 400,
                    why
                )
            }
        case .get(let device):
            let eventID = (try? TwinPayloads.decode(TwinBaseMessage.self, p.payload))?.eventID ?? ""
            guard (try? self.store.device(device)) ?? nil != nil, let twins = try? self.store.twins(device) else {
                await self.refuse(
                    device,
                    eventID: eventID,
                    code: 404,
                    "unknown device \"\(device)\"",
                    topic: TwinTopics.getResult
                )
                return
            }
            await self.send(
                device,
                TwinTopics.getResult,
                DeviceTwinResult(eventID: eventID, timestamp: Self.millis(), twin: Self.msgTwins(twins))
            )
        }
    }

    func refuse(
        _ device: String,
        eventID: String,
        code: Int,
        _ reason: String,
        topic: String = TwinTopics.updateResult
    ) async {
        self.tally.withLock {
            $0.refused += 1
            $0.lastError = reason
        }
        self.logger.warning("edge: refused a message of device \(device): \(reason)")
        await self.send(
            device,
            topic,
            DeviceTwinResult(eventID: eventID, timestamp: Self.millis(), twin: nil, code: code, reason: reason)
        )
    }
}
