import Control
import Logging
import MeshClient
import MeshCore
import MeshHTTP

import class ServiceLifecycle.ServiceGroup

let quietLogger: Logger = {
    var l = Logger(label: "test")
    l.logLevel = .warning
    return l
}()

/// A control plane on a free loopback port with its own data directory, for one test.
public final class RunningControl: Sendable {
    public let dir: TempDir
    public let server: ControlServer
    public let group: ServiceGroup
    public let task: Task<Void, any Error>
    public let client: ControlClient
    public let port: Int

    public init(dir: TempDir = TempDir(), configure: (inout ControlConfig) -> Void = { _ in }) async throws {
        var config = ControlConfig()
        config.listen = "127.0.0.1:0"
        config.dataDir = dir.path
        config.durability = .normal
        configure(&config)
        let server = ControlServer(config: config, logger: quietLogger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: server)], logger: quietLogger))
        self.dir = dir
        self.server = server
        self.group = group
        self.task = Task { try await group.run() }
        let address = try await server.localAddress()
        self.port = address.port!
        self.client = ControlClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: self.port))
    }

    public func stop() async throws {
        await self.group.triggerGracefulShutdown()
        try await self.task.value
    }

    public func rv() async throws -> Int64 {
        Int64(try await self.client.list(Service.self).metadata.resourceVersion)!
    }
}
