import NIOCore
import NIOHTTP1

/// HTTP/1.1 serialisation for the proxy: request and response heads written straight into one buffer (no NIO
/// encoder in the pipelines), with the proxy's edits applied on the way (hop-by-hop headers left out,
/// X-Forwarded-For / X-Request-Id / Connection / Transfer-Encoding added) instead of mutating `HTTPHeaders`
/// first, and body framing (chunks). Parsing stays with NIO's decoders (llhttp).
///
/// A head is emitted twice by the same code: once to count its bytes, once into memory reserved for exactly
/// that many (one capacity check and a `memcpy` per string rather than a checked `ByteBuffer` write each).
/// When the caller's scan of the headers counted their bytes and none is left out, only the lines around
/// them are counted.
enum HTTPWire {
    /// How a message body goes on the wire.
    enum Framing: Equatable {
        /// No body (a response to HEAD, 1xx, 204, 304; a request without Content-Length or
        /// Transfer-Encoding).
        case none
        /// As it comes: delimited by Content-Length, or by the end of the connection.
        case raw
        /// Chunked transfer coding.
        case chunked
    }

    /// The hop-by-hop headers of a message (RFC 9110 7.6.1) and those its Connection header names: never
    /// forwarded. Framing headers (Content-Length, Transfer-Encoding) are never dropped for being named in
    /// Connection: the body is framed by them.
    struct HopByHop {
        /// The message has any hop-by-hop header (usually not: then nothing is compared per header).
        var present = false
        /// Header names the Connection header lists (lowercased), other than close / keep-alive.
        var named: [String] = []

        static let none = HopByHop()

        /// Scans `headers` for hop-by-hop ones.
        init(_ headers: HTTPHeaders) {
            for (name, value) in headers { self.note(name, value) }
        }

        init() {}

        /// Takes one header into account.
        @inline(__always)
        mutating func note(_ name: String, _ value: String) {
            switch name.utf8.count {
            case 10 where name.equalsLowercased("connection"):
                self.present = true
                Self.collectNamed(value, into: &self.named)
            case 2, 7, 10, 16, 18, 19:
                if !self.present && HTTPWire.isHopByHopName(name) { self.present = true }
            default:
                break
            }
        }

        /// Whether a header called `name` is left out.
        func drops(_ name: String) -> Bool {
            guard self.present else { return false }
            if HTTPWire.isHopByHopName(name) { return true }
            for other in self.named where other.utf8.count == name.utf8.count {
                if other.asciiCaseInsensitiveEquals(name) { return true }
            }
            return false
        }

        private static func collectNamed(_ value: String, into named: inout [String]) {
            for item in value.utf8.split(separator: UInt8(ascii: ",")) {
                guard let token = HTTPWire.trimmed(item) else { continue }
                let name = String(decoding: token.map(asciiLower), as: UTF8.self)
                switch name {
                case "close", "keep-alive", "content-length", "transfer-encoding": continue
                default: named.append(name)
                }
            }
        }
    }

    /// connection, keep-alive, proxy-connection, te, trailer, upgrade, proxy-authenticate,
    /// proxy-authorization (by length first).
    static func isHopByHopName(_ name: String) -> Bool {
        switch name.utf8.count {
        case 2: return name.equalsLowercased("te")
        case 7: return name.equalsLowercased("trailer") || name.equalsLowercased("upgrade")
        case 10: return name.equalsLowercased("connection") || name.equalsLowercased("keep-alive")
        case 16: return name.equalsLowercased("proxy-connection")
        case 18: return name.equalsLowercased("proxy-authenticate")
        case 19: return name.equalsLowercased("proxy-authorization")
        default: return false
        }
    }

    // MARK: request heads

    /// What the proxy changes in a request head on its way upstream.
    struct RequestEdits {
        var hopByHop = HopByHop.none
        /// An upgrade request: `connection: upgrade` and `upgrade: <value>` go up again.
        var upgrade: String?
        /// The client's address, appended to X-Forwarded-For (nil: the header is left alone).
        var forwardedFor: String?
        /// The first X-Forwarded-For value the client sent (the header is then replaced by one with the
        /// client's address appended).
        var priorForwardedFor: String?
        /// A new request id (128 bits), when the client sent no X-Request-Id.
        var requestID: (UInt64, UInt64)?
    }

    /// `head` as an HTTP/1.1 request with `edits` applied. `headerBytes`: the bytes of `head.headers` as
    /// header lines (`headerLineBytes` summed), when the caller's scan counted them.
    static func requestHead(
        _ head: HTTPRequestHead,
        edits: RequestEdits,
        headerBytes: Int? = nil,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var counter = CountingSink()
        let method = head.method.rawValue  // (made anew on each call)
        if let headerBytes, !edits.hopByHop.present, edits.priorForwardedFor == nil || edits.forwardedFor == nil {
            // Every header goes up as it came: only the lines around them need counting.
            Self.emitRequestHead(head, method: method, edits: edits, headers: false, into: &counter)
            counter.count += headerBytes
        } else {
            Self.emitRequestHead(head, method: method, edits: edits, headers: true, into: &counter)
        }
        var buffer = allocator.buffer(capacity: counter.count)
        buffer.writeEmitted(count: counter.count) {
            Self.emitRequestHead(head, method: method, edits: edits, headers: true, into: &$0)
        }
        return buffer
    }

    /// The bytes of the header line `name: value\r\n`.
    @inline(__always)
    static func headerLineBytes(nameBytes: Int, valueBytes: Int) -> Int { nameBytes + valueBytes + 4 }

    private static func emitRequestHead<Sink: ByteSink>(
        _ head: HTTPRequestHead,
        method: String,
        edits: RequestEdits,
        headers: Bool,
        into sink: inout Sink
    ) {
        sink.put(method)
        sink.put(UInt8(ascii: " "))
        sink.put(head.uri)
        sink.put(" HTTP/1.1\r\n" as StaticString)
        if headers {
            let replacesForwardedFor = edits.forwardedFor != nil && edits.priorForwardedFor != nil
            for (name, value) in head.headers {
                if edits.hopByHop.drops(name) { continue }
                if replacesForwardedFor && name.equalsLowercased("x-forwarded-for") {
                    continue
                }
                sink.putHeader(name, value)
            }
        }
        if let upgrade = edits.upgrade {
            sink.put("connection: upgrade\r\nupgrade: " as StaticString)
            sink.put(upgrade)
            sink.put("\r\n" as StaticString)
        }
        if let address = edits.forwardedFor {
            sink.put("x-forwarded-for: " as StaticString)
            if let prior = edits.priorForwardedFor {
                sink.put(prior)
                sink.put(", " as StaticString)
            }
            sink.put(address)
            sink.put("\r\n" as StaticString)
        }
        if let (a, b) = edits.requestID {
            sink.put("x-request-id: " as StaticString)
            sink.putHex(a)
            sink.putHex(b)
            sink.put("\r\n" as StaticString)
        }
        sink.put("\r\n" as StaticString)
    }

    // MARK: response heads

    /// What the proxy changes in a response head on its way to the client.
    struct ResponseEdits {
        var hopByHop = HopByHop.none
        /// Leave Transfer-Encoding out (the body goes to the client raw, or there is none).
        var dropTransferEncoding = false
        /// Add `connection: close` (true), `connection: keep-alive` (false) or nothing (nil).
        var connectionClose: Bool?
        /// Add `transfer-encoding: chunked` (the body was delimited by the end of the upstream connection).
        var addChunked = false
    }

    /// A response head with `version`'s status line and `headers` with `edits` applied, in a buffer with room
    /// for `reserving` more bytes (a small body behind it). `scan`: the headers' scan, which counted their
    /// bytes (then only the lines around them are counted, unless a hop-by-hop header is left out).
    static func responseHead(
        version: HTTPVersion,
        status: HTTPResponseStatus,
        headers: HTTPHeaders,
        edits: ResponseEdits,
        scan: ResponseScan? = nil,
        allocator: ByteBufferAllocator,
        reserving extra: Int = 0
    ) -> ByteBuffer {
        var counter = CountingSink()
        if let scan, !edits.hopByHop.present {
            Self.emitResponseHead(
                version: version,
                status: status,
                headers: headers,
                edits: edits,
                headers: false,
                into: &counter
            )
            counter.count += scan.headerBytes - (edits.dropTransferEncoding ? scan.transferEncodingBytes : 0)
        } else {
            Self.emitResponseHead(
                version: version,
                status: status,
                headers: headers,
                edits: edits,
                headers: true,
                into: &counter
            )
        }
        var buffer = allocator.buffer(capacity: counter.count + extra)
        buffer.writeEmitted(count: counter.count) {
            Self.emitResponseHead(
                version: version,
                status: status,
                headers: headers,
                edits: edits,
                headers: true,
                into: &$0
            )
        }
        return buffer
    }

    private static func emitResponseHead<Sink: ByteSink>(
        version: HTTPVersion,
        status: HTTPResponseStatus,
        headers: HTTPHeaders,
        edits: ResponseEdits,
        headers emitHeaders: Bool,
        into sink: inout Sink
    ) {
        Self.emitStatusLine(version: version, status: status, into: &sink)
        if emitHeaders {
            for (name, value) in headers {
                if edits.hopByHop.drops(name) { continue }
                if edits.dropTransferEncoding && name.equalsLowercased("transfer-encoding") { continue }
                sink.putHeader(name, value)
            }
        }
        switch edits.connectionClose {
        case true?: sink.put("connection: close\r\n" as StaticString)
        case false?: sink.put("connection: keep-alive\r\n" as StaticString)
        case nil: break
        }
        if edits.addChunked { sink.put("transfer-encoding: chunked\r\n" as StaticString) }
        sink.put("\r\n" as StaticString)
    }

    private static func emitStatusLine<Sink: ByteSink>(
        version: HTTPVersion,
        status: HTTPResponseStatus,
        into sink: inout Sink
    ) {
        switch (version.major, version.minor) {
        case (1, 1): sink.put("HTTP/1.1 " as StaticString)
        case (1, 0): sink.put("HTTP/1.0 " as StaticString)
        default:
            sink.put("HTTP/" as StaticString)
            sink.putDecimal(version.major)
            sink.put(UInt8(ascii: "."))
            sink.putDecimal(version.minor)
            sink.put(UInt8(ascii: " "))
        }
        let code = Int(status.code)
        if (100...999).contains(code) {
            // (Every status code has three digits: no division loop.)
            sink.put(UInt8(ascii: "0") + UInt8(truncatingIfNeeded: code / 100))
            sink.put(UInt8(ascii: "0") + UInt8(truncatingIfNeeded: code / 10 % 10))
            sink.put(UInt8(ascii: "0") + UInt8(truncatingIfNeeded: code % 10))
        } else {
            sink.putDecimal(code)
        }
        sink.put(UInt8(ascii: " "))
        sink.put(status.reasonPhrase)
        sink.put("\r\n" as StaticString)
    }

    /// A complete response with a short plain-text body (the proxy's own answers: 4xx/5xx).
    static func statusResponse(
        status: HTTPResponseStatus,
        text: String,
        keepAlive: Bool,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: "text/plain; charset=utf-8")
        headers.add(name: "content-length", value: String(text.utf8.count))
        var buffer = Self.responseHead(
            version: .http1_1,
            status: status,
            headers: headers,
            edits: ResponseEdits(connectionClose: !keepAlive),
            allocator: allocator,
            reserving: text.utf8.count
        )
        buffer.writeString(text)
        return buffer
    }

    // MARK: chunked bodies

    /// The chunk-size line before `count` bytes of chunk data.
    static func writeChunkHeader(_ count: Int, into buffer: inout ByteBuffer) {
        var digits = 1
        while count >> (4 * digits) != 0 { digits += 1 }
        buffer.writeEmitted(count: digits + 2) { sink in
            for i in stride(from: digits - 1, through: 0, by: -1) {
                sink.put(hexDigit(UInt8(truncatingIfNeeded: count >> (4 * i)) & 0xf))
            }
            sink.put("\r\n" as StaticString)
        }
    }

    /// The last chunk and the trailer section that ends a chunked body.
    static func writeLastChunk(trailers: HTTPHeaders?, into buffer: inout ByteBuffer) {
        guard let trailers, !trailers.isEmpty else {
            buffer.writeStaticString("0\r\n\r\n")
            return
        }
        var counter = CountingSink()
        Self.emitLastChunk(trailers, into: &counter)
        buffer.writeEmitted(count: counter.count) { Self.emitLastChunk(trailers, into: &$0) }
    }

    private static func emitLastChunk<Sink: ByteSink>(_ trailers: HTTPHeaders, into sink: inout Sink) {
        sink.put("0\r\n" as StaticString)
        for (name, value) in trailers { sink.putHeader(name, value) }
        sink.put("\r\n" as StaticString)
    }

    // MARK: message framing

    /// How a response's body is delimited.
    enum ResponseBody: Equatable {
        /// None (a response to HEAD or CONNECT, 1xx, 204, 304).
        case none
        case contentLength
        case chunked
        /// Until the connection closes; `transferCoded`: with a Transfer-Encoding whose final coding is not
        /// chunked.
        case untilClose(transferCoded: Bool)
    }

    /// How the body of a response with `status` and `headers` to a `requestMethod` request is delimited, as
    /// llhttp reads it (RFC 9112 6.3): the last Transfer-Encoding value first (chunked when that is its final
    /// coding, otherwise until the connection closes), then Content-Length, else until the connection closes.
    static func responseBody(
        status: HTTPResponseStatus,
        requestMethod: HTTPMethod,
        headers: HTTPHeaders
    ) -> ResponseBody {
        Self.responseBody(status: status, requestMethod: requestMethod, scan: ResponseScan(headers))
    }

    static func responseBody(
        status: HTTPResponseStatus,
        requestMethod: HTTPMethod,
        scan: ResponseScan
    ) -> ResponseBody {
        // (Matched by case: `HTTPMethod`'s `==` compares `rawValue` strings.)
        switch requestMethod {
        case .HEAD, .CONNECT: return .none
        default: break
        }
        let code = status.code
        if (100..<200).contains(code) || code == 204 || code == 304 {
            return .none
        }
        if let transferEncoding = scan.transferEncoding {
            return Self.finalCodingIsChunked(transferEncoding) ? .chunked : .untilClose(transferCoded: true)
        }
        return scan.contentLength ? .contentLength : .untilClose(transferCoded: false)
    }

    /// One pass over a response's headers for what the proxy needs to know of them.
    struct ResponseScan {
        var hopByHop = HopByHop.none
        /// The last Transfer-Encoding value.
        var transferEncoding: String?
        var contentLength = false
        /// The bytes of all headers as header lines, and of the Transfer-Encoding ones.
        var headerBytes = 0
        var transferEncodingBytes = 0

        init(_ headers: HTTPHeaders) {
            for (name, value) in headers {
                let nameBytes = name.utf8.count
                let lineBytes = HTTPWire.headerLineBytes(nameBytes: nameBytes, valueBytes: value.utf8.count)
                self.headerBytes += lineBytes
                switch nameBytes {
                case 17 where name.equalsLowercased("transfer-encoding"):
                    self.transferEncoding = value
                    self.transferEncodingBytes += lineBytes
                case 14 where name.equalsLowercased("content-length"): self.contentLength = true
                default: self.hopByHop.note(name, value)
                }
            }
        }
    }

    /// Whether the last coding a Transfer-Encoding value lists is `chunked`.
    static func finalCodingIsChunked(_ value: String) -> Bool {
        guard let last = value.utf8.split(separator: UInt8(ascii: ","), omittingEmptySubsequences: false).last,
            let token = Self.trimmed(last)
        else { return false }
        return String(Substring(token)).equalsLowercased("chunked")
    }

    /// `bytes` without spaces and tabs at either end; nil when nothing is left.
    static func trimmed(_ bytes: Substring.UTF8View) -> Substring.UTF8View? {
        var element = bytes
        let blank = { (byte: UInt8) in byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") }
        while let first = element.first, blank(first) { element = element.dropFirst() }
        while let last = element.last, blank(last) { element = element.dropLast() }
        return element.isEmpty ? nil : element
    }
}

// MARK: sinks

/// Where `HTTPWire` emits bytes: counted first, then written.
protocol ByteSink {
    mutating func put(_ string: String)
    mutating func put(_ string: StaticString)
    mutating func put(_ byte: UInt8)
    /// 16 lowercase hex digits.
    mutating func putHex(_ value: UInt64)
}

extension ByteSink {
    mutating func putHeader(_ name: String, _ value: String) {
        self.put(name)
        self.put(": " as StaticString)
        self.put(value)
        self.put("\r\n" as StaticString)
    }

    mutating func putDecimal(_ value: Int) {
        precondition(value >= 0)
        var divisor = 1
        while value / divisor >= 10 { divisor *= 10 }
        while divisor > 0 {
            self.put(UInt8(ascii: "0") + UInt8(value / divisor % 10))
            divisor /= 10
        }
    }
}

@inline(__always)
private func hexDigit(_ nibble: UInt8) -> UInt8 {
    nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "a") + nibble - 10
}

struct CountingSink: ByteSink {
    var count = 0
    mutating func put(_ string: String) { self.count += string.utf8.count }
    mutating func put(_ string: StaticString) { self.count += string.utf8CodeUnitCount }
    mutating func put(_ byte: UInt8) { self.count += 1 }
    mutating func putHex(_ value: UInt64) { self.count += 16 }
}

/// Writes into memory reserved for a counted number of bytes; traps rather than write past it.
struct PointerSink: ByteSink {
    private var next: UnsafeMutableRawPointer
    private let end: UnsafeMutableRawPointer

    init(_ memory: UnsafeMutableRawBufferPointer, count: Int) {
        precondition(count <= memory.count)
        self.next = memory.baseAddress!
        self.end = self.next + count
    }

    var remaining: Int { self.end - self.next }

    mutating func put(_ string: String) {
        let count = string.utf8.count
        precondition(count <= self.remaining)
        let copied: Void? = string.utf8.withContiguousStorageIfAvailable { bytes in
            if count > 0 { self.next.copyMemory(from: bytes.baseAddress!, byteCount: count) }
        }
        guard copied == nil else {
            self.next += count
            return
        }
        for byte in string.utf8 {
            self.next.storeBytes(of: byte, as: UInt8.self)
            self.next += 1
        }
    }

    mutating func put(_ string: StaticString) {
        let count = string.utf8CodeUnitCount
        precondition(count <= self.remaining)
        self.next.copyMemory(from: string.utf8Start, byteCount: count)
        self.next += count
    }

    mutating func put(_ byte: UInt8) {
        precondition(self.remaining >= 1)
        self.next.storeBytes(of: byte, as: UInt8.self)
        self.next += 1
    }

    mutating func putHex(_ value: UInt64) {
        precondition(self.remaining >= 16)
        for i in 0..<16 {
            let nibble = UInt8(truncatingIfNeeded: value >> (60 - 4 * UInt64(i))) & 0xf
            self.next.storeBytes(of: hexDigit(nibble), toByteOffset: i, as: UInt8.self)
        }
        self.next += 16
    }
}

extension ByteBuffer {
    /// Writes exactly `count` bytes emitted by `emit` (which a `CountingSink` counted beforehand).
    mutating func writeEmitted(count: Int, _ emit: (inout PointerSink) -> Void) {
        self.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { memory in
            var sink = PointerSink(memory, count: count)
            emit(&sink)
            precondition(sink.remaining == 0, "HTTP head emitted a different number of bytes than counted")
            return count
        }
    }
}

@inline(__always)
func asciiLower(_ byte: UInt8) -> UInt8 {
    byte &- 65 < 26 ? byte | 0x20 : byte
}

extension String {
    /// ASCII case-insensitive equality.
    func asciiCaseInsensitiveEquals(_ other: String) -> Bool {
        let count = self.utf8.count
        guard other.utf8.count == count else { return false }
        let equal = self.utf8.withContiguousStorageIfAvailable { a in
            other.utf8.withContiguousStorageIfAvailable { b in
                for i in 0..<count where a[i] != b[i] && asciiLower(a[i]) != asciiLower(b[i]) { return false }
                return true
            }
        }
        if let equal = equal ?? nil { return equal }
        return zip(self.utf8, other.utf8).allSatisfy { asciiLower($0) == asciiLower($1) }
    }

    /// ASCII case-insensitive equality with `lowercase` (lowercase ASCII).
    @inline(__always)
    func equalsLowercased(_ lowercase: StaticString) -> Bool {
        let count = lowercase.utf8CodeUnitCount
        guard self.utf8.count == count else { return false }
        let other = lowercase.utf8Start
        let equal = self.utf8.withContiguousStorageIfAvailable { bytes in
            for i in 0..<count where asciiLower(bytes[i]) != other[i] { return false }
            return true
        }
        if let equal { return equal }
        return zip(self.utf8, UnsafeBufferPointer(start: other, count: count)).allSatisfy { asciiLower($0) == $1 }
    }
}

/// The bytes bound for one connection, gathered into one buffer while they are small (a head with the body
/// and the end behind it: one write, one pipeline traversal and one `iovec`, instead of one per part), written
/// in order. Large bodies are written as they are, never copied.
struct HTTPOutbox {
    /// Bodies up to this size are copied behind what is pending; larger ones are written on their own.
    static let copyLimit = 4096

    private var pending: ByteBuffer?
    /// Bytes were written and not flushed yet.
    private var unflushed = false

    /// Queues `bytes` (a head, or raw body bytes).
    mutating func queue(_ bytes: ByteBuffer, context: ChannelHandlerContext) {
        guard bytes.readableBytes <= Self.copyLimit else {
            self.write(context: context)
            self.write(bytes, context: context)
            return
        }
        guard var buffer = self.takeSmallPending(context: context) else {
            self.pending = bytes
            return
        }
        var bytes = bytes
        buffer.writeBuffer(&bytes)
        self.pending = buffer
    }

    /// Queues `body` as one chunk of a chunked body (nothing for an empty one: it would end the body).
    mutating func queueChunk(_ body: ByteBuffer, context: ChannelHandlerContext) {
        let count = body.readableBytes
        guard count > 0 else { return }
        let small = count <= Self.copyLimit
        var buffer =
            self.takeSmallPending(context: context)
            ?? context.channel.allocator.buffer(capacity: small ? count + 32 : 32)
        HTTPWire.writeChunkHeader(count, into: &buffer)
        var body = body
        if small {
            buffer.writeBuffer(&body)
            buffer.writeStaticString("\r\n")
            self.pending = buffer
        } else {
            self.write(buffer, context: context)
            self.write(body, context: context)
            var end = context.channel.allocator.buffer(capacity: 32)
            end.writeStaticString("\r\n")
            self.pending = end
        }
    }

    /// Queues the end of a chunked body.
    mutating func queueLastChunk(trailers: HTTPHeaders?, context: ChannelHandlerContext) {
        var buffer = self.takeSmallPending(context: context) ?? context.channel.allocator.buffer(capacity: 32)
        HTTPWire.writeLastChunk(trailers: trailers, into: &buffer)
        self.pending = buffer
    }

    /// Writes what is pending (not flushed).
    mutating func write(context: ChannelHandlerContext) {
        guard let buffer = self.pending.take() else { return }
        self.write(buffer, context: context)
    }

    /// Writes what is pending and flushes what was written, if anything.
    mutating func flush(context: ChannelHandlerContext) {
        let unflushed = self.unflushed
        self.unflushed = false
        if let buffer = self.pending.take() {
            // (One pipeline traversal for both.)
            context.writeAndFlush(NIOAny(buffer), promise: nil)
        } else if unflushed {
            context.flush()
        }
    }

    /// Bytes were queued or written and not flushed yet.
    var needsFlush: Bool { self.unflushed || self.pending != nil }

    private mutating func write(_ buffer: ByteBuffer, context: ChannelHandlerContext) {
        context.write(NIOAny(buffer), promise: nil)
        self.unflushed = true
    }

    /// The pending buffer to append to, when it is small; a large one is written first.
    private mutating func takeSmallPending(context: ChannelHandlerContext) -> ByteBuffer? {
        guard let buffer = self.pending.take() else { return nil }
        if buffer.readableBytes <= Self.copyLimit { return buffer }
        self.write(buffer, context: context)
        return nil
    }
}
