import NIOCore
import NIOHTTP1

/// What an `HTTPDecodingHandler` hands its parts to: the handler right behind it, called directly (no
/// pipeline traversal, no boxing of the part in `NIOAny`, no dynamic cast per part).
protocol HTTPPartReceiver: AnyObject {
    func receive(_ part: HTTPPart)
    /// The end of a read burst (`channelReadComplete`, not passed on down the pipeline while HTTP is spoken).
    func readComplete()
}

/// Runs our HTTP/1.1 parser (`HTTPParser`) over a connection's bytes and hands the message parts it produces
/// to the receiver behind it. A response decoder must know the method of the request each response answers
/// (HEAD responses have no body): the proxy tells it with `expectResponse(to:)` when it sends a request.
///
/// A response decoder takes exactly one response per request: it parses nothing behind the end of a final
/// response until the next `expectResponse(to:)`, and bytes that come when no response is expected are an
/// error (`unexpectedData`: the connection is closed, never handed to another client). At the end of a
/// response it notes whether the bytes read so far ended exactly there (`endedAtBoundary`): only then may the
/// connection carry another request.
///
/// Bytes the parser has not consumed yet (a head split over reads) are kept for the next read; the end of
/// input (half-close, close) is given to the parser, after the read in progress if it arrives during one; an
/// error is passed on (`fireErrorCaught`) once and the bytes after it dropped; removal (after an upgrade)
/// waits for the current read, then hands the bytes the parser left to the next handler.
final class HTTPDecodingHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private enum State {
        case active
        /// EOF or removal processed, or an error passed on: later bytes are dropped.
        case done
    }

    private var parser: HTTPParser
    /// Set by the handler behind this one when it is added; cleared on removal (it holds this handler too).
    var receiver: (any HTTPPartReceiver)?
    private var state = State.active
    /// Bytes not consumed by the parser yet, or that arrived while it was busy.
    private var held: ByteBuffer?
    private var decoding = false
    private var eofPending = false
    private var removing = false
    /// A response decoder: the parser's kind, kept here (read per part).
    private let decodesResponses: Bool
    /// The last final response ended exactly at the end of the bytes read, with the parser not paused.
    var endedAtBoundary: Bool { self.parser.endedAtBoundary }

    /// A request decoder (the client side).
    init(requestLimits: HTTPParser.Limits) {
        self.parser = HTTPParser(kind: .request, limits: requestLimits)
        self.decodesResponses = false
    }

    /// A response decoder (the upstream side).
    init() {
        self.parser = HTTPParser(kind: .response)
        self.decodesResponses = true
    }

    /// Parts come from a read of the connection (its `channelReadComplete` follows), not from its end.
    var isDecodingRead: Bool { self.decoding }

    /// The response decoder: a request with `method` was sent, its response comes next.
    func expectResponse(to method: HTTPMethod) {
        self.parser.expectResponse(to: method)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.state = .done
        self.held = nil
        self.receiver = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .active = self.state else { return }
        var buffer = Self.unwrapInboundIn(data)
        if var held = self.held.take() {
            held.writeBuffer(&buffer)
            buffer = held
        }
        guard !self.decoding, !self.removing, !self.parser.isPaused else {
            // Re-entered, on the way out, or after an upgrade: kept for later.
            self.held = buffer
            return
        }
        self.decoding = true
        while true {
            do {
                try self.parse(&buffer)
            } catch {
                self.decoding = false
                self.fail(error, context: context)
                return
            }
            // More bytes that came in meanwhile (re-entrantly) go after what is left of these.
            guard case .active = self.state, !self.removing, !self.parser.isPaused, var more = self.held.take()
            else { break }
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

    func channelReadComplete(context: ChannelHandlerContext) {
        if case .active = self.state, !self.removing, let receiver = self.receiver {
            // (One call instead of two pipeline hops per read: to the receiver, and from it to the tail.)
            receiver.readComplete()
        } else {
            context.fireChannelReadComplete()
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

    /// Hands the parts in `buffer` to the receiver, one at a time (the parser is not being accessed while the
    /// receiver runs: it may tell it what response to expect next).
    @inline(__always)
    private func parse(_ buffer: inout ByteBuffer) throws {
        guard self.decodesResponses else {
            while let receiver = self.receiver, let part = try self.parser.next(&buffer) {
                receiver.receive(part)
            }
            return
        }
        while let receiver = self.receiver,
            let part = try self.parser.nextResponsePart(&buffer, held: self.held?.readableBytes ?? 0)
        {
            receiver.receive(part)
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

    /// The last call: what is held is parsed, then the end of input (`seenEOF`), or the bytes left (after an
    /// upgrade) go to the next handler (removal).
    private func decodeLast(context: ChannelHandlerContext, seenEOF: Bool) {
        guard case .active = self.state else { return }
        self.state = .done
        var buffer = self.held.take() ?? context.channel.allocator.buffer(capacity: 0)
        do {
            if seenEOF {
                try self.parse(&buffer)
                try self.parser.finish(&buffer)
                try self.parse(&buffer)
            } else {
                if !self.parser.isPaused { try self.parse(&buffer) }
                if buffer.readableBytes > 0 { context.fireChannelRead(NIOAny(buffer)) }
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
