import Logging
import MeshCore
import NIOCore
import Synchronization

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
/// It reconciles everything after each change of nodes or workloads (coalesced) and every
/// `resyncInterval`; each write is conditional, so a concurrent API write is never lost.
final class WorkloadController: Sendable {
    static let managedKey = "mesh.edge/managed-by"
    static let managedValue = "workloads"

    let writer: ObjectWriter
    let logger: Logger
    let resyncInterval: Duration

    init(writer: ObjectWriter, logger: Logger, resyncInterval: Duration = .seconds(5)) {
        self.writer = writer
        self.logger = logger
        self.resyncInterval = resyncInterval
    }

    /// Runs until cancelled.
    func run() async {
        let store = self.writer.store
        let (changes, signal) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        await withTaskGroup(of: Void.self) { group in
            for resource in [Node.resource.plural, Workload.resource.plural] {
                group.addTask {
                    while !Task.isCancelled {
                        do {
                            let rv = try await store.currentResourceVersion()
                            let sub = try await store.watch(after: rv, filter: WatchFilter(resource: resource))
                            await withTaskCancellationHandler {
                                // Bookmarks (idle watchers get one every few seconds) change nothing.
                                while let chunk = await sub.next(kind: resource) {
                                    if Self.hasChange(chunk) { signal.yield() }
                                }
                            } onCancel: {
                                sub.cancel()
                            }
                            // Ended (fell behind, or the store closes): watch again from the current version.
                            signal.yield()
                            try? await Task.sleep(for: .milliseconds(50))
                        } catch {
                            try? await Task.sleep(for: .milliseconds(200))
                        }
                    }
                }
            }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: self.resyncInterval)
                    signal.yield()
                }
            }
            group.addTask {
                signal.yield()
                for await _ in changes {
                    if Task.isCancelled { return }
                    do {
                        try await self.reconcile()
                        // Coalesce a burst of changes (a fleet coming online) into a few passes.
                        try? await Task.sleep(for: .milliseconds(100))
                    } catch {
                        if Task.isCancelled { return }
                        self.logger.warning("workloads: reconcile failed: \(error); retrying")
                        try? await Task.sleep(for: .milliseconds(200))
                        signal.yield()
                    }
                }
            }
            // Stops with the caller's cancellation.
            while !Task.isCancelled { try? await Task.sleep(for: .seconds(3600)) }
            signal.finish()
            group.cancelAll()
        }
    }

    func list<T: MeshObject>(_ type: T.Type) async throws -> [T] {
        let (items, _) = try await self.writer.store.list(resource: T.resource.plural, namespace: nil)
        return try items.map { stored in
            var o = try stored.decode(T.self)
            o.metadata.resourceVersion = String(stored.resourceVersion)
            return o
        }
    }

    /// Whether a watch chunk holds a change (not only bookmarks).
    static func hasChange(_ chunk: ByteBuffer) -> Bool {
        let text = String(buffer: chunk)
        return text.contains("\"ADDED\"") || text.contains("\"MODIFIED\"") || text.contains("\"DELETED\"")
            || text.contains("\"ERROR\"")
    }

    /// Whether Endpoints this controller wrote may exist (true until a pass found none): with no
    /// workloads and none of those, a pass reads nothing more than the workloads.
    private let mayHaveManaged = Mutex(true)

    /// One pass: assignments, then endpoints.
    func reconcile() async throws {
        var workloads = try await self.list(Workload.self)
        if workloads.isEmpty && !self.mayHaveManaged.withLock({ $0 }) { return }
        let nodes = try await self.list(Node.self)
        let byName = Dictionary(nodes.map { ($0.metadata.name, $0) }, uniquingKeysWith: { a, _ in a })
        for (i, w) in workloads.enumerated() {
            let before = Set(w.status?.nodes ?? [])
            let assigned = nodes.filter { n in
                w.selects(n) && (n.status?.phase == .ready || before.contains(n.metadata.name))
            }.map(\.metadata.name).sorted()
            let wanted = Self.status(of: w, assigned: assigned, nodes: byName)
            guard wanted != (w.status ?? WorkloadStatus()) else { continue }
            let updated = try await self.writer.update(
                Workload.self,
                namespace: w.effectiveNamespace,
                name: w.metadata.name
            ) { o in
                guard o.status ?? WorkloadStatus() != wanted else { return false }
                o.status = wanted
                return true
            }
            if let u = updated {
                workloads[i] = u
                if assigned != (w.status?.nodes ?? []) {
                    self.logger.info(
                        "workload \(w.effectiveNamespace)/\(w.metadata.name) assigned to \(assigned.isEmpty ? "no node" : assigned.joined(separator: ", "))"
                    )
                }
            }
        }
        try await self.reconcileEndpoints(workloads, nodes: byName)
    }

    struct ServiceKey: Hashable {
        var namespace: String
        var name: String
    }

    static func address(of node: Node) -> String? {
        let addresses = node.spec.addresses ?? []
        return (addresses.first { $0.type == .internalIP } ?? addresses.first { $0.type != .hostname })?.address
    }

    /// A workload's status: its nodes, and how many of them report it Running and the restarts they reported
    /// (from each node's `status.workloads`, written by its reports). One write per controller pass at most,
    /// however many nodes report.
    static func status(of w: Workload, assigned: [String], nodes: [String: Node]) -> WorkloadStatus {
        var running = 0
        var restarts = 0
        var reported = 0
        for name in assigned {
            guard let instance = nodes[name]?.status?.instance(of: w.effectiveNamespace, w.metadata.name) else {
                continue
            }
            reported += 1
            if instance.phase == .running { running += 1 }
            restarts += instance.restarts ?? 0
        }
        return WorkloadStatus(
            nodes: assigned.isEmpty ? nil : assigned,
            running: reported == 0 ? nil : running,
            restarts: reported == 0 ? nil : restarts
        )
    }

    /// The addresses each workload service should have.
    static func desiredEndpoints(_ workloads: [Workload], nodes: [String: Node]) -> [ServiceKey: [EndpointAddress]] {
        var wanted: [ServiceKey: [EndpointAddress]] = [:]
        for w in workloads {
            let ports = w.spec.ports ?? []
            guard !ports.isEmpty else { continue }
            let key = ServiceKey(namespace: w.effectiveNamespace, name: w.serviceName)
            var list = wanted[key] ?? []
            for name in w.status?.nodes ?? [] {
                guard let node = nodes[name], let ip = Self.address(of: node),
                    let instance = node.status?.instance(of: w.effectiveNamespace, w.metadata.name)
                else { continue }
                list.append(
                    EndpointAddress(
                        ip: ip,
                        ports: ports.map { EndpointPort(name: $0.name, port: $0.port) },
                        node: name,
                        site: node.spec.site,
                        ready: instance.phase == .running && node.status?.phase == .ready
                    )
                )
            }
            wanted[key] = list
        }
        return wanted.mapValues { $0.sorted { ($0.node ?? "", $0.ip) < ($1.node ?? "", $1.ip) } }
    }

    private func reconcileEndpoints(_ workloads: [Workload], nodes: [String: Node]) async throws {
        var wanted = Self.desiredEndpoints(workloads, nodes: nodes)
        // Endpoints this controller wrote before whose workloads are gone: emptied.
        var managed = 0
        for e in try await self.list(Endpoints.self)
        where e.metadata.annotations?[Self.managedKey] == Self.managedValue {
            managed += 1
            let key = ServiceKey(namespace: e.effectiveNamespace, name: e.metadata.name)
            if wanted[key] == nil { wanted[key] = [] }
        }
        self.mayHaveManaged.withLock { $0 = managed > 0 || !wanted.isEmpty }
        for (key, addresses) in wanted {
            let storeKey = ObjectKey(resource: Endpoints.resource.plural, namespace: key.namespace, name: key.name)
            guard let stored = try await self.writer.store.get(storeKey) else {
                if addresses.isEmpty { continue }
                var meta = ObjectMeta(name: key.name, namespace: key.namespace)
                meta.annotations = [Self.managedKey: Self.managedValue]
                do {
                    _ = try await self.writer.save(
                        Endpoints(metadata: meta, spec: EndpointsSpec(addresses: addresses)),
                        namespace: key.namespace,
                        urlName: key.name,
                        createOnly: true,
                        writer: ObjectWriter.internalWriter
                    )
                } catch StoreError.alreadyExists {}
                continue
            }
            let existing = try stored.decode(Endpoints.self)
            guard existing.metadata.annotations?[Self.managedKey] == Self.managedValue else {
                self.logger.debug(
                    "workloads: endpoints \(key.namespace)/\(key.name) are not managed by workloads; left alone"
                )
                continue
            }
            guard existing.spec.addresses != addresses else { continue }
            try await self.writer.update(Endpoints.self, namespace: key.namespace, name: key.name) { e in
                guard e.spec.addresses != addresses else { return false }
                e.spec.addresses = addresses
                return true
            }
        }
    }
}
