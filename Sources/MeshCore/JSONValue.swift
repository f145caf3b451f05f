#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A JSON document as a value tree, keeping object members in their order.
///
/// Used where the shape is not known up front: converting YAML manifests to JSON, and checking a
/// request for fields that its typed decoding would silently drop (strict decoding).
public enum JSONValue: Sendable, Hashable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): return true
        case (.bool(let a), .bool(let b)): return a == b
        case (.int(let a), .int(let b)): return a == b
        case (.double(let a), .double(let b)): return a == b
        case (.int(let a), .double(let b)), (.double(let b), .int(let a)): return Double(a) == b
        case (.string(let a), .string(let b)): return a == b
        case (.array(let a), .array(let b)): return a == b
        case (.object(let a), .object(let b)):
            guard a.count == b.count else { return false }
            let bd = Dictionary(b, uniquingKeysWith: { x, _ in x })
            return a.allSatisfy { k, v in bd[k] == v }
        default: return false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case .null: hasher.combine(0)
        case .bool(let b): hasher.combine(b)
        case .int(let i): hasher.combine(Double(i))
        case .double(let d): hasher.combine(d)
        case .string(let s): hasher.combine(s)
        case .array(let a): hasher.combine(a)
        case .object(let o): hasher.combine(o.count)
        }
    }

    /// The member named `key` of an object.
    public subscript(key: String) -> JSONValue? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.0 == key }?.1
    }

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    /// A short name of the value's type, for error messages.
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "boolean"
        case .int, .double: return "number"
        case .string: return "string"
        case .array: return "list"
        case .object: return "object"
        }
    }
}

extension JSONValue {
    /// Parses JSON text (`JSONParser`). Throws `ManifestError` with a readable message when it is not JSON.
    public static func parse(json data: Data) throws -> JSONValue {
        do {
            return try JSONParser.parse(data)
        } catch  where error.tooDeep {
            throw Strict.tooDeep("malformed JSON")
        } catch {
            throw ManifestError("malformed JSON: \(error)")
        }
    }

    /// The strings at a few member paths of a JSON document (`[["type"], ["object", "kind"]]`), without
    /// building the rest (`JSONParser.strings`): nil where a path is missing or ends on anything but a string.
    /// Refuses what `parse(json:)` refuses, with the same error. A watch line's type and version, read before
    /// the kind's own decoder takes the line, cost a step over its bytes instead of a second full decode.
    public static func strings(at paths: [[String]], in bytes: UnsafeRawBufferPointer) throws -> [String?] {
        do {
            return try JSONParser.strings(at: paths, in: bytes)
        } catch  where error.tooDeep {
            throw Strict.tooDeep("malformed JSON")
        } catch {
            throw ManifestError("malformed JSON: \(error)")
        }
    }

    /// Serialises to compact JSON, members in order.
    public func jsonData() -> Data {
        var out = ""
        self.write(to: &out)
        return Data(out.utf8)
    }

    func write(to out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d): out += d.isFinite ? "\(d)" : "null"
        case .string(let s): JSONValue.writeString(s, to: &out)
        case .array(let a):
            out += "["
            for (i, v) in a.enumerated() {
                if i > 0 { out += "," }
                v.write(to: &out)
            }
            out += "]"
        case .object(let o):
            out += "{"
            for (i, (k, v)) in o.enumerated() {
                if i > 0 { out += "," }
                JSONValue.writeString(k, to: &out)
                out += ":"
                v.write(to: &out)
            }
            out += "}"
        }
    }

    static func writeString(_ s: String, to out: inout String) {
        out += "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(u)
            }
        }
        out += "\""
    }
}

/// JSON as the mesh writes it: members sorted by name (stable bytes, `apiVersion, kind, metadata,
/// spec` first for objects), slashes unescaped.
public enum MeshJSON {
    public static func encode(_ value: some Encodable) throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return try encoder.encode(value)
    }
}
