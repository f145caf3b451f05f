/// A host running the mesh agent. Cluster-scoped.
public struct Node: MeshObject {
    public static let resource = ResourceType(
        kind: "Node",
        plural: "nodes",
        singular: "node",
        shortNames: ["no"],
        namespaced: false,
        nameIsSubdomain: true
    )

    public var apiVersion: String = meshAPIVersion
    public var kind: String = "Node"
    public var metadata: ObjectMeta
    public var spec: NodeSpec
    public var status: NodeStatus?

    public init(metadata: ObjectMeta, spec: NodeSpec, status: NodeStatus? = nil) {
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }

    public func specErrors() -> [FieldError] {
        var errs: [FieldError] = []
        if let s = self.spec.site, let e = Names.dns1123LabelError(s) { errs.append(FieldError("spec.site", e)) }
        for (i, a) in (self.spec.addresses ?? []).enumerated() where a.type != .hostname {
            if IPAddress(a.address) == nil {
                errs.append(
                    FieldError("spec.addresses[\(i)].address", "must be an IP address for type \(a.type.rawValue)")
                )
            }
        }
        if let p = self.spec.linkPort, !(1...65_535).contains(p) {
            errs.append(FieldError("spec.linkPort", "must be a port number from 1 to 65535"))
        }
        if let t = self.status?.lastHeartbeatTime, Timestamp.parse(t) == nil {
            errs.append(FieldError("status.lastHeartbeatTime", "must be an RFC 3339 time such as 2026-01-02T15:04:05Z"))
        }
        return errs
    }
}

public struct NodeSpec: Codable, Sendable, Equatable, Hashable {
    /// The site (edge location) the node is in; endpoints on nodes of one site are preferred there.
    public var site: String?
    public var addresses: [NodeAddress]?
    /// The TCP port where the node's agent accepts peer links (mutual TLS 1.3), on each of `addresses`;
    /// nil: it accepts none, so other sites reach it only through a relay.
    public var linkPort: Int?

    public init(site: String? = nil, addresses: [NodeAddress]? = nil, linkPort: Int? = nil) {
        self.site = site
        self.addresses = addresses
        self.linkPort = linkPort
    }
}

public struct NodeAddress: Codable, Sendable, Equatable, Hashable {
    public var type: AddressType
    public var address: String

    public init(type: AddressType, address: String) {
        self.type = type
        self.address = address
    }

    public enum AddressType: String, StrictEnum {
        case internalIP = "InternalIP"
        case externalIP = "ExternalIP"
        case hostname = "Hostname"
    }
}

public struct NodeStatus: Codable, Sendable, Equatable, Hashable {
    public var phase: Phase?
    public var lastHeartbeatTime: String?
    public var message: String?
    /// The node's home relay (its agent keeps a session there; relays forward circuits to it there),
    /// as its heartbeat last reported it. Nil: none, or not reported.
    public var relay: String?
    /// Where the node's agent can be reached for a hole punch (its NAT discovery), as its heartbeat last
    /// reported it. Nil: not reported.
    public var candidates: NodeCandidates?
    /// The node's peer links as its heartbeat last reported them (the control plane's picture of the mesh:
    /// `meshctl dashboard`). Nil: not reported.
    public var links: [NodeLink]?
    /// The node's instance of each workload it runs, as its agent last reported it (`POST .../reports`), sorted
    /// by namespace and name. Here and not in each Workload: a workload on every node would otherwise be one
    /// object rewritten by every node's report (a hot key, and past etcd's 1.5 MiB value limit at ~10,000
    /// nodes); a node writes only its own Node.
    public var workloads: [NodeWorkload]?

    public init(
        phase: Phase? = nil,
        lastHeartbeatTime: String? = nil,
        message: String? = nil,
        relay: String? = nil,
        candidates: NodeCandidates? = nil,
        links: [NodeLink]? = nil,
        workloads: [NodeWorkload]? = nil
    ) {
        self.phase = phase
        self.lastHeartbeatTime = lastHeartbeatTime
        self.message = message
        self.relay = relay
        self.candidates = candidates
        self.links = links
        self.workloads = workloads
    }

    /// This node's instance of the workload `namespace/name`.
    public func instance(of namespace: String, _ name: String) -> WorkloadInstance? {
        self.workloads?.first { $0.namespace == namespace && $0.name == name }?.instance
    }

    public enum Phase: String, StrictEnum {
        case ready = "Ready"
        case notReady = "NotReady"
        case unknown = "Unknown"
    }
}

/// What a node may report with its heartbeat (the optional JSON body of `POST .../nodes/NAME/heartbeat`;
/// an empty body reports nothing). The control plane writes the Node only when a value changes.
public struct NodeHeartbeatReport: Codable, Sendable, Equatable {
    /// The node's home relay; nil (or absent) when it has none.
    public var relay: String?
    /// The node's hole-punch candidates; nil (or absent): not reported (the status keeps what it had).
    public var candidates: NodeCandidates?
    /// The node's peer links; nil (or absent): not reported (the status keeps what it had).
    public var links: [NodeLink]?

    public init(relay: String?, candidates: NodeCandidates? = nil, links: [NodeLink]? = nil) {
        self.relay = relay
        self.candidates = candidates
        self.links = links
    }

    /// Why the report is not valid (nil: it is).
    public var error: String? {
        if let r = self.relay, let e = Names.dns1123SubdomainError(r) { return "relay \"\(r)\" \(e)" }
        if let links = self.links {
            if links.count > NodeLink.maxPerNode { return "links: at most \(NodeLink.maxPerNode) may be reported" }
            for (i, l) in links.enumerated() {
                if let e = l.error { return "links[\(i)]: \(e)" }
            }
        }
        return self.candidates?.error
    }
}

/// A node's candidates for a direct path (its agent's NAT discovery, `Relay/Punch`): its own addresses,
/// the reflexive address and port its NAT maps its link port to, as the relays' STUN servers saw it, and
/// the kind of mapping.
public struct NodeCandidates: Codable, Sendable, Equatable, Hashable {
    /// The host's own addresses with the link port (`IP:PORT`, `[IPv6]:PORT`).
    public var local: [String]?
    /// The link port as the relays' STUN servers saw it (`IP:PORT`); nil: no STUN server answered.
    public var reflexive: String?
    /// `none` (no NAT: the reflexive address is the host's own), `endpointIndependent` (one mapping for
    /// every destination; `portPreserving` when it keeps the port too), `endpointDependent`, `random`,
    /// `unknown`.
    public var mapping: String?
    /// When the discovery ran (RFC 3339).
    public var updateTime: String?

    public init(local: [String]? = nil, reflexive: String? = nil, mapping: String? = nil, updateTime: String? = nil) {
        self.local = local
        self.reflexive = reflexive
        self.mapping = mapping
        self.updateTime = updateTime
    }

    /// The mappings a report may name.
    public static let mappings: Set<String> = [
        "none", "endpointIndependent", "portPreserving", "endpointDependent", "random", "unknown",
    ]

    /// Why the candidates are not valid (nil: they are).
    public var error: String? {
        if let m = self.mapping, !Self.mappings.contains(m) {
            return "candidates.mapping \"\(m)\" is not one of \(Self.mappings.sorted().joined(separator: ", "))"
        }
        if (self.local?.count ?? 0) > 16 { return "candidates.local: at most 16 addresses" }
        for a in (self.local ?? []) + (self.reflexive.map { [$0] } ?? []) where a.utf8.count > 64 {
            return "candidates: an address of \(a.utf8.count) bytes (at most 64)"
        }
        return nil
    }
}

/// The answer to a node's heartbeat (`POST /apis/mesh.edge/v1/nodes/NAME/heartbeat`, optional body).
/// A heartbeat is kept in the control plane's memory: it writes the Node only when its phase changes.
public struct NodeHeartbeat: Codable, Sendable, Equatable {
    public var apiVersion: String = meshAPIVersion
    public var kind: String = "NodeHeartbeat"
    public var nodeName: String
    /// When the control plane took the beat (RFC 3339, UTC).
    public var time: String
    /// The node's phase after this beat (Ready).
    public var phase: NodeStatus.Phase
    /// How long the control plane waits for the next beat before it marks the node NotReady.
    public var gracePeriodSeconds: Double

    public init(nodeName: String, time: String, phase: NodeStatus.Phase, gracePeriodSeconds: Double) {
        self.nodeName = nodeName
        self.time = time
        self.phase = phase
        self.gracePeriodSeconds = gracePeriodSeconds
    }
}

/// One peer link of a node, as its agent reports it with its heartbeats.
public struct NodeLink: Codable, Sendable, Equatable, Hashable {
    /// The node at the other end.
    public var peer: String
    /// `direct`, `punched` or `relayed`.
    public var path: String
    /// The relay of a relayed link.
    public var relay: String?
    /// The link's round trip rounded to 1, 2 or 5 times a power of ten milliseconds (at least 1), so that
    /// jitter does not rewrite the Node on every beat.
    public var rttMillis: Int?

    public static let maxPerNode = 1000
    public static let paths: Set<String> = ["direct", "punched", "relayed"]

    public init(peer: String, path: String, relay: String? = nil, rttMillis: Int? = nil) {
        self.peer = peer
        self.path = path
        self.relay = relay
        self.rttMillis = rttMillis
    }

    /// A measured RTT in microseconds, rounded to the nearest step of 1, 2, 5, 10, 20, 50... ms.
    public static func roundedRTT(micros: Int64?) -> Int? {
        guard let micros, micros >= 0 else { return nil }
        let ms = Double(micros) / 1000
        var best = 1
        var step = 1
        while step <= 1_000_000 {
            for m in [1, 2, 5] where abs(Double(step * m) - ms) < abs(Double(best) - ms) { best = step * m }
            step *= 10
        }
        return best
    }

    /// Why this link is not valid (nil: it is).
    public var error: String? {
        if let e = Names.dns1123SubdomainError(self.peer) { return "peer \"\(self.peer)\" \(e)" }
        guard Self.paths.contains(self.path) else {
            return "path \"\(self.path)\" must be direct, punched or relayed"
        }
        if let r = self.relay, let e = Names.dns1123SubdomainError(r) { return "relay \"\(r)\" \(e)" }
        if let rtt = self.rttMillis, rtt < 0 { return "rttMillis must not be negative" }
        return nil
    }
}

/// One workload's instance on a node (`NodeStatus.workloads`).
public struct NodeWorkload: Codable, Sendable, Equatable, Hashable {
    public var namespace: String
    public var name: String
    public var instance: WorkloadInstance

    public init(namespace: String, name: String, instance: WorkloadInstance) {
        self.namespace = namespace
        self.name = name
        self.instance = instance
    }
}
