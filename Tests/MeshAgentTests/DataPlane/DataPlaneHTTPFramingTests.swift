import MeshCore
import MeshTestSupport
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

/// Message framing through the proxy, checked on the bytes both sides see: a scripted backend answers with
/// canned bytes and records what reached it; a raw client sends pipelined requests and reads until the proxy
/// closes.
@Suite(
    "Data plane: HTTP/1.1 framing through the proxy, byte for byte",
    .timeLimit(.minutes(1)),
    .awaitedTeardown,
    .rationed
)
struct DataPlaneHTTPFramingTests {
    static let plain = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    static let responses: [String: String] = [
        "/plain": plain,
        "/head": "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
        "/204": "HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n",
        "/304": "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
        "/chunked":
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            + "5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 1\r\n\r\n",
        "/eof": "HTTP/1.1 200 OK\r\nx-b: 2\r\n\r\nuntil close",
        "/continue":
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + plain,
    ]

    private func withProxy(
        _ body: (SocketAddress, ScriptedHTTPBackend) async throws -> Void
    ) async throws {
        let backend = ScriptedHTTPBackend(responses: Self.responses)
        let server = try await TestServers.tcp(name: "scripted") { ScriptedHTTPHandler(backend) }
        onTeardown { await server.close() }
        var http = HTTPConfiguration()
        http.addRequestID = false
        try await withDataPlane(testConfiguration(http: http)) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(httpRoute("framing", vip, [server.backend()]))
            try await body(TestClient.vipAddress(vip, 8080), backend)
            #expect(await eventually { dp.openClientChannels == 0 })
        }
    }

    @Test(
        "responses without a body (HEAD, 204, 304) on one kept-alive upstream connection; requests as sent",
        arguments: HTTPEngine.allCases
    )
    func noBody(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            try await self.withProxy { address, backend in
                let text = try await RawClient.send(
                    address,
                    Array(
                        ("HEAD /head HTTP/1.1\r\nHost: x\r\n\r\nGET /204 HTTP/1.1\r\nHost: x\r\n\r\n"
                            + "GET /304 HTTP/1.1\r\nHost: x\r\nKeep-Alive: 5\r\n\r\n"
                            + "GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").utf8
                    )
                )
                #expect(
                    text
                        == "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n"
                        + "HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"
                        + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok"
                )
                // The upstream saw each request once, in HTTP/1.1, hop-by-hop headers gone, the client's address added.
                let xff = "x-forwarded-for: 127.0.0.1\r\n"
                #expect(
                    backend.received
                        == "HEAD /head HTTP/1.1\r\nHost: x\r\n\(xff)\r\nGET /204 HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
                        + "GET /304 HTTP/1.1\r\nHost: x\r\n\(xff)\r\nGET /plain HTTP/1.1\r\nHost: x\r\n\(xff)\r\n"
                )
                #expect(backend.connections == 1)
            }
        }
    }

    @Test(
        "chunked and until-close bodies reach an HTTP/1.1 client chunked, trailers included, connection kept",
        arguments: HTTPEngine.allCases
    )
    func chunkedToHTTP11(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            try await self.withProxy { address, backend in
                let text = try await RawClient.send(
                    address,
                    Array(
                        ("GET /chunked HTTP/1.1\r\nHost: x\r\n\r\nGET /close/eof HTTP/1.1\r\nHost: x\r\n\r\n"
                            + "GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").utf8
                    )
                )
                var rest = Substring(text)
                let first = try #require(ChunkedMessage(&rest))
                #expect(first.head == "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                #expect(first.body == "hello world" && first.trailers == "x-checksum: 1\r\n")
                let second = try #require(ChunkedMessage(&rest))
                #expect(second.head == "HTTP/1.1 200 OK\r\nx-b: 2\r\ntransfer-encoding: chunked\r\n\r\n")
                #expect(second.body == "until close" && second.trailers.isEmpty)
                #expect(rest == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok")
                #expect(backend.connections == 2)  // the until-close one was not reused
            }
        }
    }

    @Test(
        "an HTTP/1.0 client gets bodies unchunked, no 1xx, and the connection closed after an unsized one",
        arguments: HTTPEngine.allCases
    )
    func http10Client(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            try await self.withProxy { address, _ in
                let chunked = try await RawClient.send(address, Array("GET /chunked HTTP/1.0\r\nHost: x\r\n\r\n".utf8))
                #expect(chunked == "HTTP/1.0 200 OK\r\nconnection: close\r\n\r\nhello world")
                let keptAlive = try await RawClient.send(
                    address,
                    Array(
                        ("GET /plain HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                            + "GET /continue HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /close/eof HTTP/1.0\r\n\r\n")
                            .utf8
                    )
                )
                #expect(
                    keptAlive
                        == "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\nok"
                        + "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nconnection: keep-alive\r\n\r\nok"
                        + "HTTP/1.0 200 OK\r\nx-b: 2\r\nconnection: close\r\n\r\nuntil close"
                )
            }
        }
    }

    @Test("1xx responses are passed on before the final one, as the backend sent them", arguments: HTTPEngine.allCases)
    func informational(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            try await self.withProxy { address, _ in
                let text = try await RawClient.send(
                    address,
                    Array("GET /continue HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".utf8)
                )
                #expect(
                    text
                        == "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                        + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok"
                )
            }
        }
    }

    @Test(
        "request bodies go up as they came: chunked (with trailers) re-chunked, Content-Length as is",
        arguments: HTTPEngine.allCases
    )
    func requestBodies(engine: HTTPEngine) async throws {
        try await TestEngine.$current.withValue(engine) {
            try await self.withProxy { address, backend in
                let text = try await RawClient.send(
                    address,
                    Array(
                        ("POST /plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                            + "5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n"
                            + "PUT /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
                            .utf8
                    )
                )
                #expect(text == Self.plain + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok")
                var rest = Substring(backend.received)
                let chunked = try #require(ChunkedMessage(&rest))
                #expect(
                    chunked.head
                        == "POST /plain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nx-forwarded-for: 127.0.0.1\r\n\r\n"
                )
                #expect(chunked.body == "hello world" && chunked.trailers == "x-t: 1\r\n")
                #expect(
                    rest
                        == "PUT /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nx-forwarded-for: 127.0.0.1\r\n\r\nabc"
                )
            }
        }
    }
}

/// A head and a chunked body taken off the front of `text`.
private struct ChunkedMessage {
    var head: Substring
    var body = ""
    var trailers = ""

    init?(_ text: inout Substring) {
        guard let headEnd = text.range(of: "\r\n\r\n") else { return nil }
        self.head = text[..<headEnd.upperBound]
        text = text[headEnd.upperBound...]
        while true {
            guard let lineEnd = text.range(of: "\r\n"), let size = Int(text[..<lineEnd.lowerBound], radix: 16)
            else { return nil }
            text = text[lineEnd.upperBound...]
            if size == 0 { break }
            guard text.utf8.count >= size + 2 else { return nil }
            let data = text.utf8.prefix(size)
            self.body += String(Substring(data))
            text = Substring(text.utf8.dropFirst(size + 2))
        }
        // Trailer fields, then the empty line.
        guard let end = text.range(of: "\r\n") else { return nil }
        if end.lowerBound == text.startIndex {
            text = text[end.upperBound...]
            return
        }
        guard let trailersEnd = text.range(of: "\r\n\r\n") else { return nil }
        self.trailers = String(text[..<trailersEnd.lowerBound]) + "\r\n"
        text = text[trailersEnd.upperBound...]
    }
}

/// What a scripted backend was asked (all its connections, in order).
final class ScriptedHTTPBackend: Sendable {
    let responses: [String: String]
    private let state = Mutex<(received: String, connections: Int)>(("", 0))

    init(responses: [String: String]) { self.responses = responses }

    var received: String { self.state.withLock { $0.received } }
    var connections: Int { self.state.withLock { $0.connections } }

    fileprivate func connected() { self.state.withLock { $0.connections += 1 } }
    fileprivate func record(_ bytes: String) { self.state.withLock { $0.received += bytes } }
}

/// A raw HTTP/1.1 backend: for each complete request (its head and its Content-Length or chunked body) it
/// writes the canned response for the path verbatim; `/close/<path>` answers as `<path>`, then closes.
final class ScriptedHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let backend: ScriptedHTTPBackend
    private var buffer = ""

    init(_ backend: ScriptedHTTPBackend) { self.backend = backend }

    func channelActive(context: ChannelHandlerContext) {
        self.backend.connected()
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = String(buffer: Self.unwrapInboundIn(data))
        self.backend.record(bytes)
        self.buffer += bytes
        while let request = self.takeRequest() {
            var path = String(request.split(separator: " ").dropFirst().first ?? "")
            let close = path.hasPrefix("/close/")
            if close { path = String(path.dropFirst("/close".count)) }
            let response = self.backend.responses[path] ?? "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
            let done = context.writeAndFlush(Self.wrapOutboundOut(ByteBuffer(string: response)))
            if close {
                done.assumeIsolated().whenComplete { _ in context.close(promise: nil) }
                return
            }
        }
    }

    /// The request line of the next complete request, taken off the buffer.
    private func takeRequest() -> Substring? {
        var text = Substring(self.buffer)
        guard let headEnd = text.range(of: "\r\n\r\n") else { return nil }
        let head = text[..<headEnd.lowerBound].lowercased()
        let requestLine = text[..<(text.range(of: "\r\n")?.lowerBound ?? headEnd.lowerBound)]
        if head.contains("\r\ntransfer-encoding:") {
            var message = text
            guard ChunkedMessage(&message) != nil else { return nil }
            text = message
        } else if let range = head.range(of: "\r\ncontent-length:") {
            let value = head[range.upperBound...].prefix { $0 != "\r" }.filter { $0 != " " && $0 != "\t" }
            let length = Int(value) ?? 0
            let body = text[headEnd.upperBound...]
            guard body.utf8.count >= length else { return nil }
            text = Substring(body.utf8.dropFirst(length))
        } else {
            text = text[headEnd.upperBound...]
        }
        let line = Substring(String(requestLine))
        self.buffer = String(text)
        return line
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
