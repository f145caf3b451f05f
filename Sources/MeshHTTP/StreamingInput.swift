import NIOCore
import NIOHTTP1

/// In a server connection's pipeline while a streamed answer (a watch) is written, in place of the HTTP
/// request decoder.
///
/// While a stream is written, its client sends nothing more on the connection, or only a next request (which
/// a pushed body that keeps its connection answers by ending: ``HTTPConnectionHandler``). The decoder (NIO's
/// parser state, and the header array it keeps at 16 entries: about 1 KiB) would sit unused for the stream's
/// life, which for an agent's watch is most of the connection's life. This handler takes the decoder's place:
/// - for a stream that ends its connection (`Connection: close`), bytes the client sends anyway (a request
///   it had pipelined before it saw the head) are dropped;
/// - for a pushed body that keeps its connection, they are kept, `onInput` is called once (the body ends
///   early), and ``restoreDecoder(limits:)`` hands them to a fresh decoder once the answer is complete.
/// Either way at most `limit` bytes, after which the connection closes; the end of the client's input, errors
/// and the connection's end pass on, so the streamer still learns that its client left.
final class StreamingInputDrain: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    /// Bytes dropped or kept at most before the connection is closed.
    static let limit = 64 * 1024

    private(set) var dropped = 0
    /// Set for a pushed body that keeps its connection (``yields(onInput:)``): what the client sends is kept,
    /// and this is called when its first bytes come.
    private(set) var onInput: (() -> Void)?
    /// What the client sent while `onInput` was set, for the next decoder.
    private(set) var kept: ByteBuffer?
    private var context: ChannelHandlerContext?
    /// ``restoreDecoder(limits:)`` is under way.
    private var leaving = false

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
    func handlerRemoved(context: ChannelHandlerContext) { self.context = nil }

    /// The pushed body keeps its connection: the client's next bytes are kept and `onInput` is called. NIO's
    /// pipelining handler (above) holds reads back while an answer is under way, so this handler asks for them
    /// itself until the client sends something.
    func yields(onInput: @escaping () -> Void) {
        self.onInput = onInput
        self.context?.read()
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        // Nothing kept yet: read on, below the pipelining handler that holds reads back.
        if self.onInput != nil, self.kept == nil { context.read() }
        context.fireChannelReadComplete()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = Self.unwrapInboundIn(data)
        guard let onInput = self.onInput else {
            self.dropped += bytes.readableBytes
            if self.dropped > Self.limit { context.close(promise: nil) }
            return
        }
        guard (self.kept?.readableBytes ?? 0) + bytes.readableBytes <= Self.limit else {
            context.close(promise: nil)
            return
        }
        let first = self.kept == nil
        if self.kept == nil {
            self.kept = bytes
        } else {
            self.kept!.writeBuffer(&bytes)
        }
        if first { onInput() }
    }

    /// Puts a drain before the connection's request decoder and takes the decoder out; nil if there is none
    /// (already taken out, or not an HTTP/1 server pipeline). Complete requests the decoder still held go up
    /// as usual on its way out; a partial one is dropped (its client sees the connection close).
    @discardableResult
    static func replaceDecoder(in pipeline: ChannelPipeline.SynchronousOperations) -> StreamingInputDrain? {
        guard let decoder = try? pipeline.context(handlerType: ByteToMessageHandler<HTTPRequestDecoder>.self) else {
            return nil
        }
        let drain = StreamingInputDrain()
        do {
            try pipeline.addHandler(drain, position: .before(decoder.handler))
        } catch {
            return nil
        }
        pipeline.removeHandler(context: decoder, promise: nil)
        return drain
    }

    /// After an answer that keeps its connection: a fresh request decoder in this drain's place, fed what the
    /// client sent meanwhile (its next request). Nothing if the drain has left the pipeline already, or is leaving
    /// (a nested call: this is the answer to the request it is handing on).
    func restoreDecoder(limits: NIOHTTPDecoderLimitConfiguration) {
        guard let context = self.context, !self.leaving else { return }
        self.leaving = true
        let pipeline = context.pipeline.syncOperations
        let decoder = ByteToMessageHandler(
            HTTPRequestDecoder(leftOverBytesStrategy: .dropBytes, limitConfiguration: limits)
        )
        do {
            try pipeline.addHandler(decoder, position: .after(self))
        } catch {
            context.close(promise: nil)
            return
        }
        let kept = self.kept
        self.kept = nil
        self.onInput = nil
        // Through the drain's context while it is still there, so the bytes reach the new decoder; the next
        // request may be answered before this returns.
        if let kept {
            context.fireChannelRead(Self.wrapInboundOut(kept))
            context.fireChannelReadComplete()
        }
        pipeline.removeHandler(context: context, promise: nil)
    }
}
