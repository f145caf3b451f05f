import Control
import Foundation
import MeshClient
import MeshCore
import MeshIdentity
import MeshTestSupport
import NodeAgent
import Synchronization
import Testing

/// Twin sync under faults, with the real `mesh-agent` binary (SIGKILLed), a real mosquitto, the real
/// control plane stopped and started on its SQLite file.
@Suite(.serialized, .rationed) struct TwinFaultTests {
    static let node = "edge-f1"
    static let reports = 1000

    static func value(_ i: Int) -> String { "\(i / 10).\(i % 10)" }

    /// A mesh-agent for `node` with credentials issued by `cp`, its mapper API on `broker`.
    static func agent(_ cp: RunningControl, port: Int, dir: String, broker: String) throws -> Subprocess {
        let config = dir + "/agent.yaml"
        try """
        controlServer: https://127.0.0.1:\(port)
        nodeName: \(Self.node)
        nodeAddresses: [127.0.0.1]
        dataDir: \(dir)
        dnsListen: 127.0.0.1:\(freePort())
        adminListen: 127.0.0.1:\(freePort())
        linkListen: "off"
        heartbeatIntervalSeconds: 1
        mqttBroker: \(broker)
        logLevel: warning
        """.write(toFile: config, atomically: true, encoding: .utf8)
        return try Subprocess(binaryDirectory() + "/mesh-agent", ["--config", config])
    }

    @Test func everyReportIsAppliedExactlyOnceInOrderAcrossAKilledAgentAndAStoppedControlPlane() async throws {
        let broker = try await Mosquitto()
        let port = freePort()
        let cpDir = TempDir("control")
        var cp = try await RunningControl(dir: cpDir) { $0.listen = "127.0.0.1:\(port)" }
        let dir = TempDir("agent")
        let issued = try cp.issue(.node(Self.node))
        try NodeEnrolment.files(stateDir: dir.path).write(
            keyPEM: issued.keyPEM,
            certificatePEM: issued.certificatePEM,
            caPEM: cp.pki.caPEM
        )
        try await cp.client.apply(Thermostat.model)
        try await cp.client.apply(Thermostat.device("thermo-f", node: Self.node, target: "20"))
        let topic = TwinTopics.prefix + "thermo-f"
        let mapper = try await MQTTRecorder(port: broker.port, filters: [topic + "/twin/update/delta"])
        var agent = try Self.agent(cp, port: port, dir: dir.path, broker: broker.address)
        // Up and synced: the device's desired value came down as a delta.
        #expect(
            await eventually(timeout: .seconds(30)) {
                mapper.on(TwinTopics.delta).contains { $0["delta"]?["target"]?.stringValue == "20" }
            },
            "\(agent.stderr)"
        )

        // The control plane stops; the mapper reports; the agent is SIGKILLed partway and restarted.
        try await cp.stop()
        func report(_ i: Int) async throws {
            try await mapper.client.publish(
                topic: topic + TwinTopics.update,
                payload: Array(Thermostat.update("r-\(i)", ["temperature": Self.value(i)]).utf8),
                qos: 1
            )
        }
        for i in 1...400 { try await report(i) }
        agent.signal(SIGKILL)
        _ = await agent.wait(timeout: .seconds(10))
        for i in 401...700 { try await report(i) }
        agent = try Self.agent(cp, port: port, dir: dir.path, broker: broker.address)
        for i in 701...Self.reports { try await report(i) }
        // Everything is in the agent's outbox (the control plane is still down).
        let check = try EdgeStore(path: dir.path + "/edge.db", durability: .normal)
        #expect(
            await eventually(timeout: .seconds(60)) { (try? check.outboxCount()) == Self.reports },
            "outbox holds \((try? check.outboxCount()) ?? -1); \(agent.stderr)"
        )
        // The node goes away for good measure, and the cloud sets a desired value meanwhile.
        agent.signal(SIGKILL)
        _ = await agent.wait(timeout: .seconds(10))
        cp = try await RunningControl(dir: cpDir) { $0.listen = "127.0.0.1:\(port)" }
        var device = try await cp.client.get(Device.self, name: "thermo-f")
        device.spec.properties = [DeviceDesired(name: "target", desired: "23.5")]
        try await cp.client.apply(device)
        let from = try await cp.rv()
        let history = Mutex<[Device]>([])
        let markerSeen = Mutex(false)
        let client = cp.client
        let watcher = Task {
            try await client.watch(Device.self, after: from) { event in
                if case .modified(let d) = event, d.metadata.name == "thermo-f" { history.withLock { $0.append(d) } }
                if case .added(let d) = event, d.metadata.name == "marker" { markerSeen.withLock { $0 = true } }
                return true
            }
        }
        agent = try Self.agent(cp, port: port, dir: dir.path, broker: broker.address)
        // The desired value set while the node was away arrives as a delta.
        #expect(
            await eventually(timeout: .seconds(30)) {
                mapper.on(TwinTopics.delta).contains { $0["delta"]?["target"]?.stringValue == "23.5" }
            },
            "\(agent.stderr)"
        )
        #expect(
            await eventually(timeout: .seconds(60)) {
                history.withLock { $0.last?.twin("temperature")?.reportedVersion == Int64(Self.reports) }
            },
            "\(history.withLock { $0.count }) writes seen; \(agent.stderr)"
        )
        // The agent's outbox empties once the control plane took every report; then a marker object:
        // the watch delivers in the store's order, so a write of any report again would come before it.
        #expect(await eventually { (try? check.outboxCount()) == 0 })
        try await cp.client.apply(Thermostat.device("marker", node: "edge-elsewhere"))
        #expect(await eventually { markerSeen.withLock { $0 } })
        watcher.cancel()
        // The whole history: one write per report, values and versions 1...1000 in order, ids growing.
        let seen = history.withLock { $0 }
        let values = seen.compactMap { $0.twin("temperature")?.reported }
        #expect(values == (1...Self.reports).map(Self.value))
        #expect(seen.compactMap { $0.twin("temperature")?.reportedVersion } == (1...Self.reports).map(Int64.init))
        let ids = seen.compactMap { $0.status?.lastReport?.id }
        #expect(ids == ids.sorted() && Set(ids).count == ids.count)
        agent.signal(SIGTERM)
        _ = await agent.wait(timeout: .seconds(15))
        await mapper.stop()
        try await cp.stop()
        _ = broker
    }
}
