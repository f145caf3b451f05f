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

/// Who is connected and which circuits wait for their second half: shared by every connection.
final class RelayHub: Sendable {
    struct Pending {
        let requester: any Channel
        let from: String
        let to: String
    }

    struct State {
        var sessions: [String: any Channel] = [:]
        var pending: [UInt64: Pending] = [:]
        var circuits: [String: Int] = [:]
        var nextID: UInt64 = 1
    }

    let state = Mutex(State())
    let maxCircuitsPerNode: Int

    init(maxCircuitsPerNode: Int) {
        self.maxCircuitsPerNode = maxCircuitsPerNode
    }

    /// Registers `node`'s control session; returns the session it replaces (to close).
    func register(_ node: String, _ channel: any Channel) -> (any Channel)? {
        self.state.withLock { s in
            let old = s.sessions[node]
            s.sessions[node] = channel
            return old.map { $0 === channel ? nil : $0 } ?? nil
        }
    }

    func unregister(_ node: String, _ channel: any Channel) {
        self.state.withLock { s in
            if let c = s.sessions[node], c === channel { s.sessions[node] = nil }
        }
    }

    var sessionCount: Int { self.state.withLock { $0.sessions.count } }

    enum Request {
        case open(circuit: UInt64, session: any Channel)
        case refused(RelayRefusal, String)
    }

    /// A circuit from `from` to `to`: its id and `to`'s session, or why not.
    func request(from: String, to: String, requester: any Channel) -> Request {
        self.state.withLock { s in
            if to == from { return .refused(.unknownNode, "a circuit from \(from) to itself") }
            guard let session = s.sessions[to] else {
                return .refused(.nodeOffline, "node \(to) has no session at this relay")
            }
            for n in [from, to] where s.circuits[n, default: 0] >= self.maxCircuitsPerNode {
                return .refused(.limit, "node \(n) is at its limit of \(self.maxCircuitsPerNode) circuits here")
            }
            let id = s.nextID
            s.nextID += 1
            s.pending[id] = Pending(requester: requester, from: from, to: to)
            s.circuits[from, default: 0] += 1
            s.circuits[to, default: 0] += 1
            return .open(circuit: id, session: session)
        }
    }

    /// Counts a forwarded circuit against both nodes' limits; the refusal text when one is at it.
    func reserve(from: String, to: String) -> String? {
        self.state.withLock { s in
            for n in [from, to] where s.circuits[n, default: 0] >= self.maxCircuitsPerNode {
                return "node \(n) is at its limit of \(self.maxCircuitsPerNode) circuits here"
            }
            s.circuits[from, default: 0] += 1
            s.circuits[to, default: 0] += 1
            return nil
        }
    }

    /// The pending circuit `id` for its target `node`, taken (nil: none such for that node).
    func take(_ id: UInt64, by node: String) -> Pending? {
        self.state.withLock { s in
            guard let p = s.pending[id], p.to == node else { return nil }
            s.pending[id] = nil
            return p
        }
    }

    /// Drops a pending circuit (timeout, requester gone); true when it was still pending.
    func cancel(_ id: UInt64) -> Bool {
        self.state.withLock { s in
            guard let p = s.pending.removeValue(forKey: id) else { return false }
            Self.release(&s, p.from, p.to)
            return true
        }
    }

    /// A spliced circuit ended.
    func ended(from: String, to: String) {
        self.state.withLock { Self.release(&$0, from, to) }
    }

    private static func release(_ s: inout State, _ from: String, _ to: String) {
        for n in [from, to] {
            let left = s.circuits[n, default: 1] - 1
            s.circuits[n] = left > 0 ? left : nil
        }
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
            .serverChannelOption(.backlog, value: 256)
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

    /// Stops listening and closes the control sessions (agents re-home); spliced circuits end
    /// with the process.
    public func stop() async {
        let channel = self.channel.withLock { c in
            defer { c = nil }
            return c
        }
        try? await channel?.close()
        for session in self.hub.state.withLock({ Array($0.sessions.values) }) { session.close(promise: nil) }
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

/// One connection to the relay until it is spliced: reads its first message and plays its part.
final class RelaySessionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Role {
        case handshaking
        case first
        case control(String)
        case waiting(circuit: UInt64, from: String, to: String)
        case forwarding(from: String, to: String)
        case closing
    }

    /// Bytes a connection may send before its circuit is spliced.
    static let maxBuffered = 64 << 10

    let server: RelaySessionServer
    var role = Role.handshaking
    var node = ""
    /// Set when the client is another relay (it may only `forward`).
    var peerRelay: String?
    var buffer: [UInt8] = []
    var timer: Scheduled<Void>?
    var lastMessage = NIODeadline.now()

    init(server: RelaySessionServer) {
        self.server = server
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let loop = context.eventLoop
        let bound = NIOLoopBound(context, eventLoop: loop)
        self.timer = loop.scheduleTask(in: self.server.configuration.firstMessageTimeout) {
            let context = bound.value
            let handler = try? context.pipeline.syncOperations.handler(type: RelaySessionHandler.self)
            guard let handler else { return }
            switch handler.role {
            case .handshaking, .first:
                RelaySessionMetrics.count("relay_connections_refused_total", [("reason", "timeout")])
                handler.refuse(context, .timeout, "no first message within the time allowed")
            default: break
            }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls, case .handshaking = self.role {
            let certificate = (try? context.pipeline.syncOperations.nioSSL_peerCertificate()) ?? nil
            let parsed = certificate.flatMap { c in (try? c.toDERBytes()).flatMap { try? Certificate(derEncoded: $0) } }
            let identity = parsed.flatMap(meshIdentity(of:))
            let name: String
            switch identity {
            case .node(let n)? where parsed != nil:
                name = n
            case .relay(let r)? where parsed != nil && r != self.server.configuration.relayName:
                // Another relay: it may only forward circuits to nodes homed here.
                name = r
                self.peerRelay = r
            default:
                RelaySessionMetrics.count("relay_connections_refused_total", [("reason", "identity")])
                self.refuse(
                    context,
                    .forbidden,
                    "this relay serves nodes and other relays: presented \(identity?.uri ?? "no mesh identity")"
                )
                return
            }
            if let parsed, self.server.revoked.contains(MeshTLS.serialHex(parsed.serialNumber)) {
                RelaySessionMetrics.count("relay_connections_refused_total", [("reason", "revoked")])
                self.refuse(context, .forbidden, "the certificate of \(identity!.uri) is revoked")
                return
            }
            self.node = name
            self.role = .first
            self.drain(context)
            return
        }
        if let splice = event as? SpliceEvent {
            self.splice(context, splice)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.buffer += bytes.readBytes(length: bytes.readableBytes) ?? []
        // A half that waits for its circuit may send ahead (its link's first bytes), within bounds.
        if self.buffer.count > Self.maxBuffered {
            RelaySessionMetrics.count("relay_messages_malformed_total")
            self.refuse(context, .badMessage, "over \(Self.maxBuffered) bytes sent before the circuit was ready")
            return
        }
        if case .handshaking = self.role { return }
        self.drain(context)
    }

    /// Decodes what is buffered, one message at a time, while this connection is not waiting.
    func drain(_ context: ChannelHandlerContext) {
        while !self.buffer.isEmpty {
            switch self.role {
            case .waiting, .forwarding, .closing, .handshaking: return
            case .first, .control: break
            }
            let decoded: (message: RelaySessionMessage, length: Int)?
            do {
                decoded = try RelaySessionMessage.decode(self.buffer)
            } catch {
                RelaySessionMetrics.count("relay_messages_malformed_total")
                self.refuse(context, .badMessage, "\(error)")
                return
            }
            guard let (message, length) = decoded else { return }
            self.buffer.removeFirst(length)
            self.lastMessage = .now()
            self.handle(context, message)
        }
    }

    func handle(_ context: ChannelHandlerContext, _ message: RelaySessionMessage) {
        let config = self.server.configuration
        if let relay = self.peerRelay {
            guard case (.first, .forward(let from, let to)) = (self.role, message) else {
                RelaySessionMetrics.count("relay_messages_malformed_total")
                self.refuse(
                    context,
                    .forbidden,
                    "mesh://relay/\(relay) may only forward circuits (it sent \(message.kind))"
                )
                return
            }
            self.request(context, from: from, to: to, via: relay)
            return
        }
        switch (self.role, message) {
        case (.first, .hello(let version, let name)):
            guard version == RelaySessionMessage.version else {
                self.refuse(context, .badMessage, "protocol version \(version) is not spoken here (1 is)")
                return
            }
            guard name == self.node else {
                self.refuse(context, .forbidden, "hello as \(name) over the certificate of mesh://node/\(self.node)")
                return
            }
            self.timer?.cancel()
            self.role = .control(name)
            if let old = self.server.hub.register(name, context.channel) {
                old.close(promise: nil)
            }
            RelaySessionMetrics.count("relay_sessions_total")
            self.send(context, .welcome(relay: config.relayName, keepaliveSeconds: config.keepaliveSeconds))
            self.scheduleIdleCheck(context)
        case (.control, .ping(let value)):
            self.send(context, .pong(value))
        case (.control, .pong):
            break
        case (.first, .connect(let target)):
            self.request(context, from: self.node, to: target, via: nil)
        case (.first, .accept(let circuit)):
            self.timer?.cancel()
            guard let pending = self.server.hub.take(circuit, by: self.node) else {
                RelaySessionMetrics.count("relay_circuits_refused_total", [("reason", "unknown_circuit")])
                self.refuse(context, .badMessage, "no circuit \(circuit) waits for mesh://node/\(self.node)")
                return
            }
            guard pending.requester.isActive else {
                _ = self.server.hub.cancel(circuit)
                self.refuse(context, .nodeOffline, "node \(pending.from) went away before the circuit was spliced")
                return
            }
            RelaySessionMetrics.count("relay_circuits_total")
            let me = context.channel
            pending.requester.pipeline.fireUserInboundEventTriggered(
                SpliceEvent(partner: me, circuit: circuit, from: pending.from, to: pending.to, owner: false)
            )
            self.splice(
                context,
                SpliceEvent(
                    partner: pending.requester,
                    circuit: circuit,
                    from: pending.from,
                    to: pending.to,
                    owner: true
                )
            )
        default:
            RelaySessionMetrics.count("relay_messages_malformed_total")
            self.refuse(context, .badMessage, "\(message.kind) is not allowed here")
        }
    }

    /// A circuit from `from` to `to` (asked by `from` itself, or forwarded by the relay `via`): `open`
    /// to `to`'s session and wait for its `accept`; when `to` has no session here, forward it to the
    /// relay it is homed on (not a forwarded one: one hop at most).
    func request(_ context: ChannelHandlerContext, from: String, to target: String, via: String?) {
        let config = self.server.configuration
        self.timer?.cancel()
        switch self.server.hub.request(from: from, to: target, requester: context.channel) {
        case .refused(.nodeOffline, let text) where via == nil && config.locate != nil:
            self.forward(context, from: from, to: target, offline: text)
        case .refused(let reason, let text):
            RelaySessionMetrics.count("relay_circuits_refused_total", [("reason", "\(reason)")])
            self.refuse(context, reason, text)
        case .open(let circuit, let session):
            self.role = .waiting(circuit: circuit, from: from, to: target)
            if let frame = try? RelaySessionMessage.open(circuit: circuit, from: from).encode() {
                session.writeAndFlush(ByteBuffer(bytes: frame), promise: nil)
            }
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            let hub = self.server.hub
            self.timer = context.eventLoop.scheduleTask(in: config.acceptTimeout) {
                guard hub.cancel(circuit) else { return }
                RelaySessionMetrics.count("relay_circuits_refused_total", [("reason", "timeout")])
                let context = bound.value
                (try? context.pipeline.syncOperations.handler(type: RelaySessionHandler.self))?
                    .refuse(context, .timeout, "node \(target) did not accept the circuit in time")
            }
        }
    }

    /// `to` is homed on another relay: ask that one (`dialForward`), then splice this connection with
    /// the relay's. The bytes this node sends meanwhile are held (within `maxBuffered`).
    func forward(_ context: ChannelHandlerContext, from: String, to: String, offline: String) {
        let hub = self.server.hub
        if let limit = hub.reserve(from: from, to: to) {
            RelaySessionMetrics.count("relay_circuits_refused_total", [("reason", "limit")])
            self.refuse(context, .limit, limit)
            return
        }
        self.role = .forwarding(from: from, to: to)
        let server = self.server
        let loop = context.eventLoop
        let bound = NIOLoopBound(context, eventLoop: loop)
        let dialed = loop.makePromise(of: (any Channel, UInt64).self)
        dialed.completeWithTask { try await server.dialForward(from: from, to: to, offline: offline) }
        dialed.futureResult.hop(to: loop).whenComplete { result in
            let context = bound.value
            guard let handler = try? context.pipeline.syncOperations.handler(type: RelaySessionHandler.self),
                case .forwarding = handler.role, context.channel.isActive
            else {
                // The node went away meanwhile (its circuit count was released then).
                if case .success(let (other, _)) = result { other.close(promise: nil) }
                return
            }
            switch result {
            case .success(let (other, circuit)):
                RelaySessionMetrics.count("relay_circuits_forwarded_total")
                let me = context.channel
                let idle = server.configuration.circuitIdleTimeout
                // The other relay's half: splice it back to this node, then let go of the bytes it
                // held since its `ready`.
                other.eventLoop.execute {
                    do {
                        let ops = other.pipeline.syncOperations
                        try ops.addHandler(SpliceHandler(partner: me, idleTimeout: idle, onEnd: nil))
                        let held = try ops.context(handlerType: RelayCircuitHandler.self)
                        try ops.handler(type: RelayCircuitHandler.self).leave(held)
                    } catch {
                        other.close(promise: nil)
                    }
                }
                handler.spliceNow(
                    context,
                    SpliceEvent(partner: other, circuit: circuit, from: from, to: to, owner: true)
                )
            case .failure(let error):
                let refusal =
                    error as? RelaySessionServer.ForwardRefusal
                    ?? .init(reason: .nodeOffline, text: "forwarding failed: \(error)")
                RelaySessionMetrics.count("relay_circuits_refused_total", [("reason", "\(refusal.reason)")])
                handler.refuse(context, refusal.reason, refusal.text)
            }
        }
    }

    func scheduleIdleCheck(_ context: ChannelHandlerContext) {
        let idle = self.server.configuration.sessionIdleTimeout
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        self.timer = context.eventLoop.scheduleTask(in: idle) {
            let context = bound.value
            guard let h = try? context.pipeline.syncOperations.handler(type: RelaySessionHandler.self),
                case .control = h.role
            else { return }
            if NIODeadline.now() - h.lastMessage >= idle {
                RelaySessionMetrics.count("relay_sessions_idle_closed_total")
                h.refuse(context, .timeout, "no ping for \(idle.nanoseconds / 1_000_000_000) s")
            } else {
                h.scheduleIdleCheck(context)
            }
        }
    }

    /// Sends `ready`, hands what is buffered to the partner, and leaves the connection to a splice.
    func splice(_ context: ChannelHandlerContext, _ event: SpliceEvent) {
        if !event.owner {
            // The requester's half: only while it still waits (else the partner goes too).
            guard case .waiting = self.role else {
                event.partner.close(promise: nil)
                return
            }
            self.timer?.cancel()
        }
        self.spliceNow(context, event)
    }

    func spliceNow(_ context: ChannelHandlerContext, _ event: SpliceEvent) {
        self.role = .closing
        self.send(context, .ready(circuit: event.circuit))
        let leftover = self.buffer
        self.buffer = []
        let hub = self.server.hub
        let (from, to) = (event.from, event.to)
        var onEnd: (@Sendable () -> Void)? = nil
        if event.owner { onEnd = { @Sendable in hub.ended(from: from, to: to) } }
        let splice = SpliceHandler(
            partner: event.partner,
            idleTimeout: self.server.configuration.circuitIdleTimeout,
            onEnd: onEnd
        )
        try? context.pipeline.syncOperations.addHandler(splice, position: .after(self))
        if !leftover.isEmpty { event.partner.writeAndFlush(ByteBuffer(bytes: leftover), promise: nil) }
        context.pipeline.syncOperations.removeHandler(self, promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        switch self.role {
        case .control(let name): self.server.hub.unregister(name, context.channel)
        case .waiting(let circuit, _, _): _ = self.server.hub.cancel(circuit)
        case .forwarding(let from, let to): self.server.hub.ended(from: from, to: to)
        default: break
        }
        self.role = .closing
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .handshaking = self.role {
            RelaySessionMetrics.count("relay_connections_refused_total", [("reason", "tls")])
        }
        self.server.logger.debug("relay session from \(context.remoteAddress?.description ?? "?"): \(error)")
        context.close(promise: nil)
    }

    func send(_ context: ChannelHandlerContext, _ message: RelaySessionMessage) {
        guard let frame = try? message.encode() else { return }
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(bytes: frame)), promise: nil)
    }

    /// Says why, then closes.
    func refuse(_ context: ChannelHandlerContext, _ reason: RelayRefusal, _ text: String) {
        if case .control(let name) = self.role { self.server.hub.unregister(name, context.channel) }
        if case .waiting(let circuit, _, _) = self.role { _ = self.server.hub.cancel(circuit) }
        if case .forwarding(let from, let to) = self.role { self.server.hub.ended(from: from, to: to) }
        self.role = .closing
        self.timer?.cancel()
        self.server.logger.info(
            "relay session from \(self.peerRelay.map { "mesh://relay/\($0)" } ?? (self.node.isEmpty ? "?" : "mesh://node/\(self.node)")) refused (\(reason)): \(text)"
        )
        let frame =
            (try? RelaySessionMessage.refused(reason, message: String(text.prefix(512))).encode())
            ?? (try? RelaySessionMessage.refused(reason, message: "").encode()) ?? []
        let channel = context.channel
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(bytes: frame))).whenComplete { _ in
            channel.close(promise: nil)
        }
    }
}

/// Told to a connection waiting for its circuit (and to the second half itself): splice with `partner`.
struct SpliceEvent: Sendable {
    let partner: any Channel
    let circuit: UInt64
    let from: String
    let to: String
    /// The second half's own event: it releases the circuit's count when the splice ends.
    let owner: Bool
}

/// Forwards every byte to the partner connection, with backpressure both ways; the end of either
/// side closes the other.
final class SpliceHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    let partner: any Channel
    let idleTimeout: TimeAmount
    let onEnd: (@Sendable () -> Void)?
    var pending = 0
    var bytes = 0
    var lastActivity = NIODeadline.now()
    var idleTimer: Scheduled<Void>?

    init(partner: any Channel, idleTimeout: TimeAmount, onEnd: (@Sendable () -> Void)?) {
        self.partner = partner
        self.idleTimeout = idleTimeout
        self.onEnd = onEnd
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.scheduleIdle(context)
        let me = context.channel
        self.partner.closeFuture.whenComplete { _ in me.close(promise: nil) }
    }

    func scheduleIdle(_ context: ChannelHandlerContext) {
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        let idle = self.idleTimeout
        self.idleTimer = context.eventLoop.scheduleTask(in: idle) {
            let context = bound.value
            guard let h = try? context.pipeline.syncOperations.handler(type: SpliceHandler.self) else { return }
            if NIODeadline.now() - h.lastActivity >= idle {
                RelaySessionMetrics.count("relay_circuits_idle_closed_total")
                context.close(promise: nil)
            } else {
                h.scheduleIdle(context)
            }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let buffer = self.unwrapInboundIn(data)
        self.bytes += buffer.readableBytes
        self.lastActivity = .now()
        self.partner.write(buffer, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.partner.flush()
        if self.bytes > 0 {
            RelaySessionMetrics.count("relay_circuit_bytes_total", by: self.bytes)
            self.bytes = 0
        }
        // The partner's socket is behind: stop reading until it drains (it tells us, below).
        if !self.partner.isWritable {
            context.channel.setOption(.autoRead, value: false).whenFailure { _ in }
            let me = context.channel
            let partner = self.partner
            partner.eventLoop.execute {
                // Re-checked on the partner's loop: writability may have returned meanwhile.
                if partner.isWritable { me.setOption(.autoRead, value: true).whenFailure { _ in } }
            }
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            self.partner.setOption(.autoRead, value: true).whenFailure { _ in }
        }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.idleTimer?.cancel()
        self.partner.close(promise: nil)
        self.onEnd?()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
