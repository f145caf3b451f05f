/// A batch from a node's outbox (`POST /apis/mesh.edge/v1/nodes/NAME/reports`): reported twin values
/// and workload instances, each with a message id that grows within the outbox's epoch. Sent again
/// until acknowledged; the control plane applies each message at most once (by id) and answers
/// every id, so the node drops exactly what was answered.
public struct NodeReportBatch: Codable, Sendable, Equatable {
    /// Made once per edge store: ids restart only with a new epoch.
    public var epoch: String
    public var reports: [NodeReport]

    public init(epoch: String, reports: [NodeReport]) {
        self.epoch = epoch
        self.reports = reports
    }

    public static let maxReports = 500
}

public struct NodeReport: Codable, Sendable, Equatable {
    public var id: Int64
    public var twin: TwinReport?
    public var workload: WorkloadReport?

    public init(id: Int64, twin: TwinReport? = nil, workload: WorkloadReport? = nil) {
        self.id = id
        self.twin = twin
        self.workload = workload
    }
}

/// A device's reported value of one property, with the edge's version of it.
public struct TwinReport: Codable, Sendable, Equatable {
    public var namespace: String
    public var device: String
    public var property: String
    public var value: String
    public var version: Int64
    /// When the mapper reported it (RFC 3339).
    public var time: String?

    public init(namespace: String, device: String, property: String, value: String, version: Int64, time: String?) {
        self.namespace = namespace
        self.device = device
        self.property = property
        self.value = value
        self.version = version
        self.time = time
    }
}

/// A node's report of its instance of a workload: what it reports is what its Node's `status.workloads` keeps.
public typealias WorkloadReport = NodeWorkload

/// The answer: one result per message id of the batch.
public struct NodeReportResults: Codable, Sendable, Equatable {
    public var results: [NodeReportResult]

    public init(results: [NodeReportResult]) {
        self.results = results
    }
}

public struct NodeReportResult: Codable, Sendable, Equatable {
    public var id: Int64
    public var result: Outcome
    /// Why a message was rejected.
    public var message: String?

    public init(id: Int64, result: Outcome, message: String? = nil) {
        self.id = id
        self.result = result
        self.message = message
    }

    public enum Outcome: String, StrictEnum {
        case applied
        /// Applied before (same or older id): nothing done.
        case duplicate
        /// Breaks the model, names an unknown device, or a device of another node: never applied.
        case rejected
    }
}
