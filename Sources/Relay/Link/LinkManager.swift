import Logging
import MeshIdentity
import MeshWire
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One link as `/peers` shows it.
public struct LinkStats: Sendable, Hashable, Codable {
    public var node: String
    /// `direct`, `punched` or `relayed`.
    public var path: String
    public var relay: String?
    /// The last mux ping's round trip (nil until one came back).
    public var rttMicros: Int64?
    public var streams: Int
    public var bytesSent: UInt64
    public var bytesReceived: UInt64
    public var since: Date
    /// The node that dialed it.
    public var dialer: String
    /// What seals its records after the handshake: `mesh` (the mesh record layer) or `tls` (NIOSSL).
    public var records: String
    /// What carries its bytes after the handshake: `loop` (this node's link loop, ``LinkLoop``) or `nio` (a
    /// NIO channel and the mux handler).
    public var dataPath: String
}

/// The links of one node: at most one per peer node, dialed on first use, kept while streams are open
/// plus an idle timeout, dropped when the peer leaves.
///
/// When both nodes dial each other at once, each ends up with two links for a moment; both keep the one
/// dialed by the lexically smaller node name and retire the other (Go Away, closed when its streams are
/// done), so both sides agree on the survivor without a message.
public final class LinkManager: Sendable {
    /// A node's link addresses (its advertised addresses on its link port), in the order to try them.
    public typealias AddressResolver = @Sendable (_ node: String) async throws -> [SocketAddress]
    /// A relay circuit to a node (``RelaySessionClient/circuit(to:)``): a connected channel that has read
    /// nothing of the link yet, and the relay's name.
    public typealias CircuitDialer = @Sendable (_ node: String) async throws -> (channel: any Channel, relay: String)

    public let localNode: String
    /// This node's credentials for new links (replaced after a certificate renewal: `replaceTLS`).
    public var tls: MeshLinkTLS { self.currentTLS.withLock { $0 } }
    private let currentTLS: Mutex<MeshLinkTLS>
    public let configuration: LinkConfiguration
    public let group: any EventLoopGroup
    let resolve: AddressResolver
    let check: LinkTargetCheck
    let logger: Logger
    private let circuits: Mutex<CircuitDialer?>
    private let state = Mutex(State())
    private let hooks = Mutex(Hooks())

    /// A link came up and joined the table (`replaced`: the link it took over from, when it upgraded a
    /// relayed one), or a link that was up closed.
    public enum Event: Sendable {
        case up(Link, replaced: Link?)
        case down(Link)
    }

    /// Handles a link's control stream (target ``StreamTarget/linkControl``) that the peer opened: the
    /// stream (accepted, header gone, reading paused), the peer, and bytes already read after the header.
    public typealias ControlHandler = @Sendable (_ stream: any Channel, _ peer: String, _ rest: ByteBuffer) -> Void

    private struct Hooks {
        var observer: (@Sendable (Event) -> Void)?
        var control: ControlHandler?
    }

    private struct State {
        var links: [String: Link] = [:]
        /// Every link that is up, the current and the retiring ones (keyed by its channel).
        var all: [ObjectIdentifier: Link] = [:]
        var dialing: [String: EventLoopFuture<Link>] = [:]
        var refusedSent: [UInt8: Int] = [:]
        var refusedReceived: [UInt8: Int] = [:]
        var handshakesRefused = 0
        var shutDown = false
        /// When a failed dial to each node was last logged (a warning at most every 10 s per node).
        var dialFailureLogged: [String: ContinuousClock.Instant] = [:]
    }

    public init(
        tls: MeshLinkTLS,
        group: any EventLoopGroup,
        configuration: LinkConfiguration = LinkConfiguration(),
        logger: Logger = Logger(label: "mesh.link"),
        resolve: @escaping AddressResolver,
        check: @escaping LinkTargetCheck,
        circuits: CircuitDialer? = nil
    ) {
        self.circuits = Mutex(circuits)
        self.localNode = tls.identity.name
        self.currentTLS = Mutex(tls)
        self.group = group
        self.configuration = configuration
        self.logger = logger
        self.resolve = resolve
        self.check = check
    }

    /// New links (and relay sessions) use `tls` from now on: the node's renewed certificate. Links that are
    /// up keep the one they were made with until they close.
    public func replaceTLS(_ tls: MeshLinkTLS) {
        self.currentTLS.withLock { $0 = tls }
    }

    /// Tells `observer` of every link that comes up or goes down (the punch coordinator).
    public func setObserver(_ observer: @escaping @Sendable (Event) -> Void) {
        self.hooks.withLock { $0.observer = observer }
    }

    /// Takes the control streams peers open (the punch coordinator); without one they are refused.
    public func setControlHandler(_ handler: @escaping ControlHandler) {
        self.hooks.withLock { $0.control = handler }
    }

    /// Opens a control stream on `link` (not any link to its peer: the one given), with
    /// `initializer`'s handlers in place once the peer accepted it.
    public func openControl(on link: Link, initializer: MuxStreamInitializer? = nil) async throws -> any Channel {
        try await self.open(on: link, .linkControl, initializer)
    }

    /// Lets `link(to:)` reach nodes through a relay too (set once the relay client exists).
    public func setCircuitDialer(_ dialer: @escaping CircuitDialer) {
        self.circuits.withLock { $0 = dialer }
    }

    // MARK: streams

    /// Opens a stream to `target` at `node`, over the link to it (dialed if there is none). Returns once
    /// the node accepted: the stream's pipeline then holds `initializer`'s handlers, which get the
    /// endpoint's bytes. A refusal throws ``LinkError/refused(_:)`` (and is counted).
    public func stream(
        to node: String,
        open target: StreamTarget,
        initializer: MuxStreamInitializer? = nil
    ) async throws -> any Channel {
        var attempt = 0
        while true {
            attempt += 1
            let (link, release) = try await self.link(to: node, holding: true)
            defer { release() }
            do {
                return try await self.open(on: link, target, initializer)
            } catch LinkError.refused(let refusal) {
                self.refusedByPeer(node, target, refusal)
                throw LinkError.refused(refusal)
            } catch {
                // The link lost a tie-break (the peer sent Go Away) or died under us: one more try on
                // the current link (or a new one).
                if attempt == 1 {
                    if let mux = await link.muxStats(), mux.goAwayReceived != nil { link.retire() }
                    if !link.isUsable { continue }
                }
                throw error
            }
        }
    }

    /// Splices a connected socket (a proxied client's TCP connection, handed over by the data plane) to a
    /// new stream to `target` at `node`: the socket joins the link's event loop, bytes and half-close flow
    /// both ways until either side ends. On a refusal (or any failure) the socket is *not* taken: the
    /// caller still owns it and closes it.
    ///
    /// `ended`, when given, is called once when a splice that was put in place ends, with the bytes it carried
    /// each way; never when this throws.
    public func splice(
        socket: NIOBSDSocket.Handle,
        to node: String,
        open target: StreamTarget,
        ended: (@Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void)? = nil
    ) async throws {
        let (link, release) = try await self.link(to: node, holding: true)
        defer { release() }
        if let loop = link.loop {
            // On a loop the socket itself is the stream's end: no duplicate, no NIO channel.
            do {
                try await loop.open(socket: socket, target: target, ended: ended)
            } catch LinkError.refused(let refusal) {
                self.refusedByPeer(node, target, refusal)
                throw LinkError.refused(refusal)
            }
            return
        }
        let ending = ended.map(SpliceEnding.init)
        let stream = try await self.stream(to: node, open: target) { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                try stream.pipeline.syncOperations.addHandler(HoldHandler())
            }
        }
        // NIO gets a duplicate of the socket. Once handed over, NIO closes what it holds whenever the
        // channel fails (an initializer that throws, a registration that fails), so giving it the caller's
        // descriptor would let a failure close it under the caller, who closes it again: a double close,
        // which closes whatever socket took the number meanwhile (seen as EBADF in another server's bind).
        // With a duplicate the caller's socket is untouched on failure, and given up here on success.
        let copy = dup(socket)
        guard copy >= 0 else {
            let code = errno
            stream.close(promise: nil)
            throw IOError(errnoCode: code, reason: "dup of the socket to splice")
        }
        do {
            // Everything on the stream's event loop, in the socket's initializer: the splice is in place
            // before the socket reads anything.
            _ = try await ClientBootstrap(group: stream.eventLoop)
                .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                .channelInitializer { client in
                    client.eventLoop.makeCompletedFuture {
                        let (a, b) = StreamSpliceHandler.pair()
                        if let ending { try client.pipeline.syncOperations.addHandler(SpliceTallyHandler(ending)) }
                        try client.pipeline.syncOperations.addHandler(b)
                        try stream.pipeline.syncOperations.addHandler(a)
                        // What came between the reply and now goes on to the splice.
                        let hold = try stream.pipeline.syncOperations.context(handlerType: HoldHandler.self)
                        stream.pipeline.syncOperations.removeHandler(context: hold, promise: nil)
                        if !stream.isActive { client.close(promise: nil) }
                    }
                }
                .withConnectedSocket(copy).get()
        } catch {
            stream.close(promise: nil)
            // A splice that already ran and ended told its end: the socket was carried, so this is no failure.
            if ending?.claim() ?? true { throw error }
        }
        close(socket)
    }

    /// A stream the peer opened on a link on a loop that is not a TCP splice: the control stream goes to the
    /// control handler, a UDP flow to a connected UDP socket, each on a NIO channel over `socket` (one end of
    /// the socket pair the loop splices to the stream). False when there is nothing to take it.
    private var bridgeInbound: @Sendable (StreamTarget, Int32, String) -> Bool {
        { [self] target, socket, peer in
            let bootstrap = ClientBootstrap(group: self.group.next())
                .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                .channelOption(ChannelOptions.autoRead, value: false)
            if target == .linkControl {
                guard let control = self.hooks.withLock({ $0.control }) else { return false }
                bootstrap.withConnectedSocket(socket).whenSuccess { stream in
                    control(stream, peer, ByteBuffer())
                    stream.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                }
                return true
            }
            guard
                let address = try? SocketAddress(ipAddress: target.endpoint.description, port: Int(target.endpointPort))
            else { return false }
            bootstrap.withConnectedSocket(socket).whenSuccess { stream in
                DatagramBootstrap(group: stream.eventLoop).connect(to: address).whenComplete { result in
                    switch result {
                    case .success(let udp):
                        do {
                            try udp.pipeline.syncOperations.addHandler(DatagramSocketHandler(stream: stream))
                            try stream.pipeline.syncOperations.addHandler(DatagramStreamHandler(socket: udp))
                            stream.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                        } catch {
                            udp.close(promise: nil)
                            stream.close(promise: nil)
                        }
                    case .failure(let error):
                        self.logger.info(
                            "a UDP flow's endpoint could not be reached",
                            metadata: ["peer": "\(peer)", "target": "\(target)", "error": "\(error)"]
                        )
                        stream.close(promise: nil)
                    }
                }
            }
            return true
        }
    }

    /// Logs a dial that found no way to `node` (every address and the relay failed), at most every 10 s per
    /// node: the streams that needed the link fail with the same error, each to its own caller.
    private func dialFailed(_ node: String, _ error: any Error) {
        let now = ContinuousClock.now
        let log = self.state.withLock { s -> Bool in
            if let last = s.dialFailureLogged[node], now - last < .seconds(10) { return false }
            s.dialFailureLogged[node] = now
            return true
        }
        guard log else { return }
        self.logger.warning("cannot reach the node over a link", metadata: ["peer": "\(node)", "error": "\(error)"])
    }

    /// Counts and logs a refusal from the peer.
    private func refusedByPeer(_ node: String, _ target: StreamTarget, _ refusal: StreamRefusal) {
        self.state.withLock { $0.refusedReceived[refusal.code.rawValue, default: 0] += 1 }
        Counter(
            label: "link_streams_refused_total",
            dimensions: [("side", "sender"), ("code", "\(refusal.code.rawValue)")]
        ).increment()
        self.logger.warning(
            "stream refused by the peer",
            metadata: ["peer": "\(node)", "target": "\(target)", "reason": "\(refusal.reason)"]
        )
    }

    /// Counts a refusal this node sent.
    private func refusedToPeer(_ refusal: StreamRefusal) {
        self.state.withLock { $0.refusedSent[refusal.code.rawValue, default: 0] += 1 }
        Counter(
            label: "link_streams_refused_total",
            dimensions: [("side", "receiver"), ("code", "\(refusal.code.rawValue)")]
        ).increment()
    }

    private func open(
        on link: Link,
        _ target: StreamTarget,
        _ initializer: MuxStreamInitializer?
    ) async throws -> any Channel {
        if let loop = link.loop { return try await Self.bridge(loop, link.eventLoop, target, initializer) }
        guard let session = link.session else { throw LinkError.closedBeforeReply }
        let reply = link.eventLoop.makePromise(of: Void.self)
        let stream: any Channel
        do {
            stream = try await session.openStream { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(StreamOpenSender(target: target, reply: reply))
                    link.track(stream)
                }.flatMap {
                    initializer?(stream) ?? stream.eventLoop.makeSucceededVoidFuture()
                }
            }.get()
        } catch {
            reply.fail(error)
            throw error
        }
        try await reply.futureResult.get()
        return stream
    }

    /// A stream of a link on a ``LinkLoop`` as a NIO channel (the HTTP pool's, a UDP flow's, a test's): one end
    /// of a socket pair is spliced to the stream by the loop, the other becomes the channel (half-close on).
    private static func bridge(
        _ loop: LinkLoopSession,
        _ eventLoop: any EventLoop,
        _ target: StreamTarget,
        _ initializer: MuxStreamInitializer?
    ) async throws -> any Channel {
        var fds: [Int32] = [-1, -1]
        let type = Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue)
        guard socketpair(AF_UNIX, type, 0, &fds) == 0 else {
            throw IOError(errnoCode: errno, reason: "socketpair for a stream")
        }
        do {
            try await loop.open(socket: fds[0], target: target)
        } catch {
            close(fds[0])
            close(fds[1])
            throw error
        }
        return try await ClientBootstrap(group: eventLoop)
            .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            .channelInitializer { channel in initializer?(channel) ?? channel.eventLoop.makeSucceededVoidFuture() }
            .withConnectedSocket(fds[1]).get()
    }

    // MARK: links

    /// The link to `node`: the current one, the one being dialed, or a new dial. Finding a link does not
    /// restart its idle time; only a stream does.
    public func link(to node: String) async throws -> Link {
        try await self.link(to: node, holding: false).link
    }

    /// The link to `node` as ``link(to:)`` finds it, and with `holding`, held (``Link/hold()``) until
    /// `release` is called: a caller about to open a stream. A dialed link is held from the moment it is up,
    /// on its event loop, before its idle timer can fire, until the dial returns (and with `holding`, on):
    /// otherwise it would count its idle time from then, and on a busy machine the caller's stream may come
    /// later than that.
    private func link(
        to node: String,
        holding: Bool
    ) async throws -> (link: Link, release: @Sendable () -> Void) {
        let hold: @Sendable (Link) -> @Sendable () -> Void = { link in
            guard holding else { return {} }
            return link.hold()
        }
        enum Step {
            case have(Link, @Sendable () -> Void)
            case wait(EventLoopFuture<(link: Link, release: @Sendable () -> Void)>)
            case dial(EventLoopPromise<Link>)
        }
        let step = try self.state.withLock { s throws(LinkError) -> Step in
            guard !s.shutDown else { throw LinkError.shutDown }
            if let l = s.links[node], l.isUsable { return .have(l, hold(l)) }
            if let f = s.dialing[node] { return .wait(f.map { ($0, hold($0)) }) }
            let p = self.group.next().makePromise(of: Link.self)
            s.dialing[node] = p.futureResult
            return .dial(p)
        }
        let promise: EventLoopPromise<Link>
        switch step {
        case .have(let l, let release): return (l, release)
        case .wait(let f): return try await f.get()
        case .dial(let p): promise = p
        }
        let opening = OpeningHolds()
        defer { opening.release() }
        defer { self.state.withLock { _ = $0.dialing.removeValue(forKey: node) } }
        let current: Link
        do {
            let dialed = try await self.dial(node, opening: opening)  // in the table already (establish)
            // The peer's own dial may have won the tie-break: use the current link.
            current =
                self.state.withLock { s in
                    s.dialFailureLogged[node] = nil
                    return s.links[node]
                } ?? dialed
        } catch {
            guard let theirs = self.state.withLock({ $0.links[node] }), theirs.isUsable else {
                self.dialFailed(node, error)
                promise.fail(error)
                throw error
            }
            self.logger.info(
                "a dial failed while the peer's own link came up: using that one",
                metadata: ["peer": "\(node)", "link": "\(theirs)", "error": "\(error)"]
            )
            current = theirs
        }
        let release = hold(current)
        promise.succeed(current)
        return (current, release)
    }

    /// Dials `node`: directly, and (with a circuit dialer) through the relay as well, the relayed dial
    /// starting after `relayDelay`, or at once when the direct one fails or the node advertises no
    /// address. The first link up wins; the other attempt is closed (a TCP connect under way included).
    private func dial(_ node: String, opening: OpeningHolds) async throws -> Link {
        guard let circuits = self.circuits.withLock({ $0 }) else {
            return try await self.dialDirect(
                node,
                addresses: try await self.resolve(node),
                race: DirectDial<Link>?.none,
                opening: opening
            )
        }
        let errors = NIOLockedValueBox<[String]>([])
        let addresses: [SocketAddress]
        do {
            addresses = try await self.resolve(node)
        } catch {
            errors.withLockedValue { $0.append("its addresses: \(error)") }
            addresses = []
        }
        let loop = self.group.next()
        let race = Race<Link>(count: 2) { $0.close() }
        let relayGo = loop.makePromise(of: Void.self)
        let direct = DirectDial(race: race)
        let link = await withCheckedContinuation { continuation in
            race.start(continuation)
            if addresses.isEmpty {
                errors.withLockedValue { $0.append("it advertises no link address") }
                relayGo.succeed()
                race.offer(Link?.none)
            } else {
                loop.scheduleTask(in: self.configuration.relayDelay) { relayGo.succeed() }
                Task {
                    do {
                        _ = try await self.dialDirect(node, addresses: addresses, race: direct, opening: opening)
                    } catch {
                        errors.withLockedValue { $0.append("direct: \(error)") }
                        relayGo.succeed()
                        race.offer(Link?.none)
                    }
                }
            }
            Task {
                try? await relayGo.futureResult.get()
                guard !race.isDone else {
                    race.offer(Link?.none)
                    return
                }
                do {
                    let (channel, relay) = try await circuits(node)
                    guard !race.isDone else {
                        channel.close(promise: nil)
                        race.offer(Link?.none)
                        return
                    }
                    _ = try await self.establish(
                        over: channel,
                        role: .dialer(expect: node),
                        path: .relayed(relay),
                        claim: direct.relayedClaim,
                        opening: opening
                    ).get()
                } catch {
                    errors.withLockedValue { $0.append("relayed: \(error)") }
                    race.offer(Link?.none)
                }
            }
        }
        relayGo.succeed()
        if let link { return link }
        throw LinkError.unreachable(node: node, errors.withLockedValue { $0.joined(separator: "; ") })
    }

    /// Dials `node` at each of its addresses in turn (TCP, then the link's TLS). In a race, a link up
    /// claims the win before it joins the table, and the dial stops once the race is decided.
    private func dialDirect(
        _ node: String,
        addresses: [SocketAddress],
        race: DirectDial<Link>?,
        opening: OpeningHolds
    ) async throws -> Link {
        guard !addresses.isEmpty else { throw LinkError.unreachable(node: node, "it advertises no address") }
        let claim: (@Sendable (Link) -> Bool)? = race.map { $0.claim }
        var failures: [String] = []
        for address in addresses {
            if let race, race.race.isDone { break }
            let box = NIOLockedValueBox<EventLoopFuture<Link>?>(nil)
            do {
                let channel = try await ClientBootstrap(group: self.group)
                    .connectTimeout(self.configuration.connectTimeout)
                    .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
                    .channelInitializer { channel in
                        race?.connecting(channel)
                        box.withLockedValue {
                            $0 = self.establish(
                                over: channel,
                                role: .dialer(expect: node),
                                path: .direct,
                                claim: claim,
                                opening: opening
                            )
                        }
                        return channel.eventLoop.makeSucceededVoidFuture()
                    }
                    .connect(to: address).get()
                guard let future = box.withLockedValue({ $0 }) else {
                    channel.close(promise: nil)
                    throw LinkError.closedDuringHandshake
                }
                return try await future.get()
            } catch let error as LinkError where error != .closedDuringHandshake {
                if case .handshakeFailed = error { throw error }  // the wrong peer: do not try elsewhere
                failures.append("\(address): \(error)")
            } catch {
                failures.append("\(address): \(error)")
            }
        }
        throw LinkError.unreachable(node: node, failures.joined(separator: "; "))
    }

    /// Sets up a link on a connected transport (a dialed TCP connection, an accepted one, a relay
    /// circuit handed over by the relay client: `path: .relayed(relay)`). Call before the channel reads
    /// anything; the link joins the table once it is up (with the tie-break against one already there).
    public func establish(over channel: any Channel, role: LinkRole, path: LinkPath) -> EventLoopFuture<Link> {
        self.establish(over: channel, role: role, path: path, claim: nil, opening: nil)
    }

    /// `claim`: a dial in a race; a link up that lost it is closed, not adopted. `opening`: the dial of a
    /// caller about to open a stream, which holds the link from the moment it is up.
    func establish(
        over channel: any Channel,
        role: LinkRole,
        path: LinkPath,
        claim: (@Sendable (Link) -> Bool)?,
        opening: OpeningHolds?
    ) -> EventLoopFuture<Link> {
        let future = Link.establish(
            over: channel,
            role: role,
            path: path,
            tls: self.tls,
            configuration: self.configuration,
            logger: self.logger,
            loopInbound: LinkLoopInbound(check: self.check, bridge: self.bridgeInbound) { [self] refusal in
                self.refusedToPeer(refusal)
            }
        ) { [self] link, stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.pipeline.syncOperations.addHandler(
                    StreamOpenReceiver(
                        peer: link.peer,
                        check: self.check,
                        connectTimeout: self.configuration.localConnectTimeout,
                        logger: self.logger,
                        control: self.hooks.withLock { $0.control }
                    ) { refusal in self.refusedToPeer(refusal) }
                )
            }.flatMap {
                stream.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
            }
        }
        future.whenComplete { result in
            switch result {
            case .success(let link):
                // On the link's event loop as it comes up: before its idle timer can fire.
                opening?.take(link)
                if let claim, !claim(link) { return }  // lost the race: closed by it
                self.adopt(link)
            case .failure(let error):
                guard case .acceptor = role else { return }  // a dialer's caller gets the error
                self.state.withLock { $0.handshakesRefused += 1 }
                Counter(label: "link_handshakes_failed_total").increment()
                self.logger.warning("refused an incoming link", metadata: ["reason": "\(error)"])
            }
        }
        return future
    }

    /// Puts an established link in the table, applying the tie-break against a link already there: a
    /// link whose bytes go straight (direct, punched) beats a relayed one (the upgrade: new streams take
    /// it, the relayed link's open streams finish on the circuit, then it closes); between two of a kind
    /// the one dialed by the smaller node name wins.
    func adopt(_ link: Link) {
        let key = ObjectIdentifier(link)
        let (retire, shutDown, upgraded) = self.state.withLock { s -> (Link?, Bool, Bool) in
            if s.shutDown { return (link, true, false) }
            s.all[key] = link
            guard let existing = s.links[link.peer], existing.isUsable else {
                s.links[link.peer] = link
                return (nil, false, false)
            }
            if existing.path.isDirect != link.path.isDirect {
                if existing.path.isDirect { return (link, false, false) }
                s.links[link.peer] = link
                return (existing, false, true)
            }
            let winner = min(self.localNode, link.peer)
            if existing.dialer == winner && link.dialer != winner {
                return (link, false, false)
            }
            s.links[link.peer] = link
            return (existing, false, false)
        }
        let observer = self.hooks.withLock { $0.observer }
        link.closeFuture.whenComplete { _ in
            self.state.withLock { s in
                s.all.removeValue(forKey: key)
                if s.links[link.peer] === link { s.links.removeValue(forKey: link.peer) }
            }
            if !shutDown { observer?(.down(link)) }
        }
        if let retire {
            if shutDown {
                retire.close()
            } else {
                self.logger.info(
                    upgraded
                        ? "upgraded a relayed link: new streams go \(link.path), open ones finish on the circuit"
                        : "two links to one peer: keeping the one dialed by the smaller name",
                    metadata: ["peer": "\(link.peer)", "retired": "\(retire)"]
                )
                retire.retire()
            }
        }
        if !shutDown, retire !== link { observer?(.up(link, replaced: upgraded ? retire : nil)) }
    }

    /// The peer left the mesh (or the route table): its links close.
    public func peerLeft(_ node: String) {
        let links = self.state.withLock { s in
            s.links.removeValue(forKey: node)
            s.dialFailureLogged.removeValue(forKey: node)
            return s.all.values.filter { $0.peer == node }
        }
        for l in links { l.close() }
    }

    /// Closes every link; later calls fail with ``LinkError/shutDown``.
    public func shutdown() async {
        let links = self.state.withLock { s in
            s.shutDown = true
            s.links = [:]
            return Array(s.all.values)
        }
        for l in links { l.close() }
        for l in links { try? await l.closeFuture.get() }
    }

    // MARK: inspection

    /// The current link to `node`, if one is up.
    public func currentLink(to node: String) -> Link? {
        self.state.withLock { $0.links[node] }
    }

    /// Every link that is up, current and retiring.
    public var allLinks: [Link] { self.state.withLock { Array($0.all.values) } }

    /// Streams this node refused, by refusal code.
    public var refusedSent: [UInt8: Int] { self.state.withLock { $0.refusedSent } }
    /// Streams peers refused to this node, by refusal code.
    public var refusedReceived: [UInt8: Int] { self.state.withLock { $0.refusedReceived } }
    /// Incoming links whose handshake failed (a certificate refused, a timeout).
    public var handshakesRefused: Int { self.state.withLock { $0.handshakesRefused } }

    /// One row per current link, for `/peers`.
    public func stats() async -> [LinkStats] {
        let links = self.state.withLock { Array($0.links.values) }
        var rows: [LinkStats] = []
        // A peer whose link is being replaced by an upgrade shows its current link.
        for link in links {
            guard let mux = await link.muxStats() else { continue }
            rows.append(
                LinkStats(
                    node: link.peer,
                    path: link.path.description,
                    relay: link.path.relay,
                    rttMicros: mux.lastRTT.map { $0.nanoseconds / 1000 },
                    streams: mux.openStreams,
                    bytesSent: mux.dataBytesSent,
                    bytesReceived: mux.dataBytesReceived,
                    since: link.since,
                    dialer: link.dialer,
                    records: link.records,
                    dataPath: link.loop == nil ? "nio" : "loop"
                )
            )
        }
        return rows.sorted { $0.node < $1.node }
    }
}

/// The direct side of a dial race: the race, and the TCP connection under way. When the relayed dial wins
/// first (a busy host, a slow handshake), the direct attempt under way goes on (bounded by its connect timeout
/// and handshake) and, if it comes up, upgrades the link (`adopt`: a direct link beats a relayed one): between
/// two public hosts the link ends direct however the race went. No other address is tried after the race.
final class DirectDial<Value: Sendable>: Sendable {
    let race: Race<Value>
    private let upgradeLate = Atomic<Bool>(false)

    init(race: Race<Value>) {
        self.race = race
    }

    /// Offers the direct link up to the race: true when it won, or when it came up after a relayed link won
    /// (then it joins the table as that link's upgrade).
    var claim: @Sendable (Value) -> Bool {
        let race = self.race
        return { [self] link in
            if race.isDone, self.upgradeLate.load(ordering: .sequentiallyConsistent) { return true }
            return race.offer(link)
        }
    }

    /// Offers the relayed link up to the race: true when it won. The direct attempt may upgrade it from before
    /// the offer on, never after: a direct link claimed between the two would otherwise find the race done
    /// with no upgrade allowed and be closed as the loser (under load, public x public stayed relayed).
    /// Allowing it when the direct link had already won is harmless: there is no second direct claim.
    var relayedClaim: @Sendable (Value) -> Bool {
        let race = self.race
        return { [self] link in
            self.upgradeLate.store(true, ordering: .sequentiallyConsistent)
            return race.offer(link)
        }
    }

    func connecting(_ channel: any Channel) {
        if self.race.isDone, !self.upgradeLate.load(ordering: .sequentiallyConsistent) { channel.close(promise: nil) }
    }
}

/// The holds a dial takes on the links it brings up (``Link/hold()``), all released at once when its caller
/// has opened its stream; a link up after that (a late upgrade) is not held.
final class OpeningHolds: Sendable {
    private let state = NIOLockedValueBox<(released: Bool, releases: [@Sendable () -> Void])>((false, []))

    func take(_ link: Link) {
        let release = link.hold()
        let late = self.state.withLockedValue { s -> Bool in
            if !s.released { s.releases.append(release) }
            return s.released
        }
        if late { release() }
    }

    func release() {
        let releases = self.state.withLockedValue { s -> [@Sendable () -> Void] in
            s.released = true
            defer { s.releases = [] }
            return s.releases
        }
        for release in releases { release() }
    }
}
