import Control
import MeshTestSupport
import NIOCore
import Testing

@Suite(.rationed) struct EtcdValueTests {
    @Test func encodesLabelsSlotsAndJSONByteForByte() throws {
        let bytes = try EtcdValue.encode(labels: ["app": "web", "a": "b"]) { rv in
            ByteBuffer(string: #"{"metadata":{"resourceVersion":"\#(rv)"},"x":1}"#)
        }
        let labels = Array("a=b\napp=web".utf8)
        let json = Array(#"{"metadata":{"resourceVersion":""},"x":1}"#.utf8)
        let expected: [UInt8] = [1, 0, 0, 0, UInt8(labels.count)] + labels + [0, 1, 0, 0, 0, 32] + json
        #expect(bytes == expected)
        let decoded = try EtcdValue.decode(bytes)
        #expect(decoded.labels == ["app": "web", "a": "b"])
        #expect(String(buffer: decoded.json(at: 42)) == #"{"metadata":{"resourceVersion":"42"},"x":1}"#)
    }

    @Test func findsEverySlotWhateverElseTheJSONHolds() throws {
        // The version twice, and digits that look like a version elsewhere: only real slots move.
        let render: (Int64) -> ByteBuffer = { rv in
            ByteBuffer(string: #"{"a":"1111111111111111111","rv":"\#(rv)","b":[\#(rv)],"c":"2222222222222222222"}"#)
        }
        let bytes = try EtcdValue.encode(labels: [:], render: render)
        let decoded = try EtcdValue.decode(bytes)
        #expect(decoded.slots.count == 2)
        for rv: Int64 in [1, 9, 12345, Int64.max] {
            #expect(String(buffer: decoded.json(at: rv)) == String(buffer: render(rv)))
        }
    }

    @Test func aJSONWithoutVersionHasNoSlots() throws {
        let bytes = try EtcdValue.encode(labels: [:]) { _ in ByteBuffer(string: "{}") }
        #expect(try EtcdValue.decode(bytes).slots == [])
        #expect(String(buffer: try EtcdValue.decode(bytes).json(at: 5)) == "{}")
    }

    @Test func renderingsThatDifferBeyondTheVersionAreRefused() {
        #expect(throws: EtcdValue.Malformed.self) {
            _ = try EtcdValue.encode(labels: [:]) { rv in
                ByteBuffer(string: rv == 1_111_111_111_111_111_111 ? "{\"a\":1}" : "{\"a\":2}")
            }
        }
        #expect(throws: EtcdValue.Malformed.self) {
            _ = try EtcdValue.encode(labels: [:]) { rv in
                ByteBuffer(string: rv == 1_111_111_111_111_111_111 ? "{}" : "{ }")
            }
        }
    }

    @Test func malformedValuesAreErrorsNeverCrashes() throws {
        let good = try EtcdValue.encode(labels: ["k": "v"]) { rv in ByteBuffer(string: #"{"rv":"\#(rv)"}"#) }
        #expect(throws: EtcdValue.Malformed(reason: "empty")) { _ = try EtcdValue.decode([]) }
        #expect(throws: EtcdValue.Malformed(reason: "unknown format 9")) {
            _ = try EtcdValue.decode([9] + good.dropFirst())
        }
        // Every truncation is an error or a shorter JSON, never a crash.
        for n in 0..<good.count { _ = try? EtcdValue.decode(Array(good.prefix(n))) }
        // Random bytes (seeded) after a valid format byte.
        var g = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let len = Int.random(in: 0..<64, using: &g)
            let bytes = [UInt8(1)] + (0..<len).map { _ in UInt8.random(in: 0...255, using: &g) }
            if let d = try? EtcdValue.decode(bytes) { _ = d.json(at: 7) }
        }
    }
}
