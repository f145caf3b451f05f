import MeshTestSupport
import NodeAgent
import Testing

/// MQTTClient against a real mosquitto.
@Suite(.rationed) struct MQTTClientTests {
    /// QoS 1 publishes count as unacknowledged until the broker's PUBACKs arrive; QoS 0 ones never do.
    /// (The thermostat mapper waits for 0 before it leaves: closing with PUBACKs unread resets the
    /// connection, and the broker drops the reports it had not read yet.)
    @Test func qos1PublishesStayUnacknowledgedUntilTheBrokersPubacks() async throws {
        let broker = try await Mosquitto()
        let watcher = try await MQTTRecorder(port: broker.port, filters: ["acks/#"])
        let publisher = try await MQTTRecorder(port: broker.port, filters: [])
        #expect(publisher.client.unacknowledged == 0)
        for i in 0..<50 {
            try await publisher.client.publish(topic: "acks/\(i)", payload: Array("m\(i)".utf8), qos: 1)
        }
        try await publisher.client.publish(topic: "acks/qos0", payload: Array("q0".utf8), qos: 0)
        #expect(publisher.client.unacknowledged <= 50)
        #expect(await eventually { publisher.client.unacknowledged == 0 })
        #expect(await eventually { watcher.messages.count == 51 })
        #expect(watcher.messages.filter { $0.topic != "acks/qos0" }.map(\.topic) == (0..<50).map { "acks/\($0)" })
        await publisher.stop()
        await watcher.stop()
        _ = broker
    }
}
