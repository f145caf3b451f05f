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
    private var received: ByteBuffer?
    private var staged: [(ByteBuffer, EventLoopPromise<Void>?)] = []

    /// Records sealed and opened so far (for tests and `/peers`).
    public var recordsSent: UInt64 { self.sender.records }
    public var recordsReceived: UInt64 { self.receiver.records }

    /// The handler of one end of a link: `dialer` says which direction's secret it sends with.
    public init(
        secrets: LinkRecordSecrets,
        dialer: Bool,
        recordsPerKey: UInt64 = LinkRecordCipher.defaultRecordsPerKey
    ) {
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
        if self.started { self.openReceived(context) }
    }

    public func channelReadComplete(context: ChannelHandlerContext) {
        guard self.started else { return }
        context.fireChannelReadComplete()
    }

    private func openReceived(_ context: ChannelHandlerContext) {
        guard var bytes = self.received, !self.ended else { return }
        self.received = nil
        var out: ByteBuffer?
        var closeNotify = false
        let outcome: Result<Void, LinkRecordError> = bytes.readWithUnsafeReadableBytes { all in
            var at = 0
            do throws(LinkRecordError) {
                while !closeNotify,
                    let length = try LinkRecordCipher.recordLength(in: UnsafeRawBufferPointer(rebasing: all[at...]))
                {
                    let record = UnsafeRawBufferPointer(rebasing: all[at..<(at + length)])
                    var plain = out ?? context.channel.allocator.buffer(capacity: all.count - at)
                    let mark = plain.writerIndex
                    let type = try self.receiver.open(record, into: &plain)
                    at += length
                    switch type {
                    case LinkRecordCipher.ContentType.applicationData.rawValue:
                        out = plain
                    case LinkRecordCipher.ContentType.alert.rawValue:
                        let alert = plain.getBytes(at: mark, length: plain.writerIndex - mark) ?? []
                        plain.moveWriterIndex(to: mark)
                        out = plain
                        guard alert.count == 2 else { throw .alert(level: alert.first ?? 0, description: 0xFF) }
                        guard alert[1] == 0 else { throw .alert(level: alert[0], description: alert[1]) }
                        closeNotify = true
                    default:
                        throw .unexpectedContentType(type)
                    }
                }
                return (at, .success(()))
            } catch {
                return (at, .failure(error))
            }
        }
        if let out, out.readableBytes > 0 { context.fireChannelRead(self.wrapInboundOut(out)) }
        switch outcome {
        case .failure(let error):
            self.ended = true
            context.fireErrorCaught(error)
            context.close(promise: nil)
        case .success:
            if closeNotify {
                self.ended = true
                context.fireChannelReadComplete()
                context.close(promise: nil)
            } else if bytes.readableBytes > 0 {
                self.received = bytes
            }
        }
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
        self.staged.removeAll(keepingCapacity: true)
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
