/// A process the control plane assigns to matching Ready nodes; each node's agent runs it,
/// supervised, and reports its status. Namespaced.
public struct Workload: MeshObject {
    public static let resource = ResourceType(
        kind: "Workload",
        plural: "workloads",
        singular: "workload",
        shortNames: ["wl"],
        namespaced: true,
        nameIsSubdomain: false
    )

    public var apiVersion: String = meshAPIVersion
    public var kind: String = "Workload"
    public var metadata: ObjectMeta
    public var spec: WorkloadSpec
    /// The control plane's: the nodes assigned, and each node's instance as its agent reported it.
    public var status: WorkloadStatus?

    public init(metadata: ObjectMeta, spec: WorkloadSpec, status: WorkloadStatus? = nil) {
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }

    /// The service whose endpoints this workload's ports become (default: the workload's name).
    public var serviceName: String { self.spec.service ?? self.metadata.name }

    public static let maxArgs = 256

    public func specErrors() -> [FieldError] {
        var errs: [FieldError] = []
        let s = self.spec
        if s.command.isEmpty { errs.append(FieldError("spec.command", "is required: the program to run")) }
        if s.command.utf8.count > 4096 { errs.append(FieldError("spec.command", "must be at most 4096 bytes")) }
        if s.command.contains("\0") || (s.args ?? []).contains(where: { $0.contains("\0") }) {
            errs.append(FieldError("spec.command", "must not contain NUL bytes"))
        }
        if (s.args ?? []).count > Self.maxArgs {
            errs.append(FieldError("spec.args", "must hold at most \(Self.maxArgs) arguments"))
        }
        for key in (s.env ?? [:]).keys.sorted() where key.isEmpty || key.contains("=") || key.contains("\0") {
            errs.append(FieldError("spec.env[\(key)]", "is not a valid variable name"))
        }
        var names = Set<String>()
        for (i, p) in (s.ports ?? []).enumerated() {
            if !(1...65535).contains(p.port) { errs.append(FieldError("spec.ports[\(i)].port", "must be 1-65535")) }
            if let n = p.name {
                if let e = Names.dns1123LabelError(n) { errs.append(FieldError("spec.ports[\(i)].name", e)) }
                if !names.insert(n).inserted {
                    errs.append(FieldError("spec.ports[\(i)].name", "duplicate port name \"\(n)\""))
                }
            } else if (s.ports ?? []).count > 1 {
                errs.append(FieldError("spec.ports[\(i)].name", "is required when a workload has more than one port"))
            }
        }
        if let svc = s.service, let e = Names.dns1123LabelError(svc) { errs.append(FieldError("spec.service", e)) }
        if let sel = s.nodeSelector {
            for (i, n) in (sel.nodeNames ?? []).enumerated() {
                if let e = Names.dns1123SubdomainError(n) {
                    errs.append(FieldError("spec.nodeSelector.nodeNames[\(i)]", e))
                }
            }
            errs += MetadataLimits.errors(labels: sel.matchLabels, annotations: nil).map {
                FieldError("spec.nodeSelector.matchLabels" + $0.path.dropFirst("metadata.labels".count), $0.message)
            }
        }
        return errs
    }

    /// Whether `node` matches the selector (no selector: every node).
    public func selects(_ node: Node) -> Bool {
        self.spec.nodeSelector?.matches(name: node.metadata.name, labels: node.metadata.labels ?? [:]) ?? true
    }
}

public struct WorkloadSpec: Codable, Sendable, Equatable, Hashable {
    /// The program: an absolute path, or a name looked up in PATH.
    public var command: String
    public var args: [String]?
    public var env: [String: String]?
    /// Ports the process listens on; each becomes an endpoint of `service` with this node's name.
    public var ports: [WorkloadPort]?
    /// The service the ports belong to (default: the workload's name).
    public var service: String?
    /// Always (default), OnFailure or Never.
    public var restartPolicy: RestartPolicy?
    /// Which nodes run it: by name, by labels, or both (all must match); absent: every node.
    public var nodeSelector: WorkloadNodeSelector?

    public init(
        command: String,
        args: [String]? = nil,
        env: [String: String]? = nil,
        ports: [WorkloadPort]? = nil,
        service: String? = nil,
        restartPolicy: RestartPolicy? = nil,
        nodeSelector: WorkloadNodeSelector? = nil
    ) {
        self.command = command
        self.args = args
        self.env = env
        self.ports = ports
        self.service = service
        self.restartPolicy = restartPolicy
        self.nodeSelector = nodeSelector
    }

    public enum RestartPolicy: String, StrictEnum {
        case always = "Always"
        case onFailure = "OnFailure"
        case never = "Never"
    }
}

public struct WorkloadPort: Codable, Sendable, Equatable, Hashable {
    public var name: String?
    public var port: Int

    public init(name: String? = nil, port: Int) {
        self.name = name
        self.port = port
    }
}

public struct WorkloadNodeSelector: Codable, Sendable, Equatable, Hashable {
    public var nodeNames: [String]?
    public var matchLabels: [String: String]?

    public init(nodeNames: [String]? = nil, matchLabels: [String: String]? = nil) {
        self.nodeNames = nodeNames
        self.matchLabels = matchLabels
    }

    /// Whether the node of this name and labels matches: one of `nodeNames` (when given) and every label.
    public func matches(name: String, labels: [String: String]) -> Bool {
        if let names = self.nodeNames, !names.isEmpty, !names.contains(name) { return false }
        for (k, v) in self.matchLabels ?? [:] where labels[k] != v { return false }
        return true
    }
}

public struct WorkloadStatus: Codable, Sendable, Equatable, Hashable {
    /// The Ready nodes that match the selector, sorted (the control plane's WorkloadController).
    public var nodes: [String]?
    /// How many of those nodes report their instance Running, and the restarts their instances reported, in
    /// sum (the WorkloadController, from each node's `status.workloads`, where the instances are).
    public var running: Int?
    public var restarts: Int?

    public init(nodes: [String]? = nil, running: Int? = nil, restarts: Int? = nil) {
        self.nodes = nodes
        self.running = running
        self.restarts = restarts
    }
}

/// One node's run of a workload.
public struct WorkloadInstance: Codable, Sendable, Equatable, Hashable {
    public var node: String
    public var phase: Phase
    public var pid: Int?
    /// The last exit's code (or 128 + signal).
    public var exitCode: Int?
    public var restarts: Int?
    /// RFC 3339.
    public var lastStart: String?
    public var message: String?

    public init(
        node: String,
        phase: Phase,
        pid: Int? = nil,
        exitCode: Int? = nil,
        restarts: Int? = nil,
        lastStart: String? = nil,
        message: String? = nil
    ) {
        self.node = node
        self.phase = phase
        self.pid = pid
        self.exitCode = exitCode
        self.restarts = restarts
        self.lastStart = lastStart
        self.message = message
    }

    public enum Phase: String, StrictEnum {
        case running = "Running"
        /// Exited, waiting for its restart (backoff).
        case backoff = "BackOff"
        /// Exited and not restarted (policy).
        case exited = "Exited"
        /// Could not be started (command missing, not executable).
        case failed = "Failed"
        case stopped = "Stopped"
    }
}

extension ResourceType {
    /// Devices and workloads: each is placed on nodes (a device on `spec.node`, a workload on `status.nodes`),
    /// and a list or watch of them can be scoped to one node (`?node=NAME`).
    public var placedOnNodes: Bool { self.plural == Device.resource.plural || self.plural == Workload.resource.plural }
}
