import Foundation
import MeshClient
import MeshCore
import MeshTestSupport
import NIOCore
import Testing

@testable import Control

/// The workload controller over a real control plane (SQLite), driven by its watch alone: there is no
/// periodic pass, so each change below reaches it as a watch line.
@Suite(.rationed) struct WorkloadControllerTests {
    func register(_ cp: RunningControl, _ name: String, zone: String, ip: String) async throws {
        var meta = ObjectMeta(name: name)
        meta.labels = ["zone": zone]
        try await cp.client.apply(
            Node(
                metadata: meta,
                spec: NodeSpec(site: "site-\(zone)", addresses: [NodeAddress(type: .internalIP, address: ip)])
            )
        )
        _ = try await cp.client.heartbeat(node: name)
    }

    func report(
        _ cp: RunningControl,
        node: String,
        workload: String,
        id: Int64,
        phase: WorkloadInstance.Phase
    ) async throws {
        let batch = NodeReportBatch(
            epoch: "test",
            reports: [
                NodeReport(
                    id: id,
                    workload: WorkloadReport(
                        namespace: "default",
                        name: workload,
                        instance: WorkloadInstance(node: node, phase: phase, restarts: 0)
                    )
                )
            ]
        )
        let body = try await cp.client.raw(
            .POST,
            "/apis/mesh.edge/v1/nodes/\(node)/reports",
            body: ByteBuffer(bytes: try MeshJSON.encode(batch))
        ).body
        #expect(String(buffer: body).contains("\"applied\""))
    }

    func workload(_ name: String, zone: String) -> Workload {
        Workload(
            metadata: ObjectMeta(name: name, namespace: "default"),
            spec: WorkloadSpec(
                command: "/bin/true",
                ports: [WorkloadPort(name: "http", port: 8080)],
                nodeSelector: WorkloadNodeSelector(matchLabels: ["zone": zone])
            )
        )
    }

    func addresses(_ cp: RunningControl, _ name: String) async throws -> [EndpointAddress]? {
        try? await cp.client.get(Endpoints.self, namespace: "default", name: name).spec.addresses
    }

    @Test("assignment follows labels, endpoints follow reports, and a deleted workload's endpoints are emptied")
    func followsTheWatch() async throws {
        let cp = try await RunningControl()
        try await self.register(cp, "a", zone: "x", ip: "198.18.1.1")
        try await self.register(cp, "b", zone: "y", ip: "198.18.1.2")
        try await cp.client.apply(self.workload("web", zone: "x"))
        #expect(try await eventually { try await cp.client.get(Workload.self, name: "web").status?.nodes == ["a"] })
        // No instance reported yet: no endpoint.
        try await self.report(cp, node: "a", workload: "web", id: 1, phase: .running)
        #expect(
            try await eventually {
                try await self.addresses(cp, "web")?.map {
                    "\($0.ip) \($0.node ?? "") \($0.site ?? "") \($0.ready ?? true)"
                }
                    == ["198.18.1.1 a site-x true"]
            }
        )
        #expect(try await cp.client.get(Workload.self, name: "web").status?.running == 1)
        // b takes the label: assigned, and its endpoint comes with its report.
        var b = try await cp.client.get(Node.self, name: "b")
        b.metadata.labels = ["zone": "x"]
        b.metadata.resourceVersion = nil
        try await cp.client.apply(b)
        #expect(
            try await eventually { try await cp.client.get(Workload.self, name: "web").status?.nodes == ["a", "b"] }
        )
        try await self.report(cp, node: "b", workload: "web", id: 1, phase: .failed)
        #expect(
            try await eventually {
                try await self.addresses(cp, "web")?.map { "\($0.node ?? "") \($0.ready ?? true)" } == [
                    "a true", "b false",
                ]
            }
        )
        // Deleted: its endpoints are emptied, not left routing.
        _ = try await cp.client.delete(Workload.self, name: "web")
        #expect(try await eventually { try await self.addresses(cp, "web") == [] })
        try await cp.stop()
    }

    @Test("Endpoints someone else wrote under a workload service's name are left alone")
    func othersEndpointsAreLeftAlone() async throws {
        let cp = try await RunningControl()
        try await self.register(cp, "a", zone: "x", ip: "198.18.1.1")
        let theirs = [EndpointAddress(ip: "198.18.9.9", ports: [EndpointPort(port: 80)])]
        try await cp.client.apply(
            Endpoints(metadata: ObjectMeta(name: "api", namespace: "default"), spec: EndpointsSpec(addresses: theirs))
        )
        try await cp.client.apply(self.workload("api", zone: "x"))
        try await self.report(cp, node: "a", workload: "api", id: 1, phase: .running)
        // The workload is counted Running (its pass ran), and the Endpoints are still theirs.
        #expect(try await eventually { try await cp.client.get(Workload.self, name: "api").status?.running == 1 })
        // A later workload's endpoints are written in a later pass: by then api's pass is long done.
        try await cp.client.apply(self.workload("web", zone: "x"))
        try await self.report(cp, node: "a", workload: "web", id: 2, phase: .running)
        #expect(try await eventually { try await self.addresses(cp, "web")?.count == 1 })
        #expect(try await self.addresses(cp, "api")?.map(\.ip) == ["198.18.9.9"])
        try await cp.stop()
    }
}
