/// Entry point for the libFuzzer target (Sources/mesh-fuzz, MESH_FUZZ_TARGET=relay). Not part of the module's API.
@_spi(Fuzzing)
public enum RelaySessionFuzzing {
    /// Decodes `input` as a stream of session frames and traps (so the fuzzer reports it) when an
    /// invariant breaks: a decoded frame re-encodes to exactly its bytes; a frame decodes the same
    /// with anything after it; every proper prefix of a frame is incomplete (nil), never an error
    /// nor a message.
    public static func fuzzOne(_ input: UnsafeRawBufferPointer) {
        var rest = Array(input)
        while !rest.isEmpty {
            // An error or an incomplete frame ends the stream.
            guard let (message, length) = try? RelaySessionMessage.decode(rest) else { return }
            let frame = Array(rest[..<length])
            guard let bytes = try? message.encode(), bytes == frame else {
                fatalError("a decoded frame does not re-encode to its bytes: \(message)")
            }
            for n in [0, 1, 2, length - 1] where n < length {
                do {
                    if try RelaySessionMessage.decode(Array(frame.prefix(n))) != nil {
                        fatalError("a prefix of \(n) bytes of a \(length)-byte frame decoded")
                    }
                } catch {
                    fatalError("a prefix of \(n) bytes of a valid \(length)-byte frame is an error: \(error)")
                }
            }
            rest.removeFirst(length)
        }
    }
}
