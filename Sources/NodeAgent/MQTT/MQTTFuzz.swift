/// The MQTT fuzz target's body (mesh-fuzz `mqtt`, and seeded mutations in the tests): any bytes
/// decode to a packet, need more data, or fail with a reason; a decoded packet encodes to bytes that
/// decode to the same packet; a PUBLISH payload goes through the twin payload decoders without a crash.
public enum MQTTFuzz {
    public static func check(_ bytes: [UInt8]) {
        let decoded: (packet: MQTTPacket, consumed: Int)?
        do {
            decoded = try MQTTCodec.decode(bytes[...], maxPacketBytes: 1 << 16)
        } catch {
            precondition(!error.message.isEmpty)
            return
        }
        guard let (packet, consumed) = decoded else { return }
        precondition(consumed <= bytes.count)
        let again = MQTTCodec.encode(packet)
        guard let round = try? MQTTCodec.decode(again[...], maxPacketBytes: 1 << 17) else {
            preconditionFailure("a decoded packet did not decode after encoding: \(packet)")
        }
        // CONNECT's will is dropped on decode; everything else is kept.
        precondition(round.packet == packet, "round trip changed \(packet) into \(round.packet)")
        if case .publish(let p) = packet {
            if let u = try? TwinPayloads.decode(DeviceTwinUpdate.self, p.payload) { _ = TwinPayloads.reported(u) }
            _ = try? TwinPayloads.decode(TwinBaseMessage.self, p.payload)
            _ = TwinTopics.parse(p.topic)
        }
    }
}
