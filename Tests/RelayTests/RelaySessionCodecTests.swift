import MeshCore
import MeshTestSupport
import Testing

@_spi(Fuzzing) @testable import Relay

/// The relay session messages byte for byte, and every malformed frame with its error.
@Suite("Relay session codec", .rationed)
struct RelaySessionCodecTests {
    static let golden: [(RelaySessionMessage, String)] = [
        (.hello(version: 1, node: "a"), "010003" + "01" + "0161"),
        (.welcome(relay: "r1", keepaliveSeconds: 15), "020005" + "027231" + "000f"),
        (.ping(0x0102_0304_0506_0708), "030008" + "0102030405060708"),
        (.pong(0xFFFF_FFFF_FFFF_FFFF), "040008" + "ffffffffffffffff"),
        (.connect(node: "edge-b1"), "100008" + "07656467652d6231"),
        (.open(circuit: 7, from: "a.b"), "11000c" + "0000000000000007" + "03612e62"),
        (.accept(circuit: 0x10), "120008" + "0000000000000010"),
        (.ready(circuit: 1), "130008" + "0000000000000001"),
        (.forward(from: "a", to: "edge-b1"), "14000a" + "0161" + "07656467652d6231"),
        (.refused(.nodeOffline, message: "b: no session"), "1f0010" + "01" + "000d" + "623a206e6f2073657373696f6e"),
        (.refused(.other(200), message: ""), "1f0003" + "c8" + "0000"),
        (
            .punchOffer(
                PunchCandidates(
                    id: 1,
                    mapping: .portPreserving,
                    candidates: [PunchCandidate(kind: .reflexive, ip: IPAddress("198.18.0.21")!, port: 7900)]
                )
            ),
            "200012" + "0000000000000001" + "02" + "01" + "0204c6120015" + "1edc"
        ),
        (
            .punchAnswer(PunchCandidates(id: 2, mapping: .unknown, candidates: [])),
            "21000a" + "0000000000000002" + "0000"
        ),
        (
            .punchStart(
                PunchStart(
                    id: 3,
                    mode: .answererDials,
                    delayMillis: 1,
                    rttMicros: 2,
                    staggerMillis: 0,
                    answererFirst: false
                )
            ),
            "220012" + "0000000000000003" + "03" + "0001" + "00000002" + "0000" + "00"
        ),
        (.punchResult(id: 4, ok: true, message: "up"), "23000d" + "0000000000000004" + "01" + "0002" + "7570"),
    ]

    @Test(arguments: 0..<Self.golden.count)
    func encodesAndDecodesByteForByte(_ i: Int) throws {
        let (message, wire) = Self.golden[i]
        #expect(toHex(try message.encode()) == wire)
        let decoded = try RelaySessionMessage.decode(hex(wire))
        #expect(decoded?.message == message)
        #expect(decoded?.length == wire.count / 2)
    }

    @Test func aFrameInPiecesIsIncompleteUntilWholeAndTheRestIsLeft() throws {
        let bytes = try RelaySessionMessage.open(circuit: 9, from: "node-b").encode()
        for n in 0..<bytes.count { #expect(try RelaySessionMessage.decode(Array(bytes.prefix(n))) == nil) }
        let two = bytes + (try RelaySessionMessage.ping(1).encode()) + [0xAA]
        let first = try #require(try RelaySessionMessage.decode(two))
        #expect(first.message == .open(circuit: 9, from: "node-b") && first.length == bytes.count)
        #expect(try RelaySessionMessage.decode(Array(two[first.length...]))?.message == .ping(1))
    }

    @Test func refusalCodesRoundTrip() {
        for code in UInt8.min...UInt8.max { #expect(RelayRefusal(code: code).code == code) }
    }

    static let malformed: [(String, RelaySessionWireError.Code, Int)] = [
        ("00", .unknownType, 0),  // no type 0
        ("16030100", .unknownType, 0),  // a TLS ClientHello, not a session message
        ("474554", .unknownType, 0),  // "GET"
        ("010401", .tooLong, 1),  // 1025 bytes
        ("1000020561", .truncated, 4),  // name of 5 bytes, 1 there
        ("030007" + "01020304050607", .truncated, 3),  // ping of 7 bytes
        ("120009" + "000000000000000100", .trailingBytes, 11),
        ("100000", .truncated, 3),  // connect without a name
        ("10000100", .badName, 3),  // empty name
        ("1000020141", .badName, 3),  // "A": upper case
        ("10000201ff", .badName, 3),  // not UTF-8
        ("1400020161", .truncated, 5),  // forward without its target
        ("14000401610141", .badName, 5),  // forward to "A"
        ("1400050161016200", .trailingBytes, 7),
        ("1f0004" + "01" + "0001" + "ff", .badText, 4),
        ("1f0003" + "01" + "0002", .truncated, 6),
    ]

    @Test(arguments: 0..<Self.malformed.count)
    func malformedFramesThrowACodeAndOffset(_ i: Int) {
        let (wire, code, offset) = Self.malformed[i]
        let error = #expect(throws: RelaySessionWireError.self) { _ = try RelaySessionMessage.decode(hex(wire)) }
        #expect(error?.code == code && error?.offset == offset, "\(wire): \(String(describing: error))")
        #expect(error?.description.hasPrefix("relay session message: ") == true)
    }

    @Test func unencodableMessagesThrow() {
        #expect(throws: RelaySessionWireError(.unencodable, at: 0, "")) {
            _ = try RelaySessionMessage.connect(node: "Not_A_Name").encode()
        }
        #expect(throws: RelaySessionWireError(.unencodable, at: 0, "")) {
            _ = try RelaySessionMessage.refused(.limit, message: String(repeating: "x", count: 1022)).encode()
        }
        #expect(
            (try? RelaySessionMessage.refused(.limit, message: String(repeating: "x", count: 1021)).encode())?.count
                == 1027
        )
    }

    /// The fuzz target's invariants (`scripts/fuzz relay`) on seeded mutations of every golden frame,
    /// the forward included: a bounded smoke run inside the test suite (the entry traps on a break).
    @Test func fuzzInvariantsHoldOnMutatedFrames() {
        var rng = SplitMix(seed: 0x5EED)
        for (_, wire) in Self.golden {
            let frame = hex(wire)
            for _ in 0..<500 {
                var bytes = frame + (try! RelaySessionMessage.ping(7).encode())
                for _ in 0..<Int.random(in: 1...3, using: &rng) {
                    let at = Int.random(in: 0..<bytes.count, using: &rng)
                    bytes[at] = UInt8.random(in: 0...255, using: &rng)
                }
                bytes.withUnsafeBytes { RelaySessionFuzzing.fuzzOne($0) }
            }
        }
    }
}
