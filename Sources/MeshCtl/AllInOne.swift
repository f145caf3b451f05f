import Control
import Logging
import MeshAgent
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import Relay
import ServiceLifecycle

#if canImport(Glibc)
import Glibc
#endif

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `meshctl up`: the whole mesh on one machine, on loopback, in the foreground. Never touches the
/// host's interfaces; data under the user's state folder unless told otherwise.
public struct AllInOne: Sendable {
    public var dataDir: String = StatePaths.defaultDataDir()
    public var controlListen: String = "127.0.0.1:7700"
    public var dnsListen: String = "127.0.0.1:5353"
    public var adminListen: String = "127.0.0.1:7780"
    public var linkListen: String = "127.0.0.1:7900"
    /// The STUN binding server (UDP and TCP), as `mesh-relay` runs it.
    public var stunListen: String = "127.0.0.1:3478"
    /// The relay's sessions (7800/tcp) and its admin endpoint (`/metrics`): the relay proper runs
    /// too, enrolled as `mesh://relay/local` with a relay token of its own.
    public var relayListen: String = "127.0.0.1:7800"
    public var relayAdminListen: String = "127.0.0.1:7801"
    /// Start an agent beside the control plane (off: control plane only).
    public var withAgent = true
    /// The agent's node name (nil: the host name).
    public var nodeName: String?
    /// Where mosquitto listens for device mappers (KubeEdge's twin topics), started by the agent when
    /// mosquitto is installed; nil: no mapper API.
    public var mqttListen: String? = "127.0.0.1:1883"
    public var logLevel: Logger.Level = .info
    /// Where the admin credentials for meshctl are written (nil: not written).
    public var clientConfigPath: String? = ClientConfig.defaultPath()

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
        c.controlServer = "https://\(self.controlListen)"
        c.dataDir = self.dataDir + "/agent"
        c.dnsListen = self.dnsListen
        c.adminListen = self.adminListen
        c.linkListen = self.linkListen
        c.interfaceMode = .loopback
        // Its node is reached on the loopback it serves on, nothing else of the host.
        c.nodeAddresses = ["127.0.0.1"]
        c.logLevel = self.logLevel.rawValue
        if let n = self.nodeName { c.nodeName = n }
        if let mqtt = self.mqttListen, AllInOne.mosquittoInstalled {
            c.mqttBroker = mqtt
            c.mqttStartBroker = true
        }
        return c
    }

    /// The relay's configuration for the all-in-one: STUN and sessions on loopback, joined to the
    /// local control plane.
    public var relayConfig: RelayConfig {
        var c = RelayConfig()
        c.controlServer = "https://\(self.controlListen)"
        c.name = "local"
        c.stunListen = [self.stunListen]
        c.listen = self.relayListen
        c.adminListen = self.relayAdminListen
        c.dataDir = self.dataDir + "/relay"
        c.logLevel = self.logLevel.rawValue
        return c
    }

    /// Runs every component until SIGINT or SIGTERM, then stops them cleanly.
    public func run() async throws {
        let logger = Logger(label: "meshctl-up")
        MeshMetrics.bootstrap()  // before the STUN server makes its counters
        let control = ControlServer(config: self.controlConfig, logger: Logger(label: "mesh-control"))
        var services: [any ServiceLifecycle.Service] = [
            control, EnrolledRelay(control: control, mesh: self, logger: logger),
        ]
        if self.withAgent {
            services.append(EnrolledAgent(control: control, mesh: self, logger: logger))
        } else {
            services.append(AdminConfigWriter(control: control, mesh: self, logger: logger))
        }
        // Workloads find the mesh's own programs (examples/edge's thermostat-mapper) beside meshctl.
        let here = String(CommandLine.arguments[0].reversed().drop { $0 != "/" }.reversed().dropLast())
        if !here.isEmpty {
            setenv("PATH", here + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"), 1)
        }
        if self.withAgent, let mqtt = self.mqttListen {
            if AllInOne.mosquittoInstalled {
                logger.info(
                    "device mapper API: the agent starts mosquitto on \(mqtt) (KubeEdge's $hw/events/device/+/twin/... topics)"
                )
            } else {
                logger.notice(
                    "device mapper API off: mosquitto is not installed (apt-get install mosquitto); workloads and twins set from the cloud still work"
                )
            }
        }
        logger.info(
            "all-in-one mesh starting: control API on https://\(self.controlListen), DNS on \(self.dnsListen), agent admin on http://\(self.adminListen), peer links on \(self.linkListen), STUN on \(self.stunListen), relay sessions on \(self.relayListen), data in \(self.dataDir)"
        )
        guard await Daemon.run(services, name: "meshctl up", logger: logger) else { throw AllInOneFailed() }
        logger.info("all-in-one mesh stopped")
    }
}

extension AllInOne {
    /// Once the control plane has its CA: writes the admin meshconfig where meshctl looks by default.
    func writeClientConfig(_ pki: ControlPKI, logger: Logger) throws {
        guard let path = self.clientConfigPath else { return }
        let listen = try ListenAddress(self.controlListen, field: "--listen")
        let server = HTTPSURL.make(host: ControlPKI.clientHost(listen.host), port: listen.port)
        try ClientConfig(server: server, files: pki.admin).write(to: path)
        logger.info("admin credentials for meshctl written to \(path)")
    }

    /// The control plane's PKI once it listens, or nil when it failed to start (ServiceGroup then
    /// stops everything anyway): what the all-in-one's agent, relay and config writer wait for.
    static func started(_ control: ControlServer) async -> ControlPKI? {
        guard (try? await control.localAddress()) != nil else { return nil }
        return try? await control.pki()
    }

    /// A join token for the agent (or, with `relayName`, the relay) whose state is under `stateDir`,
    /// or nil when it has its credentials from an earlier start.
    func tokenUnlessEnrolled(
        _ pki: ControlPKI,
        stateDir: String,
        nodeName: String? = nil,
        relayName: String? = nil
    ) async throws -> BootstrapTokenSecret? {
        let role: JoinRole = relayName == nil ? .node : .relay
        guard !NodeEnrolment.files(stateDir: stateDir, role: role).allExist else { return nil }
        return try await self.makeJoinToken(pki, nodeName: nodeName, relayName: relayName)
    }

    /// A one-use join token for the all-in-one's own agent, made through the API as admin, bound to
    /// the agent's node name (so a wiped agent directory re-joins as the same node).
    /// With `relayName`, a one-use relay token for the all-in-one's relay instead.
    func makeJoinToken(
        _ pki: ControlPKI,
        nodeName: String?,
        relayName: String? = nil
    ) async throws -> BootstrapTokenSecret {
        let listen = try ListenAddress(self.controlListen, field: "--listen")
        let endpoint = HTTPEndpoint(host: ControlPKI.clientHost(listen.host), port: listen.port, tls: true)
        let admin = try pki.admin.load()
        let client = try ControlClient(endpoint: endpoint, credentials: admin)
        let request = BootstrapTokenRequest(
            ttlSeconds: 600,
            usages: 1,
            description: relayName == nil ? "meshctl up: its own agent" : "meshctl up: its own relay",
            nodeName: nodeName,
            relayName: relayName
        )
        let body = try await client.raw(
            .POST,
            "/apis/\(meshAPIVersion)/bootstraptokens",
            body: ByteBuffer(bytes: try MeshJSON.encode(request))
        ).body
        return try JSONDecoder().decode(BootstrapTokenSecret.self, from: Data(body.readableBytesView))
    }
}

/// The all-in-one's agent: starts once the control plane listens (no start-up race), joining with a
/// token of its own on first start; later starts reuse the agent's certificate.
struct EnrolledAgent: ServiceLifecycle.Service {
    let control: ControlServer
    let mesh: AllInOne
    let logger: Logger

    func run() async throws {
        guard let pki = await AllInOne.started(self.control) else { return }
        try self.mesh.writeClientConfig(pki, logger: self.logger)
        var config = self.mesh.agentConfig
        let token = try await self.mesh.tokenUnlessEnrolled(pki, stateDir: config.dataDir, nodeName: config.nodeName)
        if let token {
            config.joinToken = token.token
            config.caCertHash = token.caCertHash
        }
        try await AgentServer(config: config, logger: Logger(label: "mesh-agent")).run()
    }
}

/// The all-in-one's relay: starts once the control plane listens, joining with a relay token of its
/// own on first start; later starts reuse its certificate.
struct EnrolledRelay: ServiceLifecycle.Service {
    let control: ControlServer
    let mesh: AllInOne
    let logger: Logger

    func run() async throws {
        guard let pki = await AllInOne.started(self.control) else { return }
        var config = self.mesh.relayConfig
        if let token = try await self.mesh.tokenUnlessEnrolled(pki, stateDir: config.dataDir, relayName: config.name) {
            config.joinToken = token.token
            config.caCertHash = token.caCertHash
        }
        try await RelayServer(config: config, logger: Logger(label: "mesh-relay")).run()
    }
}

/// Without an agent: only writes the admin meshconfig once the control plane is up.
struct AdminConfigWriter: ServiceLifecycle.Service {
    let control: ControlServer
    let mesh: AllInOne
    let logger: Logger

    func run() async throws {
        guard let pki = await AllInOne.started(self.control) else { return }
        try self.mesh.writeClientConfig(pki, logger: self.logger)
        try? await gracefulShutdown()
    }
}

extension AllInOne {
    /// Whether Debian's mosquitto is installed (in PATH, or in /usr/sbin where Debian puts it).
    public static var mosquittoInstalled: Bool {
        let path = (ProcessInfo.processInfo.environment["PATH"] ?? "") + ":/usr/sbin:/sbin"
        return path.split(separator: ":").contains { access("\($0)/mosquitto", X_OK) == 0 }
    }
}

/// The all-in-one stopped because a component failed (the log says which and why).
public struct AllInOneFailed: Error, CustomStringConvertible {
    public var description: String { "a component of the mesh failed; see the log above" }
}
