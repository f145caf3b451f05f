// A simulated thermostat, as a KubeEdge-style device mapper: it speaks only MQTT and KubeEdge's twin
// payloads ($hw/events/device/<id>/twin/...), so it would work against KubeEdge's edgecore too.
// - every --interval seconds it reports `temperature` (drifting toward `target` while `mode` is heat
//   or cool), `target` and `mode` on .../twin/update, with a fresh event_id, at QoS 1;
// - a .../twin/update/delta (a desired value the cloud set) is applied at once and reported back;
// - on start it asks .../twin/get for the desired values it missed.
import ArgumentParser
import Logging
import NodeAgent
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

@main
struct ThermostatMapper: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "thermostat-mapper",
        abstract: "A simulated thermostat speaking KubeEdge's device twin topics over MQTT."
    )

    @Option(name: .long, help: "The device's twin id (its name in namespace default).")
    var device: String = "thermostat-1"

    @Option(name: .long, help: "The MQTT broker, host:port (the node agent's mqttBroker).")
    var broker: String = "127.0.0.1:1883"

    @Option(name: .long, help: "Seconds between reports (0: as fast as it can, for benchmarks).")
    var interval: Double = 2

    @Option(name: .long, help: "Stop after this many periodic reports (default: run until stopped).")
    var count: Int?

    @Option(name: .long, help: "The starting temperature (°C).")
    var temperature: Double = 18

    func validate() throws {
        guard self.interval >= 0 && self.interval <= 3600 else {
            throw ValidationError("--interval must be between 0 (as fast as it can: benchmarks) and 3600 seconds")
        }
        guard let colon = self.broker.lastIndex(of: ":"), Int(self.broker[self.broker.index(after: colon)...]) != nil
        else {
            throw ValidationError("--broker must be host:port")
        }
    }

    /// One decimal, as a thermostat shows it.
    static func format(_ x: Double) -> String {
        let tenths = Int((x * 10).rounded())
        return "\(tenths < 0 ? "-" : "")\(abs(tenths) / 10).\(abs(tenths) % 10)"
    }

    func run() async throws {
        let colon = self.broker.lastIndex(of: ":")!
        let host = String(self.broker[..<colon])
        let port = Int(self.broker[self.broker.index(after: colon)...])!
        let topic = TwinTopics.prefix + self.device
        var c = MQTTClientConfiguration(host: host, port: port, clientID: "thermostat-mapper-\(self.device)")
        c.cleanSession = true
        c.subscriptions = [
            MQTTSubscription(filter: topic + TwinTopics.delta, qos: 1),
            MQTTSubscription(filter: topic + TwinTopics.getResult, qos: 1),
            MQTTSubscription(filter: topic + TwinTopics.updateResult, qos: 0),
        ]
        let logger: Logger = {
            var l = Logger(label: "thermostat-mapper")
            l.logLevel = .info
            return l
        }()
        let client = MQTTClient(configuration: c, logger: logger)
        let state = Thermostat(temperature: self.temperature)
        let device = self.device
        let start = EdgeClock.millis()
        @Sendable func report() async {
            let n = state.nextEvent()
            let (t, target, mode) = state.values
            let update = DeviceTwinUpdate(
                eventID: "\(device)-\(start)-\(n)",
                timestamp: EdgeClock.millis(),
                twin: [
                    "temperature": MsgTwin(actual: TwinValue(value: Self.format(t)), metadata: .init(type: "Updated")),
                    "target": MsgTwin(actual: TwinValue(value: Self.format(target)), metadata: .init(type: "Updated")),
                    "mode": MsgTwin(actual: TwinValue(value: mode), metadata: .init(type: "Updated")),
                ]
            )
            do {
                try await client.publish(topic: topic + TwinTopics.update, payload: TwinPayloads.encode(update), qos: 1)
            } catch {
                logger.debug("cannot report: \(error)")
            }
        }
        let runner = Task { [client, state, topic, start, logger] in
            await client.run(
                onConnect: {
                    try? await client.publish(
                        topic: topic + TwinTopics.get,
                        payload: TwinPayloads.encode(
                            TwinBaseMessage(eventID: "get-\(start)", timestamp: EdgeClock.millis())
                        )
                    )
                },
                onPublish: { p in
                    guard let body = try? TwinPayloads.decode(DeviceTwinDelta.self, p.payload) else {
                        if p.topic.hasSuffix(TwinTopics.getResult),
                            let r = try? TwinPayloads.decode(DeviceTwinResult.self, p.payload)
                        {
                            var desired: [String: String] = [:]
                            for (k, v) in r.twin ?? [:] { if let e = v.expected?.value { desired[k] = e } }
                            if state.apply(desired) { await report() }
                        } else if p.topic.hasSuffix(TwinTopics.updateResult),
                            let r = try? TwinPayloads.decode(DeviceTwinResult.self, p.payload), let reason = r.reason
                        {
                            logger.warning("the node refused a report: \(reason)")
                        }
                        return
                    }
                    logger.info("desired values from the cloud: \(body.delta.sorted { $0.key < $1.key })")
                    if state.apply(body.delta) { await report() }
                }
            )
        }
        while !client.isConnected { try await Task.sleep(for: .milliseconds(20)) }
        logger.info("thermostat \(device) reporting to \(self.broker) every \(self.interval)s")
        var sent = 0
        while self.count.map({ sent < $0 }) ?? true {
            state.step()
            await report()
            sent += 1
            if self.interval > 0 { try await Task.sleep(for: .microseconds(Int64(self.interval * 1_000_000))) }
        }
        // Leaves once the broker has acknowledged every report (at most 30 s): closing with PUBACKs unread
        // resets the connection, and the broker drops the reports it had not read yet.
        let deadline = ContinuousClock.now + .seconds(30)
        while client.unacknowledged > 0, client.isConnected, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        runner.cancel()
        await runner.value
    }
}

/// The simulated device: temperature moves 0.5 °C a step toward the target while heating or cooling.
final class Thermostat: Sendable {
    private let state: Mutex<(temperature: Double, target: Double, mode: String)>
    private let events = Mutex(0)

    func nextEvent() -> Int {
        self.events.withLock {
            $0 += 1
            return $0
        }
    }

    init(temperature: Double) {
        self.state = Mutex((temperature, 21, "heat"))
    }

    var values: (Double, Double, String) { self.state.withLock { ($0.temperature, $0.target, $0.mode) } }

    func step() {
        self.state.withLock { s in
            let delta = s.target - s.temperature
            switch s.mode {
            case "heat" where delta > 0: s.temperature += min(0.5, delta)
            case "cool" where delta < 0: s.temperature += max(-0.5, delta)
            case "off": s.temperature += (15 - s.temperature) * 0.05
            default: break
            }
        }
    }

    /// Takes desired values; returns whether anything changed.
    func apply(_ desired: [String: String]) -> Bool {
        self.state.withLock { s in
            var changed = false
            if let t = desired["target"].flatMap(Double.init), t != s.target {
                s.target = t
                changed = true
            }
            if let m = desired["mode"], ["heat", "cool", "off"].contains(m), m != s.mode {
                s.mode = m
                changed = true
            }
            return changed
        }
    }
}

enum EdgeClock {
    static func millis() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1000 + Int64(ts.tv_nsec) / 1_000_000
    }
}
