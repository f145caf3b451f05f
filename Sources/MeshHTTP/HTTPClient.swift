import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Where a server is: `http://host:port` or `https://host:port`.
public struct HTTPEndpoint: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int
    /// HTTPS: the client needs `HTTPClientTLS` settings.
    public var tls: Bool

    public init(host: String, port: Int, tls: Bool = false) {
        self.host = host
        self.port = port
        self.tls = tls
    }

    /// Parses `http://host:port`, `https://host:port`, `host:port` or `[v6]:port`; without a
    /// scheme, `defaultTLS` decides.
    public init?(url: String, defaultTLS: Bool = false) {
        var rest = Substring(url)
        self.tls = defaultTLS
        if rest.hasPrefix("http://") {
            rest = rest.dropFirst(7)
            self.tls = false
        } else if rest.hasPrefix("https://") {
            rest = rest.dropFirst(8)
            self.tls = true
        }
        if rest.hasSuffix("/") { rest = rest.dropLast() }
        guard !rest.contains("/"), !rest.isEmpty else { return nil }
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { return nil }
            self.host = String(rest[rest.index(after: rest.startIndex)..<close])
            let after = rest[rest.index(after: close)...]
            guard after.hasPrefix(":"), let p = Int(after.dropFirst()), (1...65535).contains(p) else { return nil }
            self.port = p
        } else if let colon = rest.lastIndex(of: ":") {
            self.host = String(rest[..<colon])
            guard let p = Int(rest[rest.index(after: colon)...]), (1...65535).contains(p) else { return nil }
            self.port = p
        } else {
            self.host = String(rest)
            self.port = self.tls ? 443 : 80
        }
        if self.host.isEmpty { return nil }
    }

    public var description: String {
        let scheme = self.tls ? "https" : "http"
        return self.host.contains(":")
            ? "\(scheme)://[\(self.host)]:\(self.port)" : "\(scheme)://\(self.host):\(self.port)"
    }
}

/// A response read whole.
public struct HTTPClientResponse: Sendable {
    public var status: HTTPResponseStatus
    public var headers: HTTPHeaders
    public var body: ByteBuffer
}

/// Why a request got no response.
public struct HTTPClientError: Error, Sendable, CustomStringConvertible {
    public var message: String

    public init(_ message: String) {
        self.message = message
    }

    public var description: String { self.message }
}

/// How an HTTPS client checks the server and proves who it is.
public struct HTTPClientTLS: Sendable {
    /// The context for the next connection and its generation: a context that can be replaced
    /// (a renewed client certificate) gives a new generation, and a kept-alive connection made
    /// with an older one is replaced before its next request.
    public var provider: @Sendable () -> (context: NIOSSLContext, generation: UInt64)
    /// The name to check the server's certificate against (and send as SNI); nil: the endpoint's
    /// host when it is a name; an IP address is checked against the certificate's IP SANs.
    public var serverHostname: String?
    /// Replaces the usual chain verification (the mesh's identity check, CA pinning).
    public var verify: (@Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResult>) -> Void)?
    /// Why `verify` last refused a server, added to the error of a failed handshake.
    public var verificationFailure: (@Sendable () -> String?)?

    public init(
        context: NIOSSLContext,
        serverHostname: String? = nil,
        verify: (@Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResult>) -> Void)? = nil
    ) {
        self.provider = { (context, 0) }
        self.serverHostname = serverHostname
        self.verify = verify
    }

    public init(
        provider: @escaping @Sendable () -> (context: NIOSSLContext, generation: UInt64),
        verify: @escaping @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResult>) -> Void,
        verificationFailure: (@Sendable () -> String?)? = nil
    ) {
        self.provider = provider
        self.verify = verify
        self.verificationFailure = verificationFailure
    }

    /// The context of the next connection.
    public var context: NIOSSLContext { self.provider().context }
}

/// A small HTTP/1.1 client over SwiftNIO for the control API: one connection per request, whole
/// responses with a size bound, or a streamed body for watches.
public struct HTTPClient: Sendable {
    public var endpoint: HTTPEndpoint
    public var connectTimeout: TimeAmount = .seconds(5)
    /// Whole-request time limit for `send` (not for streams).
    public var requestTimeout: TimeAmount = .seconds(30)
    public var maxResponseBytes: Int = 256 * 1024 * 1024
    /// TLS settings, required for an `https` endpoint.
    public var tls: HTTPClientTLS?
    let group: any EventLoopGroup

    public init(
        endpoint: HTTPEndpoint,
        tls: HTTPClientTLS? = nil,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) {
        self.endpoint = endpoint
        self.tls = tls
        self.group = group
    }

    typealias Connection = NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>

    func connect() async throws -> (Connection, TLSErrorRecorder) {
        let recorder = TLSErrorRecorder(verificationFailure: self.endpoint.tls ? self.tls?.verificationFailure : nil)
        return (try await self.connect(recorder), recorder)
    }

    private func connect(_ recorder: TLSErrorRecorder) async throws -> Connection {
        if self.endpoint.tls && self.tls == nil {
            throw HTTPClientError("cannot connect to \(self.endpoint): no TLS settings (CA certificate) for https")
        }
        let tls = self.endpoint.tls ? self.tls : nil
        let hostname =
            tls?.serverHostname
            ?? ((try? SocketAddress(ipAddress: self.endpoint.host, port: 0)) == nil ? self.endpoint.host : nil)
        do {
            return try await ClientBootstrap(group: self.group)
                .connectTimeout(self.connectTimeout)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .connect(host: self.endpoint.host, port: self.endpoint.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        if let tls {
                            let handler: NIOSSLClientHandler
                            let context = tls.context
                            if let verify = tls.verify {
                                handler = try NIOSSLClientHandler(
                                    context: context,
                                    serverHostname: hostname,
                                    customVerificationCallback: verify
                                )
                            } else {
                                handler = try NIOSSLClientHandler(context: context, serverHostname: hostname)
                            }
                            // Offered the mesh record layer (the context's ALPN), the connection
                            // switches to it after the handshake; requests wait for that.
                            let ops = channel.pipeline.syncOperations
                            try HTTPRecordSwitch.addHandlers(handler, role: .client, to: ops)
                            try ops.addHandler(recorder)
                        }
                        try channel.pipeline.syncOperations.addHTTPClientHandlers()
                        return try Connection(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(
                                inboundType: HTTPClientResponsePart.self,
                                outboundType: HTTPClientRequestPart.self
                            )
                        )
                    }
                }
        } catch {
            throw HTTPClientError("cannot connect to \(self.endpoint): \(Self.describe(error))")
        }
    }

    /// A short reason: "connection refused", "timed out", not NIO's nested error dump.
    static func describe(_ error: any Error) -> String {
        switch error {
        case let e as NIOConnectionError:
            if let first = e.connectionErrors.first { return Self.describe(first.error) }
            if let dns = e.dnsAError ?? e.dnsAAAAError { return "cannot resolve \(e.host): \(dns)" }
            return "cannot connect to \(e.host):\(e.port)"
        case let e as IOError:
            return String(cString: strerror(e.errnoCode)).lowercased()
        case ChannelError.connectTimeout:
            return "timed out"
        case NIOSSLError.handshakeFailed(let e):
            return "TLS handshake failed (\(Self.describe(boringSSL: e)))"
        case NIOSSLError.shutdownFailed(let e):
            // Leaving TLS for the mesh record layer (`HTTPRecordSwitch`) waits for the server's close_notify: a
            // server that refused this client's certificate answers with an alert instead.
            return
                "TLS failed after the handshake (\(Self.describe(boringSSL: e))): the server refused this client's"
                + " certificate, or closed"
        case NIOSSLError.uncleanShutdown:
            // In TLS 1.3 a client's handshake is done once it has sent its Finished, before the server has
            // read it: a server that gives up on the handshake then (its handshake timeout, a refused
            // client certificate) closes without a close_notify, and this is all the client sees.
            return
                "the server closed the connection without closing TLS (close_notify) and without an answer:"
                + " it may have run out of time for the TLS handshake, refused this client's certificate, or stopped"
        case let e as BoringSSLError:
            return "TLS failed (\(Self.describe(boringSSL: e)))"
        case let e as NIOSSLExtraError:
            return "TLS failed (\(e))"
        case let e as HTTPRecordError:
            return e.description
        default:
            return "\(error)"
        }
    }

    /// BoringSSL's reason strings (e.g. "CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA").
    static func describe(boringSSL error: BoringSSLError) -> String {
        switch error {
        case .sslError(let stack), .unknownError(let stack):
            let reasons = stack.map { "\($0)" }
            return reasons.isEmpty ? "\(error)" : reasons.joined(separator: "; ")
        default:
            return "\(error)"
        }
    }

    func head(
        _ method: HTTPMethod,
        _ path: String,
        _ headers: HTTPHeaders,
        bodyLength: Int?,
        keepAlive: Bool = false
    ) -> HTTPRequestHead {
        var h = headers
        if !h.contains(name: "Host") {  // the caller's Host wins (a name, sent to an address)
            h.add(
                name: "Host",
                value: self.endpoint.host.contains(":")
                    ? "[\(self.endpoint.host)]:\(self.endpoint.port)" : "\(self.endpoint.host):\(self.endpoint.port)"
            )
        }
        if let n = bodyLength { h.replaceOrAdd(name: "Content-Length", value: "\(n)") }
        if !keepAlive { h.replaceOrAdd(name: "Connection", value: "close") }
        return HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: h)
    }

    /// Sends one request and reads the whole response.
    public func send(
        _ method: HTTPMethod,
        _ path: String,
        headers: HTTPHeaders = [:],
        body: ByteBuffer? = nil
    ) async throws -> HTTPClientResponse {
        let (connection, recorder) = try await self.connect()
        let channel = connection.channel
        let timeout = self.requestTimeout
        let timedOut = Flag()
        let timer = channel.eventLoop.scheduleTask(in: timeout) {
            timedOut.set()
            channel.close(promise: nil)
        }
        defer { timer.cancel() }
        let limit = self.maxResponseBytes
        let endpoint = self.endpoint
        let sentHead = self.head(method, path, headers, bodyLength: body?.readableBytes ?? (method == .GET ? nil : 0))
        do {
            return try await connection.executeThenClose { inbound, outbound in
                var parts: [HTTPClientRequestPart] = [.head(sentHead)]
                if let b = body { parts.append(.body(.byteBuffer(b))) }
                parts.append(.end(nil))
                try await outbound.write(contentsOf: parts)
                var responses = inbound.makeAsyncIterator()
                return try await Self.readResponse(&responses, endpoint: endpoint, limit: limit)
            }
        } catch let error as HTTPClientError {
            throw error
        } catch {
            if let tls = recorder.reason {
                throw HTTPClientError("request to \(endpoint) failed: \(tls)")
            }
            if timedOut.isSet {
                throw HTTPClientError("\(endpoint) did not answer within \(timeout.nanoseconds / 1_000_000_000)s")
            }
            throw HTTPClientError("request to \(endpoint) failed: \(Self.describe(error))")
        }
    }

    /// Sends one request and hands the response head and its body chunks to `consume` as they arrive.
    /// The connection closes when `consume` returns or throws.
    public func stream<T: Sendable>(
        _ method: HTTPMethod,
        _ path: String,
        headers: HTTPHeaders = [:],
        body: ByteBuffer? = nil,
        consume: (HTTPResponseHead, inout ResponseBodyStream) async throws -> T
    ) async throws -> T {
        let (connection, recorder) = try await self.connect()
        let sentHead = self.head(method, path, headers, bodyLength: body?.readableBytes)
        let endpoint = self.endpoint
        do {
            return try await Self.exchange(connection, sentHead, body, endpoint, consume)
        } catch let error where recorder.error != nil && !(error is HTTPClientError) {
            throw HTTPClientError("request to \(endpoint) failed: \(recorder.reason!)")
        }
    }

    private static func exchange<T: Sendable>(
        _ connection: Connection,
        _ sentHead: HTTPRequestHead,
        _ body: ByteBuffer?,
        _ endpoint: HTTPEndpoint,
        _ consume: (HTTPResponseHead, inout ResponseBodyStream) async throws -> T
    ) async throws -> T {
        try await connection.executeThenClose { inbound, outbound in
            try await outbound.write(
                contentsOf: [.head(sentHead)] + (body.map { [.body(.byteBuffer($0))] } ?? []) + [.end(nil)]
            )
            var iterator = inbound.makeAsyncIterator()
            let head = try await Self.readHead(&iterator, endpoint: endpoint)
            var body = ResponseBodyStream(iterator: iterator)
            return try await consume(head, &body)
        }
    }
}

/// Keeps the first TLS error of a connection: a failed handshake can surface to the caller as a
/// write on a closed channel, and the TLS reason is the one worth reporting.
final class TLSErrorRecorder: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    private let first = Mutex<(any Error)?>(nil)
    private let verificationFailure: (@Sendable () -> String?)?

    init(verificationFailure: (@Sendable () -> String?)? = nil) {
        self.verificationFailure = verificationFailure
    }

    var error: (any Error)? { self.first.withLock { $0 } }

    /// The TLS error in words; for a refused server certificate, with the verifier's reason.
    var reason: String? {
        guard let error = self.error else { return nil }
        var text = HTTPClient.describe(error)
        if case NIOSSLError.handshakeFailed = error, let why = self.verificationFailure?() { text += ": \(why)" }
        return text
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if error is NIOSSLError || error is BoringSSLError || error is HTTPRecordError {
            self.first.withLock { if $0 == nil { $0 = error } }
        }
        context.fireErrorCaught(error)
    }
}

/// The body chunks of a streamed response.
public struct ResponseBodyStream {
    var iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
    var pending = ByteBuffer()
    var ended = false

    init(iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator) {
        self.iterator = iterator
    }

    /// The next chunk, or nil at the end of the body.
    public mutating func nextChunk() async throws -> ByteBuffer? {
        while !self.ended, let part = try await self.iterator.next() {
            switch part {
            case .body(let b): return b
            case .end: self.ended = true
            case .head: continue
            }
        }
        return nil
    }

    /// The next newline-terminated line (without the newline), or nil at the end of the body.
    /// A line longer than `maxLine` bytes is an error.
    public mutating func nextLine(maxLine: Int = 64 * 1024 * 1024) async throws -> ByteBuffer? {
        while true {
            if let nl = self.pending.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) {
                let length = nl - self.pending.readerIndex
                let line = self.pending.readSlice(length: length)!
                self.pending.moveReaderIndex(forwardBy: 1)
                return line
            }
            guard self.pending.readableBytes <= maxLine else {
                throw HTTPClientError("a streamed line is longer than \(maxLine) bytes")
            }
            guard var chunk = try await self.nextChunk() else {
                if self.pending.readableBytes > 0 {
                    defer { self.pending.clear() }
                    return self.pending
                }
                return nil
            }
            self.pending.discardReadBytes()
            self.pending.writeBuffer(&chunk)
        }
    }

    /// The rest of the body, up to `limit` bytes.
    public mutating func collect(upTo limit: Int) async throws -> ByteBuffer {
        var out = self.pending
        self.pending.clear()
        while var chunk = try await self.nextChunk() {
            guard out.readableBytes + chunk.readableBytes <= limit else {
                throw HTTPClientError("response body is larger than \(limit) bytes")
            }
            out.writeBuffer(&chunk)
        }
        return out
    }
}

/// A flag set once, readable from any thread.
final class Flag: Sendable {
    private let value = Atomic<Bool>(false)

    func set() { self.value.store(true, ordering: .relaxed) }
    var isSet: Bool { self.value.load(ordering: .relaxed) }
}

extension HTTPClient {
    /// A response's head (skipping 1xx heads); its body is left to the caller.
    static func readHead(
        _ responses: inout NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator,
        endpoint: HTTPEndpoint
    ) async throws -> HTTPResponseHead {
        while let part = try await responses.next() {
            if case .head(let h) = part, h.status.code >= 200 { return h }
        }
        throw HTTPClientError("\(endpoint) closed the connection before sending a response")
    }

    /// Reads one whole response (skipping 1xx heads) with its body bounded by `limit`.
    static func readResponse(
        _ responses: inout NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator,
        endpoint: HTTPEndpoint,
        limit: Int
    ) async throws -> HTTPClientResponse {
        var status: HTTPResponseStatus?
        var headers = HTTPHeaders()
        var collected = ByteBuffer()
        while let part = try await responses.next() {
            switch part {
            case .head(let h) where h.status.code >= 200:
                status = h.status
                headers = h.headers
            case .head:
                continue
            case .body(var chunk):
                guard collected.readableBytes + chunk.readableBytes <= limit else {
                    throw HTTPClientError("response from \(endpoint) is larger than \(limit) bytes")
                }
                collected.writeBuffer(&chunk)
            case .end:
                guard let s = status else { throw HTTPClientError("response from \(endpoint) had no status") }
                return HTTPClientResponse(status: s, headers: headers, body: collected)
            }
        }
        throw HTTPClientError("\(endpoint) closed the connection before the response was complete")
    }
}
