import MeshCore

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// KubeEdge's device twin topics and payloads (edge/pkg/devicetwin/dttype in kubeedge/kubeedge), so
/// that its mappers work unchanged:
/// - a mapper publishes `$hw/events/device/<id>/twin/update` (`DeviceTwinUpdate`: `twin.<prop>.actual.value`)
///   and `$hw/events/device/<id>/twin/get` (`BaseMessage`);
/// - the node agent publishes `$hw/events/device/<id>/twin/update/delta` (`DeviceTwinDelta`: the twins and
///   `delta`, desired values that differ from reported), `.../twin/get/result` (`DeviceTwinResult`) and
///   `.../twin/update/result` (the twins applied, or `code` and `reason` for a refused update).
/// Values are strings; timestamps are milliseconds since the epoch.
public enum TwinTopics {
    public static let prefix = "$hw/events/device/"
    public static let update = "/twin/update"
    public static let updateResult = "/twin/update/result"
    public static let delta = "/twin/update/delta"
    public static let get = "/twin/get"
    public static let getResult = "/twin/get/result"

    /// What the node agent subscribes to: every device's update and get.
    public static let subscriptions = [prefix + "+" + update, prefix + "+" + get]

    public enum Request: Equatable, Sendable {
        case update(device: String)
        case get(device: String)
    }

    /// The request a topic carries (nil: not one of ours).
    public static func parse(_ topic: String) -> Request? {
        guard topic.hasPrefix(prefix) else { return nil }
        let rest = topic.dropFirst(prefix.count)
        guard let slash = rest.firstIndex(of: "/") else { return nil }
        let device = String(rest[..<slash])
        guard !device.isEmpty else { return nil }
        switch rest[slash...] {
        case update: return .update(device: device)
        case get: return .get(device: device)
        default: return nil
        }
    }
}

public struct TwinValue: Codable, Sendable, Equatable {
    public var value: String?
    public var metadata: ValueMetadata?

    public init(value: String?, timestamp: Int64? = nil) {
        self.value = value
        self.metadata = timestamp.map { ValueMetadata(timestamp: $0) }
    }

    public struct ValueMetadata: Codable, Sendable, Equatable {
        public var timestamp: Int64?
    }
}

public struct TwinVersion: Codable, Sendable, Equatable {
    public var cloud: Int64
    public var edge: Int64

    public init(cloud: Int64, edge: Int64) {
        self.cloud = cloud
        self.edge = edge
    }
}

public struct MsgTwin: Codable, Sendable, Equatable {
    public var expected: TwinValue?
    public var actual: TwinValue?
    public var optional: Bool?
    public var metadata: TypeMetadata?
    public var expectedVersion: TwinVersion?
    public var actualVersion: TwinVersion?

    public init(
        expected: TwinValue? = nil,
        actual: TwinValue? = nil,
        optional: Bool? = nil,
        metadata: TypeMetadata? = nil,
        expectedVersion: TwinVersion? = nil,
        actualVersion: TwinVersion? = nil
    ) {
        self.expected = expected
        self.actual = actual
        self.optional = optional
        self.metadata = metadata
        self.expectedVersion = expectedVersion
        self.actualVersion = actualVersion
    }

    public struct TypeMetadata: Codable, Sendable, Equatable {
        public var type: String?
        public init(type: String?) { self.type = type }
    }

    enum CodingKeys: String, CodingKey {
        case expected, actual, optional, metadata
        case expectedVersion = "expected_version"
        case actualVersion = "actual_version"
    }
}

/// `$hw/events/device/<id>/twin/update` (mapper → agent).
public struct DeviceTwinUpdate: Codable, Sendable, Equatable {
    public var eventID: String
    public var timestamp: Int64
    public var twin: [String: MsgTwin]

    public init(eventID: String, timestamp: Int64, twin: [String: MsgTwin]) {
        self.eventID = eventID
        self.timestamp = timestamp
        self.twin = twin
    }

    enum CodingKeys: String, CodingKey {
        case eventID = "event_id"
        case timestamp, twin
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        // KubeEdge's mappers often leave event_id and timestamp out (Go zero values).
        self.eventID = try c.decodeIfPresent(String.self, forKey: .eventID) ?? ""
        self.timestamp = try c.decodeIfPresent(Int64.self, forKey: .timestamp) ?? 0
        self.twin = try c.decodeIfPresent([String: MsgTwin].self, forKey: .twin) ?? [:]
    }
}

/// `.../twin/get` (mapper → agent): only the event id matters.
public struct TwinBaseMessage: Codable, Sendable, Equatable {
    public var eventID: String
    public var timestamp: Int64

    enum CodingKeys: String, CodingKey {
        case eventID = "event_id"
        case timestamp
    }

    public init(eventID: String, timestamp: Int64) {
        self.eventID = eventID
        self.timestamp = timestamp
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.eventID = try c.decodeIfPresent(String.self, forKey: .eventID) ?? ""
        self.timestamp = try c.decodeIfPresent(Int64.self, forKey: .timestamp) ?? 0
    }
}

/// `.../twin/get/result` and `.../twin/update/result` (agent → mapper); `code`/`reason` on a refusal.
public struct DeviceTwinResult: Codable, Sendable, Equatable {
    public var eventID: String
    public var timestamp: Int64
    public var twin: [String: MsgTwin]?
    public var code: Int?
    public var reason: String?

    public init(eventID: String, timestamp: Int64, twin: [String: MsgTwin]?, code: Int? = nil, reason: String? = nil) {
        self.eventID = eventID
        self.timestamp = timestamp
        self.twin = twin
        self.code = code
        self.reason = reason
    }

    enum CodingKeys: String, CodingKey {
        case eventID = "event_id"
        case timestamp, twin, code, reason
    }
}

/// `.../twin/update/delta` (agent → mapper): desired values that differ from the reported ones.
public struct DeviceTwinDelta: Codable, Sendable, Equatable {
    public var eventID: String
    public var timestamp: Int64
    public var twin: [String: MsgTwin]
    public var delta: [String: String]

    public init(eventID: String, timestamp: Int64, twin: [String: MsgTwin], delta: [String: String]) {
        self.eventID = eventID
        self.timestamp = timestamp
        self.twin = twin
        self.delta = delta
    }

    enum CodingKeys: String, CodingKey {
        case eventID = "event_id"
        case timestamp, twin, delta
    }
}

/// Decoding and encoding the payloads, with errors that say what is wrong.
public enum TwinPayloads {
    public static let maxPayloadBytes = 64 * 1024

    public static func decode<T: Decodable>(_ type: T.Type, _ payload: [UInt8]) throws(MQTTCodecError) -> T {
        if payload.count > Self.maxPayloadBytes {
            throw MQTTCodecError("payload of \(payload.count) bytes is larger than \(Self.maxPayloadBytes)")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(payload))
        } catch let e as DecodingError {
            throw MQTTCodecError("malformed payload: \(DecodingError.describe(e))")
        } catch {
            throw MQTTCodecError("malformed payload: \(error)")
        }
    }

    /// The reported values of an update: property → value (a twin without `actual.value` is skipped).
    public static func reported(_ update: DeviceTwinUpdate) -> [(property: String, value: String)] {
        update.twin.keys.sorted().compactMap { k in update.twin[k]?.actual?.value.map { (k, $0) } }
    }

    public static func encode(_ value: some Encodable) -> [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        // Our own payload types always encode.
        return Array((try? e.encode(value)) ?? Data("{}".utf8))
    }
}
