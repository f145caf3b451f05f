import Logging
import MeshCore
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Keeps each endpoint address's `site` equal to the site of the node it names, in the control plane, so
/// that agents route by the endpoints alone and follow no Node (every agent following every Node is N
/// lists of N Nodes when a fleet starts and N deliveries of every Node change; perf/RESULTS.md). The same
/// split as Kubernetes' EndpointSlices, whose endpoints carry their node's zone.
///
/// - A write of Endpoints stamps the sites of the nodes registered then (`Endpoints.prepare`).
/// - This controller fixes the rest: endpoints written before their node registered, and every endpoint of
///   a node whose site changed. It lists Nodes and Endpoints, keeps which endpoints name which node, and
///   follows both kinds over one watch; a node that appears or changes site gets its endpoints rewritten
///   (conditional writes: a concurrent API write is never lost). Every replica runs one; they agree.
/// - An address naming a node that is not registered, or that has no site, keeps the site it was written
///   with. A deleted node's endpoints keep its last site.
final class EndpointSites: Sendable {
    let writer: ObjectWriter
    let logger: Logger

    init(writer: ObjectWriter, logger: Logger) {
        self.writer = writer
        self.logger = logger
    }

    /// Sets the site of every address of `endpoints` whose node has one (`site(node)`: nil, the node is not
    /// registered; `.some(nil)`, it has no site). Whether anything changed.
    @discardableResult
    static func stamp(_ endpoints: inout Endpoints, site: (String) -> String??) -> Bool {
        var changed = false
        for i in endpoints.spec.addresses.indices {
            guard let node = endpoints.spec.addresses[i].node, let known = site(node), let s = known,
                endpoints.spec.addresses[i].site != s
            else { continue }
            endpoints.spec.addresses[i].site = s
            changed = true
        }
        return changed
    }

    /// What the controller knows: each registered node's site, and which endpoints name which node.
    struct Index {
        var sites: [String: String?] = [:]
        var byNode: [String: Set<ObjectKey>] = [:]
        var nodesOf: [ObjectKey: Set<String>] = [:]

        mutating func endpoints(_ key: ObjectKey, nodes: Set<String>) {
            for n in self.nodesOf[key] ?? [] where !nodes.contains(n) {
                self.byNode[n]?.remove(key)
                if self.byNode[n]?.isEmpty == true { self.byNode[n] = nil }
            }
            for n in nodes { self.byNode[n, default: []].insert(key) }
            self.nodesOf[key] = nodes.isEmpty ? nil : nodes
        }

        /// Whether an address of these endpoints has a site other than its registered node's.
        func stale(_ addresses: [(node: String?, site: String?)]) -> Bool {
            addresses.contains { a in
                guard let n = a.node, let known = self.sites[n], let s = known else { return false }
                return a.site != s
            }
        }
    }

    /// One watch line, as much of it as the controller reads (a Node's or an Endpoints' name and sites).
    struct Line: Decodable {
        struct Object: Decodable {
            struct Metadata: Decodable {
                var name: String
                var namespace: String?
                var resourceVersion: String?
            }
            struct Address: Decodable {
                var node: String?
                var site: String?
            }
            struct Spec: Decodable {
                var site: String?
                var addresses: [Address]?
            }
            var kind: String?
            var metadata: Metadata?
            var spec: Spec?
        }
        var type: String
        var object: Object?
    }

    /// Runs until cancelled: a pass over everything, then the watch; again from a fresh list whenever the
    /// watch ends (fell behind, the store's history was compacted).
    func run() async {
        await Self.relisting("endpoint sites", self.logger) { try await self.follow() }
    }

    /// A controller's loop (this one's and the `WorkloadController`'s): `follow` (a list, then a watch) again
    /// after it ends or fails, 200 ms later, until cancelled.
    static func relisting(_ name: String, _ logger: Logger, _ follow: () async throws -> Void) async {
        while !Task.isCancelled {
            do {
                try await follow()
            } catch {
                if Task.isCancelled { return }
                logger.warning("\(name): \(error); listing again")
            }
            try? await Task.sleep(for: .milliseconds(200))
        }
    }

    private func follow() async throws {
        let store = self.writer.store
        var index = Index()
        let (nodes, nodesRV) = try await store.list(resource: Node.resource.plural, namespace: nil)
        for stored in nodes {
            let node = try stored.decode(Node.self)
            index.sites[node.metadata.name] = node.spec.site
        }
        let (endpoints, endpointsRV) = try await store.list(resource: Endpoints.resource.plural, namespace: nil)
        var stale: [ObjectKey] = []
        for stored in endpoints {
            let e = try stored.decode(Endpoints.self)
            index.endpoints(stored.key, nodes: Set(e.spec.addresses.compactMap(\.node)))
            if index.stale(e.spec.addresses.map { ($0.node, $0.site) }) { stale.append(stored.key) }
        }
        try await self.fix(stale, index)
        let sub = try await store.watch(
            after: min(nodesRV, endpointsRV),
            filter: WatchFilter(resources: [Node.resource.plural, Endpoints.resource.plural])
        )
        // The two lists are two reads: a change at or below its own kind's list is in the index already.
        let listed = [Node.resource.kind: nodesRV, Endpoints.resource.kind: endpointsRV]
        try await withTaskCancellationHandler {
            let decoder = JSONDecoder()
            while let lines = await sub.nextLines(kind: Node.resource.kind) {
                var toFix = Set<ObjectKey>()
                for line in lines {
                    guard let event = try? decoder.decode(Line.self, from: line) else { continue }
                    if event.type == "ERROR" { throw Status.gone("the watch of nodes and endpoints ended") }
                    guard let object = event.object, let meta = object.metadata, let kind = object.kind,
                        let rv = meta.resourceVersion.flatMap({ Int64($0) }), rv > listed[kind] ?? 0
                    else { continue }
                    switch kind {
                    case Node.resource.kind:
                        if event.type == "DELETED" {
                            index.sites[meta.name] = nil
                            continue
                        }
                        let site = object.spec?.site
                        if let known = index.sites[meta.name], known == site { continue }
                        index.sites[meta.name] = .some(site)
                        if site != nil { toFix.formUnion(index.byNode[meta.name] ?? []) }
                    case Endpoints.resource.kind:
                        let key = ObjectKey(
                            resource: Endpoints.resource.plural,
                            namespace: meta.namespace ?? "default",
                            name: meta.name
                        )
                        let addresses = (object.spec?.addresses ?? []).map { ($0.node, $0.site) }
                        if event.type == "DELETED" {
                            index.endpoints(key, nodes: [])
                            continue
                        }
                        index.endpoints(key, nodes: Set(addresses.compactMap(\.0)))
                        if index.stale(addresses) { toFix.insert(key) }
                    default:
                        continue
                    }
                }
                try await self.fix(toFix.sorted { $0.description < $1.description }, index)
            }
        } onCancel: {
            sub.cancel()
        }
    }

    /// Rewrites each of `keys` with its nodes' sites (read again, written conditionally).
    private func fix(_ keys: some Sequence<ObjectKey>, _ index: Index) async throws {
        for key in keys {
            var changed = false
            try await self.writer.update(Endpoints.self, namespace: key.namespace, name: key.name) { e in
                changed = Self.stamp(&e) { index.sites[$0] }
                return changed
            }
            if changed {
                self.logger.info("endpoints \(key.namespace)/\(key.name): addresses given their nodes' sites")
            }
        }
    }
}
