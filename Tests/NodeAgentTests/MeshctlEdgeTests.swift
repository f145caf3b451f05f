import Control
import Foundation
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshTestSupport
import NodeAgent
import Testing

import class ServiceLifecycle.ServiceGroup

/// meshctl's edge commands, the real binary against a real control plane and node agent.
@Suite(.serialized, .rationed) struct MeshctlEdgeTests {
    static func meshctl(_ cp: RunningControl, _ args: [String]) async throws -> ProcessResult {
        try await run(
            binaryDirectory() + "/meshctl",
            args,
            environment: [
                "MESHCTL_SERVER": cp.url, "MESHCONFIG": cp.dir.path + "/admin.meshconfig",
                "XDG_CONFIG_HOME": cp.dir.path + "/xdg", "XDG_STATE_HOME": cp.dir.path + "/xdg",
            ]
        )
    }

    @Test func getTwinGetTwinSetAndLogs() async throws {
        let broker = try await Mosquitto()
        let cp = try await RunningControl()
        let node = try RunningNodeAgent(cp, NodeAgentTests.configuration("edge-m1", addresses: ["127.0.0.1"]))
        #expect(await eventually { node.agent.snapshot.heartbeats >= 1 })
        try await cp.client.apply(Thermostat.model)
        try await cp.client.apply(Thermostat.device("thermo-m", node: "edge-m1", target: "21"))
        try await cp.client.apply(
            Workload(
                metadata: ObjectMeta(name: "hello"),
                spec: WorkloadSpec(
                    command: "/bin/sh",
                    args: ["-c", "echo hello from $MESH_NODE_NAME; exec sleep 600"],
                    nodeSelector: WorkloadNodeSelector(matchLabels: ["zone": "z1"])
                )
            )
        )
        let dir = TempDir("edge")
        let edge = try RunningEdge(cp, node: "edge-m1", dataDir: dir.path, broker: broker.address)
        #expect(await eventually { edge.edge.supervisor.snapshot["default/hello"]?.phase == .running })
        #expect(
            try await eventually {
                try await cp.client.get(Workload.self, name: "hello").status?.running == 1
            }
        )

        let workloads = try await Self.meshctl(cp, ["get", "workloads"])
        #expect(workloads.status == 0, "\(workloads.stderr)")
        #expect(workloads.stdout.contains("NAME") && workloads.stdout.contains("RUNNING"))
        let row = try #require(workloads.stdout.split(separator: "\n").first { $0.hasPrefix("hello") })
        #expect(row.contains("/bin/sh") && row.contains("edge-m1") && row.contains("1/1"))
        let models = try await Self.meshctl(cp, ["get", "dm"])
        #expect(models.stdout.contains("temperature:float,target:float,mode:string"), "\(models.stdout)")
        let devices = try await Self.meshctl(cp, ["get", "devices"])
        #expect(devices.stdout.contains("thermo-m") && devices.stdout.contains("0/1"), "\(devices.stdout)")

        // twin get: desired against reported, not converged until the device reports the target.
        var twin = try await Self.meshctl(cp, ["twin", "get", "thermo-m"])
        #expect(twin.status == 0, "\(twin.stderr)")
        #expect(twin.stdout.contains("device default/thermo-m on node edge-m1: not converged"), "\(twin.stdout)")
        let mapper = try await MQTTRecorder(port: broker.port, filters: [])
        try await mapper.publish(
            TwinTopics.prefix + "thermo-m" + TwinTopics.update,
            Thermostat.update("m1", ["target": "21"])
        )
        #expect(
            try await eventually {
                try await cp.client.get(Device.self, name: "thermo-m").twin("target")?.reported == "21"
            }
        )
        twin = try await Self.meshctl(cp, ["twin", "get", "thermo-m", "-o", "json"])
        let view = try JSONValue.parse(json: Data(twin.stdout.utf8))
        #expect(view["converged"] == .bool(true), "\(twin.stdout)")
        // twin set: a good value gets the next desired version; a bad one the model's reason.
        let set = try await Self.meshctl(cp, ["twin", "set", "thermo-m", "target=24.5", "mode=cool"])
        #expect(set.status == 0, "\(set.stderr)")
        #expect(set.stdout.contains("device/thermo-m target=24.5 (desired version 2)"), "\(set.stdout)")
        let bad = try await Self.meshctl(cp, ["twin", "set", "thermo-m", "target=99"])
        #expect(bad.status != 0)
        #expect(bad.stderr.contains("99 is above the maximum 35 °C"), "\(bad.stderr)")
        let missing = try await Self.meshctl(cp, ["twin", "set", "thermo-m", "target"])
        #expect(missing.status != 0 && missing.stderr.contains("is not PROPERTY=VALUE"))
        twin = try await Self.meshctl(cp, ["twin", "get", "thermo-m"])
        #expect(twin.stdout.contains("not converged") && twin.stdout.contains("24.5 (v2)"), "\(twin.stdout)")

        // logs, through an admin API serving the edge part's paths (as mesh-agent's does).
        var config = HTTPServerConfiguration()
        config.host = "127.0.0.1"
        config.port = 0
        let responder = ClosureResponder { request in
            edge.edge.adminResponse(path: request.path, query: request.query) ?? .text(.notFound, "no")
        }
        let server = HTTPServer(configuration: config, responder: responder, logger: Logger(label: "admin"))
        let group = ServiceGroup(
            configuration: .init(services: [.init(service: server)], logger: Logger(label: "admin"))
        )
        let task = Task { try await group.run() }
        let admin = "http://127.0.0.1:\(try await server.localAddress().port!)"
        var logs = ProcessResult(status: -1, stdout: "", stderr: "")
        #expect(
            try await eventually {
                logs = try await Self.meshctl(cp, ["logs", "hello", "--agent", admin])
                return logs.stdout == "hello from edge-m1\n"
            },
            "\(logs)"
        )
        let tail = try await Self.meshctl(cp, ["logs", "hello", "--tail", "0", "--agent", admin])
        #expect(tail.status == 0 && tail.stdout.isEmpty)
        let wrongNode = try await Self.meshctl(cp, ["logs", "hello", "--node", "edge-zz", "--agent", admin])
        #expect(wrongNode.status != 0 && wrongNode.stderr.contains("is node edge-m1, not edge-zz"))
        let unknown = try await Self.meshctl(cp, ["logs", "nope", "--agent", admin])
        #expect(unknown.status != 0 && unknown.stderr.contains("does not run on node edge-m1"))
        await group.triggerGracefulShutdown()
        _ = try? await task.value
        await mapper.stop()
        await edge.stop()
        await node.stop()
        try await cp.stop()
        _ = broker
    }
}
