import Logging
import MeshWire
import Metrics
import NIOCore

/// Sets up a stream's pipeline (the session's own streams and the peer's alike). The stream becomes active
/// when the returned future succeeds; if it fails, the stream is reset.
public typealias MuxStreamInitializer = @Sendable (any Channel) -> EventLoopFuture<Void>

/// A yamux session over a channel, from any thread: open streams, ping, go away, read counters.
///
/// Install it with ``install(on:configuration:logger:inbound:)`` on a channel that carries the link's
/// bytes (a TCP connection; later the link's TLS). Every stream is a child `Channel` (see
/// `MuxStreamChannel`); the peer's streams are handed to `inbound`.
public struct MuxSession: Sendable {
    let handler: NIOLoopBound<MuxSessionHandler>
    /// The channel the session rides on.
    public let channel: any Channel

    /// Adds the session to `channel`'s pipeline (it decodes the frames itself). Call on the channel's event
    /// loop (in its initializer). Without `inbound`, every stream the peer opens is refused with RST.
    public static func install(
        on channel: any Channel,
        configuration: MuxConfiguration,
        logger: Logger = Logger(label: "mesh.mux"),
        inbound: MuxStreamInitializer?
    ) throws -> MuxSession {
        let handler = MuxSessionHandler(configuration: configuration, logger: logger, inbound: inbound)
        try channel.pipeline.syncOperations.addHandler(handler)
        return MuxSession(handler: NIOLoopBound(handler, eventLoop: channel.eventLoop), channel: channel)
    }

    /// Opens a stream (SYN); the future gives it once `initializer` has set it up. Data may be written at
    /// once: the peer need not have acknowledged it.
    public func openStream(_ initializer: @escaping MuxStreamInitializer) -> EventLoopFuture<any Channel> {
        self.onLoop { $0.openStream(initializer) }
    }

    /// Sends a ping; the future gives the round trip.
    public func ping() -> EventLoopFuture<TimeAmount> {
        self.onLoop { $0.ping() }
    }

    /// Sends Go Away: the peer may open no more streams, and neither may we; open streams go on.
    public func goAway(_ code: YamuxGoAwayCode = .normal) -> EventLoopFuture<Void> {
        self.onLoop {
            $0.goAway(code)
            return self.channel.eventLoop.makeSucceededVoidFuture()
        }
    }

    /// The session's counters.
    public func stats() -> EventLoopFuture<MuxStats> {
        self.onLoop { self.channel.eventLoop.makeSucceededFuture($0.stats) }
    }

    private func onLoop<T: Sendable>(
        _ body: @escaping @Sendable (MuxSessionHandler) -> EventLoopFuture<T>
    ) -> EventLoopFuture<T> {
        let loop = self.channel.eventLoop
        if loop.inEventLoop { return body(self.handler.value) }
        let handler = self.handler
        return loop.flatSubmit { body(handler.value) }
    }
}

/// The session's state machine on its channel's event loop: decodes the frames (`YamuxFrame.decode`, the
/// pure codec), routes them to streams, enforces the windows and limits, sends frames.
///
/// It decodes the channel's bytes itself rather than behind a `ByteToMessageHandler(YamuxFrameDecoder)`:
/// that handler passed every frame on as an `NIOAny` (a heap box for the enum and a dynamic cast out of it)
/// through one more pipeline step, per frame, on the link's hot path (perf/links/README.md).
public final class MuxSessionHandler: ChannelInboundHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    let configuration: MuxConfiguration
    let logger: Logger
    let inbound: MuxStreamInitializer?
    private var context: ChannelHandlerContext?
    private var loop: (any EventLoop)?
    private var streams: [UInt32: MuxStreamChannel] = [:]
    private var nextStreamID: UInt32
    private var highestPeerStreamID: UInt32 = 0
    private var localGoAway = false
    private var remoteGoAway = false
    private var closed = false
    private var pings: [UInt32: (sent: NIODeadline, promise: EventLoopPromise<TimeAmount>)] = [:]
    private var nextPing: UInt32 = 0
    /// Streams with bytes to send while the session's channel is unwritable.
    private var blocked: [UInt32] = []
    private var needsFlush = false
    private var inRead = false
    /// Frames sent since the last flush, coalesced (``send(_:promise:)``), and the promise of the first
    /// of them that had one (the others cascade from it).
    private var outgoing: ByteBuffer?
    private var outgoingPromise: EventLoopPromise<Void>?
    /// The start of a frame whose rest has not arrived yet.
    private var partial: ByteBuffer?
    /// The longest Data payload accepted: the receive window (a longer frame would overrun it anyway).
    private let maxPayload: Int
    private(set) var stats = MuxStats()

    init(configuration: MuxConfiguration, logger: Logger, inbound: MuxStreamInitializer?) {
        precondition(configuration.receiveWindow >= YamuxDefaults.initialWindow, "a window below the spec's 256 KiB")
        precondition(configuration.maxFrameSize > 0 && configuration.maxStreams > 0)
        self.configuration = configuration
        self.logger = logger
        self.inbound = inbound
        self.nextStreamID = configuration.role == .client ? 1 : 2
        self.maxPayload = Int(configuration.receiveWindow)
    }

    // MARK: Channel events

    public func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.loop = context.eventLoop
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.partial = nil
        self.shutDown(.sessionClosed)
        self.outgoing = nil
        self.outgoingPromise?.fail(MuxError.sessionClosed)
        self.outgoingPromise = nil
        self.context = nil
    }

    public func channelInactive(context: ChannelHandlerContext) {
        if let partial = self.partial, partial.readableBytes > 0, !self.closed {
            // The frame will never complete.
            self.partial = nil
            self.malformed(MeshWireError.truncated("a yamux frame (\(partial.readableBytes) bytes left)"))
        }
        self.shutDown(.sessionClosed)
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let error = error as? MeshWireError {
            self.malformed(error)
        } else {
            self.logger.debug("mux: session error from \(self.peerName): \(error)")
            self.shutDown(.sessionClosed)
            context.close(promise: nil)
        }
    }

    private func malformed(_ error: MeshWireError) {
        self.logger.warning("mux: malformed frame from \(self.peerName): \(error)")
        self.cutOff(.malformedFrame)
    }

    public func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            let waiting = self.blocked
            self.blocked.removeAll()
            for id in waiting {
                if let s = self.streams[id] { self.pump(s) }
            }
        }
        context.fireChannelWritabilityChanged()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.closed else { return }
        var bytes = self.unwrapInboundIn(data)
        if var partial = self.partial {
            self.partial = nil
            partial.writeBuffer(&bytes)
            bytes = partial
        }
        self.inRead = true
        defer { self.inRead = false }
        do throws(MeshWireError) {
            while !self.closed, let frame = try YamuxFrame.decode(from: &bytes, maxPayload: self.maxPayload) {
                self.handle(frame)
            }
        } catch {
            // Nothing after a malformed header is read: the peer is cut off.
            self.malformed(error)
            return
        }
        if bytes.readableBytes > 0, !self.closed { self.partial = bytes }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        self.flushIfNeeded()
        context.fireChannelReadComplete()
    }

    // MARK: Frames

    private func handle(_ frame: YamuxFrame) {
        switch frame {
        case .ping(ack: false, let opaque):
            self.send(.ping(ack: true, opaque: opaque))
        case .ping(ack: true, let opaque):
            if let p = self.pings.removeValue(forKey: opaque) {
                let rtt = NIODeadline.now() - p.sent
                self.stats.lastRTT = rtt
                p.promise.succeed(rtt)
            }
        case .goAway(let code):
            self.stats.goAwayReceived = code
            self.remoteGoAway = true
            if code != .normal {
                self.logger.warning("mux: \(self.peerName) ended the session: go away \(code)")
                self.shutDown(.peerError(code))
                self.context?.close(promise: nil)
            }
        case .windowUpdate(let id, let flags, let delta):
            self.handleStreamFrame(id, flags, payload: nil, delta: delta)
        case .data(let id, let flags, let payload):
            self.handleStreamFrame(id, flags, payload: payload, delta: 0)
        }
    }

    private func handleStreamFrame(_ id: UInt32, _ flags: YamuxFlags, payload: ByteBuffer?, delta: UInt32) {
        if flags.contains(.syn) {
            guard self.isPeerID(id), id > self.highestPeerStreamID else { return self.cutOff(.badStreamID) }
            self.highestPeerStreamID = id
            guard self.acceptStream(id) else { return }
        }
        guard let stream = self.streams[id] else {
            // A stream that was open and is gone (reset or finished): frames in flight are dropped.
            if self.wasOpened(id) { return }
            return self.cutOff(.unknownStream)
        }
        if flags.contains(.rst) {
            self.stats.streamsResetByPeer += 1
            self.remove(stream)
            stream.fail(.streamReset(id))
            return
        }
        if delta > 0 {
            guard UInt64(stream.sendWindow) + UInt64(delta) <= UInt64(UInt32.max) else {
                return self.cutOff(.windowOverflow)
            }
            stream.sendWindow += delta
            self.pump(stream)
        }
        let fin = flags.contains(.fin)
        let n = payload?.readableBytes ?? 0
        if n > 0 || fin {
            if stream.peerFinished {
                if n > 0 { return self.cutOff(.dataAfterFin) }
                return  // a repeated FIN
            }
            guard n <= Int(stream.receiveWindow) else { return self.cutOff(.windowOverrun) }
            stream.receiveWindow -= UInt32(n)
            self.stats.dataBytesReceived += UInt64(n)
            stream.receive(payload ?? ByteBuffer(), fin: fin)
        }
    }

    /// A peer's SYN: creates the stream and acknowledges it, or refuses it with RST.
    private func acceptStream(_ id: UInt32) -> Bool {
        guard let context = self.context, let inbound = self.inbound, !self.localGoAway,
            self.streams.count < self.configuration.maxStreams
        else {
            self.stats.streamsRefused += 1
            self.send(.windowUpdate(stream: id, flags: .rst, delta: 0))
            return false
        }
        let stream = self.makeStream(id, parent: context.channel)
        self.stats.streamsAccepted += 1
        self.send(.windowUpdate(stream: id, flags: .ack, delta: self.extraWindow))
        inbound(stream).hop(to: context.eventLoop).assumeIsolated().whenComplete { result in
            switch result {
            case .success: stream.activate()
            case .failure(let error):
                self.logger.debug("mux: stream \(id) initializer failed: \(error)")
                stream.close0(error: error, mode: .all, promise: nil)
            }
        }
        return true
    }

    // MARK: Streams

    func openStream(_ initializer: @escaping MuxStreamInitializer) -> EventLoopFuture<any Channel> {
        guard let context = self.context, !self.closed else {
            return self.eventLoopForFailure.makeFailedFuture(MuxError.sessionClosed)
        }
        guard !self.localGoAway, !self.remoteGoAway else {
            return context.eventLoop.makeFailedFuture(MuxError.goneAway)
        }
        guard self.streams.count < self.configuration.maxStreams else {
            return context.eventLoop.makeFailedFuture(MuxError.tooManyStreams(limit: self.configuration.maxStreams))
        }
        guard self.nextStreamID < UInt32.max - 1 else {
            return context.eventLoop.makeFailedFuture(MuxError.streamIDsExhausted)
        }
        let id = self.nextStreamID
        self.nextStreamID += 2
        let stream = self.makeStream(id, parent: context.channel)
        self.stats.streamsOpened += 1
        self.send(.windowUpdate(stream: id, flags: .syn, delta: self.extraWindow))
        self.flushIfNeeded()
        return initializer(stream).hop(to: context.eventLoop).assumeIsolated().flatMapError { error in
            stream.close0(error: error, mode: .all, promise: nil)
            return context.eventLoop.makeFailedFuture(error)
        }.map { () -> any Channel in
            stream.activate()
            return stream
        }.nonisolated()
    }

    /// The channel's loop, kept after the handler is removed (to fail calls on).
    private var eventLoopForFailure: any EventLoop { self.loop! }

    private var extraWindow: UInt32 { self.configuration.receiveWindow - YamuxDefaults.initialWindow }

    private func makeStream(_ id: UInt32, parent: any Channel) -> MuxStreamChannel {
        let stream = MuxStreamChannel(
            streamID: id,
            session: self,
            parent: parent,
            receiveWindow: self.configuration.receiveWindow,
            sendWindow: YamuxDefaults.initialWindow,
            waterMark: self.configuration.writeBufferWaterMark
        )
        self.streams[id] = stream
        self.stats.openStreams = self.streams.count
        return stream
    }

    private func remove(_ stream: MuxStreamChannel) {
        guard self.streams[stream.streamID] === stream else { return }
        self.streams.removeValue(forKey: stream.streamID)
        self.stats.openStreams = self.streams.count
    }

    private func isPeerID(_ id: UInt32) -> Bool {
        // The client's ids are odd, the server's even.
        self.configuration.role == .server ? id % 2 == 1 : id % 2 == 0
    }

    private func wasOpened(_ id: UInt32) -> Bool {
        self.isPeerID(id) ? id <= self.highestPeerStreamID : id < self.nextStreamID
    }

    /// Sends a stream's flushed bytes as its send window and the channel allow, then its FIN if asked.
    func pump(_ stream: MuxStreamChannel) {
        guard let context = self.context, !self.closed, self.streams[stream.streamID] === stream else { return }
        let id = stream.streamID
        while let (first, firstPromise) = stream.flushed.first {
            if first.readableBytes == 0 {
                stream.flushed.removeFirst()
                firstPromise?.succeed(())
                continue
            }
            guard stream.sendWindow > 0 else { break }
            guard context.channel.isWritable else {
                if !self.blocked.contains(id) { self.blocked.append(id) }
                break
            }
            var (bytes, promise) = stream.flushed.removeFirst()
            let n = min(bytes.readableBytes, Int(stream.sendWindow), self.configuration.maxFrameSize)
            let slice = bytes.readSlice(length: n)!
            let done = bytes.readableBytes == 0
            if !done { stream.flushed.prepend((bytes, promise)) }
            var flags: YamuxFlags = []
            if done && stream.flushed.isEmpty && stream.finRequested && !stream.finSent {
                flags = .fin
                stream.finSent = true
            }
            stream.sendWindow -= UInt32(n)
            self.stats.dataBytesSent += UInt64(n)
            self.send(.data(stream: id, flags: flags, payload: slice), promise: done ? promise : nil)
            stream.dequeued(n)
        }
        if stream.flushed.isEmpty && stream.finRequested && !stream.finSent {
            stream.finSent = true
            self.send(.data(stream: id, flags: .fin, payload: ByteBuffer()))
        }
        self.flushIfNeeded()
        if stream.finSent {
            if stream.isOpen {
                stream.closeIfBothFinished()
            } else if stream.peerFinished && stream.flushed.isEmpty {
                self.remove(stream)  // closed by its user after the peer's FIN: now drained
            }
        }
    }

    /// The stream's user read `bytes`: hand them back to the peer as window, in steps of half a window.
    func consumed(_ stream: MuxStreamChannel, bytes: Int) {
        guard bytes > 0, self.streams[stream.streamID] === stream, !stream.peerFinished else { return }
        stream.consumedSinceUpdate += UInt32(bytes)
        guard stream.consumedSinceUpdate >= self.configuration.receiveWindow / 2 else { return }
        let delta = stream.consumedSinceUpdate
        stream.consumedSinceUpdate = 0
        stream.receiveWindow += delta
        self.send(.windowUpdate(stream: stream.streamID, flags: [], delta: delta))
        self.flushIfNeeded()
    }

    /// Both sides finished the stream.
    func streamFinished(_ stream: MuxStreamChannel) {
        self.remove(stream)
    }

    /// The stream's user closed it before the peer's FIN: RST.
    func resetByUser(_ stream: MuxStreamChannel) {
        guard self.streams[stream.streamID] === stream else { return }
        self.remove(stream)
        guard !self.closed else { return }
        self.send(.windowUpdate(stream: stream.streamID, flags: .rst, delta: 0))
        self.flushIfNeeded()
    }

    // MARK: Session

    func ping() -> EventLoopFuture<TimeAmount> {
        guard let context = self.context, !self.closed else {
            return self.eventLoopForFailure.makeFailedFuture(MuxError.sessionClosed)
        }
        self.nextPing &+= 1
        let promise = context.eventLoop.makePromise(of: TimeAmount.self)
        self.pings[self.nextPing] = (NIODeadline.now(), promise)
        self.send(.ping(ack: false, opaque: self.nextPing))
        self.flushIfNeeded()
        return promise.futureResult
    }

    func goAway(_ code: YamuxGoAwayCode) {
        guard !self.localGoAway, !self.closed else { return }
        self.localGoAway = true
        self.stats.goAwaySent = code
        self.send(.goAway(code))
        self.flushIfNeeded()
    }

    /// The peer broke the protocol: Go Away (protocol error), close, count.
    private func cutOff(_ violation: MuxViolation) {
        guard !self.closed, let context = self.context else { return }
        self.stats.protocolErrors[violation, default: 0] += 1
        Counter(label: "mux_protocol_errors_total", dimensions: [("reason", violation.rawValue)]).increment()
        self.logger.warning("mux: cut off \(self.peerName): \(violation.rawValue)")
        self.localGoAway = true
        self.stats.goAwaySent = .protocolError
        self.shutDown(.protocolViolation(violation))
        // Close once the Go Away is written (a close now would drop it with the queued bytes), or after
        // `cutOffGrace` if the peer does not read.
        let written = context.eventLoop.makePromise(of: Void.self)
        self.send(.goAway(.protocolError), promise: written)
        self.needsFlush = false
        self.writeHeld(context)
        context.flush()
        let channel = context.channel
        let timer = context.eventLoop.scheduleTask(in: Self.cutOffGrace) { channel.close(promise: nil) }
        written.futureResult.whenComplete { _ in
            timer.cancel()
            channel.close(promise: nil)
        }
    }

    /// How long a cut-off peer has to take the Go Away before the connection is closed anyway.
    static let cutOffGrace = TimeAmount.seconds(2)

    /// Fails every stream and ping; no frame is handled after.
    private func shutDown(_ error: MuxError) {
        guard !self.closed else { return }
        self.closed = true
        let all = self.streams.values
        self.streams.removeAll()
        self.stats.openStreams = 0
        for s in all { s.fail(error) }
        let pings = self.pings.values
        self.pings.removeAll()
        for p in pings { p.promise.fail(error) }
    }

    private var peerName: String {
        self.context?.channel.remoteAddress.map { "\($0)" } ?? "the peer"
    }

    private func send(_ frame: YamuxFrame, promise: EventLoopPromise<Void>? = nil) {
        guard let context = self.context else {
            promise?.fail(MuxError.sessionClosed)
            return
        }
        var out = self.outgoing ?? context.channel.allocator.buffer(capacity: Self.coalescedCapacity)
        self.outgoing = nil
        switch frame {
        case .data(let id, let flags, let payload):
            do {
                try YamuxFrame.data(stream: id, flags: flags, payload: ByteBuffer()).encode(into: &out)
            } catch {
                preconditionFailure("the session built an invalid frame: \(error)")
            }
            out.setInteger(UInt32(payload.readableBytes), at: out.writerIndex - 4)
            if payload.readableBytes <= Self.coalesceLimit {
                out.writeImmutableBuffer(payload)
                self.hold(out, promise)
            } else {
                // A large payload goes as its own write, not copied; what was held goes first, with its header.
                self.hold(out, nil)
                self.writeHeld(context)
                context.write(self.wrapOutboundOut(payload), promise: promise)
            }
        default:
            do { try frame.encode(into: &out) } catch {
                preconditionFailure("the session built an invalid frame: \(error)")
            }
            self.hold(out, promise)
        }
        if let held = self.outgoing, held.readableBytes >= Self.coalesceLimit { self.writeHeld(context) }
        self.needsFlush = true
    }

    /// Frames (and payloads up to `coalesceLimit`) are copied into one buffer until the next flush, so
    /// that the TLS layer below seals one record for them, not one per header and one per payload (which
    /// is what two writes of a frame gave: NIOSSL seals each write on its own).
    static let coalesceLimit = 8192
    static let coalescedCapacity = 1024

    private func hold(_ out: ByteBuffer, _ promise: EventLoopPromise<Void>?) {
        self.outgoing = out
        guard let promise else { return }
        if let first = self.outgoingPromise {
            first.futureResult.cascade(to: promise)
        } else {
            self.outgoingPromise = promise
        }
    }

    /// Writes what `send` held (not flushed).
    private func writeHeld(_ context: ChannelHandlerContext) {
        guard let out = self.outgoing else { return }
        let promise = self.outgoingPromise
        self.outgoing = nil
        self.outgoingPromise = nil
        context.write(self.wrapOutboundOut(out), promise: promise)
    }

    private func flushIfNeeded() {
        guard self.needsFlush, !self.inRead, let context = self.context else { return }
        self.needsFlush = false
        self.writeHeld(context)
        context.flush()
    }
}
