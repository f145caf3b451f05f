import Logging
import MeshNIO
import MeshRecords
import MeshWire
import Metrics
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Settings of a link carried by a ``LinkLoop``.
public struct LinkLoopConfiguration: Sendable {
    /// The window granted to the peer per stream (the spec's 256 KiB; more is announced on SYN/ACK).
    public var receiveWindow: UInt32 = YamuxDefaults.initialWindow
    /// Streams open at once, both directions; a peer SYN beyond it is refused with RST.
    public var maxStreams = 1024
    /// How long the receiving side waits for its local endpoint to accept.
    public var localConnectTimeout: TimeAmount = .seconds(5)
    /// Sealed bytes queued for the link before its streams stop reading their sockets.
    public var maxQueuedBytes = 1 << 20
    /// Records per key before both ends move to the next.
    public var recordsPerKey: UInt64 = LinkRecordCipher.defaultRecordsPerKey

    public init() {}
}

/// A peer link's data path on a ``LinkLoop``: the link's socket after its TLS 1.3 handshake, its records
/// sealed and opened by ``LinkRecordCipher`` (the mesh record layer), yamux frames (Mux/README.md, the same
/// wire as ``MuxSession``) and each stream spliced to a local socket on the same thread.
///
/// Streams carry TCP: one this side opens splices a connected socket (``open(socket:target:ended:replied:)``);
/// one the peer opens names its ``StreamTarget``, is checked by `check` and dialed on the loop.
public final class LinkLoopSession: EpollPollable, @unchecked Sendable {
    public let peer: String
    let loop: LinkLoop
    let fd: Int32
    let dialer: Bool
    let configuration: LinkLoopConfiguration
    let check: LinkTargetCheck?
    let logger: Logger
    private let onClosed: @Sendable (MuxError?) -> Void
    private let onRefused: @Sendable (StreamRefusal) -> Void
    private let sender: LinkRecordCipher
    private let receiver: LinkRecordCipher

    // Loop-thread state.
    var isDirty = false
    private var readable = false
    private var closing = false
    private var closed = false
    /// Sealed bytes read and not opened yet.
    private var inbound = ByteBuffer()
    /// Opened bytes not decoded into frames yet.
    private var plain = ByteBuffer()
    /// Frames to seal at the next flush.
    private var outPlain = ByteBuffer()
    /// Sealed bytes the socket has not taken yet.
    private var outSealed = ByteBuffer()
    private var streams: [UInt32: LinkLoopStream] = [:]
    private var nextStreamID: UInt32
    private var highestPeerStreamID: UInt32 = 0
    private var localGoAway = false
    private var remoteGoAway = false
    private var pings: [UInt32: (sent: UInt64, done: @Sendable (Result<TimeAmount, MuxError>) -> Void)] = [:]
    private var nextPing: UInt32 = 0
    /// Streams that stopped reading because the link's output was full.
    private var waiting: [LinkLoopStream] = []
    private var stats = MuxStats()

    /// Frames of at most this much payload: a frame and its header fill one record.
    static let maxPayload = LinkRecordCipher.maxContent - YamuxFrame.headerSize
    private static let maxBursts = 16

    /// A session not started yet (``Link`` sets ``streamsChanged`` and ``bridgeStream``, then ``start(received:)``);
    /// ``adopt(socket:on:peer:dialer:secrets:received:configuration:check:logger:refused:closed:)`` does both.
    init(
        socket fd: Int32,
        loop: LinkLoop,
        peer: String,
        dialer: Bool,
        secrets: LinkRecordSecrets,
        configuration: LinkLoopConfiguration,
        check: LinkTargetCheck?,
        logger: Logger,
        onRefused: @escaping @Sendable (StreamRefusal) -> Void,
        onClosed: @escaping @Sendable (MuxError?) -> Void
    ) {
        precondition(configuration.receiveWindow >= YamuxDefaults.initialWindow, "a window below the spec's 256 KiB")
        self.fd = fd
        self.loop = loop
        self.peer = peer
        self.dialer = dialer
        self.configuration = configuration
        self.check = check
        self.logger = logger
        self.onRefused = onRefused
        self.onClosed = onClosed
        let (send, receive) = secrets.directions(dialer: dialer)
        self.sender = LinkRecordCipher(
            secret: send,
            hash: secrets.hash,
            recordsPerKey: configuration.recordsPerKey
        )
        self.receiver = LinkRecordCipher(
            secret: receive,
            hash: secrets.hash,
            recordsPerKey: configuration.recordsPerKey
        )
        self.nextStreamID = dialer ? 1 : 2
        super.init()
    }

    /// Puts a link's connected, non-blocking socket (owned by the session from now on) on `loop`. `dialer`: this
    /// node dialed the link (the yamux client, odd stream ids, the dialer's record secret); `received`: bytes
    /// read past the handshake (the peer's first records). Without `check` every stream the peer opens is
    /// refused. `closed` is called once when the session ends (nil: closed by this side, or by the peer
    /// cleanly).
    public static func adopt(
        socket fd: Int32,
        on loop: LinkLoop,
        peer: String,
        dialer: Bool,
        secrets: LinkRecordSecrets,
        received: [UInt8] = [],
        configuration: LinkLoopConfiguration = LinkLoopConfiguration(),
        check: LinkTargetCheck?,
        logger: Logger = Logger(label: "mesh.link"),
        refused: @escaping @Sendable (StreamRefusal) -> Void = { _ in },
        closed: @escaping @Sendable (MuxError?) -> Void = { _ in }
    ) -> LinkLoopSession {
        let session = LinkLoopSession(
            socket: fd,
            loop: loop,
            peer: peer,
            dialer: dialer,
            secrets: secrets,
            configuration: configuration,
            check: check,
            logger: logger,
            onRefused: refused,
            onClosed: closed
        )
        session.start(received: received)
        return session
    }

    /// Takes a stream that is not a TCP splice (a UDP flow's, the link's control stream): its target and one
    /// end of a socket pair (owned by the callee) that the loop splices to the stream; false: not taken (the
    /// stream is refused). Called on the loop. Set before ``start(received:)``; nil: such streams are refused.
    public var bridgeStream: (@Sendable (_ target: StreamTarget, _ socket: Int32, _ peer: String) -> Bool)?

    /// Called on the loop when a stream joins (true) or leaves (false) the session. Set before ``start(received:)``.
    public var streamsChanged: (@Sendable (_ opened: Bool) -> Void)?

    /// Starts the session on its loop (once).
    public func start(received: [UInt8]) {
        let queued = self.loop.execute {
            self.start(received)
        }
        if !queued {
            Glibc.close(self.fd)
            self.onClosed(.sessionClosed)
        }
    }

    // MARK: any thread

    /// Splices `socket` (connected, non-blocking) to a new stream to `target`. `replied` is called once, on
    /// the loop: success once the peer accepted (the session owns the socket from then on and closes it
    /// when the stream ends), or the failure (a refusal: ``LinkError/refused(_:)``); then the caller still
    /// owns the socket. `ended` is called when an accepted stream ends, with the bytes each way.
    public func open(
        socket: Int32,
        target: StreamTarget,
        ended: (@Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void)? = nil,
        replied: @escaping @Sendable (Result<Void, any Error>) -> Void
    ) {
        let queued = self.loop.execute {
            self.openOnLoop(socket, target, ended, replied)
        }
        if !queued { replied(.failure(MuxError.sessionClosed)) }
    }

    /// ``open(socket:target:ended:replied:)``, waiting for the reply.
    public func open(
        socket: Int32,
        target: StreamTarget,
        ended: (@Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void)? = nil
    ) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            self.open(socket: socket, target: target, ended: ended) { continuation.resume(with: $0) }
        }
    }

    /// Sends a ping; `done` gets the round trip (on the loop).
    public func ping(_ done: @escaping @Sendable (Result<TimeAmount, MuxError>) -> Void) {
        let queued = self.loop.execute {
            guard !self.closed else { return done(.failure(.sessionClosed)) }
            self.nextPing &+= 1
            self.pings[self.nextPing] = (self.loop.now, done)
            self.writeFrameHeader(.ping, flags: .syn, stream: 0, length: self.nextPing)
            self.loop.markDirty(self)
        }
        if !queued { done(.failure(.sessionClosed)) }
    }

    public func ping() async throws -> TimeAmount {
        try await withCheckedThrowingContinuation { continuation in
            self.ping { continuation.resume(with: $0.mapError { $0 as any Error }) }
        }
    }

    /// Go Away (normal): no new streams either way; open ones go on.
    public func goAway() {
        self.loop.execute {
            guard !self.closed, !self.localGoAway else { return }
            self.localGoAway = true
            self.stats.goAwaySent = .normal
            self.writeFrameHeader(.goAway, flags: [], stream: 0, length: YamuxGoAwayCode.normal.rawValue)
            self.loop.markDirty(self)
        }
    }

    /// Closes the session: Go Away, close_notify, then the socket; open streams are reset.
    public func close() {
        self.loop.execute { self.shutDown(nil, notifyPeer: true) }
    }

    /// The session's counters, and the records sealed and opened (on the loop).
    public func stats(_ body: @escaping @Sendable (MuxStats, _ records: UInt64) -> Void) {
        let queued = self.loop.execute {
            body(self.stats, self.sender.records + self.receiver.records)
        }
        if !queued { body(MuxStats(), 0) }
    }

    public func stats() async -> (MuxStats, records: UInt64) {
        await withCheckedContinuation { continuation in
            self.stats { continuation.resume(returning: ($0, $1)) }
        }
    }

    // MARK: loop thread: the link's socket

    private func start(_ received: [UInt8]) {
        self.loop.adopt(self)
        do {
            try self.loop.register(self.fd, self)
        } catch {
            self.logger.warning("link loop: could not watch the link's socket: \(error)")
            self.shutDown(.sessionClosed, notifyPeer: false)
            return
        }
        if !received.isEmpty {
            self.inbound.writeBytes(received)
            self.openRecords()
        }
    }

    public override func ready(_ events: UInt32) {
        guard !self.closed else { return }
        if events & (EpollCore.Events.input | EpollCore.Events.closing) != 0 { self.readable = true }
        if events & EpollCore.Events.closing != 0 { self.closing = true }
        if events & EpollCore.Events.output != 0, self.outSealed.readableBytes > 0 {
            self.writeSealed()
        }
        if self.readable { self.readLink() }
    }

    private func readLink() {
        var bursts = 0
        while self.readable && !self.closed {
            var failure: Int32 = 0
            var asked = 0
            let fd = self.fd
            let n = self.inbound.writeWithUnsafeMutableBytes(minimumWritableBytes: 32 * 1024) { raw -> Int in
                asked = raw.count
                let n = recv(fd, raw.baseAddress!, raw.count, 0)
                if n < 0 { failure = errno }
                return max(n, 0)
            }
            if n > 0 {
                if !self.closing, n < asked { self.readable = false }
                self.openRecords()
                bursts += 1
                if bursts == Self.maxBursts { break }
            } else if failure == 0 {
                self.readable = false
                self.peerClosed("the peer closed the link's connection")
            } else if failure == EAGAIN || failure == EWOULDBLOCK {
                self.readable = false
            } else if failure != EINTR {
                self.readable = false
                self.logger.debug("link loop: read from \(self.peer) failed (errno \(failure))")
                self.shutDown(.sessionClosed, notifyPeer: false)
            }
        }
        if self.readable && !self.closed {
            // Burst limit: come back after the other sockets (an edge will not come again for this input).
            self.loop.execute { [self] in if self.readable { self.readLink() } }
        }
    }

    /// Opens the whole records read so far and handles the frames in them.
    private func openRecords() {
        var closeNotify = false
        while !self.closed {
            let result: Result<(length: Int, type: UInt8)?, LinkRecordError> = self.inbound.withUnsafeReadableBytes {
                bytes in
                do throws(LinkRecordError) {
                    return .success(try self.receiver.openFirst(bytes, into: &self.plain))
                } catch {
                    return .failure(error)
                }
            }
            switch result {
            case .failure(let error):
                self.logger.warning("link loop: a record from \(self.peer) does not open: \(error)")
                return self.shutDown(.sessionClosed, notifyPeer: false)
            case .success(nil):
                break
            case .success(let opened?):
                self.inbound.moveReaderIndex(forwardBy: opened.length)
                if opened.type == LinkRecordCipher.ContentType.applicationData.rawValue { continue }
                if opened.type == LinkRecordCipher.ContentType.alert.rawValue {
                    // close_notify (or any alert): what came before it is handled, then the link ends.
                    closeNotify = true
                    break
                }
                self.logger.warning("link loop: a record of type \(opened.type) from \(self.peer)")
                return self.shutDown(.sessionClosed, notifyPeer: false)
            }
            break
        }
        if self.inbound.readableBytes == 0 {
            self.inbound.clear()
        } else if self.inbound.readerIndex > 64 * 1024 {
            self.inbound.discardReadBytes()
        }
        self.decodeFrames()
        if closeNotify && !self.closed { self.peerClosed("close_notify") }
    }

    private func decodeFrames() {
        do throws(MeshWireError) {
            while !self.closed,
                let frame = try YamuxFrame.decode(from: &self.plain, maxPayload: Int(self.configuration.receiveWindow))
            {
                self.handle(frame)
            }
        } catch {
            self.logger.warning("link loop: malformed frame from \(self.peer): \(error)")
            return self.cutOff(.malformedFrame)
        }
        if self.plain.readableBytes == 0 {
            self.plain.clear()
        } else if self.plain.readerIndex > 64 * 1024 {
            self.plain.discardReadBytes()
        }
    }

    private func peerClosed(_ why: String) {
        self.logger.debug("link loop: \(self.peer) ended the link: \(why)")
        self.shutDown(nil, notifyPeer: false)
    }

    /// Seals what was queued and writes it (the loop calls it once per wake-up for a dirty session).
    func flush() {
        guard !self.closed else { return }
        self.sealQueued()
        self.writeSealed()
    }

    private func sealQueued() {
        while self.outPlain.readableBytes > 0 {
            let n = min(self.outPlain.readableBytes, LinkRecordCipher.maxContent)
            self.outPlain.withUnsafeReadableBytes { bytes in
                self.sender.seal(
                    UnsafeRawBufferPointer(rebasing: bytes[0..<n]),
                    type: .applicationData,
                    into: &self.outSealed
                )
            }
            self.outPlain.moveReaderIndex(forwardBy: n)
        }
        self.outPlain.clear()
    }

    private func writeSealed() {
        let fd = self.fd
        let (written, failure) = self.outSealed.withUnsafeReadableBytes { LinkLoopIO.send(fd, $0) }
        self.outSealed.moveReaderIndex(forwardBy: written)
        if self.outSealed.readableBytes == 0 { self.outSealed.clear() }
        if let failure {
            self.logger.debug("link loop: write to \(self.peer) failed (errno \(failure))")
            return self.shutDown(.sessionClosed, notifyPeer: false)
        }
        if self.outSealed.readableBytes < self.configuration.maxQueuedBytes / 2, !self.waiting.isEmpty {
            let streams = self.waiting
            self.waiting = []
            for stream in streams {
                stream.waitingForLink = false
                self.pumpSocket(stream)
            }
        }
    }

    private var queued: Int { self.outSealed.readableBytes + self.outPlain.readableBytes }

    // MARK: frames

    private func writeFrameHeader(_ type: YamuxFrameType, flags: YamuxFlags, stream: UInt32, length: UInt32) {
        self.outPlain.writeMultipleIntegers(YamuxFrame.version, type.rawValue, flags.rawValue, stream, length)
    }

    private func handle(_ frame: YamuxFrame) {
        switch frame {
        case .ping(ack: false, let opaque):
            self.writeFrameHeader(.ping, flags: .ack, stream: 0, length: opaque)
            self.loop.markDirty(self)
        case .ping(ack: true, let opaque):
            if let p = self.pings.removeValue(forKey: opaque) {
                let rtt = TimeAmount.nanoseconds(Int64(EpollCore.monotonic() &- p.sent))
                self.stats.lastRTT = rtt
                p.done(.success(rtt))
            }
        case .goAway(let code):
            self.stats.goAwayReceived = code
            self.remoteGoAway = true
            if code != .normal {
                self.logger.warning("link loop: \(self.peer) ended the session: go away \(code)")
                self.shutDown(.peerError(code), notifyPeer: false)
            }
        case .windowUpdate(let id, let flags, let delta):
            self.streamFrame(id, flags, payload: nil, delta: delta)
        case .data(let id, let flags, let payload):
            self.streamFrame(id, flags, payload: payload, delta: 0)
        }
    }

    private func isPeerID(_ id: UInt32) -> Bool { self.dialer ? id % 2 == 0 : id % 2 == 1 }

    private func wasOpened(_ id: UInt32) -> Bool {
        self.isPeerID(id) ? id <= self.highestPeerStreamID : id < self.nextStreamID
    }

    private var extraWindow: UInt32 { self.configuration.receiveWindow - YamuxDefaults.initialWindow }

    private func streamFrame(_ id: UInt32, _ flags: YamuxFlags, payload: ByteBuffer?, delta: UInt32) {
        if flags.contains(.syn) {
            guard self.isPeerID(id), id > self.highestPeerStreamID else { return self.cutOff(.badStreamID) }
            self.highestPeerStreamID = id
            guard self.accept(id) else { return }
        }
        guard let stream = self.streams[id] else {
            if self.wasOpened(id) { return }  // gone meanwhile: frames in flight are dropped
            return self.cutOff(.unknownStream)
        }
        if flags.contains(.rst) {
            self.stats.streamsResetByPeer += 1
            return self.end(stream, reset: false, error: MuxError.streamReset(id))
        }
        if delta > 0 {
            guard UInt64(stream.sendWindow) + UInt64(delta) <= UInt64(UInt32.max) else {
                return self.cutOff(.windowOverflow)
            }
            let wasShut = stream.sendWindow == 0
            stream.sendWindow += delta
            if wasShut { self.pumpSocket(stream) }
        }
        let fin = flags.contains(.fin)
        let n = payload?.readableBytes ?? 0
        guard n > 0 || fin else { return }
        if stream.peerFinished {
            if n > 0 { return self.cutOff(.dataAfterFin) }
            return
        }
        guard n <= Int(stream.receiveWindow) else { return self.cutOff(.windowOverrun) }
        stream.receiveWindow -= UInt32(n)
        self.stats.dataBytesReceived += UInt64(n)
        if fin { stream.peerFinished = true }
        self.deliver(stream, payload ?? ByteBuffer(), fin: fin)
    }

    /// A peer's SYN: the stream waits for its target header, or is refused with RST.
    private func accept(_ id: UInt32) -> Bool {
        guard self.check != nil, !self.localGoAway, self.streams.count < self.configuration.maxStreams else {
            self.stats.streamsRefused += 1
            self.writeFrameHeader(.windowUpdate, flags: .rst, stream: id, length: 0)
            self.loop.markDirty(self)
            return false
        }
        let stream = LinkLoopStream(
            id: id,
            session: self,
            fd: -1,
            state: .awaitingTarget,
            receiveWindow: self.configuration.receiveWindow
        )
        self.add(stream)
        self.stats.streamsAccepted += 1
        self.writeFrameHeader(.windowUpdate, flags: .ack, stream: id, length: self.extraWindow)
        self.loop.markDirty(self)
        return true
    }

    private func add(_ stream: LinkLoopStream) {
        self.streams[stream.id] = stream
        self.stats.openStreams = self.streams.count
        self.streamsChanged?(true)
    }

    // MARK: streams

    private func openOnLoop(
        _ socket: Int32,
        _ target: StreamTarget,
        _ ended: (@Sendable (Int, Int) -> Void)?,
        _ replied: @escaping @Sendable (Result<Void, any Error>) -> Void
    ) {
        guard !self.closed else { return replied(.failure(MuxError.sessionClosed)) }
        guard !self.localGoAway, !self.remoteGoAway else { return replied(.failure(MuxError.goneAway)) }
        guard self.streams.count < self.configuration.maxStreams else {
            return replied(.failure(MuxError.tooManyStreams(limit: self.configuration.maxStreams)))
        }
        guard self.nextStreamID < UInt32.max - 1 else { return replied(.failure(MuxError.streamIDsExhausted)) }
        var header = ByteBuffer()
        do { try target.encode(into: &header) } catch { return replied(.failure(error)) }
        let id = self.nextStreamID
        self.nextStreamID += 2
        let stream = LinkLoopStream(
            id: id,
            session: self,
            fd: socket,
            state: .awaitingReply,
            receiveWindow: self.configuration.receiveWindow
        )
        stream.replied = replied
        stream.ended = ended
        stream.target = target
        self.add(stream)
        self.stats.streamsOpened += 1
        self.writeFrameHeader(.windowUpdate, flags: .syn, stream: id, length: self.extraWindow)
        let length = UInt32(header.readableBytes)
        self.writeFrameHeader(.data, flags: [], stream: id, length: length)
        self.outPlain.writeBuffer(&header)
        stream.sendWindow -= length
        self.loop.markDirty(self)
    }

    /// The peer's bytes (and FIN) for `stream`, by its state.
    private func deliver(_ stream: LinkLoopStream, _ payload: ByteBuffer, fin: Bool) {
        switch stream.state {
        case .awaitingReply:
            self.replyBytes(stream, payload, fin: fin)
        case .awaitingTarget:
            self.targetBytes(stream, payload, fin: fin)
        case .dialing:
            stream.hold(payload)
        case .open:
            if payload.readableBytes > 0 {
                let (written, error) = stream.write(payload)
                if let error { return self.socketFailed(stream, error) }
                self.consumed(stream, written)
            }
            if stream.pending == nil && stream.peerFinished { stream.shutWrite() }
            self.finishIfDone(stream)
        case .closed:
            break
        }
    }

    private func replyBytes(_ stream: LinkLoopStream, _ payload: ByteBuffer, fin: Bool) {
        let reply: StreamOpenReply?
        let buffer: ByteBuffer
        do {
            (reply, buffer) = try self.header(stream, payload) { try StreamOpenReply.decode(from: &$0) }
        } catch {
            return self.failOpen(
                stream,
                LinkError.refused(StreamRefusal(.malformedHeader, "a malformed reply: \(error)")),
                reset: true
            )
        }
        guard let reply else {
            if fin { self.failOpen(stream, LinkError.closedBeforeReply, reset: false) }
            return
        }
        switch reply {
        case .refused(let refusal):
            self.failOpen(stream, LinkError.refused(refusal), reset: !fin)
        case .accepted:
            do {
                try self.loop.register(stream.fd, stream)
            } catch {
                // The caller keeps its socket: the stream goes.
                return self.failOpen(stream, error, reset: true)
            }
            stream.registered = true
            stream.state = .open
            let replied = stream.replied
            stream.replied = nil
            replied?(.success(()))
            self.deliver(stream, buffer, fin: fin)
        }
    }

    /// Reads a stream's header (the peer's reply, or its target) from what came so far and `payload`: the header
    /// and the bytes after it, or nil while it is not whole (the bytes are kept on the stream for the next
    /// frame). The header's bytes count as consumed. Throws what `decode` throws.
    private func header<T>(
        _ stream: LinkLoopStream,
        _ payload: ByteBuffer,
        _ decode: (inout ByteBuffer) throws -> T?
    ) throws -> (T?, ByteBuffer) {
        var buffer = stream.header ?? ByteBuffer()
        buffer.writeImmutableBuffer(payload)
        let before = buffer.readableBytes
        stream.header = nil
        guard let value = try decode(&buffer) else {
            stream.header = buffer
            return (nil, buffer)
        }
        self.consumed(stream, before - buffer.readableBytes)
        return (value, buffer)
    }

    /// An opening stream failed before the socket was taken: the caller keeps it.
    private func failOpen(_ stream: LinkLoopStream, _ error: any Error, reset: Bool) {
        let replied = stream.replied
        stream.replied = nil
        stream.ended = nil
        stream.fd = -1
        self.end(stream, reset: reset, error: nil)
        replied?(.failure(error))
    }

    private func targetBytes(_ stream: LinkLoopStream, _ payload: ByteBuffer, fin: Bool) {
        let target: StreamTarget?
        let buffer: ByteBuffer
        do {
            (target, buffer) = try self.header(stream, payload) { try StreamTarget.decode(from: &$0) }
        } catch {
            return self.refuse(stream, StreamRefusal(.malformedHeader, "malformed stream-open header: \(error)"))
        }
        guard let target else {
            if fin { self.end(stream, reset: true, error: nil) }  // FIN before a whole header
            return
        }
        stream.target = target
        if target == .linkControl || target.transport != .tcp {
            return self.bridge(stream, target, rest: buffer)
        }
        if let check = self.check, let refusal = check(target, self.peer) {
            return self.refuse(stream, refusal)
        }
        switch LinkLoopDial.connect(target.endpoint, port: target.endpointPort) {
        case .failure(let error):
            return self.refuse(
                stream,
                StreamRefusal(.dialFailed, "\(target.endpoint):\(target.endpointPort): \(error)")
            )
        case .success(let fd):
            stream.fd = fd
            do {
                try self.loop.register(fd, stream)
            } catch {
                return self.refuse(stream, StreamRefusal(.dialFailed, "\(error)"))
            }
            stream.registered = true
            let timeout = UInt64(max(self.configuration.localConnectTimeout.nanoseconds, 1))
            stream.state = .dialing(deadline: self.loop.now &+ timeout)
            self.loop.dialing(stream)
            stream.hold(buffer)
        }
    }

    /// A stream that is not a TCP splice (a UDP flow, the link's control stream): accepted here (a UDP flow once
    /// `check` allows it), spliced to one end of a socket pair whose other end `bridge` hands to NIO.
    private func bridge(_ stream: LinkLoopStream, _ target: StreamTarget, rest: ByteBuffer) {
        if target != .linkControl, let check = self.check, let refusal = check(target, self.peer) {
            return self.refuse(stream, refusal)
        }
        guard let bridge = self.bridgeStream else {
            return self.refuse(stream, StreamRefusal(.overLimit, "no handler for \(target.transport) streams here"))
        }
        var fds: [Int32] = [-1, -1]
        let type = Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue)
        guard socketpair(AF_UNIX, type, 0, &fds) == 0 else {
            return self.refuse(stream, StreamRefusal(.overLimit, "socketpair: errno \(errno)"))
        }
        guard bridge(target, fds[1], self.peer) else {
            Glibc.close(fds[0])
            Glibc.close(fds[1])
            let why = target == .linkControl ? "no control stream handler here" : "cannot carry \(target)"
            return self.refuse(stream, StreamRefusal(.unknownService, why))
        }
        stream.fd = fds[0]
        do {
            try self.loop.register(fds[0], stream)
        } catch {
            return self.refuse(stream, StreamRefusal(.overLimit, "\(error)"))
        }
        stream.registered = true
        stream.state = .open
        self.answer(stream, .accepted)
        if rest.readableBytes > 0 {
            let (written, error) = stream.write(rest)
            if let error { return self.socketFailed(stream, error) }
            self.consumed(stream, written)
        }
        if stream.pending == nil && stream.peerFinished { stream.shutWrite() }
    }

    /// Sends `reply` on `stream`: a refusal with FIN (the stream ends here).
    private func answer(_ stream: LinkLoopStream, _ reply: StreamOpenReply) {
        var bytes = ByteBuffer()
        reply.encode(into: &bytes)
        let length = UInt32(bytes.readableBytes)
        let refused = reply != .accepted
        self.writeFrameHeader(.data, flags: refused ? .fin : [], stream: stream.id, length: length)
        self.outPlain.writeBuffer(&bytes)
        if refused { stream.finSent = true } else { stream.sendWindow -= length }
        self.loop.markDirty(self)
    }

    private func refuse(_ stream: LinkLoopStream, _ refusal: StreamRefusal) {
        self.onRefused(refusal)
        self.logger.info(
            "refused a stream",
            metadata: [
                "peer": "\(self.peer)", "target": "\(stream.target.map { "\($0)" } ?? "-")",
                "reason": "\(refusal.reason)",
            ]
        )
        self.answer(stream, .refused(refusal))
        self.end(stream, reset: false, error: nil)
    }

    /// The local endpoint's connect signalled (or timed out).
    private func dialed(_ stream: LinkLoopStream) {
        if let error = LinkLoopDial.outcome(stream.fd) {
            let target = stream.target.map { "\($0.endpoint):\($0.endpointPort)" } ?? "-"
            return self.refuse(stream, StreamRefusal(.dialFailed, "\(target): \(error)"))
        }
        stream.state = .open
        self.answer(stream, .accepted)
        if stream.pending != nil { self.flushSocket(stream) }
        if stream.pending == nil && stream.peerFinished { stream.shutWrite() }
        self.pumpSocket(stream)
    }

    func dialTimedOut(_ stream: LinkLoopStream) {
        let target = stream.target.map { "\($0.endpoint):\($0.endpointPort)" } ?? "-"
        self.refuse(stream, StreamRefusal(.dialFailed, "\(target): connect timed out"))
    }

    /// Events on a stream's socket.
    func streamReady(_ stream: LinkLoopStream, _ events: UInt32) {
        guard !self.closed else { return }
        if events & (EpollCore.Events.input | EpollCore.Events.closing) != 0 { stream.readable = true }
        if events & EpollCore.Events.closing != 0 { stream.closing = true }
        switch stream.state {
        case .dialing:
            if events & (EpollCore.Events.output | EpollCore.Events.error | EpollCore.Events.hangUp) != 0 {
                self.dialed(stream)
            }
            return
        case .open:
            break
        default:
            return
        }
        if events & EpollCore.Events.output != 0, stream.pending != nil { self.flushSocket(stream) }
        if stream.isOpen { self.pumpSocket(stream) }
    }

    /// Picks a stream up again after its burst limit.
    func resume(_ stream: LinkLoopStream) {
        guard !self.closed, stream.isOpen else { return }
        self.pumpSocket(stream)
    }

    private func flushSocket(_ stream: LinkLoopStream) {
        let (written, done, error) = stream.flushPending()
        if let error { return self.socketFailed(stream, error) }
        self.consumed(stream, written)
        if done && stream.peerFinished { stream.shutWrite() }
        self.finishIfDone(stream)
    }

    /// Reads the stream's socket into Data frames while the peer's window and the link's queue allow.
    private func pumpSocket(_ stream: LinkLoopStream) {
        guard stream.isOpen, !stream.finSent, !self.closed else { return }
        var bursts = 0
        while stream.readable {
            guard stream.sendWindow > 0 else { return }  // a window update picks it up
            if self.queued >= self.configuration.maxQueuedBytes {
                if !stream.waitingForLink {
                    stream.waitingForLink = true
                    self.waiting.append(stream)
                }
                self.loop.markDirty(self)
                return
            }
            let want = min(Int(stream.sendWindow), Self.maxPayload)
            var failure: Int32 = 0
            let id = stream.id
            let fd = stream.fd
            var got = 0
            self.outPlain.writeWithUnsafeMutableBytes(minimumWritableBytes: YamuxFrame.headerSize + want) {
                raw -> Int in
                let n = recv(fd, raw.baseAddress! + YamuxFrame.headerSize, want, 0)
                guard n > 0 else {
                    if n < 0 { failure = errno }
                    return 0
                }
                got = n
                let header = raw.baseAddress!
                header.storeBytes(of: YamuxFrame.version, toByteOffset: 0, as: UInt8.self)
                header.storeBytes(of: YamuxFrameType.data.rawValue, toByteOffset: 1, as: UInt8.self)
                header.storeBytes(of: UInt16(0), toByteOffset: 2, as: UInt16.self)
                header.storeBytes(of: id.bigEndian, toByteOffset: 4, as: UInt32.self)
                header.storeBytes(of: UInt32(n).bigEndian, toByteOffset: 8, as: UInt32.self)
                return YamuxFrame.headerSize + n
            }
            if got > 0 {
                stream.fromSocket += got
                stream.sendWindow -= UInt32(got)
                self.stats.dataBytesSent += UInt64(got)
                self.loop.markDirty(self)
                if got < want && !stream.closing { stream.readable = false }
                if self.outPlain.readableBytes >= 64 * 1024 { self.sealQueued() }
                bursts += 1
                if bursts == Self.maxBursts && stream.readable {
                    self.loop.runAgain(stream)
                    return
                }
            } else if failure == 0 {
                // End of input: FIN.
                stream.readable = false
                stream.finSent = true
                self.writeFrameHeader(.data, flags: .fin, stream: id, length: 0)
                self.loop.markDirty(self)
                self.finishIfDone(stream)
                return
            } else if failure == EAGAIN || failure == EWOULDBLOCK {
                stream.readable = false
            } else if failure != EINTR {
                return self.socketFailed(stream, failure)
            }
        }
    }

    /// `n` bytes of the peer's left our buffers: handed back as window in steps of half a window.
    private func consumed(_ stream: LinkLoopStream, _ n: Int) {
        guard n > 0, !stream.peerFinished else { return }
        stream.consumed += UInt32(n)
        guard stream.consumed >= self.configuration.receiveWindow / 2 else { return }
        let delta = stream.consumed
        stream.consumed = 0
        stream.receiveWindow += delta
        self.writeFrameHeader(.windowUpdate, flags: [], stream: stream.id, length: delta)
        self.loop.markDirty(self)
    }

    private func finishIfDone(_ stream: LinkLoopStream) {
        guard stream.isOpen, stream.finSent, stream.peerFinished, stream.pending == nil else { return }
        stream.shutWrite()
        self.end(stream, reset: false, error: nil)
    }

    /// The local socket failed: the peer gets a reset.
    private func socketFailed(_ stream: LinkLoopStream, _ code: Int32) {
        self.logger.debug("link loop: stream \(stream.id) to \(self.peer): socket error \(code)")
        self.end(stream, reset: true, error: nil)
    }

    /// Takes `stream` out of the session: RST to the peer when `reset`, its socket closed (a registered one;
    /// with `error` as a reset, SO_LINGER 0, so its own peer sees the cut), `ended` told.
    private func end(_ stream: LinkLoopStream, reset: Bool, error: (any Error)?) {
        if case .closed = stream.state { return }
        if case .awaitingReply = stream.state, let replied = stream.replied {
            // Never taken: the caller keeps the socket.
            stream.replied = nil
            stream.ended = nil
            stream.fd = -1
            replied(.failure(error ?? LinkError.closedBeforeReply))
        }
        stream.state = .closed
        if self.streams[stream.id] === stream {
            self.streams.removeValue(forKey: stream.id)
            self.stats.openStreams = self.streams.count
            self.streamsChanged?(false)
        }
        if reset && !self.closed {
            self.writeFrameHeader(.windowUpdate, flags: .rst, stream: stream.id, length: 0)
            self.loop.markDirty(self)
        }
        if stream.fd >= 0 {
            if error != nil || reset {
                var cut = linger(l_onoff: 1, l_linger: 0)
                _ = setsockopt(stream.fd, SOL_SOCKET, SO_LINGER, &cut, socklen_t(MemoryLayout<linger>.size))
            }
            if stream.registered { self.loop.closeSocket(stream.fd) } else { Glibc.close(stream.fd) }
            stream.fd = -1
        }
        stream.pending = nil
        stream.header = nil
        self.loop.retire(stream)
        if let ended = stream.ended {
            stream.ended = nil
            ended(stream.fromSocket, stream.toSocket)
        }
    }

    // MARK: session end

    /// The peer broke the protocol: Go Away (protocol error), close, count.
    private func cutOff(_ violation: MuxViolation) {
        guard !self.closed else { return }
        self.stats.protocolErrors[violation, default: 0] += 1
        Counter(label: "mux_protocol_errors_total", dimensions: [("reason", violation.rawValue)]).increment()
        self.logger.warning("link loop: cut off \(self.peer): \(violation.rawValue)")
        self.localGoAway = true
        self.stats.goAwaySent = .protocolError
        self.writeFrameHeader(.goAway, flags: [], stream: 0, length: YamuxGoAwayCode.protocolError.rawValue)
        self.shutDown(.protocolViolation(violation), notifyPeer: true)
    }

    /// Ends the session: every stream reset (an opening one's socket handed back), pings failed; with
    /// `notifyPeer`, what was queued and a close_notify are written first (best effort, not waited for).
    func shutDown(_ error: MuxError?, notifyPeer: Bool) {
        guard !self.closed else { return }
        if notifyPeer {
            if !self.localGoAway && error == nil {
                self.localGoAway = true
                self.writeFrameHeader(.goAway, flags: [], stream: 0, length: YamuxGoAwayCode.normal.rawValue)
            }
            self.sealQueued()
            var alert: (UInt8, UInt8) = (1, 0)  // warning, close_notify
            withUnsafeBytes(of: &alert) { self.sender.seal($0, type: .alert, into: &self.outSealed) }
            self.writeSealed()
        }
        self.closed = true
        let all = Array(self.streams.values)
        for stream in all { self.end(stream, reset: true, error: error ?? MuxError.sessionClosed) }
        let pings = self.pings.values
        self.pings.removeAll()
        for p in pings { p.done(.failure(error ?? .sessionClosed)) }
        self.waiting.removeAll()
        self.loop.closeSocket(self.fd)
        self.loop.remove(self)
        self.onClosed(error)
    }
}
