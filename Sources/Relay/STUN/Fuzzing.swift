import MeshCore

/// Entry point for the libFuzzer target (Sources/mesh-fuzz, MESH_FUZZ_TARGET=stun). Not part of the module's API.
@_spi(Fuzzing)
public enum STUNFuzzing {
    static let sources = [
        STUNAddress(ip: .v4(0xC000_0201), port: 32853),
        STUNAddress(ip: .v6(0x2001_0DB8_1234_5678, 0x0011_2233_4455_6677), port: 1),
    ]
    static let local = STUNAddress(ip: .v4(0x7F00_0001), port: 3478)

    /// Feeds one input to the decoder, the encoder and the responder, and traps (so the fuzzer
    /// reports it) when an invariant breaks:
    /// - a decoded message re-encodes, and decodes again to the same message;
    /// - the stream framer agrees with the decoder on where a whole message ends;
    /// - every answer decodes, is a response of the request's method with its transaction id
    ///   (and cookie), and stays small.
    public static func fuzzOne(_ input: UnsafeRawBufferPointer) {
        if let m = try? STUNMessage.decode(input) {
            guard let bytes = try? m.encode() else { fatalError("a decoded message does not encode") }
            guard let again = try? STUNMessage.decode(bytes) else { fatalError("re-encoded message does not decode") }
            guard again == m else { fatalError("round trip changed the message") }
            guard (try? STUNMessage.frameLength(input)) == input.count else {
                fatalError("the framer disagrees with the decoder")
            }
        }
        for (i, source) in Self.sources.enumerated() {
            let r = STUNResponder.respond(
                to: input,
                from: source,
                local: i == 0 ? Self.local : nil,
                policy: STUNResponderPolicy()
            )
            switch r.outcome {
            case .dropped:
                guard r.bytes.isEmpty else { fatalError("a dropped input got bytes") }
            case .binding, .error:
                guard let reply = try? STUNMessage.decode(r.bytes) else { fatalError("an answer does not decode") }
                guard let header = try? STUNMessage.header(input) else { fatalError("answered a non-message") }
                guard reply.transactionID == header.transactionID, reply.cookie == header.cookie,
                    reply.type.method == header.type.method, reply.type.messageClass != .request,
                    reply.type.messageClass != .indication
                else { fatalError("the answer does not match the request") }
                guard r.bytes.count <= 256 else { fatalError("answer of \(r.bytes.count) bytes") }
                if case .binding = r.outcome {
                    let mapped =
                        reply.attributes.contains(.xorMappedAddress(source))
                        || reply.attributes.contains(.mappedAddress(source))
                    guard mapped else { fatalError("a binding answer without the source address") }
                }
            }
        }
    }
}
