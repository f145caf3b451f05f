import Control
import Foundation
import MeshClient
import MeshCore
import MeshTestSupport
import NodeAgent
import Testing

/// Workloads over a real control plane, real child processes and real SQLite files.
@Suite(.serialized, .rationed) struct WorkloadTests {
    static func httpWorkload(_ name: String, port: Int, node: String) -> Workload {
        Workload(
            metadata: ObjectMeta(name: name),
            spec: WorkloadSpec(
                command: "/usr/bin/python3",
                args: ["-m", "http.server", String(port), "--bind", "127.0.0.1"],
                ports: [WorkloadPort(name: "http", port: port)],
                nodeSelector: WorkloadNodeSelector(nodeNames: [node])
            )
        )
    }

    /// A GET on a blocking socket, on a thread of its own (never one of the cooperative pool's).
    static func get(_ port: Int) async -> String {
        (try? await blocking {
            guard let s = try? RawSocket(port: port, timeout: 2) else { return "" }
            s.send("GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            return s.readAll()
        }) ?? ""
    }

    @Test func assignedStartedKilledRestartedAndItsEndpointFollowsTheNode() async throws {
        let cp = try await RunningControl { $0.nodeGracePeriodSeconds = 1 }
        let node = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-w1", addresses: ["127.0.0.1"]))
        #expect(await eventually { node.agent.snapshot.heartbeats >= 1 })
        // A second node the selector does not match: never assigned.
        let other = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-w2", addresses: ["127.0.0.1"]))
        #expect(await eventually { other.agent.snapshot.heartbeats >= 1 })
        let port = freePort()
        try await cp.client.apply(
            MeshService(
                metadata: ObjectMeta(name: "web"),
                spec: ServiceSpec(ports: [ServicePort(name: "http", port: 80)])
            )
        )
        try await cp.client.apply(Self.httpWorkload("web", port: port, node: "edge-w1"))
        #expect(
            try await eventually {
                try await cp.client.get(Workload.self, name: "web").status?.nodes == ["edge-w1"]
            }
        )
        let dir = TempDir("edge")
        let edge = try RunningEdge(cp, node: "edge-w1", dataDir: dir.path)
        // Started, reachable, and reported to the control plane.
        #expect(await eventually { edge.edge.supervisor.snapshot["default/web"]?.phase == .running })
        let first = try #require(edge.edge.supervisor.snapshot["default/web"]?.pid)
        #expect(await eventually(timeout: .seconds(15)) { await Self.get(port).contains("200 OK") })
        #expect(
            try await eventually {
                // The instance is in the node's status; the workload counts it.
                let n = try await cp.client.get(Node.self, name: "edge-w1")
                let w = try await cp.client.get(Workload.self, name: "web")
                return n.status?.instance(of: "default", "web")?.phase == .running && w.status?.running == 1
            }
        )
        // Its port is an endpoint of the service web, with this node's name, ready.
        #expect(
            await eventually {
                let e = try? await cp.client.get(Endpoints.self, name: "web")
                return e?.spec.addresses
                    == [
                        EndpointAddress(
                            ip: "127.0.0.1",
                            ports: [EndpointPort(name: "http", port: port)],
                            node: "edge-w1",
                            site: "a",
                            ready: true
                        )
                    ]
            }
        )
        // Killed: restarted (another pid, one restart), and that is reported.
        kill(Int32(first), SIGKILL)
        #expect(
            await eventually(timeout: .seconds(15)) {
                let s = edge.edge.supervisor.snapshot["default/web"]
                return s?.phase == .running && s?.restarts == 1 && s?.pid != first
            }
        )
        #expect(await eventually(timeout: .seconds(15)) { await Self.get(port).contains("200 OK") })
        #expect(
            try await eventually {
                let i = try await cp.client.get(Node.self, name: "edge-w1").status?.instance(of: "default", "web")
                let w = try await cp.client.get(Workload.self, name: "web")
                return i?.restarts == 1 && i?.phase == .running && i?.exitCode == 128 + Int(SIGKILL)
                    && w.status?.restarts == 1
            }
        )
        // Its output went to its log file.
        let log = edge.edge.supervisor.logPath(namespace: "default", name: "web")
        #expect(try String(contentsOfFile: log, encoding: .utf8).contains("GET / HTTP/1.0"))
        #expect(try await cp.client.get(Workload.self, name: "web").status?.nodes == ["edge-w1"])

        // The node goes NotReady (its heartbeats stop): the endpoint is not ready any more.
        await node.stop()
        #expect(
            try await eventually(timeout: .seconds(15)) {
                try await cp.client.get(Endpoints.self, name: "web").spec.addresses.first?.ready == false
            }
        )
        // Still assigned: its agent keeps running it while away.
        #expect(try await cp.client.get(Workload.self, name: "web").status?.nodes == ["edge-w1"])
        await edge.stop()
        await other.stop()
        // A graceful stop stops the process group too.
        #expect(
            await eventually { !ChildProcessProbe.alive(Int32(edge.edge.supervisor.snapshot["default/web"]?.pid ?? 0)) }
        )
        try await cp.stop()
    }

    @Test func aNodeRestartedWhileTheCloudIsAwayStartsItsWorkloadsFromItsStore() async throws {
        let cp = try await RunningControl()
        let node = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-w3", addresses: ["127.0.0.1"]))
        #expect(await eventually { node.agent.snapshot.heartbeats >= 1 })
        let port = freePort()
        try await cp.client.apply(Self.httpWorkload("api", port: port, node: "edge-w3"))
        let dir = TempDir("edge")
        let edge = try RunningEdge(cp, node: "edge-w3", dataDir: dir.path)
        #expect(await eventually(timeout: .seconds(15)) { await Self.get(port).contains("200 OK") })
        await edge.stop()
        #expect(await eventually { await !Self.get(port).contains("200 OK") })
        await node.stop()
        try await cp.stop()

        // The control plane is down; the agent starts again from its store alone.
        let again = try RunningEdge(cp, node: "edge-w3", dataDir: dir.path)
        #expect(await eventually(timeout: .seconds(15)) { await Self.get(port).contains("200 OK") })
        #expect(again.edge.supervisor.snapshot["default/api"]?.phase == .running)
        // Its status waits in the outbox for the control plane.
        #expect(await eventually { ((try? again.edge.store.outboxCount()) ?? 0) >= 1 })
        await again.stop()
    }

    @Test func aCommandThatDoesNotExistIsFailedWithTheReason() async throws {
        let cp = try await RunningControl()
        let node = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-w4", addresses: ["127.0.0.1"]))
        #expect(await eventually { node.agent.snapshot.heartbeats >= 1 })
        try await cp.client.apply(
            Workload(
                metadata: ObjectMeta(name: "ghost"),
                spec: WorkloadSpec(
                    command: "/nonexistent/ghost-daemon",
                    nodeSelector: WorkloadNodeSelector(nodeNames: ["edge-w4"])
                )
            )
        )
        let dir = TempDir("edge")
        let edge = try RunningEdge(cp, node: "edge-w4", dataDir: dir.path)
        #expect(
            try await eventually {
                let i = try await cp.client.get(Node.self, name: "edge-w4").status?.instance(of: "default", "ghost")
                return i?.phase == .failed
                    && (i?.message ?? "").contains("command not found: /nonexistent/ghost-daemon")
            }
        )
        // Deleted: its agent drops it and reports it Stopped, which takes it out of the node's status.
        _ = try await cp.client.delete(Workload.self, namespace: "default", name: "ghost")
        #expect(
            try await eventually {
                try await cp.client.get(Node.self, name: "edge-w4").status?.instance(of: "default", "ghost") == nil
            }
        )
        // A workload that is not valid is refused with the field.
        do {
            try await cp.client.apply(Workload(metadata: ObjectMeta(name: "empty"), spec: WorkloadSpec(command: "")))
            Issue.record("an empty command was accepted")
        } catch let s as Status {
            #expect(s.code == 422 && s.message.contains("spec.command"))
        }
        await edge.stop()
        await node.stop()
        try await cp.stop()
    }
}

enum ChildProcessProbe {
    static func alive(_ pid: Int32) -> Bool { pid > 0 && kill(pid, 0) == 0 }
}
