import MeshCore
import MeshTestSupport
import Testing

@testable import DNS

/// Bytes captured from real clients and servers on this machine (see the test names).
enum Captured {
    /// `dig WwW.ExAmple.TEST A` (BIND 9.18): RD+AD, EDNS 1232 with a COOKIE option.
    static let digQuery = hex(
        "1b9c0120000100000000000103577757074578416d706c650454455354000001000100002904d000000000000c000a0008f0eca0ef705a5fc3"
    )
    /// `dig +noedns +nocookie example.test MX`.
    static let digQueryNoEDNS = hex("c96701200001000000000000076578616d706c65047465737400000f0001")
    /// dnsmasq 2.90 answering `alias.example.test A` with a CNAME chain: the A record's owner is a
    /// compression pointer into the CNAME's RDATA.
    static let dnsmasqCNAME = hex(
        """
        abcd8580000100020000000005616c696173076578616d706c6504746573740000010001c00c00050001000000000012
        03777777076578616d706c65047465737400c03000010001000000000004c000020a
        """
    )
    /// dnsmasq 2.90 answering `example.test MX` with EDNS (udp 1232 echoed).
    static let dnsmasqMXEDNS = hex(
        """
        beef85800001000100000001076578616d706c65047465737400000f0001c00c000f0001000000000015000a046d6169
        6c076578616d706c6504746573740000002904d0000000000000
        """
    )
}

@Suite("DNS wire codec")
struct CodecTests {
    @Test("decodes dig's EDNS query and re-encodes it byte for byte")
    func digQueryRoundTrip() throws {
        let m = try DNSMessage.decode(Captured.digQuery)
        #expect(m.header.id == 0x1B9C)
        #expect(m.header.recursionDesired && m.header.authenticData && !m.header.isResponse)
        #expect(m.questions == [DNSQuestion(name: name("WwW.ExAmple.TEST"), type: .a)])
        // 0x20 case is kept exactly.
        #expect(
            m.questions[0].name.wire == [3] + Array("WwW".utf8) + [7] + Array("ExAmple".utf8) + [4] + Array("TEST".utf8)
                + [0]
        )
        #expect(m.edns?.udpPayloadSize == 1232)
        #expect(m.edns?.options == [.init(code: 10, data: hex("f0eca0ef705a5fc3"))])
        #expect(try m.encode() == Captured.digQuery)
    }

    @Test("decodes a query without EDNS")
    func digQueryNoEDNS() throws {
        let m = try DNSMessage.decode(Captured.digQueryNoEDNS)
        #expect(m.edns == nil)
        #expect(m.questions[0].type == .mx)
        #expect(m.questions[0].name.description == "example.test.")
        #expect(try m.encode() == Captured.digQueryNoEDNS)
    }

    @Test("decodes a compressed dnsmasq answer and re-encodes it with our compression, byte for byte")
    func compressedAnswer() throws {
        let m = try DNSMessage.decode(Captured.dnsmasqCNAME)
        #expect(m.header.isResponse && m.header.authoritative && m.rcode == .noError)
        #expect(m.answers.count == 2)
        #expect(m.answers[0].data == .cname(name("www.example.test")))
        #expect(m.answers[1].name == name("www.example.test"))
        #expect(m.answers[1].data == .a(ip("192.0.2.10")))
        // Ours compresses the CNAME target against the question (c012) and the A owner against the
        // CNAME target (c030).
        let expected = hex(
            """
            abcd85800001000200000000 05616c696173076578616d706c6504746573740000010001
            c00c 0005 0001 00000000 0006 03777777c012
            c030 0001 0001 00000000 0004 c000020a
            """
        )
        #expect(try m.encode() == expected)
        #expect(try DNSMessage.decode(expected) == m)
    }

    @Test("decodes an EDNS answer with MX and round-trips it")
    func ednsAnswer() throws {
        let m = try DNSMessage.decode(Captured.dnsmasqMXEDNS)
        #expect(
            m.answers == [
                DNSRecord(
                    name: name("example.test"),
                    ttl: 0,
                    data: .mx(preference: 10, exchange: name("mail.example.test"))
                )
            ]
        )
        #expect(m.edns == DNSEDNS(udpPayloadSize: 1232))
        #expect(m.additionals.isEmpty)
        #expect(try DNSMessage.decode(try m.encode()) == m)
    }

    @Test("encodes every record type and decodes them back")
    func allTypesRoundTrip() throws {
        let owner = name("x.example")
        let soa = DNSSOA(
            mname: name("ns.example"),
            rname: name("host.example"),
            serial: 7,
            refresh: 1,
            retry: 2,
            expire: 3,
            minimum: 4
        )
        let m = DNSMessage(
            header: DNSHeader(id: 9, isResponse: true, recursionAvailable: true),
            questions: [DNSQuestion(name: owner, type: .any)],
            answers: [
                DNSRecord(name: owner, ttl: 1, data: .a(ip("1.2.3.4"))),
                DNSRecord(name: owner, ttl: 2, data: .aaaa(ip("2001:db8::1"))),
                DNSRecord(name: owner, ttl: 3, data: .srv(priority: 1, weight: 2, port: 3, target: name("t.example"))),
                DNSRecord(name: owner, ttl: 4, data: .ptr(name("p.example"))),
                DNSRecord(name: owner, ttl: 5, data: .cname(name("c.example"))),
                DNSRecord(name: owner, ttl: 6, data: .txt([Array("hello".utf8), []])),
                DNSRecord(name: owner, ttl: 7, data: .ns(name("ns.example"))),
                DNSRecord(name: owner, type: DNSType(99), ttl: 8, data: .opaque([1, 2, 3])),
            ],
            authorities: [DNSRecord(name: name("example"), ttl: 9, data: .soa(soa))],
            additionals: [DNSRecord(name: name("t.example"), ttl: 10, data: .a(ip("5.6.7.8")))],
            edns: DNSEDNS(udpPayloadSize: 4096, dnssecOK: true)
        )
        let bytes = try m.encode()
        #expect(try DNSMessage.decode(bytes) == m)
        // Compression happened: "example" is literal once in the question and once in the SRV target
        // (RFC 2782: SRV targets are never compressed); every other occurrence is a pointer.
        let example = Array("example".utf8)
        var literal = 0
        for i in 0..<(bytes.count - example.count) where Array(bytes[i..<(i + example.count)]) == example {
            literal += 1
        }
        #expect(literal == 2)
    }

    @Test("sets TC and drops the sections when the answer exceeds the client's size")
    func truncation() throws {
        let owner = name("many.example")
        var m = DNSMessage(
            header: DNSHeader(id: 1, isResponse: true),
            questions: [DNSQuestion(name: owner, type: .a)],
            answers: (0..<100).map { DNSRecord(name: owner, ttl: 30, data: .a(.v4(UInt32($0)))) }
        )
        let small = try DNSMessage.decode(try m.encode(maxSize: 512))
        #expect(small.header.truncated)
        #expect(small.answers.isEmpty)
        #expect(small.questions == m.questions)
        let full = try DNSMessage.decode(try m.encode())
        #expect(!full.header.truncated && full.answers.count == 100)
        // With EDNS the OPT record survives truncation.
        m.edns = DNSEDNS(udpPayloadSize: 512)
        let t = try DNSMessage.decode(try m.encode(maxSize: 512))
        #expect(t.header.truncated && t.edns != nil)
        // Additional records alone are dropped without TC (RFC 2181 §9).
        m.answers = [DNSRecord(name: owner, ttl: 30, data: .a(.v4(1)))]
        m.additionals = (0..<100).map { DNSRecord(name: owner, ttl: 30, data: .a(.v4(UInt32($0)))) }
        let a = try DNSMessage.decode(try m.encode(maxSize: 512))
        #expect(!a.header.truncated && a.answers.count == 1 && a.additionals.isEmpty)
    }

    @Test("round trip keeps every name's bytes exactly (fuzzer finding: case-insensitive compression)")
    func roundTripKeepsCase() throws {
        // Question `alias.example.teSt`, CNAME target `www.e\0\0\0ple.test`: compressing the target's
        // `test` against the question's `teSt` would change its case.
        let input = hex(
            """
            abcd8580000100020000000005616c696173076578616d706c6504746553740000010001c00c0005000100000000
            0012037777770765000000706c65047465737400c03000010001000000000004c000020a
            """
        )
        let m = try DNSMessage.decode(input)
        #expect(try DNSMessage.decode(try m.encode()) == m)
    }

    @Test("extended RCODE travels in the OPT record")
    func extendedRCode() throws {
        var m = DNSMessage(header: DNSHeader(id: 1, isResponse: true), edns: DNSEDNS())
        m.rcode = .badVers
        let d = try DNSMessage.decode(try m.encode())
        #expect(d.rcode == .badVers)
        #expect(d.header.rcodeLow == 0 && d.edns?.extendedRCode == 1)
    }

    @Test("parses names from text and rejects invalid ones")
    func namesFromText() throws {
        #expect(try DNSName("a.b.").wire == [1, 97, 1, 98, 0])
        #expect(try DNSName(".").wire == [0])
        #expect(try DNSName("A.b").lowercased == DNSName("a.B").lowercased)
        #expect(try DNSName("A.b").equalsIgnoringCase(DNSName("a.B")))
        #expect(try DNSName("A.b") != DNSName("a.B"))
        #expect(throws: DNSWireError.invalidName) { try DNSName("a..b") }
        #expect(throws: DNSWireError.labelTooLong) { try DNSName(String(repeating: "x", count: 64) + ".com") }
        let long = Array(repeating: String(repeating: "x", count: 63), count: 4).joined(separator: ".")
        #expect(throws: DNSWireError.nameTooLong) { try DNSName(long) }
        #expect(try DNSName("web.shop.svc.cluster.local").isSubdomain(of: DNSName("Cluster.Local")))
        #expect(try !DNSName("web.shop.svc.xcluster.local").isSubdomain(of: DNSName("cluster.local")))
    }
}

@Suite("DNS wire codec: malicious input")
struct MaliciousInputTests {
    /// A query header with the given counts, then `body`.
    func msg(qd: UInt16 = 1, an: UInt16 = 0, ns: UInt16 = 0, ar: UInt16 = 0, _ body: [UInt8]) -> [UInt8] {
        [0x12, 0x34, 0x01, 0x00]
            + [UInt8(qd >> 8), UInt8(qd & 0xFF), UInt8(an >> 8), UInt8(an & 0xFF)]
            + [UInt8(ns >> 8), UInt8(ns & 0xFF), UInt8(ar >> 8), UInt8(ar & 0xFF)] + body
    }

    let question: [UInt8] = [1, 97, 0, 0, 1, 0, 1]  // a. A IN

    @Test("a pointer loop is refused")
    func pointerLoop() {
        // "a" then a pointer back to the start of the same name.
        #expect(throws: DNSWireError.pointerLoop) { try DNSMessage.decode(msg([1, 97, 0xC0, 12, 0, 1, 0, 1])) }
    }

    @Test("a pointer to itself or forwards is refused")
    func forwardPointers() {
        #expect(throws: DNSWireError.forwardPointer) { try DNSMessage.decode(msg([0xC0, 12, 0, 1, 0, 1])) }
        #expect(throws: DNSWireError.forwardPointer) {
            try DNSMessage.decode(msg([0xC0, 20, 0, 1, 0, 1, 0, 0, 1, 97, 0]))
        }
        // Two names pointing at each other: one of them has to point forward.
        let answer: [UInt8] = [0xC0, 30, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
        #expect(throws: DNSWireError.forwardPointer) { try DNSMessage.decode(msg(an: 1, question + answer)) }
    }

    @Test("a pointer into the header is refused")
    func pointerIntoHeader() {
        let answer: [UInt8] = [0xC0, 2, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
        #expect(throws: DNSWireError.pointerIntoHeader) { try DNSMessage.decode(msg(an: 1, question + answer)) }
    }

    @Test("label lengths above 63 are refused")
    func labelTooLong() {
        #expect(throws: DNSWireError.labelTooLong) {
            try DNSMessage.decode(msg([64] + Array(repeating: 97, count: 64) + [0, 0, 1, 0, 1]))
        }
        #expect(throws: DNSWireError.labelTooLong) { try DNSMessage.decode(msg([0x80, 1, 0, 0, 1, 0, 1])) }
    }

    @Test("names above 255 bytes are refused, also when built from pointers")
    func nameTooLong() {
        let label: [UInt8] = [63] + Array(repeating: 120, count: 63)
        #expect(throws: DNSWireError.nameTooLong) {
            try DNSMessage.decode(msg(label + label + label + label + [0, 0, 1, 0, 1]))
        }
        // Question: 3 labels (192 bytes + root), valid. Answer: one more 63-byte label + pointer.
        let q = label + label + label + [0, 0, 1, 0, 1]
        let answer = label + [0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
        #expect(throws: DNSWireError.nameTooLong) { try DNSMessage.decode(msg(an: 1, q + answer)) }
    }

    @Test("counts larger than the packet are refused before allocating")
    func countsTooLarge() {
        #expect(throws: DNSWireError.countExceedsMessage) { try DNSMessage.decode(msg(an: 0xFFFF, question)) }
        #expect(throws: DNSWireError.countExceedsMessage) { try DNSMessage.decode(msg(qd: 3, question)) }
        // A count that fits the minimum sizes but not the real records: plain truncation.
        #expect(throws: DNSWireError.truncated) {
            try DNSMessage.decode(msg(an: 1, question + [0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 1, 2]))
        }
    }

    @Test("truncated or inconsistent RDATA is refused")
    func badRData() {
        // A record claiming 4 bytes with 2 present.
        let truncatedA: [UInt8] = [0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0]
        #expect(throws: DNSWireError.truncated) { try DNSMessage.decode(msg(an: 1, question + truncatedA)) }
        // A record with 3 bytes of RDATA.
        let shortA: [UInt8] = [0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 3, 10, 0, 0]
        #expect(throws: DNSWireError.badRData) { try DNSMessage.decode(msg(an: 1, question + shortA)) }
        // TXT whose string runs past RDLENGTH.
        let txt: [UInt8] = [0xC0, 12, 0, 16, 0, 1, 0, 0, 0, 30, 0, 3, 5, 97, 98, 0, 0, 0]
        #expect(throws: DNSWireError.badRData) { try DNSMessage.decode(msg(an: 1, question + txt)) }
        // CNAME whose name runs past RDLENGTH.
        let cname: [UInt8] = [0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 2, 3, 97, 98, 99, 0]
        #expect(throws: DNSWireError.badRData) { try DNSMessage.decode(msg(an: 1, question + cname)) }
        // SOA with the names but not the five numbers.
        let soa: [UInt8] = [0xC0, 12, 0, 6, 0, 1, 0, 0, 0, 30, 0, 4, 0xC0, 12, 0xC0, 12]
        #expect(throws: DNSWireError.badRData) { try DNSMessage.decode(msg(an: 1, question + soa)) }
    }

    @Test("misplaced or duplicate OPT records are refused")
    func badOPT() {
        let opt: [UInt8] = [0, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 0]
        #expect(throws: DNSWireError.badOPT) { try DNSMessage.decode(msg(ar: 2, question + opt + opt)) }
        #expect(throws: DNSWireError.badOPT) { try DNSMessage.decode(msg(an: 1, question + opt)) }
        let named: [UInt8] = [0xC0, 12, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 0]
        #expect(throws: DNSWireError.badOPT) { try DNSMessage.decode(msg(ar: 1, question + named)) }
    }

    @Test("every prefix of real messages fails cleanly")
    func everyPrefix() {
        for sample in [Captured.digQuery, Captured.dnsmasqCNAME, Captured.dnsmasqMXEDNS] {
            for n in 0..<sample.count {
                #expect(throws: DNSWireError.self) { try DNSMessage.decode(sample[0..<n]) }
            }
        }
    }

    @Test("random garbage: a typed error, or a message that re-encodes to one that decodes the same")
    func randomGarbage() {
        var rng = SplitMix(seed: 42)
        var decoded = 0
        var errors: Set<String> = []
        var unstable: [[UInt8]] = []
        for _ in 0..<20_000 {
            var bytes = Captured.dnsmasqCNAME
            for _ in 0..<Int(rng.next() % 6 + 1) {
                bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
            }
            do {
                let message = try DNSMessage.decode(bytes)
                decoded += 1
                // What was accepted is a message of its own: written out and read back, the same.
                let again = try? DNSMessage.decode(try message.encode())
                if again != message { unstable.append(bytes) }
            } catch {
                errors.insert("\(error)".prefix { $0 != "(" }.description)
            }
        }
        // Some mutations leave a valid message; most do not, and those say why in several ways.
        #expect(decoded > 0 && decoded < 20_000)
        #expect(errors.count >= 3, "\(errors)")
        #expect(
            unstable.isEmpty,
            "\(unstable.count) accepted messages do not survive a round trip: \(unstable.prefix(3))"
        )
    }
}
