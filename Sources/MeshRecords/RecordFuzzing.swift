import NIOCore

/// Entry point for the libFuzzer target (Sources/mesh-fuzz, MESH_FUZZ_TARGET=records). Not part of the module's
/// API.
@_spi(Fuzzing)
public enum LinkRecordFuzzing {
    static let secret = Array(UInt8(1)...UInt8(32))

    /// Traps (so the fuzzer reports it) when an invariant of the record layer breaks:
    /// - `input` as bytes off the wire: every record `recordLength` finds lies within the input and within the
    ///   bounds, and none opens (nothing but the key's holder can make one); a failed open leaves the output
    ///   as it was;
    /// - `input` as content: sealed (in records of at most 2^14 bytes), it opens back to exactly itself; with
    ///   any one byte of the sealed records flipped, it does not.
    public static func fuzzOne(_ input: UnsafeRawBufferPointer) {
        // Off the wire.
        let opener = LinkRecordCipher(secret: Self.secret, hash: .sha256)
        var at = 0
        while at < input.count {
            let rest = UnsafeRawBufferPointer(rebasing: input[at...])
            guard let length = try? LinkRecordCipher.recordLength(in: rest) else { break }
            guard length >= LinkRecordCipher.headerLength + 1 + LinkRecordCipher.tagLength,
                length <= LinkRecordCipher.headerLength + LinkRecordCipher.maxCiphertext, length <= rest.count
            else { fatalError("recordLength gave \(length) for \(rest.count) bytes") }
            var out = ByteBuffer(bytes: [7, 7])
            if (try? opener.open(UnsafeRawBufferPointer(rebasing: rest[0..<length]), into: &out)) != nil {
                fatalError("a record of arbitrary bytes opened")
            }
            guard out.readableBytes == 2, out.writerIndex == 2 else { fatalError("a failed open changed the output") }
            at += length
        }
        // As content.
        let sealer = LinkRecordCipher(secret: Self.secret, hash: .sha256)
        var wire = ByteBuffer()
        sealer.seal(ByteBuffer(bytes: input), into: &wire)
        let sealed = Array(wire.readableBytesView)
        guard let back = Self.open(sealed), back == Array(input) else {
            fatalError("\(input.count) bytes sealed did not open back to themselves")
        }
        guard !sealed.isEmpty else { return }
        var flipped = sealed
        let position = Int(input.first ?? 0) * 257 % sealed.count
        flipped[position] ^= 0x01 << (input.count % 8)
        if Self.open(flipped) != nil { fatalError("records with byte \(position) flipped opened") }
    }

    /// The content of whole application-data records, or nil when one does not open.
    static func open(_ bytes: [UInt8]) -> [UInt8]? {
        let opener = LinkRecordCipher(secret: Self.secret, hash: .sha256)
        var out = ByteBuffer()
        var at = 0
        return bytes.withUnsafeBytes { all -> [UInt8]? in
            while at < all.count {
                guard
                    let (length, type) = try? opener.openFirst(
                        UnsafeRawBufferPointer(rebasing: all[at...]),
                        into: &out
                    ),
                    type == LinkRecordCipher.ContentType.applicationData.rawValue
                else { return nil }
                at += length
            }
            return Array(out.readableBytesView)
        }
    }
}
