import Logging
import MeshClient
import MeshCore
import MeshHTTP
import ServiceLifecycle
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What the node agent registers and how often it beats.
public struct NodeAgentConfiguration: Sendable {
    public var nodeName: String
    public var site: String?
    /// Labels set on the Node (merged over labels others set; these keys win).
    public var labels: [String: String] = [:]
    /// Addresses to advertise instead of the host's (the all-in-one: the loopback it serves on).
    public var addresses: [String]?
    /// The port where this node's agent accepts peer links (`spec.linkPort`); nil: none.
    public var linkPort: Int?
    /// Interfaces whose addresses are never advertised (the mesh interface holds service VIPs).
    public var excludedInterfaces: Set<String> = []
    /// Time between beats (each is jittered by ±10% so a fleet started together spreads out).
    public var heartbeatInterval: Duration = .seconds(20)
    /// First retry delay while the control plane is unreachable; it doubles up to `heartbeatInterval`.
    public var initialBackoff: Duration = .seconds(1)
    /// When set, each beat reports the node's home relay (`RelaySessionClient.home`) in its body; the
    /// control plane writes it to the Node's `status.relay` when it changes.
    public var relay: (@Sendable () -> String?)?
    /// When set (with `relay`), each beat reports the node's hole-punch candidates too (its NAT
    /// discovery); the control plane writes them to the Node's `status.candidates` when they change.
    public var candidates: (@Sendable () -> NodeCandidates?)?
    /// When set (with `relay`), each beat reports the node's peer links too (peer, path, rounded RTT); the
    /// control plane writes them to the Node's `status.links` when they change (`meshctl dashboard`).
    public var links: (@Sendable () async -> [NodeLink])?
    /// What beats and retries wait on (tests advance a clock of their own by hand).
    public var clock: any MeshClock = .system

    public init(nodeName: String, site: String? = nil) {
        self.nodeName = nodeName
        self.site = site
    }
}

/// What the node agent has done so far (admin API, tests).
public struct NodeAgentState: Sendable, Equatable {
    /// The Node is registered with the spec and labels of the configuration and current addresses.
    public var registered = false
    /// Addresses last registered.
    public var addresses: [NodeAddress] = []
    /// Beats the control plane took.
    public var heartbeats = 0
    /// Consecutive failed attempts (0: connected).
    public var failures = 0
    public var lastError: String?
    /// When the control plane last took a beat.
    public var lastContact: Date?
    /// When the current outage began (nil while the control plane answers).
    public var offlineSince: Date?
}

/// The node agent's first part: registers this host's Node with the control plane and keeps it
/// Ready with heartbeats (README of this module). Runs beside the mesh agent's data plane and
/// never holds it up: every failure is retried here with jittered backoff, and logged once per
/// outage. Requests go over one kept-alive TLS connection with the node's identity.
public final class NodeAgent: ServiceLifecycle.Service, Sendable {
    public let configuration: NodeAgentConfiguration
    let client: ControlClient
    let logger: Logger
    private let state = Mutex(NodeAgentState())

    /// `client` presents the node's certificate (`mesh://node/<nodeName>`).
    public init(configuration: NodeAgentConfiguration, client: ControlClient, logger: Logger) {
        self.configuration = configuration
        self.client = client.keepingAlive()
        self.logger = logger
    }

    public var snapshot: NodeAgentState { self.state.withLock { $0 } }

    /// Registers, then beats until graceful shutdown or cancellation. Never throws.
    public func run() async {
        await cancelWhenGracefulShutdown {
            await self.loop()
        }
        self.client.session?.close()
    }

    /// The Node this agent wants to see: name, labels, site, addresses.
    func desired() -> (labels: [String: String], spec: NodeSpec) {
        let c = self.configuration
        let addresses =
            c.addresses.flatMap(HostAddresses.fixed) ?? HostAddresses.current(excludingInterfaces: c.excludedInterfaces)
        return (c.labels, NodeSpec(site: c.site, addresses: addresses.isEmpty ? nil : addresses, linkPort: c.linkPort))
    }

    private func loop() async {
        let name = self.configuration.nodeName
        let interval = self.configuration.heartbeatInterval
        var registered: (labels: [String: String], spec: NodeSpec)?
        var delay = self.configuration.initialBackoff
        var outageStart: ContinuousClock.Instant?
        var failures = 0
        while !Task.isCancelled {
            do {
                let want = self.desired()
                if registered?.labels != want.labels || registered?.spec != want.spec {
                    try await self.register(want)
                    registered = want
                }
                let relay = self.configuration.relay?()
                let candidates = self.configuration.candidates?()
                let links = await self.configuration.links?()
                do {
                    try await self.client.heartbeat(
                        node: name,
                        report: self.configuration.relay.map { _ in
                            NodeHeartbeatReport(relay: relay, candidates: candidates, links: links)
                        }
                    )
                } catch let status as Status where status.code == 404 {
                    // Deleted while this agent runs: register again at once.
                    self.logger.notice("node agent: node \(name) is not registered any more; registering it again")
                    registered = nil
                    self.state.withLock { $0.registered = false }
                    continue
                }
                if let since = outageStart {
                    self.logger.notice(
                        "node agent: control plane at \(self.client.endpoint) reachable again after \(Self.seconds(self.configuration.clock.now - since)) (\(failures) attempts failed)"
                    )
                    outageStart = nil
                }
                failures = 0
                delay = self.configuration.initialBackoff
                self.state.withLock {
                    $0.heartbeats += 1
                    $0.failures = 0
                    $0.lastError = nil
                    $0.lastContact = Date()
                    $0.offlineSince = nil
                }
                try await self.sleep(Self.jittered(interval), unlessRelayChangesFrom: relay, candidates)
            } catch is CancellationError {
                return
            } catch {
                if Task.isCancelled { return }
                failures += 1
                self.state.withLock {
                    $0.failures = failures
                    $0.lastError = "\(error)"
                    if $0.offlineSince == nil { $0.offlineSince = Date() }
                }
                if outageStart == nil {
                    outageStart = self.configuration.clock.now
                    self.logger.warning(
                        "node agent: cannot reach the control plane at \(self.client.endpoint): \(error); the mesh keeps serving from its cache, heartbeats are retried quietly until it is back"
                    )
                } else {
                    self.logger.debug("node agent: attempt \(failures) failed: \(error)")
                }
                // Full jitter, capped at the beat interval: after an outage a whole fleet comes
                // back spread over one interval, never faster than its steady heartbeat rate.
                try? await self.configuration.clock.sleep(
                    for: .nanoseconds(Int64.random(in: 0...max(1, Self.nanos(delay))))
                )
                delay = min(delay * 2, interval)
            }
        }
    }

    /// Sleeps until the next beat, or until the home relay differs from the one last reported: other
    /// agents' relays find this node through its Node's `status.relay`, so a re-home is reported within a
    /// second, not at the next beat (a read of the hook each second costs nothing).
    private func sleep(
        _ duration: Duration,
        unlessRelayChangesFrom reported: String?,
        _ reportedCandidates: NodeCandidates?
    ) async throws {
        let clock = self.configuration.clock
        guard let relay = self.configuration.relay else { return try await clock.sleep(for: duration) }
        let deadline = clock.now + duration
        while clock.now < deadline {
            try await clock.sleep(for: min(.seconds(1), deadline - clock.now))
            if relay() != reported { return }
            if let c = self.configuration.candidates, Self.candidatesMoved(c(), from: reportedCandidates) { return }
        }
    }

    /// New candidates worth a beat now: another reflexive address or mapping (not just a new time).
    static func candidatesMoved(_ now: NodeCandidates?, from reported: NodeCandidates?) -> Bool {
        guard let now else { return false }
        return now.reflexive != reported?.reflexive || now.mapping != reported?.mapping
            || now.local != reported?.local
    }

    /// Creates the Node, or updates its spec and labels (keeping labels others set), with a
    /// version precondition so a concurrent change is never overwritten.
    private func register(_ want: (labels: [String: String], spec: NodeSpec)) async throws {
        let name = self.configuration.nodeName
        for _ in 0..<8 {
            let existing: Node?
            do {
                existing = try await self.client.get(Node.self, name: name)
            } catch let status as Status where status.code == 404 {
                existing = nil
            }
            var node =
                existing
                ?? Node(metadata: ObjectMeta(name: name), spec: want.spec)
            var labels = node.metadata.labels ?? [:]
            labels.merge(want.labels) { _, mine in mine }
            node.metadata.labels = labels.isEmpty ? nil : labels
            node.spec = want.spec
            node.status = nil  // the control plane's to set
            do {
                if let e = existing, e.metadata.labels == node.metadata.labels, e.spec == node.spec {
                    // Nothing to change; the heartbeat that follows tells it this node is alive.
                } else {
                    try await self.client.apply(node)
                    self.logger.info(
                        "node agent: registered node \(name)\(want.spec.site.map { " (site \($0))" } ?? "") with addresses \((want.spec.addresses ?? []).map(\.address).joined(separator: ", "))"
                    )
                }
                self.state.withLock {
                    $0.registered = true
                    $0.addresses = want.spec.addresses ?? []
                }
                return
            } catch let status as Status where status.code == 409 {
                continue
            }
        }
        throw Status.conflict("node \(name) changes too fast to register; retrying")
    }

    static func nanos(_ d: Duration) -> Int64 {
        let (s, atto) = d.components
        return s * 1_000_000_000 + atto / 1_000_000_000
    }

    static func seconds(_ d: Duration) -> String {
        let ms = Self.nanos(d) / 1_000_000
        return ms < 10_000 ? "\(Double(ms) / 1000)s" : "\(ms / 1000)s"
    }

    /// `d` ± 10%.
    static func jittered(_ d: Duration) -> Duration {
        let n = Self.nanos(d)
        return .nanoseconds(n + Int64.random(in: -(n / 10)...(n / 10)))
    }
}
