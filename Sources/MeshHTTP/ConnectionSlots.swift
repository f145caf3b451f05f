import Logging
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A server's connection slots, so that sockets which never finish their TLS handshake cannot lock
/// out the clients that do.
///
/// Each admitted connection holds a slot in one of three stages: `handshaking` (no TLS handshake
/// yet; on plain HTTP: no byte yet), `anonymous` (handshake done without a client certificate) and
/// `authenticated`. At the limit, a new connection takes the slot of the oldest `handshaking` one,
/// else (TLS only) of the oldest `anonymous` one; only when every slot is authenticated is it
/// refused (503). The evicted connection is closed. Sendable: the state sits in a Mutex.
final class ConnectionSlots: Sendable {
    enum Stage: Sendable {
        case handshaking
        case anonymous
        case authenticated
    }

    enum Admission: Equatable, Sendable {
        case admitted
        /// At the limit with every slot authenticated, or shutting down.
        case refused
    }

    private struct Slot {
        var channel: any Channel
        var stage: Stage
    }

    /// Oldest first; entries whose connection left or moved on are skipped when popped.
    private struct Queue {
        var ids: [ObjectIdentifier] = []
        var head = 0

        mutating func append(_ id: ObjectIdentifier) { self.ids.append(id) }

        mutating func popFirst(where ok: (ObjectIdentifier) -> Bool) -> ObjectIdentifier? {
            while self.head < self.ids.count {
                let id = self.ids[self.head]
                self.head += 1
                if ok(id) {
                    self.compact()
                    return id
                }
            }
            self.compact()
            return nil
        }

        private mutating func compact() {
            if self.head > 1024 && self.head * 2 > self.ids.count {
                self.ids.removeFirst(self.head)
                self.head = 0
            }
        }
    }

    private struct State {
        var slots: [ObjectIdentifier: Slot] = [:]
        var refused: [ObjectIdentifier: any Channel] = [:]
        var handshaking = Queue()
        var anonymous = Queue()
        var draining = false
        var evicted = 0
        var lastWarning: ContinuousClock.Instant?
        var evictedSinceWarning = 0

        /// Takes the slot of the oldest connection in `stage`: removes it and returns its channel.
        mutating func evictOldest(_ stage: Stage) -> (any Channel)? {
            let id: ObjectIdentifier?
            switch stage {
            case .handshaking:
                // Moved out and back, so the lookup below does not overlap the queue's mutation.
                var queue = self.handshaking
                self.handshaking = Queue()
                id = queue.popFirst { self.slots[$0]?.stage == .handshaking }
                self.handshaking = queue
            case .anonymous:
                var queue = self.anonymous
                self.anonymous = Queue()
                id = queue.popFirst { self.slots[$0]?.stage == .anonymous }
                self.anonymous = queue
            case .authenticated:
                id = nil
            }
            guard let id, let slot = self.slots.removeValue(forKey: id) else { return nil }
            self.evicted += 1
            self.evictedSinceWarning += 1
            return slot.channel
        }
    }

    let limit: Int
    /// Whether anonymous (certificate-less TLS) connections may be evicted too: only on TLS servers.
    let evictAnonymous: Bool
    let logger: Logger
    private let state = Mutex(State())

    init(limit: Int, evictAnonymous: Bool, logger: Logger) {
        self.limit = max(1, limit)
        self.evictAnonymous = evictAnonymous
        self.logger = logger
    }

    var count: Int { self.state.withLock { $0.slots.count } }
    var isDraining: Bool { self.state.withLock { $0.draining } }
    /// Connections closed to make room since the start.
    var evictions: Int { self.state.withLock { $0.evicted } }

    func contains(_ channel: any Channel) -> Bool {
        self.state.withLock { $0.slots[ObjectIdentifier(channel)] != nil }
    }

    /// Admits `channel` into a slot (making room when needed); it leaves its slot when it closes.
    func admit(_ channel: any Channel) -> Admission {
        let id = ObjectIdentifier(channel)
        let (admission, victim, warn) = self.state.withLock {
            s -> (Admission, (any Channel)?, (evicted: Int, stage: String)?) in
            if s.draining { return (.refused, nil, nil) }
            var victim: (any Channel)?
            var stage = self.evictAnonymous ? "without a TLS handshake" : "that had sent nothing"
            if s.slots.count >= self.limit {
                victim = s.evictOldest(.handshaking)
                if victim == nil && self.evictAnonymous {
                    victim = s.evictOldest(.anonymous)
                    stage = "without a client certificate"
                }
                if victim == nil { return (.refused, nil, nil) }
            }
            s.slots[id] = Slot(channel: channel, stage: .handshaking)
            s.handshaking.append(id)
            var warn: (evicted: Int, stage: String)?
            if victim != nil {
                let now = ContinuousClock.now
                if s.lastWarning.map({ now - $0 >= .seconds(10) }) ?? true {
                    warn = (s.evictedSinceWarning, stage)
                    s.lastWarning = now
                    s.evictedSinceWarning = 0
                }
            }
            return (.admitted, victim, warn)
        }
        if admission == .admitted {
            channel.closeFuture.whenComplete { _ in self.remove(id) }
        } else {
            // Answered 503 at its first request; held here only so that a shutdown can close it.
            self.state.withLock { $0.refused[id] = channel }
            channel.closeFuture.whenComplete { _ in _ = self.state.withLock { $0.refused.removeValue(forKey: id) } }
        }
        if let victim {
            victim.close(promise: nil)
            if let warn {
                self.logger.warning(
                    "at the connection limit (\(self.limit)): closed \(warn.evicted) connection(s) \(warn.stage) to make room for new ones (logged at most every 10 s)"
                )
            }
        }
        return admission
    }

    /// The connection finished its handshake (or, on plain HTTP, sent its first bytes).
    func established(_ channel: any Channel, authenticated: Bool) {
        let id = ObjectIdentifier(channel)
        self.state.withLock { s in
            guard var slot = s.slots[id], slot.stage == .handshaking else { return }
            slot.stage = authenticated ? .authenticated : .anonymous
            s.slots[id] = slot
            if !authenticated { s.anonymous.append(id) }
        }
    }

    /// Closes up to `count` of the oldest connections still in their handshake (to free descriptors
    /// when accept fails for want of them); returns how many.
    func evictHandshaking(upTo count: Int) -> Int {
        let victims = self.state.withLock { s -> [any Channel] in
            var out: [any Channel] = []
            while out.count < count, let c = s.evictOldest(.handshaking) { out.append(c) }
            return out
        }
        for c in victims { c.close(promise: nil) }
        return victims.count
    }

    private func remove(_ id: ObjectIdentifier) {
        _ = self.state.withLock { $0.slots.removeValue(forKey: id) }
    }

    /// Refuses new connections from now on; returns the open ones (refused ones too).
    func drain() -> [any Channel] {
        self.state.withLock { s in
            s.draining = true
            return s.slots.values.map(\.channel) + s.refused.values
        }
    }
}

/// Per connection, first in its pipeline (after the TLS handler): closes a connection that has not
/// finished its TLS handshake within the deadline, and tells the slots when it has.
final class HandshakeWatch: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    private let slots: ConnectionSlots
    private let deadline: TimeAmount?
    private let tls: Bool
    private var timer: Scheduled<Void>?
    private var done = false

    /// `deadline`: nil for none (plain HTTP, where the first bytes count as the handshake).
    init(slots: ConnectionSlots, deadline: TimeAmount?, tls: Bool) {
        self.slots = slots
        self.deadline = deadline
        self.tls = tls
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { self.arm(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        self.arm(context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.timer?.cancel()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let first = !self.tls && !self.done
        if first { self.finish(context, authenticated: false) }
        context.fireChannelRead(data)
        if first { self.leave(context) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        let completed: Bool
        if case .handshakeCompleted = event as? TLSUserEvent, !self.done {
            let certificate = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
                .peerCertificate
            self.finish(context, authenticated: certificate != nil)
            completed = true
        } else {
            completed = false
        }
        context.fireUserInboundEventTriggered(event)
        if completed { self.leave(context) }
    }

    private func finish(_ context: ChannelHandlerContext, authenticated: Bool) {
        self.done = true
        self.timer?.cancel()
        self.timer = nil
        self.slots.established(context.channel, authenticated: authenticated)
    }

    /// Its work is done once the handshake is: it leaves the pipeline rather than sit in it (and in the
    /// memory of an idle connection) for the connection's life.
    private func leave(_ context: ChannelHandlerContext) {
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    private func arm(_ context: ChannelHandlerContext) {
        guard let deadline = self.deadline, self.timer == nil, !self.done else { return }
        self.timer = context.eventLoop.assumeIsolated().scheduleTask(in: deadline) { [self] in
            guard !self.done else { return }
            context.close(promise: nil)
        }
    }
}

/// On the listening socket: when accept fails for want of file descriptors (EMFILE, ENFILE) or
/// memory (ENOBUFS, ENOMEM), stops accepting for a while instead of retrying at once, closes the
/// oldest connections that are still in their handshake to free descriptors, and logs once per
/// episode (and once more when accepting works again). Other errors pass on unchanged.
final class AcceptBackoff: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = any Channel
    typealias InboundOut = any Channel
    typealias OutboundIn = any Channel

    /// How long accepting pauses after a failure.
    static let pause: TimeAmount = .milliseconds(250)
    /// Handshaking connections closed per failure (one read's worth of accepts).
    static let evictPerFailure = 16

    private let slots: ConnectionSlots
    private let logger: Logger
    private var pausedUntil: NIODeadline?
    private var scheduled: Scheduled<Void>?
    /// The current episode: when it started, its last failure, how many accepts failed in it and
    /// how many handshakes were closed. It ends at the first accept a second after its last failure.
    private var episode: (start: NIODeadline, last: NIODeadline, failures: Int, evicted: Int)?

    init(slots: ConnectionSlots, logger: Logger) {
        self.slots = slots
        self.logger = logger
    }

    func read(context: ChannelHandlerContext) {
        guard self.scheduled == nil else { return }
        if let until = self.pausedUntil, until > .now() {
            self.scheduled = context.eventLoop.assumeIsolated().scheduleTask(deadline: until) { [self] in
                self.scheduled = nil
                self.pausedUntil = nil
                context.read()
            }
            return
        }
        self.pausedUntil = nil
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if let e = self.episode, NIODeadline.now() - e.last >= .seconds(1) {
            let seconds = Double((e.last - e.start).nanoseconds) / 1e9
            self.logger.notice(
                "accepting connections again after \(e.failures) failed accept(s) over \(String(format1: seconds)) s (\(e.evicted) unfinished handshake(s) closed)"
            )
            self.episode = nil
        }
        context.fireChannelRead(data)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard let io = error as? IOError, [EMFILE, ENFILE, ENOBUFS, ENOMEM].contains(io.errnoCode) else {
            context.fireErrorCaught(error)
            return
        }
        let evicted = self.slots.evictHandshaking(upTo: Self.evictPerFailure)
        if var e = self.episode {
            e.failures += 1
            e.evicted += evicted
            e.last = .now()
            self.episode = e
        } else {
            self.episode = (.now(), .now(), 1, evicted)
            var limit = rlimit()
            getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit)
            let what: String
            switch io.errnoCode {
            case EMFILE: what = "the process is out of file descriptors (EMFILE, limit \(limit.rlim_cur))"
            case ENFILE: what = "the system is out of file descriptors (ENFILE)"
            default: what = "the system is out of memory for sockets (errno \(io.errnoCode))"
            }
            self.logger.warning(
                "cannot accept connections: \(what), \(self.slots.count) connections open; pausing accepts for \(Self.pause.nanoseconds / 1_000_000) ms at a time and closing unfinished handshakes (logged once until accepting works again)"
            )
        }
        self.pausedUntil = .now() + Self.pause
    }
}

extension String {
    /// `x` with one decimal.
    init(format1 x: Double) {
        let tenths = Int((x * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10)"
    }
}
