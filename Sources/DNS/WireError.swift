/// Why a DNS message (or a name given as text) could not be decoded or encoded.
///
/// The codec throws these and never traps: every malformed input maps to one case, so a caller can
/// answer FORMERR (or drop the datagram) and count it.
public enum DNSWireError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The message ended before a field that its header, a length or a count promised.
    case truncated
    /// A section count promises more entries than the remaining bytes could possibly hold.
    case countExceedsMessage
    /// A label length byte above 63 that is not a compression pointer (0x40 and 0x80 label types).
    case labelTooLong
    /// A name longer than 255 bytes in wire form (after decompression).
    case nameTooLong
    /// A compression pointer that points at or after the place it was read from.
    case forwardPointer
    /// A compression pointer that would revisit bytes already followed, or too many hops.
    case pointerLoop
    /// A compression pointer into the 12-byte header.
    case pointerIntoHeader
    /// A record's data does not match its RDLENGTH or its type's layout.
    case badRData
    /// An EDNS OPT record in the wrong place, with a non-root owner, or more than one.
    case badOPT
    /// A name given as text is not a valid DNS name (empty label, label over 63 bytes, ...).
    case invalidName
    /// A record cannot be encoded: wrong address family for A/AAAA, a TXT string over 255 bytes,
    /// or RDATA over 65535 bytes.
    case unencodableRecord

    public var description: String {
        switch self {
        case .truncated: return "DNSWireError.truncated: message ends inside a field"
        case .countExceedsMessage: return "DNSWireError.countExceedsMessage: section counts exceed the message"
        case .labelTooLong: return "DNSWireError.labelTooLong: label length byte above 63"
        case .nameTooLong: return "DNSWireError.nameTooLong: name over 255 bytes"
        case .forwardPointer: return "DNSWireError.forwardPointer: compression pointer does not point backwards"
        case .pointerLoop: return "DNSWireError.pointerLoop: compression pointers loop"
        case .pointerIntoHeader: return "DNSWireError.pointerIntoHeader: compression pointer into the header"
        case .badRData: return "DNSWireError.badRData: record data does not match its length or type"
        case .badOPT: return "DNSWireError.badOPT: misplaced or duplicate EDNS OPT record"
        case .invalidName: return "DNSWireError.invalidName: not a valid DNS name"
        case .unencodableRecord: return "DNSWireError.unencodableRecord: record cannot be encoded"
        }
    }
}
