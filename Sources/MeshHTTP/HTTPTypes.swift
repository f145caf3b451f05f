import NIOCore
import NIOHTTP1
import NIOSSL

/// A whole request: head and body (collected up to the server's limit).
public struct HTTPRequest: Sendable {
    public var method: HTTPMethod
    /// The request target as sent (`/apis/...?watch=true`).
    public var uri: String
    /// The percent-decoded path, without the query.
    public var path: String
    /// The percent-decoded query parameters; the last one wins when repeated.
    public var query: [String: String]
    public var headers: HTTPHeaders
    public var body: ByteBuffer
    public var remoteAddress: SocketAddress?
    /// Who the client is, from its verified TLS certificate (see `HTTPServerTLS.identify`); nil when
    /// it sent none or the server speaks plain HTTP.
    public var peerIdentity: String?
    /// The serial number of the client's verified TLS certificate (its DER integer's bytes; nil: none), for
    /// checks beyond the identity (revocation).
    public var peerCertificateSerial: [UInt8]?

    public init(
        method: HTTPMethod,
        uri: String,
        headers: HTTPHeaders = [:],
        body: ByteBuffer = ByteBuffer(),
        remoteAddress: SocketAddress? = nil
    ) {
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = body
        self.remoteAddress = remoteAddress
        let (path, query) = HTTPRequest.split(uri)
        self.path = path
        self.query = query
    }

    /// Splits a request target into its decoded path and query parameters.
    public static func split(_ uri: String) -> (path: String, query: [String: String]) {
        let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let path = percentDecode(String(parts[0]), plusIsSpace: false) ?? String(parts[0])
        var query: [String: String] = [:]
        if parts.count == 2 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let key = percentDecode(String(kv[0]), plusIsSpace: true) ?? String(kv[0])
                let value = kv.count == 2 ? (percentDecode(String(kv[1]), plusIsSpace: true) ?? String(kv[1])) : ""
                query[key] = value
            }
        }
        return (path, query)
    }

    /// Decodes `%XX` escapes; nil when an escape is malformed or the result is not UTF-8.
    public static func percentDecode(_ s: String, plusIsSpace: Bool) -> String? {
        guard s.utf8.contains(where: { $0 == UInt8(ascii: "%") || (plusIsSpace && $0 == UInt8(ascii: "+")) }) else {
            return s
        }
        var out: [UInt8] = []
        var it = Array(s.utf8)[...]
        while let c = it.popFirst() {
            if c == UInt8(ascii: "%") {
                guard it.count >= 2, let hi = hexValue(it.popFirst()!), let lo = hexValue(it.popFirst()!) else {
                    return nil
                }
                out.append(hi << 4 | lo)
            } else if plusIsSpace && c == UInt8(ascii: "+") {
                out.append(UInt8(ascii: " "))
            } else {
                out.append(c)
            }
        }
        return String(validating: out, as: UTF8.self)
    }

    /// Escapes everything but unreserved characters (RFC 3986), for building paths and queries.
    public static func percentEncode(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(b))
            default:
                let hex = Array("0123456789ABCDEF")
                out += "%\(hex[Int(b >> 4)])\(hex[Int(b & 0xf)])"
            }
        }
        return out
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return c - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

/// A response: a whole body, a stream written by the responder until it returns, or a pushed stream.
public struct HTTPResponse: Sendable {
    public var status: HTTPResponseStatus
    public var headers: HTTPHeaders
    public var body: Body

    public enum Body: Sendable {
        case bytes(ByteBuffer)
        /// Written with chunked encoding; the closure returns when the stream ends.
        case stream(@Sendable (HTTPBodyWriter) async throws -> Void)
        /// Written with chunked encoding as its source pushes data, with no task waiting for it (a watch).
        case push(any HTTPEventSource)
    }

    public init(status: HTTPResponseStatus, headers: HTTPHeaders = [:], body: Body = .bytes(ByteBuffer())) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// A plain text response (a trailing newline is added).
    public static func text(_ status: HTTPResponseStatus, _ text: String) -> HTTPResponse {
        HTTPResponse(
            status: status,
            headers: ["Content-Type": "text/plain; charset=utf-8"],
            body: .bytes(ByteBuffer(string: text + "\n"))
        )
    }

    /// A JSON response from already-encoded bytes.
    public static func json(_ status: HTTPResponseStatus, _ bytes: ByteBuffer) -> HTTPResponse {
        HTTPResponse(status: status, headers: ["Content-Type": "application/json"], body: .bytes(bytes))
    }
}

/// What a streaming responder writes to: body chunks, and a way to learn the client went away.
public struct HTTPBodyWriter: Sendable {
    let writeChunk: @Sendable (ByteBuffer) async throws -> Void
    /// Completes when the client closes its side of the connection (or the connection closes).
    public let clientClosed: EventLoopFuture<Void>

    private let closedFlag: Flag

    public init(clientClosed: EventLoopFuture<Void>, write: @escaping @Sendable (ByteBuffer) async throws -> Void) {
        self.clientClosed = clientClosed
        self.writeChunk = write
        let flag = Flag()
        clientClosed.whenComplete { _ in flag.set() }
        self.closedFlag = flag
    }

    /// True once the client has closed (or the server is shutting down): stop streaming.
    public var isClientClosed: Bool { self.closedFlag.isSet }

    /// Writes and flushes one chunk; waits while the client is not reading (back-pressure).
    public func write(_ buffer: ByteBuffer) async throws {
        try await self.writeChunk(buffer)
    }
}

/// Answers requests. Must not throw: every failure is a response.
public protocol HTTPResponder: Sendable {
    func respond(to request: HTTPRequest) async -> HTTPResponse

    /// An answer that needs no wait (no store, no I/O, a lock at most), made on the connection's event loop
    /// without starting a task: the bytes, or a pushed body, never a stream. Nil: `respond(to:)` takes the
    /// request in a task of its own. The control plane answers a known node's heartbeat here: at 500 beats a
    /// second, a task per beat was a hop to the cooperative pool and back, and a thread woken, for each.
    func respondAtOnce(to request: HTTPRequest) -> HTTPResponse?
}

extension HTTPResponder {
    public func respondAtOnce(to request: HTTPRequest) -> HTTPResponse? { nil }
}

/// A responder from a closure.
public struct ClosureResponder: HTTPResponder {
    let body: @Sendable (HTTPRequest) async -> HTTPResponse

    public init(_ body: @escaping @Sendable (HTTPRequest) async -> HTTPResponse) {
        self.body = body
    }

    public func respond(to request: HTTPRequest) async -> HTTPResponse {
        await self.body(request)
    }
}
