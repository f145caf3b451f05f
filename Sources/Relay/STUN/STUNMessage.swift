import MeshCore

/// The class of a STUN message: the two class bits of its type (RFC 8489 §5).
public enum STUNClass: UInt8, Hashable, Sendable, CaseIterable {
    case request = 0b00
    case indication = 0b01
    case successResponse = 0b10
    case errorResponse = 0b11
}

/// A STUN method: 12 bits (RFC 8489 §5, §18.2).
public struct STUNMethod: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt16

    /// `rawValue` keeps its low 12 bits.
    public init(rawValue: UInt16) { self.rawValue = rawValue & 0x0FFF }

    public static let binding = STUNMethod(rawValue: 0x001)

    public var description: String { self == .binding ? "Binding" : "method 0x\(String(self.rawValue, radix: 16))" }
}

/// The 14-bit message type: method bits M0-M11 interleaved with class bits C0 and C1 as
/// `M11..M7 C1 M6..M4 C0 M3..M0` (RFC 8489 §5, figure 3).
public struct STUNMessageType: Hashable, Sendable, CustomStringConvertible {
    public var method: STUNMethod
    public var messageClass: STUNClass

    public init(method: STUNMethod, class messageClass: STUNClass) {
        self.method = method
        self.messageClass = messageClass
    }

    /// The type from the first 16 bits of a header; nil when either of the two top bits is set.
    public init?(rawValue t: UInt16) {
        guard t & 0xC000 == 0 else { return nil }
        let m = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)
        let c = UInt8(((t & 0x0010) >> 4) | ((t & 0x0100) >> 7))
        self.method = STUNMethod(rawValue: m)
        self.messageClass = STUNClass(rawValue: c)!
    }

    public var rawValue: UInt16 {
        let m = self.method.rawValue
        let c = UInt16(self.messageClass.rawValue)
        return (m & 0x000F) | ((c & 0b01) << 4) | ((m & 0x0070) << 1) | ((c & 0b10) << 7) | ((m & 0x0F80) << 2)
    }

    public static let bindingRequest = STUNMessageType(method: .binding, class: .request)
    public static let bindingSuccess = STUNMessageType(method: .binding, class: .successResponse)
    public static let bindingError = STUNMessageType(method: .binding, class: .errorResponse)

    public var description: String { "\(self.method) \(self.messageClass)" }
}

/// The 96-bit transaction id that follows the magic cookie.
public struct STUNTransactionID: Hashable, Sendable, CustomStringConvertible {
    public var high: UInt32
    public var low: UInt64

    public init(high: UInt32, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// From exactly 12 bytes (nil otherwise).
    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 12 else { return nil }
        let b = Array(bytes)
        self.high = b[0..<4].reduce(0) { $0 << 8 | UInt32($1) }
        self.low = b[4..<12].reduce(0) { $0 << 8 | UInt64($1) }
    }

    /// A fresh id from the system's random source (RFC 8489 §5: uniformly random, cryptographically).
    public static func random() -> STUNTransactionID {
        var g = SystemRandomNumberGenerator()
        return STUNTransactionID(high: g.next(), low: g.next())
    }

    public var bytes: [UInt8] {
        (0..<4).map { UInt8(truncatingIfNeeded: self.high >> (24 - 8 * $0)) }
            + (0..<8).map { UInt8(truncatingIfNeeded: self.low >> (56 - 8 * $0)) }
    }

    public var description: String {
        self.bytes.map { $0 < 16 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined()
    }
}

/// An IP address and port as STUN carries them (MAPPED-ADDRESS and friends).
public struct STUNAddress: Hashable, Sendable, CustomStringConvertible {
    public var ip: IPAddress
    public var port: UInt16

    public init(ip: IPAddress, port: UInt16) {
        self.ip = ip
        self.port = port
    }

    public var description: String { self.ip.isIPv4 ? "\(self.ip):\(self.port)" : "[\(self.ip)]:\(self.port)" }
}

/// ERROR-CODE's value: a code 300-699 and a reason phrase (RFC 8489 §14.8).
public struct STUNErrorCode: Hashable, Sendable {
    public var code: Int
    public var reason: String

    public init(code: Int, reason: String) {
        self.code = code
        self.reason = reason
    }

    public static let tryAlternate = 300
    public static let badRequest = 400
    public static let unauthenticated = 401
    public static let unknownAttribute = 420
    public static let staleNonce = 438
    public static let serverError = 500
}

/// Attribute types this codec knows (RFC 8489 §18.3, RFC 5780 §7, RFC 3489 §11.2).
public enum STUNAttributeType {
    public static let mappedAddress: UInt16 = 0x0001
    /// RFC 3489 only (a reflection vector; RFC 5389 removed it).
    public static let responseAddress: UInt16 = 0x0002
    /// RFC 5780 / RFC 3489.
    public static let changeRequest: UInt16 = 0x0003
    /// RFC 3489 only: where the response was sent from (RESPONSE-ORIGIN since RFC 5780).
    public static let sourceAddress: UInt16 = 0x0004
    /// RFC 3489 only: the server's other address (OTHER-ADDRESS since RFC 5780).
    public static let changedAddress: UInt16 = 0x0005
    public static let username: UInt16 = 0x0006
    /// RFC 3489 only.
    public static let password: UInt16 = 0x0007
    public static let messageIntegrity: UInt16 = 0x0008
    public static let errorCode: UInt16 = 0x0009
    public static let unknownAttributes: UInt16 = 0x000A
    public static let realm: UInt16 = 0x0014
    public static let nonce: UInt16 = 0x0015
    public static let messageIntegritySHA256: UInt16 = 0x001C
    public static let passwordAlgorithm: UInt16 = 0x001D
    public static let userhash: UInt16 = 0x001E
    public static let xorMappedAddress: UInt16 = 0x0020
    /// RFC 5780.
    public static let padding: UInt16 = 0x0026
    /// RFC 5780.
    public static let responsePort: UInt16 = 0x0027
    public static let passwordAlgorithms: UInt16 = 0x8002
    public static let alternateDomain: UInt16 = 0x8003
    public static let software: UInt16 = 0x8022
    public static let alternateServer: UInt16 = 0x8023
    public static let fingerprint: UInt16 = 0x8028
    /// RFC 5780.
    public static let responseOrigin: UInt16 = 0x802B
    /// RFC 5780.
    public static let otherAddress: UInt16 = 0x802C

    /// Types 0x0000-0x7FFF are comprehension-required: an agent that does not understand one
    /// must not process the message as if it were absent (RFC 8489 §14).
    public static func isComprehensionRequired(_ type: UInt16) -> Bool { type < 0x8000 }
}

/// One attribute. Values are decoded for the types this codec knows; anything else is kept
/// verbatim in ``other(type:value:)``, so a message re-encodes as it came.
public enum STUNAttribute: Hashable, Sendable {
    case mappedAddress(STUNAddress)
    /// Stored as the plain address; the XOR with the magic cookie (and transaction id) happens on the wire.
    case xorMappedAddress(STUNAddress)
    /// RFC 5780: the address and port the response was sent from.
    case responseOrigin(STUNAddress)
    /// RFC 5780: the server's alternate address and port.
    case otherAddress(STUNAddress)
    /// RFC 3489's SOURCE-ADDRESS (what RESPONSE-ORIGIN became).
    case sourceAddress(STUNAddress)
    /// RFC 3489's CHANGED-ADDRESS (what OTHER-ADDRESS became).
    case changedAddress(STUNAddress)
    /// RFC 5780 / RFC 3489: answer from the other IP and/or port.
    case changeRequest(changeIP: Bool, changePort: Bool)
    case software(String)
    case errorCode(STUNErrorCode)
    case unknownAttributes([UInt16])
    /// HMAC-SHA1 over the message so far: kept opaque (20 bytes); this module checks no credentials.
    case messageIntegrity([UInt8])
    /// HMAC-SHA256, possibly truncated (16-32 bytes, a multiple of 4): kept opaque.
    case messageIntegritySHA256([UInt8])
    /// CRC-32 of the message so far xor 0x5354554e. Checked on decode, computed on encode; must be last.
    case fingerprint
    /// Any other attribute, value as it came (without padding).
    case other(type: UInt16, value: [UInt8])

    /// The attribute's type on the wire.
    public var type: UInt16 {
        switch self {
        case .mappedAddress: return STUNAttributeType.mappedAddress
        case .xorMappedAddress: return STUNAttributeType.xorMappedAddress
        case .responseOrigin: return STUNAttributeType.responseOrigin
        case .otherAddress: return STUNAttributeType.otherAddress
        case .sourceAddress: return STUNAttributeType.sourceAddress
        case .changedAddress: return STUNAttributeType.changedAddress
        case .changeRequest: return STUNAttributeType.changeRequest
        case .software: return STUNAttributeType.software
        case .errorCode: return STUNAttributeType.errorCode
        case .unknownAttributes: return STUNAttributeType.unknownAttributes
        case .messageIntegrity: return STUNAttributeType.messageIntegrity
        case .messageIntegritySHA256: return STUNAttributeType.messageIntegritySHA256
        case .fingerprint: return STUNAttributeType.fingerprint
        case .other(let t, _): return t
        }
    }
}

/// A STUN message (RFC 8489, compatible with RFC 5389 and, without the magic cookie, RFC 3489).
///
/// ```swift
/// var m = STUNMessage(type: .bindingRequest, transactionID: .random())
/// m.attributes = [.software("me"), .fingerprint]
/// let bytes = try m.encode()
/// let back = try STUNMessage.decode(bytes)
/// ```
public struct STUNMessage: Hashable, Sendable {
    /// 0x2112A442: present in every RFC 5389/8489 message.
    public static let magicCookie: UInt32 = 0x2112_A442
    /// The fixed header size.
    public static let headerSize = 20

    public var type: STUNMessageType
    /// ``magicCookie`` for RFC 5389/8489; in an RFC 3489 message, the first 32 bits of its
    /// 128-bit transaction id (echoed back as they came).
    public var cookie: UInt32
    public var transactionID: STUNTransactionID
    /// In wire order. Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256 and
    /// FINGERPRINT are dropped on decode (RFC 8489 §14: agents ignore them).
    public var attributes: [STUNAttribute]

    public init(
        type: STUNMessageType,
        cookie: UInt32 = STUNMessage.magicCookie,
        transactionID: STUNTransactionID,
        attributes: [STUNAttribute] = []
    ) {
        self.type = type
        self.cookie = cookie
        self.transactionID = transactionID
        self.attributes = attributes
    }

    /// An RFC 3489 message: no magic cookie.
    public var isClassic: Bool { self.cookie != STUNMessage.magicCookie }

    /// The first attribute of a type, if any.
    public func first(_ type: UInt16) -> STUNAttribute? { self.attributes.first { $0.type == type } }

    /// Whether the message ends with a (verified, when decoded) FINGERPRINT.
    public var hasFingerprint: Bool { self.attributes.last == .fingerprint }
}
