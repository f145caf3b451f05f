import Logging
import MeshCore
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Assigns workloads to nodes and keeps their services' endpoints, in the control plane.
///
/// - **Assignment** (`status.nodes` of each Workload): the Ready nodes its selector matches. A node
///   that goes NotReady keeps what it was assigned (its agent keeps running it offline); a node that
///   no longer matches, or is deleted, loses it.
/// - **Endpoints**: for each workload with ports, the Endpoints of its service (same namespace) get one
///   address per assigned node that reported an instance: the node's first InternalIP (else its first
///   address), the node's name and site, the workload's ports, and `ready` only while the instance is
///   Running **and** the node is Ready. So when a node goes NotReady the mesh stops routing to it.
///   Those Endpoints carry the annotation `mesh.edge/managed-by: workloads`; Endpoints someone else
///   wrote under the same name are left alone (logged).
///
/// Informer-style: it lists Nodes, Workloads and Endpoints once, keeps what it needs of them in a
/// `WorkloadIndex`, follows all three over one watch, and reconciles only the workloads and services a
/// change touched (a node's report: the workloads on that node; not every workload and node, which a full
/// pass per change would read and decode: O(N + W) each time, a wall at a fleet's size). Changes that arrive
/// close together are taken in one pass (`coalesce`). Each write is conditional, so a concurrent API write
/// is never lost; a failed pass, or a watch that ends, starts again from a fresh list. Every replica runs
/// one; they agree.
final class WorkloadController: Sendable {
    static let managedKey = "mesh.edge/managed-by"
    static let managedValue = "workloads"

    let writer: ObjectWriter
    let logger: Logger
    /// The least time between two passes: the changes of a burst (a fleet coming online) wait for one.
    let coalesce: Duration

    init(writer: ObjectWriter, logger: Logger, coalesce: Duration = .milliseconds(100)) {
        self.writer = writer
        self.logger = logger
        self.coalesce = coalesce
    }

    /// Runs until cancelled: a list and a pass over everything, then the watch; again from a fresh list
    /// whenever the watch ends (fell behind, history compacted) or a pass fails.
    func run() async {
        await EndpointSites.relisting("workloads", self.logger) { try await self.follow() }
    }

    /// One watch line, decoded as the kind it names (one parse).
    struct Line: Decodable {
        enum Object: Decodable {
            case node(Node)
            case workload(Workload)
            case endpoints(Endpoints)
            case other

            private enum Keys: String, CodingKey { case kind }

            init(from decoder: any Decoder) throws {
                switch try decoder.container(keyedBy: Keys.self).decodeIfPresent(String.self, forKey: .kind) {
                case Node.resource.kind: self = .node(try Node(from: decoder))
                case Workload.resource.kind: self = .workload(try Workload(from: decoder))
                case Endpoints.resource.kind: self = .endpoints(try Endpoints(from: decoder))
                default: self = .other
                }
            }
        }
        var type: String
        var object: Object?
    }

    private func follow() async throws {
        let store = self.writer.store
        var index = WorkloadIndex()
        let (nodes, nodesRV) = try await store.list(resource: Node.resource.plural, namespace: nil)
        for stored in nodes { index.put(try stored.decode(Node.self)) }
        let (workloads, workloadsRV) = try await store.list(resource: Workload.resource.plural, namespace: nil)
        for stored in workloads { index.put(try stored.decode(Workload.self)) }
        let (endpoints, endpointsRV) = try await store.list(resource: Endpoints.resource.plural, namespace: nil)
        for stored in endpoints { index.put(try stored.decode(Endpoints.self)) }
        index.dirtyEverything()
        try await self.reconcile(&index)
        var lastPass = ContinuousClock.now
        let sub = try await store.watch(
            after: min(nodesRV, workloadsRV, endpointsRV),
            filter: WatchFilter(resources: [Node.resource.plural, Workload.resource.plural, Endpoints.resource.plural])
        )
        // Three lists are three reads: a change at or below its own kind's list is in the index already.
        let listed = [
            Node.resource.kind: nodesRV, Workload.resource.kind: workloadsRV, Endpoints.resource.kind: endpointsRV,
        ]
        let decoder = JSONDecoder()
        try await withTaskCancellationHandler {
            while let lines = await sub.nextLines(kind: Node.resource.kind) {
                for line in lines {
                    guard let event = try? decoder.decode(Line.self, from: line) else { continue }
                    if event.type == "ERROR" { throw Status.gone("the watch of nodes, workloads and endpoints ended") }
                    guard event.type != "BOOKMARK", let object = event.object else { continue }
                    Self.apply(object, deleted: event.type == "DELETED", listed: listed, to: &index)
                }
                guard index.hasDirty else { continue }
                // Coalesce: what arrives meanwhile is read in one chunk after this pass.
                try await Task.sleep(until: lastPass + self.coalesce, clock: .continuous)
                try await self.reconcile(&index)
                lastPass = ContinuousClock.now
            }
        } onCancel: {
            sub.cancel()
        }
    }

    /// One watch line into the index (lines at or below their kind's list are in it already).
    static func apply(
        _ object: Line.Object,
        deleted: Bool,
        listed: [String: Int64],
        to index: inout WorkloadIndex
    ) {
        func fresh(_ meta: ObjectMeta, _ kind: String) -> Int64? {
            let rv = WorkloadIndex.version(meta)
            return rv > listed[kind] ?? 0 ? rv : nil
        }
        switch object {
        case .node(let n):
            guard let rv = fresh(n.metadata, Node.resource.kind) else { return }
            if deleted { index.removeNode(n.metadata.name, version: rv) } else { index.put(n) }
        case .workload(let w):
            guard let rv = fresh(w.metadata, Workload.resource.kind) else { return }
            if deleted { index.removeWorkload(WorkloadIndex.ref(of: w), version: rv) } else { index.put(w) }
        case .endpoints(let e):
            guard let rv = fresh(e.metadata, Endpoints.resource.kind) else { return }
            if deleted { index.removeEndpoints(WorkloadIndex.ref(of: e), version: rv) } else { index.put(e) }
        case .other:
            return
        }
    }

    /// One pass over what is dirty: the workloads' statuses, then their services' endpoints.
    func reconcile(_ index: inout WorkloadIndex) async throws {
        for ref in index.takeDirtyWorkloads() {
            guard let wanted = index.wantedStatus(of: ref), let current = index.workloads[ref] else { continue }
            guard wanted != current.status else { continue }
            // A failed write ends the pass and the follow: the next starts from a fresh list.
            let updated = try await self.writer.update(Workload.self, namespace: ref.namespace, name: ref.name) { o in
                guard o.status ?? WorkloadStatus() != wanted else { return false }
                o.status = wanted
                return true
            }
            guard let u = updated else { continue }
            index.put(u, dirty: false)
            if wanted.nodes != current.status.nodes {
                let names = wanted.nodes ?? []
                self.logger.info(
                    "workload \(ref) assigned to \(names.isEmpty ? "no node" : names.joined(separator: ", "))"
                )
            }
        }
        for service in index.takeDirtyServices() {
            try await self.write(service, index.wantedAddresses(of: service), &index)
        }
    }

    /// Writes a service's Endpoints when they are the controller's (or missing) and differ.
    private func write(
        _ service: WorkloadIndex.Ref,
        _ addresses: [EndpointAddress],
        _ index: inout WorkloadIndex
    ) async throws {
        guard let existing = index.endpoints[service] else {
            if addresses.isEmpty { return }
            var meta = ObjectMeta(name: service.name, namespace: service.namespace)
            meta.annotations = [Self.managedKey: Self.managedValue]
            let created = Endpoints(metadata: meta, spec: EndpointsSpec(addresses: addresses))
            do {
                _ = try await self.writer.save(
                    created,
                    namespace: service.namespace,
                    urlName: service.name,
                    createOnly: true,
                    writer: ObjectWriter.internalWriter
                )
                index.put(created, dirty: false)
            } catch StoreError.alreadyExists {}  // its line is on the way
            return
        }
        guard existing.managed else {
            self.logger.debug("workloads: endpoints \(service) are not managed by workloads; left alone")
            return
        }
        guard existing.addresses != addresses else { return }
        let updated = try await self.writer.update(Endpoints.self, namespace: service.namespace, name: service.name) {
            e in
            guard e.metadata.annotations?[Self.managedKey] == Self.managedValue, e.spec.addresses != addresses else {
                return false
            }
            e.spec.addresses = addresses
            return true
        }
        if let u = updated { index.put(u, dirty: false) }
    }
}
