import CoreMetrics
import MeshCore
import NIOCore
import Synchronization

/// In-process counters of one route, read by `snapshot()`.
final class RouteStats: Sendable {
    let activeConnections = Atomic<Int>(0)
    let totalConnections = Atomic<Int>(0)
    let requests = Atomic<Int>(0)
    let failures = Atomic<Int>(0)
    let retries = Atomic<Int>(0)
    /// Client to backend.
    let bytesIn = Atomic<Int>(0)
    /// Backend to client.
    let bytesOut = Atomic<Int>(0)
    /// HTTP requests and retries in flight (the retry budget is a share of the first).
    let activeRequests = Atomic<Int>(0)
    let activeRetries = Atomic<Int>(0)
}

/// The swift-metrics instruments of one route, labelled by service, listener and protocol. A class, so that
/// handing it out (connections keep a reference) is one retain rather than a copy of a dozen references.
final class RouteMetrics: Sendable {
    enum ErrorKind: String, CaseIterable, Sendable {
        case connectFailure = "connect_failure"
        case noBackend = "no_backend"
        case timeout
        case reset
        case badRequest = "bad_request"
        case overflow
    }

    let connections: Counter
    let activeConnections: Meter
    let requests: Counter
    let bytesIn: Counter
    let bytesOut: Counter
    let upstreamLatency: CoreMetrics.Timer
    private let errors: [Counter]

    init(service: ServiceKey, listener: ListenerKey, proto: RouteProtocol, factory: any MetricsFactory) {
        let dims = [("service", service.description), ("listener", listener.description), ("proto", proto.rawValue)]
        self.connections = Counter(label: "mesh_proxy_connections_total", dimensions: dims, factory: factory)
        self.activeConnections = Meter(label: "mesh_proxy_active_connections", dimensions: dims, factory: factory)
        self.requests = Counter(label: "mesh_proxy_requests_total", dimensions: dims, factory: factory)
        self.bytesIn = Counter(label: "mesh_proxy_bytes_in_total", dimensions: dims, factory: factory)
        self.bytesOut = Counter(label: "mesh_proxy_bytes_out_total", dimensions: dims, factory: factory)
        self.upstreamLatency = CoreMetrics.Timer(
            label: "mesh_proxy_upstream_latency_seconds",
            dimensions: dims,
            factory: factory
        )
        self.errors = ErrorKind.allCases.map {
            Counter(label: "mesh_proxy_errors_total", dimensions: dims + [("kind", $0.rawValue)], factory: factory)
        }
    }

    func error(_ kind: ErrorKind) {
        self.errors[ErrorKind.allCases.firstIndex(of: kind)!].increment()
    }

    /// Bytes proxied in each direction (called once per read burst, not per message).
    func countBytes(fromClient: Int, toClient: Int) {
        if fromClient > 0 { self.bytesIn.increment(by: fromClient) }
        if toClient > 0 { self.bytesOut.increment(by: toClient) }
    }
}

/// Bytes a connection or request exchanged with its backend.
struct ByteTally: Sendable, Hashable {
    /// Client to backend.
    var sent = 0
    /// Backend to client.
    var received = 0

    mutating func add(_ other: ByteTally) {
        self.sent &+= other.sent
        self.received &+= other.received
    }
}

/// A backend chosen for one connection or request.
struct Pick: Sendable {
    var id: BackendID
    var address: SocketAddress
    /// The backend's slot in the balancer that chose it, valid while that balancer is the route's
    /// (`generation` unchanged): finishing by slot spares hashing `id` under the route's lock.
    var slot: Int
    var generation: UInt64
}

/// What every route of a data plane shares: the agent's site (locality), the outlier settings and the metrics
/// backend. One object per data plane (a new one when the table's site changes), held by reference: inline in
/// each route's handle they were ~100 bytes (the factory an existential of 40) of each of 10,000 routes.
final class RouteSettings: Sendable {
    let localSite: String?
    let outlier: OutlierConfiguration
    let metricsFactory: any MetricsFactory

    init(localSite: String?, outlier: OutlierConfiguration, metricsFactory: any MetricsFactory) {
        self.localSite = localSite
        self.outlier = outlier
        self.metricsFactory = metricsFactory
    }
}

/// The live state of one listener's route: its balancer behind a mutex (event loops of every thread pick
/// from it), counters and metrics. `apply` swaps the route and balancer in place, so connections that hold
/// the handle keep working and report to the new balancer.
final class RouteHandle: Sendable {
    let key: ListenerKey
    let service: ServiceKey
    let stats = RouteStats()
    private let lazyMetrics: Mutex<RouteMetrics?>

    /// The balancer of a route that has carried traffic, by reference: an idle route's state then holds one
    /// nil reference rather than an empty `LoadBalancer` value (~200 bytes) inline. Unchecked: it is only
    /// reached through `state`, under its lock.
    private final class BalancerBox: @unchecked Sendable {
        var balancer: LoadBalancer

        init(_ balancer: LoadBalancer) { self.balancer = balancer }
    }

    private struct State {
        var route: Route
        var settings: RouteSettings
        /// Built on the first pick: most routes of a large mesh never carry traffic through a given
        /// agent, and a balancer costs ~0.5 KB per backend (slots, socket addresses, index).
        var box: BalancerBox?
        var built: LoadBalancer? { self.box?.balancer }
        var isBuilt: Bool { self.box != nil }
        /// Counts balancers replaced by `update`: a pick's slot index is valid while this is unchanged.
        var generation: UInt64 = 0

        init(
            route: Route,
            settings: RouteSettings,
            built: LoadBalancer?,
            generation: UInt64 = 0
        ) {
            self.route = route
            self.settings = settings
            self.box = built.map(BalancerBox.init)
            self.generation = generation
        }

        /// The balancer's box, built now if it was not.
        mutating func balancerBox() -> BalancerBox {
            if let b = self.box { return b }
            let b = BalancerBox(
                LoadBalancer(
                    backends: self.route.backends,
                    policy: self.route.policy,
                    localSite: self.settings.localSite,
                    outlier: self.settings.outlier
                )
            )
            self.box = b
            return b
        }

        /// Runs `body` on the balancer in place (built first if it was not).
        mutating func withBalancer<T>(_ body: (inout LoadBalancer) -> T) -> T {
            body(&self.balancerBox().balancer)
        }
    }

    private let state: Mutex<State>
    /// Whether the policy is consistent hashing (requests then need a hash key), readable without the lock.
    private let consistentHash: Atomic<Bool>

    init(route: Route, settings: RouteSettings) {
        self.key = route.listenerKey
        self.service = route.service
        self.lazyMetrics = Mutex(nil)
        self.state = Mutex(State(route: route, settings: settings, built: nil))
        self.consistentHash = Atomic(Self.isConsistentHash(route.policy))
    }

    private static func isConsistentHash(_ policy: BalancerPolicy) -> Bool {
        if case .consistentHash = policy { return true }
        return false
    }

    /// The policy hashes a key of each request or connection (consistent hashing); no lock taken.
    var hashesRequests: Bool { self.consistentHash.load(ordering: .relaxed) }

    /// The route's instruments, made on first use: an agent serves every service of the mesh but
    /// its apps use few, and registering a dozen labelled series per route up front cost ~35 KB
    /// and (in swift-prometheus) time that grows with the number already registered.
    var metrics: RouteMetrics {
        self.lazyMetrics.withLock { metrics in
            if let m = metrics { return m }
            let m = RouteMetrics(
                service: self.service,
                listener: self.key,
                proto: self.proto,
                factory: self.state.withLock { $0.settings.metricsFactory }
            )
            metrics = m
            return m
        }
    }

    /// Replaces backends and policy (with the data plane's shared settings); per-backend health and in-flight
    /// counts carry over by `ip:port`. An unchanged route keeps its balancer as it is.
    func update(route: Route, settings: RouteSettings) {
        self.state.withLock { state in
            if state.route == route && state.settings.localSite == settings.localSite {
                state.settings = settings
                return
            }
            // A balancer that was never built has no health to carry over: build it on first use.
            let balancer = state.built.map {
                LoadBalancer(
                    backends: route.backends,
                    policy: route.policy,
                    localSite: settings.localSite,
                    outlier: settings.outlier,
                    previous: $0
                )
            }
            state = State(
                route: route,
                settings: settings,
                built: balancer,
                generation: state.generation &+ 1
            )
            self.consistentHash.store(Self.isConsistentHash(route.policy), ordering: .relaxed)
        }
    }

    var route: Route { self.state.withLock { $0.route } }

    var proto: RouteProtocol { self.state.withLock { $0.route.proto } }

    var policy: BalancerPolicy { self.state.withLock { $0.route.policy } }

    /// The route's own upgrade protocols, if it has any (looked up per upgrade request only).
    var upgradeProtocols: Set<String>? { self.state.withLock { $0.route.upgradeProtocols } }

    func pick(hash: UInt64 = 0, excluding: [BackendID] = []) -> Pick? {
        let now = NIODeadline.now()
        return self.state.withLock { state -> Pick? in
            let generation = state.generation
            return state.withBalancer { balancer -> Pick? in
                guard let i = balancer.pick(hash: hash, excluding: excluding, now: now) else { return nil }
                let slot = balancer.slot(i)
                return slot.address.map { Pick(id: slot.id, address: $0, slot: i, generation: generation) }
            }
        }
    }

    /// The route's backend with this id (for traces).
    func backend(_ id: BackendID) -> Backend? { self.route.backends.first { $0.id == id } }

    /// The backend `pick(hash:)` would choose now, without counting a pick (a copy of the balancer picks).
    func wouldPick(hash: UInt64) -> BackendID? {
        let now = NIODeadline.now()
        return self.state.withLock { state -> BackendID? in
            state.withBalancer { balancer -> BackendID? in
                var copy = balancer
                return copy.pick(hash: hash, now: now).map { copy.slot($0).id }
            }
        }
    }

    /// `finish(pick.id, ...)`, by the pick's slot index when the balancer that chose it is still the route's.
    /// `bytes`: what the connection or request exchanged with the backend, added to its per-endpoint counters.
    func finish(_ pick: Pick, outcome: LoadBalancer.Outcome, bytes: ByteTally = ByteTally()) {
        self.settle(pick, outcome) {
            $0.finish(slot: $1, outcome: outcome, bytes: bytes, now: $2)
        } byID: {
            $0.finish($1, outcome: outcome, bytes: bytes, now: $2)
        }
    }

    /// `report(pick.id, ...)`, by the pick's slot index when the balancer that chose it is still the route's.
    func report(_ pick: Pick, outcome: LoadBalancer.Outcome) {
        self.settle(pick, outcome) {
            $0.report(slot: $1, outcome: outcome, now: $2)
        } byID: {
            $0.report($1, outcome: outcome, now: $2)
        }
    }

    /// Applies an outcome to the pick's backend: by slot when the pick's balancer is current, else by ID.
    private func settle(
        _ pick: Pick,
        _ outcome: LoadBalancer.Outcome,
        bySlot: (inout LoadBalancer, Int, NIODeadline) -> Void,
        byID: (inout LoadBalancer, BackendID, NIODeadline) -> Void
    ) {
        let now = Self.now(for: outcome)
        self.state.withLock { state in
            if state.generation == pick.generation, let box = state.box {
                bySlot(&box.balancer, pick.slot, now)
            } else {
                state.withBalancer { byID(&$0, pick.id, now) }
            }
        }
        if outcome == .failure { self.stats.failures.add(1, ordering: .relaxed) }
    }

    func finish(_ id: BackendID, outcome: LoadBalancer.Outcome) {
        let now = Self.now(for: outcome)
        self.state.withLock { $0.withBalancer { $0.finish(id, outcome: outcome, now: now) } }
        if outcome == .failure { self.stats.failures.add(1, ordering: .relaxed) }
    }

    func report(_ id: BackendID, outcome: LoadBalancer.Outcome) {
        let now = Self.now(for: outcome)
        self.state.withLock { $0.withBalancer { $0.report(id, outcome: outcome, now: now) } }
        if outcome == .failure { self.stats.failures.add(1, ordering: .relaxed) }
    }

    /// The time a finish or report needs: only a failure (which may eject) reads the clock.
    private static func now(for outcome: LoadBalancer.Outcome) -> NIODeadline {
        outcome == .failure ? .now() : .uptimeNanoseconds(0)
    }

    func connectionOpened() {
        self.stats.activeConnections.add(1, ordering: .relaxed)
        self.stats.totalConnections.add(1, ordering: .relaxed)
        self.metrics.connections.increment()
        self.metrics.activeConnections.increment()
    }

    /// A connection that left the data plane's own loops (handed to a peer link) and is still open: active
    /// again, not counted again in the total.
    func connectionResumed() {
        self.stats.activeConnections.add(1, ordering: .relaxed)
        self.metrics.activeConnections.increment()
    }

    func connectionClosed() {
        self.stats.activeConnections.subtract(1, ordering: .relaxed)
        self.metrics.activeConnections.decrement()
    }

    func countBytes(fromClient: Int, toClient: Int) {
        self.countStats(fromClient: fromClient, toClient: toClient)
        self.metrics.countBytes(fromClient: fromClient, toClient: toClient)
    }

    /// The in-process byte counters only (callers that hold the instruments count those themselves).
    func countStats(fromClient: Int, toClient: Int) {
        if fromClient > 0 { self.stats.bytesIn.add(fromClient, ordering: .relaxed) }
        if toClient > 0 { self.stats.bytesOut.add(toClient, ordering: .relaxed) }
    }

    func snapshot(listening: Bool, error: String?) -> RouteSnapshot {
        let now = NIODeadline.now()
        let (route, slots) = self.state.withLock { state -> (Route, [LoadBalancer.Slot]?) in
            let route = state.route
            // Never used: its backends as a fresh balancer would show them, without building one.
            guard state.isBuilt else { return (route, nil) }
            return state.withBalancer { balancer in
                _ = balancer.eligible(now: now)  // lets due recoveries happen before reading
                return (route, balancer.slots)
            }
        }
        return RouteSnapshot(
            route: route,
            listening: listening,
            error: error,
            stats: self.stats,
            backends: slots.map { all in all.map { BackendSnapshot(slot: $0, now: now) } }
                ?? Self.fresh(route.backendList)
        )
    }

    /// The backends of a route that never carried traffic, as `LoadBalancer.slots` would show them (duplicates
    /// collapsed to the first, weights at least 1, nothing ejected or counted).
    static func fresh(_ backends: BackendList) -> [BackendSnapshot] {
        var seen = Set<BackendID>()
        var out: [BackendSnapshot] = []
        out.reserveCapacity(backends.count)
        for b in backends where seen.insert(b.id).inserted {
            out.append(BackendSnapshot(fresh: b))
        }
        return out
    }
}

extension LoadBalancer.Outcome: Equatable {}
