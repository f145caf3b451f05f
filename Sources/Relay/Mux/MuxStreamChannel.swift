import MeshWire
import NIOCore
import Synchronization

/// One stream of a mux session, as a NIO `Channel` (a child of the session's channel, as NIOHTTP2's
/// stream channels are): a pipeline of its own, `ByteBuffer`s in and out, back-pressure both ways.
///
/// - Reading: bytes are delivered when the pipeline asks (`read()`, or `autoRead`). Delivered bytes are
///   handed back to the peer as window; bytes not read stay here and keep the peer's window shut, so a slow
///   reader stalls only its own stream. At most the receive window is ever buffered.
/// - Writing: writes are queued and sent as the peer's window and the session's channel allow; the stream
///   is unwritable while more than the high water mark is queued.
/// - `close(mode: .output)` sends FIN after the queued bytes. The peer's FIN is `ChannelEvent.inputClosed`
///   with `allowRemoteHalfClosure`, otherwise it closes the stream. Once both sides have sent FIN the
///   stream closes itself. `close()` before the peer's FIN resets the stream (RST: like an HTTP/2 stream);
///   after it, it sends FIN behind the queued bytes.
/// - A reset by the peer or the end of the session fails the stream with a ``MuxError`` and closes it.
///
/// Every method but the thread-safe `Channel` properties must run on the session's event loop.
final class MuxStreamChannel: Channel, ChannelCore, @unchecked Sendable {
    // @unchecked Sendable: every mutable field is touched only on `eventLoop` (asserted); the two that
    // other threads read (`isActive`, `isWritable`) are atomics.
    let streamID: UInt32
    let eventLoop: any EventLoop
    let allocator: ByteBufferAllocator
    private let session: MuxSessionHandler
    private let parentChannel: any Channel
    private var _pipeline: ChannelPipeline!
    private let closePromise: EventLoopPromise<Void>
    private let activeFlag = Atomic<Bool>(false)
    private let writableFlag = Atomic<Bool>(true)

    // Options.
    private var autoRead = true
    private var allowRemoteHalfClosure = false
    private var waterMark: ChannelOptions.Types.WriteBufferWaterMark

    // Inbound.
    private var inbound = CircularBuffer<ByteBuffer>()
    private var readPending = false
    private var delivering = false
    /// The peer's FIN arrived (and is delivered once `inbound` is empty).
    private(set) var peerFinished = false
    private var peerFinDelivered = false

    // Outbound.
    private var unflushed = CircularBuffer<(ByteBuffer, EventLoopPromise<Void>?)>()
    var flushed = CircularBuffer<(ByteBuffer, EventLoopPromise<Void>?)>()
    /// Bytes queued (unflushed and flushed) not yet handed to the session's channel.
    private(set) var queuedBytes = 0
    /// `close(mode: .output)` (or a graceful close) asked for FIN after the queued bytes.
    var finRequested = false
    var finSent = false
    /// The channel is closed for its user (the session may still drain its flushed bytes and FIN).
    private(set) var isOpen = true

    // Flow control (bytes of Data): what the peer may still send, what we may still send.
    var receiveWindow: UInt32
    var consumedSinceUpdate: UInt32 = 0
    var sendWindow: UInt32

    init(
        streamID: UInt32,
        session: MuxSessionHandler,
        parent: any Channel,
        receiveWindow: UInt32,
        sendWindow: UInt32,
        waterMark: ChannelOptions.Types.WriteBufferWaterMark
    ) {
        self.streamID = streamID
        self.session = session
        self.parentChannel = parent
        self.eventLoop = parent.eventLoop
        self.allocator = parent.allocator
        self.closePromise = parent.eventLoop.makePromise()
        self.receiveWindow = receiveWindow
        self.sendWindow = sendWindow
        self.waterMark = waterMark
        self._pipeline = ChannelPipeline(channel: self)
    }

    // MARK: Channel

    var pipeline: ChannelPipeline { self._pipeline }
    var closeFuture: EventLoopFuture<Void> { self.closePromise.futureResult }
    var localAddress: SocketAddress? { self.parentChannel.localAddress }
    var remoteAddress: SocketAddress? { self.parentChannel.remoteAddress }
    var parent: (any Channel)? { self.parentChannel }
    var isWritable: Bool { self.writableFlag.load(ordering: .relaxed) }
    var isActive: Bool { self.activeFlag.load(ordering: .relaxed) }
    var _channelCore: any ChannelCore { self }

    func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) -> EventLoopFuture<Void> {
        if self.eventLoop.inEventLoop {
            return self.eventLoop.makeCompletedFuture { try self.setOption0(option, value: value) }
        }
        return self.eventLoop.submit { try self.setOption0(option, value: value) }
    }

    func getOption<Option: ChannelOption>(_ option: Option) -> EventLoopFuture<Option.Value> {
        if self.eventLoop.inEventLoop {
            return self.eventLoop.makeCompletedFuture { try self.getOption0(option) }
        }
        return self.eventLoop.submit { try self.getOption0(option) }
    }

    var syncOptions: (any NIOSynchronousChannelOptions)? { SynchronousOptions(channel: self) }

    private struct SynchronousOptions: NIOSynchronousChannelOptions {
        let channel: MuxStreamChannel

        func setOption<Option: ChannelOption>(_ option: Option, value: Option.Value) throws {
            try self.channel.setOption0(option, value: value)
        }

        func getOption<Option: ChannelOption>(_ option: Option) throws -> Option.Value {
            try self.channel.getOption0(option)
        }
    }

    private func setOption0<Option: ChannelOption>(_ option: Option, value: Option.Value) throws {
        self.eventLoop.preconditionInEventLoop()
        switch option {
        case _ as ChannelOptions.Types.AutoReadOption:
            let on = value as! Bool
            let was = self.autoRead
            self.autoRead = on
            if on && !was { self.pipeline.syncOperations.read() }
        case _ as ChannelOptions.Types.AllowRemoteHalfClosureOption:
            self.allowRemoteHalfClosure = value as! Bool
        case _ as ChannelOptions.Types.WriteBufferWaterMarkOption:
            self.waterMark = value as! ChannelOptions.Types.WriteBufferWaterMark
            self.updateWritability()
        default:
            throw ChannelError.operationUnsupported
        }
    }

    private func getOption0<Option: ChannelOption>(_ option: Option) throws -> Option.Value {
        self.eventLoop.preconditionInEventLoop()
        switch option {
        case _ as ChannelOptions.Types.AutoReadOption: return self.autoRead as! Option.Value
        case _ as ChannelOptions.Types.AllowRemoteHalfClosureOption: return self.allowRemoteHalfClosure as! Option.Value
        case _ as ChannelOptions.Types.WriteBufferWaterMarkOption: return self.waterMark as! Option.Value
        default: throw ChannelError.operationUnsupported
        }
    }

    // MARK: Life cycle, driven by the session

    /// Registers and activates the stream after its initializer ran; reads if `autoRead`.
    func activate() {
        guard self.isOpen else { return }
        self.activeFlag.store(true, ordering: .relaxed)
        self.pipeline.syncOperations.fireChannelRegistered()
        self.pipeline.syncOperations.fireChannelActive()
        if self.autoRead { self.pipeline.syncOperations.read() }
        self.deliver()
    }

    /// Data from the peer (the session has charged it to the window).
    func receive(_ bytes: ByteBuffer, fin: Bool) {
        guard self.isOpen else { return }
        if bytes.readableBytes > 0 { self.inbound.append(bytes) }
        if fin { self.peerFinished = true }
        self.deliver()
    }

    /// The peer reset the stream, or the session ended: fail and close.
    func fail(_ error: MuxError) {
        guard self.isOpen else {
            self.failFlushed(error)  // closed by its user and still draining: those bytes will not go
            return
        }
        if self.isActive { self.pipeline.syncOperations.fireErrorCaught(error) }
        self.closeForUser(error: error)
    }

    private var canDeliver: Bool { self.isActive && !self.delivering }

    private func deliver() {
        guard self.canDeliver else { return }
        self.delivering = true
        defer { self.delivering = false }
        while self.readPending && self.isOpen && !self.inbound.isEmpty {
            self.readPending = false
            var n = 0
            while let chunk = self.inbound.popFirst() {
                n += chunk.readableBytes
                self.pipeline.syncOperations.fireChannelRead(NIOAny(chunk))
                guard self.isOpen else { return }
            }
            self.session.consumed(self, bytes: n)
            self.pipeline.syncOperations.fireChannelReadComplete()
            if self.autoRead && self.isOpen { self.pipeline.syncOperations.read() }
        }
        if self.peerFinished && !self.peerFinDelivered && self.inbound.isEmpty && self.isOpen {
            self.peerFinDelivered = true
            if self.allowRemoteHalfClosure {
                self.pipeline.syncOperations.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
                self.closeIfBothFinished()
            } else {
                self.close0(error: ChannelError.eof, mode: .all, promise: nil)
            }
        }
    }

    /// Both sides sent FIN and the peer's was delivered: the stream is done.
    func closeIfBothFinished() {
        guard self.isOpen, self.finSent, self.peerFinDelivered else { return }
        self.closeForUser(error: nil)
        self.session.streamFinished(self)
    }

    // MARK: Writability

    func dequeued(_ n: Int) {
        self.queuedBytes -= n
        self.updateWritability()
    }

    private func updateWritability() {
        let was = self.writableFlag.load(ordering: .relaxed)
        let now = was ? self.queuedBytes <= self.waterMark.high : self.queuedBytes < self.waterMark.low
        guard now != was else { return }
        self.writableFlag.store(now, ordering: .relaxed)
        if self.isActive { self.pipeline.syncOperations.fireChannelWritabilityChanged() }
    }

    // MARK: ChannelCore

    func localAddress0() throws -> SocketAddress {
        guard let a = self.parentChannel.localAddress else { throw ChannelError.operationUnsupported }
        return a
    }

    func remoteAddress0() throws -> SocketAddress {
        guard let a = self.parentChannel.remoteAddress else { throw ChannelError.operationUnsupported }
        return a
    }

    func register0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }
    func registerAlreadyConfigured0(promise: EventLoopPromise<Void>?) { promise?.succeed(()) }
    func bind0(to: SocketAddress, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }
    func connect0(to: SocketAddress, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }

    func write0(_ data: NIOAny, promise: EventLoopPromise<Void>?) {
        self.eventLoop.preconditionInEventLoop()
        guard self.isOpen else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        guard !self.finRequested else {
            promise?.fail(ChannelError.outputClosed)
            return
        }
        guard let bytes = self.tryUnwrapData(data, as: ByteBuffer.self) else {
            promise?.fail(ChannelError.operationUnsupported)
            return
        }
        self.unflushed.append((bytes, promise))
        self.queuedBytes += bytes.readableBytes
        self.updateWritability()
    }

    func flush0() {
        self.eventLoop.preconditionInEventLoop()
        guard self.isOpen, !self.unflushed.isEmpty else { return }
        while let w = self.unflushed.popFirst() { self.flushed.append(w) }
        self.session.pump(self)
    }

    func read0() {
        self.eventLoop.preconditionInEventLoop()
        guard self.isOpen else { return }
        self.readPending = true
        self.deliver()
    }

    func close0(error: any Error, mode: CloseMode, promise: EventLoopPromise<Void>?) {
        self.eventLoop.preconditionInEventLoop()
        guard self.isOpen else {
            promise?.fail(ChannelError.alreadyClosed)
            return
        }
        switch mode {
        case .input:
            promise?.fail(ChannelError.operationUnsupported)
        case .output:
            if !self.finRequested {
                self.finRequested = true
                self.failUnflushed(ChannelError.outputClosed)
                if self.isActive {
                    self.pipeline.syncOperations.fireUserInboundEventTriggered(ChannelEvent.outputClosed)
                }
                self.session.pump(self)
            }
            promise?.succeed(())
        case .all:
            self.failUnflushed(ChannelError.ioOnClosedChannel)
            if self.peerFinished {
                // The peer is done sending: end our side gracefully behind the flushed bytes.
                self.finRequested = true
                self.closeForUser(error: nil)
                self.session.pump(self)
            } else {
                self.failFlushed(ChannelError.ioOnClosedChannel)
                self.closeForUser(error: nil)
                self.session.resetByUser(self)
            }
            promise?.succeed(())
        }
    }

    func triggerUserOutboundEvent0(_ event: Any, promise: EventLoopPromise<Void>?) {
        promise?.fail(ChannelError.operationUnsupported)
    }

    func channelRead0(_ data: NIOAny) {
        // Reads no handler consumed: dropped.
    }

    func errorCaught0(error: any Error) {
        // Errors no handler consumed: the stream has already acted on them.
    }

    // MARK: Closing

    private func failUnflushed(_ error: any Error) {
        while let (b, p) = self.unflushed.popFirst() {
            self.queuedBytes -= b.readableBytes
            p?.fail(error)
        }
    }

    func failFlushed(_ error: any Error) {
        while let (b, p) = self.flushed.popFirst() {
            self.queuedBytes -= b.readableBytes
            p?.fail(error)
        }
    }

    /// Closes the channel for its user: inactive, handlers removed, `closeFuture` done. Flushed bytes stay
    /// with the session unless the caller failed them.
    private func closeForUser(error: (any Error)?) {
        guard self.isOpen else { return }
        self.isOpen = false
        self.inbound.removeAll()
        self.failUnflushed(error ?? ChannelError.ioOnClosedChannel)
        if error != nil { self.failFlushed(error!) }
        let wasActive = self.activeFlag.exchange(false, ordering: .relaxed)
        if wasActive {
            self.pipeline.syncOperations.fireChannelInactive()
            self.pipeline.syncOperations.fireChannelUnregistered()
        }
        let loopBound = NIOLoopBound(self, eventLoop: self.eventLoop)
        self.eventLoop.execute {
            let s = loopBound.value
            s.removeHandlers(pipeline: s.pipeline)
            s.closePromise.succeed(())
        }
    }
}
