import MeshCore

/// What the `WorkloadController` knows of the store, kept from one list and the watch after it (an informer's
/// cache), and which workloads and services a change made stale. Pure: no store, no clock; the controller
/// feeds it objects and writes what it wants.
///
/// It keeps only what assignment and endpoints read: a node's labels, readiness, address, site and the
/// instances it reported; a workload's selector, ports, service and status; whether each Endpoints is the
/// controller's and its addresses. A change marks dirty only what it can change:
/// - a node's instances, address or site: the workloads assigned to it (their sums and endpoints read it);
/// - a node that is new, or whose labels or readiness changed: also every workload whose selector matches
///   it, found through the selectors' index (by a name in `nodeNames`, else by the selector's first label,
///   else among the workloads that select every node), not by a scan of every workload;
/// - a deleted node: the workloads assigned to it;
/// - a workload whose selector, ports, service or status changed (not the echo of the controller's own
///   write, which the index already holds): itself, and its old service;
/// - Endpoints changed by someone else under a workload service's name, or the controller's own changed:
///   that service.
/// A workload selecting by labels finds its nodes through the nodes' label index (the smallest set among its
/// labels), not by a scan of every node.
/// Each cached object keeps the version it was read at; a watch line at or below it is older than what
/// the index holds and is skipped (the lines of the controller's own writes arrive after it recorded them).
struct WorkloadIndex {
    /// A namespaced name: a workload's, or a service's (its Endpoints').
    struct Ref: Hashable, Comparable, CustomStringConvertible {
        var namespace: String
        var name: String

        static func < (a: Ref, b: Ref) -> Bool { (a.namespace, a.name) < (b.namespace, b.name) }
        var description: String { "\(self.namespace)/\(self.name)" }
    }

    /// A label, `key=value`: what both label indexes are keyed by.
    struct Label: Hashable {
        var key: String
        var value: String
    }

    /// Facts read from a stored object at `version`.
    protocol Facts: Equatable {
        var version: Int64 { get set }
    }

    struct NodeFacts: Facts {
        var version: Int64
        var labels: [String: String]
        var ready: Bool
        /// The node's first InternalIP, else its first address that is not a hostname.
        var address: String?
        var site: String?
        /// The instances the node reported, by workload.
        var instances: [Ref: Instance]
    }

    struct Instance: Equatable {
        var running: Bool
        var restarts: Int
    }

    struct WorkloadFacts: Facts {
        var version: Int64
        var selector: WorkloadNodeSelector?
        var ports: [WorkloadPort]
        var service: Ref
        var status: WorkloadStatus

        func matches(_ name: String, _ node: NodeFacts) -> Bool {
            self.selector?.matches(name: name, labels: node.labels) ?? true
        }
    }

    struct EndpointsFacts: Facts {
        var version: Int64
        /// Written by this controller (`mesh.edge/managed-by: workloads`).
        var managed: Bool
        var addresses: [EndpointAddress]
    }

    private(set) var nodes: [String: NodeFacts] = [:]
    private(set) var workloads: [Ref: WorkloadFacts] = [:]
    private(set) var endpoints: [Ref: EndpointsFacts] = [:]
    /// Node name → the workloads whose `status.nodes` name it.
    private var assigned: [String: Set<Ref>] = [:]
    /// Service → the workloads with ports that serve it.
    private var serving: [Ref: Set<Ref>] = [:]
    /// Label → the nodes that carry it.
    private var nodesByLabel: [Label: Set<String>] = [:]
    /// The workloads a node may concern, each filed once under its selector's anchor (`Anchor`).
    private var selectorsByName: [String: Set<Ref>] = [:]
    private var selectorsByLabel: [Label: Set<Ref>] = [:]
    private var selectingEveryNode: Set<Ref> = []
    private(set) var dirtyWorkloads: Set<Ref> = []
    private(set) var dirtyServices: Set<Ref> = []

    var hasDirty: Bool { !self.dirtyWorkloads.isEmpty || !self.dirtyServices.isEmpty }

    static func version(_ meta: ObjectMeta) -> Int64 { meta.resourceVersion.flatMap { Int64($0) } ?? 0 }

    static func facts(of node: Node) -> NodeFacts {
        var instances: [Ref: Instance] = [:]
        for w in node.status?.workloads ?? [] {
            instances[Ref(namespace: w.namespace, name: w.name)] = Instance(
                running: w.instance.phase == .running,
                restarts: w.instance.restarts ?? 0
            )
        }
        let addresses = node.spec.addresses ?? []
        return NodeFacts(
            version: Self.version(node.metadata),
            labels: node.metadata.labels ?? [:],
            ready: node.status?.phase == .ready,
            address: (addresses.first { $0.type == .internalIP } ?? addresses.first { $0.type != .hostname })?
                .address,
            site: node.spec.site,
            instances: instances
        )
    }

    /// A workload's or an Endpoints' namespaced name.
    static func ref(of o: some MeshObject) -> Ref { Ref(namespace: o.effectiveNamespace, name: o.metadata.name) }

    static func facts(of w: Workload) -> WorkloadFacts {
        WorkloadFacts(
            version: Self.version(w.metadata),
            selector: w.spec.nodeSelector,
            ports: w.spec.ports ?? [],
            service: Ref(namespace: w.effectiveNamespace, name: w.serviceName),
            status: w.status ?? WorkloadStatus()
        )
    }

    // MARK: changes

    /// A node listed or changed.
    mutating func put(_ node: Node) {
        let name = node.metadata.name
        let new = Self.facts(of: node)
        let old = self.nodes[name]
        if let old, new.version <= old.version { return }
        self.nodes[name] = new
        self.indexLabels(of: name, old: old?.labels ?? [:], new: new.labels)
        guard let old else {
            self.dirtySelecting(name, new)
            return
        }
        if old.sameFacts(as: new) { return }
        self.dirtyWorkloads.formUnion(self.assigned[name] ?? [])
        if old.labels != new.labels || old.ready != new.ready { self.dirtySelecting(name, new) }
    }

    mutating func removeNode(_ name: String, version: Int64) {
        guard let old = self.nodes[name], version >= old.version else { return }
        self.nodes[name] = nil
        self.indexLabels(of: name, old: old.labels, new: [:])
        self.dirtyWorkloads.formUnion(self.assigned[name] ?? [])
    }

    /// A workload listed or changed; `dirty: false` records the controller's own write (nothing to redo).
    mutating func put(_ w: Workload, dirty: Bool = true) {
        let ref = Self.ref(of: w)
        let new = Self.facts(of: w)
        let old = self.workloads[ref]
        if let old, new.version <= old.version, dirty { return }
        self.workloads[ref] = new
        self.index(ref, old: old, new: new)
        guard dirty else { return }
        if let old, old.sameFacts(as: new) { return }
        self.dirtyWorkloads.insert(ref)
        if let old, !old.ports.isEmpty { self.dirtyServices.insert(old.service) }
    }

    mutating func removeWorkload(_ ref: Ref, version: Int64) {
        guard let old = self.workloads[ref], version >= old.version else { return }
        self.workloads[ref] = nil
        self.index(ref, old: old, new: nil)
        self.dirtyWorkloads.remove(ref)
        if !old.ports.isEmpty { self.dirtyServices.insert(old.service) }
    }

    /// Endpoints listed or changed; `dirty: false` records the controller's own write.
    mutating func put(_ e: Endpoints, dirty: Bool = true) {
        let ref = Self.ref(of: e)
        let new = EndpointsFacts(
            version: Self.version(e.metadata),
            managed: e.metadata.annotations?[WorkloadController.managedKey] == WorkloadController.managedValue,
            addresses: e.spec.addresses
        )
        let old = self.endpoints[ref]
        if let old, new.version <= old.version, dirty { return }
        self.endpoints[ref] = new
        guard dirty, old?.sameFacts(as: new) != true else { return }
        if new.managed || !(self.serving[ref] ?? []).isEmpty { self.dirtyServices.insert(ref) }
    }

    mutating func removeEndpoints(_ ref: Ref, version: Int64) {
        guard let old = self.endpoints[ref], version >= old.version else { return }
        self.endpoints[ref] = nil
        if !(self.serving[ref] ?? []).isEmpty { self.dirtyServices.insert(ref) }
    }

    /// After a list: every workload, and every service with workloads or the controller's Endpoints.
    mutating func dirtyEverything() {
        self.dirtyWorkloads = Set(self.workloads.keys)
        self.dirtyServices = Set(self.serving.keys)
        for (ref, e) in self.endpoints where e.managed { self.dirtyServices.insert(ref) }
    }

    /// Marks every workload whose selector matches the node: those filed under its name, under one of its
    /// labels, or selecting every node, each checked whole.
    private mutating func dirtySelecting(_ name: String, _ node: NodeFacts) {
        func mark(_ refs: Set<Ref>?) {
            for ref in refs ?? [] where self.workloads[ref]?.matches(name, node) == true {
                self.dirtyWorkloads.insert(ref)
            }
        }
        mark(self.selectorsByName[name])
        mark(self.selectingEveryNode)
        for (key, value) in node.labels { mark(self.selectorsByLabel[Label(key: key, value: value)]) }
    }

    /// Where a selector is filed: under each of its `nodeNames` (a node must be one of them), else under its
    /// first label by key (a node must carry it), else among those selecting every node.
    enum Anchor: Equatable {
        case names(Set<String>)
        case label(Label)
        case everyNode

        init(_ selector: WorkloadNodeSelector?) {
            if let names = selector?.nodeNames, !names.isEmpty {
                self = .names(Set(names))
            } else if let (key, value) = selector?.matchLabels?.min(by: { $0.key < $1.key }) {
                self = .label(Label(key: key, value: value))
            } else {
                self = .everyNode
            }
        }
    }

    private mutating func file(_ ref: Ref, under anchor: Anchor, _ add: Bool) {
        func update<K: Hashable>(_ index: inout [K: Set<Ref>], _ key: K) {
            if add {
                index[key, default: []].insert(ref)
            } else {
                index[key]?.remove(ref)
                if index[key]?.isEmpty == true { index[key] = nil }
            }
        }
        switch anchor {
        case .names(let names): for n in names { update(&self.selectorsByName, n) }
        case .label(let label): update(&self.selectorsByLabel, label)
        case .everyNode:
            if add { self.selectingEveryNode.insert(ref) } else { self.selectingEveryNode.remove(ref) }
        }
    }

    private mutating func indexLabels(of node: String, old: [String: String], new: [String: String]) {
        guard old != new else { return }
        for (key, value) in old where new[key] != value {
            let label = Label(key: key, value: value)
            self.nodesByLabel[label]?.remove(node)
            if self.nodesByLabel[label]?.isEmpty == true { self.nodesByLabel[label] = nil }
        }
        for (key, value) in new where old[key] != value {
            self.nodesByLabel[Label(key: key, value: value), default: []].insert(node)
        }
    }

    private mutating func index(_ ref: Ref, old: WorkloadFacts?, new: WorkloadFacts?) {
        let (was, now) = (old.map { Anchor($0.selector) }, new.map { Anchor($0.selector) })
        if was != now {
            if let was { self.file(ref, under: was, false) }
            if let now { self.file(ref, under: now, true) }
        }
        let before = Set(old?.status.nodes ?? [])
        let after = Set(new?.status.nodes ?? [])
        for n in before.subtracting(after) {
            self.assigned[n]?.remove(ref)
            if self.assigned[n]?.isEmpty == true { self.assigned[n] = nil }
        }
        for n in after.subtracting(before) { self.assigned[n, default: []].insert(ref) }
        if let old, !old.ports.isEmpty, old.service != new?.service || (new?.ports.isEmpty ?? true) {
            self.serving[old.service]?.remove(ref)
            if self.serving[old.service]?.isEmpty == true { self.serving[old.service] = nil }
        }
        if let new, !new.ports.isEmpty { self.serving[new.service, default: []].insert(ref) }
    }

    // MARK: what is wanted

    /// Takes the dirty workloads (sorted), and marks the services of those with ports dirty: their
    /// endpoints follow the assignments about to be written.
    mutating func takeDirtyWorkloads() -> [Ref] {
        let refs = self.dirtyWorkloads.sorted()
        self.dirtyWorkloads = []
        for ref in refs {
            if let w = self.workloads[ref], !w.ports.isEmpty { self.dirtyServices.insert(w.service) }
        }
        return refs
    }

    mutating func takeDirtyServices() -> [Ref] {
        defer { self.dirtyServices = [] }
        return self.dirtyServices.sorted()
    }

    /// A workload's status: the Ready nodes its selector matches (a node it was assigned keeps it while
    /// NotReady), and how many of them report it Running and their restarts, in sum. Nil: no such workload.
    func wantedStatus(of ref: Ref) -> WorkloadStatus? {
        guard let w = self.workloads[ref] else { return nil }
        let before = Set(w.status.nodes ?? [])
        // A node it may run on: one its selector matches, Ready, or assigned before (NotReady keeps it).
        func admits(_ name: String, _ n: NodeFacts) -> Bool { w.matches(name, n) && (n.ready || before.contains(name)) }
        // Where to look: the nodes it names, else those carrying the rarest of its labels, else every node.
        let within: Set<String>?
        switch Anchor(w.selector) {
        case .names(let names): within = names
        case .label:
            within =
                (w.selector?.matchLabels ?? [:]).lazy
                .map { self.nodesByLabel[Label(key: $0.key, value: $0.value)] ?? [] }
                .min { $0.count < $1.count } ?? []
        case .everyNode: within = nil
        }
        var assigned: [String] = []
        if let within {
            for name in within { if let n = self.nodes[name], admits(name, n) { assigned.append(name) } }
        } else {
            for (name, n) in self.nodes where admits(name, n) { assigned.append(name) }
        }
        assigned.sort()
        var running = 0
        var restarts = 0
        var reported = 0
        for name in assigned {
            guard let instance = self.nodes[name]?.instances[ref] else { continue }
            reported += 1
            if instance.running { running += 1 }
            restarts += instance.restarts
        }
        return WorkloadStatus(
            nodes: assigned.isEmpty ? nil : assigned,
            running: reported == 0 ? nil : running,
            restarts: reported == 0 ? nil : restarts
        )
    }

    /// The addresses a workload service's Endpoints should have: one per assigned node of each of its
    /// workloads that reported an instance (the node's address, name and site, the workload's ports), ready
    /// while the instance runs and the node is Ready; sorted by node, then address.
    func wantedAddresses(of service: Ref) -> [EndpointAddress] {
        var list: [EndpointAddress] = []
        for ref in (self.serving[service] ?? []).sorted() {
            guard let w = self.workloads[ref] else { continue }
            for name in w.status.nodes ?? [] {
                guard let node = self.nodes[name], let ip = node.address, let instance = node.instances[ref] else {
                    continue
                }
                list.append(
                    EndpointAddress(
                        ip: ip,
                        ports: w.ports.map { EndpointPort(name: $0.name, port: $0.port) },
                        node: name,
                        site: node.site,
                        ready: instance.running && node.ready
                    )
                )
            }
        }
        return list.sorted { ($0.node ?? "", $0.ip) < ($1.node ?? "", $1.ip) }
    }

}

extension WorkloadIndex.Facts {
    /// The same facts, whatever versions they were read at.
    func sameFacts(as o: Self) -> Bool {
        var o = o
        o.version = self.version
        return self == o
    }
}
