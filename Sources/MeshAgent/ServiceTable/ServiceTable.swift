import Logging
import MeshClient
import MeshCore
import ServiceLifecycle
import Synchronization

extension ServiceKey {
    /// The key of a namespaced object of the control plane.
    public init(_ object: some MeshObject) {
        self.init(namespace: object.effectiveNamespace, name: object.metadata.name)
    }
}

/// What the agent knows about services at one moment: an immutable value handed to the DNS zone
/// and the data plane together, so both follow the same table.
public struct ServiceSnapshot: Sendable, Equatable {
    public enum Source: String, Sendable {
        /// Read from the agent's cache at start-up: the control plane has not answered yet.
        case cache
        /// In sync with the control plane.
        case control
    }

    /// Each service's spec (`TableService`).
    public var services: [ServiceKey: TableService] = [:]
    /// Each service's endpoints, compact (`TableEndpoints`).
    public var endpoints: [ServiceKey: TableEndpoints] = [:]
    /// The relays by name: where this agent opens its relay session.
    public var relays: [String: Relay] = [:]
    public var servicesVersion: Int64?
    public var endpointsVersion: Int64?
    public var relaysVersion: Int64?
    public var source: Source = .cache

    public init() {}
}

/// A kind the agent keeps in its table: how a full list and one watch event fold into the snapshot.
public protocol SnapshotMember: MeshObject {
    static var version: WritableKeyPath<ServiceSnapshot, Int64?> { get }
    static func replace(_ items: [Self], in snapshot: inout ServiceSnapshot)
    /// Puts `object` in (`present`) or takes it out of the snapshot.
    func fold(into snapshot: inout ServiceSnapshot, present: Bool)
}

extension MeshService: SnapshotMember {
    public static var version: WritableKeyPath<ServiceSnapshot, Int64?> { \.servicesVersion }
    public static func replace(_ items: [MeshService], in snapshot: inout ServiceSnapshot) {
        snapshot.services = Dictionary(
            items.map { (ServiceKey($0), TableService($0)) },
            uniquingKeysWith: { _, b in b }
        )
    }
    public func fold(into snapshot: inout ServiceSnapshot, present: Bool) {
        snapshot.services[ServiceKey(self)] = present ? TableService(self) : nil
    }
}

/// What the agent's table keeps of a service: its spec and resourceVersion (its name and namespace are the
/// table's key). The uid, creation time, labels and annotations (a heap string or dictionary each) are nothing
/// the zone or the routes are made of, and neither are apiVersion and kind; the cache keeps the whole object.
/// 96 bytes where a `MeshService` is 216, in a dictionary of a slot per service and as many spare.
public struct TableService: Sendable, Equatable {
    public var resourceVersion: String?
    public var spec: ServiceSpec

    public init(_ service: MeshService) {
        self.resourceVersion = service.metadata.resourceVersion
        self.spec = service.spec
    }
}

extension Endpoints: SnapshotMember {
    public static var version: WritableKeyPath<ServiceSnapshot, Int64?> { \.endpointsVersion }
    public static func replace(_ items: [Endpoints], in snapshot: inout ServiceSnapshot) {
        snapshot.endpoints = Dictionary(
            items.map { (ServiceKey($0), TableEndpoints($0)) },
            uniquingKeysWith: { _, b in b }
        )
    }
    public func fold(into snapshot: inout ServiceSnapshot, present: Bool) {
        snapshot.endpoints[ServiceKey(self)] = present ? TableEndpoints(self) : nil
    }
}

extension Relay: SnapshotMember {
    public static var version: WritableKeyPath<ServiceSnapshot, Int64?> { \.relaysVersion }
    public static func replace(_ items: [Relay], in snapshot: inout ServiceSnapshot) {
        snapshot.relays = Dictionary(items.map { ($0.metadata.name, $0) }, uniquingKeysWith: { _, b in b })
    }
    public func fold(into snapshot: inout ServiceSnapshot, present: Bool) {
        snapshot.relays[self.metadata.name] = present ? self : nil
    }
}

extension ServiceSnapshot {
    /// Folds one reflector update into the table: a full list replaces the kind's objects, a watch event
    /// puts one in or takes it out; either moves the kind's version.
    public mutating func apply<T: SnapshotMember>(_ update: ReflectorUpdate<T>) {
        switch update {
        case .replaced(let items, let rv):
            T.replace(items, in: &self)
            self[keyPath: T.version] = rv
        case .changed(let event):
            switch event {
            case .added(let o), .modified(let o): o.fold(into: &self, present: true)
            case .deleted(let o): o.fold(into: &self, present: false)
            case .bookmark, .error: break
            }
            if let rv = event.resourceVersion { self[keyPath: T.version] = rv }
        }
    }
}

/// Keeps the agent's service table in sync with the control plane and on disk.
///
/// At start it serves what the cache holds at once; then one reflector (services, endpoints and relays,
/// over one watch; no Nodes: an endpoint carries its node's site, and a peer's link addresses are looked up
/// when a link to it is dialed, `NodeDirectory`) resumes from the cached versions, list again on 410, and retry while the control
/// plane is away. Every change is persisted before it is published; bursts are coalesced so a
/// flood of endpoint updates rebuilds the zone and routes once per `coalesce` interval.
public final class ServiceTableSync: Service, Sendable {
    public struct Configuration: Sendable {
        public var coalesce: Duration = .milliseconds(20)
        public var backoff = ReflectorBackoff()
        /// Follow the three kinds here, over one watch. False: the caller follows `reflectedKinds()` in its
        /// own `MultiReflector` (the mesh agent's one watch for the table and the node's edge part).
        public var followsControlPlane = true

        public init() {}
    }

    let client: ControlClient
    let cache: AgentCache
    let logger: Logger
    let configuration: Configuration
    let onSnapshot: @Sendable (ServiceSnapshot) async -> Void
    private let state = Mutex<(snapshot: ServiceSnapshot, dirty: Bool, synced: Set<String>)>(
        (ServiceSnapshot(), false, [])
    )
    private let wake = AsyncWakeup()

    public init(
        client: ControlClient,
        cache: AgentCache,
        configuration: Configuration = .init(),
        logger: Logger,
        onSnapshot: @escaping @Sendable (ServiceSnapshot) async -> Void
    ) {
        self.client = client
        self.cache = cache
        self.configuration = configuration
        self.logger = logger
        self.onSnapshot = onSnapshot
    }

    /// The table as last published.
    public var snapshot: ServiceSnapshot { self.state.withLock { $0.snapshot } }

    /// Loads the cache and publishes it (when it holds anything). Called by `run()`; callable
    /// earlier so the agent answers from the cache before it binds anything else.
    public func loadCache() async throws -> ServiceSnapshot {
        var snap = ServiceSnapshot()
        let (services, svcRV) = try self.loadCached(MeshService.self, into: &snap)
        let (endpoints, epRV) = try self.loadCached(Endpoints.self, into: &snap)
        _ = try self.loadCached(Relay.self, into: &snap)
        snap.source = .cache
        self.state.withLock { $0.snapshot = snap }
        if svcRV != nil || epRV != nil {
            self.logger.info(
                "serving \(services) services and \(endpoints) endpoints from the cache (resourceVersion \(svcRV ?? 0)/\(epRV ?? 0)) until the control plane answers"
            )
        }
        await self.onSnapshot(snap)
        return snap
    }

    private func loadCached<T: SnapshotMember>(
        _ type: T.Type,
        into snap: inout ServiceSnapshot
    ) throws -> (count: Int, version: Int64?) {
        let (items, rv) = try self.cache.load(T.self)
        T.replace(items, in: &snap)
        snap[keyPath: T.version] = rv
        return (items.count, rv)
    }

    /// The kinds the table follows; the snapshot is `.control` once each has been listed.
    static let kinds = 3

    public func run() async throws {
        // On graceful shutdown the whole group is cancelled: reflectors stop watching, the
        // publisher stops waiting.
        await cancelWhenGracefulShutdown {
            await withTaskCancellationHandler {
                await withTaskGroup(of: Void.self) { group in
                    if self.configuration.followsControlPlane {
                        var reflector = MultiReflector(
                            client: self.client,
                            kinds: self.reflectedKinds(),
                            logger: self.logger
                        )
                        reflector.backoff = self.configuration.backoff
                        group.addTask { await reflector.run() }
                    }
                    group.addTask { await self.publishLoop() }
                    await group.waitForAll()
                }
            } onCancel: {
                self.wake.cancel()
            }
        }
    }

    /// The three kinds the table follows, each from the version the table holds now (the cache's, once
    /// `loadCache` ran; nil: listed first). `Configuration.followsControlPlane` false: the caller runs them in
    /// its own `MultiReflector`.
    public func reflectedKinds() -> [ReflectedKind] {
        let snap = self.snapshot
        return [
            .of(MeshService.self, from: snap.servicesVersion) { try self.apply($0) },
            .of(Endpoints.self, from: snap.endpointsVersion) { try self.apply($0) },
            .of(Relay.self, from: snap.relaysVersion) { try self.apply($0) },
        ]
    }

    /// Persists an update, then folds it into the table and schedules a publish.
    func apply<T: SnapshotMember>(_ update: ReflectorUpdate<T>) throws {
        switch update {
        case .replaced(let items, let rv): try self.cache.replace(items, resourceVersion: rv)
        case .changed(let event): try self.cache.apply(event)
        }
        let kind = T.resource.plural
        self.state.withLock { s in
            // In place: the dictionaries are copied only when the last published table still shares them
            // (once per publish), not once per event (20,000 copies of a growing table while a large mesh
            // is written).
            s.snapshot.apply(update)
            s.synced.insert(kind)
            if s.synced.count == Self.kinds { s.snapshot.source = .control }
            s.dirty = true
        }
        self.wake.signal()
    }

    private func publishLoop() async {
        let clock = ContinuousClock()
        var lastApply = Duration.zero
        while await self.wake.wait() {
            // Let a burst settle, then publish once. Waiting at least as long as the last apply took
            // keeps a large table under a stream of changes from spending all its time rebuilding.
            try? await Task.sleep(for: max(self.configuration.coalesce, lastApply))
            let snap = self.state.withLock { s -> ServiceSnapshot? in
                guard s.dirty else { return nil }
                s.dirty = false
                return s.snapshot
            }
            if let snap {
                let start = clock.now
                await self.onSnapshot(snap)
                lastApply = min(clock.now - start, .seconds(5))
            }
        }
    }
}

/// Wakes one waiting task; signals while nobody waits are remembered (once).
final class AsyncWakeup: Sendable {
    private let state = Mutex<(pending: Bool, cancelled: Bool, waiter: CheckedContinuation<Bool, Never>?)>(
        (false, false, nil)
    )

    func signal() {
        let w = self.state.withLock { s -> CheckedContinuation<Bool, Never>? in
            defer { s.waiter = nil }
            if s.waiter == nil { s.pending = true }
            return s.waiter
        }
        w?.resume(returning: true)
    }

    func cancel() {
        let w = self.state.withLock { s -> CheckedContinuation<Bool, Never>? in
            s.cancelled = true
            defer { s.waiter = nil }
            return s.waiter
        }
        w?.resume(returning: false)
    }

    /// Waits for a signal; false once cancelled.
    func wait() async -> Bool {
        await withCheckedContinuation { c in
            let now = self.state.withLock { s -> Bool? in
                if s.cancelled { return false }
                if s.pending {
                    s.pending = false
                    return true
                }
                s.waiter = c
                return nil
            }
            if let now { c.resume(returning: now) }
        }
    }
}
