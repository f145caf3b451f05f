#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// JSON text (RFC 8259) to a `JSONValue`, one pass over the bytes: a pure function, no Foundation decoder.
///
/// It replaced a `Decodable` walk through `JSONDecoder` that found each value's type by trying them in turn,
/// one thrown `DecodingError` per wrong guess: two parses of every control-API body (the strict check parses
/// the input and the typed round trip) were a tenth of the control plane's CPU for a small workload report.
///
/// What it accepts is what that decoder accepted: any value at the top (surrounded by whitespace), one
/// trailing comma in an object or a list, strict grammar otherwise (no comments, no leading zeros, no `NaN`,
/// no empty elements), strings of valid UTF-8 without raw control characters, `\u` escapes with surrogates in
/// pairs. A number without fraction or
/// exponent that fits is `.int`; any other number is `.int` too when its value is a whole number that fits
/// (as that decoder read `1.0` or `1e3` into an integer), else `.double`. An object's members are sorted by
/// name; of a repeated name the first is kept. Nesting deeper than `Strict.maxDepth` is refused when reached,
/// so the recursion is bounded.
enum JSONParser {
    struct Failure: Error, CustomStringConvertible {
        var message: String
        var offset: Int
        /// Nested deeper than `Strict.maxDepth`.
        var tooDeep = false
        var description: String { "\(self.message) at byte \(self.offset)" }
    }

    static func parse(_ data: Data) throws(Failure) -> JSONValue {
        let result: Result<JSONValue, Failure> = data.withUnsafeBytes { raw in
            var p = Parser(bytes: raw)
            return Result { () throws(Failure) -> JSONValue in
                p.skipSpace()
                let v = try p.value(depth: 0)
                p.skipSpace()
                guard p.at == raw.count else { throw p.fail("unexpected text after the value") }
                return v
            }
        }
        return try result.get()
    }

    struct Parser {
        let bytes: UnsafeRawBufferPointer
        var at = 0

        init(bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

        func fail(_ message: String) -> Failure { Failure(message: message, offset: self.at) }

        var peek: UInt8? { self.at < self.bytes.count ? self.bytes[self.at] : nil }

        mutating func skipSpace() {
            while let b = self.peek, b == 0x20 || b == 0x0A || b == 0x0D || b == 0x09 { self.at += 1 }
        }

        /// Steps over an object's or a list's opening, refusing it past `Strict.maxDepth`; true when `closing`
        /// follows at once (it is empty, and stepped over).
        mutating func opens(depth: Int, closing: UInt8) throws(Failure) -> Bool {
            guard depth <= Strict.maxDepth else {
                throw Failure(message: "nested too deeply", offset: self.at, tooDeep: true)
            }
            self.at += 1
            return self.closes(closing)
        }

        /// Whether `closing` comes next (after space); it is stepped over if so.
        mutating func closes(_ closing: UInt8) -> Bool {
            self.skipSpace()
            guard self.peek == closing else { return false }
            self.at += 1
            return true
        }

        /// After a member of an object or a list: a comma (more follow) or `close` (the end, stepped over).
        mutating func endsAfterMember(_ close: UInt8) throws(Failure) -> Bool {
            self.skipSpace()
            switch self.peek {
            case UInt8(ascii: ","):
                self.at += 1
                return false
            case close:
                self.at += 1
                return true
            case nil: throw self.fail("unexpected end of input")
            default: throw self.fail("expected ',' or '\(Character(Unicode.Scalar(close)))'")
            }
        }

        mutating func expect(_ word: StaticString) throws(Failure) {
            let n = word.utf8CodeUnitCount
            guard self.at + n <= self.bytes.count else { throw self.fail("unexpected end of input") }
            let w = word.utf8Start
            for i in 0..<n where self.bytes[self.at + i] != w[i] { throw self.fail("unexpected character") }
            self.at += n
        }

        mutating func value(depth: Int) throws(Failure) -> JSONValue {
            guard let b = self.peek else { throw self.fail("unexpected end of input") }
            switch b {
            case UInt8(ascii: "\""): return .string(try self.string())
            case UInt8(ascii: "{"): return try self.object(depth: depth + 1)
            case UInt8(ascii: "["): return try self.array(depth: depth + 1)
            case UInt8(ascii: "t"):
                try self.expect("true")
                return .bool(true)
            case UInt8(ascii: "f"):
                try self.expect("false")
                return .bool(false)
            case UInt8(ascii: "n"):
                try self.expect("null")
                return .null
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try self.number()
            default: throw self.fail("unexpected character")
            }
        }

        mutating func object(depth: Int) throws(Failure) -> JSONValue {
            if try self.opens(depth: depth, closing: UInt8(ascii: "}")) { return .object([]) }
            var members: [(String, JSONValue)] = []
            while true {
                // One trailing comma, as Foundation's decoder takes it.
                if !members.isEmpty, self.closes(UInt8(ascii: "}")) { return .object(Self.sorted(members)) }
                guard self.peek == UInt8(ascii: "\"") else { throw self.fail("expected a member name") }
                let key = try self.string()
                self.skipSpace()
                guard self.peek == UInt8(ascii: ":") else { throw self.fail("expected ':'") }
                self.at += 1
                self.skipSpace()
                members.append((key, try self.value(depth: depth)))
                if try self.endsAfterMember(UInt8(ascii: "}")) { return .object(Self.sorted(members)) }
            }
        }

        /// Members by name; of a repeated name, the first (as Foundation's decoder reads it).
        static func sorted(_ members: [(String, JSONValue)]) -> [(String, JSONValue)] {
            if members.count < 2 { return members }
            let ordered = members.enumerated().sorted { a, b in
                a.element.0 != b.element.0 ? a.element.0 < b.element.0 : a.offset < b.offset
            }
            var out: [(String, JSONValue)] = []
            out.reserveCapacity(members.count)
            for (_, m) in ordered where out.last?.0 != m.0 { out.append(m) }
            return out
        }

        mutating func array(depth: Int) throws(Failure) -> JSONValue {
            if try self.opens(depth: depth, closing: UInt8(ascii: "]")) { return .array([]) }
            var items: [JSONValue] = []
            while true {
                if !items.isEmpty, self.closes(UInt8(ascii: "]")) { return .array(items) }
                items.append(try self.value(depth: depth))
                if try self.endsAfterMember(UInt8(ascii: "]")) { return .array(items) }
            }
        }

        mutating func string() throws(Failure) -> String {
            self.at += 1  // the opening quote
            let start = self.at
            // The common case: no escape; the bytes are the string.
            while let b = self.peek {
                if b == UInt8(ascii: "\"") {
                    let s = try self.text(start, self.at)
                    self.at += 1
                    return s
                }
                if b == UInt8(ascii: "\\") { break }
                guard b >= 0x20 else { throw self.fail("control character in a string") }
                self.at += 1
            }
            guard self.peek != nil else { throw self.fail("unterminated string") }
            var out = try self.text(start, self.at)
            var run = self.at
            while let b = self.peek {
                switch b {
                case UInt8(ascii: "\""):
                    out += try self.text(run, self.at)
                    self.at += 1
                    return out
                case UInt8(ascii: "\\"):
                    out += try self.text(run, self.at)
                    self.at += 1
                    try self.escape(into: &out)
                    run = self.at
                case 0..<0x20:
                    throw self.fail("control character in a string")
                default:
                    self.at += 1
                }
            }
            throw self.fail("unterminated string")
        }

        func text(_ from: Int, _ to: Int) throws(Failure) -> String {
            if from == to { return "" }
            let slice = UnsafeRawBufferPointer(rebasing: self.bytes[from..<to])
            guard let s = String(validating: slice, as: UTF8.self) else {
                throw Failure(message: "invalid UTF-8 in a string", offset: from)
            }
            return s
        }

        mutating func escape(into out: inout String) throws(Failure) {
            guard let e = self.peek else { throw self.fail("unterminated string") }
            self.at += 1
            switch e {
            case UInt8(ascii: "\""): out += "\""
            case UInt8(ascii: "\\"): out += "\\"
            case UInt8(ascii: "/"): out += "/"
            case UInt8(ascii: "b"): out += "\u{08}"
            case UInt8(ascii: "f"): out += "\u{0C}"
            case UInt8(ascii: "n"): out += "\n"
            case UInt8(ascii: "r"): out += "\r"
            case UInt8(ascii: "t"): out += "\t"
            case UInt8(ascii: "u"):
                let first = try self.hex4()
                var scalar: UInt32 = first
                if (0xD800..<0xDC00).contains(first) {
                    guard self.peek == UInt8(ascii: "\\") else { throw self.fail("unpaired surrogate in \\u escape") }
                    self.at += 1
                    guard self.peek == UInt8(ascii: "u") else { throw self.fail("unpaired surrogate in \\u escape") }
                    self.at += 1
                    let second = try self.hex4()
                    guard (0xDC00..<0xE000).contains(second) else {
                        throw self.fail("unpaired surrogate in \\u escape")
                    }
                    scalar = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                } else if (0xDC00..<0xE000).contains(first) {
                    throw self.fail("unpaired surrogate in \\u escape")
                }
                guard let u = Unicode.Scalar(scalar) else { throw self.fail("invalid \\u escape") }
                out.unicodeScalars.append(u)
            default:
                self.at -= 1
                throw self.fail("invalid escape")
            }
        }

        mutating func hex4() throws(Failure) -> UInt32 {
            var v: UInt32 = 0
            for _ in 0..<4 {
                guard let b = self.peek else { throw self.fail("unterminated string") }
                let d: UInt8
                switch b {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): d = b - UInt8(ascii: "0")
                case UInt8(ascii: "a")...UInt8(ascii: "f"): d = b - UInt8(ascii: "a") + 10
                case UInt8(ascii: "A")...UInt8(ascii: "F"): d = b - UInt8(ascii: "A") + 10
                default: throw self.fail("invalid \\u escape")
                }
                v = v << 4 | UInt32(d)
                self.at += 1
            }
            return v
        }

        mutating func digits() -> Int {
            let start = self.at
            while let b = self.peek, b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9") { self.at += 1 }
            return self.at - start
        }

        mutating func number() throws(Failure) -> JSONValue {
            let start = self.at
            if self.peek == UInt8(ascii: "-") { self.at += 1 }
            guard let first = self.peek, first >= UInt8(ascii: "0"), first <= UInt8(ascii: "9") else {
                throw self.fail("expected a digit")
            }
            if first == UInt8(ascii: "0") {
                self.at += 1
                if let b = self.peek, b >= UInt8(ascii: "0"), b <= UInt8(ascii: "9") {
                    throw self.fail("leading zero in a number")
                }
            } else {
                _ = self.digits()
            }
            var whole = true
            if self.peek == UInt8(ascii: ".") {
                self.at += 1
                guard self.digits() > 0 else { throw self.fail("expected a digit after '.'") }
                whole = false
            }
            if self.peek == UInt8(ascii: "e") || self.peek == UInt8(ascii: "E") {
                self.at += 1
                if self.peek == UInt8(ascii: "+") || self.peek == UInt8(ascii: "-") { self.at += 1 }
                guard self.digits() > 0 else { throw self.fail("expected a digit in the exponent") }
                whole = false
            }
            let literal = String(decoding: UnsafeRawBufferPointer(rebasing: self.bytes[start..<self.at]), as: UTF8.self)
            if whole, let i = Int64(literal) { return .int(i) }
            guard let d = Double(literal), d.isFinite else {
                throw Failure(message: "number out of range", offset: start)
            }
            if let i = Int64(exactly: d) { return .int(i) }
            return .double(d)
        }
    }
}

// MARK: - Reading a few strings without building the rest

extension JSONParser {
    /// The strings at a few member paths of a JSON document (`[["type"], ["object", "kind"]]`), in one pass that
    /// builds nothing else: every other value is checked and stepped over. It accepts and refuses exactly what
    /// `parse` does (with the same failure), and reads what a lookup in `parse`'s tree would: the first of a
    /// repeated name, and nil where the path is missing or ends on anything but a string.
    static func strings(at paths: [[String]], in bytes: UnsafeRawBufferPointer) throws(Failure) -> [String?] {
        var p = Parser(bytes: bytes)
        var found = [String?](repeating: nil, count: paths.count)
        let wanted = paths.enumerated().map { Wanted(slot: $0.offset, path: $0.element[...]) }
        p.skipSpace()
        if p.peek == UInt8(ascii: "{") {
            try p.skimObject(depth: 1, wanted: wanted, into: &found)
        } else {
            try p.skip(depth: 0)
        }
        p.skipSpace()
        guard p.at == bytes.count else { throw p.fail("unexpected text after the value") }
        return found
    }

    /// A path still to follow, and where its string goes.
    struct Wanted {
        var slot: Int
        var path: ArraySlice<String>
    }
}

extension JSONParser.Parser {
    /// Checks one value and steps over it.
    mutating func skip(depth: Int) throws(JSONParser.Failure) {
        switch self.peek {
        case UInt8(ascii: "\""): _ = try self.skipString()
        case UInt8(ascii: "{"):
            var none: [String?] = []
            try self.skimObject(depth: depth + 1, wanted: [], into: &none)
        case UInt8(ascii: "["): try self.skipArray(depth: depth + 1)
        default: _ = try self.value(depth: depth)  // a literal or a number: nothing to allocate
        }
    }

    /// Checks a string and steps over it; returns where its bytes are when it has no escape.
    mutating func skipString() throws(JSONParser.Failure) -> Range<Int>? {
        let open = self.at
        self.at += 1
        let start = self.at
        var ascii = true
        while let b = self.peek {
            if b == UInt8(ascii: "\"") {
                if !ascii { _ = try self.text(start, self.at) }  // only to check the UTF-8
                self.at += 1
                return start..<(self.at - 1)
            }
            if b == UInt8(ascii: "\\") { break }
            guard b >= 0x20 else { throw self.fail("control character in a string") }
            if b >= 0x80 { ascii = false }
            self.at += 1
        }
        guard self.peek != nil else { throw self.fail("unterminated string") }
        // An escape: the full reader checks it (rare in what the mesh writes).
        self.at = open
        _ = try self.string()
        return nil
    }

    mutating func skipArray(depth: Int) throws(JSONParser.Failure) {
        if try self.opens(depth: depth, closing: UInt8(ascii: "]")) { return }
        var any = false
        while true {
            if any, self.closes(UInt8(ascii: "]")) { return }
            try self.skip(depth: depth)
            any = true
            if try self.endsAfterMember(UInt8(ascii: "]")) { return }
        }
    }

    /// An object, following the wanted paths into it (none: only checked and stepped over); the strings they
    /// end on go into `found` at their slots.
    mutating func skimObject(
        depth: Int,
        wanted: [JSONParser.Wanted],
        into found: inout [String?]
    ) throws(JSONParser.Failure) {
        if try self.opens(depth: depth, closing: UInt8(ascii: "}")) { return }
        // The wanted paths' first names; each is read at its first appearance only, as `parse` keeps the first.
        var names: [String] = []
        for w in wanted where !names.contains(w.path.first!) { names.append(w.path.first!) }
        precondition(names.count <= Int.bitWidth, "at most \(Int.bitWidth) names per object")
        var taken = 0  // bit i: names[i] was met
        var any = false
        while true {
            if any, self.closes(UInt8(ascii: "}")) { return }
            guard self.peek == UInt8(ascii: "\"") else { throw self.fail("expected a member name") }
            let match = try self.name(among: names)
            self.skipSpace()
            guard self.peek == UInt8(ascii: ":") else { throw self.fail("expected ':'") }
            self.at += 1
            self.skipSpace()
            if let i = match, taken & (1 << i) == 0 {
                taken |= 1 << i
                let here = wanted.filter { $0.path.first == names[i] }
                let deeper = here.filter { $0.path.count > 1 }.map {
                    JSONParser.Wanted(slot: $0.slot, path: $0.path.dropFirst())
                }
                switch self.peek {
                case UInt8(ascii: "\"") where here.contains(where: { $0.path.count == 1 }):
                    let s = try self.string()
                    for w in here where w.path.count == 1 { found[w.slot] = s }
                case UInt8(ascii: "{") where !deeper.isEmpty:
                    try self.skimObject(depth: depth + 1, wanted: deeper, into: &found)
                default:
                    try self.skip(depth: depth)
                }
            } else {
                try self.skip(depth: depth)
            }
            any = true
            if try self.endsAfterMember(UInt8(ascii: "}")) { return }
        }
    }

    /// Reads a member name; returns the index of the name it equals, if any, without building a string
    /// unless it has an escape.
    mutating func name(among names: [String]) throws(JSONParser.Failure) -> Int? {
        let open = self.at
        let raw = try self.skipString()
        if names.isEmpty { return nil }
        guard let raw else {
            self.at = open
            let s = try self.string()
            return names.firstIndex(of: s)
        }
        let bytes = UnsafeRawBufferPointer(rebasing: self.bytes[raw])
        if bytes.contains(where: { $0 >= 0x80 }) {
            // Names compare as Swift strings do, canonically ("\u{212A}" is "K"), as in `parse`'s tree.
            return names.firstIndex(of: String(decoding: bytes, as: UTF8.self))
        }
        return names.firstIndex { $0.utf8.count == bytes.count && $0.utf8.elementsEqual(bytes) }
    }
}
