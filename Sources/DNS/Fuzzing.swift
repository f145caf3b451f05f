/// Entry points for the libFuzzer target (Sources/mesh-fuzz, MESH_FUZZ_TARGET=dns). Not part of the module's API.
@_spi(Fuzzing)
public enum DNSFuzzing {
    /// A zone with every record shape, built once.
    static let zone: DNSZone = {
        var services: [DNSService] = [
            DNSService(
                name: "web",
                namespace: "shop",
                clusterIPs: [.v4(0x0A60_000A), .v6(0xFD00_0096_0000_0000, 0x10)],
                ports: [DNSServicePort(name: "http", port: 80)],
                exported: true
            ),
            DNSService(name: "ext", namespace: "shop", externalName: "www.example.org"),
            DNSService(name: "alias", namespace: "shop", externalName: "web.shop.svc.cluster.local"),
        ]
        let endpoints = (0..<150).map {
            DNSEndpoint(ip: .v4(0x0A01_0000 | UInt32($0)), hostname: $0 % 2 == 0 ? "p\($0)" : nil)
        }
        services.append(
            DNSService(
                name: "db",
                namespace: "shop",
                ports: [DNSServicePort(name: "pg", port: 5432)],
                endpoints: endpoints
            )
        )
        // The input is fixed and valid.
        return try! DNSZone(ZoneInput(services: services))
    }()

    /// Feeds one input to the decoder, the re-encoder and the responder's answer path, and traps
    /// (so the fuzzer reports it) when an invariant breaks:
    /// - a decoded message re-encodes and decodes to the same message (unless it had to be truncated);
    /// - every reply the answer path produces decodes, is a response, and fits the UDP limit;
    /// - a forwarded answer built from any decodable upstream message decodes.
    public static func fuzzOne(_ input: UnsafeRawBufferPointer) {
        if let m = try? DNSMessage.decode(input) {
            if let bytes = try? m.encode() {
                guard let again = try? DNSMessage.decode(bytes) else {
                    fatalError("re-encoded message does not decode")
                }
                if again.header.truncated == m.header.truncated && again != m {
                    fatalError("round trip changed the message")
                }
            }
            let question = m.questions.first ?? DNSQuestion(name: .root, type: .a)
            for edns in [nil, DNSEDNS(udpPayloadSize: 700)] {
                let req = ForwardRequest(id: 7, flags: 0x0100, question: question, clientEDNS: edns)
                let out = Answerer.composeForwarded(req, result: m, overTCP: false, policy: AnswerPolicy())
                guard out.count <= (edns == nil ? 512 : 700) else {
                    fatalError("forwarded answer exceeds the UDP limit")
                }
                guard (try? DNSMessage.decode(out)) != nil else { fatalError("forwarded answer does not decode") }
            }
        }
        let scratch = AnswerScratch()
        for tcp in [false, true] {
            let d = Answerer.answer(input, zone: zone, overTCP: tcp, policy: AnswerPolicy(), scratch: scratch)
            guard case .reply = d else { continue }
            guard let r = try? DNSMessage.decode(scratch.response) else { fatalError("reply does not decode") }
            guard r.header.isResponse else { fatalError("reply without QR") }
            if !tcp {
                let limit = r.edns == nil ? 512 : 1232
                // Truncated to the question, a reply may still exceed 512 only by its question.
                if scratch.response.count > limit && !r.header.truncated { fatalError("UDP reply over the limit") }
            }
        }
    }
}
