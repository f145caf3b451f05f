import Control
import Foundation
import MeshClient
import MeshCore
import MeshTestSupport
import NodeAgent
import Testing

/// Device twins over a real control plane, a real mosquitto and SQLite files; the mapper is a test
/// MQTT client speaking KubeEdge's payloads.
@Suite(.serialized, .rationed) struct TwinSyncTests {
    static let topic = TwinTopics.prefix + "thermo-1"

    @Test func reportsGoUpDesiredComesDownAndBadInputGetsAClearAnswer() async throws {
        let broker = try await Mosquitto()
        let cp = try await RunningControl()
        let node = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-t1", addresses: ["127.0.0.1"]))
        #expect(await eventually { node.agent.snapshot.heartbeats >= 1 })
        try await cp.client.apply(Thermostat.model)
        try await cp.client.apply(Thermostat.device("thermo-1", node: "edge-t1", target: "21.5"))
        // A desired value that breaks the model is refused with the reason.
        do {
            try await cp.client.apply(Thermostat.device("thermo-2", node: "edge-t1", target: "99"))
            Issue.record("an out-of-range desired value was accepted")
        } catch let s as Status {
            #expect(s.code == 422 && s.message.contains("spec.properties[0].desired: 99 is above the maximum 35 °C"))
        }
        let mapper = try await MQTTRecorder(
            port: broker.port,
            filters: [Self.topic + "/twin/#", TwinTopics.prefix + "nope/twin/#"]
        )
        let dir = TempDir("edge")
        let edge = try RunningEdge(cp, node: "edge-t1", dataDir: dir.path, broker: broker.address)

        // The desired value arrives as a delta.
        #expect(
            await eventually {
                mapper.on(TwinTopics.delta).contains { $0["delta"]?["target"]?.stringValue == "21.5" }
            }
        )
        let delta = try #require(mapper.on(TwinTopics.delta).last)
        #expect(delta["twin"]?["target"]?["expected"]?["value"]?.stringValue == "21.5")
        #expect(delta["twin"]?["target"]?["expected_version"]?["cloud"] == .int(1))

        // A report goes up: applied once, with the edge's version.
        try await mapper.publish(
            Self.topic + TwinTopics.update,
            Thermostat.update("e1", ["temperature": "20.5", "target": "21.5"])
        )
        #expect(
            try await eventually {
                let d = try await cp.client.get(Device.self, name: "thermo-1")
                return d.twin("temperature")?.reported == "20.5" && d.twin("target")?.reported == "21.5"
            }
        )
        var device = try await cp.client.get(Device.self, name: "thermo-1")
        #expect(device.twin("temperature")?.reportedVersion == 1)
        #expect(device.twin("target")?.desiredVersion == 1)
        #expect(device.status?.lastReport?.node == "edge-t1")
        #expect(
            await eventually { mapper.on(TwinTopics.updateResult).contains { $0["event_id"]?.stringValue == "e1" } }
        )
        // The same event again (a broker's redelivery): not counted twice.
        try await mapper.publish(Self.topic + TwinTopics.update, Thermostat.update("e1", ["temperature": "20.5"]))

        // Bad input: each gets a result with code and reason; nothing is stored for it.
        try await mapper.publish(Self.topic + TwinTopics.update, "{not json")
        try await mapper.publish(
            TwinTopics.prefix + "nope" + TwinTopics.update,
            Thermostat.update("e2", ["temperature": "1"])
        )
        try await mapper.publish(Self.topic + TwinTopics.update, Thermostat.update("e3", ["temperature": "500"]))
        try await mapper.publish(Self.topic + TwinTopics.update, Thermostat.update("e4", ["humidity": "40"]))
        #expect(await eventually { edge.edge.counters.refused == 4 })
        // Their answers reach the mapper after the count moved: wait for the four of them.
        #expect(await eventually { mapper.on(TwinTopics.updateResult).filter { $0["code"] != nil }.count == 4 })
        let results = mapper.on(TwinTopics.updateResult)
        #expect(
            results.contains {
                $0["code"] == .int(400) && ($0["reason"]?.stringValue ?? "").hasPrefix("MQTT: malformed payload")
            }
        )
        #expect(
            results.contains {
                $0["code"] == .int(404) && $0["reason"]?.stringValue?.contains("unknown device \"nope\"") == true
            }
        )
        #expect(
            results.contains {
                $0["event_id"]?.stringValue == "e3"
                    && $0["reason"]?.stringValue == "temperature: 500 is above the maximum 125 °C"
            }
        )
        #expect(
            results.contains {
                $0["event_id"]?.stringValue == "e4"
                    && $0["reason"]?.stringValue?.contains("no property \"humidity\"") == true
            }
        )
        // The next good report has version 2: the duplicate and the refused ones took none.
        try await mapper.publish(Self.topic + TwinTopics.update, Thermostat.update("e5", ["temperature": "20.7"]))
        #expect(
            try await eventually {
                try await cp.client.get(Device.self, name: "thermo-1").twin("temperature")?.reportedVersion == 2
            }
        )
        #expect(try await cp.client.get(Device.self, name: "thermo-1").twin("temperature")?.reported == "20.7")
        #expect(await eventually { (try? edge.edge.store.outboxCount()) == 0 })

        // twin/get answers with desired and reported.
        try await mapper.publish(Self.topic + TwinTopics.get, "{\"event_id\":\"g1\"}")
        #expect(await eventually { mapper.on(TwinTopics.getResult).contains { $0["event_id"]?.stringValue == "g1" } })
        let got = try #require(mapper.on(TwinTopics.getResult).first { $0["event_id"]?.stringValue == "g1" })
        #expect(got["twin"]?["temperature"]?["actual"]?["value"]?.stringValue == "20.7")
        #expect(got["twin"]?["target"]?["expected"]?["value"]?.stringValue == "21.5")

        // The cloud sets a new desired value: version 2, and a delta.
        device = try await cp.client.get(Device.self, name: "thermo-1")
        device.spec.properties = [DeviceDesired(name: "target", desired: "23")]
        try await cp.client.apply(device)
        #expect(try await cp.client.get(Device.self, name: "thermo-1").twin("target")?.desiredVersion == 2)
        #expect(
            await eventually { mapper.on(TwinTopics.delta).contains { $0["delta"]?["target"]?.stringValue == "23" } }
        )

        await mapper.stop()
        await edge.stop()
        await node.stop()
        try await cp.stop()
        _ = broker
    }

    /// mosquitto-clients drive and observe the twin topics: a KubeEdge mapper's view exactly.
    @Test func mosquittoPubAndSubDriveTheTwinTopics() async throws {
        let broker = try await Mosquitto()
        let cp = try await RunningControl()
        let node = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-t2", addresses: ["127.0.0.1"]))
        #expect(await eventually { node.agent.snapshot.heartbeats >= 1 })
        try await cp.client.apply(Thermostat.model)
        try await cp.client.apply(Thermostat.device("thermo-9", node: "edge-t2"))
        let dir = TempDir("edge")
        let edge = try RunningEdge(cp, node: "edge-t2", dataDir: dir.path, broker: broker.address)
        // The device and its model arrive over two watches, in either order: an update taken before the
        // model is here is refused ("its model thermostat is not known here yet"), so wait for both.
        #expect(
            await eventually {
                let store = edge.edge.store
                let device = (try? store.device("thermo-9")) ?? nil
                let namespace = Thermostat.model.effectiveNamespace
                let model = (try? store.model(namespace: namespace, name: "thermostat")) ?? nil
                return device != nil && model != nil && edge.edge.mqtt?.isSubscribed == true
            }
        )
        let topic = TwinTopics.prefix + "thermo-9"
        // mosquitto_sub subscribes to the result topic, then to a probe topic holding a retained
        // message: the broker takes subscriptions in order, so once the probe is printed the result
        // subscription is in place (a retained-message round trip instead of a sleep).
        let probeTopic = "test/probe-\(UUID().uuidString)"
        let probe = try await run(
            "/usr/bin/mosquitto_pub",
            ["-h", "127.0.0.1", "-p", String(broker.port), "-q", "1", "-r", "-t", probeTopic, "-m", "probe"]
        )
        #expect(probe.status == 0, "\(probe.stderr)")
        let sub = try Subprocess(
            "/usr/bin/mosquitto_sub",
            [
                "-h", "127.0.0.1", "-p", String(broker.port), "-t", topic + "/twin/update/result", "-t", probeTopic,
                "-C", "2", "-W", "20",
            ]
        )
        #expect(await eventually { sub.stdout.contains("probe\n") }, "\(sub.stderr)")
        let pub = try await run(
            "/usr/bin/mosquitto_pub",
            [
                "-h", "127.0.0.1", "-p", String(broker.port), "-q", "1", "-t", topic + "/twin/update", "-m",
                Thermostat.update("cli-1", ["temperature": "19.25", "mode": "heat"]),
            ]
        )
        #expect(pub.status == 0, "\(pub.stderr)")
        let out = try #require(await sub.wait(timeout: .seconds(25)))
        #expect(out.status == 0, "\(out.stderr)")
        let lines = out.stdout.split(separator: "\n").filter { $0 != "probe" }
        let result = try JSONValue.parse(json: Data(try #require(lines.first).utf8))
        // (Each message carries the result: a refused update has `code` and `reason` and no twin.)
        #expect(result["event_id"]?.stringValue == "cli-1", "\(out.stdout)")
        #expect(result["twin"]?["temperature"]?["actual"]?["value"]?.stringValue == "19.25", "\(out.stdout)")
        #expect(result["twin"]?["mode"]?["actual_version"]?["edge"] == .int(1), "\(out.stdout)")
        #expect(
            try await eventually {
                try await cp.client.get(Device.self, name: "thermo-9").twin("mode")?.reported == "heat"
            }
        )
        await edge.stop()
        await node.stop()
        try await cp.stop()
        _ = broker
    }
}
