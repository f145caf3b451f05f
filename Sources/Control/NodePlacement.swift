import MeshCore
import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Which nodes an object is placed on, for node-scoped lists and watches (`?node=NAME`): a Device on its
/// `spec.node`, a Workload on its `status.nodes`. Every other kind concerns every node: a node-scoped request
/// gets all of its objects.
///
/// An agent watches its own devices and workloads this way, not every one in the fleet: a twin report is a
/// Device write (and a workload's instance counts change with its nodes' reports), so with every agent
/// following every one each report reached every agent (N agents × N reports). Kubernetes' kubelet watches its pods with
/// `fieldSelector=spec.nodeName=`, indexed in the API server's watch cache, for the same reason.
public struct NodePlacement: Sendable, Equatable {
    /// The nodes, sorted, without repeats.
    public var nodes: [String]
    /// What a node's agent uses of the object: a change that leaves it and the nodes alone is not sent to
    /// node-scoped watchers. A workload's instance counts (`status.running`, `status.restarts`) are left out
    /// of it; a device's agent uses all of it (its twins' desired versions are in its status).
    var digest: Int

    /// The placed kinds.
    public static let resources: Set<String> = Set(Registry.types.filter(\.placedOnNodes).map(\.plural))

    static func isPlaced(_ resource: String) -> Bool { Self.resources.contains(resource) }

    /// The placement of a stored object of a placed kind; nil for other kinds. An object that does not
    /// decode is placed nowhere (it never passed validation; node-scoped watchers do not get it).
    static func of(_ object: StoredObject) -> NodePlacement? {
        switch object.key.resource {
        case Device.resource.plural:
            guard let d = try? object.decode(DeviceProbe.self) else { return NodePlacement(nodes: [], digest: 0) }
            // Every change to a device concerns its node: the version differs on every write.
            return NodePlacement(nodes: [d.spec.node], digest: Int(truncatingIfNeeded: object.resourceVersion))
        case Workload.resource.plural:
            guard let w = try? object.decode(Workload.self) else { return NodePlacement(nodes: [], digest: 0) }
            var h = Hasher()
            h.combine(w.metadata.name)
            h.combine(w.metadata.uid)
            h.combine(w.metadata.labels)
            h.combine(w.metadata.annotations)
            h.combine(w.spec)
            let nodes = Array(Set(w.status?.nodes ?? [])).sorted()
            h.combine(nodes)
            return NodePlacement(nodes: nodes, digest: h.finalize())
        default:
            return nil
        }
    }

    /// The fields of a Device that place it.
    private struct DeviceProbe: Decodable {
        struct Spec: Decodable { var node: String }
        var spec: Spec
    }

    /// Whether a list's or watch's `node` scope admits `object` (always, for a kind that is not placed).
    public static func admits(_ object: StoredObject, node: String) -> Bool {
        guard let p = Self.of(object) else { return true }
        return p.nodes.contains(node)
    }
}
