import Logging
import MeshNIO
import NIOCore
import NIOHTTP1
import Synchronization

/// What a pushed body has ready now (see ``HTTPEventSource``).
public enum HTTPPushed: Sendable {
    /// A chunk to write.
    case data(ByteBuffer)
    /// Nothing yet: the source calls its `wake` when there is.
    case nothing
    /// The body is complete.
    case end
}

/// A response body that its source pushes as data comes (a watch). The server writes it from the
/// connection's event loop, so no task waits beside an idle stream: it costs its connection and its queue.
public protocol HTTPEventSource: Sendable {
    /// Called once, on the connection's event loop, after the head is written. `wake` may then be called from
    /// any thread whenever ``take()`` may have something new.
    func start(eventLoop: any EventLoop, wake: @escaping @Sendable () -> Void)
    /// What is ready now. Called on the connection's event loop, after `start`, one call at a time; after a
    /// chunk, not again until the client's connection has taken it (back-pressure).
    func take() -> HTTPPushed
    /// The client went away, sent its next request on a kept-alive connection, or the server is shutting down:
    /// ``take()`` returns `.end` soon. May be called more than once, and after the end.
    func stop()
}

/// Requests being answered: tasks of the server's task group, started from connections' event loops.
final class ServerJobs: Sendable {
    typealias Job = @Sendable () async -> Void
    let jobs: AsyncStream<Job>
    private let continuation: AsyncStream<Job>.Continuation
    private let running = Atomic<Int>(0)

    init() {
        (self.jobs, self.continuation) = AsyncStream.makeStream()
    }

    /// Jobs spawned and not finished.
    var count: Int { self.running.load(ordering: .relaxed) }

    func spawn(_ job: @escaping Job) {
        self.running.add(1, ordering: .relaxed)
        let job: Job = {
            await job()
            self.running.subtract(1, ordering: .relaxed)
        }
        if case .terminated = self.continuation.yield(job) {
            // The server's group has ended (its connections were closed): the job only finds its connection
            // closed, but it must still end.
            Task { await job() }
        }
    }

    func finish() { self.continuation.finish() }
}

/// Pushed bodies woken from other threads, per event loop. A change that reaches 10,000 watches wakes each
/// loop once, and the loop pumps every woken body in one go, instead of one `execute` (a task, a lock of
/// the loop's queue) per watch.
final class PushWakeups: Sendable {
    private let loops = Mutex<[ObjectIdentifier: LoopWakeups]>([:])

    /// The wakeups of `eventLoop` (one per loop the server's connections run on).
    func of(_ eventLoop: any EventLoop) -> LoopWakeups {
        self.loops.withLock { loops in
            if let w = loops[ObjectIdentifier(eventLoop)] { return w }
            let w = LoopWakeups(eventLoop)
            loops[ObjectIdentifier(eventLoop)] = w
            return w
        }
    }
}

/// One event loop's woken pushed bodies (``PushWakeups``).
final class LoopWakeups: Sendable {
    let eventLoop: any EventLoop
    private let woken = Mutex<[NIOLoopBound<HTTPConnectionHandler>]>([])

    init(_ eventLoop: any EventLoop) { self.eventLoop = eventLoop }

    /// From any thread: `handler` pumps soon, on its loop. Only the first wake since the loop last pumped
    /// schedules a task.
    func wake(_ handler: NIOLoopBound<HTTPConnectionHandler>) {
        let first = self.woken.withLock { woken in
            woken.append(handler)
            return woken.count == 1
        }
        if first { self.eventLoop.execute { self.pumpAll() } }
    }

    /// On the loop: every body woken since the last time.
    private func pumpAll() {
        let woken = self.woken.withLock { woken in
            defer { woken = [] }
            return woken
        }
        for handler in woken { handler.value.pump() }
    }
}

/// The end of an HTTP server connection's pipeline: collects each request, has the responder answer it
/// in a task of the server's group, and writes the answer. Between requests, and while a pushed body
/// (``HTTPEventSource``) waits for data, the connection holds no task.
final class HTTPConnectionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    /// What every connection of one server shares.
    struct Shared: Sendable {
        let responder: any HTTPResponder
        let maxBodyBytes: Int
        /// The request decoder's limits, for the decoder that comes back after a pushed body
        /// (``StreamingInputDrain``).
        let decoderLimits: NIOHTTPDecoderLimitConfiguration
        let tls: Bool
        let renderError: ErrorRenderer
        let slots: ConnectionSlots
        let jobs: ServerJobs
        let wakeups: PushWakeups
        let logger: Logger
    }

    private enum State {
        case idle
        case collecting
        case responding
        /// An answer that ends the connection is on its way; what the client sends is ignored.
        case closing
    }

    private let shared: Shared
    private let inputClosed: EventLoopFuture<Void>
    private var state = State.idle
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    /// Answered 503 at its first request: over the connection limit, or the server was draining.
    private var refused = false
    private var peer: TLSPeer?
    private var context: ChannelHandlerContext?
    private var push: (any HTTPEventSource)?
    private var pushWriting = false
    /// The pushed body under way keeps its connection: the client's next request ends it.
    private var pushKeepsAlive = false
    /// What stands in for the request decoder while that body is written; the decoder comes back after it.
    private var drain: StreamingInputDrain?
    /// The client half-closed: no request follows the one being answered.
    private var inputEnded = false
    /// ProtocolGuard's `inputClosed` completed: the client left, closed its side, or the server is draining.
    private var inputDone = false

    init(shared: Shared, inputClosed: EventLoopFuture<Void>) {
        self.shared = shared
        self.inputClosed = inputClosed
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.refused = !self.shared.slots.contains(context.channel) || self.shared.slots.isDraining
        // Once per connection (not per pushed body, which would pile up on a connection that carries many):
        // the client went away or the server is draining, so a pushed body under way stops.
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        self.inputClosed.whenComplete { _ in
            bound.value.inputDone = true
            bound.value.push?.stop()
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
        self.push?.stop()
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.push?.stop()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        // The client sent all it will (half-close): the answer under way is the last; an idle connection
        // closes now (ProtocolGuard closes it too).
        if case .some(.inputClosed) = event as? ChannelEvent {
            self.inputEnded = true
            if case .idle = self.state { context.close(promise: nil) }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ProtocolGuard answers a malformed request (400, 431) and closes after it; anything else ends the
        // connection.
        if error is HTTPParserError { return }
        Self.endConnection(context.channel, error, self.shared.logger)
    }

    /// A connection that failed to send or read: logged (at debug: a peer going away is ordinary) and closed.
    private static func endConnection(_ channel: any Channel, _ error: any Error, _ logger: Logger) {
        logger.debug("connection \(channel.remoteAddress.map(hostPort) ?? "?") ended: \(error)")
        channel.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let limit = self.shared.maxBodyBytes
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            guard case .idle = self.state else { return }
            if self.refused {
                // HTTP has no way to answer before a request: answer the first one, then close.
                self.fail(context, .serviceUnavailable, "the server is at its connection limit or shutting down")
                return
            }
            let length = head.headers.first(name: "content-length").flatMap { Int($0) }
            if let length, length > limit {
                self.fail(context, .payloadTooLarge, "request body of \(length) bytes is over the limit of \(limit)")
                return
            }
            self.head = head
            // One allocation of the announced size, not a doubling series up to the limit.
            var body = context.channel.allocator.buffer(capacity: 0)
            if let length, length > 0 { body.reserveCapacity(length) }
            self.body = body
            self.state = .collecting
        case .body(var chunk):
            guard case .collecting = self.state else { return }
            guard (self.body?.readableBytes ?? 0) + chunk.readableBytes <= limit else {
                self.fail(context, .payloadTooLarge, "request body is over the limit of \(limit) bytes")
                return
            }
            self.body?.writeBuffer(&chunk)
        case .end:
            guard case .collecting = self.state, let head = self.head else { return }
            self.state = .responding
            let body = self.body ?? ByteBuffer()
            self.head = nil
            self.body = nil
            self.dispatch(context, head, body)
        }
    }

    /// Writes one of the server's own errors and closes after it.
    private func fail(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ message: String) {
        self.state = .closing
        self.head = nil
        self.body = nil
        let (contentType, body) = self.shared.renderError(status, message)
        let head = HTTPResponseHead(
            version: .http1_1,
            status: status,
            headers: [
                "Content-Type": contentType, "Content-Length": "\(body.readableBytes)", "Connection": "close",
            ]
        )
        context.write(self.wrapOutboundOut(.head(head)), promise: nil)
        context.write(self.wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(self.wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }

    private func dispatch(_ context: ChannelHandlerContext, _ head: HTTPRequestHead, _ body: ByteBuffer) {
        var request = HTTPRequest(
            method: head.method,
            uri: head.uri,
            headers: head.headers,
            body: body,
            remoteAddress: context.channel.remoteAddress
        )
        // A request arrives after the handshake: what it said of the client is known by now.
        if self.peer == nil {
            self.peer =
                self.shared.tls
                ? ((try? context.pipeline.syncOperations.handler(type: HTTPRecordSwitch.self))?.peer
                    ?? TLSPeer(identity: nil, serial: nil))
                : TLSPeer(identity: nil, serial: nil)
        }
        request.peerIdentity = self.peer?.identity
        request.peerCertificateSerial = self.peer?.serial
        if let response = self.shared.responder.respondAtOnce(to: request) {
            if case .stream = response.body { preconditionFailure("respondAtOnce answers with bytes or a pushed body") }
            self.send(response, to: head).whenFailure { [logger = self.shared.logger, channel = context.channel] in
                Self.endConnection(channel, $0, logger)
            }
            return
        }
        let size = body.readableBytes
        let complete = request
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        let channel = context.channel
        let responder = self.shared.responder
        let inputClosed = self.inputClosed
        let logger = self.shared.logger
        self.shared.jobs.spawn {
            // A task of its own: its frames (routing, decoding, the store) are freed when it answers.
            let response = await responder.respond(to: complete)
            do {
                if case .stream(let produce) = response.body {
                    try await Self.stream(response, produce, head, bound, channel, inputClosed)
                } else {
                    try await bound.eventLoop.flatSubmit { bound.value.send(response, to: head) }.get()
                }
            } catch {
                Self.endConnection(channel, error, logger)
            }
            // The body and the response are released by now: give large ones back to the system.
            if size >= ProcessResources.largeBody { ProcessResources.releaseFreeMemory() }
        }
    }

    /// The answer's head (a whole body's length, or none: chunked) and whether the connection stays open.
    /// While a streamed or pushed answer (a watch) is written, the request decoder leaves the pipeline
    /// (``StreamingInputDrain``). A stream written by its task ends its connection. A pushed body keeps a
    /// kept-alive connection: the client's next request on it ends the body (a watch resumes from its last
    /// version), and is answered after it; so a node's watch, beats and reports share one connection.
    private func responseHead(_ response: HTTPResponse, to request: HTTPRequestHead) -> (HTTPResponseHead, Bool) {
        var head = HTTPResponseHead(version: request.version, status: response.status, headers: response.headers)
        let keepAlive: Bool
        switch response.body {
        case .bytes(let bytes):
            keepAlive = request.isKeepAlive && !self.shared.slots.isDraining
            head.headers.replaceOrAdd(name: "Content-Length", value: "\(bytes.readableBytes)")
        case .push:
            keepAlive = request.isKeepAlive && !self.shared.slots.isDraining && !self.inputEnded
            head.headers.remove(name: "Content-Length")
        case .stream:
            keepAlive = false
            head.headers.remove(name: "Content-Length")
        }
        if !keepAlive { head.headers.replaceOrAdd(name: "Connection", value: "close") }
        return (head, keepAlive)
    }

    /// On the event loop: sends a streamed answer's head and takes the request decoder out of the pipeline for
    /// the stream's life. `yields`: a pushed body that keeps its connection ends when the client sends more.
    private func startStream(
        _ context: ChannelHandlerContext,
        _ head: HTTPResponseHead,
        yields: Bool = false,
        flush: Bool = true
    ) {
        if flush {
            context.writeAndFlush(self.wrapOutboundOut(.head(head)), promise: nil)
        } else {
            context.write(self.wrapOutboundOut(.head(head)), promise: nil)
        }
        let drain = StreamingInputDrain.replaceDecoder(in: context.pipeline.syncOperations)
        if yields {
            self.drain = drain
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            drain?.yields {
                // The client's next request: the pushed body ends (what it had queued is not sent: the client
                // resumes from the last version it read), then the request is answered.
                bound.value.push?.stop()
                bound.value.pump()
            }
        }
    }

    /// On the event loop: writes a whole answer, or starts a pushed one.
    private func send(_ response: HTTPResponse, to request: HTTPRequestHead) -> EventLoopFuture<Void> {
        guard let context = self.context else {
            // The connection closed while its answer was made: a pushed body never starts; end its source.
            if case .push(let source) = response.body { source.stop() }
            return self.inputClosed.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
        }
        let (head, keepAlive) = self.responseHead(response, to: request)
        switch response.body {
        case .bytes(let bytes):
            context.write(self.wrapOutboundOut(.head(head)), promise: nil)
            // HEAD: the length without the body. (Not left to NIO's encoder: the decoder that comes back after
            // a pushed body cannot tell it of the method.)
            if request.method != .HEAD {
                context.write(self.wrapOutboundOut(.body(.byteBuffer(bytes))), promise: nil)
            }
            return self.finish(context, keepAlive: keepAlive)
        case .push(let source):
            // The head goes out with the body's first chunk (a watch's first bookmark): one record, one write.
            self.startStream(context, head, yields: keepAlive, flush: false)
            self.push = source
            self.pushKeepsAlive = keepAlive
            let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
            let wakeups = self.shared.wakeups.of(context.eventLoop)
            source.start(eventLoop: context.eventLoop) { wakeups.wake(bound) }
            if self.inputDone || !context.channel.isActive { source.stop() }
            self.pump()
            if !self.pushWriting { context.flush() }  // nothing ready yet: the head alone
            return context.eventLoop.makeSucceededVoidFuture()
        case .stream:
            preconditionFailure("streams are written by their task")
        }
    }

    /// On the event loop: writes what the pushed body has ready, one chunk at a time.
    fileprivate func pump() {
        guard let context = self.context, let source = self.push, !self.pushWriting else { return }
        switch source.take() {
        case .data(let chunk):
            self.pushWriting = true
            context.writeAndFlush(self.wrapOutboundOut(.body(.byteBuffer(chunk)))).assumeIsolated().whenComplete {
                result in
                self.pushWriting = false
                if case .failure = result { source.stop() }
                self.pump()
            }
        case .nothing:
            break
        case .end:
            self.push = nil
            let drain = self.drain
            self.drain = nil
            _ = self.finish(context, keepAlive: self.pushKeepsAlive, restoring: drain)
        }
    }

    /// On the event loop: ends the answer; the next request may come (keep-alive) or the connection closes.
    /// `restoring`: the drain that stood in for the request decoder while a pushed body was written.
    private func finish(
        _ context: ChannelHandlerContext,
        keepAlive: Bool,
        restoring drain: StreamingInputDrain? = nil
    ) -> EventLoopFuture<Void> {
        // A server that began to drain meanwhile closes the connection after this answer.
        let keepAlive = keepAlive && !self.shared.slots.isDraining && !self.inputEnded
        // Before the end is written: the pipelining handler hands over the next request as it passes.
        self.state = keepAlive ? .idle : .closing
        guard keepAlive else {
            let written = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
            let channel = context.channel
            written.whenComplete { _ in channel.close(promise: nil) }
            return written
        }
        let written = context.write(self.wrapOutboundOut(.end(nil)))
        // After a pushed body: the decoder comes back, with the next request if the client sent it. A request
        // answered at once (a beat) is written behind the end, and both go out in one flush.
        drain?.restoreDecoder(limits: self.shared.decoderLimits)
        context.flush()
        return written
    }

    /// In the request's task: a stream its producer writes, chunk by chunk, waiting while the client is not
    /// reading.
    private static func stream(
        _ response: HTTPResponse,
        _ produce: @Sendable (HTTPBodyWriter) async throws -> Void,
        _ request: HTTPRequestHead,
        _ bound: NIOLoopBound<HTTPConnectionHandler>,
        _ channel: any Channel,
        _ inputClosed: EventLoopFuture<Void>
    ) async throws {
        try await bound.eventLoop.submit {
            let handler = bound.value
            if let context = handler.context {
                handler.startStream(context, handler.responseHead(response, to: request).0)
            }
        }.get()
        let writer = HTTPBodyWriter(clientClosed: inputClosed) { chunk in
            try await channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(chunk))).get()
        }
        try await produce(writer)
        try await bound.eventLoop.flatSubmit { () -> EventLoopFuture<Void> in
            guard let context = bound.value.context else {
                return bound.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
            }
            return bound.value.finish(context, keepAlive: false)  // a streamed answer ends its connection
        }.get()
    }
}
