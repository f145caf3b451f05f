import MeshCore
import MeshTestSupport
import Testing

@testable import Relay

/// RFC 5769 §2.1: a Binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME,
/// MESSAGE-INTEGRITY and FINGERPRINT (USERNAME padded with spaces).
let rfc5769Request = hex(
    """
    000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74
    002400046e0001ff80290008932ff9b151263b36000600096576746a3a6836765920202000080014
    9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf
    """
)
/// RFC 5769 §2.2: a Binding success response, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
let rfc5769IPv4Response = hex(
    """
    0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f722000200008
    0001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d780280004c07d4c96
    """
)
/// RFC 5769 §2.3: the same with XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853.
let rfc5769IPv6Response = hex(
    """
    010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f722000200014
    0002a1470113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275
    bfe3ed4180280004c8fb0b4c
    """
)
let rfc5769ID = STUNTransactionID(bytes: hex("b7e7a701bc34d686fa87dfae"))!

/// What Debian's `stun` (Vovida, RFC 3489) sent in its first test: no magic cookie, CHANGE-REQUEST 0.
let vovidaRequest = hex("0001000801b9f117b72e9e111860b854e02b786b0003000400000000")

let testID = STUNTransactionID(bytes: hex("000102030405060708090a0b"))!

/// A message with the test transaction id: header (length computed unless given) + attributes.
func message(_ attributes: String, type: String = "0001", length: Int? = nil) -> [UInt8] {
    let body = hex(attributes)
    let n = length ?? body.count
    return hex(type) + [UInt8(n >> 8), UInt8(n & 0xFF)] + hex("2112a442000102030405060708090a0b") + body
}

@Suite("STUN codec") struct STUNCodecTests {
    @Test("RFC 5769 sample request: every attribute, fingerprint checked, MESSAGE-INTEGRITY kept opaque")
    func sampleRequest() throws {
        let m = try STUNMessage.decode(rfc5769Request)
        #expect(m.type == .bindingRequest)
        #expect(m.cookie == STUNMessage.magicCookie && !m.isClassic)
        #expect(m.transactionID == rfc5769ID)
        #expect(
            m.attributes == [
                .software("STUN test client"),
                .other(type: 0x0024, value: hex("6e0001ff")),  // PRIORITY
                .other(type: 0x8029, value: hex("932ff9b151263b36")),  // ICE-CONTROLLED
                .other(type: 0x0006, value: Array("evtj:h6vY".utf8)),  // USERNAME
                .messageIntegrity(hex("9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2")),
                .fingerprint,
            ]
        )
        // Re-encoded, padding is zeros (the sample's are spaces) and FINGERPRINT is computed anew
        // (checked independently with zlib's crc32).
        #expect(
            toHex(try m.encode())
                == "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
                + "002400046e0001ff80290008932ff9b151263b36000600096576746a3a6836765900000000080014"
                + "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a28028000466689308"
        )
    }

    @Test("RFC 5769 sample IPv4 response: XOR-MAPPED-ADDRESS 192.0.2.1:32853")
    func sampleIPv4Response() throws {
        let m = try STUNMessage.decode(rfc5769IPv4Response)
        #expect(m.type == .bindingSuccess)
        #expect(m.transactionID == rfc5769ID)
        #expect(
            m.attributes == [
                .software("test vector"),
                .xorMappedAddress(addr("192.0.2.1", 32853)),
                .messageIntegrity(hex("2b91f599fd9e90c38c7489f92af9ba53f06be7d7")),
                .fingerprint,
            ]
        )
        #expect(
            toHex(try m.encode())
                == "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7200002000080001a147"
                + "e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7802800040405f5ec"
        )
    }

    @Test("RFC 5769 sample IPv6 response: XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853")
    func sampleIPv6Response() throws {
        let m = try STUNMessage.decode(rfc5769IPv6Response)
        #expect(
            m.first(STUNAttributeType.xorMappedAddress)
                == .xorMappedAddress(addr("2001:db8:1234:5678:11:2233:4455:6677", 32853))
        )
        #expect(
            toHex(try m.encode())
                == "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7200002000140002a147"
                + "0113a9faa5d3f179bc25f4b5bed2b9d900080014a382954e4be67bf11784c97c8292c275bfe3ed41"
                + "8028000422f5b5f7"
        )
    }

    @Test("a flipped bit anywhere before FINGERPRINT, or in it, fails the fingerprint")
    func fingerprintCatchesCorruption() throws {
        for (vector, fingerprintAt) in [(rfc5769Request, 100), (rfc5769IPv4Response, 72), (rfc5769IPv6Response, 84)] {
            for i in [21, 30, fingerprintAt - 1, fingerprintAt + 4, vector.count - 1] {
                var bad = vector
                bad[i] ^= 0x01
                #expect(throws: STUNWireError(.badFingerprint, at: fingerprintAt, "")) { try STUNMessage.decode(bad) }
            }
        }
        #expect(CRC32.checksum(Array("123456789".utf8)) == 0xCBF4_3926)  // the CRC-32 check value
    }

    @Test("an RFC 3489 request (no magic cookie) decodes and re-encodes byte for byte")
    func classicRequest() throws {
        let m = try STUNMessage.decode(vovidaRequest)
        #expect(m.isClassic)
        #expect(m.cookie == 0x01b9_f117)
        #expect(m.transactionID == STUNTransactionID(bytes: hex("b72e9e111860b854e02b786b")))
        #expect(m.attributes == [.changeRequest(changeIP: false, changePort: false)])
        #expect(try m.encode() == vovidaRequest)
    }

    @Test("message type bits: class and method interleave as M11-M7 C1 M6-M4 C0 M3-M0")
    func messageTypes() {
        let known: [(STUNMessageType, UInt16)] = [
            (.bindingRequest, 0x0001), (.bindingSuccess, 0x0101), (.bindingError, 0x0111),
            (STUNMessageType(method: .binding, class: .indication), 0x0011),
            (STUNMessageType(method: STUNMethod(rawValue: 0x003), class: .errorResponse), 0x0113),  // Allocate
            (STUNMessageType(method: STUNMethod(rawValue: 0x009), class: .successResponse), 0x0109),  // ChannelBind
            (STUNMessageType(method: STUNMethod(rawValue: 0xFFF), class: .successResponse), 0x3FEF),
            (STUNMessageType(method: STUNMethod(rawValue: 0xFFF), class: .errorResponse), 0x3FFF),
        ]
        for (type, raw) in known {
            #expect(type.rawValue == raw)
            #expect(STUNMessageType(rawValue: raw) == type)
        }
        for raw in UInt16(0)...0x3FFF { #expect(STUNMessageType(rawValue: raw)?.rawValue == raw) }
        #expect(STUNMessageType(rawValue: 0x4001) == nil)
        #expect(STUNMessageType(rawValue: 0x8001) == nil)
    }

    @Test("encoding: header, 4-byte padding, XOR for IPv4 and IPv6, ERROR-CODE, UNKNOWN-ATTRIBUTES")
    func encodeByteForByte() throws {
        #expect(
            toHex(try STUNMessage(type: .bindingRequest, transactionID: testID).encode())
                == "000100002112a442000102030405060708090a0b"
        )
        let success = STUNMessage(
            type: .bindingSuccess,
            transactionID: testID,
            attributes: [
                .xorMappedAddress(addr("192.0.2.1", 32853)), .mappedAddress(addr("192.0.2.1", 32853)),
                .responseOrigin(addr("127.0.0.1", 3478)), .otherAddress(addr("::1", 3479)),
                .software("abcde"),
            ]
        )
        #expect(
            toHex(try success.encode())
                == "010100482112a442000102030405060708090a0b"
                + "002000080001a147e112a643" + "0001000800018055c0000201"
                + "802b000800010d967f000001" + "802c001400020d9700000000000000000000000000000001"
                + "802200056162636465000000"
        )
        let error = STUNMessage(
            type: .bindingError,
            transactionID: testID,
            attributes: [
                .errorCode(STUNErrorCode(code: 420, reason: "Unknown Attribute")),
                .unknownAttributes([0x0027, 0x0003]),
                .unknownAttributes([0x7FFF]),
            ]
        )
        #expect(
            toHex(try error.encode())
                == "0111002c2112a442000102030405060708090a0b"
                + "0009001500000414" + "556e6b6e6f776e20417474726962757465000000"
                + "000a000400270003" + "000a00027fff0000"
        )
        let change = STUNMessage(
            type: .bindingRequest,
            cookie: 0x0102_0304,
            transactionID: testID,
            attributes: [
                .changeRequest(changeIP: true, changePort: true), .sourceAddress(addr("10.0.0.1", 1)),
                .changedAddress(addr("10.0.0.2", 2)),
            ]
        )
        let bytes = try change.encode()
        #expect(
            toHex(bytes)
                == "0001002001020304000102030405060708090a0b" + "0003000400000006"
                + "00040008000100010a000001" + "00050008000100020a000002"
        )
        #expect(try STUNMessage.decode(bytes) == change)
    }

    @Test("every attribute type this codec knows survives a round trip, FINGERPRINT included")
    func roundTrip() throws {
        let m = STUNMessage(
            type: .bindingError,
            transactionID: .random(),
            attributes: [
                .mappedAddress(addr("::ffff:1.2.3.4", 1)), .xorMappedAddress(addr("fe80::1", 65535)),
                .responseOrigin(addr("1.2.3.4", 0)), .otherAddress(addr("2001:db8::1", 9)),
                .sourceAddress(addr("1.1.1.1", 1)), .changedAddress(addr("2.2.2.2", 2)),
                .changeRequest(changeIP: true, changePort: false), .software("ünïcödé ✓"),
                .errorCode(STUNErrorCode(code: 699, reason: "")), .errorCode(STUNErrorCode(code: 300, reason: "x")),
                .unknownAttributes([]), .unknownAttributes([1, 2, 3]), .other(type: 0xC001, value: [1, 2, 3, 4, 5]),
                .other(type: 0x7FFF, value: []), .messageIntegrity(Array(repeating: 7, count: 20)),
                .messageIntegritySHA256(Array(repeating: 8, count: 32)), .fingerprint,
            ]
        )
        let bytes = try m.encode()
        #expect(bytes.count % 4 == 0)
        #expect(try STUNMessage.decode(bytes) == m)
        #expect(
            bytes.withUnsafeBytes { try? STUNMessage.frameLength(UnsafeRawBufferPointer(rebasing: $0[0..<4])) }
                == bytes.count
        )
    }

    @Test("attributes after MESSAGE-INTEGRITY are ignored, except MESSAGE-INTEGRITY-SHA256 and FINGERPRINT")
    func afterIntegrity() throws {
        let mi = Array(repeating: UInt8(9), count: 20)
        let sha = Array(repeating: UInt8(5), count: 16)
        let bytes = try STUNMessage(
            type: .bindingRequest,
            transactionID: testID,
            attributes: [
                .software("a"), .messageIntegrity(mi), .software("ignored"), .other(type: 0x0027, value: [0, 1, 0, 0]),
                .messageIntegritySHA256(sha), .software("also ignored"), .fingerprint,
            ]
        ).encode()
        #expect(
            try STUNMessage.decode(bytes).attributes == [
                .software("a"), .messageIntegrity(mi), .messageIntegritySHA256(sha), .fingerprint,
            ]
        )
    }

    /// Malformed inputs, each with the error and offset it must produce.
    static let malformed: [(String, [UInt8], STUNWireError.Code, Int)] = [
        ("empty", [], .truncatedHeader, 0),
        ("19 bytes", Array(message("").prefix(19)), .truncatedHeader, 0),
        ("RTP-like first bit", hex("80") + message("").dropFirst(), .notSTUN, 0),
        ("ChannelData 0x4000", hex("4000") + message("").dropFirst(2), .notSTUN, 0),
        ("length 5", message("0102030405", length: 5), .lengthNotMultipleOfFour, 2),
        ("length says 8, 4 follow", message("80220000", length: 8), .lengthMismatch, 2),
        ("length says 0, 4 follow", message("80220000", length: 0), .lengthMismatch, 2),
        ("a UDP datagram holding two messages", message("") + message(""), .lengthMismatch, 2),
        ("attribute of 64 bytes, 4 there", message("0020004000010000"), .attributeOverrun, 20),
        ("attribute of 5 bytes, padding past the end", message("8022000561626364"), .attributeOverrun, 20),
        ("second attribute overruns", message("8022000461626364" + "8022000c61626364"), .attributeOverrun, 28),
        ("FINGERPRINT of 8 bytes", message("802800080000000000000000"), .badAttributeLength, 20),
        ("FINGERPRINT of 0 bytes", message("80280000"), .badAttributeLength, 20),
        (
            "MESSAGE-INTEGRITY of 16 bytes", message("00080010" + String(repeating: "00", count: 16)),
            .badAttributeLength, 20
        ),
        (
            "MESSAGE-INTEGRITY-SHA256 of 12", message("001c000c" + String(repeating: "00", count: 12)),
            .badAttributeLength, 20
        ),
        (
            "MESSAGE-INTEGRITY-SHA256 of 36", message("001c0024" + String(repeating: "00", count: 36)),
            .badAttributeLength, 20
        ),
        ("CHANGE-REQUEST of 2 bytes", message("0003000200000000"), .badAttributeLength, 20),
        ("XOR-MAPPED-ADDRESS IPv4 of 12 bytes", message("0020000c0001a147e112a64300000000"), .badAttributeLength, 20),
        ("MAPPED-ADDRESS IPv6 family in 8 bytes", message("00010008000212347f000001"), .badAttributeLength, 20),
        ("MAPPED-ADDRESS of 2 bytes", message("0001000200010000"), .badAttributeLength, 20),
        ("UNKNOWN-ATTRIBUTES of 3 bytes", message("000a000300270000"), .badAttributeLength, 20),
        ("ERROR-CODE of 2 bytes", message("0009000200000000"), .badAttributeLength, 20),
        ("address family 3", message("00010008000312347f000001"), .badAddressFamily, 20),
        (
            "address family 0, after SOFTWARE", message("8022000461626364" + "002000080000a147e112a643"),
            .badAddressFamily, 28
        ),
        ("ERROR-CODE class 7", message("0009000400000700"), .badErrorCode, 20),
        ("ERROR-CODE class 2", message("0009000400000263"), .badErrorCode, 20),
        ("ERROR-CODE number 100", message("0009000400000464"), .badErrorCode, 20),
        ("SOFTWARE not UTF-8", message("80220001ff000000"), .badText, 20),
        ("reason phrase not UTF-8", message("00090006" + "00000400" + "c328" + "0000"), .badText, 20),
        ("SOFTWARE of 764 bytes", message("802202fc" + String(repeating: "61", count: 764)), .badText, 20),
    ]

    @Test("malformed input: a typed error at the right offset, never a trap", arguments: Self.malformed)
    func malformedInput(_ name: String, _ bytes: [UInt8], _ code: STUNWireError.Code, _ offset: Int) {
        #expect(throws: STUNWireError(code, at: offset, "")) { try STUNMessage.decode(bytes) }
    }

    @Test("an attribute after a correct FINGERPRINT is refused")
    func attributeAfterFingerprint() throws {
        // Header length covers the trailing attribute, and the FINGERPRINT is right for it.
        var bytes = message("80220004616263648028000400000000" + "8022000461626364")
        let crc = CRC32.checksum(Array(bytes[0..<28])) ^ 0x5354_554E
        bytes.replaceSubrange(
            32..<36,
            with: [UInt8(crc >> 24), UInt8(crc >> 16 & 0xFF), UInt8(crc >> 8 & 0xFF), UInt8(crc & 0xFF)]
        )
        #expect(throws: STUNWireError(.attributeAfterFingerprint, at: 36, "")) { try STUNMessage.decode(bytes) }
    }

    @Test("every error code has a malformed case, and framing errors are the ones a server drops silently")
    func everyCodeCovered() {
        let covered = Set(Self.malformed.map(\.2)).union([.attributeAfterFingerprint, .badFingerprint, .unencodable])
        #expect(covered == Set(STUNWireError.Code.allCases))
        #expect(STUNWireError.Code.allCases.filter(\.isFraming).count == 7)
    }

    @Test("messages that cannot be encoded throw unencodable")
    func unencodable() {
        let cases: [[STUNAttribute]] = [
            [.fingerprint, .software("after")],
            [.errorCode(STUNErrorCode(code: 700, reason: ""))],
            [.errorCode(STUNErrorCode(code: 299, reason: ""))],
            [.errorCode(STUNErrorCode(code: 400, reason: String(repeating: "x", count: 764)))],
            [.software(String(repeating: "é", count: 382))],
            [.messageIntegrity([1, 2, 3])],
            [.messageIntegritySHA256(Array(repeating: 0, count: 18))],
            [.other(type: 0x8000, value: Array(repeating: 0, count: 65536))],
            Array(repeating: .other(type: 0x8000, value: Array(repeating: 0, count: 60000)), count: 2),
        ]
        for attributes in cases {
            #expect(throws: STUNWireError(.unencodable, at: 0, "")) {
                try STUNMessage(type: .bindingRequest, transactionID: testID, attributes: attributes).encode()
            }
        }
    }

    @Test("stream framing: needs 4 bytes, then knows the whole length; refuses non-STUN starts")
    func framing() throws {
        func frame(_ b: [UInt8]) throws(STUNWireError) -> Int? {
            let r = b.withUnsafeBytes { raw in
                Result { () throws(STUNWireError) -> Int? in try STUNMessage.frameLength(raw) }
            }
            return try r.get()
        }
        #expect(try frame([0, 1, 0]) == nil)
        #expect(try frame(Array(rfc5769Request.prefix(4))) == 108)
        #expect(throws: STUNWireError(.notSTUN, at: 0, "")) { try frame(Array("GET / HTTP/1.1".utf8)) }
        #expect(throws: STUNWireError(.lengthNotMultipleOfFour, at: 2, "")) { try frame([0, 1, 0, 3]) }
    }

    @Test("transaction ids: 12 bytes, random ones differ")
    func transactionIDs() {
        #expect(testID.bytes == Array(0...11))
        #expect(testID.description == "000102030405060708090a0b")
        #expect(STUNTransactionID(bytes: [1, 2, 3]) == nil)
        #expect(STUNTransactionID.random() != STUNTransactionID.random())
    }
}
