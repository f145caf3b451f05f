import Control
import Foundation
import Logging
import MeshClient
import MeshCore
import MeshTestSupport
import NodeAgent
import Synchronization
import Testing

/// mosquitto (Debian's) on a free loopback port with its own config, killed when released.
final class Mosquitto: Sendable {
    let process: Subprocess
    let port: Int
    let dir: TempDir

    init() async throws {
        let dir = TempDir("mosquitto")
        let port = freePort()
        let conf = dir.path + "/mosquitto.conf"
        try
            "listener \(port) 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\nqueue_qos0_messages true\npersistence false\n"
            .write(toFile: conf, atomically: true, encoding: .utf8)
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/mosquitto") else {
            throw MosquittoMissing()
        }
        self.process = try Subprocess("/usr/sbin/mosquitto", ["-c", conf])
        self.port = port
        self.dir = dir
        let up = await eventually(timeout: .seconds(10)) { Self.accepts(port) }
        if !up { throw MosquittoMissing(message: "mosquitto did not listen on \(port): \(self.process.stderr)") }
    }

    struct MosquittoMissing: Error, CustomStringConvertible {
        var message = "mosquitto is not installed (scripts/bootstrap installs it)"
        var description: String { self.message }
    }

    static func accepts(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        } == 0
    }

    var address: String { "127.0.0.1:\(self.port)" }
}

/// An MQTT client of the test's own (our client, another client id) that records what it receives.
final class MQTTRecorder: Sendable {
    let client: MQTTClient
    let task: Task<Void, Never>
    private let received = Received()

    final class Received: Sendable {
        let list = Mutex<[MQTTPublish]>([])
    }

    init(port: Int, filters: [String], clientID: String = "test-\(UUID().uuidString.prefix(8))") async throws {
        var c = MQTTClientConfiguration(host: "127.0.0.1", port: port, clientID: clientID)
        c.cleanSession = true
        c.subscriptions = filters.map { MQTTSubscription(filter: $0, qos: 0) }
        let client = MQTTClient(configuration: c, logger: Logger(label: "test-mqtt"))
        self.client = client
        let received = self.received
        self.task = Task { await client.run { p in received.list.withLock { $0.append(p) } } }
        // Subscribed once the broker's SUBACK came: it delivers from then on.
        #expect(await eventually { client.isSubscribed })
    }

    var messages: [MQTTPublish] { self.received.list.withLock { $0 } }

    func on(_ suffix: String) -> [JSONValue] {
        self.messages.filter { $0.topic.hasSuffix(suffix) }.compactMap { try? JSONValue.parse(json: Data($0.payload)) }
    }

    func publish(_ topic: String, _ text: String) async throws {
        try await self.client.publish(topic: topic, payload: Array(text.utf8))
    }

    func stop() async {
        self.task.cancel()
        await self.task.value
    }
}

/// The edge part of a node agent, in this process, with the node's certificate.
final class RunningEdge: Sendable {
    let edge: EdgeServices
    let task: Task<Void, any Error>

    init(
        _ cp: RunningControl,
        node: String,
        dataDir: String,
        broker: String? = nil,
        configure: (inout EdgeConfiguration) -> Void = { _ in }
    ) throws {
        let client = try cp.client(try cp.issue(.node(node)))
        var c = EdgeConfiguration(nodeName: node, dataDir: dataDir)
        c.mqttBroker = broker
        c.durability = .normal
        c.initialBackoff = .milliseconds(50)
        c.maxBackoff = .milliseconds(500)
        c.supervisor.initialBackoff = .milliseconds(100)
        c.supervisor.stopGrace = .seconds(2)
        configure(&c)
        var logger = Logger(label: "edge")
        logger.logLevel = .critical
        let edge = try EdgeServices(configuration: c, client: client, logger: logger)
        self.edge = edge
        self.task = Task { try await edge.run() }
    }

    func stop() async {
        self.task.cancel()
        _ = try? await self.task.value
    }
}

enum Thermostat {
    static let model = DeviceModel(
        metadata: ObjectMeta(name: "thermostat"),
        spec: DeviceModelSpec(properties: [
            DeviceProperty(
                name: "temperature",
                type: .float,
                minimum: -40,
                maximum: 125,
                unit: "°C",
                accessMode: .readOnly
            ),
            DeviceProperty(name: "target", type: .float, minimum: 5, maximum: 35, unit: "°C"),
            DeviceProperty(name: "mode", type: .string, enum: ["heat", "cool", "off"]),
        ])
    )

    static func device(_ name: String, node: String, target: String? = nil) -> Device {
        Device(
            metadata: ObjectMeta(name: name),
            spec: DeviceSpec(
                model: "thermostat",
                node: node,
                protocol: DeviceProtocol(name: "mqtt"),
                properties: target.map { [DeviceDesired(name: "target", desired: $0)] }
            )
        )
    }

    static func update(_ event: String, _ values: [String: String]) -> String {
        let twin = values.keys.sorted().map {
            "\"\($0)\":{\"actual\":{\"value\":\"\(values[$0]!)\"},\"metadata\":{\"type\":\"Updated\"}}"
        }
        return "{\"event_id\":\"\(event)\",\"timestamp\":1700000000000,\"twin\":{\(twin.joined(separator: ","))}}"
    }
}
