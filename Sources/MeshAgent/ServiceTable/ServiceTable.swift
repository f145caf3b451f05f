import Logging
import MeshClient
import MeshCore
import Synchronization

import func ServiceLifecycle.cancelWhenGracefulShutdown

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

    public var services: [ServiceKey: Service] = [:]
    public var endpoints: [ServiceKey: Endpoints] = [:]
    public var servicesVersion: Int64?
    public var endpointsVersion: Int64?
    public var source: Source = .cache

    public init() {}
}

/// Keeps the agent's service table in sync with the control plane and on disk.
///
/// At start it serves what the cache holds at once; then two reflectors (services, endpoints)
/// resume their watches from the cached versions, list again on 410, and retry while the control
/// plane is away. Every change is persisted before it is published; bursts are coalesced so a
/// flood of endpoint updates rebuilds the zone and routes once per `coalesce` interval.
public final class ServiceTableSync: Sendable {
    public struct Configuration: Sendable {
        public var coalesce: Duration = .milliseconds(20)
        public var backoff = Reflector<Service>.Backoff()

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
        let (services, svcRV) = try self.cache.load(Service.self)
        let (endpoints, epRV) = try self.cache.load(Endpoints.self)
        var snap = ServiceSnapshot()
        snap.services = Dictionary(services.map { (ServiceKey($0), $0) }, uniquingKeysWith: { _, b in b })
        snap.endpoints = Dictionary(endpoints.map { (ServiceKey($0), $0) }, uniquingKeysWith: { _, b in b })
        snap.servicesVersion = svcRV
        snap.endpointsVersion = epRV
        snap.source = .cache
        self.state.withLock { $0.snapshot = snap }
        if svcRV != nil || epRV != nil {
            self.logger.info(
                "serving \(services.count) services and \(endpoints.count) endpoints from the cache (resourceVersion \(svcRV ?? 0)/\(epRV ?? 0)) until the control plane answers"
            )
        }
        await self.onSnapshot(snap)
        return snap
    }

    public func run() async throws {
        let cached = self.state.withLock { $0.snapshot }
        // On graceful shutdown the whole group is cancelled: reflectors stop watching, the
        // publisher stops waiting.
        await cancelWhenGracefulShutdown {
            await withTaskCancellationHandler {
                await withTaskGroup(of: Void.self) { group in
                    group.addTask { await self.reflect(MeshCore.Service.self, from: cached.servicesVersion) }
                    group.addTask { await self.reflect(Endpoints.self, from: cached.endpointsVersion) }
                    group.addTask { await self.publishLoop() }
                    await group.waitForAll()
                }
            } onCancel: {
                self.wake.cancel()
            }
        }
    }

    private func reflect<T: MeshObject>(_ type: T.Type, from rv: Int64?) async {
        var reflector = Reflector<T>(client: self.client, logger: self.logger)
        reflector.backoff.initial = self.configuration.backoff.initial
        reflector.backoff.maximum = self.configuration.backoff.maximum
        await reflector.run(from: rv) { update in
            try self.apply(update)
        }
    }

    /// Persists an update, then folds it into the table and schedules a publish.
    func apply<T: MeshObject>(_ update: ReflectorUpdate<T>) throws {
        switch update {
        case .replaced(let items, let rv): try self.cache.replace(items, resourceVersion: rv)
        case .changed(let event): try self.cache.apply(event)
        }
        let kind = T.resource.plural
        self.state.withLock { s in
            var snap = s.snapshot
            switch update {
            case .replaced(let items, let rv):
                // Decide by the kind, not by casting the list: an empty [Endpoints] casts to [Service].
                if T.self == Service.self, let services = items as? [Service] {
                    snap.services = Dictionary(services.map { (ServiceKey($0), $0) }, uniquingKeysWith: { _, b in b })
                    snap.servicesVersion = rv
                } else if T.self == Endpoints.self, let endpoints = items as? [Endpoints] {
                    snap.endpoints = Dictionary(endpoints.map { (ServiceKey($0), $0) }, uniquingKeysWith: { _, b in b })
                    snap.endpointsVersion = rv
                }
                s.synced.insert(kind)
            case .changed(let event):
                Self.fold(event, into: &snap)
                s.synced.insert(kind)
            }
            if s.synced.count == 2 { snap.source = .control }
            s.snapshot = snap
            s.dirty = true
        }
        self.wake.signal()
    }

    static func fold<T: MeshObject>(_ event: WatchEvent<T>, into snap: inout ServiceSnapshot) {
        switch event {
        case .added(let o), .modified(let o):
            if let s = o as? Service {
                snap.services[ServiceKey(s)] = s
            } else if let e = o as? Endpoints {
                snap.endpoints[ServiceKey(e)] = e
            }
        case .deleted(let o):
            if o is Service { snap.services[ServiceKey(o)] = nil } else { snap.endpoints[ServiceKey(o)] = nil }
        case .bookmark, .error:
            break
        }
        if let rv = event.resourceVersion {
            if T.self == Service.self { snap.servicesVersion = rv } else { snap.endpointsVersion = rv }
        }
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
