import Logging
import MeshCore
import MeshHTTP
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Applies a node's outbox batches (`POST /apis/mesh.edge/v1/nodes/NAME/reports`) exactly once.
///
/// The node sends its messages in id order and again until each is answered; ids grow within an
/// epoch (one edge store). A twin report is applied to its Device in the same conditional write that
/// records `status.lastReport` (node, epoch, id), so a message sent again after a lost answer finds
/// its id already there and is answered `duplicate` without a write. A report whose value breaks the
/// model, or that names an unknown device or a device of another node, is answered `rejected` with
/// the reason (and the node keeps the reason in its store): nothing is written for it.
struct NodeReports: Sendable {
    let writer: ObjectWriter
    let logger: Logger

    func apply(node: String, batch: NodeReportBatch) async throws -> NodeReportResults {
        guard batch.reports.count <= NodeReportBatch.maxReports else {
            throw Status.badRequest("a batch holds at most \(NodeReportBatch.maxReports) reports")
        }
        guard !batch.epoch.isEmpty, batch.epoch.utf8.count <= 64 else {
            throw Status.badRequest("epoch: must be 1-64 bytes")
        }
        var models: [String: DeviceModel] = [:]
        var results: [NodeReportResult] = []
        results.reserveCapacity(batch.reports.count)
        for report in batch.reports {
            if let twin = report.twin {
                results.append(try await self.applyTwin(twin, id: report.id, node: node, epoch: batch.epoch, &models))
            } else if let w = report.workload {
                results.append(try await self.applyWorkload(w, id: report.id, node: node))
            } else {
                results.append(NodeReportResult(id: report.id, result: .rejected, message: "neither twin nor workload"))
            }
        }
        return NodeReportResults(results: results)
    }

    private func model(
        _ namespace: String,
        _ name: String,
        _ cache: inout [String: DeviceModel]
    ) async throws
        -> DeviceModel?
    {
        if let m = cache["\(namespace)/\(name)"] { return m }
        let key = ObjectKey(resource: DeviceModel.resource.plural, namespace: namespace, name: name)
        guard let stored = try await self.writer.store.get(key) else { return nil }
        let m = try stored.decode(DeviceModel.self)
        cache["\(namespace)/\(name)"] = m
        return m
    }

    private func applyTwin(
        _ twin: TwinReport,
        id: Int64,
        node: String,
        epoch: String,
        _ models: inout [String: DeviceModel]
    ) async throws -> NodeReportResult {
        let mark = ReportMark(node: node, epoch: epoch, id: id)
        let key = ObjectKey(resource: Device.resource.plural, namespace: twin.namespace, name: twin.device)
        for _ in 0..<32 {
            guard let stored = try await self.writer.store.get(key) else {
                return NodeReportResult(
                    id: id,
                    result: .rejected,
                    message: "unknown device \(twin.namespace)/\(twin.device)"
                )
            }
            var device = try stored.decode(Device.self)
            if let last = device.status?.lastReport, last.node == node, last.epoch == epoch, last.id >= id {
                return NodeReportResult(id: id, result: .duplicate)
            }
            guard device.spec.node == node else {
                return NodeReportResult(
                    id: id,
                    result: .rejected,
                    message: "device \(twin.device) belongs to node \(device.spec.node), not \(node)"
                )
            }
            guard let model = try await self.model(twin.namespace, device.spec.model, &models) else {
                return NodeReportResult(id: id, result: .rejected, message: "no model \(device.spec.model)")
            }
            guard let property = model.property(twin.property) else {
                return NodeReportResult(
                    id: id,
                    result: .rejected,
                    message: "model \(model.metadata.name) has no property \"\(twin.property)\""
                )
            }
            if let e = property.error(twin.value) {
                return NodeReportResult(id: id, result: .rejected, message: "\(twin.property): \(e)")
            }
            var status = device.status ?? DeviceStatus()
            var twins = status.twins ?? []
            let i =
                twins.firstIndex { $0.name == twin.property }
                ?? {
                    twins.append(DeviceTwinStatus(name: twin.property))
                    return twins.count - 1
                }()
            if let v = twins[i].reportedVersion, v >= twin.version, last(status, node) {
                // An older version than the one held (from this node): the edge owns reported, and its
                // versions only grow; record the id so it is not looked at again.
                status.lastReport = mark
            } else {
                twins[i].reported = twin.value
                twins[i].reportedVersion = twin.version
                twins[i].reportedTime = twin.time
                status.lastReport = mark
            }
            status.twins = twins.sorted { $0.name < $1.name }
            device.status = status
            device.metadata.resourceVersion = String(stored.resourceVersion)
            do {
                _ = try await self.writer.save(
                    device,
                    namespace: twin.namespace,
                    urlName: twin.device,
                    createOnly: false,
                    writer: ObjectWriter.internalWriter
                )
                return NodeReportResult(id: id, result: .applied)
            } catch StoreError.conflict {
                continue
            }
        }
        throw Status.conflict("device \(twin.device) is changing too fast; the node sends the report again")
    }

    /// Whether the stored reported versions came from `node` (a device moved to another node starts over).
    private func last(_ status: DeviceStatus, _ node: String) -> Bool {
        status.lastReport?.node == node
    }

    private func applyWorkload(_ report: WorkloadReport, id: Int64, node: String) async throws -> NodeReportResult {
        guard report.instance.node == node else {
            return NodeReportResult(id: id, result: .rejected, message: "an instance of another node")
        }
        // Stopped: the node no longer runs it (unassigned or deleted); its entry goes.
        let stopped = report.instance.phase == .stopped
        let key = ObjectKey(resource: Workload.resource.plural, namespace: report.namespace, name: report.name)
        let exists = try await self.writer.store.get(key) != nil
        guard stopped || exists else {
            return NodeReportResult(
                id: id,
                result: .rejected,
                message: "unknown workload \(report.namespace)/\(report.name)"
            )
        }
        // The node's own Node holds its instances (`NodeStatus.workloads`): no two nodes write one object.
        let written = try await NodeLifecycle.writeStatus(node, in: self.writer.store) { old in
            var s = old ?? NodeStatus()
            var all = s.workloads ?? []
            all.removeAll { $0.namespace == report.namespace && $0.name == report.name }
            if !stopped { all.append(report) }
            s.workloads = all.isEmpty ? nil : all.sorted { ($0.namespace, $0.name) < ($1.namespace, $1.name) }
            return s
        }
        if written == nil {
            return NodeReportResult(id: id, result: .rejected, message: "node \(node) is not registered")
        }
        return NodeReportResult(id: id, result: .applied)
    }
}

extension ControlAPI {
    /// `POST /apis/mesh.edge/v1/nodes/NAME/reports`: a strict `NodeReportBatch`; answers one result per id.
    func reports(_ node: String, _ request: HTTPRequest) async throws -> HTTPResponse {
        let batch = try Self.decodeStrict(NodeReportBatch.self, request)
        let results = try await NodeReports(writer: self.writer, logger: self.logger).apply(node: node, batch: batch)
        return .json(.ok, Self.encode(results))
    }
}
