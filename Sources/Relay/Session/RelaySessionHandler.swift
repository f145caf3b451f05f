import Logging
import MeshCore
import MeshIdentity
import MeshNIO
import Metrics
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import ServiceLifecycle
import Synchronization
import X509

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

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
        /// `ready` sent, and our close_notify behind it: waiting for the node's, which ends this
        /// connection's TLS.
        case unwrapping(SpliceEvent)
        /// The session's TLS is gone: waiting for the other half to be unwrapped too.
        case unwrapped(SpliceEvent)
        /// A local circuit's half whose socket went to the epoll splice (`CircuitSplicer`): NIO let go of it.
        case released
        case closing
    }

    /// Raw bytes (the link's) an unwrapped half may send while its partner is still unwrapping.
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
        switch self.role {
        case .handshaking:
            return
        case .unwrapping, .unwrapped:
            // The link's first bytes, in the clear (they are its TLS), behind the node's close_notify
            // or while the partner unwraps. (Bytes inside the session's TLS after `ready` fail its
            // shutdown: errorCaught.)
            if self.buffer.count > Self.maxBuffered {
                RelaySessionMetrics.count("relay_messages_malformed_total")
                context.close(promise: nil)
            }
            return
        default:
            break
        }
        self.drain(context)
        self.refuseEarlyBytes(context)
    }

    /// A circuit half sends nothing after its `connect`/`accept` until the session's TLS has ended
    /// (after `ready`): the link's TLS goes in the clear then, never inside the session's.
    func refuseEarlyBytes(_ context: ChannelHandlerContext) {
        guard !self.buffer.isEmpty else { return }
        let circuit: String
        switch self.role {
        case .waiting(let id, _, _): circuit = "circuit \(id)"
        case .unwrapping(let event): circuit = "circuit \(event.circuit)"
        case .forwarding(let from, let to): circuit = "the circuit from \(from) to \(to)"
        default: return
        }
        RelaySessionMetrics.count("relay_messages_malformed_total")
        self.refuse(
            context,
            .badMessage,
            "\(self.buffer.count) bytes on \(circuit) inside the relay session's TLS: after connect or accept a half "
                + "sends nothing until ready and its close_notify, then only the link's TLS in the clear"
        )
    }

    /// Decodes what is buffered, one message at a time, while this connection is not waiting.
    func drain(_ context: ChannelHandlerContext) {
        while !self.buffer.isEmpty {
            switch self.role {
            case .waiting, .forwarding, .unwrapping, .unwrapped, .released, .closing, .handshaking: return
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
            let join = CircuitJoin()
            pending.requester.pipeline.fireUserInboundEventTriggered(
                SpliceEvent(
                    partner: me,
                    circuit: circuit,
                    from: pending.from,
                    to: pending.to,
                    owner: false,
                    join: join
                )
            )
            self.splice(
                context,
                SpliceEvent(
                    partner: pending.requester,
                    circuit: circuit,
                    from: pending.from,
                    to: pending.to,
                    owner: true,
                    join: join
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
                // The other relay's half left its TLS before its `ready` resolved: it leaves NIO now, with
                // the link bytes it held; this node's half follows once it has left this relay's TLS.
                let join = CircuitJoin()
                let splicer = server.splicer
                other.eventLoop.execute {
                    let held = try? other.pipeline.syncOperations.handler(type: RelayCircuitHandler.self).takeHeld()
                    guard let held, let fd = SocketDescriptor.duplicate(of: other) else {
                        other.close(promise: nil)
                        return
                    }
                    join.markReleased(other)
                    other.close(promise: nil)
                    join.arrive(CircuitHalf(fd: fd, held: held), ended: nil, splicer: splicer)
                }
                handler.spliceNow(
                    context,
                    SpliceEvent(partner: other, circuit: circuit, from: from, to: to, owner: true, join: join)
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

    /// Sends `ready`, then ends the session's TLS (`stopTLS`: our close_notify right behind `ready`,
    /// then the node's). The splice starts once both halves are plain TCP (`CircuitJoin`). The relay
    /// starts the close_notify so that the node never waits for it: the node reads it with `ready`
    /// (its clients give up an unwrap after 200 ms, `MeshTLS.clientShutdownTimeout`); the relay waits
    /// for the node's within the server's shutdown timeout (5 s), else the circuit closes.
    func spliceNow(_ context: ChannelHandlerContext, _ event: SpliceEvent) {
        self.timer?.cancel()
        self.role = .unwrapping(event)
        let me = context.channel
        let join = event.join
        let partner = ObjectIdentifier(event.partner)
        // The partner's end ends this half too, unless it only left NIO for the splice.
        event.partner.closeFuture.whenComplete { _ in
            if !join.isReleased(partner) { me.close(promise: nil) }
        }
        if !self.buffer.isEmpty {
            self.refuseEarlyBytes(context)
            return
        }
        self.send(context, .ready(circuit: event.circuit))
        guard let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLHandler.self) else {
            context.close(promise: nil)
            return
        }
        let loop = context.eventLoop
        let bound = NIOLoopBound(context, eventLoop: loop)
        let done = loop.makePromise(of: Void.self)
        // Not inside NIOSSL's read, which may have delivered the message that led here.
        let boundTLS = NIOLoopBound(tls, eventLoop: loop)
        loop.execute { boundTLS.value.stopTLS(promise: done) }
        let logger = self.server.logger
        done.futureResult.whenComplete { result in
            let context = bound.value
            if case .failure(let error) = result {
                RelaySessionMetrics.count("relay_circuits_refused_total", [("reason", "unwrap")])
                logger.info(
                    "circuit \(event.circuit) (\(event.from) to \(event.to)) closed: its half did not end the relay session's TLS after ready: \(error)"
                )
            }
            guard case .success = result,
                let h = try? context.pipeline.syncOperations.handler(type: RelaySessionHandler.self),
                case .unwrapping = h.role
            else {
                context.close(promise: nil)
                return
            }
            h.role = .unwrapped(event)
            // Next turn of the loop: the bytes NIOSSL hands on as it leaves have arrived by then.
            loop.execute {
                let context = bound.value
                guard let h = try? context.pipeline.syncOperations.handler(type: RelaySessionHandler.self),
                    case .unwrapped = h.role
                else { return }
                h.release(context, event)
            }
        }
    }

    /// A circuit's half, out of the session's TLS: its socket leaves NIO for the epoll splice, with what
    /// it sent meanwhile (a duplicate descriptor goes to the splice, then NIO closes its own, which does not end
    /// the connection). The second half to get here starts the splice.
    func release(_ context: ChannelHandlerContext, _ event: SpliceEvent) {
        let channel = context.channel
        guard let fd = SocketDescriptor.duplicate(of: channel) else {
            self.server.logger.warning(
                "circuit \(event.circuit) (\(event.from) to \(event.to)) closed: its socket could not be taken from NIO"
            )
            context.close(promise: nil)
            return
        }
        let half = CircuitHalf(fd: fd, held: self.buffer)
        self.buffer = []
        self.role = .released
        event.join.markReleased(channel)
        context.close(promise: nil)
        let hub = self.server.hub
        let (from, to) = (event.from, event.to)
        let ended: (@Sendable () -> Void)? = event.owner ? { @Sendable in hub.ended(from: from, to: to) } : nil
        event.join.arrive(half, ended: ended, splicer: self.server.splicer)
    }

    /// This half ends before its circuit was spliced: the circuit's count goes (by its owner), and a half already
    /// released to the join is closed.
    func leaveCircuit(_ event: SpliceEvent) {
        if event.owner { self.server.hub.ended(from: event.from, to: event.to) }
        event.join.abandon()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.timer?.cancel()
        switch self.role {
        case .control(let name): self.server.hub.unregister(name, context.channel)
        case .waiting(let circuit, _, _): _ = self.server.hub.cancel(circuit)
        case .forwarding(let from, let to): self.server.hub.ended(from: from, to: to)
        case .unwrapping(let event), .unwrapped(let event): self.leaveCircuit(event)
        default: break
        }
        self.role = .closing
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if case .handshaking = self.role {
            RelaySessionMetrics.count("relay_connections_refused_total", [("reason", "tls")])
        }
        if case .unwrapping(let event) = self.role {
            // E.g. bytes inside the session's TLS after `ready` (APPLICATION_DATA_ON_SHUTDOWN).
            RelaySessionMetrics.count("relay_messages_malformed_total")
            self.server.logger.info(
                "circuit \(event.circuit) (\(event.from) to \(event.to)) closed: a half sent something other than its close_notify after ready: \(error)"
            )
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
        if case .unwrapping(let event) = self.role { self.leaveCircuit(event) }
        if case .unwrapped(let event) = self.role { self.leaveCircuit(event) }
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
    /// Shared by both halves: the splice starts when both have left the session's TLS.
    let join: CircuitJoin
}

/// Starts a circuit's splice once both halves are plain TCP: each half arrives with its socket, out of NIO,
/// and the second arrival hands both to the epoll splice (`CircuitSplicer`).
final class CircuitJoin: Sendable {
    private let state = Mutex<State>(State())

    private struct State {
        var halves: [(half: CircuitHalf, ended: (@Sendable () -> Void)?)] = []
        var released: Set<ObjectIdentifier> = []
        var abandoned = false
    }

    /// `channel` leaves NIO for the splice: its close is not the circuit's end.
    func markReleased(_ channel: any Channel) {
        _ = self.state.withLock { $0.released.insert(ObjectIdentifier(channel)) }
    }

    func isReleased(_ channel: ObjectIdentifier) -> Bool {
        self.state.withLock { $0.released.contains(channel) }
    }

    /// A half out of NIO; `ended` (the owner half's) runs when the circuit ends. The second arrival splices
    /// both; one after `abandon` is closed at once.
    func arrive(_ half: CircuitHalf, ended: (@Sendable () -> Void)?, splicer: CircuitSplicer) {
        let pair = self.state.withLock { state -> (CircuitHalf, CircuitHalf, (@Sendable () -> Void)?)?? in
            guard !state.abandoned else { return .some(nil) }
            state.halves.append((half, ended))
            guard state.halves.count == 2 else { return nil }
            return (state.halves[0].half, state.halves[1].half, state.halves[0].ended ?? state.halves[1].ended)
        }
        switch pair {
        case .none:
            return
        case .some(.none):
            close(half.fd)
            ended?()
        case .some(.some(let (a, b, ended))):
            splicer.splice(a, b) { ended?() }
        }
    }

    /// A half ended before the splice: a half already waiting here is closed (and its end told).
    func abandon() {
        let waiting = self.state.withLock { state -> [(half: CircuitHalf, ended: (@Sendable () -> Void)?)] in
            guard !state.abandoned, state.halves.count < 2 else { return [] }
            state.abandoned = true
            defer { state.halves = [] }
            return state.halves
        }
        for (half, ended) in waiting {
            close(half.fd)
            ended?()
        }
    }
}
