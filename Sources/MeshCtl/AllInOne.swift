import Control
import Logging
import MeshAgent
import MeshCore
import MeshHTTP
import Relay
import ServiceLifecycle

/// `meshctl up`: the whole mesh on one machine, on loopback, in the foreground. Never touches the
/// host's interfaces; data under the user's state folder unless told otherwise.
public struct AllInOne: Sendable {
    public var dataDir: String = StatePaths.defaultDataDir()
    public var controlListen: String = "127.0.0.1:7700"
    public var dnsListen: String = "127.0.0.1:5353"
    public var adminListen: String = "127.0.0.1:7780"
    /// The STUN binding server (UDP and TCP), as `mesh-relay` runs it.
    public var stunListen: String = "127.0.0.1:3478"
    /// Start an agent beside the control plane (off: control plane only).
    public var withAgent = true
    public var logLevel: Logger.Level = .info

    public init() {}

    /// The control plane's configuration for the all-in-one.
    public var controlConfig: ControlConfig {
        var c = ControlConfig()
        c.listen = self.controlListen
        c.dataDir = self.dataDir + "/control"
        c.logLevel = self.logLevel.rawValue
        return c
    }

    /// The agent's configuration for the all-in-one: loopback mode, talking to the local control plane.
    public var agentConfig: AgentConfig {
        var c = AgentConfig()
        c.controlServer = "http://\(self.controlListen)"
        c.dataDir = self.dataDir + "/agent"
        c.dnsListen = self.dnsListen
        c.adminListen = self.adminListen
        c.interfaceMode = .loopback
        c.logLevel = self.logLevel.rawValue
        return c
    }

    /// Runs every component until SIGINT or SIGTERM, then stops them cleanly.
    public func run() async throws {
        let logger = Logger(label: "meshctl-up")
        MeshMetrics.bootstrap()  // before the STUN server makes its counters
        let control = ControlServer(config: self.controlConfig, logger: Logger(label: "mesh-control"))
        let stun = STUNServer(
            configuration: STUNServerConfiguration(listen: [try ListenAddress(self.stunListen, field: "stunListen")]),
            logger: Logger(label: "mesh-relay")
        )
        var services: [any ServiceLifecycle.Service] = [control, stun]
        if self.withAgent {
            let agent = AgentServer(config: self.agentConfig, logger: Logger(label: "mesh-agent"))
            services.append(StartAfter(control, agent))
        }
        logger.info(
            "all-in-one mesh starting: control API on http://\(self.controlListen), DNS on \(self.dnsListen), agent admin on http://\(self.adminListen), STUN on \(self.stunListen), data in \(self.dataDir)"
        )
        guard await Daemon.run(services, name: "meshctl up", logger: logger) else { throw AllInOneFailed() }
        logger.info("all-in-one mesh stopped")
    }
}

/// Runs `service` once the control plane listens, so the all-in-one agent's first connection
/// succeeds (no start-up race, no retry noise in the log).
struct StartAfter: ServiceLifecycle.Service {
    let control: ControlServer
    let service: any ServiceLifecycle.Service

    init(_ control: ControlServer, _ service: any ServiceLifecycle.Service) {
        self.control = control
        self.service = service
    }

    func run() async throws {
        // When the control plane fails to start, ServiceGroup stops everything anyway.
        _ = try? await self.control.localAddress()
        try await self.service.run()
    }
}

/// The all-in-one stopped because a component failed (the log says which and why).
public struct AllInOneFailed: Error, CustomStringConvertible {
    public var description: String { "a component of the mesh failed; see the log above" }
}
