import NIOCore
import Synchronization

/// Who tells a splice's end (`LinkManager.splice(...ended:)`, with the bytes read from the socket and
/// written to it): the channel that ended it, or the hand-over that failed before the splice was
/// in place. Exactly one of them claims it.
final class SpliceEnding: Sendable {
    private let claimed = Atomic<Bool>(false)
    let ended: @Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void

    init(_ ended: @escaping @Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void) {
        self.ended = ended
    }

    /// True for the first caller only.
    func claim() -> Bool {
        !self.claimed.exchange(true, ordering: .acquiringAndReleasing)
    }
}

/// Counts the bytes through a spliced socket's channel each way and tells the total when the channel closes.
final class SpliceTallyHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let ending: SpliceEnding
    private var fromSocket = 0
    private var toSocket = 0

    init(_ ending: SpliceEnding) {
        self.ending = ending
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.fromSocket &+= Self.unwrapInboundIn(data).readableBytes
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        self.toSocket &+= Self.unwrapOutboundIn(data).readableBytes
        context.write(data, promise: promise)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if self.ending.claim() { self.ending.ended(self.fromSocket, self.toSocket) }
        context.fireChannelInactive()
    }
}
