import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import ServiceLifecycle
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What a relay needs to be a member of the mesh: where the control plane is, how to join it the
/// first time, and what to publish in its Relay.
public struct RelayMembershipConfiguration: Sendable {
    public var server: HTTPEndpoint
    public var name: String
    /// A relay token (`meshctl token create --relay NAME`) and the CA hash, used once when the
    /// relay has no certificate yet in `dataDir/pki`.
    public var joinToken: String?
    public var caCertHash: String?
    public var dataDir: String
    public var spec: RelaySpec
    /// How often the relay checks its status and fetches the revocation list.
    public var statusInterval: Duration = .seconds(30)
    /// The longest the relay leaves its status unwritten (`lastUpdateTime`) while nothing changes. A write
    /// goes to every agent's watch (every agent follows the relays): one every `statusInterval` per relay was
    /// N deliveries each time, for a time stamp. In between, only a change of phase or a change of its
    /// session count by a tenth (`RelayStatusPolicy`) is written.
    public var statusRefresh: Duration = .seconds(300)
    /// First retry delay while the control plane is unreachable; doubles up to `statusInterval`.
    public var initialBackoff: Duration = .milliseconds(200)

    public init(
        server: HTTPEndpoint,
        name: String,
        joinToken: String?,
        caCertHash: String?,
        dataDir: String,
        spec: RelaySpec
    ) {
        self.server = server
        self.name = name
        self.joinToken = joinToken
        self.caCertHash = caCertHash
        self.dataDir = dataDir
        self.spec = spec
    }
}

/// The relay's membership, a `Service`: enrols once (a CSR with a relay token to a control plane
/// whose CA is pinned, as a node joins; the CA signs `mesh://relay/NAME`), then publishes its
/// `Relay` (`PUT /apis/mesh.edge/v1/relays/NAME`, Ready) and rewrites its status when it changes
/// (`RelayStatusPolicy`) or `statusRefresh` has passed, checking every `statusInterval`, retrying with jittered backoff while the control plane is away. On graceful
/// shutdown it writes phase Draining (best effort, bounded). A failed enrolment (bad token, wrong
/// CA hash) throws: the relay cannot serve sessions without its certificate.
public final class RelayMembership: ServiceLifecycle.Service, Sendable {
    public let configuration: RelayMembershipConfiguration
    let logger: Logger
    private let loaded = AsyncOnce<LoadedCredentials>()
    private let published = Atomic<Int>(0)
    private let sessionCount = Mutex<(@Sendable () -> Int)?>(nil)
    /// The revocation list, fetched from the control plane with every status write; the session
    /// listener refuses these serials.
    public let revoked = RevokedSerials()
    /// The control plane client while `run` runs (for `locate`).
    private let client = Mutex<ControlClient?>(nil)
    /// Told the new credentials after each renewal (the session listener).
    private let renewed = Mutex<[@Sendable (LoadedCredentials) -> Void]>([])
    private let renewer = Mutex<CertificateRenewer?>(nil)

    public init(configuration: RelayMembershipConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// The relay's key, certificate and CA once enrolled (for its session listener).
    public func credentials() async throws -> LoadedCredentials { try await self.loaded.value() }

    /// Where the status's `sessions` comes from (the session listener).
    public func reportSessions(_ count: @escaping @Sendable () -> Int) {
        self.sessionCount.withLock { $0 = count }
    }

    /// Called with the renewed key and certificate after each renewal.
    public func onRenewal(_ use: @escaping @Sendable (LoadedCredentials) -> Void) {
        self.renewed.withLock { $0.append(use) }
    }

    /// Renews the relay's certificate now (tests; `run` renews at two thirds of its lifetime).
    @discardableResult
    public func renewNow() async throws -> LoadedCredentials {
        guard let renewer = self.renewer.withLock({ $0 }) else {
            throw IdentityError("the relay's membership is not running")
        }
        return try await renewer.renew()
    }

    /// How many times the Relay was written (for tests and /metrics).
    public var publications: Int { self.published.load(ordering: .relaxed) }

    /// Loads the relay's credentials from `dataDir/pki`, or joins with the token when there are
    /// none. `RelayServer` calls it before it serves anything; `run` calls it too.
    public func enrol() async throws -> LoadedCredentials {
        let c = self.configuration
        let credentials: LoadedCredentials
        do {
            try StatePaths.ensureDirectory(c.dataDir)
            credentials = try await NodeEnrolment.credentials(
                stateDir: c.dataDir,
                server: c.server,
                nodeName: c.name,
                token: c.joinToken,
                caHash: c.caCertHash,
                role: .relay,
                logger: self.logger
            )
        } catch {
            self.loaded.fail(error)
            throw error
        }
        self.loaded.set(credentials)
        return credentials
    }

    public func run() async throws {
        let c = self.configuration
        let credentials = try await self.enrol()
        let mesh = try MeshTLS.client(credentials, expect: .controlPlane)
        let client = ControlClient(endpoint: c.server, mesh: mesh).keepingAlive()
        // At two thirds of its lifetime the certificate is renewed over the current one (as a
        // node's is); later connections, the session listener's included, use the new one.
        let renewer = CertificateRenewer(
            credentials: credentials,
            files: NodeEnrolment.files(stateDir: c.dataDir, role: .relay),
            nodeName: c.name,
            tls: mesh,
            endpoint: c.server,
            role: .relay,
            logger: self.logger
        ) { renewed in
            for use in self.renewed.withLock({ $0 }) { use(renewed) }
        }
        self.client.withLock { $0 = client }
        self.renewer.withLock { $0 = renewer }
        await cancelWhenGracefulShutdown {
            await withDiscardingTaskGroup { group in
                group.addTask { await renewer.run() }
                await self.loop(client)
                group.cancelAll()
            }
        }
        self.client.withLock { $0 = nil }
        self.renewer.withLock { $0 = nil }
        // Tell agents to re-home before the sessions go (bounded: a dead control plane does not hold the exit).
        let draining = self.relay(phase: .draining)
        let task = Task { try await client.apply(draining) }
        let deadline = Task {
            try await Task.sleep(for: .seconds(2))
            task.cancel()
        }
        if (try? await task.value) != nil {
            self.logger.info("relay \(c.name): published phase Draining")
        }
        deadline.cancel()
        client.session?.close()
    }

    /// Where `node` is homed, for forwarding a circuit (the session listener's `locate`): its Node's
    /// `status.relay` (what its heartbeat reported), and that Relay's session addresses. Nil when the
    /// control plane is not reachable, the node reports no relay or this one, or the relay is unknown.
    public func locate(_ node: String) async -> RelayLocation? {
        guard let client = self.client.withLock({ $0 }) else { return nil }
        do {
            let found = try await client.get(Node.self, name: node)
            guard let name = found.status?.relay, name != self.configuration.name else { return nil }
            let relay = try await client.get(Relay.self, name: name)
            let addresses = RelaySessionClient.addresses(of: relay)
            return addresses.isEmpty ? nil : RelayLocation(relay: name, addresses: addresses)
        } catch {
            self.logger.info("relay \(self.configuration.name): cannot locate node \(node): \(error)")
            return nil
        }
    }

    func relay(phase: RelayStatus.Phase) -> Relay {
        Relay(
            metadata: ObjectMeta(name: self.configuration.name),
            spec: self.configuration.spec,
            status: RelayStatus(
                phase: phase,
                lastUpdateTime: Timestamp.now(),
                sessions: self.sessionCount.withLock { $0 }?() ?? 0
            )
        )
    }

    private func loop(_ client: ControlClient) async {
        let c = self.configuration
        var delay = c.initialBackoff
        var failing = false
        var written: (sessions: Int, at: ContinuousClock.Instant)?
        while !Task.isCancelled {
            do {
                let relay = self.relay(phase: .ready)
                let sessions = relay.status?.sessions ?? 0
                if RelayStatusPolicy.due(
                    sessions: sessions,
                    last: written,
                    now: .now,
                    refresh: c.statusRefresh
                ) {
                    written = nil
                    try await client.apply(relay)
                    written = (sessions, .now)
                }
                let listed = try await client.raw(.GET, "/apis/\(meshAPIVersion)/revokedcertificates").body
                let list = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(listed.readableBytesView))
                self.revoked.replace(with: Set(list.items.map(\.serial)))
                if self.published.add(1, ordering: .relaxed).newValue == 1 || failing {
                    self.logger.notice(
                        "relay \(c.name): published at \(c.spec.addresses.joined(separator: ", "))\(c.spec.site.map { " (site \($0))" } ?? "")"
                    )
                }
                failing = false
                delay = c.initialBackoff
                try await Task.sleep(for: c.statusInterval)
            } catch is CancellationError {
                return
            } catch {
                if Task.isCancelled { return }
                if !failing {
                    self.logger.warning(
                        "relay \(c.name): cannot publish its Relay at \(c.server): \(error); retrying quietly"
                    )
                }
                failing = true
                let (seconds, atto) = delay.components
                let nanos = max(1, seconds * 1_000_000_000 + atto / 1_000_000_000)
                try? await Task.sleep(for: .nanoseconds(Int64.random(in: 0...nanos)))
                delay = min(delay * 2, c.statusInterval)
            }
        }
    }
}

/// When a relay writes its Relay's status again: every agent follows the relays, so each write is one
/// delivery per agent. Written: the first time (and after a failure), when the session count moved by a
/// tenth (at least one), and when `refresh` has passed since the last write (the time stamp operators read
/// in `meshctl get relays`). Phase changes (Draining on stop) are written by their own path.
public enum RelayStatusPolicy {
    public static func due(
        sessions: Int,
        last: (sessions: Int, at: ContinuousClock.Instant)?,
        now: ContinuousClock.Instant,
        refresh: Duration
    ) -> Bool {
        guard let last else { return true }
        if now - last.at >= refresh { return true }
        return abs(sessions - last.sessions) >= max(1, last.sessions / 10)
    }
}
