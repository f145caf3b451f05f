import NIOCore

/// A link's record layer after its TLS 1.3 handshake, in the place NIOSSL's handler held (``Link`` puts it
/// there once NIOSSL has unwrapped): opens the peer's records into plaintext for the multiplexer, and seals
/// what the multiplexer writes, one or more records per write, sealed when flushed. Records are TLS 1.3
/// application-data records (``LinkRecordCipher``). A record that does not open, a header out of bounds, or
/// an alert other than close_notify ends the link (`errorCaught` with the ``LinkRecordError``, then close);
/// close_notify from the peer closes it after what came before it is delivered. Closing the channel sends a
/// close_notify first, so the peer can tell an end from a cut.
///
/// Inbound bytes that come before ``start(context:)`` (the ones NIOSSL read past its close_notify, handed
/// on as it left) wait until then.
public final class SealedRecordHandler: ChannelDuplexHandler, RemovableChannelHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    private let sender: LinkRecordCipher
    private let receiver: LinkRecordCipher
    private var started = false
    private var ended = false
    private var sentCloseNotify = false
    /// Bytes read and not yet opened (before `start`, or while opening).
    private var received: ByteBuffer?
    /// The start of a record cut by the end of the last read.
    private var partial: ByteBuffer?
    /// The plaintext buffer of the last read, kept for the next.
    private var plain: ByteBuffer?
    private var staged: [(ByteBuffer, EventLoopPromise<Void>?)] = []

    /// Records sealed and opened so far (for tests and `/peers`).
    public var recordsSent: UInt64 { self.sender.records }
    public var recordsReceived: UInt64 { self.receiver.records }

    /// Whether the plaintext buffer of a read is kept for the next (a link: no allocation per read), or each
    /// read's is as large as its bytes and let go (an HTTP connection that is idle most of its life keeps none).
    private let keepsReadBuffer: Bool

    /// Whether the ciphers keep their AEAD key schedules between reads and between flushes (a link), or set
    /// them up for each and let them go (``LinkRecordCipher/releaseKey()``: an idle HTTP connection keeps
    /// ~1.1 KiB less).
    private let keepsKeys: Bool

    /// The handler of one end of a link: `dialer` says which direction's secret it sends with.
    public init(
        secrets: LinkRecordSecrets,
        dialer: Bool,
        recordsPerKey: UInt64 = LinkRecordCipher.defaultRecordsPerKey,
        keepsReadBuffer: Bool = true,
        keepsKeys: Bool = true
    ) {
        self.keepsReadBuffer = keepsReadBuffer
        self.keepsKeys = keepsKeys
        let (send, receive) = secrets.directions(dialer: dialer)
        self.sender = LinkRecordCipher(secret: send, hash: secrets.hash, recordsPerKey: recordsPerKey)
        self.receiver = LinkRecordCipher(secret: receive, hash: secrets.hash, recordsPerKey: recordsPerKey)
    }

    /// Starts opening records, those that arrived before included.
    public func start(context: ChannelHandlerContext) {
        guard !self.started else { return }
        self.started = true
        self.openReceived(context)
        context.fireChannelReadComplete()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !self.ended else { return }
        var bytes = self.unwrapInboundIn(data)
        if self.received == nil {
            self.received = bytes
        } else {
            self.received!.writeBuffer(&bytes)
        }
        if self.started {
            self.openReceived(context)
        } else if self.received!.readableBytes > Self.maxWaiting {
            // The peer sends records only once it has left TLS itself, and then little before this end starts.
            self.ended = true
            context.fireErrorCaught(LinkRecordError.badLength(self.received!.readableBytes))
            context.close(promise: nil)
        }
    }

    /// The link's data path leaves NIO before ``start(context:)`` (a ``LinkLoop`` takes the socket): the bytes
    /// that waited (the peer's first records), and from now on nothing is opened, sealed or sent here (no
    /// close_notify when NIO closes its descriptor).
    public func handOff() -> [UInt8] {
        precondition(!self.started, "hand-off after start")
        self.ended = true
        self.sentCloseNotify = true
        let bytes = self.received.map { Array($0.readableBytesView) } ?? []
        self.received = nil
        return bytes
    }

    /// Bytes that may wait for ``start(context:)``.
    static let maxWaiting = 1 << 20

    public func channelReadComplete(context: ChannelHandlerContext) {
        guard self.started else { return }
        context.fireChannelReadComplete()
    }

    private func openReceived(_ context: ChannelHandlerContext) {
        guard var bytes = self.received, !self.ended else { return }
        self.received = nil
        var out = self.plainBuffer(context, capacity: bytes.readableBytes)
        var outcome: Result<Bool, LinkRecordError>
        if var partial = self.partial {
            // Complete the record that the last read left cut, with as few of the new bytes as it needs: the
            // rest is opened where it lies, not copied.
            self.partial = nil
            outcome = Result { () throws(LinkRecordError) -> Bool in
                while true {
                    // Up to the header, then up to the record's end.
                    let want = try partial.withUnsafeReadableBytes { (head) throws(LinkRecordError) -> Int in
                        try (LinkRecordCipher.expectedLength(in: head) ?? LinkRecordCipher.headerLength) - head.count
                    }
                    guard want > 0 else { break }
                    let n = min(want, bytes.readableBytes)
                    var piece = bytes.readSlice(length: n)!
                    partial.writeBuffer(&piece)
                    if n < want { return false }
                }
                return try self.openRecords(&partial, into: &out)
            }
            if case .success(false) = outcome, partial.readableBytes > 0 {
                self.partial = partial  // still cut: the new bytes are all in it
            }
        } else {
            outcome = .success(false)
        }
        if case .success(false) = outcome, self.partial == nil {
            outcome = Result { () throws(LinkRecordError) -> Bool in try self.openRecords(&bytes, into: &out) }
            if case .success(false) = outcome, bytes.readableBytes > 0 { self.partial = bytes }
        }
        if !self.keepsKeys { self.receiver.releaseKey() }
        if out.readableBytes > 0 { context.fireChannelRead(self.wrapInboundOut(out)) }
        if self.keepsReadBuffer, out.capacity <= Self.keptPlainCapacity { self.plain = out }
        switch outcome {
        case .failure(let error):
            self.ended = true
            context.fireErrorCaught(error)
            context.close(promise: nil)
        case .success(let closeNotify):
            if closeNotify {
                self.ended = true
                context.fireChannelReadComplete()
                context.close(promise: nil)
            }
        }
    }

    /// The buffer the plaintext of one read goes into: the last one again when the multiplexer no longer holds
    /// any of it (no allocation per read), else a new one.
    private func plainBuffer(_ context: ChannelHandlerContext, capacity: Int) -> ByteBuffer {
        guard var plain = self.plain else {
            return context.channel.allocator.buffer(capacity: self.keepsReadBuffer ? max(capacity, 16_384) : capacity)
        }
        self.plain = nil
        plain.clear(minimumCapacity: capacity)
        return plain
    }

    /// Largest plaintext buffer kept between reads.
    static let keptPlainCapacity = 256 * 1024

    /// Opens the whole records at the front of `bytes` into `out`, consuming them; true when one was the peer's
    /// close_notify (nothing after it is read).
    private func openRecords(_ bytes: inout ByteBuffer, into out: inout ByteBuffer) throws(LinkRecordError) -> Bool {
        let result: (Bool, LinkRecordError?) = bytes.readWithUnsafeReadableBytes { all in
            var at = 0
            do throws(LinkRecordError) {
                var mark = out.writerIndex
                while let (length, type) = try self.receiver.openFirst(
                    UnsafeRawBufferPointer(rebasing: all[at...]),
                    into: &out
                ) {
                    at += length
                    switch type {
                    case LinkRecordCipher.ContentType.applicationData.rawValue:
                        mark = out.writerIndex
                    case LinkRecordCipher.ContentType.alert.rawValue:
                        let alert = out.getBytes(at: mark, length: out.writerIndex - mark) ?? []
                        out.moveWriterIndex(to: mark)
                        guard alert.count == 2 else { throw .alert(level: alert.first ?? 0, description: 0xFF) }
                        guard alert[1] == 0 else { throw .alert(level: alert[0], description: alert[1]) }
                        return (at, (true, nil))
                    default:
                        out.moveWriterIndex(to: mark)  // nothing of it reaches the mux
                        throw .unexpectedContentType(type)
                    }
                }
                return (at, (false, nil))
            } catch {
                return (at, (false, error))
            }
        }
        if let error = result.1 { throw error }
        return result.0
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        guard !self.sentCloseNotify else {
            promise?.fail(ChannelError.outputClosed)
            return
        }
        self.staged.append((self.unwrapOutboundIn(data), promise))
    }

    public func flush(context: ChannelHandlerContext) {
        guard !self.staged.isEmpty else {
            context.flush()
            return
        }
        var total = 0
        for (b, _) in self.staged { total += b.readableBytes }
        let overhead = LinkRecordCipher.headerLength + 1 + LinkRecordCipher.tagLength
        var out = context.channel.allocator.buffer(
            capacity: total + overhead * (self.staged.count + total / LinkRecordCipher.maxContent)
        )
        var promise: EventLoopPromise<Void>?
        for (bytes, p) in self.staged {
            self.sender.seal(bytes, into: &out)
            if let p {
                if let all = promise { all.futureResult.cascade(to: p) } else { promise = p }
            }
        }
        self.staged.removeAll(keepingCapacity: self.keepsReadBuffer)
        if !self.keepsKeys { self.sender.releaseKey() }
        context.writeAndFlush(self.wrapOutboundOut(out), promise: promise)
    }

    public func close(context: ChannelHandlerContext, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        if mode != .input, !self.sentCloseNotify, context.channel.isActive {
            self.sentCloseNotify = true
            self.flush(context: context)
            var out = context.channel.allocator.buffer(capacity: 32)
            var alert: (UInt8, UInt8) = (1, 0)  // warning, close_notify
            withUnsafeBytes(of: &alert) { self.sender.seal($0, type: .alert, into: &out) }
            context.writeAndFlush(self.wrapOutboundOut(out), promise: nil)
        }
        self.failStaged(ChannelError.ioOnClosedChannel)
        context.close(mode: mode, promise: promise)
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        self.failStaged(ChannelError.ioOnClosedChannel)
    }

    private func failStaged(_ error: any Error) {
        let staged = self.staged
        self.staged.removeAll()
        for (_, p) in staged { p?.fail(error) }
    }
}
