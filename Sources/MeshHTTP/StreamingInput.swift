import NIOCore
import NIOHTTP1

/// In a server connection's pipeline while a streamed answer (a watch) is written, in place of the HTTP
/// request decoder.
///
/// A streamed answer's head says `Connection: close` (``HTTPConnectionHandler``): the connection ends with
/// it, so the client sends no further request on it, and the decoder (NIO's parser state, and the header
/// array it keeps at 16 entries: about 1 KiB) would sit unused for the stream's life, which for an agent's
/// watch is the connection's life. This handler takes the decoder's place: bytes the client sends anyway
/// (a request it had pipelined before it saw the head) are dropped, up to `limit` in all, after which the
/// connection closes; the end of the client's input, errors and the connection's end pass on, so the
/// streamer still learns that its client left.
final class StreamingInputDrain: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer

    /// Bytes dropped at most before the connection is closed.
    static let limit = 64 * 1024

    private(set) var dropped = 0

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.dropped += Self.unwrapInboundIn(data).readableBytes
        if self.dropped > Self.limit { context.close(promise: nil) }
    }

    /// Puts a drain before the connection's request decoder and takes the decoder out; nothing if there is
    /// none (already taken out, or not an HTTP/1 server pipeline). Complete requests the decoder still held
    /// go up as usual on its way out; a partial one is dropped (its client sees the connection close).
    static func replaceDecoder(in pipeline: ChannelPipeline.SynchronousOperations) {
        guard let decoder = try? pipeline.context(handlerType: ByteToMessageHandler<HTTPRequestDecoder>.self) else {
            return
        }
        do {
            try pipeline.addHandler(StreamingInputDrain(), position: .before(decoder.handler))
        } catch {
            return
        }
        pipeline.removeHandler(context: decoder, promise: nil)
    }
}
