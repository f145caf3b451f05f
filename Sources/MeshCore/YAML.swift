import CYAML

/// YAML for manifests and config files, on libyaml (Debian's libyaml): documents are parsed into
/// `JSONValue` trees with the YAML 1.2 core schema (so `no` stays a string, `"80"` stays a
/// string, `80` is a number), and trees are written back as block-style YAML.
public enum YAML {
    /// Every document of `text` (`---` separated), empty documents as `.null`.
    public static func parse(_ text: String) throws -> [JSONValue] {
        var parser = yaml_parser_t()
        guard yaml_parser_initialize(&parser) == 1 else { throw ManifestError("malformed YAML: out of memory") }
        defer { yaml_parser_delete(&parser) }
        let bytes = Array(text.utf8)
        return try bytes.withUnsafeBufferPointer { buffer in
            yaml_parser_set_input_string(&parser, buffer.baseAddress, buffer.count)
            var builder = TreeBuilder()
            while true {
                var event = yaml_event_t()
                guard yaml_parser_parse(&parser, &event) == 1 else { throw Self.error(parser) }
                defer { yaml_event_delete(&event) }
                if event.type == YAML_STREAM_END_EVENT { break }
                try builder.handle(event)
            }
            return builder.documents
        }
    }

    static func error(_ parser: yaml_parser_t) -> ManifestError {
        let problem = parser.problem.map { String(cString: $0) } ?? "cannot be parsed"
        let context = parser.context.map { String(cString: $0) + " " } ?? ""
        let mark = parser.problem_mark
        return ManifestError("malformed YAML: line \(mark.line + 1) column \(mark.column + 1): \(context)\(problem)")
    }

    /// Builds value trees from parser events.
    struct TreeBuilder {
        enum Frame {
            case sequence([JSONValue])
            case mapping([(String, JSONValue)], key: String?, keys: Set<String>)
        }

        var stack: [Frame] = []
        var documents: [JSONValue] = []
        var current: JSONValue?

        mutating func handle(_ event: yaml_event_t) throws {
            let line = event.start_mark.line + 1
            let column = event.start_mark.column + 1
            func at(_ message: String) -> ManifestError { ManifestError("line \(line) column \(column): \(message)") }
            switch event.type {
            case YAML_DOCUMENT_START_EVENT:
                self.current = nil
            case YAML_DOCUMENT_END_EVENT:
                self.documents.append(self.current ?? .null)
                self.current = nil
            case YAML_SEQUENCE_START_EVENT:
                guard self.stack.count < Strict.maxDepth else { throw Strict.tooDeep("line \(line) column \(column)") }
                self.stack.append(.sequence([]))
            case YAML_MAPPING_START_EVENT:
                guard self.stack.count < Strict.maxDepth else { throw Strict.tooDeep("line \(line) column \(column)") }
                self.stack.append(.mapping([], key: nil, keys: []))
            case YAML_SEQUENCE_END_EVENT:
                guard case .sequence(let items) = self.stack.popLast() else { throw at("unbalanced sequence") }
                try self.add(.array(items), at: at)
            case YAML_MAPPING_END_EVENT:
                guard case .mapping(let members, let key, _) = self.stack.popLast(), key == nil else {
                    throw at("a mapping key has no value")
                }
                try self.add(.object(members), at: at)
            case YAML_SCALAR_EVENT:
                let s = event.data.scalar
                let text = String(decoding: UnsafeBufferPointer(start: s.value, count: s.length), as: UTF8.self)
                let tag = s.tag.map { String(cString: $0) }
                let plain = s.style == YAML_PLAIN_SCALAR_STYLE
                // A scalar in key position stays text, whatever it looks like.
                if case .mapping(_, nil, _) = self.stack.last {
                    try self.add(.string(text), at: at)
                } else {
                    try self.add(try YAML.resolve(text, tag: tag, plain: plain, at: at), at: at)
                }
            case YAML_ALIAS_EVENT:
                throw at("YAML aliases are not supported")
            default:
                break
            }
        }

        mutating func add(_ value: JSONValue, at: (String) -> ManifestError) throws {
            guard let top = self.stack.popLast() else {
                self.current = value
                return
            }
            switch top {
            case .sequence(var items):
                items.append(value)
                self.stack.append(.sequence(items))
            case .mapping(var members, let key, var keys):
                if let key {
                    members.append((key, value))
                    self.stack.append(.mapping(members, key: nil, keys: keys))
                } else {
                    guard case .string(let k) = value else { throw at("mapping keys must be plain strings") }
                    guard keys.insert(k).inserted else { throw at("duplicate key \"\(k)\"") }
                    self.stack.append(.mapping(members, key: k, keys: keys))
                }
            }
        }
    }

    /// The YAML 1.2 core schema: what a plain scalar means; quoted and block scalars are strings.
    static func resolve(_ text: String, tag: String?, plain: Bool, at: (String) -> ManifestError) throws -> JSONValue {
        let core = "tag:yaml.org,2002:"
        switch tag {
        case "\(core)str": return .string(text)
        case "\(core)null": return .null
        case "\(core)bool":
            guard let b = Self.bool(text) else { throw at("\"\(text)\" is not a boolean") }
            return .bool(b)
        case "\(core)int":
            guard let i = Self.int(text) else { throw at("\"\(text)\" is not an integer (or is out of range)") }
            return .int(i)
        case "\(core)float":
            guard let d = Self.float(text) ?? Self.int(text).map(Double.init) else {
                throw at("\"\(text)\" is not a number")
            }
            return .double(d)
        case .some(let other) where other != "!":
            throw at("unsupported tag \(other)")
        default:
            break
        }
        guard plain, tag == nil else { return .string(text) }
        if ["", "~", "null", "Null", "NULL"].contains(text) { return .null }
        if let b = Self.bool(text) { return .bool(b) }
        if Self.looksInteger(text) {
            guard let i = Self.int(text) else { throw at("integer \(text) is out of range") }
            return .int(i)
        }
        if let d = Self.float(text) { return .double(d) }
        return .string(text)
    }

    static func bool(_ s: String) -> Bool? {
        switch s {
        case "true", "True", "TRUE": return true
        case "false", "False", "FALSE": return false
        default: return nil
        }
    }

    static func looksInteger(_ s: String) -> Bool {
        var u = Substring(s)
        if u.hasPrefix("0x") || u.hasPrefix("0o") { return u.count > 2 && u.dropFirst(2).allSatisfy(\.isHexDigit) }
        if u.first == "-" || u.first == "+" { u = u.dropFirst() }
        return !u.isEmpty && u.allSatisfy { $0.isASCII && $0.isNumber }
    }

    static func int(_ s: String) -> Int64? {
        if s.hasPrefix("0x") { return Int64(s.dropFirst(2), radix: 16) }
        if s.hasPrefix("0o") { return Int64(s.dropFirst(2), radix: 8) }
        return Int64(s.hasPrefix("+") ? String(s.dropFirst()) : s)
    }

    /// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, `.inf`, `.nan`.
    static func float(_ s: String) -> Double? {
        switch s {
        case ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF": return .infinity
        case "-.inf", "-.Inf", "-.INF": return -.infinity
        case ".nan", ".NaN", ".NAN": return .nan
        default: break
        }
        var u = Substring(s)
        if u.first == "-" || u.first == "+" { u = u.dropFirst() }
        let mantissa = u.prefix { $0 != "e" && $0 != "E" }
        var exponent = u.dropFirst(mantissa.count)
        let parts = mantissa.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        let digits = { (p: Substring) in p.allSatisfy { $0.isASCII && $0.isNumber } }
        guard !mantissa.isEmpty, parts.allSatisfy(digits), parts.contains(where: { !$0.isEmpty }) else { return nil }
        if !exponent.isEmpty {
            exponent = exponent.dropFirst()
            if exponent.first == "-" || exponent.first == "+" { exponent = exponent.dropFirst() }
            guard !exponent.isEmpty, digits(exponent) else { return nil }
        }
        return Double(s)
    }
}

extension YAML {
    /// Block-style YAML of a value, as kubectl writes it (list items at their key's indentation).
    public static func emit(_ value: JSONValue) -> String {
        var out = ""
        switch value {
        case .object(let o) where !o.isEmpty: Self.members(o, indent: 0, into: &out)
        case .array(let a) where !a.isEmpty: Self.items(a, indent: 0, into: &out)
        default: out = Self.scalar(value) + "\n"
        }
        return out
    }

    private static func members(_ members: [(String, JSONValue)], indent: Int, into out: inout String) {
        let pad = String(repeating: " ", count: indent)
        for (key, value) in members {
            out += pad + Self.quoteIfNeeded(key) + ":"
            switch value {
            case .object(let o) where !o.isEmpty:
                out += "\n"
                Self.members(o, indent: indent + 2, into: &out)
            case .array(let a) where !a.isEmpty:
                out += "\n"
                Self.items(a, indent: indent, into: &out)
            default:
                out += " " + Self.scalar(value) + "\n"
            }
        }
    }

    private static func items(_ items: [JSONValue], indent: Int, into out: inout String) {
        let pad = String(repeating: " ", count: indent)
        for item in items {
            switch item {
            case .object(let o) where !o.isEmpty:
                // The first member on the dash's line, the others under it.
                var nested = ""
                Self.members(o, indent: indent + 2, into: &nested)
                out += pad + "- " + nested.dropFirst(indent + 2)
            case .array(let a) where !a.isEmpty:
                out += pad + "-\n"
                Self.items(a, indent: indent + 2, into: &out)
            default:
                out += pad + "- " + Self.scalar(item) + "\n"
            }
        }
    }

    private static func scalar(_ value: JSONValue) -> String {
        switch value {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int(let i): return String(i)
        case .double(let d):
            if d.isNaN { return ".nan" }
            if d.isInfinite { return d < 0 ? "-.inf" : ".inf" }
            return "\(d)"
        case .string(let s): return Self.quoteIfNeeded(s)
        case .array: return "[]"
        case .object: return "{}"
        }
    }

    /// Plain when the text reads back as the same string; double-quoted (JSON escapes) otherwise.
    static func quoteIfNeeded(_ s: String) -> String {
        let special: Set<Character> = [
            "-", "?", ":", ",", "[", "]", "{", "}", "#", "&", "*", "!", "|", ">", "'", "\"", "%", "@", "`",
        ]
        var needs = s.isEmpty || s.first == " " || s.last == " " || special.contains(s.first!)
        needs = needs || s.contains(": ") || s.contains(" #") || s.hasSuffix(":")
        needs = needs || s.unicodeScalars.contains { $0.value < 0x20 || $0.value == 0x7f }
        if !needs, let resolved = try? Self.resolve(s, tag: nil, plain: true, at: { ManifestError($0) }) {
            needs = resolved != .string(s)
        }
        guard needs else { return s }
        var out = ""
        JSONValue.writeString(s, to: &out)
        return out
    }
}
