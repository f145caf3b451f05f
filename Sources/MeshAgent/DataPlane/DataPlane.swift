import CoreMetrics
import Logging
import MeshCore
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// Why `apply` did not take (all of) a table.
public enum DataPlaneError: Error, CustomStringConvertible, Sendable {
    /// These VIP:ports could not be served; every other change of the table was applied.
    case listenersFailed([String])
    /// The data plane has been shut down.
    case shutDown
    /// `bindMode: .meshInterface` and the link could not be set up.
    case interface(String)

    public var description: String {
        switch self {
        case .listenersFailed(let failures): return "listeners failed: \(failures.joined(separator: "; "))"
        case .shutDown: return "the data plane is shut down"
        case .interface(let reason): return "mesh interface: \(reason)"
        }
    }
}

/// The agent's data plane: one listener per route VIP:port, proxying TCP, UDP and HTTP/1.1 to the route's
/// backends. A swift-service-lifecycle `Service`: `run()` serves until graceful shutdown, then drains.
///
/// `apply(_:)` reconciles the listeners with a new table; each change is atomic: a new VIP:port is bound
/// (after its address is put on the mesh interface) or reported as failed, a VIP:port that is gone stops
/// accepting and its connections drain, and a route whose backends or policy changed gets a new balancer
/// swapped in without dropping a connection (per-backend health carries over by `ip:port`).
///
/// All proxying happens on event loops (NIO handlers for HTTP and UDP, the splice loops for TCP); nothing here
/// runs per connection or per request.
public actor DataPlane: ServiceLifecycle.Service {
    public nonisolated let configuration: DataPlaneConfiguration
    private nonisolated let group: any EventLoopGroup
    private nonisolated let logger: Logger
    private nonisolated let counters = DataPlaneCounters()
    private nonisolated let environment: ProxyEnvironment
    private nonisolated let published = Mutex(Published())
    private nonisolated let metricsFactory: any MetricsFactory
    /// What every route shares (`RouteSettings`), made again when the table's site changes.
    private var routeSettings: RouteSettings?

    private enum Mode {
        case loopback
        case interface(MeshInterface)
    }

    /// A route as `snapshot()` shows it: served by its handle, or failed (kept by reference, so that an entry
    /// of this table of every route is a reference, not a `Route` value inline).
    private enum PublishedRoute: Sendable {
        case served(RouteHandle)
        case failed(FailedRoute)

        var handle: RouteHandle? {
            if case .served(let handle) = self { return handle }
            return nil
        }
    }

    private final class FailedRoute: Sendable {
        let route: Route
        let error: String

        init(route: Route, error: String) {
            self.route = route
            self.error = error
        }
    }

    private struct Published {
        var mode = DataPlaneMode.pending
        var routes: [ListenerKey: PublishedRoute] = [:]
    }

    private var mode: Mode?
    private var listeners: [ListenerKey: Listener] = [:]
    private var failed: [ListenerKey: (route: Route, error: String)] = [:]
    /// Removed listeners whose connections still drain: their VIPs stay on the mesh interface until then.
    private var draining: [(vip: IPAddress, listener: Listener, until: NIODeadline)] = []
    private var stopped = false
    /// Mesh-interface mode: the one listener of every TCP/HTTP VIP:port (VIP/VIPListener.swift).
    private nonisolated let redirect = Mutex<VIPListener?>(nil)

    /// - Parameters:
    ///   - eventLoopGroup: where every proxied connection runs (both of its sides on one loop).
    ///   - metricsFactory: the swift-metrics backend; `MetricsSystem.factory` (whatever was bootstrapped) when nil.
    ///   - peers: the peer links that carry traffic to backends at other sites (`Reach.peer`); nil: such
    ///     backends fail to connect.
    public init(
        configuration: DataPlaneConfiguration = .init(),
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "mesh.dataplane"),
        metricsFactory: (any MetricsFactory)? = nil,
        peers: (any PeerStreams)? = nil
    ) {
        self.configuration = configuration
        self.group = eventLoopGroup
        self.logger = logger
        self.metricsFactory = metricsFactory ?? MetricsSystem.factory
        self.environment = ProxyEnvironment(
            configuration: configuration,
            counters: self.counters,
            logger: logger,
            pools: HTTPUpstreamPools(group: eventLoopGroup, configuration: configuration, counters: self.counters),
            splice: SpliceEngine(configuration: configuration, counters: self.counters, logger: logger),
            upstreams: Upstreams(peers: peers),
            traces: TraceLog()
        )
    }

    // MARK: Service

    /// Sets up the bind mode (mesh interface or loopback), serves until graceful shutdown (or cancellation),
    /// then drains and closes everything, removing the mesh interface.
    public func run() async throws {
        try await self.resolveMode()
        var cancelled = false
        do {
            try await gracefulShutdown()
        } catch {
            cancelled = true
        }
        await self.shutdown(drain: !cancelled)
    }

    // MARK: apply

    /// Reconciles listeners with `table`. Throws `DataPlaneError.listenersFailed` naming the VIP:ports it
    /// could not bind (they show in `snapshot()` with their error and are retried by the next `apply`); every
    /// other change has been applied by then.
    public func apply(_ table: RouteTable) async throws {
        guard !self.stopped else { throw DataPlaneError.shutDown }
        try await self.resolveMode()
        var failures: [String] = []

        // Validate and index the table.
        var wanted: [ListenerKey: Route] = [:]
        var invalid: [ListenerKey: (route: Route, error: String)] = [:]
        for route in table.routes {
            let key = route.listenerKey
            if !(1...65_535).contains(route.port) {
                invalid[key] = (route, "port \(route.port) out of range")
            } else if let other = wanted[key] {
                if other.service != route.service {
                    invalid[key] = (route, "\(key) is already used by \(other.service)")
                }
            } else {
                wanted[key] = route
            }
        }

        // Gone (or taken over by another service): stop accepting, drain.
        for (key, listener) in self.listeners where wanted[key]?.service != listener.handle.service {
            await listener.stop(drain: self.configuration.drainTimeout)
            self.listeners[key] = nil
            if listener.openConnections > 0, case .interface = self.mode {
                self.keepDraining(vip: key.vip, listener: listener)
            }
            self.logger.info(
                "route removed",
                metadata: ["listener": "\(key)", "service": "\(listener.handle.service)"]
            )
        }

        // Changed backends or policy: swap the balancer in place.
        let settings: RouteSettings
        if let current = self.routeSettings, current.localSite == table.localSite {
            settings = current
        } else {
            settings = RouteSettings(
                localSite: table.localSite,
                outlier: self.configuration.outlier,
                metricsFactory: self.metricsFactory
            )
            self.routeSettings = settings
        }
        for (key, route) in wanted {
            guard let listener = self.listeners[key] else { continue }
            let changed = listener.handle.route != route
            listener.handle.update(route: route, settings: settings)
            if changed {
                self.logger.debug("route updated", metadata: ["listener": "\(key)", "service": "\(route.service)"])
            }
        }

        // Addresses first (new VIPs must exist before binding), stale ones out.
        var addressErrors: [IPAddress: String] = [:]
        if case .interface(let interface) = self.mode {
            let wantedAddresses = self.interfaceAddresses(for: wanted.values.map(\.vip))
            do {
                try interface.reconcile(wantedAddresses)
            } catch {
                for address in wantedAddresses { addressErrors[address] = "\(error)" }
                // Per address, so one bad VIP does not hold back the others.
                for address in wantedAddresses {
                    do { try interface.add(address) } catch { continue }
                    addressErrors[address] = nil
                }
            }
        }

        // The redirect rules cover exactly the VIPs of TCP/HTTP routes served through the VIP listener.
        var redirectError: String?
        if let vipListener = self.vipListener {
            do {
                try await vipListener.updateRules(vips: self.redirectedVIPs(wanted.values.filter(Self.isRedirected)))
            } catch {
                redirectError = "VIP redirect rules: \(error)"
            }
        }

        // New VIP:ports: bind (or, through the VIP listener, a table entry).
        self.failed = invalid
        for (key, route) in wanted.sorted(by: { $0.key < $1.key }) where self.listeners[key] == nil {
            if let error = addressErrors[route.vip] {
                self.failed[key] = (route, error)
                continue
            }
            let handle = RouteHandle(route: route, settings: settings)
            if let vipListener = self.vipListener, Self.isRedirected(route) {
                if let redirectError {
                    self.failed[key] = (route, redirectError)
                    continue
                }
                self.listeners[key] = Listener.redirected(handle: handle, vipListener: vipListener)
                self.logger.info(
                    "route listening",
                    metadata: ["listener": "\(key)", "service": "\(route.service)", "proto": "\(route.proto)"]
                )
                continue
            }
            do {
                self.listeners[key] = try await Listener.bind(
                    handle: handle,
                    environment: self.environment,
                    group: self.group
                )
                self.logger.info(
                    "route listening",
                    metadata: ["listener": "\(key)", "service": "\(route.service)", "proto": "\(route.proto)"]
                )
            } catch {
                var reason = "\(error)"
                if case .loopback = self.mode, !route.vip.isLoopback {
                    reason += " (loopback mode: VIPs must be inside 127.0.0.0/8 or ::1)"
                }
                self.failed[key] = (route, reason)
            }
        }
        for (key, failure) in self.failed.sorted(by: { $0.key < $1.key }) {
            failures.append("\(key) \(failure.route.service): \(failure.error)")
            self.logger.warning(
                "route not served",
                metadata: ["listener": "\(key)", "service": "\(failure.route.service)", "error": "\(failure.error)"]
            )
        }
        self.publish()
        if !failures.isEmpty { throw DataPlaneError.listenersFailed(failures) }
    }

    // MARK: snapshot

    /// Every route with its listener state, counters and backends' health. Callable from any thread.
    public nonisolated func snapshot() -> DataPlaneSnapshot {
        var routes: [RouteSnapshot] = []
        let head = self.snapshot { routes.append($0) }
        return DataPlaneSnapshot(mode: head.mode, openChannels: head.openChannels, routes: routes)
    }

    /// `snapshot()` one route at a time, in the same order: `body` gets each route's snapshot, made when it is
    /// its turn (at 10,000 services, `/routes` encodes them one by one instead of holding every route's and
    /// backend's snapshot, and their JSON tree, at once). Returns the snapshot without its routes.
    public nonisolated func snapshot(eachRoute body: (RouteSnapshot) throws -> Void) rethrows -> DataPlaneSnapshot {
        let published = self.published.withLock { ($0.mode, $0.routes) }
        for (_, entry) in published.1.sorted(by: { $0.key < $1.key }) {
            switch entry {
            case .served(let handle):
                try body(handle.snapshot(listening: true, error: nil))
            case .failed(let failed):
                try body(
                    RouteSnapshot(route: failed.route, listening: false, error: failed.error, stats: nil, backends: [])
                )
            }
        }
        return DataPlaneSnapshot(mode: published.0, openChannels: self.openChannels, routes: [])
    }

    /// The bind mode, without a snapshot of every route.
    public nonisolated var currentMode: DataPlaneMode { self.published.withLock { $0.mode } }

    /// How many routes are served now (the ones `snapshot()` shows `listening`), without a snapshot of every
    /// route (which at 10,000 services is 100,000 backends and tens of MB of JSON for `/routes`).
    public nonisolated var servedRoutes: Int {
        self.published.withLock { $0.routes.values.reduce(0) { $0 + ($1.handle != nil ? 1 : 0) } }
    }

    /// The backend (`ip:port`, and the peer node it is reached through) that a connection or request with
    /// consistent-hash key `key` would get now on each of the service's routes, by listener. For HTTP routes
    /// hashing a header or cookie, `key` is its value; otherwise the client's IP address. Routes whose policy
    /// does not hash are left out (their picks do not depend on a key).
    public nonisolated func wouldPick(namespace: String, service: String, key: String) throws -> [RoutePick] {
        let handles = self.published.withLock { $0.routes.values.compactMap(\.handle) }
        var picks: [RoutePick] = []
        for handle in handles where handle.service.namespace == namespace && handle.service.name == service {
            let route = handle.route
            guard case .consistentHash(let hashKey) = route.policy else { continue }
            let hash: UInt64
            switch (route.proto, hashKey) {
            case (.http, .header), (.http, .cookie):
                hash = StableHash.hash(key)
            default:
                guard let ip = IPAddress(key) else {
                    throw RoutePickError(
                        description:
                            "\(route.service) port \(route.port) hashes the client's address (\(route.policy)): give an IP address as the key, not \"\(key)\""
                    )
                }
                hash = StableHash.hash(ip)
            }
            let id = handle.wouldPick(hash: hash)
            picks.append(
                RoutePick(
                    port: route.port,
                    proto: route.proto.rawValue,
                    policy: route.policy.description,
                    backend: id.map { "\($0.ip):\($0.port)" },
                    via: id?.via
                )
            )
        }
        return picks.sorted { $0.port < $1.port }
    }

    /// What the HTTP proxy saw of the request that carried `x-mesh-trace: id`, once it ended.
    public nonisolated func trace(_ id: String) -> RequestTrace? { self.environment.traces.trace(id) }

    /// Channels open right now, client side and upstream side together (pooled idle HTTP connections too).
    public nonisolated var openChannels: Int {
        self.counters.downstreamChannels.load(ordering: .relaxed)
            + self.counters.upstreamChannels.load(ordering: .relaxed)
    }

    /// Times an epoll-engine HTTP connection yielded its splice loop at the per-turn read bound.
    nonisolated var httpLoopYields: Int { self.counters.httpLoopYields.load(ordering: .relaxed) }

    /// TCP splice threads running (they start with the first TCP route).
    nonisolated var spliceThreads: Int { self.environment.splice.runningLoops }

    /// Client-side channels open right now.
    public nonisolated var openClientChannels: Int { self.counters.downstreamChannels.load(ordering: .relaxed) }

    /// The largest write backlog (bytes read from one side and not yet taken by the other side's kernel buffer)
    /// seen on any proxied connection: at most one 64 KiB read on the TCP splice; near the high water mark plus
    /// one read burst on NIO channels (HTTP upgrades).
    public nonisolated var bufferedBytesHighWater: Int { self.counters.bufferedHighWater.load(ordering: .relaxed) }

    // MARK: shutdown

    /// Stops every listener, lets connections finish for up to `drainTimeout` (when `drain`), closes the
    /// rest and the pooled upstream connections, and removes the mesh interface. Idempotent.
    public func shutdown(drain: Bool = true) async {
        guard !self.stopped else { return }
        self.stopped = true
        let listeners = Array(self.listeners.values)
        for listener in listeners { await listener.stopAccepting() }
        await self.vipListener?.stop()
        if drain {
            let deadline = NIODeadline.now() + self.configuration.drainTimeout
            while listeners.contains(where: { $0.openConnections > 0 }), NIODeadline.now() < deadline {
                try? await Task.sleep(for: .milliseconds(10))
            }
        }
        for listener in listeners { await listener.closeAll() }
        self.environment.pools.closeAll()
        let deadline = NIODeadline.now() + .seconds(2)
        while self.openChannels > 0, NIODeadline.now() < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
        await self.environment.splice.shutdown()
        self.listeners = [:]
        self.failed = [:]
        if case .interface(let interface) = self.mode {
            do {
                try interface.destroy()
            } catch {
                self.logger.error("could not remove mesh interface", metadata: ["error": "\(error)"])
            }
        }
        self.publish()
        self.logger.info("data plane stopped")
    }

    // MARK: helpers

    private func resolveMode() async throws {
        guard self.mode == nil else { return }
        switch self.configuration.bindMode {
        case .loopback:
            self.mode = .loopback
        case .meshInterface(let name):
            do {
                let interface = try await self.openInterface(name)
                self.mode = .interface(interface)
            } catch {
                throw DataPlaneError.interface("\(error)")
            }
            await self.startVIPListener()
        case .automatic(let name):
            do {
                let interface = try await self.openInterface(name)
                self.mode = .interface(interface)
                await self.startVIPListener()
            } catch {
                self.logger.notice(
                    "loopback mode: cannot create the mesh interface (needs CAP_NET_ADMIN); VIPs must be inside 127.0.0.0/8",
                    metadata: ["interface": "\(name)", "error": "\(error)"]
                )
                self.mode = .loopback
            }
        }
        self.publish()
    }

    /// The VIP listener, when mesh-interface mode serves TCP/HTTP routes through it.
    private var vipListener: VIPListener? { self.redirect.withLock { $0 } }

    /// Whether `route` is served through the VIP listener (when there is one): TCP and HTTP routes whose VIP
    /// is not a loopback address (a rule for 127.0.0.1 would take every local connection). UDP routes keep a
    /// socket each.
    private static func isRedirected(_ route: Route) -> Bool {
        route.proto != .udp && !route.vip.isLoopback
    }

    /// Starts the one VIP listener (mesh-interface mode, `vipRedirect`); without it (no iptables, no nat
    /// table), routes get a listener each, as in loopback mode, and it is logged.
    private func startVIPListener() async {
        guard self.configuration.vipRedirect, self.vipListener == nil else { return }
        do {
            let listener = try await VIPListener.start(
                environment: self.environment,
                group: self.group,
                chain: self.configuration.vipRedirectChain,
                metricsFactory: self.metricsFactory
            )
            self.redirect.withLock { $0 = listener }
        } catch {
            self.logger.warning(
                "VIP listener unavailable, one listener per VIP:port instead",
                metadata: ["error": "\(error)"]
            )
        }
    }

    /// The VIP listener's ports (IPv4 first), empty when routes have a listener each.
    public nonisolated var vipListenerPorts: [Int] { self.redirect.withLock { $0?.ports ?? [] } }

    /// Connections to a VIP:port without a route, reset by the VIP listener.
    public nonisolated var unroutedConnections: Int { self.redirect.withLock { $0?.unrouted ?? 0 } }

    /// The prefixes the VIP listener's rules redirect now, per family (IPv4 first).
    nonisolated var redirectedPrefixes: [[String]] { self.redirect.withLock { $0?.redirectedPrefixes ?? [] } }

    /// Opens the link from an event-loop thread, so that it is made in the event loops' network namespace
    /// (where the listeners are bound), and puts the extra addresses on it, dropping stale ones.
    private func openInterface(_ name: String) async throws -> MeshInterface {
        let logger = self.logger
        let interface = try await self.group.next().submit {
            try MeshInterface.open(name: name, logger: logger)
        }.get()
        try interface.reconcile(self.interfaceAddresses(for: self.listeners.values.map { $0.handle.key.vip }))
        return interface
    }

    /// The mesh interface's wanted addresses: the extra ones and every VIP not already local (loopback).
    private func interfaceAddresses(for vips: [IPAddress]) -> Set<IPAddress> {
        var set = Set(self.configuration.extraInterfaceAddresses.compactMap { IPAddress($0) })
        for vip in vips where !vip.isLoopback { set.insert(vip) }
        for entry in self.stillDraining where !entry.vip.isLoopback { set.insert(entry.vip) }
        return set
    }

    /// The VIPs the redirect rules cover: those of `routes`, and those of removed redirected routes whose
    /// connections still drain. Removing a VIP's rule strands its established connections: the kernel stops
    /// translating their packets (seen with iptables-nft), so the client's next segment meets a reset.
    private func redirectedVIPs(_ routes: [Route]) -> Set<IPAddress> {
        var set = Set(routes.map(\.vip))
        for entry in self.stillDraining where entry.listener.isRedirected { set.insert(entry.vip) }
        return set
    }

    private var stillDraining: [(vip: IPAddress, listener: Listener, until: NIODeadline)] {
        let now = NIODeadline.now()
        return self.draining.filter { $0.listener.openConnections > 0 && now < $0.until }
    }

    /// Keeps `vip` on the interface while `connections` drain (at most `drainTimeout`), then drops it unless
    /// a route uses it again. The last connection closing ends the drain early: it is looked at every 100 ms.
    private func keepDraining(vip: IPAddress, listener: Listener) {
        let until = NIODeadline.now() + self.configuration.drainTimeout
        self.draining.append((vip, listener, until))
        Task {
            while listener.openConnections > 0 {
                let left = until - NIODeadline.now()
                guard left > .zero else { break }
                try? await Task.sleep(for: .nanoseconds(min(left.nanoseconds, 100_000_000)))
            }
            await self.pruneDraining()
        }
    }

    private func pruneDraining() async {
        let now = NIODeadline.now()
        self.draining.removeAll { $0.listener.openConnections == 0 || now >= $0.until }
        guard !self.stopped, case .interface(let interface) = self.mode else { return }
        if let vipListener = self.vipListener {
            let served = self.listeners.values.filter(\.isRedirected).map(\.handle.route)
            do {
                try await vipListener.updateRules(vips: self.redirectedVIPs(served))
            } catch {
                self.logger.warning("VIP redirect rules", metadata: ["error": "\(error)"])
            }
        }
        let vips = self.listeners.keys.map(\.vip) + self.failed.values.map(\.route.vip)
        do {
            try interface.reconcile(self.interfaceAddresses(for: vips))
        } catch {
            self.logger.warning("mesh interface addresses", metadata: ["error": "\(error)"])
        }
    }

    private func publish() {
        var routes: [ListenerKey: PublishedRoute] = [:]
        routes.reserveCapacity(self.listeners.count + self.failed.count)
        for (key, listener) in self.listeners { routes[key] = .served(listener.handle) }
        for (key, failure) in self.failed {
            routes[key] = .failed(FailedRoute(route: failure.route, error: failure.error))
        }
        let mode: DataPlaneMode
        switch self.mode {
        case .none: mode = .pending
        case .loopback: mode = .loopback
        case .interface(let interface): mode = .meshInterface(interface.name)
        }
        self.published.withLock {
            $0.routes = routes
            $0.mode = self.stopped ? .stopped : mode
        }
    }
}
