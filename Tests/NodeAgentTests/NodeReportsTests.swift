import Control
import Foundation
import MeshClient
import MeshCore
import MeshTestSupport
import NIOCore
import Testing

/// The control plane's side of the outbox: each message applied at most once, bad ones refused with
/// the reason, all through the real API and store.
@Suite(.rationed) struct NodeReportsTests {
    static func post(_ client: ControlClient, node: String, _ batch: NodeReportBatch) async throws -> [NodeReportResult]
    {
        let body = try await client.raw(
            .POST,
            "/apis/mesh.edge/v1/nodes/\(node)/reports",
            body: ByteBuffer(bytes: try MeshJSON.encode(batch))
        ).body
        return try JSONDecoder().decode(NodeReportResults.self, from: Data(body.readableBytesView)).results
    }

    static func twin(_ device: String, _ property: String, _ value: String, _ version: Int64) -> TwinReport {
        TwinReport(namespace: "default", device: device, property: property, value: value, version: version, time: nil)
    }

    /// A workload on every node: each node's report writes its own Node (`status.workloads`), never the
    /// workload (which would be one object rewritten by every node, past etcd's value limit at ~10,000 nodes);
    /// the workload gets the counts, once per controller pass.
    @Test func workloadInstancesAreKeptInEachNodesOwnStatus() async throws {
        // Node grace on a clock that only the test moves (it does not): each node beats once, and the check that
        // a report leaves its node Ready must not race the 60 s grace on a loaded machine (it lost once, in a
        // whole-suite run beside two busy loops).
        let cp = try await RunningControl(clock: ManualClock())
        try await cp.client.apply(
            Workload(metadata: ObjectMeta(name: "everywhere"), spec: WorkloadSpec(command: "/bin/sleep"))
        )
        let names = (1...12).map { "edge-many-\($0)" }
        for n in names {
            try await cp.client.apply(Node(metadata: ObjectMeta(name: n), spec: NodeSpec()))
            _ = try await cp.client.heartbeat(node: n)
        }
        #expect(
            try await eventually {
                try await cp.client.get(Workload.self, name: "everywhere").status?.nodes == names.sorted()
            }
        )
        let results = try await withThrowingTaskGroup(of: [NodeReportResult].self) { group in
            for n in names {
                group.addTask {
                    let report = WorkloadReport(
                        namespace: "default",
                        name: "everywhere",
                        instance: WorkloadInstance(node: n, phase: .running, pid: 7, restarts: 1)
                    )
                    return try await Self.post(
                        cp.client,
                        node: n,
                        NodeReportBatch(epoch: "e-\(n)", reports: [NodeReport(id: 1, workload: report)])
                    )
                }
            }
            return try await group.reduce(into: []) { $0 += $1 }
        }
        #expect(results.map(\.result) == Array(repeating: .applied, count: names.count))
        for n in names {
            let node = try await cp.client.get(Node.self, name: n)
            #expect(node.status?.instance(of: "default", "everywhere")?.pid == 7)
            #expect(node.status?.phase == .ready)
        }
        #expect(
            try await eventually {
                let s = try await cp.client.get(Workload.self, name: "everywhere").status
                return s?.running == names.count && s?.restarts == names.count
            }
        )
        /// One workload report posted for `node` (as the admin may), its result.
        func report(
            _ name: String,
            on node: String,
            _ phase: WorkloadInstance.Phase,
            id: Int64
        ) async throws
            -> NodeReportResult?
        {
            let r = WorkloadReport(
                namespace: "default",
                name: name,
                instance: WorkloadInstance(node: node, phase: phase)
            )
            let batch = NodeReportBatch(epoch: "e-\(node)", reports: [NodeReport(id: id, workload: r)])
            return try await Self.post(cp.client, node: node, batch).first
        }
        // Stopped (its node no longer runs it): the entry goes, and the workload counts one fewer.
        #expect(try await report("everywhere", on: names[0], .stopped, id: 2)?.result == .applied)
        #expect(try await cp.client.get(Node.self, name: names[0]).status?.workloads == nil)
        #expect(
            try await eventually {
                try await cp.client.get(Workload.self, name: "everywhere").status?.running == names.count - 1
            }
        )
        // Unknown workload, unregistered node: refused with the reason, nothing written.
        let refused = try await report("ghost", on: names[0], .running, id: 3)
        #expect(refused?.message == "unknown workload default/ghost")
        let unregistered = try await report("everywhere", on: "edge-nowhere", .running, id: 1)
        #expect(unregistered?.message == "node edge-nowhere is not registered")
        try await cp.stop()
    }

    @Test func aBatchSentTwiceIsAppliedOnceAndBadReportsAreRefusedWithTheReason() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(Thermostat.model)
        try await cp.client.apply(Thermostat.device("t1", node: "edge-r1"))
        try await cp.client.apply(Thermostat.device("t2", node: "edge-other"))
        let node = try cp.client(try cp.issue(.node("edge-r1")))
        let batch = NodeReportBatch(
            epoch: "e1",
            reports: [
                NodeReport(id: 1, twin: Self.twin("t1", "temperature", "20.0", 1)),
                NodeReport(id: 2, twin: Self.twin("t1", "temperature", "20.5", 2)),
                NodeReport(id: 3, twin: Self.twin("t1", "temperature", "900", 3)),
                NodeReport(id: 4, twin: Self.twin("ghost", "temperature", "1", 1)),
                NodeReport(id: 5, twin: Self.twin("t2", "temperature", "1", 1)),
                NodeReport(id: 6, twin: Self.twin("t1", "color", "red", 1)),
            ]
        )
        let first = try await Self.post(node, node: "edge-r1", batch)
        #expect(first.map(\.result) == [.applied, .applied, .rejected, .rejected, .rejected, .rejected])
        #expect(first[2].message == "temperature: 900 is above the maximum 125 °C")
        #expect(first[3].message == "unknown device default/ghost")
        #expect(first[4].message == "device t2 belongs to node edge-other, not edge-r1")
        #expect(first[5].message?.contains("no property \"color\"") == true)
        let rv = try await cp.rv()
        // The answer was lost; the node sends the same batch again: nothing is applied twice.
        let again = try await Self.post(node, node: "edge-r1", batch)
        #expect(again.prefix(2).map(\.result) == [.duplicate, .duplicate])
        #expect(try await cp.rv() == rv)
        let d = try await cp.client.get(Device.self, name: "t1")
        #expect(d.twin("temperature")?.reported == "20.5" && d.twin("temperature")?.reportedVersion == 2)
        #expect(d.status?.lastReport == ReportMark(node: "edge-r1", epoch: "e1", id: 2))
        // A node reports only for itself.
        await #expect(throws: Status.self) { _ = try await Self.post(node, node: "edge-other", batch) }
        // A malformed batch is a 400 naming the problem.
        do {
            _ = try await node.raw(
                .POST,
                "/apis/mesh.edge/v1/nodes/edge-r1/reports",
                body: ByteBuffer(string: "{\"epoch\":\"e\",\"reports\":[{\"id\":\"x\"}]}")
            )
            Issue.record("a malformed batch was accepted")
        } catch let s as Status {
            #expect(s.code == 400)
        }
        try await cp.stop()
    }
}
