/// Why bytes could not be decoded as a STUN message, or a message could not be encoded.
///
/// The codec throws these and never traps: every malformed input maps to one ``Code`` and the byte
/// offset where the problem was found, so a server can drop the datagram (or answer 400) and count it.
/// Two errors are equal when their code and offset are; ``detail`` is for people.
public struct STUNWireError: Error, Hashable, Sendable, CustomStringConvertible, OffsetWireError {
    /// What went wrong.
    public enum Code: String, Hashable, Sendable, CaseIterable {
        /// Fewer than the 20 bytes of a header.
        case truncatedHeader
        /// The first two bits of the message are not zero: not STUN (RTP, TLS, DTLS, ChannelData...).
        case notSTUN
        /// The header's message length is not a multiple of 4.
        case lengthNotMultipleOfFour
        /// The header's message length disagrees with the bytes there are.
        case lengthMismatch
        /// An attribute's header, value or padding runs past the end of the message.
        case attributeOverrun
        /// A FINGERPRINT whose CRC-32 does not match the message.
        case badFingerprint
        /// An attribute after FINGERPRINT, which must come last.
        case attributeAfterFingerprint
        /// A known attribute with a length its layout does not allow.
        case badAttributeLength
        /// An address attribute whose family is neither 0x01 (IPv4) nor 0x02 (IPv6).
        case badAddressFamily
        /// An ERROR-CODE with a class outside 3-6 or a number above 99.
        case badErrorCode
        /// A text attribute (SOFTWARE, an error's reason phrase) that is not UTF-8 or is over 763 bytes.
        case badText
        /// A message that cannot be encoded: over 65535 bytes of attributes, a value out of range,
        /// or FINGERPRINT not last.
        case unencodable

        /// Whether the bytes fail the checks that tell a STUN message from anything else (RFC 8489
        /// §6.3): such input is dropped silently rather than answered.
        public var isFraming: Bool {
            switch self {
            case .truncatedHeader, .notSTUN, .lengthNotMultipleOfFour, .lengthMismatch, .attributeOverrun,
                .badFingerprint, .attributeAfterFingerprint:
                return true
            case .badAttributeLength, .badAddressFamily, .badErrorCode, .badText, .unencodable:
                return false
            }
        }
    }

    public let code: Code
    /// Byte offset in the message where the problem was found (0 for encoding errors).
    public let offset: Int
    /// A human explanation (not part of equality).
    public let detail: String

    public init(_ code: Code, at offset: Int, _ detail: String) {
        self.code = code
        self.offset = offset
        self.detail = detail
    }

    public var description: String { "STUNWireError.\(self.code.rawValue) at byte \(self.offset): \(self.detail)" }
}
