/// Why bytes are not an HTTP/1.1 message (RFC 9112), or are one over the proxy's size limits.
enum HTTPParseError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A CR not followed by LF, or an LF without its CR.
    case invalidLineEnding
    case invalidMethod
    case invalidTarget
    /// Not `HTTP/1.0` or `HTTP/1.1`.
    case unsupportedVersion
    case invalidStatus
    case invalidFieldName
    case invalidFieldValue
    /// Whitespace between a field name and its colon (RFC 9112 5.1: rejected, it smuggles).
    case spaceBeforeColon
    /// A field line continued on the next line (obs-fold, RFC 9112 5.2).
    case obsoleteLineFolding
    case invalidContentLength
    /// Several Content-Length values that differ.
    case conflictingContentLength
    /// A request's Content-Length other than one field line of one plain number (`5, 5`, `,5`, `0005`, two
    /// lines): read differently by different servers, rejected as nginx does.
    case ambiguousContentLength
    /// Both Transfer-Encoding and Content-Length (RFC 9112 6.3: a smuggling attempt, rejected).
    case contentLengthWithTransferEncoding
    /// A request whose Transfer-Encoding is other than one field line `chunked` (501, as nginx).
    case unsupportedTransferCoding
    case invalidChunkSize
    /// Chunk data not followed by CRLF, or a bad chunk extension.
    case invalidChunk
    /// The head (start line and fields) or the trailer section is over the limit.
    case headTooLarge
    /// One field line is over the limit.
    case fieldTooLarge
    /// The connection ended inside a message.
    case incompleteMessage
    /// Bytes from the upstream when no response was expected (after the end of the last one).
    case unexpectedData

    /// 431 rather than 400.
    var isTooLarge: Bool { self == .headTooLarge || self == .fieldTooLarge }

    var description: String {
        switch self {
        case .invalidLineEnding: return "invalid line ending (CRLF expected)"
        case .invalidMethod: return "invalid method"
        case .invalidTarget: return "invalid request target"
        case .unsupportedVersion: return "unsupported HTTP version"
        case .invalidStatus: return "invalid status line"
        case .invalidFieldName: return "invalid header name"
        case .invalidFieldValue: return "invalid header value"
        case .spaceBeforeColon: return "whitespace before a header's colon"
        case .obsoleteLineFolding: return "obsolete header line folding"
        case .invalidContentLength: return "invalid content-length"
        case .conflictingContentLength: return "conflicting content-length values"
        case .ambiguousContentLength: return "content-length not one plain number"
        case .contentLengthWithTransferEncoding: return "both content-length and transfer-encoding"
        case .unsupportedTransferCoding: return "request transfer-encoding other than one 'chunked'"
        case .invalidChunkSize: return "invalid chunk size"
        case .invalidChunk: return "invalid chunk"
        case .headTooLarge: return "header section too large"
        case .fieldTooLarge: return "header field too large"
        case .incompleteMessage: return "connection ended inside a message"
        case .unexpectedData: return "bytes after the end of the response"
        }
    }
}
