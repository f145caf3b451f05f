#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Reading documents the way users expect from Kubernetes tools: YAML or JSON, several documents
/// per file, and **strict**: a field the type does not know is an error naming it, never dropped.
public enum Strict {
    /// How deeply lists and objects may nest in a YAML or JSON document (meshctl, daemons' config
    /// files and the control API all parse through here, so they share it). Decoding, comparing and
    /// freeing a tree recurse once per level, on task stacks of a few hundred KiB; 10,000 levels
    /// crashed meshctl. Kubernetes objects nest a dozen levels or so.
    public static let maxDepth = 100

    static func tooDeep(_ what: String) -> ManifestError {
        ManifestError("\(what): lists and objects nest deeper than \(Strict.maxDepth) levels")
    }

    /// Parses one or more YAML documents (`---` separated; JSON is YAML too) into value trees.
    /// Empty documents are skipped.
    public static func documents(yaml text: String) throws -> [JSONValue] {
        try YAML.parse(text)
    }

    /// Decodes `T` from a value tree, rejecting unknown fields and naming the path of any problem.
    public static func decode<T: Codable>(_ type: T.Type, from value: JSONValue) throws -> T {
        let decoded: T
        do {
            decoded = try JSONDecoder().decode(T.self, from: value.jsonData())
        } catch let error as DecodingError {
            throw ManifestError(DecodingError.describe(error))
        }
        let roundTrip = try JSONValue.parse(json: try MeshJSON.encode(decoded))
        if let unknown = Strict.unknownFields(in: value, knownBy: roundTrip, path: "").first {
            throw ManifestError("\(unknown): unknown field")
        }
        return decoded
    }

    /// Decodes `T` from JSON bytes, strictly.
    public static func decode<T: Codable>(_ type: T.Type, json data: Data) throws -> T {
        try Strict.decode(type, from: try JSONValue.parse(json: data))
    }

    /// Overlays `overrides` on `base`: objects merge member by member, anything else replaces.
    public static func merge(_ base: JSONValue, _ overrides: JSONValue) -> JSONValue {
        guard case .object(var members) = base, case .object(let over) = overrides else {
            return overrides
        }
        for (key, value) in over {
            if let i = members.firstIndex(where: { $0.0 == key }) {
                members[i].1 = Strict.merge(members[i].1, value)
            } else {
                members.append((key, value))
            }
        }
        return .object(members)
    }

    /// Members present (and not null) in `input` that `known` does not have, as paths.
    static func unknownFields(in input: JSONValue, knownBy known: JSONValue, path: String) -> [String] {
        var probes = 0
        return Strict.unknownFields(in: input, knownBy: known, path: path, probes: &probes)
    }

    /// The same, counting in `probes` the member lookups made: one per member of `input`, so the
    /// check is linear (a scan of `known` per member made 10,000 labels cost 50 million compares).
    static func unknownFields(
        in input: JSONValue,
        knownBy known: JSONValue,
        path: String,
        probes: inout Int
    )
        -> [String]
    {
        switch (input, known) {
        case (.object(let members), .object(let knownMembers)):
            var found: [String] = []
            // Small objects (most of them) are scanned; larger ones are indexed once.
            let index: [String: JSONValue]? =
                knownMembers.count > 8 ? Dictionary(knownMembers, uniquingKeysWith: { a, _ in a }) : nil
            for (key, value) in members {
                if case .null = value { continue }
                let child = path.isEmpty ? key : "\(path).\(key)"
                probes += 1
                let k = index.map { $0[key] } ?? knownMembers.first(where: { $0.0 == key })?.1
                guard let k else {
                    found.append(child)
                    continue
                }
                found += Strict.unknownFields(in: value, knownBy: k, path: child, probes: &probes)
            }
            return found
        case (.array(let items), .array(let knownItems)):
            var found: [String] = []
            for (i, item) in items.enumerated() where i < knownItems.count {
                found += Strict.unknownFields(in: item, knownBy: knownItems[i], path: "\(path)[\(i)]", probes: &probes)
            }
            return found
        default:
            return []
        }
    }
}

extension DecodingError {
    /// A one-line message naming the field path: `spec.ports[0].port: expected a number`.
    public static func describe(_ error: DecodingError) -> String {
        func path(_ keys: [any CodingKey]) -> String {
            var out = ""
            for key in keys {
                if let i = key.intValue {
                    out += "[\(i)]"
                } else {
                    out += out.isEmpty ? key.stringValue : ".\(key.stringValue)"
                }
            }
            return out.isEmpty ? "(document)" : out
        }
        func noun(_ type: Any.Type) -> String {
            switch type {
            case is String.Type: return "a string"
            case is Bool.Type: return "true or false"
            case is Int.Type, is Int64.Type, is UInt16.Type, is Double.Type, is UInt32.Type: return "a number"
            case is [Any].Type: return "a list"
            default:
                let name = "\(type)"
                if name.hasPrefix("Array") { return "a list" }
                if name.hasPrefix("Dictionary") { return "an object" }
                return "an object"
            }
        }
        switch error {
        case .keyNotFound(let key, let ctx):
            return "\(path(ctx.codingPath + [key])): required field is missing"
        case .typeMismatch(let type, let ctx):
            return "\(path(ctx.codingPath)): expected \(noun(type))"
        case .valueNotFound(let type, let ctx):
            return "\(path(ctx.codingPath)): expected \(noun(type)), found null"
        case .dataCorrupted(let ctx):
            if ctx.codingPath.isEmpty, let underlying = ctx.underlyingError {
                return "malformed JSON: \(String(describing: underlying))"
            }
            return "\(path(ctx.codingPath)): \(ctx.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }
}

/// A string enumeration decoded strictly, with an error that lists the allowed values.
public protocol StrictEnum: RawRepresentable, CaseIterable, Codable, Sendable where RawValue == String {}

extension StrictEnum {
    public init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        let raw = try container.decode(String.self)
        guard let value = Self(rawValue: raw) else {
            let allowed = Self.allCases.map(\.rawValue).joined(separator: ", ")
            throw DecodingError.dataCorruptedError(
                in: container,
                debugDescription: "\"\(raw)\" is not one of \(allowed)"
            )
        }
        self = value
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(self.rawValue)
    }
}
