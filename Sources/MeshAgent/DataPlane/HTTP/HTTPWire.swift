import NIOCore
import NIOHTTP1

/// HTTP/1.1 serialisation for the proxy: request and response heads written straight into one buffer from the
/// bytes of the parsed head (`HTTPHead`: names and values are copied as they came, never made into strings),
/// with the proxy's edits applied on the way (hop-by-hop fields left out, X-Forwarded-For / X-Request-Id /
/// Connection / Transfer-Encoding added), and body framing (chunks).
///
/// A head is emitted twice by the same code: once to count its bytes, once into memory reserved for exactly
/// that many (one capacity check and a `memcpy` per field rather than a checked `ByteBuffer` write each).
/// When no field is left out, only the lines around the fields are counted (the parser counted theirs).
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

    /// The hop-by-hop fields of a message (RFC 9110 7.6.1) and those its Connection field names: never
    /// forwarded. A Connection token can name only a field that may be hop-by-hop: never one that frames the
    /// body (Content-Length, Transfer-Encoding), says who is asked and who asks (Host, Authorization, Cookie),
    /// nor one the proxy sets itself (X-Forwarded-For, Forwarded, X-Real-IP, X-Request-Id); those tokens are
    /// ignored.
    struct HopByHop {
        /// The message has any hop-by-hop field (usually not: then nothing is compared per field).
        var present = false
        /// Field names the Connection field lists (ranges of the head's bytes), other than close / keep-alive.
        var named: [Range<Int>] = []

        static let none = HopByHop()

        init() {}

        /// The hop-by-hop fields of `head`.
        init(_ head: HTTPHead) {
            guard head.hasHopByHop else { return }
            self.present = true
            guard head.connectionNamesOthers else { return }
            head.bytes.withUnsafeReadableBytes { raw in
                for index in head.fields.indices where head.field(index, is: "connection") {
                    HTTPParser.forEachListElement(raw, head.fields[index].value) { token in
                        for skip in Self.neverNamed where HTTPBytes.equalsIgnoringCase(raw, token, skip) { return }
                        self.named.append(token)
                    }
                }
            }
        }

        /// Connection tokens that name no field to drop (options, and fields that are never hop-by-hop).
        static let neverNamed = [
            "close", "keep-alive", "upgrade", "content-length", "transfer-encoding", "host", "authorization",
            "cookie", "x-forwarded-for", "forwarded", "x-real-ip", "x-request-id",
        ]

        /// Whether the field called `name` (a range of `raw`, the head's bytes) is left out.
        func drops(_ raw: UnsafeRawBufferPointer, _ name: Range<Int>) -> Bool {
            guard self.present else { return false }
            if HTTPWire.isHopByHopName(raw, name) { return true }
            for other in self.named where other.count == name.count {
                if zip(raw[other], raw[name]).allSatisfy({ asciiLower($0) == asciiLower($1) }) { return true }
            }
            return false
        }
    }

    /// connection, keep-alive, proxy-connection, te, trailer, upgrade, proxy-authenticate,
    /// proxy-authorization (by length first).
    static func isHopByHopName(_ raw: UnsafeRawBufferPointer, _ name: Range<Int>) -> Bool {
        @inline(__always) func named(_ lower: StaticString) -> Bool {
            HTTPBytes.equalsLowercased(raw, name, lower.utf8Start)
        }
        switch name.count {
        case 2: return named("te")
        case 7: return named("trailer") || named("upgrade")
        case 10: return named("connection") || named("keep-alive")
        case 16: return named("proxy-connection")
        case 18: return named("proxy-authenticate")
        case 19: return named("proxy-authorization")
        default: return false
        }
    }

    // MARK: request heads

    /// What the proxy changes in a request head on its way upstream.
    struct RequestEdits {
        var hopByHop = HopByHop.none
        /// An upgrade request: `connection: upgrade` and `upgrade: <value of this field>` go up again.
        var upgrade: Int?
        /// The client's address, as the value of X-Forwarded-For (nil: the field is left alone).
        var forwardedFor: String?
        /// The client's X-Forwarded-For fields are left out (`forwardedFor` replaces them)...
        var dropForwardedFor = false
        /// ...and this part of the first one (the trusted hops' addresses) goes before the client's address.
        var priorForwardedFor: Range<Int>?
        /// Leave out Forwarded and X-Real-IP (claims of a client that is not a trusted proxy).
        var dropForwardingClaims = false
        /// The target in origin form (a range of the head: the path and query of an absolute-form target;
        /// empty: `/`), replacing the target as sent.
        var target: Range<Int>?
        /// The Host: a range of the head (the authority of an absolute-form target), replacing every Host
        /// field; or text added to a request without one (HTTP/1.0).
        var host: Range<Int>?
        var hostText: String?
        /// A new request id (128 bits), when the client sent no X-Request-Id.
        var requestID: (UInt64, UInt64)?

        /// Some field the client sent is left out (every field must then be looked at).
        var dropsFields: Bool {
            self.hopByHop.present || self.dropForwardedFor || self.dropForwardingClaims || self.host != nil
        }
    }

    /// `head` as an HTTP/1.1 request with `edits` applied.
    static func requestHead(_ head: HTTPHead, edits: RequestEdits, allocator: ByteBufferAllocator) -> ByteBuffer {
        head.bytes.withUnsafeReadableBytes { raw in
            var counter = CountingSink()
            if !edits.dropsFields {
                // Every field goes up as it came: only the lines around them need counting.
                Self.emitRequestHead(head, raw, edits: edits, fields: false, into: &counter)
                counter.count += head.fieldBytes
            } else {
                Self.emitRequestHead(head, raw, edits: edits, fields: true, into: &counter)
            }
            var buffer = allocator.buffer(capacity: counter.count)
            buffer.writeEmitted(count: counter.count) {
                Self.emitRequestHead(head, raw, edits: edits, fields: true, into: &$0)
            }
            return buffer
        }
    }

    private static func emitRequestHead<Sink: ByteSink>(
        _ head: HTTPHead,
        _ raw: UnsafeRawBufferPointer,
        edits: RequestEdits,
        fields: Bool,
        into sink: inout Sink
    ) {
        // The method and target as they came (the start line up to the version), or the target in origin form.
        if let target = edits.target {
            sink.put(raw, 0..<head.target.lowerBound)
            if target.isEmpty { sink.put(UInt8(ascii: "/")) } else { sink.put(raw, target) }
        } else {
            sink.put(raw, 0..<head.target.upperBound)
        }
        sink.put(" HTTP/1.1\r\n" as StaticString)
        if let host = edits.host {
            sink.put("host: " as StaticString)
            sink.put(raw, host)
            sink.put("\r\n" as StaticString)
        } else if let host = edits.hostText {
            sink.put("host: " as StaticString)
            sink.put(host)
            sink.put("\r\n" as StaticString)
        }
        if fields {
            for field in head.fields {
                if edits.hopByHop.drops(raw, field.name) { continue }
                if edits.dropsFields && Self.dropsForwarding(raw, field.name, edits) { continue }
                sink.putField(raw, field)
            }
        }
        if let upgrade = edits.upgrade {
            sink.put("connection: upgrade\r\nupgrade: " as StaticString)
            sink.put(raw, head.fields[upgrade].value)
            sink.put("\r\n" as StaticString)
        }
        if let address = edits.forwardedFor {
            sink.put("x-forwarded-for: " as StaticString)
            if let prior = edits.priorForwardedFor, !prior.isEmpty {
                sink.put(raw, prior)
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

    /// Whether a request field the proxy replaces is left out: X-Forwarded-For, Forwarded, X-Real-IP, Host.
    private static func dropsForwarding(
        _ raw: UnsafeRawBufferPointer,
        _ name: Range<Int>,
        _ edits: RequestEdits
    )
        -> Bool
    {
        @inline(__always) func named(_ lower: StaticString) -> Bool {
            HTTPBytes.equalsLowercased(raw, name, lower.utf8Start)
        }
        switch name.count {
        case 4: return edits.host != nil && named("host")
        case 9: return edits.dropForwardingClaims && (named("forwarded") || named("x-real-ip"))
        case 15: return edits.dropForwardedFor && named("x-forwarded-for")
        default: return false
        }
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
        /// Replace the Content-Length lines (a list of equal values, leading zeros, several lines) by one
        /// `content-length` line with this value.
        var contentLength: Int?
    }

    /// The response `head` with `version`'s status line (the status and reason phrase as they came) and its
    /// fields with `edits` applied, in a buffer with room for `reserving` more bytes (a small body behind it).
    static func responseHead(
        version: HTTPVersion,
        _ head: HTTPHead,
        edits: ResponseEdits,
        allocator: ByteBufferAllocator,
        reserving extra: Int = 0
    ) -> ByteBuffer {
        head.bytes.withUnsafeReadableBytes { raw in
            var counter = CountingSink()
            if !edits.hopByHop.present {
                Self.emitResponseHead(version: version, head, raw, edits: edits, fields: false, into: &counter)
                counter.count += head.fieldBytes - (edits.dropTransferEncoding ? head.transferEncodingBytes : 0)
                counter.count -= edits.contentLength != nil ? head.contentLengthBytes : 0
            } else {
                Self.emitResponseHead(version: version, head, raw, edits: edits, fields: true, into: &counter)
            }
            var buffer = allocator.buffer(capacity: counter.count + extra)
            buffer.writeEmitted(count: counter.count) {
                Self.emitResponseHead(version: version, head, raw, edits: edits, fields: true, into: &$0)
            }
            return buffer
        }
    }

    private static func emitResponseHead<Sink: ByteSink>(
        version: HTTPVersion,
        _ head: HTTPHead,
        _ raw: UnsafeRawBufferPointer,
        edits: ResponseEdits,
        fields: Bool,
        into sink: inout Sink
    ) {
        sink.put(version.minor == 0 ? "HTTP/1.0 " as StaticString : "HTTP/1.1 " as StaticString)
        // The status code and reason phrase as they came (`HTTP/1.x ` is 9 bytes, the code 3).
        sink.put(raw, 9..<12)
        sink.put(UInt8(ascii: " "))
        sink.put(raw, head.target)
        sink.put("\r\n" as StaticString)
        if fields {
            for field in head.fields {
                if edits.hopByHop.drops(raw, field.name) { continue }
                if edits.dropTransferEncoding && field.name.count == 17
                    && HTTPBytes.equalsLowercased(raw, field.name, ("transfer-encoding" as StaticString).utf8Start)
                {
                    continue
                }
                if edits.contentLength != nil && field.name.count == 14
                    && HTTPBytes.equalsLowercased(raw, field.name, ("content-length" as StaticString).utf8Start)
                {
                    continue
                }
                sink.putField(raw, field)
            }
        }
        if let length = edits.contentLength {
            sink.put("content-length: " as StaticString)
            sink.put(String(length))
            sink.put("\r\n" as StaticString)
        }
        switch edits.connectionClose {
        case true?: sink.put("connection: close\r\n" as StaticString)
        case false?: sink.put("connection: keep-alive\r\n" as StaticString)
        case nil: break
        }
        if edits.addChunked { sink.put("transfer-encoding: chunked\r\n" as StaticString) }
        sink.put("\r\n" as StaticString)
    }

    /// A complete response with a short plain-text body (the proxy's own answers: 4xx/5xx).
    static func statusResponse(
        status: HTTPResponseStatus,
        text: String,
        keepAlive: Bool,
        allocator: ByteBufferAllocator
    ) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 128 + text.utf8.count)
        buffer.writeStaticString("HTTP/1.1 ")
        buffer.writeString(String(status.code))
        buffer.writeStaticString(" ")
        buffer.writeString(status.reasonPhrase)
        buffer.writeStaticString("\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ")
        buffer.writeString(String(text.utf8.count))
        buffer.writeStaticString(keepAlive ? "\r\nconnection: keep-alive\r\n\r\n" : "\r\nconnection: close\r\n\r\n")
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

    /// The last chunk and the trailer section (field lines as they came, each with its CRLF) that end a
    /// chunked body.
    static func writeLastChunk(trailers: ByteBuffer?, into buffer: inout ByteBuffer) {
        guard var trailers, trailers.readableBytes > 0 else {
            buffer.writeStaticString("0\r\n\r\n")
            return
        }
        buffer.writeStaticString("0\r\n")
        buffer.writeBuffer(&trailers)
        buffer.writeStaticString("\r\n")
    }
}

// MARK: sinks

/// Where `HTTPWire` emits bytes: counted first, then written.
protocol ByteSink {
    mutating func put(_ raw: UnsafeRawBufferPointer, _ range: Range<Int>)
    mutating func put(_ string: String)
    mutating func put(_ string: StaticString)
    mutating func put(_ byte: UInt8)
    /// 16 lowercase hex digits.
    mutating func putHex(_ value: UInt64)
}

extension ByteSink {
    /// The field line `name: value\r\n`, from the head's bytes.
    @inline(__always)
    mutating func putField(_ raw: UnsafeRawBufferPointer, _ field: HTTPHead.Field) {
        self.put(raw, field.name)
        self.put(": " as StaticString)
        self.put(raw, field.value)
        self.put("\r\n" as StaticString)
    }
}

@inline(__always)
private func hexDigit(_ nibble: UInt8) -> UInt8 {
    nibble < 10 ? UInt8(ascii: "0") + nibble : UInt8(ascii: "a") + nibble - 10
}

struct CountingSink: ByteSink {
    var count = 0
    mutating func put(_ raw: UnsafeRawBufferPointer, _ range: Range<Int>) { self.count += range.count }
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

    mutating func put(_ raw: UnsafeRawBufferPointer, _ range: Range<Int>) {
        precondition(range.count <= self.remaining && range.upperBound <= raw.count)
        if range.count > 0 { self.next.copyMemory(from: raw.baseAddress! + range.lowerBound, byteCount: range.count) }
        self.next += range.count
    }

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
    mutating func queueLastChunk(trailers: ByteBuffer?, context: ChannelHandlerContext) {
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
