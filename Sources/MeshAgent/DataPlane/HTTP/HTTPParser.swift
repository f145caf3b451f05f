import NIOCore
import NIOHTTP1

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An incremental HTTP/1.1 parser (RFC 9112) for one direction of one connection: bytes in, message parts
/// out. Strict where a proxy must be (a message it and the next hop could frame differently is rejected:
/// bare CR or LF, whitespace before a colon, obs-fold, Content-Length with Transfer-Encoding, conflicting
/// Content-Length values; in a request, a Content-Length other than one plain number or a Transfer-Encoding
/// other than one `chunked`), lenient where RFC 9112 says so
/// (empty lines before a request line, a missing reason phrase).
///
/// Heads are found line by line as bytes arrive (each byte is looked at once while the head is incomplete),
/// then parsed in one pass into an `HTTPHead` that refers to the head's own bytes. Bodies are delivered as
/// slices of what was read, never copied.
struct HTTPParser {
    enum Kind {
        case request
        case response
    }

    struct Limits {
        /// The head (start line and all field lines, with their CRLFs; the blank line not counted) at most, in
        /// bytes. Also the trailer section's limit.
        var headBytes: Int
        /// One line (a field line, or the start line) at most, in bytes with its CRLF.
        var fieldBytes: Int

        init(headBytes: Int = 64 * 1024 + 8 * 1024, fieldBytes: Int = 16 * 1024) {
            self.headBytes = headBytes
            self.fieldBytes = fieldBytes
        }
    }

    private enum State {
        /// Waiting for (the rest of) a head; `scanned`: bytes already seen to be complete lines.
        case head(scanned: Int)
        case length(remaining: Int)
        /// A chunk-size line next.
        case chunkSize
        case chunkData(remaining: Int)
        /// The CRLF after chunk data.
        case chunkEnd
        /// The trailer section; `scanned` as for a head.
        case trailers(scanned: Int)
        case untilClose
        /// After an upgrade (or CONNECT): what follows is not HTTP; bytes are left in the buffer.
        case paused
        case failed
    }

    let kind: Kind
    let limits: Limits
    private var state = State.head(scanned: 0)
    /// The method of the request the next response answers (responses only).
    private var expectedMethod = HTTPMethod.GET
    /// The message in progress ends in an upgrade (its bytes after it are not HTTP).
    private var pauseAfterMessage = false

    init(kind: Kind, limits: Limits = Limits()) {
        self.kind = kind
        self.limits = limits
    }

    /// A response parser: the next response answers a `method` request (HEAD responses have no body).
    mutating func expectResponse(to method: HTTPMethod) {
        self.expectedMethod = method
        self.awaitingResponse = true
        self.endedAtBoundary = false
    }

    // One response per request (`nextResponsePart`): a request was sent and its final response has not
    // ended; the response in progress is a final one (not 1xx); the last final response ended exactly at the
    // end of the bytes read, with the parser not paused.
    private(set) var awaitingResponse = false
    private var finalResponse = false
    private(set) var endedAtBoundary = false

    /// The response side's rule, one response per request (the proxy's upstream decoder; fuzzed by
    /// `HTTPDesyncFuzzing`): the next part of the expected response in `buffer` (`held`: bytes read behind
    /// it, not in `buffer` yet); nil when more bytes are needed or no response is expected. After the end of
    /// a final response nothing is parsed until the next `expectResponse`, and bytes that arrive while none is
    /// expected are `unexpectedData`. At that end it notes whether the bytes read so far ended exactly there
    /// (`endedAtBoundary`).
    @inline(__always)
    mutating func nextResponsePart(_ buffer: inout ByteBuffer, held: Int) throws -> HTTPPart? {
        guard self.awaitingResponse else {
            // (After a 101 the bytes behind it are the new protocol's: left for the tunnel.)
            if buffer.readableBytes > 0 && !self.isPaused { throw HTTPParseError.unexpectedData }
            return nil
        }
        guard let part = try self.next(&buffer) else { return nil }
        switch part {
        case .head(let head):
            self.finalResponse = head.status >= 200 || head.status == 101
        case .end where self.finalResponse:
            self.finalResponse = false
            self.awaitingResponse = false
            self.endedAtBoundary = buffer.readableBytes == 0 && held == 0 && !self.isPaused
        case .body, .end:
            break
        }
        return part
    }

    /// Between messages (nothing of one read yet, or a head begun).
    var isBetweenMessages: Bool {
        if case .head(let scanned) = self.state { return scanned == 0 }
        return false
    }

    /// After an upgrade: the bytes left in the buffer are the new protocol's.
    var isPaused: Bool {
        if case .paused = self.state { return true }
        return false
    }

    /// The next part in `buffer`, consuming its bytes; nil when more bytes are needed (those of an incomplete
    /// head, chunk-size line or trailer section stay in `buffer` for the next call, with more appended).
    /// Throws on the first malformed byte; the parser is then finished. One part at a time, so that the code
    /// handling a part may use the parser again (`expectResponse`) before the next one is parsed.
    mutating func next(_ buffer: inout ByteBuffer) throws -> HTTPPart? {
        if let part = self.ready.take() {
            self.ready = self.readyNext.take()
            return part
        }
        do {
            try self.run(&buffer)
        } catch {
            self.state = .failed
            throw error
        }
        let part = self.ready.take()
        self.ready = self.readyNext.take()
        return part
    }

    /// Every part in `buffer`, to `emit` (see `next`).
    mutating func parse(_ buffer: inout ByteBuffer, _ emit: (HTTPPart) -> Void) throws {
        while let part = try self.next(&buffer) { emit(part) }
    }

    /// The end of input: ends a body delimited by it (one more `.end` from `next`), or throws when a message
    /// was cut off. Call after `next` returned nil.
    mutating func finish(_ buffer: inout ByteBuffer) throws {
        switch self.state {
        case .untilClose:
            self.state = .failed
            self.push(.end(nil))
        case .head(let scanned) where scanned == 0 && buffer.readableBytes == 0:
            self.state = .failed
        case .paused, .failed:
            self.state = .failed
        default:
            self.state = .failed
            throw HTTPParseError.incompleteMessage
        }
    }

    /// `parse`, then `finish` and the part it may add.
    mutating func finish(_ buffer: inout ByteBuffer, _ emit: (HTTPPart) -> Void) throws {
        try self.parse(&buffer, emit)
        try self.finish(&buffer)
        while let part = try self.next(&buffer) { emit(part) }
    }

    /// Parts produced and not returned yet (a step produces at most two: a head and the end of its empty body).
    private var ready: HTTPPart?
    private var readyNext: HTTPPart?

    private mutating func push(_ part: HTTPPart) {
        if self.ready == nil { self.ready = part } else { self.readyNext = part }
    }

    private mutating func run(_ buffer: inout ByteBuffer) throws {
        while self.ready == nil, buffer.readableBytes > 0 {
            switch self.state {
            case .head(let scanned):
                guard let head = try self.readHead(&buffer, scanned: scanned) else { return }
                self.push(.head(head))
                self.startBody(of: head)
            case .length(let remaining):
                let count = min(remaining, buffer.readableBytes)
                self.push(.body(buffer.readSlice(length: count)!))
                if count == remaining {
                    self.endMessage(nil)
                } else {
                    self.state = .length(remaining: remaining - count)
                }
            case .chunkSize:
                guard let size = try Self.readChunkSize(&buffer) else { return }
                self.state = size == 0 ? .trailers(scanned: 0) : .chunkData(remaining: size)
            case .chunkData(let remaining):
                let count = min(remaining, buffer.readableBytes)
                self.push(.body(buffer.readSlice(length: count)!))
                self.state = count == remaining ? .chunkEnd : .chunkData(remaining: remaining - count)
            case .chunkEnd:
                guard buffer.readableBytes >= 2 else {
                    if buffer.readableBytes == 1,
                        buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) != HTTPBytes.cr
                    {
                        throw HTTPParseError.invalidChunk
                    }
                    return
                }
                guard buffer.readInteger(endianness: .big, as: UInt16.self) == 0x0d0a else {
                    throw HTTPParseError.invalidChunk
                }
                self.state = .chunkSize
            case .trailers(let scanned):
                guard let trailers = try self.readTrailers(&buffer, scanned: scanned) else { return }
                self.endMessage(trailers.readableBytes == 0 ? nil : trailers)
            case .untilClose:
                self.push(.body(buffer.readSlice(length: buffer.readableBytes)!))
            case .paused, .failed:
                return
            }
        }
    }

    private mutating func startBody(of head: HTTPHead) {
        if head.isRequest {
            self.pauseAfterMessage = head.isUpgradeRequest
            if case .CONNECT = head.method {
                self.state = .paused
                return
            }
        } else {
            let code = head.status
            if code == 101 || (code / 100 == 2 && Self.isConnect(head.method)) {
                self.push(.end(nil))
                self.state = .paused
                return
            }
            if code < 200 {
                // An interim response: the final one follows.
                self.push(.end(nil))
                self.state = .head(scanned: 0)
                return
            }
        }
        switch head.body {
        case .none: self.endMessage(nil)
        case .length(let count):
            if count == 0 { self.endMessage(nil) } else { self.state = .length(remaining: count) }
        case .chunked: self.state = .chunkSize
        case .untilClose: self.state = .untilClose
        }
    }

    private static func isConnect(_ method: HTTPMethod) -> Bool {
        if case .CONNECT = method { return true }
        return false
    }

    private mutating func endMessage(_ trailers: ByteBuffer?) {
        self.state = self.pauseAfterMessage ? .paused : .head(scanned: 0)
        self.pauseAfterMessage = false
        self.push(.end(trailers))
    }

    // MARK: heads

    /// The head at the front of `buffer` once its blank line is in; nil while it is not.
    private mutating func readHead(_ buffer: inout ByteBuffer, scanned: Int) throws -> HTTPHead? {
        if scanned == 0 {
            // Empty lines before a request line are ignored (RFC 9112 2.2).
            while buffer.readableBytes >= 2,
                buffer.getInteger(at: buffer.readerIndex, endianness: .big, as: UInt16.self) == 0x0d0a
            {
                buffer.moveReaderIndex(forwardBy: 2)
            }
            if buffer.readableBytes == 1, buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) == HTTPBytes.cr {
                return nil
            }
        }
        switch try self.readSection(&buffer, scanned: scanned, isHead: true) {
        case .incomplete(let resume):
            self.state = .head(scanned: resume)
            return nil
        case .complete(let bytes):
            self.state = .head(scanned: 0)
            return try Self.blamingBareCR(bytes) { try self.parseHead(bytes) }
        }
    }

    private enum Section {
        case complete(ByteBuffer)
        /// The blank line has not arrived; the next look resumes at this offset.
        case incomplete(resume: Int)
    }

    /// The section (a head, or a trailer section) at the front of `buffer` up to its blank line, consumed.
    private func readSection(_ buffer: inout ByteBuffer, scanned: Int, isHead: Bool) throws -> Section {
        let limits = self.limits
        let end = try buffer.withUnsafeReadableBytes { raw throws -> Int? in
            try Self.findEndOfSection(raw, from: scanned, limits: limits, isHead: isHead)
        }
        guard let end else { return .incomplete(resume: Self.completeLines(buffer, from: scanned)) }
        return .complete(buffer.readSlice(length: end)!)
    }

    /// `parse(bytes)`, its error reported as `.invalidLineEnding` when `bytes` has a bare CR (which makes the
    /// line it is in invalid as something else).
    private static func blamingBareCR<T>(_ bytes: ByteBuffer, _ parse: () throws -> T) throws -> T {
        do {
            return try parse()
        } catch {
            throw Self.hasBareCR(bytes) ? HTTPParseError.invalidLineEnding : error
        }
    }

    /// Whether `bytes` has a CR not followed by LF (which makes the line it is in invalid as something else).
    private static func hasBareCR(_ bytes: ByteBuffer) -> Bool {
        bytes.withUnsafeReadableBytes { raw in
            var from = 0
            while let cr = HTTPBytes.find(HTTPBytes.cr, in: raw, from: from) {
                if cr + 1 == raw.count || raw[cr + 1] != HTTPBytes.lf { return true }
                from = cr + 1
            }
            return false
        }
    }

    /// The offset of the first byte of the last complete line at or after `from` (where a later scan resumes).
    private static func completeLines(_ buffer: ByteBuffer, from: Int) -> Int {
        buffer.withUnsafeReadableBytes { raw in
            var resume = from
            var position = from
            while let lf = HTTPBytes.find(HTTPBytes.lf, in: raw, from: position) {
                position = lf + 1
                resume = position
            }
            return resume
        }
    }

    /// The offset just past the blank line ending the section (head or trailers) that starts at 0, checking
    /// the lines from `from` on: CRLF endings, no obs-fold, the line and section limits. Nil when the blank
    /// line has not arrived.
    private static func findEndOfSection(
        _ raw: UnsafeRawBufferPointer,
        from: Int,
        limits: Limits,
        isHead: Bool
    ) throws -> Int? {
        var lineStart = from
        while let lf = HTTPBytes.find(HTTPBytes.lf, in: raw, from: lineStart) {
            guard lf > lineStart, raw[lf - 1] == HTTPBytes.cr else { throw HTTPParseError.invalidLineEnding }
            if lf - 1 == lineStart { return lf + 1 }  // the blank line
            if lineStart > 0, HTTPBytes.isBlank(raw[lineStart]) { throw HTTPParseError.obsoleteLineFolding }
            if lf + 1 - lineStart > limits.fieldBytes {
                throw lineStart == 0 && isHead ? HTTPParseError.headTooLarge : HTTPParseError.fieldTooLarge
            }
            if lf + 1 > limits.headBytes { throw HTTPParseError.headTooLarge }
            lineStart = lf + 1
        }
        if raw.count - lineStart >= limits.fieldBytes {
            throw lineStart == 0 && isHead ? HTTPParseError.headTooLarge : HTTPParseError.fieldTooLarge
        }
        // (A CR alone may begin the blank line, which the limit does not count, as when the head came at once.)
        if raw.count > limits.headBytes, raw.count - lineStart != 1 || raw[lineStart] != HTTPBytes.cr {
            throw HTTPParseError.headTooLarge
        }
        return nil
    }

    private func parseHead(_ bytes: ByteBuffer) throws -> HTTPHead {
        let isRequest = self.kind == .request
        return try bytes.withUnsafeReadableBytes { raw throws -> HTTPHead in
            let lineEnd = HTTPBytes.find(HTTPBytes.lf, in: raw, from: 0)! - 1
            var method = self.expectedMethod
            var target = 0..<0
            var version = HTTPVersion.http1_1
            var status = 0
            if isRequest {
                guard let space = HTTPBytes.find(HTTPBytes.space, in: raw, from: 0), space < lineEnd, space > 0 else {
                    throw HTTPParseError.invalidMethod
                }
                for i in 0..<space where !HTTPBytes.isToken(raw[i]) { throw HTTPParseError.invalidMethod }
                method = Self.method(raw, 0..<space)
                let targetStart = space + 1
                var targetEnd = targetStart
                while targetEnd < lineEnd, raw[targetEnd] > 0x20, raw[targetEnd] != 0x7f { targetEnd += 1 }
                guard targetEnd > targetStart, targetEnd < lineEnd, raw[targetEnd] == HTTPBytes.space else {
                    throw HTTPParseError.invalidTarget
                }
                target = targetStart..<targetEnd
                guard lineEnd - (targetEnd + 1) == 8 else { throw HTTPParseError.unsupportedVersion }
                version = try Self.version(raw, targetEnd + 1)
            } else {
                guard lineEnd >= 12 else { throw HTTPParseError.invalidStatus }
                version = try Self.version(raw, 0)
                guard raw[8] == HTTPBytes.space else { throw HTTPParseError.invalidStatus }
                for i in 9..<12 {
                    let digit = raw[i] &- UInt8(ascii: "0")
                    guard digit < 10 else { throw HTTPParseError.invalidStatus }
                    status = status * 10 + Int(digit)
                }
                guard status >= 100 else { throw HTTPParseError.invalidStatus }
                if lineEnd > 12 {
                    guard raw[12] == HTTPBytes.space else { throw HTTPParseError.invalidStatus }
                    for i in 13..<lineEnd where !HTTPBytes.isFieldByte(raw[i]) { throw HTTPParseError.invalidStatus }
                    target = 13..<lineEnd
                } else {
                    target = 12..<12
                }
            }
            var scan = FieldScan()
            // (One allocation for most heads, rather than one per doubling.)
            scan.fields.reserveCapacity(12)
            try Self.scanFields(raw, from: lineEnd + 2, end: raw.count - 2, into: &scan)
            let body = try Self.body(
                scan: scan,
                isRequest: isRequest,
                method: method,
                status: status,
                raw: raw
            )
            return HTTPHead(
                bytes: bytes,
                isRequest: isRequest,
                method: method,
                target: target,
                version: version,
                status: status,
                scan: scan,
                body: body
            )
        }
    }

    private static func version(_ raw: UnsafeRawBufferPointer, _ at: Int) throws -> HTTPVersion {
        // "HTTP/1.x"
        guard at + 8 <= raw.count,
            raw.loadUnaligned(fromByteOffset: at, as: UInt32.self) == UInt32(bigEndian: 0x4854_5450),
            raw.loadUnaligned(fromByteOffset: at + 4, as: UInt16.self) == UInt16(bigEndian: 0x2f31),
            raw[at + 6] == UInt8(ascii: ".")
        else { throw HTTPParseError.unsupportedVersion }
        switch raw[at + 7] {
        case UInt8(ascii: "1"): return .http1_1
        case UInt8(ascii: "0"): return .http1_0
        default: throw HTTPParseError.unsupportedVersion
        }
    }

    private static func method(_ raw: UnsafeRawBufferPointer, _ range: Range<Int>) -> HTTPMethod {
        @inline(__always) func equals(_ literal: StaticString) -> Bool {
            literal.utf8CodeUnitCount == range.count
                && memcmp(raw.baseAddress! + range.lowerBound, literal.utf8Start, range.count) == 0
        }
        switch range.count {
        case 3:
            if equals("GET") { return .GET }
            if equals("PUT") { return .PUT }
        case 4:
            if equals("POST") { return .POST }
            if equals("HEAD") { return .HEAD }
        case 5:
            if equals("PATCH") { return .PATCH }
            if equals("TRACE") { return .TRACE }
        case 6:
            if equals("DELETE") { return .DELETE }
        case 7:
            if equals("OPTIONS") { return .OPTIONS }
            if equals("CONNECT") { return .CONNECT }
        default:
            break
        }
        return HTTPMethod(rawValue: String(decoding: raw[range], as: UTF8.self))
    }

    // MARK: chunked bodies

    /// A chunk-size line (`hex [; extensions] CRLF`) at the front of `buffer`, consumed; nil while it is incomplete.
    private static func readChunkSize(_ buffer: inout ByteBuffer) throws -> Int? {
        let result = try buffer.withUnsafeReadableBytes { raw throws -> (size: Int, length: Int)? in
            guard let lf = HTTPBytes.find(HTTPBytes.lf, in: raw, from: 0) else {
                if raw.count > 4096 { throw HTTPParseError.invalidChunkSize }
                // Fail early on what cannot start a chunk-size line.
                if let first = raw.first, Self.hexValue(first) == nil { throw HTTPParseError.invalidChunkSize }
                return nil
            }
            guard lf > 0, raw[lf - 1] == HTTPBytes.cr else { throw HTTPParseError.invalidLineEnding }
            let lineEnd = lf - 1
            var size = 0
            var i = 0
            while i < lineEnd, let digit = Self.hexValue(raw[i]) {
                guard i < 15 else { throw HTTPParseError.invalidChunkSize }
                size = size << 4 | Int(digit)
                i += 1
            }
            guard i > 0 else { throw HTTPParseError.invalidChunkSize }
            if i < lineEnd {
                // chunk-ext: BWS ";" ... (names and values are not interpreted, only checked for bad bytes).
                var j = i
                while j < lineEnd, HTTPBytes.isBlank(raw[j]) { j += 1 }
                guard j < lineEnd, raw[j] == UInt8(ascii: ";") else { throw HTTPParseError.invalidChunkSize }
                for k in j..<lineEnd where !HTTPBytes.isFieldByte(raw[k]) { throw HTTPParseError.invalidChunk }
            }
            return (size, lf + 1)
        }
        guard let result else { return nil }
        buffer.moveReaderIndex(forwardBy: result.length)
        return result.size
    }

    @inline(__always)
    private static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return byte - UInt8(ascii: "A") + 10
        default: return nil
        }
    }

    /// The trailer section (field lines up to a blank line), consumed; its field lines without the blank line.
    private mutating func readTrailers(_ buffer: inout ByteBuffer, scanned: Int) throws -> ByteBuffer? {
        let section: ByteBuffer
        switch try self.readSection(&buffer, scanned: scanned, isHead: false) {
        case .incomplete(let resume):
            self.state = .trailers(scanned: resume)
            return nil
        case .complete(let bytes):
            section = bytes
        }
        let lines = section.getSlice(at: section.readerIndex, length: section.readableBytes - 2)!
        var scan = FieldScan()
        try Self.blamingBareCR(lines) {
            try lines.withUnsafeReadableBytes { raw throws in
                try Self.scanFields(raw, from: 0, end: raw.count, into: &scan)
            }
        }
        return lines
    }
}
