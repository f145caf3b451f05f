import NIOCore

/// Entry point for the libFuzzer target (Sources/mesh-fuzz, MESH_FUZZ_TARGET=mux). Not part of the module's API.
@_spi(Fuzzing)
public enum MuxFuzzing {
    /// Feeds one input to every MeshWire decoder and traps (so the fuzzer reports it) when an invariant breaks:
    /// - every decoded value re-encodes to exactly the bytes it was decoded from (the codecs are lossless);
    /// - yamux frames decode the same whole and in pieces of any size (1, 7, 13 bytes): the same frames,
    ///   then the same error, or else the same bytes left over;
    /// - nothing decoded is bigger than its limit.
    public static func fuzzOne(_ input: UnsafeRawBufferPointer) {
        let bytes = ByteBuffer(bytes: input)
        let whole = Self.frames(bytes, step: nil)
        for step in [1, 7, 13] {
            let pieces = Self.frames(bytes, step: step)
            // Bytes left over are the same unless decoding stopped at an error (fed in pieces, the
            // bytes after the bad header were never fed).
            guard pieces.frames == whole.frames, pieces.error == whole.error,
                whole.error != nil || pieces.left == whole.left
            else {
                fatalError("yamux frames decode differently in pieces of \(step)")
            }
        }
        var buffer = bytes
        if let target = try? StreamTarget.decode(from: &buffer) {
            var again = ByteBuffer()
            guard (try? target.encode(into: &again)) != nil else { fatalError("a decoded target does not encode") }
            guard again == bytes.getSlice(at: 0, length: bytes.readableBytes - buffer.readableBytes) else {
                fatalError("a stream-open header re-encodes differently")
            }
        }
        buffer = bytes
        if let reply = try? StreamOpenReply.decode(from: &buffer) {
            var again = ByteBuffer()
            reply.encode(into: &again)
            guard again == bytes.getSlice(at: 0, length: bytes.readableBytes - buffer.readableBytes) else {
                fatalError("a stream-open reply re-encodes differently")
            }
        }
        buffer = bytes
        while let datagram = try? DatagramFraming.decode(from: &buffer, limit: 1500) {
            guard datagram.readableBytes <= 1500 else { fatalError("a datagram over its limit") }
        }
    }

    /// Frames decoded from `bytes`, fed whole or `step` bytes at a time; each is checked to re-encode to the
    /// bytes it came from.
    static func frames(_ bytes: ByteBuffer, step: Int?) -> (frames: [YamuxFrame], error: MeshWireError?, left: Int) {
        var frames: [YamuxFrame] = []
        var pending = ByteBuffer()
        var offset = 0
        let total = bytes.readableBytes
        while offset < total {
            let n = min(step ?? total, total - offset)
            var piece = bytes.getSlice(at: offset, length: n)!
            pending.writeBuffer(&piece)
            offset += n
            while true {
                let before = pending
                do {
                    guard let frame = try YamuxFrame.decode(from: &pending, maxPayload: 4096) else { break }
                    let consumed = before.getSlice(
                        at: before.readerIndex,
                        length: before.readableBytes - pending.readableBytes
                    )
                    guard (try? frame.encoded()) == consumed else { fatalError("a yamux frame re-encodes differently") }
                    guard frame.payloadSize <= 4096 else { fatalError("a frame over its limit") }
                    frames.append(frame)
                } catch {
                    guard pending == before else { fatalError("a failed decode consumed bytes") }
                    return (frames, error, pending.readableBytes)
                }
            }
        }
        return (frames, nil, pending.readableBytes)
    }
}
