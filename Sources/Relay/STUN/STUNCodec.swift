import MeshCore

// The wire codec: pure, no I/O. Decoding checks everything RFC 8489 §6.3 asks of a message (first
// two bits zero, length a multiple of 4 that matches the bytes, attributes padded to 4 bytes and
// inside the message, FINGERPRINT last and correct) and the layout of every attribute it knows.

extension STUNMessage {
    /// Decodes one whole message: `bytes` must hold exactly one (a UDP datagram, or a TCP frame).
    public static func decode(_ bytes: [UInt8]) throws(STUNWireError) -> STUNMessage {
        let result = bytes.withUnsafeBytes { raw in
            Result { () throws(STUNWireError) -> STUNMessage in try STUNMessage.decode(raw) }
        }
        return try result.get()
    }

    /// Decodes one whole message from raw bytes (see ``decode(_:)-([UInt8])``).
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(STUNWireError) -> STUNMessage {
        let header = try STUNMessage.header(bytes)
        let n = bytes.count
        var message = STUNMessage(type: header.type, cookie: header.cookie, transactionID: header.transactionID)
        var offset = STUNMessage.headerSize
        var afterIntegrity = false
        var sawFingerprint = false
        while offset < n {
            if sawFingerprint {
                throw STUNWireError(.attributeAfterFingerprint, at: offset, "an attribute follows FINGERPRINT")
            }
            guard offset + 4 <= n else {
                throw STUNWireError(.attributeOverrun, at: offset, "attribute header past the end")
            }
            let type = bytes.u16(offset)
            let length = Int(bytes.u16(offset + 2))
            let start = offset + 4
            let padded = (length + 3) & ~3
            guard start + padded <= n else {
                throw STUNWireError(
                    .attributeOverrun,
                    at: offset,
                    "attribute 0x\(hex16(type)) of \(length) bytes runs past the end of the message"
                )
            }
            let value = UnsafeRawBufferPointer(rebasing: bytes[start..<(start + length)])
            if type == STUNAttributeType.fingerprint {
                guard length == 4 else {
                    throw STUNWireError(.badAttributeLength, at: offset, "FINGERPRINT must hold 4 bytes, not \(length)")
                }
                let expected = CRC32.checksum(UnsafeRawBufferPointer(rebasing: bytes[0..<offset])) ^ 0x5354_554E
                let got = value.u32(0)
                guard got == expected else {
                    throw STUNWireError(
                        .badFingerprint,
                        at: offset,
                        "FINGERPRINT is 0x\(String(got, radix: 16)), the message's is 0x\(String(expected, radix: 16))"
                    )
                }
                sawFingerprint = true
                message.attributes.append(.fingerprint)
            } else if !afterIntegrity || type == STUNAttributeType.messageIntegritySHA256 {
                message.attributes.append(
                    try decodeAttribute(type: type, value: value, at: offset, transactionID: header.transactionID)
                )
                if type == STUNAttributeType.messageIntegrity || type == STUNAttributeType.messageIntegritySHA256 {
                    afterIntegrity = true
                }
            }
            offset = start + padded
        }
        return message
    }

    /// The header of `bytes` after the framing checks of the whole message (length against the
    /// bytes); does not look at attributes.
    public static func header(
        _ bytes: UnsafeRawBufferPointer
    ) throws(STUNWireError) -> (type: STUNMessageType, cookie: UInt32, transactionID: STUNTransactionID) {
        guard bytes.count >= STUNMessage.headerSize else {
            throw STUNWireError(.truncatedHeader, at: 0, "\(bytes.count) bytes, a header needs 20")
        }
        guard let type = STUNMessageType(rawValue: bytes.u16(0)) else {
            throw STUNWireError(.notSTUN, at: 0, "the first two bits are not zero")
        }
        let length = Int(bytes.u16(2))
        guard length % 4 == 0 else {
            throw STUNWireError(.lengthNotMultipleOfFour, at: 2, "message length \(length) is not a multiple of 4")
        }
        guard STUNMessage.headerSize + length == bytes.count else {
            throw STUNWireError(
                .lengthMismatch,
                at: 2,
                "the header announces \(length) bytes of attributes, \(bytes.count - STUNMessage.headerSize) follow"
            )
        }
        let id = STUNTransactionID(high: bytes.u32(8), low: UInt64(bytes.u32(12)) << 32 | UInt64(bytes.u32(16)))
        return (type, bytes.u32(4), id)
    }

    /// The size of the whole message whose header starts `bytes` (for stream framing): nil until 4
    /// bytes are there; throws when they cannot start a STUN message.
    public static func frameLength(_ bytes: UnsafeRawBufferPointer) throws(STUNWireError) -> Int? {
        guard bytes.count >= 4 else { return nil }
        guard bytes[0] & 0xC0 == 0 else { throw STUNWireError(.notSTUN, at: 0, "the first two bits are not zero") }
        let length = Int(bytes.u16(2))
        guard length % 4 == 0 else {
            throw STUNWireError(.lengthNotMultipleOfFour, at: 2, "message length \(length) is not a multiple of 4")
        }
        return STUNMessage.headerSize + length
    }

    /// The wire form: header, then each attribute padded with zeros to 4 bytes; FINGERPRINT (last)
    /// computed over what precedes it.
    public func encode() throws(STUNWireError) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(64)
        out.put16(self.type.rawValue)
        out.put16(0)
        out.put32(self.cookie)
        out += self.transactionID.bytes
        for (i, attribute) in self.attributes.enumerated() {
            if attribute == .fingerprint {
                guard i == self.attributes.count - 1 else {
                    throw STUNWireError(.unencodable, at: 0, "FINGERPRINT must be the last attribute")
                }
                try Self.setLength(&out, out.count + 8)
                let crc = CRC32.checksum(out) ^ 0x5354_554E
                out.put16(STUNAttributeType.fingerprint)
                out.put16(4)
                out.put32(crc)
                return out
            }
            let value = try Self.encodeValue(attribute, transactionID: self.transactionID)
            guard value.count <= 0xFFFF else {
                throw STUNWireError(.unencodable, at: 0, "attribute 0x\(hex16(attribute.type)) over 65535 bytes")
            }
            out.put16(attribute.type)
            out.put16(UInt16(value.count))
            out += value
            out += repeatElement(0, count: (4 - value.count % 4) % 4)
        }
        try Self.setLength(&out, out.count)
        return out
    }

    private static func setLength(_ out: inout [UInt8], _ total: Int) throws(STUNWireError) {
        let length = total - STUNMessage.headerSize
        guard length <= 0xFFFF else {
            throw STUNWireError(.unencodable, at: 0, "\(length) bytes of attributes, at most 65535 fit")
        }
        out[2] = UInt8(length >> 8)
        out[3] = UInt8(length & 0xFF)
    }
}

// MARK: - Attributes

/// Longest SOFTWARE value and error reason phrase (RFC 8489 §14.8, §14.14: under 128 characters,
/// at most 763 bytes).
let maxTextBytes = 763

private func decodeAttribute(
    type: UInt16,
    value: UnsafeRawBufferPointer,
    at offset: Int,
    transactionID: STUNTransactionID
) throws(STUNWireError) -> STUNAttribute {
    switch type {
    case STUNAttributeType.mappedAddress:
        return .mappedAddress(try decodeAddress(value, at: offset, xor: nil))
    case STUNAttributeType.xorMappedAddress:
        return .xorMappedAddress(try decodeAddress(value, at: offset, xor: transactionID))
    case STUNAttributeType.responseOrigin:
        return .responseOrigin(try decodeAddress(value, at: offset, xor: nil))
    case STUNAttributeType.otherAddress:
        return .otherAddress(try decodeAddress(value, at: offset, xor: nil))
    case STUNAttributeType.sourceAddress:
        return .sourceAddress(try decodeAddress(value, at: offset, xor: nil))
    case STUNAttributeType.changedAddress:
        return .changedAddress(try decodeAddress(value, at: offset, xor: nil))
    case STUNAttributeType.changeRequest:
        guard value.count == 4 else {
            throw STUNWireError(.badAttributeLength, at: offset, "CHANGE-REQUEST must hold 4 bytes, not \(value.count)")
        }
        return .changeRequest(changeIP: value[3] & 0x04 != 0, changePort: value[3] & 0x02 != 0)
    case STUNAttributeType.software:
        return .software(try decodeText(value, at: offset, what: "SOFTWARE"))
    case STUNAttributeType.errorCode:
        guard value.count >= 4 else {
            throw STUNWireError(
                .badAttributeLength,
                at: offset,
                "ERROR-CODE needs at least 4 bytes, not \(value.count)"
            )
        }
        let errorClass = Int(value[2] & 0x07)
        let number = Int(value[3])
        guard (3...6).contains(errorClass), number <= 99 else {
            throw STUNWireError(
                .badErrorCode,
                at: offset,
                "ERROR-CODE class \(errorClass) number \(number): class must be 3-6, number 0-99"
            )
        }
        let reason = try decodeText(UnsafeRawBufferPointer(rebasing: value[4...]), at: offset, what: "reason phrase")
        return .errorCode(STUNErrorCode(code: errorClass * 100 + number, reason: reason))
    case STUNAttributeType.unknownAttributes:
        guard value.count % 2 == 0 else {
            throw STUNWireError(
                .badAttributeLength,
                at: offset,
                "UNKNOWN-ATTRIBUTES holds 16-bit types, \(value.count) bytes is odd"
            )
        }
        return .unknownAttributes(stride(from: 0, to: value.count, by: 2).map { value.u16($0) })
    case STUNAttributeType.messageIntegrity:
        guard value.count == 20 else {
            throw STUNWireError(
                .badAttributeLength,
                at: offset,
                "MESSAGE-INTEGRITY must hold 20 bytes, not \(value.count)"
            )
        }
        return .messageIntegrity(Array(value))
    case STUNAttributeType.messageIntegritySHA256:
        guard (16...32).contains(value.count), value.count % 4 == 0 else {
            throw STUNWireError(
                .badAttributeLength,
                at: offset,
                "MESSAGE-INTEGRITY-SHA256 must hold 16-32 bytes in steps of 4, not \(value.count)"
            )
        }
        return .messageIntegritySHA256(Array(value))
    default:
        return .other(type: type, value: Array(value))
    }
}

private func decodeAddress(
    _ value: UnsafeRawBufferPointer,
    at offset: Int,
    xor transactionID: STUNTransactionID?
) throws(STUNWireError) -> STUNAddress {
    guard value.count >= 4 else {
        throw STUNWireError(.badAttributeLength, at: offset, "an address attribute needs at least 4 bytes")
    }
    let family = value[1]
    let size: Int
    switch family {
    case 0x01: size = 4
    case 0x02: size = 16
    default: throw STUNWireError(.badAddressFamily, at: offset, "address family 0x\(String(family, radix: 16))")
    }
    guard value.count == 4 + size else {
        throw STUNWireError(
            .badAttributeLength,
            at: offset,
            "an IPv\(size == 4 ? 4 : 6) address attribute holds \(4 + size) bytes, not \(value.count)"
        )
    }
    var port = value.u16(2)
    var ip = Array(value[4...])
    if let transactionID {
        port ^= UInt16(STUNMessage.magicCookie >> 16)
        let key = xorKey(transactionID)
        for i in 0..<size { ip[i] ^= key[i] }
    }
    return STUNAddress(ip: IPAddress(bytes: ip)!, port: port)
}

/// The bytes an X-address is XORed with: the magic cookie, then (IPv6) the transaction id.
private func xorKey(_ transactionID: STUNTransactionID) -> [UInt8] {
    var key: [UInt8] = []
    key.put32(STUNMessage.magicCookie)
    return key + transactionID.bytes
}

private func decodeText(_ value: UnsafeRawBufferPointer, at offset: Int, what: String) throws(STUNWireError) -> String {
    guard value.count <= maxTextBytes else {
        throw STUNWireError(.badText, at: offset, "\(what) of \(value.count) bytes, at most \(maxTextBytes)")
    }
    guard let s = String(validating: value, as: UTF8.self) else {
        throw STUNWireError(.badText, at: offset, "\(what) is not UTF-8")
    }
    return s
}

extension STUNMessage {
    fileprivate static func encodeValue(
        _ attribute: STUNAttribute,
        transactionID: STUNTransactionID
    ) throws(STUNWireError) -> [UInt8] {
        switch attribute {
        case .mappedAddress(let a), .responseOrigin(let a), .otherAddress(let a), .sourceAddress(let a),
            .changedAddress(let a):
            return encodeAddress(a, xor: nil)
        case .xorMappedAddress(let a):
            return encodeAddress(a, xor: transactionID)
        case .changeRequest(let changeIP, let changePort):
            return [0, 0, 0, (changeIP ? 0x04 : 0) | (changePort ? 0x02 : 0)]
        case .software(let text):
            return try encodeText(text, what: "SOFTWARE")
        case .errorCode(let e):
            guard (300...699).contains(e.code) else {
                throw STUNWireError(.unencodable, at: 0, "error code \(e.code) is outside 300-699")
            }
            return [0, 0, UInt8(e.code / 100), UInt8(e.code % 100)] + (try encodeText(e.reason, what: "reason phrase"))
        case .unknownAttributes(let types):
            var out: [UInt8] = []
            for t in types { out.put16(t) }
            return out
        case .messageIntegrity(let mac):
            guard mac.count == 20 else {
                throw STUNWireError(.unencodable, at: 0, "MESSAGE-INTEGRITY must hold 20 bytes, not \(mac.count)")
            }
            return mac
        case .messageIntegritySHA256(let mac):
            guard (16...32).contains(mac.count), mac.count % 4 == 0 else {
                throw STUNWireError(.unencodable, at: 0, "MESSAGE-INTEGRITY-SHA256 of \(mac.count) bytes")
            }
            return mac
        case .fingerprint:
            return []  // written by encode()
        case .other(_, let value):
            return value
        }
    }
}

private func encodeAddress(_ address: STUNAddress, xor transactionID: STUNTransactionID?) -> [UInt8] {
    var ip = address.ip.bytes
    var port = address.port
    if let transactionID {
        port ^= UInt16(STUNMessage.magicCookie >> 16)
        let key = xorKey(transactionID)
        for i in 0..<ip.count { ip[i] ^= key[i] }
    }
    var out: [UInt8] = [0, address.ip.isIPv4 ? 0x01 : 0x02]
    out.put16(port)
    return out + ip
}

private func encodeText(_ text: String, what: String) throws(STUNWireError) -> [UInt8] {
    let bytes = Array(text.utf8)
    guard bytes.count <= maxTextBytes else {
        throw STUNWireError(.unencodable, at: 0, "\(what) of \(bytes.count) bytes, at most \(maxTextBytes)")
    }
    return bytes
}

// MARK: - Bytes

private func hex16(_ v: UInt16) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: 4 - s.count) + s
}

extension UnsafeRawBufferPointer {
    @inline(__always) func u16(_ at: Int) -> UInt16 { UInt16(self[at]) << 8 | UInt16(self[at + 1]) }
    @inline(__always) func u32(_ at: Int) -> UInt32 { UInt32(self.u16(at)) << 16 | UInt32(self.u16(at + 2)) }
}

extension Array where Element == UInt8 {
    mutating func put16(_ v: UInt16) {
        self.append(UInt8(v >> 8))
        self.append(UInt8(v & 0xFF))
    }

    mutating func put32(_ v: UInt32) {
        self.put16(UInt16(v >> 16))
        self.put16(UInt16(v & 0xFFFF))
    }
}

/// CRC-32 (ISO-HDLC: polynomial 0x04C11DB7 reflected, as in zlib and Ethernet), which FINGERPRINT uses.
public enum CRC32 {
    static let table: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { checksum($0) } }
}
