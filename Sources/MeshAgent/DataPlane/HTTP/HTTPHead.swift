import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A parsed HTTP/1.x head: its bytes as they came, and where the parts are in them. Nothing is copied into
/// strings; names and values are byte ranges of `bytes`, compared and written out as bytes.
final class HTTPHead {
    /// A field line: the name, and the value without the whitespace around it (offsets in `bytes`).
    struct Field {
        let name: Range<Int>
        let value: Range<Int>

        /// The bytes of the line `name: value\r\n` as the proxy writes it.
        var lineBytes: Int { self.name.count + self.value.count + 4 }
    }

    /// How the body of the message is delimited (RFC 9112 6.3).
    enum Body: Equatable {
        case none
        case length(Int)
        case chunked
        /// Until the connection closes (responses only); `transferCoded`: by a Transfer-Encoding whose last
        /// coding is not chunked.
        case untilClose(transferCoded: Bool)
    }

    /// The head from its first byte to the end of the blank line.
    let bytes: ByteBuffer
    let isRequest: Bool
    /// The request method (for a response: the method of the request it answers).
    let method: HTTPMethod
    /// The request target, or the status line's reason phrase.
    let target: Range<Int>
    let version: HTTPVersion
    /// The status code (0 for a request).
    let status: Int
    let fields: [Field]
    /// The bytes of all field lines as `Field.lineBytes` counts them.
    let fieldBytes: Int
    let body: Body
    /// The message has a Transfer-Encoding field (and the bytes of its lines).
    let transferEncodingBytes: Int
    let hasTransferEncoding: Bool
    /// Tokens of the Connection field(s).
    let connectionClose: Bool
    let connectionKeepAlive: Bool
    let connectionUpgrade: Bool
    /// Connection lists a token other than close, keep-alive and upgrade (a field name to drop).
    let connectionNamesOthers: Bool
    /// The index of the first Upgrade, X-Request-Id and X-Forwarded-For field.
    let upgradeField: Int?
    let requestIDField: Int?
    /// The first `x-mesh-trace` field (`meshctl trace`).
    let traceField: Int?
    let forwardedForField: Int?
    /// The first Host field and how many there are.
    let hostField: Int?
    let hostCount: Int
    /// A Forwarded or X-Real-IP field is present (client-set forwarding claims).
    let hasForwardedClaims: Bool
    /// The Content-Length lines are one line with one plain number (no list, no leading zero), or there are
    /// none; and the bytes of those lines.
    let contentLengthCanonical: Bool
    let contentLengthBytes: Int
    /// The Content-Length value, when there is one.
    let contentLength: Int?
    /// A hop-by-hop field (RFC 9110 7.6.1) is present, Connection included.
    let hasHopByHop: Bool

    init(
        bytes: ByteBuffer,
        isRequest: Bool,
        method: HTTPMethod,
        target: Range<Int>,
        version: HTTPVersion,
        status: Int,
        scan: FieldScan,
        body: Body
    ) {
        self.bytes = bytes
        self.isRequest = isRequest
        self.method = method
        self.target = target
        self.version = version
        self.status = status
        self.fields = scan.fields
        self.fieldBytes = scan.fieldBytes
        self.body = body
        self.hasTransferEncoding = scan.transferEncoding != nil
        self.transferEncodingBytes = scan.transferEncodingBytes
        self.connectionClose = scan.connectionClose
        self.connectionKeepAlive = scan.connectionKeepAlive
        self.connectionUpgrade = scan.connectionUpgrade
        self.connectionNamesOthers = scan.connectionNamesOthers
        self.upgradeField = scan.upgradeField
        self.requestIDField = scan.requestIDField
        self.traceField = scan.traceField
        self.forwardedForField = scan.forwardedForField
        self.hostField = scan.hostField
        self.hostCount = scan.hostCount
        self.hasForwardedClaims = scan.hasForwardedClaims
        self.contentLengthCanonical = scan.contentLengthLines <= 1 && scan.contentLengthPlain
        self.contentLengthBytes = scan.contentLengthBytes
        self.contentLength = scan.contentLength
        self.hasHopByHop = scan.hasHopByHop
    }

    /// Whether the connection may carry another message after this one (RFC 9112 9.3).
    var isKeepAlive: Bool {
        if self.connectionClose { return false }
        return self.version.minor >= 1 || self.connectionKeepAlive
    }

    /// An upgrade request (`Connection: upgrade` and an Upgrade field).
    var isUpgradeRequest: Bool { self.isRequest && self.connectionUpgrade && self.upgradeField != nil }

    /// The request target (or reason phrase) as a string.
    var uri: String { self.string(self.target) }

    func string(_ range: Range<Int>) -> String {
        self.bytes.getString(at: self.bytes.readerIndex + range.lowerBound, length: range.count) ?? ""
    }

    func name(_ index: Int) -> String { self.string(self.fields[index].name) }
    func value(_ index: Int) -> String { self.string(self.fields[index].value) }

    /// Whether field `index` is called `lowercase` (ASCII case-insensitive).
    func field(_ index: Int, is lowercase: StaticString) -> Bool {
        let range = self.fields[index].name
        guard range.count == lowercase.utf8CodeUnitCount else { return false }
        return self.bytes.withUnsafeReadableBytes { raw in
            HTTPBytes.equalsLowercased(raw, range, lowercase.utf8Start)
        }
    }

    /// Whether field `index` is called `name` (ASCII case-insensitive).
    func field(_ index: Int, isNamed name: String) -> Bool {
        let range = self.fields[index].name
        return self.bytes.withUnsafeReadableBytes { raw in HTTPBytes.equalsIgnoringCase(raw, range, name) }
    }

    /// The value of the first field called `name`.
    func first(name: String) -> String? {
        for index in self.fields.indices where self.field(index, isNamed: name) { return self.value(index) }
        return nil
    }

    /// The values of the fields called `name`, in order.
    func values(name: String) -> [String] {
        self.fields.indices.filter { self.field($0, isNamed: name) }.map { self.value($0) }
    }

    /// Every field as strings (tests, logs).
    var headers: [(name: String, value: String)] {
        self.fields.indices.map { (self.name($0), self.value($0)) }
    }
}

/// Byte helpers of the parser and the serialiser.
enum HTTPBytes {
    static let cr = UInt8(ascii: "\r")
    static let lf = UInt8(ascii: "\n")
    static let space = UInt8(ascii: " ")
    static let tab = UInt8(ascii: "\t")
    static let colon = UInt8(ascii: ":")

    /// tchar (RFC 9110 5.6.2), the characters of a token (method, field name): `!#$%&'*+-.^_`|~`, digits and
    /// letters, as a bitmap of the bytes 0-63 and 64-127.
    @inline(__always)
    static func isToken(_ byte: UInt8) -> Bool {
        switch byte {
        case 0..<64: return (0x03ff_6cfa_0000_0000 as UInt64) >> byte & 1 == 1
        case 64..<128: return (0x57ff_ffff_c7ff_fffe as UInt64) >> (byte - 64) & 1 == 1
        default: return false
        }
    }

    /// A byte allowed in a field value or reason phrase: VCHAR, obs-text, SP, HTAB.
    @inline(__always)
    static func isFieldByte(_ byte: UInt8) -> Bool { byte >= 0x20 ? byte != 0x7f : byte == Self.tab }

    @inline(__always)
    static func isBlank(_ byte: UInt8) -> Bool { byte == Self.space || byte == Self.tab }

    static func equalsLowercased(
        _ raw: UnsafeRawBufferPointer,
        _ range: Range<Int>,
        _ lower: UnsafePointer<UInt8>
    )
        -> Bool
    {
        var i = 0
        for offset in range {
            if asciiLower(raw[offset]) != lower[i] { return false }
            i += 1
        }
        return true
    }

    /// Whether `raw[range]` is `text`, ASCII case-insensitively.
    static func equalsIgnoringCase(_ raw: UnsafeRawBufferPointer, _ range: Range<Int>, _ text: String) -> Bool {
        range.count == text.utf8.count && zip(raw[range], text.utf8).allSatisfy { asciiLower($0) == asciiLower($1) }
    }

    /// The offset of the first `byte` in `raw[from..<raw.count]`.
    @inline(__always)
    static func find(_ byte: UInt8, in raw: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < raw.count, let base = raw.baseAddress else { return nil }
        guard let hit = memchr(base + from, Int32(byte), raw.count - from) else { return nil }
        return UnsafeRawPointer(hit) - base
    }
}

/// What one pass over a head's field lines found.
struct FieldScan {
    var fields: [HTTPHead.Field] = []
    var fieldBytes = 0
    var contentLength: Int?
    var contentLengthLines = 0
    var contentLengthPlain = true
    var contentLengthBytes = 0
    var transferEncoding: Range<Int>?
    var transferEncodingLines = 0
    var transferEncodingBytes = 0
    var transferEncodingChunked = false
    var chunkedCount = 0
    var connectionClose = false
    var connectionKeepAlive = false
    var connectionUpgrade = false
    var connectionNamesOthers = false
    var upgradeField: Int?
    var requestIDField: Int?
    /// `x-mesh-trace`: `meshctl trace` asks the proxy to record what it does with this request.
    var traceField: Int?
    var forwardedForField: Int?
    var hostField: Int?
    var hostCount = 0
    var hasForwardedClaims = false
    var hasHopByHop = false
}

/// One part of a message as the parser delivers it.
enum HTTPPart {
    case head(HTTPHead)
    /// Body bytes (for a chunked body, the chunk data without its framing).
    case body(ByteBuffer)
    /// The end of the message, with the trailer section's field lines (each with its CRLF) if it had any.
    case end(ByteBuffer?)
}
