import NIOCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Where an object lives: resource (plural), namespace ("" for cluster-scoped) and name.
public struct ObjectKey: Hashable, Sendable, CustomStringConvertible {
    public var resource: String
    public var namespace: String
    public var name: String

    public init(resource: String, namespace: String, name: String) {
        self.resource = resource
        self.namespace = namespace
        self.name = name
    }

    public var description: String {
        self.namespace.isEmpty ? "\(self.resource)/\(self.name)" : "\(self.resource)/\(self.namespace)/\(self.name)"
    }
}

/// An object as stored: its JSON (with `metadata.resourceVersion` set to `resourceVersion`) and labels.
public struct StoredObject: Sendable {
    public var key: ObjectKey
    public var resourceVersion: Int64
    public var labels: [String: String]
    public var json: ByteBuffer

    public init(key: ObjectKey, resourceVersion: Int64, labels: [String: String], json: ByteBuffer) {
        self.key = key
        self.resourceVersion = resourceVersion
        self.labels = labels
        self.json = json
    }
}

extension StoredObject {
    /// The object's JSON decoded as `T`.
    public func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(self.json.readableBytesView))
    }
}

/// One committed change, as watchers see it.
public struct StoreEvent: Sendable {
    public enum Kind: Int64, Sendable {
        case added = 1
        case modified = 2
        case deleted = 3

        var name: String {
            switch self {
            case .added: return "ADDED"
            case .modified: return "MODIFIED"
            case .deleted: return "DELETED"
            }
        }
    }

    public var kind: Kind
    public init(kind: Kind, object: StoredObject) {
        self.kind = kind
        self.object = object
    }

    /// The object after the change; for a deletion, its last state stamped with the deletion's version.
    public var object: StoredObject
    /// For a device or workload (`NodePlacement`): the nodes it was placed on before the change, as a store
    /// kept it with the event (SQLite), for the history a hub loads at start; nil: not known.
    public var placedBefore: [String]?
    public var resourceVersion: Int64 { self.object.resourceVersion }
}

/// What a write expects to find.
public enum Precondition: Sendable, Equatable {
    /// Whatever is there.
    case any
    /// Nothing: create only.
    case absent
    /// The object at exactly this resourceVersion.
    case version(Int64)
}

/// A change to commit atomically: one object written or deleted, plus unique reservations (such as
/// a VIP) taken or released in the same transaction.
public struct Write: Sendable {
    public enum Operation: Sendable {
        /// The closure gets the new resourceVersion and returns the object's JSON and labels.
        case put(@Sendable (Int64) throws -> (json: ByteBuffer, labels: [String: String]))
        /// The closure gets the deletion's resourceVersion and returns the object's final JSON.
        case delete(@Sendable (Int64) throws -> ByteBuffer)
    }

    public var key: ObjectKey
    public var expect: Precondition
    public var operation: Operation
    /// Tokens this object takes; fails with `StoreError.reserved` if another owner holds one.
    public var reserve: [String]
    /// Tokens this object gives back.
    public var release: [String]

    public init(
        key: ObjectKey,
        expect: Precondition,
        operation: Operation,
        reserve: [String] = [],
        release: [String] = []
    ) {
        self.key = key
        self.expect = expect
        self.operation = operation
        self.reserve = reserve
        self.release = release
    }
}

public enum StoreError: Error, Sendable, Equatable, CustomStringConvertible {
    case notFound(ObjectKey)
    case alreadyExists(ObjectKey)
    /// The object is at another version than the write expected (`nil`: it does not exist).
    case conflict(ObjectKey, current: Int64?)
    case reserved(token: String, owner: String)
    /// A watch from a version older than the kept history.
    case gone(requested: Int64, oldest: Int64)
    /// A watch from a version the store has not reached.
    case tooNew(requested: Int64, current: Int64)
    case unavailable(String)

    public var description: String {
        switch self {
        case .notFound(let k): return "\(k) not found"
        case .alreadyExists(let k): return "\(k) already exists"
        case .conflict(let k, let current):
            return current.map { "\(k) was modified: it is at resourceVersion \($0)" } ?? "\(k) does not exist"
        case .reserved(let t, let owner): return "\(t) is taken by \(owner)"
        case .gone(let req, let oldest):
            return "resourceVersion \(req) is too old: history starts after \(oldest - 1); list again"
        case .tooNew(let req, let current):
            return "resourceVersion \(req) is newer than the store's \(current); list again"
        case .unavailable(let why): return "store unavailable: \(why)"
        }
    }
}

/// What a watch wants: one resource (a collection's watch) or several (`GET /apis/mesh.edge/v1/watch?resources=`,
/// one stream for every kind an agent follows), optionally one namespace, a label selector, and a node
/// (`NodePlacement`: the devices and workloads placed on it, every object of the other kinds).
public struct WatchFilter: Sendable {
    /// The resources' plurals, without repeats. An array: a few short strings compared in turn cost less than
    /// hashing one, and the hub runs every watcher's filter on every change.
    public private(set) var resources: [String]
    public var namespace: String?
    public var selector: LabelSelector?
    /// Only the placed kinds' objects placed on this node (`NodePlacement`).
    public var node: String?

    public init(resource: String, namespace: String? = nil, selector: LabelSelector? = nil, node: String? = nil) {
        self.init(resources: [resource], namespace: namespace, selector: selector, node: node)
    }

    public init(resources: [String], namespace: String? = nil, selector: LabelSelector? = nil, node: String? = nil) {
        var seen: [String] = []
        for r in resources where !seen.contains(r) { seen.append(r) }
        self.resources = seen
        self.namespace = namespace
        self.selector = selector
        self.node = node
    }

    /// The resources as one name, for messages: `services` or `services,endpoints`.
    public var resource: String { self.resources.joined(separator: ",") }

    /// Resource, namespace and labels only: the node scope is the hub's (it places each change once) and the
    /// node-scoped list's (`ControlAPI.listed`).
    func matchesIgnoringNode(_ o: StoredObject) -> Bool {
        self.resources.contains(o.key.resource) && (self.namespace.map { $0 == o.key.namespace } ?? true)
            && (self.selector?.matches(o.labels) ?? true)
    }

    /// Whether `resource`'s changes reach this watcher by node (`WatchHub`'s index).
    func scopedByNode(_ resource: String) -> Bool { self.node != nil && NodePlacement.isPlaced(resource) }
}

extension Store {
    public func watchAtOnce(after resourceVersion: Int64, filter: WatchFilter) throws -> WatchSubscription? { nil }

    public func get(_ keys: [ObjectKey]) async throws -> [StoredObject] {
        var out: [StoredObject] = []
        for key in keys { if let o = try await self.get(key) { out.append(o) } }
        return out
    }
}

/// The control plane's storage: versioned objects, atomic conditional writes, list and watch.
/// Implementations: `SQLiteStore` (one machine); `EtcdStore` (replicas over one etcd).
public protocol Store: Sendable {
    /// The version of the latest write.
    func currentResourceVersion() async throws -> Int64
    func get(_ key: ObjectKey) async throws -> StoredObject?
    /// The objects at `keys` that exist, in one read where the store can (a node-scoped list's own objects).
    func get(_ keys: [ObjectKey]) async throws -> [StoredObject]
    /// Every object of `resource` (in `namespace` when given), consistent at the returned version.
    func list(resource: String, namespace: String?) async throws -> (items: [StoredObject], resourceVersion: Int64)
    /// Commits `write` atomically and returns the object as written (for a delete, its final state).
    func commit(_ write: Write) async throws -> StoredObject
    /// Every change after `resourceVersion` matching `filter`, then live changes, in order.
    func watch(after resourceVersion: Int64, filter: WatchFilter) async throws -> WatchSubscription
    /// `watch(after:filter:)` when the store can start it without waiting (its hub holds that version), else
    /// nil: a watch answered on the connection's event loop, without a task (`ControlAPI.respondAtOnce`).
    func watchAtOnce(after resourceVersion: Int64, filter: WatchFilter) throws -> WatchSubscription?
    /// Every reservation token starting with `prefix`, with its owner (to rebuild allocators at start-up).
    func reservations(prefix: String) async throws -> [String: String]
    /// Releases files and connections.
    func close() async throws

    /// The node heartbeat times last saved (node name → milliseconds since the epoch). A side
    /// table: no resourceVersion, no watch event (see `NodeLifecycle`).
    func loadHeartbeats() async throws -> [String: Int64]
    /// Saves heartbeat times in one batch and forgets those of deleted nodes.
    func saveHeartbeats(_ beats: [String: Int64], forget: [String]) async throws
}
