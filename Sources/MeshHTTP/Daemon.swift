import Logging
import ServiceLifecycle

/// How every daemon of the mesh runs: its process prepared (`ProcessResources`: open-files limit,
/// allocator), its services in one `ServiceGroup`, SIGTERM and SIGINT drain them and the process
/// exits 0; a service that fails stops the others and the process exits 1.
public enum Daemon {
    /// Runs `services` until a signal or a failure; false (after logging why) when one failed.
    public static func run(_ services: [any Service], name: String, logger: Logger) async -> Bool {
        ProcessResources.prepare(logger: logger)
        let group = ServiceGroup(
            configuration: .init(
                services: services.map { .init(service: $0) },
                gracefulShutdownSignals: [.sigterm, .sigint],
                logger: logger
            )
        )
        do {
            try await group.run()
            return true
        } catch {
            logger.critical("\(name) failed: \(error)")
            return false
        }
    }
}
