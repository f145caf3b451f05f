import MeshCore
import MeshTestSupport
import Testing

@testable import Relay

@Suite("STUN Binding responder (pure)", .rationed) struct STUNResponderTests {
    let client = addr("192.0.2.1", 32853)
    let local = addr("127.0.0.1", 3478)

    func respond(
        _ bytes: [UInt8],
        from source: STUNAddress? = nil,
        local: STUNAddress? = nil,
        software: String? = "edge-mesh mesh-relay"
    ) -> STUNResponse {
        bytes.withUnsafeBytes {
            STUNResponder.respond(
                to: $0,
                from: source ?? self.client,
                local: local,
                policy: STUNResponderPolicy(software: software)
            )
        }
    }

    @Test("RFC 5389 Binding request: XOR-MAPPED-ADDRESS of the source, byte for byte")
    func bindingBytes() {
        let r = self.respond(message(""), software: nil)
        #expect(r.outcome == .binding(classic: false))
        #expect(toHex(r.bytes) == "0101000c2112a442000102030405060708090a0b" + "002000080001a147e112a643")
    }

    @Test("with a local address, SOFTWARE and a FINGERPRINT in the request: all of them in the answer")
    func bindingFull() throws {
        let request = try STUNMessage(type: .bindingRequest, transactionID: testID, attributes: [.fingerprint]).encode()
        let r = self.respond(request, from: addr("2001:db8::7", 40000), local: self.local)
        let m = try STUNMessage.decode(r.bytes)  // checks the FINGERPRINT
        #expect(m.type == .bindingSuccess && m.transactionID == testID && !m.isClassic)
        #expect(
            m.attributes == [
                .xorMappedAddress(addr("2001:db8::7", 40000)), .responseOrigin(self.local),
                .software("edge-mesh mesh-relay"), .fingerprint,
            ]
        )
    }

    @Test("RFC 3489 request (Debian's stun): MAPPED-ADDRESS and SOURCE-ADDRESS, the 128-bit id echoed")
    func classic() {
        let r = self.respond(vovidaRequest, from: addr("127.0.0.1", 28904), local: self.local)
        #expect(r.outcome == .binding(classic: true))
        #expect(
            toHex(r.bytes)
                == "0101001801b9f117b72e9e111860b854e02b786b" + "00010008000170e87f000001"
                + "000400080001" + "0d967f000001"
        )
    }

    @Test("an unknown comprehension-required attribute gets 420 listing it; optional ones are ignored")
    func unknownAttributes() throws {
        let r = self.respond(rfc5769Request, local: self.local)  // PRIORITY (0x0024) is ICE's, not ours
        #expect(r.outcome == .error(code: 420))
        let m = try STUNMessage.decode(r.bytes)
        #expect(m.type == .bindingError && m.transactionID == rfc5769ID)
        #expect(
            m.attributes == [
                .errorCode(STUNErrorCode(code: 420, reason: "Unknown Attribute")), .unknownAttributes([0x0024]),
                .software("edge-mesh mesh-relay"), .fingerprint,
            ]
        )
        #expect(
            toHex(self.respond(message("7fff0000" + "00240004000000017fff0000"), software: nil).bytes)
                == "011100242112a442000102030405060708090a0b"
                + "0009001500000414556e6b6e6f776e20417474726962757465000000"
                + "000a00047fff0024"
        )
        #expect(self.respond(message("80290008" + "0000000000000001" + "c0010000")).outcome == .binding(classic: false))
        // Credentials are understood (and not required): a request carrying them is answered.
        let withCredentials = try STUNMessage(
            type: .bindingRequest,
            transactionID: testID,
            attributes: [
                .other(type: 0x0006, value: Array("user".utf8)), .messageIntegrity(Array(repeating: 1, count: 20)),
            ]
        ).encode()
        #expect(self.respond(withCredentials).outcome == .binding(classic: false))
    }

    @Test("CHANGE-REQUEST: without an alternate address, 420 (RFC 5389) or silence (RFC 3489)")
    func changeRequest() throws {
        let change = message("0003000400000006")
        let r = self.respond(change, software: nil)
        #expect(r.outcome == .error(code: 420))
        #expect(
            try STUNMessage.decode(r.bytes).first(STUNAttributeType.unknownAttributes) == .unknownAttributes([0x0003])
        )
        // coturn's -f probe: RESPONSE-PORT and CHANGE-REQUEST, both listed.
        let probe = message("00270004d3010000" + "0003000400000006")
        #expect(
            try STUNMessage.decode(self.respond(probe).bytes).first(STUNAttributeType.unknownAttributes)
                == .unknownAttributes([0x0027, 0x0003])
        )
        // "no change" is a plain Binding request.
        #expect(self.respond(message("0003000400000000")).outcome == .binding(classic: false))
        var classicChange = vovidaRequest
        classicChange[27] = 0x04
        #expect(self.respond(classicChange) == STUNResponse(outcome: .dropped(.changeRequest), bytes: []))
        classicChange[27] = 0x02
        #expect(self.respond(classicChange).outcome == .dropped(.changeRequest))
    }

    @Test("other methods get 400; indications and responses are not answered")
    func notBinding() throws {
        let allocate = self.respond(message("", type: "0003"))
        #expect(allocate.outcome == .error(code: 400))
        let m = try STUNMessage.decode(allocate.bytes)
        #expect(m.type.rawValue == 0x0113)
        #expect(
            m.first(STUNAttributeType.errorCode)
                == .errorCode(STUNErrorCode(code: 400, reason: "Bad Request: only Binding is served here"))
        )
        for type in ["0011", "0101", "0111", "0016"] {
            #expect(self.respond(message("", type: type)) == STUNResponse(outcome: .dropped(.notRequest), bytes: []))
        }
        // A malformed attribute in an indication is not answered either.
        #expect(self.respond(message("00010008000312347f000001", type: "0011")).outcome == .dropped(.notRequest))
    }

    @Test("a request with a malformed attribute gets 400 naming the problem")
    func badRequest() throws {
        for (attributes, code) in [
            ("00010008000312347f000001", "badAddressFamily"), ("0009000400000700", "badErrorCode"),
            ("80220001ff000000", "badText"), ("0003000200000000", "badAttributeLength"),
        ] {
            let r = self.respond(message(attributes))
            #expect(r.outcome == .error(code: 400))
            let m = try STUNMessage.decode(r.bytes)
            #expect(m.type == .bindingError && m.transactionID == testID)
            #expect(
                m.first(STUNAttributeType.errorCode)
                    == .errorCode(STUNErrorCode(code: 400, reason: "Bad Request: \(code)"))
            )
        }
        // The same in an RFC 3489 request: 400, no SOFTWARE, the cookie echoed.
        var classic = message("00010008000312347f000001")
        classic[4] = 0x55
        let m = try STUNMessage.decode(self.respond(classic).bytes)
        #expect(m.cookie == 0x5512_a442 && m.attributes.count == 1)
    }

    @Test(
        "anything that is not a STUN message is dropped",
        arguments: STUNCodecTests.malformed.filter { $0.2.isFraming }
    )
    func garbage(_ name: String, _ bytes: [UInt8], _ code: STUNWireError.Code, _ offset: Int) {
        #expect(self.respond(bytes) == STUNResponse(outcome: .dropped(.notSTUN), bytes: []))
    }

    @Test("other protocols' packets are dropped: DNS, HTTP, TLS, RTP, a corrupted fingerprint")
    func otherProtocols() {
        var corrupted = rfc5769Request
        corrupted[40] ^= 0x80
        let inputs: [[UInt8]] = [
            hex("1b9c0120000100000000000103577757074578416d706c6504544553540000010001"),
            Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8),
            hex("160301020001000200030300") + Array(repeating: 0, count: 40),
            hex("80e0000100000002deadbeef") + Array(repeating: 0, count: 20),
            corrupted,
        ]
        for input in inputs { #expect(self.respond(input).outcome == .dropped(.notSTUN)) }
    }
}
