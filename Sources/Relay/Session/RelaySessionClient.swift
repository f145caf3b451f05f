import Logging
import MeshCore
import MeshIdentity
import MeshNIO
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// An agent's client of the relays (issue 13, items 1-2): keeps one control session with its home
/// relay, re-homes when it dies, accepts circuits other nodes ask for (handing them to the
/// ``LinkManager`` as acceptor links) and dials circuits to nodes for the link manager.
///
/// Home relay: every `Ready` relay (at most `maxRelaysRaced`) is dialed at once; the first whose
/// session is up (TCP connect + TLS 1.3 + hello/welcome) wins: that is the lowest RTT, measured on
/// the connection that becomes the session. The others are closed. When the session dies, the next
/// round starts at once without the dead relay; when a round finds none, rounds repeat with backoff
/// and jitter.
public final class RelaySessionClient: ServiceLifecycle.Service, Sendable {
    public let node: String
    public let configuration: RelaySessionClientConfiguration
    /// The credentials given at init, else the link manager's current ones (renewed certificates included).
    let fixedTLS: MeshLinkTLS?
    var tls: MeshLinkTLS { self.fixedTLS ?? self.links.tls }
    let links: LinkManager
    let relays: @Sendable () async -> [Relay]
    let group: any EventLoopGroup
    let logger: Logger
    private let state = Mutex(State())

    struct Home: Sendable {
        let relay: String
        let address: SocketAddress
        let channel: any Channel
    }

    private struct State {
        var home: Home?
        var homeChanged: [@Sendable (String?) -> Void] = []
        var status = RelayClientStatus()
        var waiters: [Int: CheckedContinuation<Home?, Never>] = [:]
        var nextWaiter = 0
    }

    /// - Parameters:
    ///   - node: this node's name (its certificate's `mesh://node/NAME`).
    ///   - tls: this node's credentials (`MeshLinkTLS`, mesh CA); nil: the link manager's.
    ///   - links: accepted circuits become links here (`establish(over:role:.acceptor,path:.relayed)`).
    ///   - relays: the relays this node sees (from the control plane); read again at each re-home.
    public init(
        node: String,
        tls: MeshLinkTLS? = nil,
        links: LinkManager,
        relays: @escaping @Sendable () async -> [Relay],
        configuration: RelaySessionClientConfiguration = RelaySessionClientConfiguration(),
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "mesh.relay-client")
    ) {
        self.node = node
        self.fixedTLS = tls
        self.links = links
        self.relays = relays
        self.configuration = configuration
        self.group = group
        self.logger = logger
    }

    /// The current home relay's name.
    public var home: String? { self.state.withLock { $0.home?.relay } }

    /// The client's state now.
    public var status: RelayClientStatus { self.state.withLock { $0.status } }

    /// Called with the new home (nil: the session ended) each time it changes, e.g. to beat at once so
    /// the Node's `status.relay` (which relays forward by) follows a re-home without waiting.
    public func onHomeChange(_ changed: @escaping @Sendable (String?) -> Void) {
        self.state.withLock { $0.homeChanged.append(changed) }
    }

    // MARK: the session loop

    /// Keeps a home session until graceful shutdown or cancellation.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            await self.loop()
        }
    }

    private func loop() async {
        var backoff = self.configuration.minBackoff
        var avoid: String?
        await withDiscardingTaskGroup { tasks in
            while !Task.isCancelled {
                let all = await self.relays()
                    .filter { $0.status?.phase == .ready }
                    .sorted { $0.metadata.name < $1.metadata.name }
                var candidates = all.filter { $0.metadata.name != avoid }
                if candidates.isEmpty { candidates = all }
                candidates = Array(candidates.prefix(self.configuration.maxRelaysRaced))
                guard let session = await self.race(candidates) else {
                    if avoid != nil {
                        avoid = nil
                        if all.count > candidates.count { continue }  // the dead relay may be back
                    }
                    if candidates.isEmpty {
                        self.state.withLock { $0.status.lastError = "no Ready relay is known" }
                    }
                    let wait = backoff * Double.random(in: 0.5...1.0)
                    backoff = min(backoff * 2, self.configuration.maxBackoff)
                    try? await Task.sleep(for: wait)
                    continue
                }
                backoff = self.configuration.minBackoff
                self.adoptHome(session)
                for await event in session.events {
                    switch event {
                    case .open(let circuit, let from):
                        tasks.addTask { await self.accept(circuit, from: from, at: session.home) }
                    case .closed(let why):
                        self.logger.warning(
                            "relay session ended",
                            metadata: ["relay": "\(session.home.relay)", "reason": "\(why)"]
                        )
                        self.state.withLock { $0.status.lastError = "\(session.home.relay): \(why)" }
                    }
                }
                session.home.channel.close(promise: nil)
                let listeners = self.state.withLock { s -> [@Sendable (String?) -> Void] in
                    guard s.home?.channel === session.home.channel else { return [] }
                    s.home = nil
                    s.status.home = nil
                    s.status.address = nil
                    s.status.since = nil
                    s.status.rttMicros = nil
                    return s.homeChanged
                }
                for changed in listeners { changed(nil) }
                avoid = session.home.relay
            }
        }
        let home = self.state.withLock { s in
            defer { s.home = nil }
            return s.home
        }
        try? await home?.channel.close()
    }

    private func adoptHome(_ session: ControlSession) {
        let (waiters, listeners) = self.state.withLock { s in
            s.home = session.home
            s.status.home = session.home.relay
            s.status.address = hostPort(session.home.address)
            s.status.since = Date()
            s.status.rttMicros =
                Int64(session.rtt.components.seconds * 1_000_000)
                + session.rtt.components.attoseconds / 1_000_000_000_000
            s.status.sessions += 1
            defer { s.waiters = [:] }
            return (Array(s.waiters.values), s.homeChanged)
        }
        for w in waiters { w.resume(returning: session.home) }
        for changed in listeners { changed(session.home.relay) }
        self.logger.info(
            "home relay",
            metadata: [
                "relay": "\(session.home.relay)", "address": "\(session.home.address)", "rtt": "\(session.rtt)",
            ]
        )
    }

    /// A control session, welcomed.
    struct ControlSession: Sendable {
        let home: Home
        let events: AsyncStream<RelayControlEvent>
        let rtt: Duration
    }

    /// Dials every candidate at once; the first session welcomed wins, the others are closed.
    private func race(_ candidates: [Relay]) async -> ControlSession? {
        guard !candidates.isEmpty else { return nil }
        let race = Race<ControlSession>(count: candidates.count) { $0.home.channel.close(promise: nil) }
        let errors = NIOLockedValueBox<[String]>([])
        let session = await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                race.start(continuation)
                for relay in candidates {
                    Task {
                        do {
                            race.offer(try await self.openSession(relay))
                        } catch {
                            errors.withLockedValue { $0.append("\(error)") }
                            race.offer(ControlSession?.none)
                        }
                    }
                }
            }
        } onCancel: {
            race.cancel()
        }
        if session == nil {
            let why = errors.withLockedValue { $0.joined(separator: "; ") }
            if !why.isEmpty {
                self.state.withLock { $0.status.lastError = why }
                self.logger.warning("no relay session could be opened", metadata: ["errors": "\(why)"])
            }
        }
        return session
    }

    /// Connect + TLS + hello/welcome with one relay (its addresses in turn).
    private func openSession(_ relay: Relay) async throws -> ControlSession {
        let name = relay.metadata.name
        let addresses = Self.addresses(of: relay)
        guard !addresses.isEmpty else {
            throw RelayClientError(relay: name, .unreachable("it advertises no usable address"))
        }
        var failures: [String] = []
        for address in addresses {
            let start = ContinuousClock.now
            let (stream, continuation) = AsyncStream.makeStream(of: RelayControlEvent.self)
            let welcome = self.group.next().makePromise(of: (relay: String, keepaliveSeconds: UInt16).self)
            let config = self.configuration
            do {
                let channel = try await self.connect(name, address) { channel, refusal in
                    try channel.pipeline.syncOperations.addHandler(
                        RelayControlHandler(
                            welcome: welcome,
                            events: continuation,
                            maxPingInterval: config.maxPingInterval,
                            pongTimeout: config.pongTimeout,
                            tlsRefusal: refusal
                        )
                    )
                }
                // The timer fails the welcome only if it has not come: a welcome that came first stands (failing
                // a completed promise does nothing), and only a failed welcome closes the channel. (The timer
                // used to close the channel itself, and when this task was slow to resume after a welcome, a
                // welcomed session was closed under it and still adopted as home.)
                welcome.futureResult.whenFailure { _ in channel.close(promise: nil) }
                let timeout = channel.eventLoop.scheduleTask(in: config.welcomeTimeout) {
                    welcome.fail(RelayClientError(relay: name, .timedOut("the welcome")))
                }
                channel.writeAndFlush(
                    ByteBuffer(
                        bytes: try RelaySessionMessage.hello(version: RelaySessionMessage.version, node: self.node)
                            .encode()
                    ),
                    promise: nil
                )
                do {
                    let (welcomed, _) = try await withTaskCancellationHandler {
                        try await welcome.futureResult.get()
                    } onCancel: {
                        channel.close(promise: nil)
                    }
                    timeout.cancel()
                    guard welcomed == name else {
                        channel.close(promise: nil)
                        throw RelayClientError(relay: name, .protocolError("it welcomed as \(welcomed)"))
                    }
                    // Closed since its welcome (by the relay, or the network): not a home to adopt.
                    guard channel.isActive else {
                        throw RelayClientError(relay: name, .unreachable("the session closed right after its welcome"))
                    }
                } catch {
                    timeout.cancel()
                    channel.close(promise: nil)
                    throw error
                }
                let rtt = ContinuousClock.now - start
                return ControlSession(
                    home: Home(relay: name, address: address, channel: channel),
                    events: stream,
                    rtt: rtt
                )
            } catch let error as RelayClientError {
                welcome.fail(error)
                continuation.finish()
                if case .refused = error.kind { throw error.at(name) }
                failures.append("\(address): \(error.detail)")
            } catch {
                welcome.fail(error)
                continuation.finish()
                failures.append("\(address): \(error)")
            }
        }
        throw RelayClientError(relay: name, .unreachable(failures.joined(separator: "; ")))
    }

    /// The relay's session addresses (`IP:port`, `[IPv6]:port`), in its order.
    static func addresses(of relay: Relay) -> [SocketAddress] {
        relay.spec.addresses.compactMap { text in
            guard let split = text.lastIndex(of: ":"), let port = Int(text[text.index(after: split)...]) else {
                return nil
            }
            var host = String(text[..<split])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            return try? SocketAddress(ipAddress: host, port: port)
        }
    }

    /// A TCP connection to `address` with the outer TLS (this node's certificate; the server must be
    /// exactly `mesh://relay/<relay>` of the mesh CA), and `handlers` behind it.
    private func connect(
        _ relay: String,
        _ address: SocketAddress,
        handlers: @escaping @Sendable (any Channel, @escaping @Sendable () -> String?) throws -> Void
    ) async throws -> any Channel {
        let verifier = self.tls.dialerVerifier(expect: .relay(relay))
        let context = self.tls.clientContext
        let refusal: @Sendable () -> String? = { verifier.lastRefusal?.message }
        do {
            return try await ClientBootstrap(group: self.group)
                .connectTimeout(self.configuration.connectTimeout)
                .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            NIOSSLClientHandler(
                                context: context,
                                serverHostname: nil,
                                customVerificationCallback: verifier.callback
                            )
                        )
                        try handlers(channel, refusal)
                    }
                }
                .connect(to: address).get()
        } catch {
            throw RelayClientError(relay: relay, .unreachable("\(address): \(error)"))
        }
    }

    // MARK: circuits

    /// A circuit to `node` through the home relay: `connect(node)`, then `ready`. The channel is
    /// ready for `Link.establish(role: .dialer(expect: node), path: .relayed(relay))` (or
    /// `LinkManager.establish`); it has read nothing of the link's yet. A refusal throws
    /// ``RelayClientError`` with the relay's code and text.
    public func circuit(to node: String) async throws -> (channel: any Channel, relay: String) {
        guard let home = await self.waitForHome() else { throw RelayClientError(relay: nil, .noHome) }
        do {
            let channel = try await self.halfCircuit(.connect(node: node), at: home, onReady: nil)
            self.state.withLock { $0.status.circuitsDialed += 1 }
            return (channel, home.relay)
        } catch {
            self.state.withLock { $0.status.circuitsFailed += 1 }
            self.logger.warning(
                "no circuit",
                metadata: ["node": "\(node)", "relay": "\(home.relay)", "error": "\(error)"]
            )
            throw error
        }
    }

    /// A circuit the relay asked this node to accept: a new connection, `accept`, then at `ready` the
    /// link's acceptor handlers go in (before anything else is read).
    private func accept(_ circuit: UInt64, from: String, at home: Home) async {
        let links = self.links
        let relay = home.relay
        do {
            _ = try await self.halfCircuit(.accept(circuit: circuit), at: home) { channel in
                _ = links.establish(over: channel, role: .acceptor, path: .relayed(relay))
            }
            self.state.withLock { $0.status.circuitsAccepted += 1 }
        } catch {
            self.state.withLock { $0.status.circuitsFailed += 1 }
            self.logger.warning(
                "could not accept a circuit",
                metadata: ["from": "\(from)", "relay": "\(relay)", "circuit": "\(circuit)", "error": "\(error)"]
            )
        }
    }

    private func halfCircuit(
        _ first: RelaySessionMessage,
        at home: Home,
        onReady: (@Sendable (any Channel) -> Void)?
    ) async throws -> any Channel {
        let ready = self.group.next().makePromise(of: UInt64.self)
        let channel: any Channel
        do {
            channel = try await self.connect(home.relay, home.address) { channel, refusal in
                try channel.pipeline.syncOperations.addHandler(
                    RelayCircuitHandler(ready: ready, onReady: onReady, tlsRefusal: refusal)
                )
            }
        } catch {
            ready.fail(error)
            throw error
        }
        let relay = home.relay
        let timeout = channel.eventLoop.scheduleTask(in: self.configuration.circuitTimeout) {
            ready.fail(RelayClientError(relay: relay, .timedOut("waiting for ready")))
            channel.close(promise: nil)
        }
        channel.writeAndFlush(ByteBuffer(bytes: try first.encode()), promise: nil)
        do {
            // Shutting down: closing the connection fails `ready` at once.
            _ = try await withTaskCancellationHandler {
                try await ready.futureResult.get()
            } onCancel: {
                channel.close(promise: nil)
            }
            timeout.cancel()
            return channel
        } catch let error as RelayClientError {
            timeout.cancel()
            channel.close(promise: nil)
            throw error.at(relay)
        } catch {
            timeout.cancel()
            channel.close(promise: nil)
            throw error
        }
    }

    /// The home now, or the next one within `homeWait`.
    private func waitForHome() async -> Home? {
        enum Step {
            case have(Home)
            case wait(Int)
        }
        let loop = self.group.next()
        let wait = self.configuration.homeWait
        let waiter = self.state.withLock { s in
            defer { s.nextWaiter += 1 }
            return s.nextWaiter
        }
        return await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let step = self.state.withLock { s -> Step in
                    if let h = s.home { return .have(h) }
                    s.waiters[waiter] = continuation
                    return .wait(waiter)
                }
                switch step {
                case .have(let h):
                    continuation.resume(returning: h)
                case .wait(let id):
                    loop.scheduleTask(in: wait) {
                        self.state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
                    }
                    // Cancelled before the waiter was registered: the handler found nothing to resume.
                    if Task.isCancelled {
                        self.state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
                    }
                }
            }
        } onCancel: {
            self.state.withLock { $0.waiters.removeValue(forKey: waiter) }?.resume(returning: nil)
        }
    }
}

/// First-wins among `count` attempts: the first value offered resumes the waiter; later values (and
/// every value after a cancel) are discarded with `discard`; all nil resumes with nil.
final class Race<Value: Sendable>: Sendable {
    private struct State {
        var continuation: CheckedContinuation<Value?, Never>?
        var remaining: Int
        var done = false
    }

    private let state: Mutex<State>
    private let discard: @Sendable (Value) -> Void

    init(count: Int, discard: @escaping @Sendable (Value) -> Void) {
        self.state = Mutex(State(remaining: count))
        self.discard = discard
    }

    /// A winner is known (or the race was cancelled).
    var isDone: Bool { self.state.withLock { $0.done } }

    func start(_ continuation: CheckedContinuation<Value?, Never>) {
        let resumeNow = self.state.withLock { s -> Bool in
            if s.done { return true }
            s.continuation = continuation
            return false
        }
        if resumeNow { continuation.resume(returning: nil) }
    }

    /// True when `value` won.
    @discardableResult
    func offer(_ value: Value?) -> Bool {
        let (winner, continuation) = self.state.withLock { s -> (Bool, CheckedContinuation<Value?, Never>?) in
            s.remaining -= 1
            if s.done { return (false, nil) }
            if value != nil || s.remaining == 0 {
                s.done = true
                defer { s.continuation = nil }
                return (value != nil, s.continuation)
            }
            return (false, nil)
        }
        if let continuation {
            continuation.resume(returning: winner ? value : nil)
        } else if let value {
            self.discard(value)
        }
        return winner
    }

    func cancel() {
        let continuation = self.state.withLock { s -> CheckedContinuation<Value?, Never>? in
            s.done = true
            defer { s.continuation = nil }
            return s.continuation
        }
        continuation?.resume(returning: nil)
    }
}
