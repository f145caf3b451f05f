import Logging
import MeshIdentity
import MeshNIO
import MeshRecords
import MeshWire
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Which end of a link this node is.
public enum LinkRole: Sendable, Hashable {
    /// This node opened the transport and requires the other end to be exactly `mesh://node/<expect>`.
    case dialer(expect: String)
    /// The other node opened it; its identity comes from its certificate (any `mesh://node/...`).
    case acceptor
}

/// How a link's bytes travel (`/peers` shows it).
public enum LinkPath: Sendable, Hashable, CustomStringConvertible {
    /// A TCP connection between the two nodes.
    case direct
    /// A circuit spliced by a relay (its name).
    case relayed(String)
    /// A TCP connection made by a hole punch (simultaneous open through both NATs, coordinated over a
    /// relayed link).
    case punched

    public var description: String {
        switch self {
        case .direct: return "direct"
        case .relayed: return "relayed"
        case .punched: return "punched"
        }
    }

    /// Whether the bytes go straight between the two nodes (direct or punched), not through a relay.
    public var isDirect: Bool { self.relay == nil }

    public var relay: String? {
        if case .relayed(let r) = self { return r }
        return nil
    }
}

/// Settings of links (``Link``, ``LinkManager``).
public struct LinkConfiguration: Sendable {
    /// The idle timeout of a link in `role`. The dialer decides when an idle link goes; the acceptor's own
    /// timer runs twice as long, so that a stream the dialer opens near the end of its idle time never
    /// meets a link the acceptor is closing, and a link the dialer holds (``Link/hold()``: the punch
    /// coordinator, between rounds up to `idleTimeout` apart) stays up at both ends.
    public func idleTimeout(for role: LinkRole) -> TimeAmount {
        switch role {
        case .dialer: self.idleTimeout
        case .acceptor: self.idleTimeout * 2
        }
    }

    /// The multiplexer's settings (its role is set per link: the dialer is the yamux client).
    public var mux = MuxConfiguration(role: .client)
    /// A link whose TLS handshake has not completed by then is closed.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// How long a link with no open stream stays up. The node that dialed it closes it; the other waits
    /// twice as long, as a backstop for a dialer that vanished (``idleTimeout(for:)``).
    public var idleTimeout: TimeAmount = .seconds(60)
    /// TCP connect timeout per address when dialing.
    public var connectTimeout: TimeAmount = .seconds(5)
    /// How often each link pings (RTT for `/peers`); the first ping goes out when the link is up.
    public var pingInterval: TimeAmount = .seconds(15)
    /// With a relay client: how long a direct dial runs alone before the relayed one starts too (at
    /// once when the direct dial fails or the node advertises no link address).
    public var relayDelay: TimeAmount = .milliseconds(300)
    /// How long the receiving side waits for a local endpoint to accept a connection.
    public var localConnectTimeout: TimeAmount = .seconds(5)
    /// Whether this node offers the mesh record layer after the handshake (MeshRecords): when both ends
    /// do (ALPN `mesh-link-records/1`), NIOSSL leaves the link once the handshake is done and
    /// ``SealedRecordHandler`` seals its records. Off, or with a peer that does not offer it, TLS records
    /// carry the link throughout.
    public var sealedRecords = true
    /// The loop that carries links' data paths off NIO (LinkLoop/README.md): when set, a link whose two ends
    /// chose the mesh record layer leaves NIO altogether after its handshake; its socket, records, mux and
    /// streams run on this loop's thread. Streams it carries are TCP splices; a stream the peer opens for a UDP
    /// flow or the link's control stream (hole punching) is refused on such a link. nil: NIO carries links.
    public var loop: LinkLoop?
    /// Records per key of the record layer before both ends move to the next (tests set it low).
    public var recordsPerKey: UInt64 = LinkRecordCipher.defaultRecordsPerKey

    /// The link port's default.
    public static let defaultPort = 7900

    public init() {}
}

/// Why a link or a stream over it failed.
public enum LinkError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The TLS handshake failed; the reason says why (a refused certificate names the identity seen).
    case handshakeFailed(String)
    /// The handshake did not complete within `handshakeTimeout`.
    case handshakeTimedOut
    /// The transport closed before the link was up.
    case closedDuringHandshake
    /// No address of the node could be dialed (each address's failure).
    case unreachable(node: String, String)
    /// The receiving node refused the stream.
    case refused(StreamRefusal)
    /// The stream or link closed before the receiving node answered.
    case closedBeforeReply
    /// The manager is shut down.
    case shutDown

    public var description: String {
        switch self {
        case .handshakeFailed(let why): return "link handshake failed: \(why)"
        case .handshakeTimedOut: return "link handshake timed out"
        case .closedDuringHandshake: return "the link's transport closed during the handshake"
        case .unreachable(let node, let why): return "node \(node) is unreachable: \(why)"
        case .refused(let r): return "stream \(r)"
        case .closedBeforeReply: return "the stream closed before the peer answered its open header"
        case .shutDown: return "the link manager is shut down"
        }
    }
}

/// True the first time only.
private final class ReleaseOnce: Sendable {
    private let done = Atomic<Bool>(false)
    func first() -> Bool { !self.done.exchange(true, ordering: .relaxed) }
}

/// One link between this node and a peer node: a TLS 1.3 connection with mutual mesh certificates over a
/// transport (a TCP connection, a relay circuit: any connected channel), carrying one ``MuxSession``.
///
/// A link counts its streams: when none is open for its idle timeout (``LinkConfiguration/idleTimeout(for:)``: the
/// dialer's, or twice that at the acceptor) it closes itself. ``retire()`` makes it refuse new streams (Go Away)
/// and close once its streams are done.
public final class Link: Sendable, CustomStringConvertible {
    /// The peer's node name.
    public let peer: String
    /// The node that dialed the link (this node or the peer): the tie-break keeps the link dialed by the
    /// lexically smaller node name.
    public let dialer: String
    public let role: LinkRole
    public let path: LinkPath
    /// The multiplexer on NIO, or nil when the link's data path runs on a ``LinkLoop`` (``loop``).
    public let session: MuxSession?
    /// The link's data path on a ``LinkLoop``, or nil on NIO (``session``).
    public let loop: LinkLoopSession?
    /// The channel the link was set up on (closed once a loop has taken the socket).
    let transport: any Channel
    private let ended: EventLoopFuture<Void>
    private let alive: LinkAlive
    public let since: Date
    /// What seals the link's records after its handshake: `mesh` (MeshRecords) or `tls` (NIOSSL, with a
    /// peer that does not offer the record layer, or with ``LinkConfiguration/sealedRecords`` off).
    public let records: String
    let idleTimeout: TimeAmount
    private let state = Mutex(State())

    private struct State {
        var streams = 0
        var idle: Scheduled<Void>?
        var pinger: RepeatedTask?
        var retired = false
        var graceOver = false
        var closedIdle = false
    }

    public var description: String { "link to \(self.peer) (\(self.path), dialed by \(self.dialer))" }

    /// The event loop of the link's timers (and of its channel on NIO).
    public var eventLoop: any EventLoop { self.transport.eventLoop }

    /// Succeeds when the link is gone.
    public var closeFuture: EventLoopFuture<Void> { self.ended }

    /// The link's transport is up.
    public var isActive: Bool { self.loop == nil ? self.transport.isActive : self.alive.isAlive }

    /// Up, and not retired: new streams may use it.
    public var isUsable: Bool {
        self.isActive && !self.state.withLock { $0.retired }
    }

    /// Sends a ping; the future gives the round trip.
    public func ping() -> EventLoopFuture<TimeAmount> {
        if let session = self.session { return session.ping() }
        let promise = self.eventLoop.makePromise(of: TimeAmount.self)
        self.loop?.ping { result in promise.completeWith(result.mapError { $0 as any Error }) }
        return promise.futureResult
    }

    /// The multiplexer's counters (nil once its session is gone).
    public func muxStats() async -> MuxStats? {
        if let session = self.session { return try? await session.stats().get() }
        guard let loop = self.loop, self.alive.isAlive else { return nil }
        return await loop.stats().0
    }

    init(
        peer: String,
        dialer: String,
        role: LinkRole,
        path: LinkPath,
        session: MuxSession?,
        loop: LinkLoopSession? = nil,
        transport: any Channel,
        ended: EventLoopFuture<Void>? = nil,
        alive: LinkAlive = LinkAlive(),
        idleTimeout: TimeAmount,
        records: String = "tls"
    ) {
        self.records = records
        self.peer = peer
        self.dialer = dialer
        self.role = role
        self.path = path
        self.session = session
        self.loop = loop
        self.transport = transport
        self.ended = ended ?? transport.closeFuture
        self.alive = alive
        self.since = Date()
        self.idleTimeout = idleTimeout
    }

    /// Sets up a link on a connected channel that has not read anything yet (call from its initializer, or
    /// before handing it over): the TLS handler of `role`, then, once the handshake has verified the peer,
    /// the multiplexer. The future gives the link when it is up. `inbound` sets up each stream the peer
    /// opens (after the link has counted it).
    public static func establish(
        over channel: any Channel,
        role: LinkRole,
        path: LinkPath = .direct,
        tls: MeshLinkTLS,
        configuration: LinkConfiguration = LinkConfiguration(),
        logger: Logger = Logger(label: "mesh.link"),
        loopInbound: LinkLoopInbound? = nil,
        inbound: @escaping @Sendable (Link, any Channel) -> EventLoopFuture<Void>
    ) -> EventLoopFuture<Link> {
        let loop = channel.eventLoop
        if loop.inEventLoop {
            return loop.makeCompletedFuture {
                try Self.prepare(channel, role, path, tls, configuration, logger, loopInbound, inbound)
            }.flatMap { $0 }
        }
        return loop.flatSubmit {
            loop.makeCompletedFuture {
                try Self.prepare(channel, role, path, tls, configuration, logger, loopInbound, inbound)
            }.flatMap { $0 }
        }
    }

    private static func prepare(
        _ channel: any Channel,
        _ role: LinkRole,
        _ path: LinkPath,
        _ tls: MeshLinkTLS,
        _ configuration: LinkConfiguration,
        _ logger: Logger,
        _ loopInbound: LinkLoopInbound?,
        _ inbound: @escaping @Sendable (Link, any Channel) -> EventLoopFuture<Void>
    ) throws -> EventLoopFuture<Link> {
        let promise = channel.eventLoop.makePromise(of: Link.self)
        let ops = channel.pipeline.syncOperations
        let refusal: @Sendable () -> String?
        switch role {
        case .dialer(let expect):
            let verifier = tls.dialerVerifier(expect: .node(expect))
            // (The client random names the handshake's exporter secret: only the record layer needs it.)
            if configuration.sealedRecords { try ops.addHandler(ClientRandomReader(.writing)) }
            try ops.addHandler(
                NIOSSLClientHandler(
                    context: configuration.sealedRecords ? tls.linkClientContext : tls.clientContext,
                    serverHostname: nil,
                    customVerificationCallback: verifier.callback
                )
            )
            refusal = { verifier.lastRefusal?.message }
        case .acceptor:
            let verifier = tls.acceptorVerifier()
            if configuration.sealedRecords { try ops.addHandler(ClientRandomReader(.reading)) }
            try ops.addHandler(
                NIOSSLServerHandler(
                    context: configuration.sealedRecords ? tls.serverContext : try tls.tlsServerContext(),
                    customVerificationCallback: verifier.callback
                )
            )
            refusal = { verifier.lastRefusal?.message }
        }
        let handshake = LinkHandshakeHandler(
            promise: promise,
            refusal: refusal,
            dialer: role != .acceptor,
            secrets: tls.secrets,
            recordsPerKey: configuration.recordsPerKey,
            loop: configuration.loop
        ) { context, peerCertificate, sealed, handOff in
            try Self.up(
                context,
                role,
                path,
                tls,
                configuration,
                logger,
                promise.futureResult,
                peerCertificate,
                sealed,
                handOff,
                loopInbound,
                inbound
            )
        }
        try ops.addHandler(handshake)
        let timeout = channel.eventLoop.scheduleTask(in: configuration.handshakeTimeout) {
            promise.fail(LinkError.handshakeTimedOut)
            channel.close(promise: nil)
        }
        promise.futureResult.whenComplete { _ in timeout.cancel() }
        return promise.futureResult
    }

    /// The handshake is done: learn the peer, swap the handshake handler for the multiplexer.
    private static func up(
        _ context: ChannelHandlerContext,
        _ role: LinkRole,
        _ path: LinkPath,
        _ tls: MeshLinkTLS,
        _ configuration: LinkConfiguration,
        _ logger: Logger,
        _ future: EventLoopFuture<Link>,
        _ peerCertificate: NIOSSLCertificate?,
        _ sealed: Bool,
        _ handOff: LinkHandOff?,
        _ loopInbound: LinkLoopInbound?,
        _ inbound: @escaping @Sendable (Link, any Channel) -> EventLoopFuture<Void>
    ) throws -> Link {
        let channel = context.channel
        let local = tls.identity.name
        let peer: String
        let dialer: String
        var mux = configuration.mux
        switch role {
        case .dialer(let expect):
            peer = expect
            dialer = local
            mux.role = .client
        case .acceptor:
            guard let cert = peerCertificate, case .node(let name)? = MeshTLS.identity(of: cert) else {
                throw LinkError.handshakeFailed("the client's certificate names no node")
            }
            peer = name
            dialer = name
            mux.role = .server
        }
        var streamLogger = logger
        streamLogger[metadataKey: "peer"] = "\(peer)"
        if let handOff, let loop = configuration.loop {
            return Self.onLoop(
                channel,
                loop,
                handOff,
                peer: peer,
                dialer: dialer,
                role: role,
                path: path,
                configuration: configuration,
                logger: streamLogger,
                inbound: loopInbound
            )
        }
        let session = try MuxSession.install(on: channel, configuration: mux, logger: streamLogger) { stream in
            future.flatMap { link in
                link.track(stream)
                return inbound(link, stream)
            }
        }
        let link = Link(
            peer: peer,
            dialer: dialer,
            role: role,
            path: path,
            session: session,
            transport: channel,
            idleTimeout: configuration.idleTimeout(for: role),
            records: sealed ? "mesh" : "tls"
        )
        link.startTimers(pingInterval: configuration.pingInterval)
        channel.closeFuture.whenComplete { _ in link.stopTimers() }
        return link
    }

    /// The link's socket goes to `loop` (a ``LinkLoopSession``); the NIO channel is closed after (its own
    /// descriptor only: the loop holds a duplicate).
    private static func onLoop(
        _ channel: any Channel,
        _ loop: LinkLoop,
        _ handOff: LinkHandOff,
        peer: String,
        dialer: String,
        role: LinkRole,
        path: LinkPath,
        configuration: LinkConfiguration,
        logger: Logger,
        inbound: LinkLoopInbound?
    ) -> Link {
        let ended = channel.eventLoop.makePromise(of: Void.self)
        let alive = LinkAlive()
        var settings = LinkLoopConfiguration()
        settings.receiveWindow = configuration.mux.receiveWindow
        settings.maxStreams = configuration.mux.maxStreams
        settings.localConnectTimeout = configuration.localConnectTimeout
        settings.recordsPerKey = configuration.recordsPerKey
        let isDialer: Bool
        if case .dialer = role { isDialer = true } else { isDialer = false }
        var refused: @Sendable (StreamRefusal) -> Void = { _ in }
        if let inbound { refused = inbound.refused }
        let closed: @Sendable (MuxError?) -> Void = { _ in
            alive.end()
            ended.succeed(())
        }
        let session = LinkLoopSession(
            socket: handOff.socket,
            loop: loop,
            peer: peer,
            dialer: isDialer,
            secrets: handOff.secrets,
            configuration: settings,
            check: inbound?.check,
            logger: logger,
            onRefused: refused,
            onClosed: closed
        )
        let link = Link(
            peer: peer,
            dialer: dialer,
            role: role,
            path: path,
            session: nil,
            loop: session,
            transport: channel,
            ended: ended.futureResult,
            alive: alive,
            idleTimeout: configuration.idleTimeout(for: role),
            records: "mesh"
        )
        session.bridgeStream = inbound?.bridge
        session.streamsChanged = { [weak link] (opened: Bool) in
            guard let link else { return }
            if opened { link.streamOpened() } else { link.streamClosed() }
        }
        session.start(received: handOff.received)
        link.startTimers(pingInterval: configuration.pingInterval)
        ended.futureResult.whenComplete { _ in link.stopTimers() }
        return link
    }

    /// Counts a stream (ours or the peer's) until it closes.
    func track(_ stream: any Channel) {
        self.streamOpened()
        stream.closeFuture.whenComplete { _ in self.streamClosed() }
    }

    /// Keeps the link from idling out, as an open stream would, until the returned closure is called
    /// (once; later calls do nothing). The punch coordinator holds a relayed link between its rounds.
    func hold() -> @Sendable () -> Void {
        self.streamOpened()
        let released = ReleaseOnce()
        return { [self] in
            if released.first() { self.streamClosed() }
        }
    }

    func streamOpened() {
        self.state.withLock {
            $0.streams += 1
            $0.idle?.cancel()
            $0.idle = nil
        }
    }

    func streamClosed() {
        let closeNow = self.state.withLock { s -> Bool in
            s.streams -= 1
            guard s.streams == 0 else { return false }
            if s.retired { return s.graceOver }
            self.armIdle(&s)
            return false
        }
        if closeNow { self.close() }
    }

    private func armIdle(_ s: inout State) {
        s.idle?.cancel()
        let timeout = self.idleTimeout
        s.idle = self.eventLoop.scheduleTask(in: timeout) { [self] in
            let idle = self.state.withLock { s -> Bool in
                if s.streams == 0 { s.closedIdle = true }
                return s.streams == 0
            }
            if idle { self.close() }
        }
    }

    private func startTimers(pingInterval: TimeAmount) {
        self.state.withLock { s in
            self.armIdle(&s)
            s.pinger = self.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: pingInterval) {
                [weak self] _ in
                _ = self?.ping()
            }
        }
    }

    private func stopTimers() {
        self.state.withLock {
            $0.idle?.cancel()
            $0.pinger?.cancel()
        }
    }

    /// Streams open on this link (ours and the peer's).
    public var openStreams: Int { self.state.withLock { $0.streams } }

    /// Whether it was retired (a tie-break, an upgrade, a close) rather than lost.
    public var wasRetired: Bool { self.state.withLock { $0.retired } }

    /// Whether it closed because no stream was open for the idle timeout.
    public var closedForIdle: Bool { self.state.withLock { $0.closedIdle } }

    /// No new streams (Go Away to the peer); closes once the open ones are done, and not before `grace`
    /// (the peer may still be waiting for the first ping's answer that proves the link up).
    public func retire(grace: TimeAmount = .seconds(1)) {
        let first = self.state.withLock { s -> Bool in
            defer { s.retired = true }
            return !s.retired
        }
        guard first else { return }
        if let session = self.session { _ = session.goAway() } else { self.loop?.goAway() }
        self.eventLoop.scheduleTask(in: grace) { [self] in
            let closeNow = self.state.withLock { s -> Bool in
                s.graceOver = true
                return s.streams == 0
            }
            if closeNow { self.close() }
        }
    }

    /// Closes the link's transport at once (a punched link whose keepalive went unanswered): a loss, not a
    /// retirement (``wasRetired`` stays false).
    public func abort() {
        if let loop = self.loop {
            loop.close()
        } else {
            self.transport.close(promise: nil)
        }
    }

    /// Closes the link (Go Away, then the transport).
    public func close() {
        self.state.withLock { $0.retired = true }
        if let loop = self.loop {
            loop.close()
            return
        }
        let channel = self.transport
        self.session?.goAway().whenComplete { _ in channel.close(promise: nil) }
    }
}

/// Whether a link on a loop is still up (its session clears it as it ends).
final class LinkAlive: Sendable {
    private let value = Atomic<Bool>(true)
    var isAlive: Bool { self.value.load(ordering: .relaxed) }
    func end() { self.value.store(false, ordering: .relaxed) }
}

/// A link's socket leaving NIO for a ``LinkLoop``: the duplicate descriptor, the bytes read past the
/// handshake, the record secrets.
struct LinkHandOff {
    let socket: Int32
    let received: [UInt8]
    let secrets: LinkRecordSecrets
}

/// What a link on a ``LinkLoop`` does with the streams its peer opens: `check` says whether this node serves
/// the target; `refused` counts each refusal.
public struct LinkLoopInbound: Sendable {
    public var check: LinkTargetCheck
    public var refused: @Sendable (StreamRefusal) -> Void
    /// Takes a UDP flow's or the control stream's socket pair end (``LinkLoopSession/bridgeStream``).
    public var bridge: (@Sendable (_ target: StreamTarget, _ socket: Int32, _ peer: String) -> Bool)?

    public init(
        check: @escaping LinkTargetCheck,
        bridge: (@Sendable (_ target: StreamTarget, _ socket: Int32, _ peer: String) -> Bool)? = nil,
        refused: @escaping @Sendable (StreamRefusal) -> Void
    ) {
        self.check = check
        self.bridge = bridge
        self.refused = refused
    }
}

/// Waits for the TLS handshake, then hands over to the multiplexer (`up`). A handshake failure fails the
/// link's promise with the verifier's reason when there is one.
///
/// When both ends chose the mesh record layer (ALPN ``MeshLinkTLS/recordsProtocol``), it first takes the
/// handshake's exporter secret (by the client random ``ClientRandomReader`` read), puts a
/// ``SealedRecordHandler`` behind NIOSSL, and has NIOSSL leave (`stopTLS`: close_notify both ways; the bytes
/// read past the peer's go on to the record handler). The multiplexer comes up once NIOSSL is gone. A peer
/// that refused this node's certificate answers with an alert instead of its close_notify, which fails the
/// link here as the handshake would.
final class LinkHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let promise: EventLoopPromise<Link>
    private let refusal: @Sendable () -> String?
    private let dialer: Bool
    private let secrets: TLSExporterSecrets
    private let recordsPerKey: UInt64
    private let loop: LinkLoop?
    private let up: (ChannelHandlerContext, NIOSSLCertificate?, _ sealed: Bool, LinkHandOff?) throws -> Link
    private var done = false
    private var unwrapping = false

    init(
        promise: EventLoopPromise<Link>,
        refusal: @escaping @Sendable () -> String?,
        dialer: Bool,
        secrets: TLSExporterSecrets,
        recordsPerKey: UInt64,
        loop: LinkLoop?,
        up: @escaping (ChannelHandlerContext, NIOSSLCertificate?, _ sealed: Bool, LinkHandOff?) throws -> Link
    ) {
        self.loop = loop
        self.promise = promise
        self.refusal = refusal
        self.dialer = dialer
        self.secrets = secrets
        self.recordsPerKey = recordsPerKey
        self.up = up
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard !self.done, case TLSUserEvent.handshakeCompleted(let negotiated) = event else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        self.done = true
        let ops = context.pipeline.syncOperations
        let reader = try? ops.handler(type: ClientRandomReader.self)
        if let reader { ops.removeHandler(reader, promise: nil) }
        let tlsHandler: NIOSSLHandler? =
            self.dialer
            ? try? ops.handler(type: NIOSSLClientHandler.self) : try? ops.handler(type: NIOSSLServerHandler.self)
        guard let tlsHandler else {
            return self.fail(context, LinkError.handshakeFailed("the link's TLS handler is gone"))
        }
        let peerCertificate = self.dialer ? nil : tlsHandler.peerCertificate
        // Taken whichever way the link goes: the key log keeps no secret of a link that does not need it.
        let exporter = reader?.random.flatMap { self.secrets.take(clientRandom: $0) }
        guard negotiated == MeshLinkTLS.recordsProtocol else {
            return self.goUp(context, peerCertificate, sealed: false)
        }
        guard let exporter, let secrets = LinkRecordSecrets(exporterSecret: exporter)
        else {
            return self.fail(
                context,
                LinkError.handshakeFailed("no exporter secret for this handshake in the key log: cannot seal records")
            )
        }
        let sealed = SealedRecordHandler(secrets: secrets, dialer: self.dialer, recordsPerKey: self.recordsPerKey)
        do {
            try ops.addHandler(sealed, position: .after(tlsHandler))
        } catch {
            return self.fail(context, error)
        }
        self.unwrapping = true
        let unwrapped = context.eventLoop.makePromise(of: Void.self)
        tlsHandler.stopTLS(promise: unwrapped)
        unwrapped.futureResult.assumeIsolated().whenComplete { result in
            self.unwrapping = false
            switch result {
            case .success:
                guard context.channel.isActive, let sealedContext = try? ops.context(handler: sealed) else {
                    return self.fail(context, LinkError.closedDuringHandshake)
                }
                if self.loop != nil, let fd = MeshNIO.SocketDescriptor.duplicate(of: context.channel) {
                    // The data path leaves NIO: the loop takes a duplicate of the socket and what waited.
                    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                    let handOff = LinkHandOff(socket: fd, received: sealed.handOff(), secrets: secrets)
                    context.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
                    self.goUp(context, peerCertificate, sealed: true, handOff: handOff)
                    context.channel.close(promise: nil)
                    return
                }
                self.goUp(context, peerCertificate, sealed: true) {
                    sealed.start(context: sealedContext)
                }
            case .failure(let error):
                self.fail(context, self.unwrapFailure(error))
            }
        }
    }

    /// The multiplexer comes up (`started` runs once it is in place: the record layer delivers what waited).
    private func goUp(
        _ context: ChannelHandlerContext,
        _ peerCertificate: NIOSSLCertificate?,
        sealed: Bool,
        handOff: LinkHandOff? = nil,
        started: () -> Void = {}
    ) {
        do {
            let link = try self.up(context, peerCertificate, sealed, handOff)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            started()
            guard case .dialer = link.role else {
                self.promise.succeed(link)
                return
            }
            // In TLS 1.3 the client's handshake ends before the server has checked the client's
            // certificate: a first ping answered proves the peer accepted this node. The link is held
            // meanwhile (its idle timer runs from now), until whoever waits on it has taken it.
            let promise = self.promise
            let proving = link.hold()
            link.ping().whenComplete { result in
                defer { proving() }
                switch result {
                case .success:
                    promise.succeed(link)
                case .failure(let error):
                    promise.fail(
                        LinkError.handshakeFailed(
                            "the peer closed the link after the handshake (it refused this node's certificate?): \(error)"
                        )
                    )
                    link.close()
                }
            }
        } catch {
            self.fail(context, error)
        }
    }

    /// Why leaving TLS failed. The dialer's TLS 1.3 handshake ends before the acceptor checks its certificate:
    /// an acceptor that refuses it answers the close_notify with an alert, which ends up here.
    private func unwrapFailure(_ error: any Error) -> LinkError {
        let why =
            self.dialer
            ? "the peer refused this node's certificate, or closed the link after the handshake: \(error)"
            : "the dialer closed the link after the handshake: \(error)"
        return LinkError.handshakeFailed(self.refusal() ?? why)
    }

    private func fail(_ context: ChannelHandlerContext, _ error: any Error) {
        self.promise.fail(error)
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if self.unwrapping {
            self.unwrapping = false
            self.promise.fail(self.unwrapFailure(error))
        } else if !self.done {
            self.done = true
            let reason = self.refusal() ?? "\(error)"
            self.promise.fail(LinkError.handshakeFailed(reason))
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !self.done || self.unwrapping {
            self.done = true
            self.unwrapping = false
            if let reason = self.refusal() {
                self.promise.fail(LinkError.handshakeFailed(reason))
            } else {
                self.promise.fail(LinkError.closedDuringHandshake)
            }
        }
        context.fireChannelInactive()
    }
}
