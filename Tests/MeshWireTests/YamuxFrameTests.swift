import NIOCore
import Testing

@testable import MeshWire

/// Bytes from hex (spaces and newlines ignored).
func hex(_ s: String) -> [UInt8] {
    let digits = Array(s.filter { !$0.isWhitespace })
    return stride(from: 0, to: digits.count, by: 2).map { UInt8(String(digits[$0...$0 + 1]), radix: 16)! }
}

func buffer(_ s: String) -> ByteBuffer { ByteBuffer(bytes: hex(s)) }

func decodeAll(_ s: String, maxPayload: Int = 1024) throws(MeshWireError) -> [YamuxFrame] {
    var b = buffer(s)
    var out: [YamuxFrame] = []
    while let f = try YamuxFrame.decode(from: &b, maxPayload: maxPayload) { out.append(f) }
    return out
}

@Suite("yamux frame codec") struct YamuxFrameTests {
    /// Each frame of spec.md, with its exact bytes: version, type, flags, stream id, length (+ payload).
    static let samples: [(String, YamuxFrame)] = [
        ("00 00 0000 00000001 00000003 616263", .data(stream: 1, flags: [], payload: ByteBuffer(string: "abc"))),
        ("00 00 0001 00000003 00000000", .data(stream: 3, flags: .syn, payload: ByteBuffer())),
        ("00 00 0006 00000002 00000001 7a", .data(stream: 2, flags: [.ack, .fin], payload: ByteBuffer(string: "z"))),
        ("00 01 0001 00000001 00000000", .windowUpdate(stream: 1, flags: .syn, delta: 0)),
        ("00 01 0002 fffffffe 00040000", .windowUpdate(stream: 0xFFFF_FFFE, flags: .ack, delta: 262_144)),
        ("00 01 0004 00000005 00000010", .windowUpdate(stream: 5, flags: .fin, delta: 16)),
        ("00 01 0008 00000007 00000000", .windowUpdate(stream: 7, flags: .rst, delta: 0)),
        ("00 01 000c 00000007 ffffffff", .windowUpdate(stream: 7, flags: [.fin, .rst], delta: 0xFFFF_FFFF)),
        ("00 02 0001 00000000 12345678", .ping(ack: false, opaque: 0x1234_5678)),
        ("00 02 0002 00000000 12345678", .ping(ack: true, opaque: 0x1234_5678)),
        ("00 03 0000 00000000 00000000", .goAway(.normal)),
        ("00 03 0000 00000000 00000001", .goAway(.protocolError)),
        ("00 03 0000 00000000 00000002", .goAway(.internalError)),
    ]

    @Test("every frame type encodes and decodes byte for byte")
    func samplesRoundTrip() throws {
        for (bytes, frame) in Self.samples {
            #expect(try frame.encoded() == buffer(bytes), "\(frame)")
            #expect(try decodeAll(bytes) == [frame], "\(bytes)")
        }
    }

    @Test("frames back to back decode in order; a partial frame consumes nothing")
    func partial() throws {
        let all = Self.samples.map(\.0).joined()
        #expect(try decodeAll(all) == Self.samples.map(\.1))
        let one = hex(Self.samples[0].0)
        for cut in 0..<one.count {
            var b = ByteBuffer(bytes: one[..<cut])
            #expect(try YamuxFrame.decode(from: &b, maxPayload: 1024) == nil)
            #expect(b.readableBytes == cut)
        }
    }

    @Test("a data payload is a slice of the input (no copy) and lengths up to the limit pass")
    func limit() throws {
        var b = buffer("00 00 0000 00000001 00000004 01020304")
        let f = try YamuxFrame.decode(from: &b, maxPayload: 4)
        #expect(f == .data(stream: 1, flags: [], payload: ByteBuffer(bytes: [1, 2, 3, 4])))
        #expect(b.readableBytes == 0)
    }

    /// Every malformed header, with the error it gets; nothing is consumed.
    static let malformed: [(String, MeshWireError.Code)] = [
        ("01 00 0000 00000001 00000000", .unsupportedVersion),
        ("ff 02 0001 00000000 00000000", .unsupportedVersion),
        ("00 04 0000 00000001 00000000", .unknownFrameType),
        ("00 ff 0000 00000001 00000000", .unknownFrameType),
        ("00 00 0010 00000001 00000000", .unknownFlags),  // LZW, never part of the spec
        ("00 01 8000 00000001 00000000", .unknownFlags),
        ("00 00 0003 00000001 00000000", .conflictingFlags),
        ("00 01 000b 00000001 00000000", .conflictingFlags),
        ("00 00 0000 00000000 00000000", .streamFrameOnSession),
        ("00 01 0001 00000000 00000000", .streamFrameOnSession),
        ("00 02 0001 00000001 00000000", .sessionFrameOnStream),
        ("00 03 0000 00000002 00000000", .sessionFrameOnStream),
        ("00 02 0000 00000000 00000000", .badPingFlags),
        ("00 02 0003 00000000 00000000", .badPingFlags),
        ("00 02 0004 00000000 00000000", .badPingFlags),
        ("00 03 0001 00000000 00000000", .flagsNotAllowed),
        ("00 03 0000 00000000 00000003", .unknownGoAway),
        ("00 00 0000 00000001 00000401", .frameTooLarge),
        ("00 00 0000 00000001 ffffffff", .frameTooLarge),
    ]

    @Test("every malformed header throws its error as soon as the 12 bytes are there, consuming nothing")
    func malformedHeaders() {
        for (bytes, code) in Self.malformed {
            var b = buffer(bytes)
            #expect(throws: MeshWireError(code, "", file: "", line: 0), "\(bytes)") {
                try YamuxFrame.decode(from: &b, maxPayload: 1024)
            }
            #expect(b.readableBytes == 12)
        }
    }

    @Test("errors explain themselves")
    func errorText() {
        var b = buffer("00 03 0000 00000000 00000009")
        do {
            _ = try YamuxFrame.decode(from: &b, maxPayload: 0)
            Issue.record("decoded")
        } catch {
            #expect(error.description == "MeshWireError.unknownGoAway: go away code 9 (0-2 are defined)")
        }
    }

    @Test("frames the spec does not allow do not encode")
    func unencodable() {
        let bad: [YamuxFrame] = [
            .data(stream: 0, flags: [], payload: ByteBuffer()),
            .windowUpdate(stream: 0, flags: .syn, delta: 1),
            .windowUpdate(stream: 1, flags: YamuxFlags(rawValue: 0x10), delta: 1),
        ]
        for f in bad {
            #expect(throws: MeshWireError(.unencodable, "", file: "", line: 0)) { try f.encoded() }
        }
    }

    @Test("flags and frames print for logs")
    func descriptions() {
        #expect(YamuxFlags([.syn, .fin]).description == "SYN|FIN")
        #expect(YamuxFlags().description == "-")
        #expect(
            YamuxFrame.windowUpdate(stream: 3, flags: .ack, delta: 5).description == "WINDOW_UPDATE stream 3 [ACK] +5"
        )
    }
}
