import Logging
import MeshCore
import MeshHTTP
import NIOCore
import ServiceLifecycle

/// `mesh-relay` as one `Service`: the STUN server and the admin endpoint (`/metrics`, `/healthz`,
/// `/readyz`), started together and stopped together.
public final class RelayServer: ServiceLifecycle.Service, Sendable {
    public let config: RelayConfig
    let logger: Logger
    private let admin = AsyncOnce<HTTPServer>()
    private let stun = AsyncOnce<STUNServer>()

    public init(config: RelayConfig, logger: Logger) {
        self.config = config
        self.logger = logger
    }

    /// The STUN sockets once they listen.
    public func stunListeners() async throws -> [STUNListener] { try await self.stun.value().listeners() }

    /// The admin endpoint's address once it listens.
    public func adminAddress() async throws -> SocketAddress { try await self.admin.value().localAddress() }

    public func run() async throws {
        do {
            try await self.serve()
        } catch {
            self.admin.fail(error)
            self.stun.fail(error)
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
        var adminConfig = HTTPServerConfiguration()
        adminConfig.host = adminListen.host
        adminConfig.port = adminListen.port
        adminConfig.drainTimeout = .seconds(1)
        let health = HealthEndpoints {
            // Ready once every STUN socket is bound (a failed bind stops the process anyway).
            stun.isListening ? (true, "stun listening") : (false, "stun not listening yet")
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
