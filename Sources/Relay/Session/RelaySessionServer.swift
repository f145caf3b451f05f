import Logging
import MeshCore
import MeshIdentity
import Metrics
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import ServiceLifecycle
import Synchronization
import X509

/// Settings of the relay session listener (7800/tcp).
public struct RelaySessionConfiguration: Sendable {
    public var listen: ListenAddress
    /// The relay's name, sent in `welcome`.
    public var relayName: String
    /// How often agents should ping (sent in `welcome`).
    public var keepaliveSeconds: UInt16 = 15
    /// A control session with no message for this long is closed (three missed pings).
    public var sessionIdleTimeout: TimeAmount = .seconds(45)
    /// A new connection must send its first message within this.
    public var firstMessageTimeout: TimeAmount = .seconds(10)
    /// The target must accept a circuit within this, or the requester gets `refused(timeout)`.
    public var acceptTimeout: TimeAmount = .seconds(10)
    /// Circuits (open or pending) one node may be an end of.
    public var maxCircuitsPerNode: Int = 64
    /// A spliced circuit with no byte either way for this long is closed.
    public var circuitIdleTimeout: TimeAmount = .seconds(300)
    /// Where a node without a session here is homed (its Node's `status.relay` and that relay's
    /// addresses, from the control plane). With it, `connect` to such a node is forwarded to that
    /// relay (`forward`); without it, refused `nodeOffline`.
    public var locate: (@Sendable (_ node: String) async -> RelayLocation?)?
    /// TCP connect timeout per address when forwarding to another relay.
    public var forwardConnectTimeout: TimeAmount = .seconds(3)

    public init(listen: ListenAddress, relayName: String) {
        self.listen = listen
        self.relayName = relayName
    }
}

/// Another relay, as `locate` finds it: its name and session addresses.
public struct RelayLocation: Sendable, Hashable {
    public var relay: String
    public var addresses: [SocketAddress]

    public init(relay: String, addresses: [SocketAddress]) {
        self.relay = relay
        self.addresses = addresses
    }
}

/// Counters on the relay's `/metrics`.
enum RelaySessionMetrics {
    static func count(_ label: String, _ dims: [(String, String)] = [], by n: Int = 1) {
        Counter(label: label, dimensions: dims).increment(by: n)
    }
}

/// The relay session listener: TLS 1.3, mutual, mesh CA only, `mesh://node/...` clients. Control
/// sessions (`hello`), circuit requests (`connect`) and second halves (`accept`), then splices the
/// two connections byte for byte (README "Relay sessions").
public final class RelaySessionServer: Sendable {
    public let configuration: RelaySessionConfiguration
    let hub: RelayHub
    /// The listener's TLS context (replaced when the relay's certificate is renewed: `use`).
    private let tls: Mutex<NIOSSLContext>
    let revoked: RevokedSerials
    let logger: Logger
    let group: any EventLoopGroup
    /// This relay's certificate as a client of other relays (forwarding); nil when it cannot be one.
    private let relayClientTLS: Mutex<MeshLinkTLS?>
    var relayTLS: MeshLinkTLS? { self.relayClientTLS.withLock { $0 } }
    private let channel = Mutex<(any Channel)?>(nil)
    /// Where local circuits are spliced once both halves have left the session's TLS.
    let splicer: CircuitSplicer

    public init(
        configuration: RelaySessionConfiguration,
        credentials: LoadedCredentials,
        revoked: RevokedSerials = RevokedSerials(),
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger
    ) throws {
        self.configuration = configuration
        self.hub = RelayHub(maxCircuitsPerNode: configuration.maxCircuitsPerNode)
        self.tls = Mutex(try MeshTLS.serverContext(credentials, requireClientCertificate: true))
        self.relayClientTLS = Mutex(try? MeshLinkTLS(credentials, revoked: revoked))
        self.revoked = revoked
        self.group = group
        self.logger = logger
        self.splicer = CircuitSplicer(
            threads: Array(group.makeIterator()).count,
            idleTimeout: configuration.circuitIdleTimeout,
            logger: logger
        )
    }

    /// Node sessions open now.
    public var sessions: Int { self.hub.sessionCount }

    /// Serves later connections (and forwards) with renewed credentials; open ones keep theirs.
    public func use(_ credentials: LoadedCredentials) throws {
        let context = try MeshTLS.serverContext(credentials, requireClientCertificate: true)
        let client = try MeshLinkTLS(credentials, revoked: self.revoked)
        self.tls.withLock { $0 = context }
        self.relayClientTLS.withLock { $0 = client }
    }

    /// Binds and serves; returns the bound address.
    public func start() async throws -> SocketAddress {
        let channel = try await ServerBootstrap(group: self.group)
            // When a relay dies, every agent homed on it re-homes, most of them here, within seconds: a short
            // accept queue would drop their SYNs and cost each a retransmission (1 s, then 3 s). The kernel
            // caps it at net.core.somaxconn.
            .serverChannelOption(.backlog, value: 4096)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: false)
            .childChannelInitializer { child in
                child.eventLoop.makeCompletedFuture {
                    let tls = self.tls.withLock { $0 }
                    try child.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                    try child.pipeline.syncOperations.addHandler(RelaySessionHandler(server: self))
                }
            }
            .bind(host: self.configuration.listen.host, port: self.configuration.listen.port)
            .get()
        self.channel.withLock { $0 = channel }
        self.logger.info(
            "relay sessions on \(channel.localAddress?.description ?? self.configuration.listen.description)"
        )
        return channel.localAddress!
    }

    /// Stops listening, closes the control sessions (agents re-home) and the spliced circuits (their links
    /// fail and come back through another relay).
    public func stop() async {
        let channel = self.channel.withLock { c in
            defer { c = nil }
            return c
        }
        try? await channel?.close()
        for session in self.hub.state.withLock({ Array($0.sessions.values) }) { session.close(promise: nil) }
        self.splicer.stop()
    }

    /// Why a forward failed: the refusal for the requesting node.
    struct ForwardRefusal: Error {
        let reason: RelayRefusal
        let text: String
    }

    /// Dials the relay `to` is homed on (as this relay, mutual TLS, expecting exactly that relay) and
    /// asks it for the circuit; the connection once it answered `ready`, with the circuit id.
    func dialForward(from: String, to: String, offline: String) async throws -> (any Channel, UInt64) {
        guard let locate = self.configuration.locate, let tls = self.relayTLS else {
            throw ForwardRefusal(reason: .nodeOffline, text: offline)
        }
        guard let location = await locate(to), location.relay != self.configuration.relayName else {
            throw ForwardRefusal(reason: .nodeOffline, text: "\(offline), nor at any other relay")
        }
        var failures: [String] = []
        for address in location.addresses {
            let verifier = tls.dialerVerifier(expect: .relay(location.relay))
            let ready = self.group.next().makePromise(of: UInt64.self)
            let channel: any Channel
            do {
                channel = try await ClientBootstrap(group: self.group)
                    .connectTimeout(self.configuration.forwardConnectTimeout)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(
                                NIOSSLClientHandler(
                                    context: tls.clientContext,
                                    serverHostname: nil,
                                    customVerificationCallback: verifier.callback
                                )
                            )
                            try channel.pipeline.syncOperations.addHandler(
                                RelayCircuitHandler(ready: ready, onReady: nil) { verifier.lastRefusal?.message }
                            )
                        }
                    }
                    .connect(to: address).get()
            } catch {
                ready.fail(error)
                failures.append("\(address): \(error)")
                continue
            }
            let timeout = channel.eventLoop.scheduleTask(in: self.configuration.acceptTimeout + .seconds(5)) {
                ready.fail(RelayClientError(relay: location.relay, .timedOut("waiting for ready")))
                channel.close(promise: nil)
            }
            if let frame = try? RelaySessionMessage.forward(from: from, to: to).encode() {
                channel.writeAndFlush(ByteBuffer(bytes: frame), promise: nil)
            }
            do {
                let circuit = try await ready.futureResult.get()
                timeout.cancel()
                return (channel, circuit)
            } catch let error as RelayClientError {
                timeout.cancel()
                channel.close(promise: nil)
                if case .refused(let code, let text) = error.kind {
                    throw ForwardRefusal(reason: code, text: "via relay \(location.relay): \(text)")
                }
                failures.append("\(address): \(error.detail)")
            } catch {
                timeout.cancel()
                channel.close(promise: nil)
                failures.append("\(address): \(error)")
            }
        }
        throw ForwardRefusal(
            reason: .nodeOffline,
            text: "node \(to) is homed on relay \(location.relay), which could not be reached: "
                + (failures.isEmpty ? "it has no address" : failures.joined(separator: "; "))
        )
    }

    /// Serves until graceful shutdown (or cancellation), then stops.
    public func run() async throws {
        _ = try await self.start()
        try? await gracefulShutdown()
        await self.stop()
    }
}
