import NIOCore

extension HTTPHead {
    /// The consistent-hash key of a request taken from its fields, as bytes (no strings): the value of the
    /// first field called `header`, or the value of the cookie `cookie` (`name=value` pairs separated by `;`
    /// in the Cookie fields, spaces around them ignored). Nil when the request has none: the caller falls back
    /// to the client's address. Equal to `StableHash.hash` of the value as a string.
    func hashKey(_ key: HashKey) -> UInt64? {
        switch key {
        case .header(let name):
            for index in self.fields.indices where self.field(index, isNamed: name) {
                return self.bytes.withUnsafeReadableBytes { StableHash.hash($0[self.fields[index].value]) }
            }
            return nil
        case .cookie(let name):
            return self.bytes.withUnsafeReadableBytes { raw -> UInt64? in
                for index in self.fields.indices where self.field(index, is: "cookie") {
                    if let value = Self.cookie(named: name, in: raw, self.fields[index].value) {
                        return StableHash.hash(raw[value])
                    }
                }
                return nil
            }
        case .sourceIP:
            return nil
        }
    }

    /// The value of the cookie `name` in a Cookie field value (`a=1; b=2`), as a range of `raw`.
    static func cookie(named name: String, in raw: UnsafeRawBufferPointer, _ value: Range<Int>) -> Range<Int>? {
        var start = value.lowerBound
        while start < value.upperBound {
            var end = start
            while end < value.upperBound, raw[end] != UInt8(ascii: ";") { end += 1 }
            var a = start
            while a < end, raw[a] == HTTPBytes.space { a += 1 }
            if let equals = HTTPBytes.find(UInt8(ascii: "="), in: raw, from: a), equals < end {
                var nameEnd = equals
                while nameEnd > a, raw[nameEnd - 1] == HTTPBytes.space { nameEnd -= 1 }
                if HTTPBytes.equalsExactly(raw, a..<nameEnd, name) {
                    var v = equals + 1
                    var w = end
                    while v < w, raw[v] == HTTPBytes.space { v += 1 }
                    while w > v, raw[w - 1] == HTTPBytes.space { w -= 1 }
                    return v..<w
                }
            }
            start = end + 1
        }
        return nil
    }
}

extension HTTPBytes {
    /// Whether `raw[range]` is `text`, byte for byte (cookie names are case-sensitive).
    static func equalsExactly(_ raw: UnsafeRawBufferPointer, _ range: Range<Int>, _ text: String) -> Bool {
        range.count == text.utf8.count && zip(raw[range], text.utf8).allSatisfy { $0 == $1 }
    }
}
