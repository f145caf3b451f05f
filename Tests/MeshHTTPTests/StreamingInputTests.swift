import MeshTestSupport
import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import MeshHTTP

/// While a streamed answer is written, the request decoder is out of the pipeline (`StreamingInputDrain`), and
/// `ProtocolGuard` times nothing; both come back to what they were for the next request's timing.
@Suite struct StreamingInputTests {
    /// What reaches the end of the pipeline: request parts and user events.
    final class Tail: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        var parts: [HTTPServerRequestPart] = []
        var inputClosed = 0
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            self.parts.append(Self.unwrapInboundIn(data))
        }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .some(.inputClosed) = event as? ChannelEvent { self.inputClosed += 1 }
        }
    }

    static func serverChannel() throws -> (EmbeddedChannel, Tail) {
        let channel = EmbeddedChannel()
        let tail = Tail()
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: false)
        try channel.pipeline.syncOperations.addHandler(tail)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        return (channel, tail)
    }

    static func hasDecoder(_ channel: EmbeddedChannel) -> Bool {
        (try? channel.pipeline.syncOperations.handler(type: ByteToMessageHandler<HTTPRequestDecoder>.self)) != nil
    }

    @Test func theDecoderLeavesAndWhatTheClientSendsAfterIsDropped() throws {
        let (channel, tail) = try Self.serverChannel()
        try channel.writeInbound(ByteBuffer(string: "GET /watch HTTP/1.1\r\nHost: t\r\n\r\n"))
        #expect(tail.parts.count == 2)
        StreamingInputDrain.replaceDecoder(in: channel.pipeline.syncOperations)
        channel.embeddedEventLoop.run()
        #expect(!Self.hasDecoder(channel))
        let drain = try channel.pipeline.syncOperations.handler(type: StreamingInputDrain.self)
        // A request sent meanwhile goes nowhere; the end of the client's input still reaches the tail.
        let next = "GET /next HTTP/1.1\r\nHost: t\r\n\r\n"
        try channel.writeInbound(ByteBuffer(string: next))
        #expect(tail.parts.count == 2)
        #expect(drain.dropped == next.utf8.count)
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        #expect(tail.inputClosed == 1)
        #expect(channel.isActive)
        // Twice is nothing: no decoder left to replace, one drain.
        StreamingInputDrain.replaceDecoder(in: channel.pipeline.syncOperations)
        channel.embeddedEventLoop.run()
        #expect(throws: Never.self) { try channel.pipeline.syncOperations.handler(type: StreamingInputDrain.self) }
        _ = try channel.finish(acceptAlreadyClosed: true)
    }

    @Test func aCompleteRequestTheDecoderHeldStillGoesUpAndAFloodClosesTheConnection() throws {
        let (channel, tail) = try Self.serverChannel()
        // The watch and a whole pipelined request in one read: both decoded before the decoder leaves.
        try channel.writeInbound(
            ByteBuffer(string: "GET /watch HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        )
        StreamingInputDrain.replaceDecoder(in: channel.pipeline.syncOperations)
        channel.embeddedEventLoop.run()
        #expect(!Self.hasDecoder(channel))
        #expect(tail.parts.count == 2)  // the pipelining handler holds the second until the first is answered
        let flood = ByteBuffer(repeating: UInt8(ascii: "x"), count: StreamingInputDrain.limit)
        try channel.writeInbound(flood)
        #expect(channel.isActive)
        try channel.writeInbound(ByteBuffer(string: "x"))
        #expect(!channel.isActive)
    }

    /// A pushed body that keeps its connection: the client's next request is kept whole (however it is cut), said
    /// once, and handed to a fresh decoder when the answer is complete; a flood still closes the connection.
    @Test func aYieldingDrainKeepsTheNextRequestForTheDecoderThatComesBack() throws {
        let (channel, tail) = try Self.serverChannel()
        try channel.writeInbound(ByteBuffer(string: "GET /watch HTTP/1.1\r\nHost: t\r\n\r\n"))
        #expect(tail.parts.count == 2)
        let drain = try #require(StreamingInputDrain.replaceDecoder(in: channel.pipeline.syncOperations))
        channel.embeddedEventLoop.run()
        var said = 0
        drain.yields { said += 1 }
        let next = "POST /beat HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
        // Byte by byte: kept, said once, nothing goes up yet.
        for byte in next.utf8 { try channel.writeInbound(ByteBuffer(bytes: [byte])) }
        #expect(said == 1)
        #expect(drain.kept.map { String(buffer: $0) } == next)
        #expect(drain.dropped == 0)
        #expect(tail.parts.count == 2)
        // The watch's answer ends; the decoder comes back with the kept request, which goes up whole.
        try channel.writeOutbound(HTTPServerResponsePart.head(.init(version: .http1_1, status: .ok)))
        try channel.writeOutbound(HTTPServerResponsePart.end(nil))
        drain.restoreDecoder(limits: .init())
        channel.embeddedEventLoop.run()
        #expect(Self.hasDecoder(channel))
        #expect(throws: (any Error).self) {
            try channel.pipeline.syncOperations.handler(type: StreamingInputDrain.self)
        }
        #expect(tail.parts.count == 5)
        guard tail.parts.count == 5, case .head(let head) = tail.parts[2], case .body(let body) = tail.parts[3],
            case .end = tail.parts[4]
        else {
            Issue.record("the kept request did not go up whole: \(tail.parts)")
            return
        }
        #expect(head.method == .POST && head.uri == "/beat" && String(buffer: body) == "{}")
        // Restoring twice is nothing.
        drain.restoreDecoder(limits: .init())
        #expect(Self.hasDecoder(channel))
        _ = try channel.finish(acceptAlreadyClosed: true)
    }

    /// What the connection handler does: the kept request is answered while the decoder comes back (a beat
    /// answered at once), which must not bring back a second decoder.
    @Test func aKeptRequestAnsweredAsItGoesUpLeavesOneDecoder() throws {
        final class Answering: ChannelInboundHandler {
            typealias InboundIn = HTTPServerRequestPart
            typealias OutboundOut = HTTPServerResponsePart
            var requests: [String] = []
            var drain: StreamingInputDrain?
            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                switch Self.unwrapInboundIn(data) {
                case .head(let head): self.requests.append(head.uri)
                case .body: break
                case .end:
                    guard self.requests.count > 1 else { return }  // the watch's answer is written by the test
                    context.write(Self.wrapOutboundOut(.head(.init(version: .http1_1, status: .ok))), promise: nil)
                    context.writeAndFlush(Self.wrapOutboundOut(.end(nil)), promise: nil)
                    // A restore asked again while the drain hands the request on is nothing.
                    self.drain?.restoreDecoder(limits: .init())
                }
            }
        }
        let channel = EmbeddedChannel()
        let tail = Answering()
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: false)
        try channel.pipeline.syncOperations.addHandler(tail)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        try channel.writeInbound(ByteBuffer(string: "GET /watch HTTP/1.1\r\nHost: t\r\n\r\n"))
        let drain = try #require(StreamingInputDrain.replaceDecoder(in: channel.pipeline.syncOperations))
        tail.drain = drain
        channel.embeddedEventLoop.run()
        drain.yields {}
        try channel.writeInbound(ByteBuffer(string: "POST /beat HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"))
        try channel.writeOutbound(HTTPServerResponsePart.head(.init(version: .http1_1, status: .ok)))
        try channel.writeOutbound(HTTPServerResponsePart.end(nil))
        drain.restoreDecoder(limits: .init())
        channel.embeddedEventLoop.run()
        #expect(tail.requests == ["/watch", "/beat"])
        #expect(throws: (any Error).self) {
            try channel.pipeline.syncOperations.handler(type: StreamingInputDrain.self)
        }
        // One decoder: the next request goes up once, as itself (two decoders in a row would take the first's
        // parts for bytes).
        try channel.writeInbound(ByteBuffer(string: "GET /next HTTP/1.1\r\nHost: t\r\n\r\n"))
        #expect(tail.requests == ["/watch", "/beat", "/next"])
        _ = try channel.finish(acceptAlreadyClosed: true)
    }

    @Test func aYieldingDrainClosesTheConnectionOnAFlood() throws {
        let (channel, _) = try Self.serverChannel()
        try channel.writeInbound(ByteBuffer(string: "GET /watch HTTP/1.1\r\nHost: t\r\n\r\n"))
        let drain = try #require(StreamingInputDrain.replaceDecoder(in: channel.pipeline.syncOperations))
        channel.embeddedEventLoop.run()
        drain.yields {}
        try channel.writeInbound(ByteBuffer(repeating: UInt8(ascii: "x"), count: StreamingInputDrain.limit))
        #expect(channel.isActive)
        try channel.writeInbound(ByteBuffer(string: "x"))
        #expect(!channel.isActive)
    }

    @Test func theGuardTimesNothingWhileAnsweringAndTheIdleTimeoutAppliesAfter() throws {
        let channel = EmbeddedChannel()
        let guardHandler = ProtocolGuard(
            eventLoop: channel.eventLoop,
            requestTimeout: .seconds(5),
            idleTimeout: .seconds(10),
            render: { _, message in ("text/plain", ByteBuffer(string: message)) }
        )
        try channel.pipeline.syncOperations.addHandler(guardHandler)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/watch")
        try channel.writeInbound(HTTPServerRequestPart.head(head))
        try channel.writeInbound(HTTPServerRequestPart.end(nil))
        _ = try channel.readInbound(as: HTTPServerRequestPart.self)
        _ = try channel.readInbound(as: HTTPServerRequestPart.self)
        // An answer streamed for an hour: the connection is not idle, whatever the clock says.
        try channel.writeOutbound(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: .ok)))
        channel.embeddedEventLoop.advanceTime(by: .hours(1))
        #expect(channel.isActive)
        // Its end: the idle timeout counts from there.
        try channel.writeOutbound(HTTPServerResponsePart.end(nil))
        channel.embeddedEventLoop.advanceTime(by: .seconds(6))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(10))
        #expect(!channel.isActive)
    }
}
