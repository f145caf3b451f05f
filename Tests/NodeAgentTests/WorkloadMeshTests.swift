import Control
import Foundation
import Logging
import MeshAgent
import MeshClient
import MeshCore
import MeshHTTP
import MeshTestSupport
import NodeAgent
import Testing

import class ServiceLifecycle.ServiceGroup

/// A workload's port reached through the mesh by name: a real agent (DNS + proxy, loopback mode) on
/// one node, the workload on another, a real control plane between them.
@Suite(
    .serialized,
    .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/dig"), "needs dig (dnsutils)"),
    .rationed
)
struct WorkloadMeshTests {
    @Test func aWorkloadIsReachableByNameAndNotRoutedOnceItsNodeIsNotReady() async throws {
        let cidr = "127.\(Int.random(in: 100...250)).\(Int.random(in: 0...255)).0/24"
        let cp = try await RunningControl {
            $0.nodeGracePeriodSeconds = 1
            $0.serviceCIDRs = [cidr]
        }
        // The node that runs the workload: its heartbeats and its edge part.
        let worker = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-worker", addresses: ["127.0.0.1"]))
        #expect(await eventually { worker.agent.snapshot.heartbeats >= 1 })
        let port = freePort()
        let svc = try await cp.client.apply(
            MeshService(
                metadata: ObjectMeta(name: "hello"),
                spec: ServiceSpec(ports: [ServicePort(name: "http", port: 8080)])
            )
        ).object
        let vip = try #require(svc.spec.clusterIP)
        var workload = WorkloadTests.httpWorkload("hello", port: port, node: "edge-worker")
        workload.spec.service = "hello"
        try await cp.client.apply(workload)
        let dir = TempDir("edge")
        let edge = try RunningEdge(cp, node: "edge-worker", dataDir: dir.path)

        // The agent of another node of the same site: DNS and proxy.
        let agentDir = TempDir("agent")
        let token = try await cp.token(usages: 1)
        var config = AgentConfig()
        config.controlServer = cp.url
        config.joinToken = token.token
        config.caCertHash = token.caCertHash
        config.dataDir = agentDir.path
        config.dnsListen = "127.0.0.1:0"
        config.linkListen = "off"
        config.adminListen = "127.0.0.1:0"
        config.nodeName = "edge-proxy"
        config.site = "a"
        config.nodeAddresses = ["127.0.0.1"]
        config.upstreams = ["127.0.0.1:9"]
        config.heartbeatIntervalSeconds = 0.2
        var logger = Logger(label: "agent")
        logger.logLevel = .critical
        let agent = AgentServer(config: config, logger: logger)
        let group = ServiceGroup(configuration: .init(services: [.init(service: agent)], logger: logger))
        let running = Task { try await group.run() }
        let dnsPort = try await agent.dnsAddress().port!
        func dig(_ name: String) async throws -> [String] {
            try await run("/usr/bin/dig", ["+short", "+time=2", "+tries=1", "@127.0.0.1", "-p", "\(dnsPort)", name])
                .stdout.split(separator: "\n").map(String.init)
        }
        func get() async -> String {
            (try? await blocking {
                let s = try RawSocket(host: vip, port: 8080, timeout: 3)
                s.send("GET / HTTP/1.0\r\nHost: hello\r\n\r\n")
                return s.readAll()
            }) ?? ""
        }
        #expect(
            await eventually(timeout: .seconds(15)) { (try? await dig("hello.default.svc.cluster.local")) == [vip] }
        )
        // By name, through the agent's proxy, to the workload's process.
        #expect(await eventually(timeout: .seconds(20)) { await get().contains("200 OK") })
        #expect(edge.edge.supervisor.snapshot["default/hello"]?.phase == .running)

        // The worker's node goes NotReady (its heartbeats stop; the process keeps running): not routed.
        await worker.stop()
        #expect(
            try await eventually(timeout: .seconds(15)) {
                try await cp.client.get(Endpoints.self, name: "hello").spec.addresses.first?.ready == false
            }
        )
        #expect(await eventually(timeout: .seconds(15)) { !(await get().contains("200 OK")) })
        #expect(await WorkloadTests.get(port).contains("200 OK"))  // still running, just not routed

        await group.triggerGracefulShutdown()
        try await running.value
        await edge.stop()
        try await cp.stop()
    }
}
