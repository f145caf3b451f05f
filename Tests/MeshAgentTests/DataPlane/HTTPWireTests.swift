import NIOCore
import NIOEmbedded
import NIOHTTP1
import Testing

@testable import MeshAgent

/// The proxy's HTTP/1.1 serialiser, byte for byte.
@Suite("HTTP wire: heads, chunks and framing, byte for byte")
struct HTTPWireTests {
    private let allocator = ByteBufferAllocator()

    @Test("request head: HTTP/1.1, hop-by-hop and Connection-named headers out, X-Forwarded-For and X-Request-Id in")
    func requestHead() {
        let head = HTTPRequestHead(
            version: .http1_0,
            method: .POST,
            uri: "/a?b=c",
            headers: HTTPHeaders([
                ("Host", "x"), ("Connection", "close, X-Private, Transfer-Encoding"), ("Keep-Alive", "5"),
                ("X-Private", "1"), ("TE", "trailers"), ("Proxy-Authorization", "secret"),
                ("X-Forwarded-For", "198.18.0.9"), ("x-forwarded-for", "198.18.0.10"), ("Transfer-Encoding", "chunked"),
                ("X-Empty", ""), ("X-Keep", "ünïcode"),
            ])
        )
        var edits = HTTPWire.RequestEdits()
        edits.hopByHop = HTTPWire.HopByHop(head.headers)
        edits.forwardedFor = "127.0.0.1"
        edits.priorForwardedFor = "198.18.0.9"
        edits.requestID = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210)
        let bytes = HTTPWire.requestHead(head, edits: edits, allocator: self.allocator)
        #expect(
            String(buffer: bytes)
                == "POST /a?b=c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Empty: \r\nX-Keep: ünïcode\r\n"
                + "x-forwarded-for: 198.18.0.9, 127.0.0.1\r\n"
                + "x-request-id: 0123456789abcdeffedcba9876543210\r\n\r\n"
        )

        // Nothing to change: the head as it came (in HTTP/1.1); an upgrade keeps its two headers.
        let plain = HTTPRequestHead(
            version: .http1_1,
            method: .RAW(value: "PURGE"),
            uri: "*",
            headers: HTTPHeaders([("host", "x"), ("accept", "*/*")])
        )
        #expect(
            String(buffer: HTTPWire.requestHead(plain, edits: .init(), allocator: self.allocator))
                == "PURGE * HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n"
        )
        let upgrade = HTTPRequestHead(
            version: .http1_1,
            method: .GET,
            uri: "/chat",
            headers: HTTPHeaders([("Host", "x"), ("Connection", "Upgrade"), ("Upgrade", "websocket")])
        )
        var upgradeEdits = HTTPWire.RequestEdits()
        upgradeEdits.hopByHop = HTTPWire.HopByHop(upgrade.headers)
        upgradeEdits.upgrade = "websocket"
        upgradeEdits.forwardedFor = "::1"
        #expect(
            String(buffer: HTTPWire.requestHead(upgrade, edits: upgradeEdits, allocator: self.allocator))
                == "GET /chat HTTP/1.1\r\nHost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
                + "x-forwarded-for: ::1\r\n\r\n"
        )
    }

    @Test("response head: status line in the client's version, edits applied")
    func responseHead() {
        let headers = HTTPHeaders([
            ("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked"), ("Connection", "keep-alive, X-Hop"),
            ("Keep-Alive", "timeout=5"), ("X-Hop", "1"), ("Upgrade", "h2c"), ("Set-Cookie", "a=1"),
        ])
        var edits = HTTPWire.ResponseEdits(hopByHop: HTTPWire.HopByHop(headers))
        edits.dropTransferEncoding = true
        edits.connectionClose = true
        let http10 = HTTPWire.responseHead(
            version: .http1_0,
            status: .ok,
            headers: headers,
            edits: edits,
            allocator: self.allocator
        )
        #expect(
            String(buffer: http10)
                == "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\nconnection: close\r\n\r\n"
        )
        var chunked = HTTPWire.ResponseEdits()
        chunked.connectionClose = false
        chunked.addChunked = true
        let custom = HTTPWire.responseHead(
            version: .http1_1,
            status: .custom(code: 299, reasonPhrase: "Fine"),
            headers: HTTPHeaders([("x-a", "b")]),
            edits: chunked,
            allocator: self.allocator,
            reserving: 100
        )
        #expect(
            String(buffer: custom)
                == "HTTP/1.1 299 Fine\r\nx-a: b\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        #expect(custom.capacity >= custom.readableBytes + 100)
        let noContent = HTTPWire.responseHead(
            version: .http1_1,
            status: .noContent,
            headers: HTTPHeaders(),
            edits: .init(),
            allocator: self.allocator
        )
        #expect(String(buffer: noContent) == "HTTP/1.1 204 No Content\r\n\r\n")
        let other = HTTPWire.responseHead(
            version: HTTPVersion(major: 1, minor: 2),
            status: HTTPResponseStatus(statusCode: 599),
            headers: HTTPHeaders(),
            edits: .init(),
            allocator: self.allocator
        )
        #expect(String(buffer: other) == "HTTP/1.2 599 \r\n\r\n")
    }

    @Test("heads sized from the scan's count of header bytes equal heads counted in full")
    func headsSizedFromScan() {
        let headers = HTTPHeaders([
            ("Host", "x"), ("X-Keep", "ünïcode"), ("X-Empty", ""), ("Content-Length", "3"),
            ("Transfer-Encoding", "gzip, chunked"), ("transfer-encoding", "chunked"), ("X-Forwarded-For", "198.18.0.9"),
        ])
        let headerBytes = headers.reduce(0) {
            $0 + HTTPWire.headerLineBytes(nameBytes: $1.name.utf8.count, valueBytes: $1.value.utf8.count)
        }
        let head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ü?q", headers: headers)
        var editsList: [HTTPWire.RequestEdits] = [.init()]
        var edits = HTTPWire.RequestEdits()
        edits.forwardedFor = "::1"
        edits.requestID = (1, 2)
        editsList.append(edits)
        edits.priorForwardedFor = "198.18.0.9"  // X-Forwarded-For replaced: counted in full
        editsList.append(edits)
        edits.hopByHop = HTTPWire.HopByHop(HTTPHeaders([("Connection", "X-Keep")]))
        editsList.append(edits)
        for edits in editsList {
            let sized = HTTPWire.requestHead(head, edits: edits, headerBytes: headerBytes, allocator: self.allocator)
            #expect(sized == HTTPWire.requestHead(head, edits: edits, allocator: self.allocator))
        }
        let scan = HTTPWire.ResponseScan(headers)
        #expect(scan.headerBytes == headerBytes)
        for dropTransferEncoding in [false, true] {
            for connectionClose in [nil, true, false] {
                let edits = HTTPWire.ResponseEdits(
                    dropTransferEncoding: dropTransferEncoding,
                    connectionClose: connectionClose,
                    addChunked: dropTransferEncoding
                )
                let sized = HTTPWire.responseHead(
                    version: .http1_1,
                    status: .ok,
                    headers: headers,
                    edits: edits,
                    scan: scan,
                    allocator: self.allocator
                )
                let counted = HTTPWire.responseHead(
                    version: .http1_1,
                    status: .ok,
                    headers: headers,
                    edits: edits,
                    allocator: self.allocator
                )
                #expect(sized == counted)
                #expect(String(buffer: sized).contains("gzip") == !dropTransferEncoding)
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
        HTTPWire.writeLastChunk(trailers: HTTPHeaders(), into: &last)
        HTTPWire.writeLastChunk(trailers: HTTPHeaders([("x-checksum", "1"), ("x-b", "2")]), into: &last)
        #expect(String(buffer: last) == "0\r\n\r\n0\r\n\r\n0\r\nx-checksum: 1\r\nx-b: 2\r\n\r\n")
    }

    @Test("response bodies are delimited as llhttp reads them")
    func responseBodies() {
        func body(
            _ status: HTTPResponseStatus,
            _ method: HTTPMethod = .GET,
            _ headers: [(String, String)] = []
        ) -> HTTPWire.ResponseBody {
            HTTPWire.responseBody(status: status, requestMethod: method, headers: HTTPHeaders(headers))
        }
        #expect(body(.ok, .HEAD, [("content-length", "5")]) == .none)
        #expect(body(.ok, .HEAD, [("transfer-encoding", "chunked")]) == .none)
        #expect(body(.noContent) == .none)
        #expect(body(.notModified, .GET, [("Content-Length", "7")]) == .none)
        #expect(body(.continue) == .none)
        #expect(body(.ok, .GET, [("Content-Length", "7")]) == .contentLength)
        #expect(body(.ok, .GET, [("Transfer-Encoding", "gzip, Chunked ")]) == .chunked)
        #expect(
            body(.ok, .GET, [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "gzip")])
                == .untilClose(transferCoded: true)
        )
        #expect(body(.ok, .GET, [("Transfer-Encoding", "chunked, gzip")]) == .untilClose(transferCoded: true))
        #expect(body(.ok, .POST) == .untilClose(transferCoded: false))
        #expect(HTTPWire.finalCodingIsChunked("chunked"))
        #expect(!HTTPWire.finalCodingIsChunked(""))
        #expect(!HTTPWire.finalCodingIsChunked("chunked,"))
        #expect(!HTTPWire.finalCodingIsChunked("xchunked"))
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
        outbox.queueLastChunk(trailers: HTTPHeaders([("x-t", "1")]), context: context)
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
