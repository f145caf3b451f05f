import NIOCore
import NIOHTTP1

/// The last handler of an upstream connection: sends requests (serialised heads, framed bodies), hands
/// response parts to the client connection that owns the exchange, and holds reading while that client cannot
/// take more.
final class UpstreamHTTPHandler: ChannelInboundHandler, RemovableChannelHandler, HTTPPartReceiver {
    /// (Parts come from the decoder by direct call, `receive(_:)`; bytes only after an upgrade, for the glue.)
    /// Inbound only, as `HTTPProxyHandler`: reading is held back by turning autoRead off.
    typealias InboundIn = ByteBuffer

    /// The response decoder in front of this handler.
    let decoder: HTTPDecodingHandler
    /// Request bytes not written yet (a head and what follows it in the same burst go out as one).
    private var out = HTTPOutbox()

    /// The client-side handler whose request this connection carries; nil while idle in the pool.
    var owner: HTTPProxyHandler? {
        didSet { if self.readingPaused { self.updateReading() } }
    }
    weak var connection: UpstreamConnection?
    var pool: LoopPool?
    private var context: ChannelHandlerContext?
    /// autoRead is off: the response is not read while its client cannot take more.
    private var readingPaused = false
    private(set) var lastError: (any Error)?

    init(decoder: HTTPDecodingHandler) {
        self.decoder = decoder
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    /// A serialised request head for a request with `method` (the decoder expects its response).
    func sendHead(_ bytes: ByteBuffer, method: HTTPMethod) {
        guard let context = self.context else { return }
        self.decoder.expectResponse(to: method)
        self.out.queue(bytes, context: context)
    }

    func sendBody(_ bytes: ByteBuffer, chunked: Bool) {
        guard let context = self.context else { return }
        if chunked {
            self.out.queueChunk(bytes, context: context)
        } else {
            self.out.queue(bytes, context: context)
        }
    }

    func sendEnd(trailers: ByteBuffer?, chunked: Bool) {
        guard chunked, let context = self.context else { return }
        self.out.queueLastChunk(trailers: trailers, context: context)
    }

    /// Writes what was sent and flushes.
    func flush() {
        guard let context = self.context else { return }
        self.out.flush(context: context)
    }

    var isWritable: Bool { self.context?.channel.isWritable ?? false }

    func resumeRead() {
        self.updateReading()
    }

    /// Turns autoRead off while the owner's client cannot take more, on otherwise (see `HTTPProxyHandler`).
    private func updateReading() {
        let pause = self.owner.map { !$0.clientIsWritable } ?? false
        guard pause != self.readingPaused, let context = self.context else { return }
        self.readingPaused = pause
        try? context.channel.syncOptions?.setOption(.autoRead, value: !pause)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.fireChannelRead(data)
    }

    /// A part of a response, from the decoder.
    func receive(_ part: HTTPPart) {
        guard let owner = self.owner, let connection = self.connection else {
            // A response nobody asked for (or after the exchange ended): the connection is unusable.
            self.context?.close(promise: nil)
            return
        }
        owner.upstreamRead(part, from: connection)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        self.readComplete()
        context.fireChannelReadComplete()
    }

    /// The end of an upstream read burst (from the decoder).
    func readComplete() {
        self.owner?.upstreamReadComplete()
        self.updateReading()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let connection = self.connection {
            self.pool?.closed(connection)
            self.pool = nil
            if let owner = self.owner {
                self.owner = nil
                owner.upstreamClosed(connection, error: self.lastError)
            }
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.lastError = error
        context.close(promise: nil)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { self.owner?.upstreamBecameWritable() }
        context.fireChannelWritabilityChanged()
    }

}
