import Logging
import MeshWire
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded

@testable import Relay

/// What a stream's user saw. Tests touch it on the stream's event loop or after the loop has run it.
/// @unchecked Sendable: a lock guards every field.
final class StreamLog: @unchecked Sendable {
    private let lock = NIOLock()
    private var _bytes = ByteBuffer()
    private var _events: [String] = []
    private var _errors: [any Error] = []

    var bytes: ByteBuffer { self.lock.withLock { self._bytes } }
    var events: [String] { self.lock.withLock { self._events } }
    var errors: [any Error] { self.lock.withLock { self._errors } }

    func append(_ b: ByteBuffer) { self.lock.withLock { _ = self._bytes.writeImmutableBuffer(b) } }
    func event(_ e: String) { self.lock.withLock { self._events.append(e) } }
    func error(_ e: any Error) { self.lock.withLock { self._errors.append(e) } }
}

/// Records what reaches a stream's pipeline.
final class RecordingHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let log: StreamLog
    init(_ log: StreamLog) { self.log = log }

    func channelActive(context: ChannelHandlerContext) {
        self.log.event("active")
        context.fireChannelActive()
    }
    func channelInactive(context: ChannelHandlerContext) {
        self.log.event("inactive")
        context.fireChannelInactive()
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.log.append(self.unwrapInboundIn(data))
    }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent {
            self.log.event(e == .inputClosed ? "inputClosed" : "outputClosed")
        }
        context.fireUserInboundEventTriggered(event)
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.log.error(error)
    }
}

/// Streams the peer opened, with their logs. @unchecked Sendable: a lock guards the arrays.
final class AcceptedStreams: @unchecked Sendable {
    private let lock = NIOLock()
    private var _channels: [any Channel] = []
    private var _logs: [StreamLog] = []
    let halfClosure: Bool
    let autoRead: Bool

    init(halfClosure: Bool = true, autoRead: Bool = true) {
        self.halfClosure = halfClosure
        self.autoRead = autoRead
    }

    var channels: [any Channel] { self.lock.withLock { self._channels } }
    var logs: [StreamLog] { self.lock.withLock { self._logs } }

    var initializer: MuxStreamInitializer {
        { channel in
            let log = StreamLog()
            self.lock.withLock {
                self._channels.append(channel)
                self._logs.append(log)
            }
            return channel.eventLoop.makeCompletedFuture {
                try channel.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: self.halfClosure)
                try channel.syncOptions!.setOption(ChannelOptions.autoRead, value: self.autoRead)
                try channel.pipeline.syncOperations.addHandler(RecordingHandler(log))
            }
        }
    }
}

extension ByteBuffer {
    init(hexString: String) {
        let digits = Array(hexString.filter { !$0.isWhitespace })
        self.init(
            bytes: stride(from: 0, to: digits.count, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
        )
    }
}

extension YamuxFrame {
    var bytes: ByteBuffer { try! self.encoded() }
}

extension EmbeddedChannel {
    /// Every frame the session wrote since the last call (header and payload writes joined).
    func outboundFrames() throws -> [YamuxFrame] {
        var all = ByteBuffer()
        while let b = try self.readOutbound(as: ByteBuffer.self) { all.writeImmutableBuffer(b) }
        var frames: [YamuxFrame] = []
        while let f = try YamuxFrame.decode(from: &all, maxPayload: 1 << 24) { frames.append(f) }
        precondition(all.readableBytes == 0, "a partial frame was written")
        return frames
    }

    func send(_ frames: YamuxFrame...) throws {
        for f in frames { try self.writeInbound(f.bytes) }
    }

    /// A session on a fresh active EmbeddedChannel.
    static func muxSession(
        _ role: MuxConfiguration.Role,
        maxStreams: Int = 1024,
        inbound: MuxStreamInitializer?
    ) throws -> (EmbeddedChannel, MuxSession) {
        let channel = EmbeddedChannel()
        var config = MuxConfiguration(role: role)
        config.maxStreams = maxStreams
        let session = try MuxSession.install(on: channel, configuration: config, inbound: inbound)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 7900)).wait()
        return (channel, session)
    }
}

func payload(_ n: Int, seed: UInt8 = 0) -> ByteBuffer {
    ByteBuffer(bytes: (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31) &+ seed })
}

/// An initializer that records into `log`.
func recording(_ log: StreamLog, halfClosure: Bool = true) -> MuxStreamInitializer {
    { channel in
        channel.eventLoop.makeCompletedFuture {
            try channel.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: halfClosure)
            try channel.pipeline.syncOperations.addHandler(RecordingHandler(log))
        }
    }
}

/// An initializer that adds nothing.
let bare: MuxStreamInitializer = { $0.eventLoop.makeSucceededVoidFuture() }

/// Whether a future has completed (its callbacks run at once on an EmbeddedEventLoop).
func isDone<T>(_ f: EventLoopFuture<T>) -> Bool {
    let done = NIOLockedValueBox(false)
    f.whenComplete { _ in done.withLockedValue { $0 = true } }
    return done.withLockedValue { $0 }
}
