import MeshTestSupport
import NIOCore
import NIOHTTP1
import Testing

@_spi(Fuzzing) @testable import MeshAgent

/// The proxy's HTTP/1.1 parser as a codec: bytes in, parts out, every malformed input rejected with its error.
@Suite("HTTP parser: requests, responses, malformed input, incremental equivalence")
struct HTTPParserTests {
    // MARK: requests

    @Test("RFC 9112 sample GET: method, target, version, fields, no body, keep-alive")
    func sampleGet() throws {
        let feed = try Feed.all(
            "GET /hello.txt HTTP/1.1\r\nUser-Agent: curl/7.64.1\r\nHost: www.example.com\r\nAccept-Language: en, mi\r\n\r\n"
        )
        #expect(feed.pieces == [.head(feed.headBytes(0)), .end(nil)])
        let head = try #require(feed.heads.first)
        #expect(head.isRequest)
        #expect(head.method == .GET)
        #expect(head.uri == "/hello.txt")
        #expect(head.version == .http1_1)
        #expect(head.status == 0)
        #expect(
            head.headers.map { [$0.name, $0.value] } == [
                ["User-Agent", "curl/7.64.1"], ["Host", "www.example.com"], ["Accept-Language", "en, mi"],
            ]
        )
        #expect(head.body == .none)
        #expect(head.isKeepAlive)
        #expect(!head.isUpgradeRequest)
        #expect(!head.hasHopByHop)
        #expect(!head.hasTransferEncoding && head.transferEncodingBytes == 0)
        #expect(!head.connectionClose && !head.connectionKeepAlive && !head.connectionUpgrade)
        #expect(!head.connectionNamesOthers && head.upgradeField == nil)
        #expect(head.fieldBytes == Self.lineBytes(head))
        #expect(
            head.fieldBytes
                == "User-Agent: curl/7.64.1\r\nHost: www.example.com\r\nAccept-Language: en, mi\r\n".utf8.count
        )
        #expect(head.first(name: "host") == "www.example.com")
        #expect(head.field(1, is: "host") && !head.field(0, is: "host"))
        #expect(feed.parser.isBetweenMessages)
    }

    @Test("POST with Content-Length: the body's exact bytes, then the end; the next request pipelined")
    func postWithLength() throws {
        let feed = try Feed.all(
            "POST /a?b=c HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
                + "GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        #expect(
            feed.pieces == [
                .head(feed.headBytes(0)), .body(Array("hello".utf8)), .end(nil), .head(feed.headBytes(1)), .end(nil),
            ]
        )
        let (post, get) = (feed.heads[0], feed.heads[1])
        #expect(post.method == .POST && post.uri == "/a?b=c")
        #expect(post.body == .length(5))
        #expect(post.values(name: "content-length") == ["5"])
        #expect(post.isKeepAlive)
        #expect(get.method == .GET && get.uri == "/2" && get.body == .none)
        #expect(get.connectionClose && !get.isKeepAlive && get.hasHopByHop)
        #expect(!get.connectionNamesOthers)
        #expect(get.fieldBytes == Self.lineBytes(get))
        // A zero length is no body part at all.
        let empty = try Feed.all("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        #expect(empty.pieces == [.head(empty.headBytes(0)), .end(nil)])
        #expect(empty.heads[0].body == .length(0))
    }

    @Test("chunked body (RFC 9112 7.1): extensions ignored, chunk data concatenated, trailers delivered")
    func chunkedWithTrailers() throws {
        let trailers = "Expires: Wed, 21 Oct 2026 07:28:00 GMT\r\nX-Sum: 3\r\n"
        let feed = try Feed.all(
            "PUT /wiki HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: Expires\r\n\r\n"
                + "4;name=value\r\nWiki\r\n5 ;x=\"q\"\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n" + trailers + "\r\n"
        )
        #expect(
            feed.pieces == [
                .head(feed.headBytes(0)), .body(Array("Wikipedia in\r\n\r\nchunks.".utf8)), .end(Array(trailers.utf8)),
            ]
        )
        let head = feed.heads[0]
        #expect(head.body == .chunked)
        #expect(head.hasTransferEncoding)
        #expect(head.transferEncodingBytes == "Transfer-Encoding: chunked\r\n".utf8.count)
        #expect(head.hasHopByHop)  // Trailer
        // The chunks arrive one body part each, as slices of what was read.
        #expect(feed.bodies == ["Wiki", "pedia", " in\r\n\r\nchunks."])
        // No trailers: the end has none; a last-chunk with an extension; uppercase hex.
        let plain = try Feed.all(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0;last\r\n\r\n"
        )
        #expect(
            plain.pieces == [.head(plain.headBytes(0)), .body(Array("abcdefghijklmnopqrstuvwxyz".utf8)), .end(nil)]
        )
        // Transfer codings over several fields (a response: a request must have one line, `chunked`): the
        // last one decides.
        let split = try Feed.all(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\ntransfer-encoding: CHUNKED\r\n\r\n0\r\n\r\n",
            kind: .response
        )
        #expect(split.heads[0].body == .chunked)
        #expect(split.heads[0].transferEncodingBytes == 25 + 28)
    }

    @Test("HTTP/1.0: keep-alive only when asked; Connection tokens")
    func connectionTokens() throws {
        let old = try Feed.all("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").heads[0]
        #expect(old.version == .http1_0)
        #expect(old.connectionKeepAlive && old.isKeepAlive && old.hasHopByHop)
        #expect(!(try Feed.all("GET / HTTP/1.0\r\n\r\n").heads[0].isKeepAlive))
        #expect(!(try Feed.all("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").heads[0].isKeepAlive))
        let others = try Feed.all("GET / HTTP/1.1\r\nConnection: ,X-Private , close,\r\nX-Private: 1\r\n\r\n").heads[0]
        #expect(others.connectionClose && others.connectionNamesOthers && !others.isKeepAlive)
        #expect(!others.connectionUpgrade && !others.connectionKeepAlive)
    }

    @Test("empty lines before a request line are ignored (RFC 9112 2.2), at once and byte by byte")
    func leadingEmptyLines() throws {
        let text = "\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"
        for step in [text.utf8.count, 1] {
            let feed = try Feed.all(text, step: step)
            #expect(
                feed.pieces == [
                    .head(Array("GET / HTTP/1.1\r\n\r\n".utf8)), .end(nil),
                    .head(Array("GET /2 HTTP/1.1\r\n\r\n".utf8)), .end(nil),
                ]
            )
            #expect(feed.buffer.readableBytes == 0)
        }
    }

    @Test("values: whitespace around them trimmed, inside kept; empty values; obs-text bytes accepted")
    func fieldValues() throws {
        let bytes: [UInt8] =
            Array("GET / HTTP/1.1\r\nX-A: \t v a l \t \r\nX-E:\r\nX-S:   \r\nX-O: caf".utf8) + [0xe9, 0x80, 0xff]
            + Array(" ~\r\nX-Tab:\tx\ty\r\n\r\n".utf8)
        let feed = try Feed.all(bytes)
        let head = feed.heads[0]
        #expect(head.headers.count == 5)
        #expect(head.value(0) == "v a l")
        #expect(head.value(1) == "" && head.value(2) == "")
        let obs = head.fields[3].value
        let value = head.bytes.getBytes(at: head.bytes.readerIndex + obs.lowerBound, length: obs.count)
        #expect(value == Array("caf".utf8) + [0xe9, 0x80, 0xff] + Array(" ~".utf8))
        #expect(head.value(4) == "x\ty")
        #expect(head.fieldBytes == Self.lineBytes(head))
        #expect(head.fieldBytes == (3 + 5 + 4) + (3 + 0 + 4) + (3 + 0 + 4) + (3 + 8 + 4) + (5 + 3 + 4))
    }

    @Test("upgrade request: flags, then the parser pauses after it and leaves the new protocol's bytes")
    func upgradeRequest() throws {
        let feed = try Feed.all(
            "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n\u{1}\u{2}GET"
        )
        let head = feed.heads[0]
        #expect(head.isUpgradeRequest && head.connectionUpgrade && head.connectionKeepAlive)
        #expect(head.upgradeField == 2 && head.hasHopByHop)
        #expect(feed.pieces == [.head(feed.headBytes(0)), .end(nil)])
        #expect(feed.parser.isPaused)
        #expect(String(buffer: feed.buffer) == "\u{1}\u{2}GET")
        // An Upgrade field without Connection: upgrade is no upgrade.
        let plain = try Feed.all("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\n\r\n")
        #expect(!plain.heads[0].isUpgradeRequest && plain.heads.count == 2 && !plain.parser.isPaused)
    }

    @Test("methods: the standard ones and extension tokens")
    func methods() throws {
        for (text, method) in [
            ("GET", HTTPMethod.GET), ("PUT", .PUT), ("POST", .POST), ("HEAD", .HEAD), ("PATCH", .PATCH),
            ("TRACE", .TRACE), ("DELETE", .DELETE), ("OPTIONS", .OPTIONS), ("PURGE", .RAW(value: "PURGE")),
            ("get", .RAW(value: "get")), ("M-SEARCH", .RAW(value: "M-SEARCH")),
        ] {
            let head = try Feed.all("\(text) * HTTP/1.1\r\n\r\n").heads[0]
            #expect(head.method == method)
            #expect(head.uri == "*")
        }
        // CONNECT: the tunnel starts after the head.
        let connect = try Feed.all("CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n\u{16}\u{3}")
        #expect(connect.heads[0].method == .CONNECT && connect.heads[0].uri == "x:443")
        #expect(connect.parser.isPaused && connect.buffer.readableBytes == 2)
    }

    @Test(
        "hop-by-hop fields (RFC 9110 7.6.1) are noticed, any case",
        arguments: [
            "Connection: x", "TE: trailers", "Trailer: x", "Keep-Alive: 5", "Upgrade: h2c",
            "Proxy-Connection: close", "PROXY-AUTHENTICATE: x", "proxy-authorization: x",
        ]
    )
    func hopByHop(line: String) throws {
        #expect(try Feed.all("GET / HTTP/1.1\r\n\(line)\r\n\r\n").heads[0].hasHopByHop)
        #expect(!(try Feed.all("GET / HTTP/1.1\r\nX-\(line)\r\n\r\n").heads[0].hasHopByHop))
    }

    @Test("Content-Length: a list of one value, or repeated fields: one length in a response, 400 in a request")
    func contentLengthLists() throws {
        for fields in ["Content-Length: 3, 3", "Content-Length: 3\r\ncontent-length: 003", "Content-Length: 3,"] {
            let feed = try Feed.all("HTTP/1.1 200 OK\r\n\(fields)\r\n\r\nabc", kind: .response)
            #expect(feed.heads[0].body == .length(3))
            #expect(!feed.heads[0].contentLengthCanonical)
            #expect(feed.pieces.dropFirst() == [.body(Array("abc".utf8)), .end(nil)])
            #expect(throws: HTTPParseError.ambiguousContentLength) {
                try Feed.all("POST / HTTP/1.1\r\n\(fields)\r\n\r\nabc")
            }
        }
        #expect(try Feed.all("POST / HTTP/1.1\r\nContent-Length:  3 \r\n\r\nabc").heads[0].contentLengthCanonical)
    }

    // MARK: responses

    @Test("RFC 9110 sample response: status, reason, fields, the body by its length")
    func sampleResponse() throws {
        let body = "Hello World! My content includes a trailing CRLF.\r\n"
        let feed = try Feed.all(
            "HTTP/1.1 200 OK\r\nDate: Mon, 27 Jul 2009 12:28:53 GMT\r\nServer: Apache\r\n"
                + "Last-Modified: Wed, 22 Jul 2009 19:15:56 GMT\r\nETag: \"34aa387-d-1568eb00\"\r\nAccept-Ranges: bytes\r\n"
                + "Content-Length: 51\r\nVary: Accept-Encoding\r\nContent-Type: text/plain\r\n\r\n" + body,
            kind: .response
        )
        let head = feed.heads[0]
        #expect(!head.isRequest)
        #expect(head.status == 200 && head.uri == "OK" && head.version == .http1_1)
        #expect(head.headers.count == 8 && head.first(name: "etag") == "\"34aa387-d-1568eb00\"")
        #expect(head.body == .length(51))
        #expect(head.fieldBytes == Self.lineBytes(head))
        #expect(feed.pieces == [.head(feed.headBytes(0)), .body(Array(body.utf8)), .end(nil)])
    }

    @Test("reason phrase: any field bytes, empty, or missing")
    func reasonPhrases() throws {
        let cases: [(String, Int, String)] = [
            ("HTTP/1.1 404 Not Found", 404, "Not Found"), ("HTTP/1.1 200 ", 200, ""), ("HTTP/1.1 200", 200, ""),
            ("HTTP/1.0 599 a\tb ~", 599, "a\tb ~"), ("HTTP/1.1 100 Continue", 100, "Continue"),
        ]
        for (line, status, reason) in cases {
            let head = try Feed.all("\(line)\r\nContent-Length: 0\r\n\r\n", kind: .response).heads[0]
            #expect(head.status == status)
            #expect(head.uri == reason)
        }
    }

    @Test("1xx interim responses, each ended, then the final one")
    func interimResponses() throws {
        let feed = try Feed.all(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            kind: .response
        )
        #expect(
            feed.pieces == [
                .head(feed.headBytes(0)), .end(nil), .head(feed.headBytes(1)), .end(nil), .head(feed.headBytes(2)),
                .body(Array("ok".utf8)), .end(nil),
            ]
        )
        #expect(feed.heads.map(\.status) == [100, 103, 200])
        #expect(feed.heads[1].body == .none)
        #expect(feed.parser.isBetweenMessages)
    }

    @Test("101 Switching Protocols, and 2xx to CONNECT: ended, then paused with the bytes after left alone")
    func switchingProtocols() throws {
        let feed = try Feed.all(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\u{81}\u{2}hi",
            kind: .response
        )
        #expect(feed.pieces == [.head(feed.headBytes(0)), .end(nil)])
        #expect(feed.parser.isPaused)
        #expect(Array(feed.buffer.readableBytesView) == Array("\u{81}\u{2}hi".utf8))
        // Paused: more bytes are not parsed, not even a response.
        try feed.feed(Array("HTTP/1.1 200 OK\r\n\r\n".utf8))
        #expect(feed.parts.count == 2 && feed.buffer.readableBytes == "\u{81}\u{2}hi".utf8.count + 19)
        // Byte by byte, the same.
        let single = try Feed.all(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\u{81}\u{2}hi",
            kind: .response,
            step: 1
        )
        #expect(single.parser.isPaused && Array(single.buffer.readableBytesView) == Array("\u{81}\u{2}hi".utf8))
        let tunnel = try Feed.all(
            "HTTP/1.1 200 Connection established\r\n\r\n\u{16}\u{3}",
            kind: .response,
            method: .CONNECT
        )
        #expect(tunnel.pieces == [.head(tunnel.headBytes(0)), .end(nil)])
        #expect(tunnel.parser.isPaused && tunnel.buffer.readableBytes == 2)
        // A refused CONNECT is an ordinary response.
        let refused = try Feed.all(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 1\r\n\r\nx",
            kind: .response,
            method: .CONNECT
        )
        #expect(refused.pieces.count == 3 && !refused.parser.isPaused)
    }

    @Test("204, 304 and responses to HEAD have no body, whatever their Content-Length says")
    func responsesWithoutBody() throws {
        for (status, method) in [("204 No Content", HTTPMethod.GET), ("304 Not Modified", .GET), ("200 OK", .HEAD)] {
            let text = "HTTP/1.1 \(status)\r\nContent-Length: 10\r\n\r\n"
            let feed = Feed(kind: .response, method: method)
            try feed.feed(Array((text + text).utf8))
            #expect(feed.pieces == [.head(Array(text.utf8)), .end(nil), .head(Array(text.utf8)), .end(nil)])
            #expect(feed.heads[0].body == .none)
        }
        // Chunked too.
        let feed = Feed(kind: .response, method: .HEAD)
        try feed.feed(Array("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".utf8))
        #expect(feed.pieces.count == 2 && feed.parser.isBetweenMessages)
        // The method applies until changed.
        feed.parser.expectResponse(to: .GET)
        try feed.feed(Array("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx".utf8))
        #expect(feed.pieces.suffix(3) == [.head(feed.headBytes(1)), .body([UInt8(ascii: "x")]), .end(nil)])
    }

    @Test("until close: no length, or a last transfer coding that is not chunked; finish ends it")
    func untilClose() throws {
        for (fields, body) in [
            ("Server: x", HTTPHead.Body.untilClose(transferCoded: false)),
            ("Transfer-Encoding: gzip", .untilClose(transferCoded: true)),
            ("Transfer-Encoding: chunked, gzip", .untilClose(transferCoded: true)),
            ("Transfer-Encoding: chunked, chunked", .untilClose(transferCoded: true)),
        ] {
            let text = "HTTP/1.1 200 OK\r\n\(fields)\r\n\r\nall of it\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
            for step in [text.utf8.count, 1] {
                let feed = try Feed.all(text, kind: .response, step: step)
                #expect(feed.heads.count == 1 && feed.heads[0].body == body)
                #expect(feed.pieces.count == 2)
                try feed.finish()
                #expect(
                    feed.pieces == [
                        .head(feed.headBytes(0)), .body(Array(text.utf8.dropFirst(feed.heads[0].bytes.readableBytes))),
                        .end(nil),
                    ]
                )
                // Nothing after the end.
                try feed.feed(Array("HTTP/1.1 200 OK\r\n\r\n".utf8))
                try? feed.finish()
                #expect(feed.pieces.count == 3)
            }
        }
        // No body at all: the end comes with finish.
        let feed = try Feed.all("HTTP/1.0 200 OK\r\n\r\n", kind: .response)
        #expect(feed.pieces == [.head(feed.headBytes(0))])
        try feed.finish()
        #expect(feed.pieces == [.head(feed.headBytes(0)), .end(nil)])
    }

    @Test("finish: nothing to do between messages (even after empty lines); a paused parser keeps its bytes")
    func finishBetweenMessages() throws {
        for text in ["", "GET / HTTP/1.1\r\n\r\n", "GET / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx\r\n\r\n"] {
            let feed = try Feed.all(text)
            let count = feed.parts.count
            try feed.finish()
            #expect(feed.parts.count == count)
        }
        let paused = try Feed.all("GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nbytes")
        #expect(paused.parser.isPaused)
        try paused.finish()
        #expect(paused.parts.count == 2 && String(buffer: paused.buffer) == "bytes")
    }

    // MARK: malformed input

    /// One malformed input and the error it must be rejected with.
    struct Malformed: CustomTestStringConvertible, Sendable {
        let name: String
        let kind: HTTPParser.Kind
        let bytes: [UInt8]
        let error: HTTPParseError
        var limits = HTTPParser.Limits()
        /// Whether the error comes only when the input ends.
        var atEnd = false

        init(_ name: String, _ kind: HTTPParser.Kind, _ text: String, _ error: HTTPParseError) {
            self.name = name
            self.kind = kind
            self.bytes = Array(text.utf8)
            self.error = error
        }

        var testDescription: String { "\(self.name) -> \(self.error)" }
    }

    static let requestLine = "GET / HTTP/1.1\r\n"
    static let chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"

    static let malformed: [Malformed] = {
        let r = Self.requestLine
        var cases: [Malformed] = [
            .init("bare LF ending the request line", .request, "GET / HTTP/1.1\nHost: x\r\n\r\n", .invalidLineEnding),
            .init("bare LF ending a field line", .request, r + "Host: x\n\r\n", .invalidLineEnding),
            .init("bare LF as the blank line", .request, r + "Host: x\r\n\n", .invalidLineEnding),
            .init("bare LF first", .request, "\nGET / HTTP/1.1\r\n\r\n", .invalidLineEnding),
            .init("bare CR in a value", .request, r + "X: a\rb\r\n\r\n", .invalidLineEnding),
            .init("bare CR in a name", .request, r + "X\r: a\r\n\r\n", .invalidLineEnding),
            .init("bare CR ending the request line", .request, "GET / HTTP/1.1\r\r\n\r\n", .invalidLineEnding),
            .init("bare CR in the target", .request, "GET /\r HTTP/1.1\r\n\r\n", .invalidLineEnding),
            .init("bare CR in a reason phrase", .response, "HTTP/1.1 200 O\rK\r\n\r\n", .invalidLineEnding),
            .init("bare CR in a trailer", .request, Self.chunked + "0\r\nX: a\rb\r\n\r\n", .invalidLineEnding),
            .init("bare LF ending a trailer", .request, Self.chunked + "0\r\nX: a\n\r\n", .invalidLineEnding),
            .init("bare LF ending a chunk size", .request, Self.chunked + "4\nWiki\r\n0\r\n\r\n", .invalidLineEnding),
            .init("space before a colon", .request, r + "Host : x\r\n\r\n", .spaceBeforeColon),
            .init("tab before a colon", .request, r + "Host\t: x\r\n\r\n", .spaceBeforeColon),
            .init("space before a trailer's colon", .request, Self.chunked + "0\r\nX : y\r\n\r\n", .spaceBeforeColon),
            .init("obs-fold with a space", .request, r + "X: a\r\n b\r\n\r\n", .obsoleteLineFolding),
            .init("obs-fold with a tab", .response, "HTTP/1.1 200 OK\r\nX: a\r\n\tb\r\n\r\n", .obsoleteLineFolding),
            .init("whitespace before the first field", .request, r + " Host: x\r\n\r\n", .obsoleteLineFolding),
            .init("bad method byte", .request, "G(T / HTTP/1.1\r\n\r\n", .invalidMethod),
            .init("no method", .request, " / HTTP/1.1\r\n\r\n", .invalidMethod),
            .init("no space at all", .request, "GET\r\n\r\n", .invalidMethod),
            .init("DEL in the target", .request, "GET /a\u{7f}b HTTP/1.1\r\n\r\n", .invalidTarget),
            .init("control byte in the target", .request, "GET /a\u{1}b HTTP/1.1\r\n\r\n", .invalidTarget),
            .init("empty target", .request, "GET  HTTP/1.1\r\n\r\n", .invalidTarget),
            .init("no version", .request, "GET /\r\n\r\n", .invalidTarget),
            .init("HTTP/2.0 request", .request, "GET / HTTP/2.0\r\n\r\n", .unsupportedVersion),
            .init("HTTP/1.2 request", .request, "GET / HTTP/1.2\r\n\r\n", .unsupportedVersion),
            .init("lowercase version", .request, "GET / http/1.1\r\n\r\n", .unsupportedVersion),
            .init("space after the version", .request, "GET / HTTP/1.1 \r\n\r\n", .unsupportedVersion),
            .init("two spaces before the version", .request, "GET /  HTTP/1.1\r\n\r\n", .unsupportedVersion),
            .init("HTTP/2.0 response", .response, "HTTP/2.0 200 OK\r\n\r\n", .unsupportedVersion),
            .init("HTTP/1.2 response", .response, "HTTP/1.2 200 OK\r\n\r\n", .unsupportedVersion),
            .init("HTTP/2 response", .response, "HTTP/2 200 OK\r\n\r\n", .unsupportedVersion),
            .init("two-digit status", .response, "HTTP/1.1 20 OK\r\n\r\n", .invalidStatus),
            .init("letter in the status", .response, "HTTP/1.1 2x0 OK\r\n\r\n", .invalidStatus),
            .init("status under 100", .response, "HTTP/1.1 099 X\r\n\r\n", .invalidStatus),
            .init("no space after the status", .response, "HTTP/1.1 200OK\r\n\r\n", .invalidStatus),
            .init("two spaces before the status", .response, "HTTP/1.1  200 OK\r\n\r\n", .invalidStatus),
            .init("control byte in the reason", .response, "HTTP/1.1 200 O\u{1}K\r\n\r\n", .invalidStatus),
            .init("short status line", .response, "HTTP/1.1\r\n\r\n", .invalidStatus),
            .init("bad field name byte", .request, r + "X\"Y: a\r\n\r\n", .invalidFieldName),
            .init("empty field name", .request, r + ": a\r\n\r\n", .invalidFieldName),
            .init("field line without colon", .request, r + "Host\r\n\r\n", .invalidFieldName),
            .init("NUL in a value", .request, r + "X: a\u{0}b\r\n\r\n", .invalidFieldValue),
            .init("DEL in a value", .response, "HTTP/1.1 200 OK\r\nX: \u{7f}\r\n\r\n", .invalidFieldValue),
            .init(
                "Content-Length and Transfer-Encoding",
                .request,
                r + "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                .contentLengthWithTransferEncoding
            ),
            .init(
                "Transfer-Encoding and Content-Length in a 304",
                .response,
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                .contentLengthWithTransferEncoding
            ),
            .init(
                "two Content-Length fields",
                .request,
                r + "Content-Length: 5\r\nContent-Length: 6\r\n\r\n",
                .conflictingContentLength
            ),
            .init(
                "a Content-Length list",
                .response,
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
                .conflictingContentLength
            ),
            .init("letters in Content-Length", .request, r + "Content-Length: abc\r\n\r\n", .invalidContentLength),
            .init("negative Content-Length", .request, r + "Content-Length: -1\r\n\r\n", .invalidContentLength),
            .init("signed Content-Length", .request, r + "Content-Length: +1\r\n\r\n", .invalidContentLength),
            .init("empty Content-Length", .request, r + "Content-Length: \r\n\r\n", .invalidContentLength),
            .init("Content-Length of commas", .request, r + "Content-Length: ,\r\n\r\n", .invalidContentLength),
            .init("spaced Content-Length", .request, r + "Content-Length: 1 2\r\n\r\n", .invalidContentLength),
            .init(
                "19-digit Content-Length",
                .response,
                "HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000000\r\n\r\n",
                .invalidContentLength
            ),
            .init("request TE gzip only", .request, r + "Transfer-Encoding: gzip\r\n\r\n", .unsupportedTransferCoding),
            .init(
                "request TE chunked then gzip",
                .request,
                r + "Transfer-Encoding: chunked, gzip\r\n\r\n",
                .unsupportedTransferCoding
            ),
            .init(
                "request TE chunked, chunked",
                .request,
                r + "Transfer-Encoding: chunked, chunked\r\n\r\n",
                .unsupportedTransferCoding
            ),
            .init(
                "request TE chunked in two fields",
                .request,
                r + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                .unsupportedTransferCoding
            ),
            .init("request TE empty", .request, r + "Transfer-Encoding: \r\n\r\n", .unsupportedTransferCoding),
            .init("chunk size not hex", .request, Self.chunked + "zz\r\n", .invalidChunkSize),
            .init("chunk size starting with a bad byte", .request, Self.chunked + "x", .invalidChunkSize),
            .init("empty chunk size", .request, Self.chunked + "\r\n", .invalidChunkSize),
            .init("chunk size then junk", .request, Self.chunked + "4 x\r\nWiki\r\n", .invalidChunkSize),
            .init("16 hex digits", .request, Self.chunked + "1000000000000000\r\n", .invalidChunkSize),
            .init("negative chunk size", .request, Self.chunked + "-1\r\n", .invalidChunkSize),
            .init(
                "chunk extension with a control byte",
                .request,
                Self.chunked + "4;a\u{1}\r\nWiki\r\n",
                .invalidChunk
            ),
            .init("chunk data then junk", .request, Self.chunked + "4\r\nWikiX\r\n", .invalidChunk),
            .init("chunk data then CR and junk", .request, Self.chunked + "4\r\nWiki\rX", .invalidChunk),
            .init("chunk data longer than its size", .request, Self.chunked + "4\r\nWikipedia\r\n", .invalidChunk),
            .init(
                "chunk data, one wrong byte",
                .response,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab",
                .invalidChunk
            ),
        ]
        // Limits (small, to keep the inputs small).
        let small = HTTPParser.Limits(headBytes: 64, fieldBytes: 32)
        func limited(_ name: String, _ kind: HTTPParser.Kind, _ text: String, _ error: HTTPParseError) -> Malformed {
            var m = Malformed(name, kind, text, error)
            m.limits = small
            return m
        }
        let x20 = String(repeating: "x", count: 20)
        cases += [
            limited("head over the limit", .request, r + "A: \(x20)\r\nB: \(x20)\r\nC: \(x20)\r\n\r\n", .headTooLarge),
            limited(
                "head over the limit, no end yet",
                .request,
                r + "A: \(x20)\r\nB: \(x20)\r\nC: \(x20)",
                .headTooLarge
            ),
            limited("request line over the line limit", .request, "GET /\(x20)\(x20) HTTP/1.1\r\n\r\n", .headTooLarge),
            limited("field line over the limit", .request, r + "A: \(x20)\(x20)\r\n\r\n", .fieldTooLarge),
            limited("field line over the limit, no end yet", .request, r + "A: \(x20)\(x20)", .fieldTooLarge),
            limited(
                "trailer line over the limit",
                .request,
                Self.chunked + "0\r\nA: \(x20)\(x20)\r\n\r\n",
                .fieldTooLarge
            ),
            limited(
                "trailers over the limit",
                .request,
                Self.chunked + "0\r\nA: \(x20)\r\nB: \(x20)\r\nC: \(x20)\r\n\r\n",
                .headTooLarge
            ),
            limited("status line over the line limit", .response, "HTTP/1.1 200 \(x20)\(x20)\r\n\r\n", .headTooLarge),
        ]
        // Cut off by the end of input.
        func cut(_ name: String, _ kind: HTTPParser.Kind, _ text: String) -> Malformed {
            var m = Malformed(name, kind, text, .incompleteMessage)
            m.atEnd = true
            return m
        }
        cases += [
            cut("EOF in a Content-Length body", .request, r + "Content-Length: 5\r\n\r\nhell"),
            cut("EOF in a response body", .response, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            cut("EOF in a head", .request, r + "Host: x\r\n"),
            cut("EOF in a request line", .request, "GET / HT"),
            cut("EOF after a CR", .request, "\r"),
            cut("EOF in a chunk size", .request, Self.chunked + "4"),
            cut("EOF in chunk data", .request, Self.chunked + "4\r\nWi"),
            cut("EOF after chunk data", .request, Self.chunked + "4\r\nWiki\r"),
            cut("EOF before the trailers' end", .request, Self.chunked + "0\r\nX: y\r\n"),
            cut("EOF in an interim response", .response, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"),
        ]
        return cases
    }()

    @Test(
        "malformed input is rejected with its error, at once and byte by byte, then nothing more comes",
        arguments: Self.malformed
    )
    func rejectsMalformed(_ m: Malformed) throws {
        for step in [m.bytes.count, 1] {
            let feed = Feed(kind: m.kind, limits: m.limits)
            #expect(throws: m.error, "step \(step)") {
                var offset = 0
                while offset < m.bytes.count {
                    try feed.feed(m.bytes[offset..<min(offset + step, m.bytes.count)])
                    offset += step
                }
                #expect(m.atEnd, "only detected at the end of input")
                try feed.finish()
            }
            // Nothing more, whatever comes.
            let count = feed.parts.count
            try feed.feed(Array("GET / HTTP/1.1\r\n\r\nHTTP/1.1 200 OK\r\n\r\n".utf8))
            try? feed.finish()
            #expect(feed.parts.count == count)
            #expect(!feed.parser.isBetweenMessages)
        }
    }

    @Test("HTTPParseError: 431 for the size limits only, and a description for every case")
    func errorDescriptions() {
        let all: [HTTPParseError] = [
            .invalidLineEnding, .invalidMethod, .invalidTarget, .unsupportedVersion, .invalidStatus, .invalidFieldName,
            .invalidFieldValue, .spaceBeforeColon, .obsoleteLineFolding, .invalidContentLength,
            .conflictingContentLength, .contentLengthWithTransferEncoding, .unsupportedTransferCoding,
            .invalidChunkSize,
            .invalidChunk, .headTooLarge, .fieldTooLarge, .incompleteMessage,
        ]
        #expect(all.filter(\.isTooLarge) == [.headTooLarge, .fieldTooLarge])
        #expect(Set(all.map(\.description)).count == all.count)
        // Every case has a malformed input above.
        #expect(Set(Self.malformed.map(\.error.description)) == Set(all.map(\.description)))
    }

    @Test("limits: a head exactly at them is accepted, at once and byte by byte")
    func limitsExactly() throws {
        let limits = HTTPParser.Limits(headBytes: 64, fieldBytes: 32)
        // The request line is 16 bytes with its CRLF; field lines of 32 bytes (with CRLF) up to 64 bytes.
        let line = "A: " + String(repeating: "x", count: 27) + "\r\n"
        #expect(line.utf8.count == 32)
        let text = Self.requestLine + line + "B: " + String(repeating: "y", count: 11) + "\r\n" + "\r\n"
        for step in [text.utf8.count, 1] {
            let feed = try Feed.all(text, step: step, limits: limits)
            #expect(feed.heads.count == 1 && feed.heads[0].fields.count == 2)
        }
        // One byte more is too large, in the line or in the head, fed at once or byte by byte.
        #expect(throws: HTTPParseError.fieldTooLarge) {
            try Feed.all(Self.requestLine + "A: x" + line + "\r\n", limits: limits)
        }
        for step in [1000, 1] {
            #expect(throws: HTTPParseError.fieldTooLarge) {
                // 33 bytes with its CRLF.
                try Feed.all(Self.requestLine + "A: xx" + line.dropFirst(4) + "\r\n", step: step, limits: limits)
            }
            #expect(throws: HTTPParseError.fieldTooLarge) {
                try Feed.all(Self.requestLine + "A: xxx" + line.dropFirst(4) + "\r\n", step: step, limits: limits)
            }
        }
        #expect(throws: HTTPParseError.headTooLarge) {
            try Feed.all(
                Self.requestLine + line + "B: " + String(repeating: "y", count: 12) + "\r\n\r\n",
                limits: limits
            )
        }
    }

    // MARK: incremental equivalence

    static let sequences: [(String, HTTPParser.Kind, String)] = [
        (
            "pipelined requests", .request,
            "GET /hello.txt HTTP/1.1\r\nHost: www.example.com\r\n\r\n\r\nPOST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
                + "GET /2 HTTP/1.0\r\nConnection: keep-alive\r\nX-Obs: caf\u{e9} \t\r\n\r\n"
        ),
        (
            "chunked request with trailers", .request,
            "PUT /wiki HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\r\nWiki\r\n5 ; c=\"d\"\r\npedia\r\n"
                + "E\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\nX-Sum: 1\r\n\r\nDELETE /x HTTP/1.1\r\n\r\n"
        ),
        (
            "upgrade request", .request,
            "GET /chat HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nab\u{81}\u{5}hello"
        ),
        (
            "interim and final responses", .response,
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
                + "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 204 No Content\r\n\r\n"
                + "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX: y\r\n\r\n"
                + "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                + "HTTP/1.1 200 OK\r\n\r\nuntil the connection closes"
        ),
        (
            "switching protocols", .response,
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\u{81}\u{2}hi"
        ),
    ]

    @Test("the same parts at once, byte by byte and in random splits", arguments: 0..<Self.sequences.count)
    func incrementalEquivalence(_ index: Int) throws {
        let (_, kind, text) = Self.sequences[index]
        let bytes = Array(text.utf8)
        let whole = try Feed.all(bytes, kind: kind)
        try whole.finishUnlessPaused()
        #expect(whole.heads.count >= 2 || whole.parser.isPaused)
        var random = SplitMix(seed: 0x5eed + UInt64(index))
        var splits: [[Int]] = [Array(repeating: 1, count: bytes.count)]
        for _ in 0..<200 {
            var sizes: [Int] = []
            var left = bytes.count
            while left > 0 {
                let size = min(
                    left,
                    Int.random(in: 1...max(1, bytes.count / Int.random(in: 1...8, using: &random)), using: &random)
                )
                sizes.append(size)
                left -= size
            }
            splits.append(sizes)
        }
        for sizes in splits {
            let feed = Feed(kind: kind)
            var offset = 0
            for size in sizes {
                try feed.feed(bytes[offset..<offset + size])
                offset += size
            }
            try feed.finishUnlessPaused()
            #expect(feed.pieces == whole.pieces, "split \(sizes)")
            #expect(zip(feed.heads, whole.heads).allSatisfy { Self.sameHead($0, $1) })
            #expect(feed.parser.isPaused == whole.parser.isPaused)
            #expect(Array(feed.buffer.readableBytesView) == Array(whole.buffer.readableBytesView))
        }
    }

    @Test("the fuzz target's checks hold for the sample sequences, and its feedings parse every message in them")
    func fuzzTargetOnSamples() {
        // Messages in each sample: heads and ends (an interim response, a 101 too, has an end of its own).
        let expected: [String: (heads: Int, ends: Int)] = [
            "pipelined requests": (3, 3),
            "chunked request with trailers": (2, 2),
            "upgrade request": (1, 1),
            "interim and final responses": (7, 7),
            "switching protocols": (2, 2),
        ]
        for (name, kind, text) in Self.sequences {
            let bytes = Array(text.utf8)
            bytes.withUnsafeBytes { HTTPFuzzing.fuzzOne($0) }
            let whole = HTTPFuzzing.run(bytes, kind: kind, method: .GET, step: bytes.count)
            let single = HTTPFuzzing.run(bytes, kind: kind, method: .GET, step: 1)
            #expect(whole.error == nil && single.error == nil, "\(name): \(String(describing: whole.error))")
            #expect(whole.parts == single.parts, "\(name)")
            #expect(whole.paused == single.paused && whole.left == single.left, "\(name)")
            let heads = whole.parts.filter { if case .head = $0 { true } else { false } }.count
            let ends = whole.parts.filter { if case .end = $0 { true } else { false } }.count
            #expect(
                heads == expected[name]?.heads && ends == expected[name]?.ends,
                "\(name): \(heads) heads, \(ends) ends"
            )
        }
        // And the checks reject what breaks them: garbage is a typed error, the same however it arrives.
        let garbage = Array("GET / HTTP/1.1\r\nBad Field\r\n\r\n".utf8)
        let whole = HTTPFuzzing.run(garbage, kind: .request, method: .GET, step: garbage.count)
        let single = HTTPFuzzing.run(garbage, kind: .request, method: .GET, step: 1)
        #expect(whole.error != nil && whole.error == single.error && whole.parts.isEmpty)
    }

    // MARK: bodies are slices

    @Test("a large body read at once comes out as one body part: the same bytes, not a copy")
    func bodyIsSlice() throws {
        let size = 1 << 20
        let headText = "POST /upload HTTP/1.1\r\nContent-Length: \(size)\r\n\r\n"
        var buffer = ByteBuffer(string: headText)
        buffer.writeBytes((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        let base = buffer.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        var parser = HTTPParser(kind: .request)
        var parts: [MeshAgent.HTTPPart] = []
        try parser.parse(&buffer) { parts.append($0) }
        #expect(parts.count == 3)
        guard parts.count == 3, case .body(let body) = parts[1] else {
            Issue.record("no body part")
            return
        }
        #expect(body.readableBytes == size)
        #expect(body.readableBytesView.elementsEqual((0..<size).lazy.map { UInt8(truncatingIfNeeded: $0 &* 31) }))
        let bodyBase = body.withUnsafeReadableBytes { UInt(bitPattern: $0.baseAddress) }
        #expect(bodyBase == base + UInt(headText.utf8.count))
        #expect(buffer.readableBytes == 0)
    }

    // MARK: helpers

    /// The bytes of a head's field lines as `name: value\r\n`, from its name and value strings.
    static func lineBytes(_ head: HTTPHead) -> Int {
        head.fields.reduce(0) { $0 + $1.name.count + $1.value.count + 4 }
    }

    static func sameHead(_ a: HTTPHead, _ b: HTTPHead) -> Bool {
        a.bytes == b.bytes && a.headers.map { [$0.name, $0.value] } == b.headers.map { [$0.name, $0.value] }
            && a.body == b.body && a.status == b.status && a.method == b.method && a.version == b.version
            && a.target == b.target && a.fieldBytes == b.fieldBytes && a.isKeepAlive == b.isKeepAlive
    }
}

/// A part as compared: a head by its bytes, bodies concatenated, an end with its trailer lines.
enum Piece: Equatable, CustomStringConvertible {
    case head([UInt8])
    case body([UInt8])
    case end([UInt8]?)

    var description: String {
        switch self {
        case .head(let b): return "head(\(String(decoding: b, as: UTF8.self).debugDescription))"
        case .body(let b): return "body(\(String(decoding: b, as: UTF8.self).debugDescription))"
        case .end(let b): return "end(\(b.map { String(decoding: $0, as: UTF8.self).debugDescription } ?? "nil"))"
        }
    }
}

/// A parser and what it was fed and delivered.
final class Feed {
    var parser: HTTPParser
    var buffer = ByteBuffer()
    var parts: [MeshAgent.HTTPPart] = []

    init(kind: HTTPParser.Kind, method: HTTPMethod = .GET, limits: HTTPParser.Limits = .init()) {
        self.parser = HTTPParser(kind: kind, limits: limits)
        self.parser.expectResponse(to: method)
    }

    static func all(
        _ text: String,
        kind: HTTPParser.Kind = .request,
        method: HTTPMethod = .GET,
        step: Int? = nil,
        limits: HTTPParser.Limits = .init()
    ) throws -> Feed {
        try Self.all(Array(text.utf8), kind: kind, method: method, step: step, limits: limits)
    }

    /// A parser fed `bytes` (`step` at a time, or at once).
    static func all(
        _ bytes: [UInt8],
        kind: HTTPParser.Kind = .request,
        method: HTTPMethod = .GET,
        step: Int? = nil,
        limits: HTTPParser.Limits = .init()
    ) throws -> Feed {
        let feed = Feed(kind: kind, method: method, limits: limits)
        let step = max(step ?? bytes.count, 1)
        var offset = 0
        repeat {
            try feed.feed(bytes[offset..<min(offset + step, bytes.count)])
            offset += step
        } while offset < bytes.count
        return feed
    }

    func feed(_ bytes: some Collection<UInt8>) throws {
        self.buffer.writeBytes(bytes)
        try self.parser.parse(&self.buffer) { self.parts.append($0) }
    }

    func finish() throws {
        try self.parser.finish(&self.buffer) { self.parts.append($0) }
    }

    func finishUnlessPaused() throws {
        if !self.parser.isPaused { try self.finish() }
    }

    var heads: [HTTPHead] {
        self.parts.compactMap {
            if case .head(let head) = $0 { return head }
            return nil
        }
    }

    func headBytes(_ index: Int) -> [UInt8] { Array(self.heads[index].bytes.readableBytesView) }

    /// The body parts, one string each.
    var bodies: [String] {
        self.parts.compactMap {
            if case .body(let body) = $0 { return String(buffer: body) }
            return nil
        }
    }

    var pieces: [Piece] {
        var pieces: [Piece] = []
        for part in self.parts {
            switch part {
            case .head(let head): pieces.append(.head(Array(head.bytes.readableBytesView)))
            case .body(let body):
                if case .body(let previous) = pieces.last {
                    pieces[pieces.count - 1] = .body(previous + Array(body.readableBytesView))
                } else {
                    pieces.append(.body(Array(body.readableBytesView)))
                }
            case .end(let trailers): pieces.append(.end(trailers.map { Array($0.readableBytesView) }))
            }
        }
        return pieces
    }
}
