import Control
import Foundation
import Logging
import MeshAgent
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NodeAgent
import Testing

import class ServiceLifecycle.ServiceGroup

/// A node agent on its own, with the node's certificate, run until `stop`.
final class RunningNodeAgent: Sendable {
    let agent: NodeAgent
    let task: Task<Void, Never>

    init(_ cp: RunningControl, _ configuration: NodeAgentConfiguration, logger: Logger? = nil) throws {
        let client = try cp.client(try cp.issue(.node(configuration.nodeName)))
        var quiet = Logger(label: "node-agent")
        quiet.logLevel = .critical
        let agent = NodeAgent(configuration: configuration, client: client, logger: logger ?? quiet)
        self.agent = agent
        self.task = Task { await agent.run() }
    }

    func stop() async {
        self.task.cancel()
        await self.task.value
    }
}

@Suite(.rationed) struct NodeAgentTests {
    static func configuration(
        _ name: String,
        addresses: [String]? = nil,
        clock: any MeshClock = .system
    ) -> NodeAgentConfiguration {
        var c = NodeAgentConfiguration(nodeName: name, site: "a")
        c.clock = clock
        c.labels = ["zone": "z1"]
        c.addresses = addresses
        c.heartbeatInterval = .milliseconds(200)
        c.initialBackoff = .milliseconds(50)
        return c
    }

    @Test func registersWithTheHostsAddressesAndBeatsKeepItReady() async throws {
        // The control plane's grace and the agent's beats on one clock the test moves: a beat every
        // 200 ms (±10%), a grace of 1 s, the lifecycle looking every 250 ms.
        let clock = ManualClock()
        let cp = try await RunningControl(clock: clock) { $0.nodeGracePeriodSeconds = 1 }
        let agent = try RunningNodeAgent(cp, Self.configuration("edge-1", clock: clock))
        // Both loops wait on the clock: the lifecycle's, and the agent's after its first beat.
        #expect(await clock.waitForSleepers(2))
        #expect(agent.agent.snapshot.heartbeats == 1)
        await clock.advance(by: .milliseconds(250))
        #expect(agent.agent.snapshot.heartbeats == 2)
        let node = try await cp.client.get(Node.self, name: "edge-1")
        #expect(node.status?.phase == .ready)
        #expect(node.metadata.labels == ["zone": "z1"] && node.spec.site == "a")
        // The host's addresses: up, not loopback, not link-local.
        let host = HostAddresses.current()
        #expect(node.spec.addresses ?? [] == host)
        for a in host {
            let ip = try #require(IPAddress(a.address))
            #expect(!ip.isLoopback && !a.address.hasPrefix("fe80:") && !a.address.hasPrefix("169.254."))
        }
        // Beats for three times the grace: Ready all along, nothing written, no watch event.
        let rv = try await cp.rv()
        let watch = NodeWatch(cp.client, after: rv)
        await clock.advance(by: .seconds(3), in: .milliseconds(250))
        #expect(agent.agent.snapshot.heartbeats == 14)
        #expect(try await cp.client.get(Node.self, name: "edge-1").status?.phase == .ready)
        #expect(try await cp.rv() == rv)
        #expect(watch.changes.isEmpty)
        #expect(agent.agent.snapshot.failures == 0)

        // The node agent stops: still Ready within the grace, NotReady past it.
        await agent.stop()
        await clock.advance(by: .milliseconds(750), in: .milliseconds(250))
        #expect(try await cp.client.get(Node.self, name: "edge-1").status?.phase == .ready)
        await clock.advance(by: .milliseconds(500), in: .milliseconds(250))
        #expect(try await cp.client.get(Node.self, name: "edge-1").status?.phase == .notReady)
        #expect(await eventually { watch.changes.count == 1 })
        #expect(watch.changes.map(\.type) == ["MODIFIED"])
        // It starts again: Ready, announced by one MODIFIED event.
        let again = try RunningNodeAgent(cp, Self.configuration("edge-1", clock: clock))
        #expect(
            try await eventually {
                try await cp.client.get(Node.self, name: "edge-1").status?.phase == .ready
            }
        )
        #expect(await eventually { watch.changes.count == 2 })
        #expect(watch.changes.last?.type == "MODIFIED" && watch.changes.last?.phase == .ready)
        await again.stop()
        watch.stop()
        try await cp.stop()
    }

    @Test func specFollowsTheConfigurationAndKeepsOthersLabels() async throws {
        let cp = try await RunningControl()
        let first = try RunningNodeAgent(cp, Self.configuration("edge-2", addresses: ["198.18.0.7", "127.0.0.1"]))
        #expect(await eventually { first.agent.snapshot.heartbeats >= 1 })
        var node = try await cp.client.get(Node.self, name: "edge-2")
        #expect(
            node.spec.addresses == [
                NodeAddress(type: .internalIP, address: "127.0.0.1"),
                NodeAddress(type: .externalIP, address: "198.18.0.7"),
            ]
        )
        await first.stop()
        // An operator labels the node; then the agent comes back with other addresses and labels.
        node.metadata.labels?["owner"] = "ops"
        try await cp.client.apply(node)
        var changed = Self.configuration("edge-2", addresses: ["::1", "10.1.2.3"])
        changed.labels = ["zone": "z2", "tier": "edge"]
        changed.site = "b"
        let second = try RunningNodeAgent(cp, changed)
        #expect(await eventually { second.agent.snapshot.heartbeats >= 1 })
        node = try await cp.client.get(Node.self, name: "edge-2")
        #expect(node.metadata.labels == ["zone": "z2", "tier": "edge", "owner": "ops"])
        #expect(node.spec.site == "b")
        #expect(node.spec.addresses?.map(\.address) == ["10.1.2.3", "::1"])
        // Deleted while the agent runs: it registers again.
        try await cp.client.delete(Node.self, name: "edge-2")
        #expect(
            await eventually {
                (try? await cp.client.get(Node.self, name: "edge-2"))?.status?.phase == .ready
            }
        )
        await second.stop()
        try await cp.stop()
    }

    @Test func withTheControlPlaneDownTheAgentServesAndWarnsOnceThenRecovers() async throws {
        let controlDir = TempDir()
        let cp = try await RunningControl(dir: controlDir)
        let port = cp.port
        let logs = LogRecorder()
        var config = AgentConfig()
        config.controlServer = cp.url
        let token = try await cp.token(usages: 1)
        config.joinToken = token.token
        config.caCertHash = token.caCertHash
        let agentDir = TempDir()
        config.dataDir = agentDir.path
        config.dnsListen = "127.0.0.1:0"
        config.linkListen = "127.0.0.1:0"
        config.adminListen = "127.0.0.1:0"
        config.nodeName = "edge-3"
        config.nodeAddresses = ["127.0.0.1"]
        config.upstreams = ["127.0.0.1:9"]
        config.heartbeatIntervalSeconds = 0.1
        let server = AgentServer(config: config, logger: logs.logger("agent", level: .info))
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: server)], logger: logs.logger("group", level: .error))
        )
        let running = Task { try await group.run() }
        let admin = HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: try await server.adminAddress().port!))
        let nodeAgent = try await server.node()
        #expect(await eventually { nodeAgent.snapshot.heartbeats >= 2 })
        #expect(try await cp.client.get(Node.self, name: "edge-3").status?.phase == .ready)
        #expect(try await cp.client.get(Node.self, name: "edge-3").spec.addresses?.map(\.address) == ["127.0.0.1"])

        // The control plane goes away for a while: many failed attempts, one warning, and the
        // agent keeps answering.
        try await cp.stop()
        #expect(await eventually { nodeAgent.snapshot.failures >= 5 })
        #expect((try await admin.send(.GET, "/healthz")).status == .ok)
        #expect((try await admin.send(.GET, "/routes")).status == .ok)
        #expect(logs.messages(.warning, containing: "node agent").count == 1, "\(logs.all.map(\.message))")

        // Back on the same port and files: the node agent recovers by itself and says so once.
        let cp2 = try await RunningControl(dir: controlDir) { $0.listen = "127.0.0.1:\(port)" }
        #expect(await eventually { nodeAgent.snapshot.failures == 0 })
        #expect(try await cp2.client.get(Node.self, name: "edge-3").status?.phase == .ready)
        #expect(logs.messages(.notice, containing: "reachable again").count == 1)
        #expect(logs.messages(.warning, containing: "node agent").count == 1)
        await group.triggerGracefulShutdown()
        try await running.value
        try await cp2.stop()
    }
}
