import Logging
import MeshCore
import MeshHTTP
import NIOCore
import ServiceLifecycle

/// `mesh-relay` as one `Service`: the STUN server, the admin endpoint (`/metrics`, `/healthz`,
/// `/readyz`) and, with `controlServer` set, its membership (enrolment and its published Relay),
/// started together and stopped together.
public final class RelayServer: ServiceLifecycle.Service, Sendable {
    public let config: RelayConfig
    let logger: Logger
    private let admin = AsyncOnce<HTTPServer>()
    private let stun = AsyncOnce<STUNServer>()
    private let member = AsyncOnce<RelayMembership?>()
    private let sessionServer = AsyncOnce<RelaySessionServer?>()

    public init(config: RelayConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// The STUN sockets once they listen.
    public func stunListeners() async throws -> [STUNListener] { try await self.stun.value().listeners() }

    /// The admin endpoint's address once it listens.
    public func adminAddress() async throws -> SocketAddress { try await self.admin.value().localAddress() }

    /// The session listener (nil: a relay without a control plane serves no sessions).
    public func sessions() async throws -> RelaySessionServer? { try await self.sessionServer.value() }

    /// The membership (nil: a relay without a control plane).
    public func membership() async throws -> RelayMembership? { try await self.member.value() }

    public func run() async throws {
        do {
            try await self.serve()
        } catch {
            self.admin.fail(error)
            self.stun.fail(error)
            self.member.fail(error)
            self.sessionServer.fail(error)
            throw error
        }
    }

    private func serve() async throws {
        let config = self.config
        try config.validate()
        MeshMetrics.bootstrap()
        let adminListen = try ListenAddress(config.adminListen, field: "adminListen")
        let stun = STUNServer(configuration: try config.stunConfiguration(), logger: self.logger)
        self.stun.set(stun)
        let membership = try config.membership().map { RelayMembership(configuration: $0, logger: self.logger) }
        self.member.set(membership)
        // A relay with a control plane serves nothing until it holds its certificate: a refused
        // join stops it here, with the control plane's reason.
        var sessions: RelaySessionServer?
        if let membership {
            let credentials = try await membership.enrol()
            var sessionConfig = RelaySessionConfiguration(
                listen: try ListenAddress(config.listen, field: "listen"),
                relayName: config.name
            )
            // A node homed on another relay is reached through it (its Node's status.relay).
            sessionConfig.locate = { node in await membership.locate(node) }
            let server = try RelaySessionServer(
                configuration: sessionConfig,
                credentials: credentials,
                revoked: membership.revoked,
                logger: self.logger
            )
            membership.reportSessions { server.sessions }
            membership.onRenewal { [logger = self.logger] renewed in
                do {
                    try server.use(renewed)
                } catch {
                    logger.error("relay sessions: cannot use the renewed certificate: \(error)")
                }
            }
            sessions = server
        }
        self.sessionServer.set(sessions)
        var adminConfig = HTTPServerConfiguration()
        adminConfig.host = adminListen.host
        adminConfig.port = adminListen.port
        adminConfig.drainTimeout = .seconds(1)
        let health = HealthEndpoints {
            // Ready once every STUN socket is bound (a failed bind stops the process anyway) and
            // the Relay is published (when it has a control plane).
            if !stun.isListening { return (false, "stun not listening yet") }
            if let m = membership, m.publications == 0 { return (false, "relay not published yet") }
            return (true, membership == nil ? "stun listening" : "stun listening, relay published")
        }
        let admin = HTTPServer(
            configuration: adminConfig,
            responder: ClosureResponder { request in
                health.respond(to: request)
                    ?? .text(.notFound, "no \(request.path) here: try /metrics, /healthz or /readyz")
            },
            logger: self.logger
        )
        self.admin.set(admin)
        self.logger.info("relay: STUN on \(config.stunListen.joined(separator: ", ")), admin on http://\(adminListen)")
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await stun.run() }
            group.addTask { try await admin.run() }
            if let membership { group.addTask { try await membership.run() } }
            if let sessions { group.addTask { try await sessions.run() } }
            do {
                try await group.waitForAll()
            } catch {
                group.cancelAll()
                throw error
            }
        }
        self.logger.info("relay stopped")
    }
}
