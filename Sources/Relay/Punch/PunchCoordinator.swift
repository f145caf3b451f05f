import Logging
import MeshCore
import NIOCore
import NIOPosix
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Settings of hole punching.
public struct PunchConfiguration: Sendable {
    /// Off: links stay as dialed (direct or relayed).
    public var enabled = true
    /// The link port: punches and STUN requests leave from it (the link listener holds it too).
    public var linkPort: Int = LinkConfiguration.defaultPort
    /// Each punched link is pinged this often, below common NAT TCP timeouts, so the mapping stays.
    public var keepaliveInterval: TimeAmount = .seconds(25)
    /// A keepalive unanswered within this closes the punched link: new streams go back to the relay.
    public var keepaliveTimeout: TimeAmount = .seconds(5)
    /// Waits before punching again after a failed punch or a fallback (the last one repeats). Each round
    /// punches from a fresh port, so the second may follow soon (with the other side going first).
    public var retryBackoff: [TimeAmount] = [.seconds(1), .seconds(10), .seconds(30), .seconds(60), .seconds(120)]
    /// The least time between the start message and the first SYN (the answerer gets it a one-way time
    /// later).
    public var minimumStartDelay: TimeAmount = .milliseconds(60)
    /// In a simultaneous open, the second side starts this much after the first; which side is first
    /// alternates between rounds (a NAT that answers an early SYN with a RST must send its own first).
    public var stagger: TimeAmount = .milliseconds(120)
    /// An offer, answer or start not answered within this ends the round.
    public var messageTimeout: TimeAmount = .seconds(5)
    public var attempts = SimultaneousOpenConfiguration()

    public init() {}
}

/// One peer's punching, for `/peers` and `meshctl peers`.
public struct PunchPeerStats: Sendable, Hashable, Codable {
    public var node: String
    /// Why the link is not direct (nil when it is, or before a first try).
    public var reason: String?
    /// This node's and the peer's NAT mappings as last exchanged.
    public var localMapping: String?
    public var peerMapping: String?
    /// Relayed links that became direct or punched.
    public var upgrades: Int
    /// Direct or punched links lost (keepalive failed, connection reset): new streams went back to a relay.
    public var fallbacks: Int
    /// Punch rounds run.
    public var attempts: Int
    /// From the relayed link up to the punched (or direct) one, for the last upgrade.
    public var upgradeMillis: Int?
    /// From the offer to the punched connection up, for the last punch.
    public var punchMillis: Int?
}

/// Makes relayed links direct where the two NATs allow it (relay first, then upgrade): when a link this
/// node dialed comes up relayed, it offers its candidates to the peer over a control stream on that link
/// (relay-session messages `punchOffer`, `punchAnswer`, `punchStart`, `punchResult`), measures the RTT
/// through the relay, agrees on a start time, and both sides connect from their link ports at once. The
/// punched connection becomes a link like any other (TLS, identities checked); `LinkManager.adopt` makes
/// new streams take it while the relayed link's open streams finish. A punched link that dies sends new
/// streams back to a relay at once, and punching is tried again with backoff.
public final class PunchCoordinator: Sendable {
    let links: LinkManager
    let discovery: NATDiscoveryService
    let configuration: PunchConfiguration
    let logger: Logger
    private let state = Mutex(State())

    private struct State {
        var peers: [String: Peer] = [:]
        /// A low-TTL SYN of this node drew an ICMP time exceeded (the first router past its NAT answers
        /// expired packets, and the NAT relays the ICMP): a Linux connect aborts on it, so every later
        /// round of every peer goes without the low TTL. The routers near a node are the same for all its
        /// peers, so this is learned once per node.
        var lowTTLDrawsICMP = false
    }

    /// The attempts' settings for a round: without the low TTL once it drew an ICMP error here.
    private func roundAttempts(dials: Bool) -> SimultaneousOpenConfiguration {
        var attempts = self.configuration.attempts
        if dials || self.state.withLock({ $0.lowTTLDrawsICMP }) { attempts.lowTTL = 0 }
        return attempts
    }

    /// Remembers that the low TTL drew an ICMP error (once per node).
    private func learn(_ outcome: SimultaneousOpen.Outcome) {
        guard outcome.lowTTLUnreachable else { return }
        let first = self.state.withLock { s -> Bool in
            defer { s.lowTTLDrawsICMP = true }
            return !s.lowTTLDrawsICMP
        }
        if first {
            self.logger.notice(
                "hole punching: the low-TTL first SYN drew an ICMP time exceeded, which aborts the connect; punching goes on without it"
            )
        }
    }

    private struct Peer {
        var stats: PunchPeerStats
        var running = false
        var round = 0
        var notBefore: ContinuousClock.Instant?
        var relayedSince: Date?
        var keepalive: RepeatedTask?
    }

    public init(
        links: LinkManager,
        discovery: NATDiscoveryService,
        configuration: PunchConfiguration = PunchConfiguration(),
        logger: Logger = Logger(label: "mesh.punch")
    ) {
        self.links = links
        self.discovery = discovery
        self.configuration = configuration
        self.logger = logger
    }

    /// Hooks into the manager: link events and the control streams peers open.
    public func install() {
        guard self.configuration.enabled else { return }
        self.links.setObserver { [self] event in self.handle(event) }
        self.links.setControlHandler { [self] stream, peer, rest in self.answer(stream, peer: peer, rest: rest) }
    }

    /// One row per peer punching has seen.
    public var stats: [PunchPeerStats] {
        self.state.withLock { $0.peers.values.map(\.stats) }.sorted { $0.node < $1.node }
    }

    public func stats(for node: String) -> PunchPeerStats? { self.state.withLock { $0.peers[node]?.stats } }

    private func withPeer<T>(_ node: String, _ body: (inout Peer) -> T) -> T {
        self.state.withLock { s in
            var p =
                s.peers[node]
                ?? Peer(stats: PunchPeerStats(node: node, upgrades: 0, fallbacks: 0, attempts: 0))
            defer { s.peers[node] = p }
            return body(&p)
        }
    }

    // MARK: link events

    private func handle(_ event: LinkManager.Event) {
        switch event {
        case .up(let link, let replaced):
            if case .relayed = link.path {
                self.withPeer(link.peer) { p in if p.relayedSince == nil { p.relayedSince = link.since } }
                if link.dialer == self.links.localNode { self.schedule(link.peer) }
                return
            }
            let since = replaced?.since
            self.withPeer(link.peer) { p in
                if replaced != nil {
                    p.stats.upgrades += 1
                    let from = p.relayedSince ?? since ?? link.since
                    p.stats.upgradeMillis = Int(Date().timeIntervalSince(from) * 1000)
                }
                p.relayedSince = nil
                p.stats.reason = nil
                p.round = 0
            }
            if link.path == .punched { self.keepAlive(link) }
        case .down(let link):
            guard link.path == .punched else {
                if link.path.relay != nil { self.withPeer(link.peer) { $0.relayedSince = nil } }
                return
            }
            // Retired or closed here (idle, an upgrade, a tie-break, shutdown): not lost.
            guard !link.wasRetired else { return }
            Task {
                // The peer ended it gracefully (Go Away: its idle timeout, its shutdown): not lost either.
                if let mux = await link.muxStats(), mux.goAwayReceived != nil { return }
                self.fellBack(link)
            }
        }
    }

    /// A punched link was lost (keepalive unanswered, reset): new streams go back to a relay at once.
    private func fellBack(_ link: Link) {
        if let current = self.links.currentLink(to: link.peer), current !== link, current.path.isDirect { return }
        self.withPeer(link.peer) { p in
            p.stats.fallbacks += 1
            p.stats.reason = "punched link lost; relayed until the next punch"
            p.notBefore = ContinuousClock.now + .nanoseconds(self.backoff(max(p.round, 1)).nanoseconds)
            p.keepalive?.cancel()
            p.keepalive = nil
        }
        self.logger.warning("punched link lost: new streams go through a relay", metadata: ["peer": "\(link.peer)"])
        // A relayed link at once, for new streams (it punches again after the backoff).
        let links = self.links
        let peer = link.peer
        Task { _ = try? await links.link(to: peer) }
    }

    /// Pings a punched link every `keepaliveInterval`; an answer missing after `keepaliveTimeout` closes it.
    private func keepAlive(_ link: Link) {
        let timeout = self.configuration.keepaliveTimeout
        let task = link.eventLoop.scheduleRepeatedTask(
            initialDelay: self.configuration.keepaliveInterval,
            delay: self.configuration.keepaliveInterval
        ) { task in
            guard link.isActive else {
                task.cancel()
                return
            }
            let deadline = link.eventLoop.scheduleTask(in: timeout) {
                link.abort()
            }
            link.ping().whenComplete { result in
                if case .success = result { deadline.cancel() }
            }
        }
        link.closeFuture.whenComplete { _ in task.cancel() }
        self.withPeer(link.peer) { $0.keepalive = task }
    }

    private func backoff(_ round: Int) -> TimeAmount {
        let list = self.configuration.retryBackoff
        guard !list.isEmpty else { return .seconds(30) }
        return list[min(max(round - 1, 0), list.count - 1)]
    }

    /// Starts a punch to `peer` (now, or when the backoff allows), unless one runs.
    private func schedule(_ peer: String) {
        let wait = self.withPeer(peer) { p -> Duration? in
            guard !p.running else { return nil }
            p.running = true
            guard let nb = p.notBefore else { return .zero }
            return max(.zero, nb - ContinuousClock.now)
        }
        guard let wait else { return }
        Task {
            if wait > .zero { try? await Task.sleep(for: wait) }
            await self.offer(peer)
            self.withPeer(peer) { $0.running = false }
        }
    }

    // MARK: the offerer

    /// One or more rounds with `peer` while its current link is relayed and dialed by this node.
    private func offer(_ peer: String) async {
        while let link = self.links.currentLink(to: peer), link.isUsable, case .relayed = link.path,
            link.dialer == self.links.localNode
        {
            let round = self.withPeer(peer) { p -> Int in
                p.round += 1
                p.stats.attempts += 1
                return p.round
            }
            let outcome = await self.round(peer, on: link, round: round)
            if let current = self.links.currentLink(to: peer), current.path.isDirect { return }
            let wait = self.withPeer(peer) { p -> TimeAmount in
                p.stats.reason = outcome ?? p.stats.reason ?? "punch failed"
                let w = self.backoff(p.round)
                p.notBefore = ContinuousClock.now + .nanoseconds(w.nanoseconds)
                return w
            }
            self.logger.info(
                "no direct path yet",
                metadata: ["peer": "\(peer)", "reason": "\(outcome ?? "-")", "retryIn": "\(wait)"]
            )
            // Through the growing backoffs the relayed link is held up between rounds, so that a peer used
            // once still gets its rounds (the last backoff, repeated, holds nothing: an idle link may go,
            // and its next use punches again). The peer sees no stream while we wait; its end of the link,
            // the acceptor's, idles out only after twice the idle timeout (60 s: the longest wait held).
            let release = round < self.configuration.retryBackoff.count ? link.hold() : nil
            defer { release?() }
            do { try await Task.sleep(for: .nanoseconds(wait.nanoseconds)) } catch { return }
        }
    }

    /// One round: offer, answer, start, connect. Nil when a link came up; else why not.
    private func round(_ peer: String, on link: Link, round: Int) async -> String? {
        guard let discovered = self.discovery.report else { return "no NAT discovery yet" }
        let (report, port) = await self.roundMapping(discovered)
        let inbox = PunchInbox()
        let stream: any Channel
        do {
            stream = try await self.links.openControl(on: link) { stream in
                stream.eventLoop.makeCompletedFuture {
                    try stream.pipeline.syncOperations.addHandler(PunchStreamHandler(inbox: inbox))
                }
            }
        } catch {
            return "control stream: \(error)"
        }
        defer { stream.close(promise: nil) }
        let id = UInt64.random(in: 1...UInt64.max)
        let mine = PunchCandidates(id: id, mapping: report.mapping, candidates: report.punchCandidates)
        let sent = ContinuousClock.now
        let offered = NIODeadline.now()
        guard self.send(.punchOffer(mine), on: stream) else { return "control stream closed" }
        guard case .punchAnswer(let theirs)? = await inbox.next(within: self.configuration.messageTimeout),
            theirs.id == id
        else { return "no answer to the punch offer" }
        let rtt = ContinuousClock.now - sent
        self.withPeer(peer) { p in
            p.stats.localMapping = report.mapping.description
            p.stats.peerMapping = theirs.mapping.description
        }
        let peerReflexive = theirs.candidates.first { $0.kind == .reflexive }
        let plan = PunchPlan.plan(
            mine: report.mapping,
            peer: theirs.mapping,
            mineReachable: report.reflexive != nil,
            peerReachable: peerReflexive != nil
        )
        guard let mode = plan.start, peerReflexive != nil else {
            let why: String
            if case .impossible(let r) = plan { why = r } else { why = "peer has no reflexive address" }
            _ = self.send(.punchResult(id: id, ok: false, message: why), on: stream)
            return why
        }
        let rttMicros = UInt32(
            clamping: rtt.components.seconds * 1_000_000 + rtt.components.attoseconds / 1_000_000_000_000
        )
        let delay = max(self.configuration.minimumStartDelay, .microseconds(Int64(rttMicros) * 2))
        let stagger = mode == .simultaneousOpen ? self.configuration.stagger : .zero
        let answererFirst = round % 2 == 0
        let start = PunchStart(
            id: id,
            mode: mode,
            delayMillis: UInt16(clamping: delay.nanoseconds / 1_000_000),
            rttMicros: rttMicros,
            staggerMillis: UInt16(clamping: stagger.nanoseconds / 1_000_000),
            answererFirst: answererFirst
        )
        let startAt = NIODeadline.now() + delay + (answererFirst ? stagger : .zero)
        guard self.send(.punchStart(start), on: stream) else { return "control stream closed" }
        let targets = Self.targets(theirs.candidates, mine: report)
        switch mode {
        case .simultaneousOpen, .offererDials:
            let attempts = self.roundAttempts(dials: mode == .offererDials)
            let outcome = await SimultaneousOpen.connect(
                group: self.links.group,
                localPort: mode == .offererDials ? 0 : port,
                targets: targets,
                start: startAt,
                goesFirst: stagger > .zero && !answererFirst,
                configuration: attempts
            )
            self.learn(outcome)
            guard let channel = outcome.channel else {
                _ = await inbox.next(within: .milliseconds(500))  // the answerer's own result, if any
                return Self.reason(outcome, peerMapping: theirs.mapping)
            }
            let path: LinkPath = mode == .simultaneousOpen ? .punched : .direct
            do {
                let up = self.links.establish(over: channel, role: .dialer(expect: peer), path: path)
                channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                _ = try await up.get()
            } catch {
                return "the punched connection's link failed: \(error)"
            }
            self.withPeer(peer) { $0.stats.punchMillis = Int((NIODeadline.now() - offered).nanoseconds / 1_000_000) }
            _ = self.send(.punchResult(id: id, ok: true, message: "\(path)"), on: stream)
            return nil
        case .answererDials:
            guard case .punchResult(_, let ok, let text)? = await inbox.next(within: self.configuration.messageTimeout)
            else { return "no result from the peer's dial" }
            return ok ? nil : "the peer's dial failed: \(text)"
        }
    }

    /// The mapping a round punches from. Behind a NAT: a fresh local port and its mapping (one TCP
    /// binding), so that nothing a failed round left in either NAT's conntrack table (a reset SYN's
    /// entry, a SYN_SENT entry kept 120 s) moves this round's mapping. Without a NAT: the link port,
    /// where the listener takes the other side's dial.
    private func roundMapping(_ report: NATReport) async -> (NATReport, Int) {
        guard report.mapping == .portPreserving || report.mapping == .endpointIndependent,
            let fresh = await self.discovery.freshMapping()
        else { return (report, self.configuration.linkPort) }
        var round = report
        round.reflexive = fresh.mapped
        round.local = report.local.map { STUNAddress(ip: $0.ip, port: UInt16(fresh.port)) }
        return (round, fresh.port)
    }

    /// Where to aim: the peer's reflexive address; its host addresses too when both sit behind one NAT.
    static func targets(_ theirs: [PunchCandidate], mine: NATReport) -> [SocketAddress] {
        let reflexive = theirs.filter { $0.kind == .reflexive }
        var list = reflexive
        if let r = reflexive.first, let own = mine.reflexive, own.ip == r.ip {
            list += theirs.filter { $0.kind == .host }
        }
        var seen = Set<PunchCandidate>()
        return list.filter { seen.insert(PunchCandidate(kind: .host, ip: $0.ip, port: $0.port)).inserted }
            .compactMap { try? SocketAddress(ipAddress: "\($0.ip)", port: Int($0.port)) }
    }

    static func reason(_ outcome: SimultaneousOpen.Outcome, peerMapping: NATMapping) -> String {
        if outcome.lowTTLUnreachable {
            return "punch failed (an ICMP time exceeded aborted the low-TTL SYN; the next rounds go without it)"
        }
        if outcome.refused > 0 && outcome.timedOut == 0 { return "punch refused (the NATs answered with RST)" }
        if outcome.refused > 0 {
            return "punch failed (\(outcome.refused) attempts reset, \(outcome.timedOut) unanswered)"
        }
        return "punch failed (no answer: a firewall or a filtering NAT)"
    }

    private func send(_ message: RelaySessionMessage, on stream: any Channel) -> Bool {
        guard stream.isActive, let bytes = try? message.encode() else { return false }
        stream.writeAndFlush(ByteBuffer(bytes: bytes), promise: nil)
        return true
    }

    // MARK: the answerer

    /// A control stream the peer opened: answer its offer and do our part of the punch.
    private func answer(_ stream: any Channel, peer: String, rest: ByteBuffer) {
        let inbox = PunchInbox()
        stream.eventLoop.execute {
            do {
                try stream.pipeline.syncOperations.addHandler(PunchStreamHandler(inbox: inbox))
                if rest.readableBytes > 0 { stream.pipeline.fireChannelRead(rest) }
                _ = stream.setOption(ChannelOptions.autoRead, value: true)
            } catch {
                stream.close(promise: nil)
            }
        }
        Task {
            defer { stream.close(promise: nil) }
            await self.answerRound(stream, peer: peer, inbox: inbox)
        }
    }

    private func answerRound(_ stream: any Channel, peer: String, inbox: PunchInbox) async {
        guard case .punchOffer(let theirs)? = await inbox.next(within: self.configuration.messageTimeout) else {
            return
        }
        let (report, port) = await self.roundMapping(self.discovery.report ?? NATReport())
        let mine = PunchCandidates(id: theirs.id, mapping: report.mapping, candidates: report.punchCandidates)
        guard self.send(.punchAnswer(mine), on: stream) else { return }
        self.withPeer(peer) { p in
            p.stats.localMapping = report.mapping.description
            p.stats.peerMapping = theirs.mapping.description
            p.stats.attempts += 1
        }
        let received = NIODeadline.now()
        switch await inbox.next(within: self.configuration.messageTimeout) {
        case .punchResult(_, false, let why)?:
            self.withPeer(peer) { $0.stats.reason = why }
            return
        case .punchStart(let start)? where start.id == theirs.id:
            let oneWay = TimeAmount.microseconds(Int64(start.rttMicros) / 2)
            let mineFirst = start.answererFirst || start.staggerMillis == 0
            let at =
                received + .milliseconds(Int64(start.delayMillis)) - oneWay
                + (mineFirst ? .zero : .milliseconds(Int64(start.staggerMillis)))
            let targets = Self.targets(theirs.candidates, mine: report)
            switch start.mode {
            case .offererDials:
                _ = await inbox.next(within: self.configuration.messageTimeout)  // our listener takes it
            case .simultaneousOpen, .answererDials:
                let attempts = self.roundAttempts(dials: start.mode == .answererDials)
                let outcome = await SimultaneousOpen.connect(
                    group: self.links.group,
                    localPort: start.mode == .answererDials ? 0 : port,
                    targets: targets,
                    start: at,
                    goesFirst: start.staggerMillis > 0 && start.answererFirst,
                    configuration: attempts
                )
                self.learn(outcome)
                guard let channel = outcome.channel else {
                    let why = Self.reason(outcome, peerMapping: theirs.mapping)
                    self.withPeer(peer) { $0.stats.reason = why }
                    _ = self.send(.punchResult(id: start.id, ok: false, message: why), on: stream)
                    return
                }
                do {
                    if start.mode == .answererDials {
                        let up = self.links.establish(over: channel, role: .dialer(expect: peer), path: .direct)
                        channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                        _ = try await up.get()
                    } else {
                        // The offerer is the TLS client; the certificate must be the peer's.
                        let up = self.links.establish(over: channel, role: .acceptor, path: .punched)
                        channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in }
                        let link = try await up.get()
                        guard link.peer == peer else {
                            link.close()
                            throw LinkError.handshakeFailed("the punched connection reached \(link.peer), not \(peer)")
                        }
                    }
                    _ = self.send(.punchResult(id: start.id, ok: true, message: "up"), on: stream)
                    _ = await inbox.next(within: .seconds(1))
                } catch {
                    _ = self.send(.punchResult(id: start.id, ok: false, message: "\(error)"), on: stream)
                }
            }
        default:
            return
        }
    }
}

/// The punch messages read off a control stream, in order.
final class PunchInbox: Sendable {
    private let state = Mutex<
        (queue: [RelaySessionMessage], waiter: CheckedContinuation<RelaySessionMessage?, Never>?, closed: Bool)
    >(
        ([], nil, false)
    )

    func put(_ message: RelaySessionMessage) {
        let waiter = self.state.withLock { s -> CheckedContinuation<RelaySessionMessage?, Never>? in
            if let w = s.waiter {
                s.waiter = nil
                return w
            }
            s.queue.append(message)
            return nil
        }
        waiter?.resume(returning: message)
    }

    func close() {
        let waiter = self.state.withLock { s -> CheckedContinuation<RelaySessionMessage?, Never>? in
            s.closed = true
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume(returning: nil)
    }

    /// The next message, or nil when the stream closed or nothing came within `timeout`.
    func next(within timeout: TimeAmount) async -> RelaySessionMessage? {
        let timer = Task {
            try await Task.sleep(for: .nanoseconds(timeout.nanoseconds))
            self.expire()
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { continuation in
            let now = self.state.withLock { s -> RelaySessionMessage?? in
                if !s.queue.isEmpty { return .some(s.queue.removeFirst()) }
                if s.closed { return .some(nil) }
                s.waiter = continuation
                return .none
            }
            if let now { continuation.resume(returning: now) }
        }
    }

    private func expire() {
        let waiter = self.state.withLock { s -> CheckedContinuation<RelaySessionMessage?, Never>? in
            defer { s.waiter = nil }
            return s.waiter
        }
        waiter?.resume(returning: nil)
    }
}

/// Frames relay-session messages on a control stream into a ``PunchInbox``; a malformed one ends it.
final class PunchStreamHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let inbox: PunchInbox
    private var buffer: [UInt8] = []

    init(inbox: PunchInbox) {
        self.inbox = inbox
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = self.unwrapInboundIn(data)
        self.buffer += bytes.readableBytesView
        while !self.buffer.isEmpty {
            do {
                guard let (message, length) = try RelaySessionMessage.decode(self.buffer) else { return }
                self.buffer.removeFirst(length)
                self.inbox.put(message)
            } catch {
                self.inbox.close()
                context.close(promise: nil)
                return
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.inbox.close()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed {
            self.inbox.close()
        }
        context.fireUserInboundEventTriggered(event)
    }
}
