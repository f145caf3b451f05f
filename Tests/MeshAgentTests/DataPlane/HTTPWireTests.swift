import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import MeshAgent

/// The proxy's HTTP/1.1 serialiser, byte for byte: heads parsed from bytes (`HTTPParser`), edited, written.
@Suite("HTTP wire: heads, chunks and framing, byte for byte")
struct HTTPWireTests {
    private let allocator = ByteBufferAllocator()

    /// The head at the start of `text`, parsed as a request or as a response to a `method` request.
    private func head(_ text: String, response: Bool = false, method: HTTPMethod = .GET) throws -> HTTPHead {
        var parser = HTTPParser(kind: response ? .response : .request)
        parser.expectResponse(to: method)
        var buffer = ByteBuffer(string: text)
        var heads: [HTTPHead] = []
        try parser.parse(&buffer) { part in
            if case .head(let head) = part { heads.append(head) }
        }
        return try #require(heads.first)
    }

    @Test("request head: HTTP/1.1, hop-by-hop and Connection-named headers out, X-Forwarded-For and X-Request-Id in")
    func requestHead() throws {
        let head = try self.head(
            "POST /a?b=c HTTP/1.0\r\nHost: x\r\nConnection: close, X-Private, Transfer-Encoding\r\nKeep-Alive: 5\r\n"
                + "X-Private: 1\r\nTE: trailers\r\nProxy-Authorization: secret\r\nX-Forwarded-For: 198.18.0.9\r\n"
                + "x-forwarded-for: 198.18.0.10\r\nTransfer-Encoding: chunked\r\nX-Empty: \r\nX-Keep:  ünïcode \r\n\r\n"
        )
        var edits = HTTPWire.RequestEdits()
        edits.hopByHop = HTTPWire.HopByHop(head)
        edits.forwardedFor = "127.0.0.1"
        edits.dropForwardedFor = true
        edits.priorForwardedFor = head.fields[head.forwardedForField!].value
        edits.requestID = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210)
        let bytes = HTTPWire.requestHead(head, edits: edits, allocator: self.allocator)
        #expect(
            String(buffer: bytes)
                == "POST /a?b=c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Empty: \r\nX-Keep: ünïcode\r\n"
                + "x-forwarded-for: 198.18.0.9, 127.0.0.1\r\n"
                + "x-request-id: 0123456789abcdeffedcba9876543210\r\n\r\n"
        )

        // Nothing to change: the head as it came (in HTTP/1.1); an upgrade keeps its two headers.
        let plain = try self.head("PURGE * HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n")
        #expect(
            String(buffer: HTTPWire.requestHead(plain, edits: .init(), allocator: self.allocator))
                == "PURGE * HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n"
        )
        let upgrade = try self.head(
            "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        var upgradeEdits = HTTPWire.RequestEdits()
        upgradeEdits.hopByHop = HTTPWire.HopByHop(upgrade)
        upgradeEdits.upgrade = upgrade.upgradeField
        upgradeEdits.forwardedFor = "::1"
        #expect(
            String(buffer: HTTPWire.requestHead(upgrade, edits: upgradeEdits, allocator: self.allocator))
                == "GET /chat HTTP/1.1\r\nHost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
                + "x-forwarded-for: ::1\r\n\r\n"
        )
    }

    @Test("response head: status line in the client's version, the reason phrase as it came, edits applied")
    func responseHead() throws {
        let response = try self.head(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                + "Connection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nUpgrade: h2c\r\nSet-Cookie: a=1\r\n\r\n",
            response: true
        )
        var edits = HTTPWire.ResponseEdits(hopByHop: HTTPWire.HopByHop(response))
        edits.dropTransferEncoding = true
        edits.connectionClose = true
        let http10 = HTTPWire.responseHead(version: .http1_0, response, edits: edits, allocator: self.allocator)
        #expect(
            String(buffer: http10)
                == "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\nconnection: close\r\n\r\n"
        )
        var chunked = HTTPWire.ResponseEdits()
        chunked.connectionClose = false
        chunked.addChunked = true
        let custom = HTTPWire.responseHead(
            version: .http1_1,
            try self.head("HTTP/1.1 299 Fine by me\r\nx-a: b\r\n\r\n", response: true),
            edits: chunked,
            allocator: self.allocator,
            reserving: 100
        )
        #expect(
            String(buffer: custom)
                == "HTTP/1.1 299 Fine by me\r\nx-a: b\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        #expect(custom.capacity >= custom.readableBytes + 100)
        let noContent = HTTPWire.responseHead(
            version: .http1_1,
            try self.head("HTTP/1.1 204 No Content\r\n\r\n", response: true),
            edits: .init(),
            allocator: self.allocator
        )
        #expect(String(buffer: noContent) == "HTTP/1.1 204 No Content\r\n\r\n")
        // No reason phrase (nor its space): the status line gets its space back.
        let bare = HTTPWire.responseHead(
            version: .http1_1,
            try self.head("HTTP/1.0 599\r\n\r\n", response: true),
            edits: .init(),
            allocator: self.allocator
        )
        #expect(String(buffer: bare) == "HTTP/1.1 599 \r\n\r\n")
    }

    @Test("heads sized from the parser's count of field bytes come out whole (a miscount traps)")
    func headsSizedFromFieldBytes() throws {
        let request = try self.head(
            "GET /ü?q HTTP/1.1\r\nHost: x\r\nX-Keep: ünïcode\r\nX-Empty:\r\nContent-Length: 3\r\n"
                + "X-Forwarded-For:\t198.18.0.9 \r\n\r\n"
        )
        #expect(request.fieldBytes == request.fields.reduce(0) { $0 + $1.lineBytes })
        var edits = HTTPWire.RequestEdits()
        edits.forwardedFor = "::1"
        edits.requestID = (1, 2)
        let added = String(buffer: HTTPWire.requestHead(request, edits: edits, allocator: self.allocator))
        #expect(
            added
                == "GET /ü?q HTTP/1.1\r\nHost: x\r\nX-Keep: ünïcode\r\nX-Empty: \r\nContent-Length: 3\r\n"
                + "X-Forwarded-For: 198.18.0.9\r\nx-forwarded-for: ::1\r\n"
                + "x-request-id: 00000000000000010000000000000002\r\n\r\n"
        )
        edits.dropForwardedFor = true  // replaced: counted field by field
        edits.priorForwardedFor = request.fields[request.forwardedForField!].value
        let replaced = String(buffer: HTTPWire.requestHead(request, edits: edits, allocator: self.allocator))
        #expect(replaced.contains("x-forwarded-for: 198.18.0.9, ::1\r\n") && !replaced.contains("X-Forwarded-For"))

        let response = try self.head(
            "HTTP/1.1 200 OK\r\nX-Keep: ünïcode\r\nTransfer-Encoding: gzip, chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            response: true
        )
        for dropTransferEncoding in [false, true] {
            for connectionClose in [nil, true, false] {
                let edits = HTTPWire.ResponseEdits(
                    dropTransferEncoding: dropTransferEncoding,
                    connectionClose: connectionClose,
                    addChunked: dropTransferEncoding
                )
                let text = String(
                    buffer: HTTPWire.responseHead(version: .http1_1, response, edits: edits, allocator: self.allocator)
                )
                #expect(text.contains("gzip") == !dropTransferEncoding)
                #expect(text.hasPrefix("HTTP/1.1 200 OK\r\nX-Keep: ünïcode\r\n") && text.hasSuffix("\r\n\r\n"))
            }
        }
    }

    @Test("the proxy's own answers: a complete plain-text response")
    func statusResponse() {
        let close = HTTPWire.statusResponse(
            status: .serviceUnavailable,
            text: "503 no healthy upstream\n",
            keepAlive: false,
            allocator: self.allocator
        )
        #expect(
            String(buffer: close)
                == "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                + "content-length: 24\r\nconnection: close\r\n\r\n503 no healthy upstream\n"
        )
        let keep = HTTPWire.statusResponse(status: .badGateway, text: "", keepAlive: true, allocator: self.allocator)
        #expect(
            String(buffer: keep)
                == "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 0\r\n"
                + "connection: keep-alive\r\n\r\n"
        )
    }

    @Test("chunk-size lines in hex, the last chunk with and without trailers")
    func chunks() {
        for (count, line) in [
            (1, "1\r\n"), (15, "f\r\n"), (255, "ff\r\n"), (4096, "1000\r\n"), (0xab_cdef, "abcdef\r\n"),
        ] {
            var buffer = self.allocator.buffer(capacity: 0)
            HTTPWire.writeChunkHeader(count, into: &buffer)
            #expect(String(buffer: buffer) == line)
        }
        var last = self.allocator.buffer(capacity: 0)
        HTTPWire.writeLastChunk(trailers: nil, into: &last)
        HTTPWire.writeLastChunk(trailers: ByteBuffer(), into: &last)
        HTTPWire.writeLastChunk(trailers: ByteBuffer(string: "x-checksum: 1\r\nx-b: 2\r\n"), into: &last)
        #expect(String(buffer: last) == "0\r\n\r\n0\r\n\r\n0\r\nx-checksum: 1\r\nx-b: 2\r\n\r\n")
    }

    @Test("response bodies are delimited as RFC 9112 6.3 says")
    func responseBodies() throws {
        func body(_ status: String, _ method: HTTPMethod = .GET, _ fields: String = "") throws -> HTTPHead.Body {
            try self.head("HTTP/1.1 \(status)\r\n\(fields)\r\n", response: true, method: method).body
        }
        #expect(try body("200 OK", .HEAD, "content-length: 5\r\n") == .none)
        #expect(try body("200 OK", .HEAD, "transfer-encoding: chunked\r\n") == .none)
        #expect(try body("204 No Content") == .none)
        #expect(try body("304 Not Modified", .GET, "Content-Length: 7\r\n") == .none)
        #expect(try body("100 Continue") == .none)
        #expect(try body("200 OK", .GET, "Content-Length: 7\r\n") == .length(7))
        #expect(try body("200 OK", .GET, "Transfer-Encoding: gzip, Chunked \r\n") == .chunked)
        #expect(
            try body("200 OK", .GET, "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n")
                == .untilClose(transferCoded: true)
        )
        #expect(try body("200 OK", .GET, "Transfer-Encoding: chunked, gzip\r\n") == .untilClose(transferCoded: true))
        #expect(try body("200 OK", .POST) == .untilClose(transferCoded: false))
    }

    @Test("the outbox: a head with a small body and the end behind it is one write; large bodies are not copied")
    func outbox() throws {
        let channel = EmbeddedChannel()
        let probe = ContextProbe()
        try channel.pipeline.syncOperations.addHandler(probe)
        let context = try #require(probe.context)
        var outbox = HTTPOutbox()
        outbox.queue(ByteBuffer(string: "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"), context: context)
        outbox.queueChunk(ByteBuffer(string: "hello"), context: context)
        outbox.queueChunk(ByteBuffer(), context: context)  // an empty chunk would end the body: nothing
        outbox.queueLastChunk(trailers: nil, context: context)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)  // nothing written before the flush
        outbox.flush(context: context)
        #expect(
            try channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) }
                == "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil)

        let large = ByteBuffer(repeating: UInt8(ascii: "x"), count: HTTPOutbox.copyLimit + 1)
        outbox.queue(ByteBuffer(string: "head"), context: context)
        outbox.queueChunk(large, context: context)
        outbox.queueLastChunk(trailers: ByteBuffer(string: "x-t: 1\r\n"), context: context)
        outbox.queue(large, context: context)
        outbox.flush(context: context)
        var writes: [ByteBuffer] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { writes.append(buffer) }
        #expect(writes.map(\.readableBytes) == [4 + 6, large.readableBytes, 2 + 13, large.readableBytes])
        #expect(String(buffer: writes[0]) == "head1001\r\n")
        #expect(writes[1] == large && writes[3] == large)
        #expect(String(buffer: writes[2]) == "\r\n0\r\nx-t: 1\r\n\r\n")
        _ = try channel.finish()
    }
}

/// Hands out its context (for driving `HTTPOutbox` on an `EmbeddedChannel`).
private final class ContextProbe: ChannelOutboundHandler {
    typealias OutboundIn = ByteBuffer
    var context: ChannelHandlerContext?
    func handlerAdded(context: ChannelHandlerContext) { self.context = context }
}
