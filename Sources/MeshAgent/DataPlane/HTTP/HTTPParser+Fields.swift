import NIOCore
import NIOHTTP1

/// The parser's field scan: each field line of a head checked and noted (`FieldScan`: Connection tokens,
/// Content-Length, Transfer-Encoding, the fields the proxy edits), and the body's framing decided from it
/// (RFC 9112 section 6), with the strict rules a proxy needs. Pure functions over the head's bytes.
extension HTTPParser {
    /// Field lines from `from` up to `end` (the blank line): each `name: value` with a token name and a
    /// valid value, noting what the proxy looks at.
    static func scanFields(
        _ raw: UnsafeRawBufferPointer,
        from: Int,
        end: Int,
        into scan: inout FieldScan
    ) throws {
        var lineStart = from
        while lineStart < end {
            let lf = HTTPBytes.find(HTTPBytes.lf, in: raw, from: lineStart)!
            let lineEnd = lf - 1
            guard let colon = HTTPBytes.find(HTTPBytes.colon, in: raw, from: lineStart), colon < lineEnd else {
                throw HTTPParseError.invalidFieldName
            }
            guard colon > lineStart else { throw HTTPParseError.invalidFieldName }
            for i in lineStart..<colon where !HTTPBytes.isToken(raw[i]) {
                throw HTTPBytes.isBlank(raw[i]) ? HTTPParseError.spaceBeforeColon : HTTPParseError.invalidFieldName
            }
            var valueStart = colon + 1
            var valueEnd = lineEnd
            for i in valueStart..<valueEnd where !HTTPBytes.isFieldByte(raw[i]) {
                throw HTTPParseError.invalidFieldValue
            }
            while valueStart < valueEnd, HTTPBytes.isBlank(raw[valueStart]) { valueStart += 1 }
            while valueEnd > valueStart, HTTPBytes.isBlank(raw[valueEnd - 1]) { valueEnd -= 1 }
            let field = HTTPHead.Field(name: lineStart..<colon, value: valueStart..<valueEnd)
            scan.fieldBytes += field.lineBytes
            try Self.note(field, index: scan.fields.count, raw, into: &scan)
            scan.fields.append(field)
            lineStart = lf + 1
        }
    }

    /// Takes the fields the proxy and the framing care about into account (by length first).
    static func note(
        _ field: HTTPHead.Field,
        index: Int,
        _ raw: UnsafeRawBufferPointer,
        into scan: inout FieldScan
    ) throws {
        @inline(__always) func named(_ lower: StaticString) -> Bool {
            HTTPBytes.equalsLowercased(raw, field.name, lower.utf8Start)
        }
        switch field.name.count {
        case 2:
            if named("te") { scan.hasHopByHop = true }
        case 4:
            if named("host") {
                if scan.hostField == nil { scan.hostField = index }
                scan.hostCount += 1
            }
        case 9:
            if named("forwarded") || named("x-real-ip") { scan.hasForwardedClaims = true }
        case 7:
            if named("upgrade") {
                scan.hasHopByHop = true
                if scan.upgradeField == nil { scan.upgradeField = index }
            } else if named("trailer") {
                scan.hasHopByHop = true
            }
        case 10:
            if named("connection") {
                scan.hasHopByHop = true
                Self.connectionTokens(raw, field.value, into: &scan)
            } else if named("keep-alive") {
                scan.hasHopByHop = true
            }
        case 12:
            if scan.requestIDField == nil, named("x-request-id") {
                scan.requestIDField = index
            } else if scan.traceField == nil, named("x-mesh-trace") {
                scan.traceField = index
            }
        case 14:
            if named("content-length") {
                scan.contentLengthLines += 1
                scan.contentLengthBytes += field.lineBytes
                try Self.contentLength(raw, field.value, into: &scan)
            }
        case 15:
            if scan.forwardedForField == nil, named("x-forwarded-for") { scan.forwardedForField = index }
        case 16:
            if named("proxy-connection") { scan.hasHopByHop = true }
        case 17:
            if named("transfer-encoding") {
                scan.transferEncoding = field.value
                scan.transferEncodingLines += 1
                scan.transferEncodingBytes += field.lineBytes
                Self.transferCodings(raw, field.value, into: &scan)
            }
        case 18:
            if named("proxy-authenticate") { scan.hasHopByHop = true }
        case 19:
            if named("proxy-authorization") { scan.hasHopByHop = true }
        default:
            break
        }
    }

    /// Calls `body` with each non-empty element of a comma-separated list (spaces trimmed).
    static func forEachListElement(
        _ raw: UnsafeRawBufferPointer,
        _ range: Range<Int>,
        _ body: (Range<Int>) throws -> Void
    ) rethrows {
        var start = range.lowerBound
        while start <= range.upperBound {
            var end = start
            while end < range.upperBound, raw[end] != UInt8(ascii: ",") { end += 1 }
            var a = start
            var b = end
            while a < b, HTTPBytes.isBlank(raw[a]) { a += 1 }
            while b > a, HTTPBytes.isBlank(raw[b - 1]) { b -= 1 }
            if b > a { try body(a..<b) }
            start = end + 1
        }
    }

    static func connectionTokens(_ raw: UnsafeRawBufferPointer, _ value: Range<Int>, into scan: inout FieldScan) {
        Self.forEachListElement(raw, value) { token in
            switch token.count {
            case 5 where HTTPBytes.equalsLowercased(raw, token, ("close" as StaticString).utf8Start):
                scan.connectionClose = true
            case 7 where HTTPBytes.equalsLowercased(raw, token, ("upgrade" as StaticString).utf8Start):
                scan.connectionUpgrade = true
            case 10 where HTTPBytes.equalsLowercased(raw, token, ("keep-alive" as StaticString).utf8Start):
                scan.connectionKeepAlive = true
            default:
                scan.connectionNamesOthers = true
            }
        }
    }

    static func contentLength(
        _ raw: UnsafeRawBufferPointer,
        _ value: Range<Int>,
        into scan: inout FieldScan
    ) throws {
        // A list of identical values is one value (RFC 9112 6.3, 5.); only a plain number is canonical.
        if value.isEmpty || value.count > 18 || (value.count > 1 && raw[value.lowerBound] == UInt8(ascii: "0")) {
            scan.contentLengthPlain = false
        } else {
            for i in value where raw[i] &- UInt8(ascii: "0") >= 10 { scan.contentLengthPlain = false }
        }
        var any = false
        try Self.forEachListElement(raw, value) { (element: Range<Int>) throws in
            any = true
            guard element.count <= 18 else { throw HTTPParseError.invalidContentLength }
            var length = 0
            for i in element {
                let digit = raw[i] &- UInt8(ascii: "0")
                guard digit < 10 else { throw HTTPParseError.invalidContentLength }
                length = length * 10 + Int(digit)
            }
            if let previous = scan.contentLength, previous != length { throw HTTPParseError.conflictingContentLength }
            scan.contentLength = length
        }
        guard any else { throw HTTPParseError.invalidContentLength }
    }

    static func transferCodings(_ raw: UnsafeRawBufferPointer, _ value: Range<Int>, into scan: inout FieldScan) {
        var last: Range<Int>?
        Self.forEachListElement(raw, value) { coding in
            last = coding
            if coding.count == 7, HTTPBytes.equalsLowercased(raw, coding, ("chunked" as StaticString).utf8Start) {
                scan.chunkedCount += 1
            }
        }
        if let last {
            scan.transferEncodingChunked =
                last.count == 7 && HTTPBytes.equalsLowercased(raw, last, ("chunked" as StaticString).utf8Start)
        } else {
            scan.transferEncodingChunked = false
        }
    }

    /// Whether the Transfer-Encoding value `value` is the one coding `chunked` (spaces around it allowed).
    static func isOnlyChunked(_ raw: UnsafeRawBufferPointer, _ value: Range<Int>) -> Bool {
        value.count == 7 && HTTPBytes.equalsLowercased(raw, value, ("chunked" as StaticString).utf8Start)
    }

    /// How the body is delimited (RFC 9112 6.3).
    static func body(
        scan: FieldScan,
        isRequest: Bool,
        method: HTTPMethod,
        status: Int,
        raw: UnsafeRawBufferPointer
    ) throws -> HTTPHead.Body {
        if scan.transferEncoding != nil {
            if scan.contentLength != nil { throw HTTPParseError.contentLengthWithTransferEncoding }
            if isRequest {
                // One line, one coding: chunked (nginx answers anything else 501).
                guard scan.transferEncodingLines == 1, scan.chunkedCount == 1, scan.transferEncodingChunked,
                    Self.isOnlyChunked(raw, scan.transferEncoding!)
                else { throw HTTPParseError.unsupportedTransferCoding }
            }
        } else if isRequest, scan.contentLength != nil, scan.contentLengthLines > 1 || !scan.contentLengthPlain {
            throw HTTPParseError.ambiguousContentLength
        }
        if !isRequest {
            switch method {
            case .HEAD: return .none
            case .CONNECT where status / 100 == 2: return .none
            default: break
            }
            if status < 200 || status == 204 || status == 304 { return .none }
        }
        if scan.transferEncoding != nil {
            if scan.transferEncodingChunked && scan.chunkedCount == 1 { return .chunked }
            if isRequest { throw HTTPParseError.unsupportedTransferCoding }
            return .untilClose(transferCoded: true)
        }
        if let length = scan.contentLength { return .length(length) }
        return isRequest ? .none : .untilClose(transferCoded: false)
    }
}
