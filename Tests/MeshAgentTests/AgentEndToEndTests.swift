import Foundation
import Logging
import MeshAgent
import MeshClient
import MeshCore
import MeshHTTP
import MeshTestSupport
import NIOCore
import Testing

import class ServiceLifecycle.ServiceGroup

/// A whole agent (cache, sync, DNS, data plane, admin API) in loopback mode, as `meshctl up` runs it.
final class RunningAgent: Sendable {
    let agent: AgentServer
    let group: ServiceGroup
    let task: Task<Void, any Error>
    let dnsPort: Int
    let admin: HTTPClient

    init(
        control: String,
        dataDir: String,
        join: BootstrapTokenSecret? = nil,
        configure: (inout AgentConfig) -> Void = { _ in }
    ) async throws {
        var config = AgentConfig()
        config.controlServer = control
        config.joinToken = join?.token
        config.caCertHash = join?.caCertHash
        config.dataDir = dataDir
        config.dnsListen = "127.0.0.1:0"
        config.linkListen = "127.0.0.1:0"
        config.adminListen = "127.0.0.1:0"
        config.nodeName = "edge-test"
        config.site = "a"
        config.upstreams = ["127.0.0.1:9"]  // never reached by these tests
        configure(&config)
        var logger = Logger(label: "agent")
        logger.logLevel = .critical
        self.agent = AgentServer(config: config, logger: logger)
        self.group = ServiceGroup(configuration: .init(services: [.init(service: self.agent)], logger: logger))
        let group = self.group
        self.task = Task { try await group.run() }
        self.dnsPort = try await self.agent.dnsAddress().port!
        self.admin = HTTPClient(
            endpoint: HTTPEndpoint(host: "127.0.0.1", port: try await self.agent.adminAddress().port!)
        )
    }

    func stop() async throws {
        await self.group.triggerGracefulShutdown()
        try await self.task.value
    }

    /// `dig +short` against the agent's DNS.
    func dig(_ name: String, _ type: String = "A") async throws -> [String] {
        let r = try await run(
            "/usr/bin/dig",
            ["+short", "+time=2", "+tries=1", "@127.0.0.1", "-p", "\(self.dnsPort)", name, type]
        )
        return r.stdout.split(separator: "\n").map(String.init)
    }
}

/// Sends `text` to `host:port` and reads the echo back (blocking socket on its own thread).
func echo(_ host: String, _ port: Int, _ text: String) async throws -> String {
    try await blocking {
        let s = try RawSocket(host: host, port: port, timeout: 5)
        s.send(text)
        s.shutdownWrite()
        return s.readAll()
    }
}

@Suite(
    .serialized,
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/dig"), "needs dig (dnsutils)"),
    .rationed
)
struct AgentEndToEndTests {
    /// A /24 of 127/8 of its own, so agents of parallel tests never bind the same VIP.
    static func privateCIDR() -> String { "127.\(Int.random(in: 100...250)).\(Int.random(in: 0...255)).0/24" }

    func shopService(port: Int) -> MeshService {
        MeshService(
            metadata: ObjectMeta(name: "echo", namespace: "shop"),
            spec: ServiceSpec(ports: [ServicePort(name: "tcp", port: port, protocol: .tcp)])
        )
    }

    func endpoints(_ backendPort: Int) -> Endpoints {
        Endpoints(
            metadata: ObjectMeta(name: "echo", namespace: "shop"),
            spec: EndpointsSpec(addresses: [
                EndpointAddress(
                    ip: "127.0.0.1",
                    ports: [EndpointPort(name: "tcp", port: backendPort)],
                    node: "edge-test",
                    site: "a"
                )
            ])
        )
    }

    @Test func namesResolveAndVIPsProxyOnlineAndOffline() async throws {
        let backend = try await TestServers.echo()
        let controlDir = TempDir()
        let cidr = Self.privateCIDR()
        let cp = try await RunningControl(dir: controlDir) { $0.serviceCIDRs = [cidr] }
        let svc = try await cp.client.apply(self.shopService(port: 7007)).object
        try await cp.client.apply(self.endpoints(backend.port))
        let vip = try #require(svc.spec.clusterIP)

        let agentDir = TempDir()
        var agent = try await RunningAgent(control: cp.url, dataDir: agentDir.path, join: try await cp.token(usages: 1))
        #expect(
            await MeshTestSupport.eventually(timeout: .seconds(10)) {
                (try? await agent.dig("echo.shop.svc.cluster.local")) == [vip]
            }
        )
        #expect(
            try await agent.dig("_tcp._tcp.echo.shop.svc.cluster.local", "SRV") == [
                "0 100 7007 echo.shop.svc.cluster.local."
            ]
        )
        #expect(try await agent.dig("nope.shop.svc.cluster.local").isEmpty)
        #expect(await MeshTestSupport.eventually { (try? await echo(vip, 7007, "hello")) == "hello" })

        // The admin API shows the route, its backend and where the table came from (`control` once every kind
        // the agent watches has synced, which on a busy machine can come after the route itself).
        var text = ""
        #expect(
            await MeshTestSupport.eventually(timeout: .seconds(30)) {
                guard let routes = try? await agent.admin.send(.GET, "/routes") else { return false }
                text = String(buffer: routes.body)
                return text.contains("\"vip\":\"\(vip)\"") && text.contains("\"port\":\(backend.port)")
                    && text.contains("\"source\":\"control\"")
            },
            "\(text)"
        )
        #expect(try await agent.admin.send(.GET, "/readyz").status == .ok)

        // The control plane goes away: the agent keeps resolving and proxying.
        try await cp.stop()
        #expect(try await agent.dig("echo.shop.svc.cluster.local") == [vip])
        #expect(try await echo(vip, 7007, "still here") == "still here")

        // The agent restarts while the control plane is still away: it serves from its cache.
        try await agent.stop()
        agent = try await RunningAgent(control: cp.url, dataDir: agentDir.path)
        #expect(try await agent.dig("echo.shop.svc.cluster.local") == [vip])
        #expect(await MeshTestSupport.eventually { (try? await echo(vip, 7007, "from cache")) == "from cache" })
        let ready = try await agent.admin.send(.GET, "/readyz")
        #expect(ready.status == .ok)
        #expect(String(buffer: ready.body).contains("from the cache"))

        // A deleted service stops resolving and listening once the control plane is back.
        let cp2 = try await RunningControl(dir: controlDir) {
            $0.listen = "127.0.0.1:\(cp.port)"
            $0.serviceCIDRs = [cidr]
        }
        try await cp2.client.delete(MeshService.self, namespace: "shop", name: "echo")
        #expect(
            await MeshTestSupport.eventually(timeout: .seconds(15)) {
                (try? await agent.dig("echo.shop.svc.cluster.local")) == []
            }
        )
        #expect(await MeshTestSupport.eventually { (try? await echo(vip, 7007, "gone")) != "gone" })
        try await agent.stop()
        try await cp2.stop()
        await backend.close()
    }

    @Test(
        "an HTTP service through the agent's data plane on either engine (agent config httpEngine)",
        arguments: HTTPEngine.allCases
    )
    func httpServiceOnEitherEngine(engine: HTTPEngine) async throws {
        let backend = try await TestServers.http("web-1")
        let controlDir = TempDir()
        let cp = try await RunningControl(dir: controlDir) { $0.serviceCIDRs = [Self.privateCIDR()] }
        let svc = try await cp.client.apply(
            MeshService(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: ServiceSpec(ports: [ServicePort(name: "http", port: 8088, protocol: .http)])
            )
        ).object
        try await cp.client.apply(
            Endpoints(
                metadata: ObjectMeta(name: "web", namespace: "shop"),
                spec: EndpointsSpec(addresses: [
                    EndpointAddress(
                        ip: "127.0.0.1",
                        ports: [EndpointPort(name: "http", port: backend.port)],
                        node: "edge-test",
                        site: "a"
                    )
                ])
            )
        )
        let vip = try #require(svc.spec.clusterIP.flatMap { IPAddress($0) })
        let agentDir = TempDir()
        let agent = try await RunningAgent(
            control: cp.url,
            dataDir: agentDir.path,
            join: try await cp.token(usages: 1)
        ) { $0.httpEngine = engine }
        let address = TestClient.vipAddress(vip, 8088)
        #expect(
            await MeshTestSupport.eventually {
                (try? await TestHTTPConnection.get(address, "/"))?.body == "web-1"
            }
        )
        let response = try #require(try await TestHTTPConnection.get(address, "/"))
        #expect(response.status == 200 && response.header("x-seen-xff") == "127.0.0.1")
        let routes = String(buffer: try await agent.admin.send(.GET, "/routes").body)
        #expect(routes.contains("\"vip\":\"\(vip)\""))
        try await agent.stop()
        try await cp.stop()
        await backend.close()
    }

    /// Every kind the agent follows (the table's four, the edge's three) over one watch, and its heartbeats and
    /// reports on the same kept-alive connection: one connection for the control plane to hold per node.
    @Test func anAgentHoldsOneConnectionToTheControlPlaneAndFollowsNoNode() async throws {
        let cp = try await RunningControl()
        // The control plane's own controllers watch too (workloads, endpoint sites).
        #expect(await MeshTestSupport.eventually { cp.server.watcherCount(of: "nodes") == 2 })
        let ownWatchers = cp.server.watcherCount
        let agent = try await RunningAgent(
            control: cp.url,
            dataDir: TempDir().path,
            join: try await cp.token(usages: 1)
        ) { $0.heartbeatIntervalSeconds = 1 }
        // Synced (every kind listed) and beating.
        #expect(
            await MeshTestSupport.eventually {
                let routes = try? await agent.admin.send(.GET, "/routes")
                let node = try? await cp.client.get(Node.self, name: "edge-test")
                return routes.map { String(buffer: $0.body).contains("\"source\":\"control\"") } == true
                    && node?.status?.lastHeartbeatTime != nil
            }
        )
        #expect(await MeshTestSupport.eventually { cp.server.watcherCount == ownWatchers + 1 })
        // Its one watch is not told of Node changes (N agents x N nodes' changes): endpoints carry sites.
        #expect(cp.server.watcherCount(of: "nodes") == 2)
        // Endpoints: the agent's, and the two controllers' (which follow Nodes and Endpoints).
        #expect(cp.server.watcherCount(of: "endpoints") == 3)
        // Its devices and workloads are its own (`?node=`): other nodes' twin and instance reports never reach it.
        #expect(cp.server.watcherCount(of: "devices", node: "edge-test") == 1)
        #expect(cp.server.watcherCount(of: "workloads", node: "edge-test") == 1)
        #expect(cp.server.watcherCount(of: "devices") == 1)
        // One connection carries its watch and its beats (every second here): each beat ends the watch for a
        // moment and the watch resumes on the same connection. (The test's own requests use a connection each,
        // closed when answered.)
        #expect(
            await MeshTestSupport.eventually { establishedTCPConnections(toPort: cp.port) == 1 },
            "\(establishedTCPConnections(toPort: cp.port)) connections to the control plane"
        )
        let beat = try await cp.client.get(Node.self, name: "edge-test").status?.lastHeartbeatTime
        #expect(
            await MeshTestSupport.eventually {
                let now = try? await cp.client.get(Node.self, name: "edge-test").status?.lastHeartbeatTime
                return now != nil && now != beat
            }
        )
        #expect(establishedTCPConnections(toPort: cp.port) == 1)
        #expect(await MeshTestSupport.eventually { cp.server.watcherCount == ownWatchers + 1 })
        try await agent.stop()
        try await cp.stop()
    }

    @Test func aSecondAgentOnTheSameDataDirectoryIsRefused() async throws {
        let dir = TempDir()
        try seedNodeCredentials(stateDir: dir.path, nodeName: "edge-test")
        let agent = try await RunningAgent(control: "https://127.0.0.1:9", dataDir: dir.path)
        await #expect(throws: (any Error).self) {
            _ = try await RunningAgent(control: "https://127.0.0.1:9", dataDir: dir.path)
        }
        try await agent.stop()
    }
}
