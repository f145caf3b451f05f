import Foundation
import MeshCore
import MeshTestSupport
import NodeAgent
import Testing

/// The MQTT 3.1.1 codec, byte for byte, and the KubeEdge twin payloads.
@Suite struct MQTTCodecTests {
    @Test func connectIsEncodedAsTheStandardSays() {
        let bytes = MQTTCodec.encode(.connect(MQTTConnect(clientID: "ab", cleanSession: false, keepAliveSeconds: 30)))
        #expect(
            bytes == [
                0x10, 14,  // CONNECT, remaining length
                0x00, 0x04, 0x4D, 0x51, 0x54, 0x54,  // "MQTT"
                0x04,  // level 4 (3.1.1)
                0x00,  // flags: no clean session, no will, no credentials
                0x00, 30,  // keep alive
                0x00, 0x02, 0x61, 0x62,  // client id "ab"
            ]
        )
        let clean = MQTTCodec.encode(
            .connect(MQTTConnect(clientID: "", cleanSession: true, keepAliveSeconds: 60, username: "u", password: [1]))
        )
        #expect(clean[9] == 0xC2)
    }

    @Test func publishSubscribeAndAcksRoundTrip() throws {
        let packets: [MQTTPacket] = [
            .connack(sessionPresent: true, returnCode: 0),
            .publish(MQTTPublish(topic: "a/b", payload: Array("hi".utf8))),
            .publish(
                MQTTPublish(
                    topic: "$hw/events/device/x/twin/update",
                    payload: [0, 1, 2],
                    qos: 1,
                    retain: true,
                    dup: true,
                    packetID: 7
                )
            ),
            .puback(packetID: 7),
            .subscribe(packetID: 1, filters: [MQTTSubscription(filter: "$hw/events/device/+/twin/update", qos: 1)]),
            .suback(packetID: 1, returnCodes: [1]),
            .unsubscribe(packetID: 2, filters: ["a/#"]),
            .unsuback(packetID: 2),
            .pingreq, .pingresp, .disconnect,
            .connect(
                MQTTConnect(clientID: "node", cleanSession: true, keepAliveSeconds: 5, username: "u", password: [9, 9])
            ),
        ]
        for p in packets {
            let bytes = MQTTCodec.encode(p)
            let decoded = try #require(try MQTTCodec.decode(bytes[...]))
            #expect(decoded.packet == p)
            #expect(decoded.consumed == bytes.count)
        }
        #expect(MQTTCodec.encode(.publish(MQTTPublish(topic: "t", payload: [0x41]))) == [0x30, 4, 0, 1, 0x74, 0x41])
        #expect(
            MQTTCodec.encode(.publish(MQTTPublish(topic: "t", payload: [], qos: 1, packetID: 0x0102)))
                == [0x32, 5, 0, 1, 0x74, 1, 2]
        )
        #expect(MQTTCodec.encode(.puback(packetID: 0x0A0B)) == [0x40, 2, 0x0A, 0x0B])
        #expect(MQTTCodec.encode(.pingreq) == [0xC0, 0])
        #expect(
            MQTTCodec.encode(.subscribe(packetID: 1, filters: [MQTTSubscription(filter: "a", qos: 1)]))
                == [0x82, 6, 0, 1, 0, 1, 0x61, 1]
        )
    }

    @Test func remainingLengthUsesUpToFourBytes() throws {
        let payload = [UInt8](repeating: 0x55, count: 200)
        let bytes = MQTTCodec.encode(.publish(MQTTPublish(topic: "t", payload: payload)))
        // 3 + 200 = 203 = 0xCB: 0xCB (continue) then 0x01.
        #expect(Array(bytes.prefix(3)) == [0x30, 0xCB, 0x01])
        #expect(try MQTTCodec.decode(bytes[...])?.consumed == bytes.count)
        // Partial input: nil, never an error.
        for cut in 0..<bytes.count { #expect(try MQTTCodec.decode(bytes[..<cut]) == nil) }
        // Two packets back to back: the first only.
        let two = MQTTCodec.encode(.pingreq) + MQTTCodec.encode(.pingresp)
        #expect(try MQTTCodec.decode(two[...])?.packet == .pingreq)
    }

    @Test func malformedPacketsAreRefusedWithTheReason() {
        func error(_ bytes: [UInt8], max: Int = MQTTCodec.defaultMaxPacketBytes) -> String? {
            do {
                _ = try MQTTCodec.decode(bytes[...], maxPacketBytes: max)
                return nil
            } catch {
                return error.message
            }
        }
        #expect(error([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]) == "remaining length longer than 4 bytes")
        #expect(error([0x30, 0x80, 0x80, 0x01], max: 1000)?.contains("larger than the limit") == true)
        #expect(error([0x36, 3, 0, 1, 0x74]) == "PUBLISH with QoS 3")
        #expect(error([0x30, 3, 0, 1, 0x23]) == "PUBLISH to a topic with wildcards")
        #expect(error([0x32, 5, 0, 1, 0x74, 0, 0]) == "PUBLISH with packet id 0")
        #expect(error([0x30, 4, 0, 5, 0x74, 0x74]) == "a string runs past the end of the packet")
        #expect(error([0x30, 4, 0, 2, 0xC3, 0x28]) == "a string is not valid UTF-8 (or holds NUL)")
        #expect(error([0x80, 3, 0, 1, 0]) == "SUBSCRIBE with reserved flags 0")
        #expect(error([0xC0, 1, 0]) == "PINGREQ has 1 bytes too many")
        #expect(error([0xF0, 0])?.contains("not handled") == true)
        #expect(error([0x10, 2, 0, 0]) == "packet ends early")
    }

    @Test func topicFiltersMatchLikeABroker() {
        #expect(MQTTCodec.matches("$hw/events/device/+/twin/update", "$hw/events/device/t1/twin/update"))
        #expect(!MQTTCodec.matches("$hw/events/device/+/twin/update", "$hw/events/device/t1/twin/update/delta"))
        #expect(MQTTCodec.matches("$hw/events/device/t1/twin/#", "$hw/events/device/t1/twin/update/delta"))
        #expect(!MQTTCodec.matches("a/+", "a"))
    }

    // MARK: payloads

    @Test func kubeEdgeTwinUpdatesDecodeAsItsMappersSendThem() throws {
        // As KubeEdge's mappers marshal DeviceTwinUpdate (Go, encoding/json).
        let text = """
            {"event_id":"","timestamp":0,"twin":{"temperature":{"actual":{"value":"21.50","metadata":{"timestamp":1700000000000}},\
            "metadata":{"type":"Updated"}},"humidity":{"actual":{"value":"40"},"metadata":{"type":"Updated"}}}}
            """
        let update = try TwinPayloads.decode(DeviceTwinUpdate.self, Array(text.utf8))
        #expect(update.eventID == "")
        #expect(
            TwinPayloads.reported(update).map { "\($0.property)=\($0.value)" } == ["humidity=40", "temperature=21.50"]
        )
        #expect(update.twin["temperature"]?.actual?.metadata?.timestamp == 1_700_000_000_000)
        // Without event_id and timestamp (Go's zero values left out by some mappers).
        let bare = try TwinPayloads.decode(DeviceTwinUpdate.self, Array("{\"twin\":{}}".utf8))
        #expect(bare.eventID == "" && bare.twin.isEmpty)
        #expect(TwinTopics.parse("$hw/events/device/thermo-1/twin/update") == .update(device: "thermo-1"))
        #expect(TwinTopics.parse("$hw/events/device/thermo-1/twin/get") == .get(device: "thermo-1"))
        #expect(TwinTopics.parse("$hw/events/device/thermo-1/twin/update/delta") == nil)
        #expect(TwinTopics.parse("$hw/events/device//twin/update") == nil)
    }

    @Test func deltaAndResultsEncodeWithKubeEdgesFieldNames() throws {
        let delta = DeviceTwinDelta(
            eventID: "d1",
            timestamp: 5,
            twin: [
                "target": MsgTwin(expected: TwinValue(value: "23"), expectedVersion: TwinVersion(cloud: 2, edge: 0))
            ],
            delta: ["target": "23"]
        )
        #expect(
            String(decoding: TwinPayloads.encode(delta), as: UTF8.self)
                == #"{"delta":{"target":"23"},"event_id":"d1","timestamp":5,"twin":{"target":{"expected":{"value":"23"},"expected_version":{"cloud":2,"edge":0}}}}"#
        )
        let refused = DeviceTwinResult(eventID: "e", timestamp: 1, twin: nil, code: 400, reason: "bad")
        #expect(
            String(decoding: TwinPayloads.encode(refused), as: UTF8.self)
                == #"{"code":400,"event_id":"e","reason":"bad","timestamp":1}"#
        )
    }

    @Test func malformedPayloadsGetAReasonNeverACrash() {
        for text in ["", "{", "[]", "{\"twin\":5}", "{\"twin\":{\"t\":{\"actual\":{\"value\":5}}}}", "null"] {
            do {
                _ = try TwinPayloads.decode(DeviceTwinUpdate.self, Array(text.utf8))
                Issue.record("\(text) was accepted")
            } catch {
                #expect(error.message.hasPrefix("malformed payload"))
            }
        }
        let huge = [UInt8](repeating: 0x20, count: TwinPayloads.maxPayloadBytes + 1)
        #expect(throws: MQTTCodecError.self) { try TwinPayloads.decode(DeviceTwinUpdate.self, huge) }
    }

    /// The fuzz target's invariants over seeded mutations of every golden packet (bounded).
    @Test func seededMutationsNeverCrashTheDecoders() {
        var rng = SplitMix(seed: 16)
        let golden: [[UInt8]] = [
            MQTTCodec.encode(
                .publish(
                    MQTTPublish(
                        topic: "$hw/events/device/x/twin/update",
                        payload: Array(#"{"event_id":"a","twin":{"t":{"actual":{"value":"1"}}}}"#.utf8),
                        qos: 1,
                        packetID: 3
                    )
                )
            ),
            MQTTCodec.encode(
                .connect(
                    MQTTConnect(clientID: "c", cleanSession: true, keepAliveSeconds: 1, username: "u", password: [1])
                )
            ),
            MQTTCodec.encode(.subscribe(packetID: 1, filters: [MQTTSubscription(filter: "a/+", qos: 1)])),
            MQTTCodec.encode(.suback(packetID: 1, returnCodes: [0, 1, 0x80])),
        ]
        for _ in 0..<20_000 {
            var bytes = golden[Int(rng.next() % UInt64(golden.count))]
            for _ in 0...(rng.next() % 4) {
                let i = Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 3 {
                case 0: bytes[i] = UInt8(truncatingIfNeeded: rng.next())
                case 1: bytes.remove(at: i)
                default: bytes.insert(UInt8(truncatingIfNeeded: rng.next()), at: i)
                }
                if bytes.isEmpty { bytes = [0] }
            }
            MQTTFuzz.check(bytes)
        }
    }
}
