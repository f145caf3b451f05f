import NIOCore
import NIOHTTP1

/// Runs NIO's HTTP/1 decoder (llhttp) over a connection's bytes and passes the message parts it produces to the
/// next handler: what `ByteToMessageHandler` does for it, for this one decoder, without its generic machinery
/// (whose methods run unspecialised, with type metadata look-ups on every read) and without observing outbound
/// writes. A response decoder must know the method of the request each response answers (HEAD responses
/// have no body): the proxy tells it with `expectResponse(to:)` when it sends a request.
///
/// As `ByteToMessageHandler`: bytes the parser has not consumed yet (a head split over reads) are kept for the
/// next read; the end of input (half-close, close) is given to the decoder as EOF, after the read in progress
/// if it arrives during one; an error is passed on once and the bytes after it dropped; removal (after an
/// upgrade) waits for the current read, then hands the bytes the parser left to the next handler.
final class HTTPDecodingHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private enum Decoder {
        case request(HTTPRequestDecoder)
        case response(HTTPResponseDecoder)
    }

    private enum State {
        case active
        /// EOF or removal processed, or an error passed on: later bytes are dropped.
        case done
    }

    private let decoder: Decoder
    private var state = State.active
    /// Bytes not consumed by the parser yet, or that arrived while it was busy.
    private var held: ByteBuffer?
    private var decoding = false
    private var eofPending = false
    private var removing = false

    /// A request decoder (the client side).
    init(requestLimits: NIOHTTPDecoderLimitConfiguration) {
        self.decoder = .request(
            HTTPRequestDecoder(
                leftOverBytesStrategy: .forwardBytes,
                informationalResponseStrategy: .drop,
                limitConfiguration: requestLimits
            )
        )
    }

    /// A response decoder (the upstream side).
    init() {
        self.decoder = .response(
            HTTPResponseDecoder(leftOverBytesStrategy: .forwardBytes, informationalResponseStrategy: .forward)
        )
    }

    /// Parts come from a read of the connection (its `channelReadComplete` follows), not from its end.
    var isDecodingRead: Bool { self.decoding }

    /// The response decoder: a request with `head`'s method was sent, its response comes next in order.
    func expectResponse(to head: HTTPRequestHead) {
        guard case .response(let decoder) = self.decoder else { return }
        decoder.write(data: .head(head))
    }

    func handlerAdded(context: ChannelHandlerContext) {
        switch self.decoder {
        case .request(let decoder): decoder.decoderAdded(context: context)
        case .response(let decoder): decoder.decoderAdded(context: context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.state = .done
        self.held = nil
        switch self.decoder {
        case .request(let decoder): decoder.decoderRemoved(context: context)
        case .response(let decoder): decoder.decoderRemoved(context: context)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .active = self.state else { return }
        var buffer = Self.unwrapInboundIn(data)
        if var held = self.held.take() {
            held.writeBuffer(&buffer)
            buffer = held
        }
        guard !self.decoding, !self.removing else {
            // Re-entered, or on the way out: kept for later.
            self.held = buffer
            return
        }
        self.decoding = true
        while true {
            do {
                try self.decode(context: context, buffer: &buffer)
            } catch {
                self.decoding = false
                self.fail(error, context: context)
                return
            }
            // More bytes that came in meanwhile (re-entrantly) go after what is left of these.
            guard case .active = self.state, !self.removing, var more = self.held.take() else { break }
            buffer.writeBuffer(&more)
        }
        self.decoding = false
        if buffer.readableBytes > 0, case .active = self.state {
            if var more = self.held.take() { buffer.writeBuffer(&more) }
            self.held = buffer
        }
        if self.eofPending {
            self.eofPending = false
            self.decodeLast(context: context, seenEOF: true)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.endOfInput(context: context)
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            self.endOfInput(context: context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func removeHandler(context: ChannelHandlerContext, removalToken: ChannelHandlerContext.RemovalToken) {
        precondition(!self.removing)
        self.removing = true
        // After the read in progress (the removal comes from a part it produced): the bytes behind the last
        // message (an upgraded protocol's) go to the next handler, then this one leaves.
        context.eventLoop.assumeIsolated().execute {
            self.decodeLast(context: context, seenEOF: false)
            context.leavePipeline(removalToken: removalToken)
        }
    }

    // MARK: decoding

    private func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws {
        switch self.decoder {
        case .request(let decoder): _ = try decoder.decode(context: context, buffer: &buffer)
        case .response(let decoder): _ = try decoder.decode(context: context, buffer: &buffer)
        }
    }

    private func endOfInput(context: ChannelHandlerContext) {
        guard case .active = self.state else { return }
        if self.decoding {
            self.eofPending = true
        } else {
            self.decodeLast(context: context, seenEOF: true)
        }
    }

    /// The decoder's last call: what is held, then EOF (`seenEOF`) or the leftover bytes passed on (removal).
    private func decodeLast(context: ChannelHandlerContext, seenEOF: Bool) {
        guard case .active = self.state else { return }
        self.state = .done
        var buffer = self.held.take() ?? context.channel.allocator.buffer(capacity: 0)
        do {
            switch self.decoder {
            case .request(let decoder): _ = try decoder.decodeLast(context: context, buffer: &buffer, seenEOF: seenEOF)
            case .response(let decoder):
                _ = try decoder.decodeLast(context: context, buffer: &buffer, seenEOF: seenEOF)
            }
        } catch {
            context.fireErrorCaught(error)
        }
    }

    private func fail(_ error: any Error, context: ChannelHandlerContext) {
        self.state = .done
        self.held = nil
        context.fireErrorCaught(error)
    }
}
