import Foundation
import Logging
import MeshAgent
import MeshClient
import MeshCore
import MeshTestSupport
import Synchronization
import Testing

import class ServiceLifecycle.ServiceGroup

/// Collects the snapshots a sync publishes.
final class SnapshotLog: Sendable {
    let all = Mutex<[ServiceSnapshot]>([])
    var last: ServiceSnapshot? { self.all.withLock { $0.last } }
    func add(_ s: ServiceSnapshot) { self.all.withLock { $0.append(s) } }
}

func mkService(_ name: String, ns: String = "shop") -> MeshService {
    MeshService(
        metadata: ObjectMeta(name: name, namespace: ns),
        spec: ServiceSpec(ports: [ServicePort(name: "http", port: 80, protocol: .http)])
    )
}

func mkEndpoints(_ name: String, ns: String = "shop", ips: [String]) -> Endpoints {
    Endpoints(
        metadata: ObjectMeta(name: name, namespace: ns),
        spec: EndpointsSpec(
            addresses: ips.map { EndpointAddress(ip: $0, ports: [EndpointPort(name: "http", port: 8080)]) }
        )
    )
}

/// A running sync against `client`, caching in `dir`.
final class RunningSync: Sendable {
    let sync: ServiceTableSync
    let log = SnapshotLog()
    /// Warnings and worse of the sync (a reflector's first failure is a warning).
    let logs = LogRecorder()
    let group: ServiceGroup
    let task: Task<Void, any Error>

    init(client: ControlClient, dir: TempDir) async throws {
        let logger = self.logs.logger("sync", level: .warning)
        var config = ServiceTableSync.Configuration()
        config.backoff.initial = .milliseconds(20)
        config.backoff.maximum = .milliseconds(200)
        let log = self.log
        self.sync = ServiceTableSync(
            client: client,
            cache: try AgentCache(path: dir.path + "/agent.db"),
            configuration: config,
            logger: logger
        ) { log.add($0) }
        _ = try await self.sync.loadCache()
        self.group = ServiceGroup(configuration: .init(services: [.init(service: self.sync)], logger: logger))
        let group = self.group
        self.task = Task { try await group.run() }
    }

    func stop() async throws {
        await self.group.triggerGracefulShutdown()
        try await self.task.value
    }
}

@Suite(.rationed) struct ServiceTableTests {
    @Test func followsTheControlPlaneAndPersists() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(mkService("web"))
        try await cp.client.apply(mkEndpoints("web", ips: ["198.18.1.1"]))
        let cacheDir = TempDir()
        let running = try await RunningSync(client: cp.client, dir: cacheDir)
        #expect(await eventually { running.log.last?.source == .control && running.log.last?.endpoints.count == 1 })
        #expect(running.log.last?.services[ServiceKey(namespace: "shop", name: "web")]?.spec.vip != nil)

        try await cp.client.apply(mkEndpoints("web", ips: ["198.18.1.1", "198.18.1.2"]))
        try await cp.client.apply(mkService("api"))
        #expect(
            await eventually {
                running.log.last?.endpoints[ServiceKey(namespace: "shop", name: "web")]?.count == 2
                    && running.log.last?.services.count == 2
            }
        )
        try await cp.client.delete(MeshService.self, namespace: "shop", name: "api")
        #expect(await eventually { running.log.last?.services.count == 1 })
        try await running.stop()

        // The cache holds the same table and the versions to resume from.
        let cache = try AgentCache(path: cacheDir.path + "/agent.db")
        let (services, svcRV) = try cache.load(MeshService.self)
        let (endpoints, epRV) = try cache.load(Endpoints.self)
        #expect(services.map(\.metadata.name) == ["web"])
        #expect(endpoints.first?.spec.addresses.count == 2)
        #expect(svcRV == (try await cp.rv()))
        #expect(epRV != nil)
        try await cp.stop()
    }

    @Test func servesFromTheCacheWhileTheControlPlaneIsDownThenCatchesUp() async throws {
        let controlDir = TempDir()
        var cp = try await RunningControl(dir: controlDir)
        try await cp.client.apply(mkService("web"))
        try await cp.client.apply(mkEndpoints("web", ips: ["198.18.1.1"]))
        let cacheDir = TempDir()
        var running = try await RunningSync(client: cp.client, dir: cacheDir)
        #expect(await eventually { running.log.last?.source == .control && running.log.last?.endpoints.count == 1 })
        try await running.stop()
        let port = cp.port
        try await cp.stop()

        // Agent restarts with the control plane gone: the cache answers at once.
        running = try await RunningSync(client: cp.client, dir: cacheDir)
        let first = try #require(running.log.all.withLock { $0.first })
        #expect(first.source == .cache)
        #expect(first.services.keys.map(\.name) == ["web"])
        #expect(first.endpoints.values.first?.addresses.map(\.ip) == ["198.18.1.1"])
        // The one reflector of the three kinds (one watch) tried the control plane and failed (a first failure
        // is a warning, later ones debug while it backs off): the table still serves the cache.
        #expect(
            await eventually {
                running.logs.messages(.warning, containing: "services,endpoints,relays: ").contains {
                    $0.contains("retrying in")
                }
            }
        )
        #expect(running.log.last?.source == .cache)

        // The control plane comes back (same port) with a change: the agent resumes and catches up.
        cp = try await RunningControl(dir: controlDir) { $0.listen = "127.0.0.1:\(port)" }
        try await cp.client.apply(mkEndpoints("web", ips: ["198.18.1.9"]))
        #expect(
            await eventually(timeout: .seconds(15)) {
                running.log.last?.source == .control
                    && running.log.last?.endpoints.values.first?.addresses.map(\.ip) == ["198.18.1.9"]
            }
        )
        try await running.stop()
        try await cp.stop()
    }

    @Test func aVersionTooOldToResumeListsAgain() async throws {
        let controlDir = TempDir()
        var cp = try await RunningControl(dir: controlDir) { $0.historyLimit = 3 }
        try await cp.client.apply(mkService("web"))
        let cacheDir = TempDir()
        var running = try await RunningSync(client: cp.client, dir: cacheDir)
        #expect(
            await eventually { running.log.last?.source == .control && running.log.last?.services.count == 1 },
            "\(running.log.all.withLock { $0.map { "\($0.source) \($0.services.count) \($0.servicesVersion ?? -1)/\($0.endpointsVersion ?? -1)" } })"
        )
        try await running.stop()
        // While the agent is away, more changes than the history keeps.
        for i in 0..<10 { try await cp.client.apply(mkService("s\(i)")) }
        try await cp.client.delete(MeshService.self, namespace: "shop", name: "web")
        running = try await RunningSync(client: cp.client, dir: cacheDir)
        #expect(
            await eventually {
                running.log.last?.services.count == 10
                    && running.log.last?.services[ServiceKey(namespace: "shop", name: "web")] == nil
            },
            "\(running.log.all.withLock { $0.map { "\($0.source) \($0.services.count) \($0.servicesVersion ?? -1)/\($0.endpointsVersion ?? -1)" } })"
        )
        try await running.stop()
        try await cp.stop()
        _ = controlDir
        cp = try await RunningControl()
        try await cp.stop()
    }
}

/// How Services and Endpoints become proxy routes.
@Suite(.rationed) struct MappingTests {
    @Test func aServiceUpgradePolicyReachesItsRoutes() throws {
        var snapshot = ServiceSnapshot()
        let key = ServiceKey(namespace: "shop", name: "web")
        var spec = ServiceSpec(ports: [ServicePort(port: 80, protocol: .http)], clusterIP: "127.77.0.9")
        spec.upgradeProtocols = ["WebSocket", "h2c"]
        snapshot.services[key] = TableService(
            MeshService(metadata: ObjectMeta(name: "web", namespace: "shop"), spec: spec)
        )
        let other = ServiceKey(namespace: "shop", name: "api")
        snapshot.services[other] = TableService(
            MeshService(
                metadata: ObjectMeta(name: "api", namespace: "shop"),
                spec: ServiceSpec(ports: [ServicePort(port: 80, protocol: .http)], clusterIP: "127.77.0.10")
            )
        )
        let routes = AgentMapping.routeTable(snapshot, localSite: nil).routes
        #expect(routes.first { $0.service == key }?.upgradeProtocols == ["websocket", "h2c"])
        // No policy of its own: the data plane's default applies.
        #expect(routes.first { $0.service == other }?.upgradeProtocols == nil)
    }
}
