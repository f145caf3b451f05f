import NIOCore

/// How an object is stored as an etcd value, a pure codec over bytes.
///
/// An object's `metadata.resourceVersion` is the etcd revision of its write, which is known only once
/// etcd has committed the transaction (another replica, or a heartbeat batch, may commit between our
/// read and our write). So the value keeps the JSON without its version, and where it goes:
///
///     [1] format (1)
///     [4] labels length L (big endian), then L bytes of labels (`key=value` lines)
///     [2] count N of version slots, then N × [4] offsets into the JSON (ascending)
///     the JSON with the version digits cut out at those offsets
///
/// Reading puts the key's `mod_revision` back in each slot. The slots are found by encoding the
/// object twice, with two versions of 19 digits that differ in every digit: the two JSONs differ
/// exactly where the version is written, wherever that is.
public enum EtcdValue {
    static let format: UInt8 = 1
    static let markerA: Int64 = 1_111_111_111_111_111_111
    static let markerB: Int64 = 2_222_222_222_222_222_222
    static let markerLength = 19

    public struct Decoded: Sendable, Equatable {
        public var labels: [String: String]
        /// The JSON without the version digits.
        public var json: [UInt8]
        public var slots: [Int]

        /// The JSON with `resourceVersion` written into every slot.
        public func json(at resourceVersion: Int64) -> ByteBuffer {
            let digits = Array(String(resourceVersion).utf8)
            var out = ByteBuffer()
            out.reserveCapacity(self.json.count + digits.count * self.slots.count)
            var from = 0
            for slot in self.slots {
                out.writeBytes(self.json[from..<slot])
                out.writeBytes(digits)
                from = slot
            }
            out.writeBytes(self.json[from...])
            return out
        }
    }

    public struct Malformed: Error, Sendable, Equatable, CustomStringConvertible {
        public var reason: String
        public init(reason: String) { self.reason = reason }
        public var description: String { "malformed stored value: \(self.reason)" }
    }

    /// Encodes an object whose JSON `render` writes for a given version.
    public static func encode(
        labels: [String: String],
        render: (Int64) throws -> ByteBuffer
    ) throws -> [UInt8] {
        let (json, slots) = try Self.split(render: render)
        return Self.encode(Decoded(labels: labels, json: json, slots: slots))
    }

    /// The JSON `render` writes, without its version digits, and where they were.
    public static func split(render: (Int64) throws -> ByteBuffer) throws -> (json: [UInt8], slots: [Int]) {
        let a = Array(try render(Self.markerA).readableBytesView)
        let b = Array(try render(Self.markerB).readableBytesView)
        guard a.count == b.count else {
            throw Malformed(reason: "the object's JSON changes length with its version beyond the version digits")
        }
        let digitsA = Array(String(Self.markerA).utf8)
        let digitsB = Array(String(Self.markerB).utf8)
        var json: [UInt8] = []
        json.reserveCapacity(a.count)
        var slots: [Int] = []
        var i = 0
        while i < a.count {
            if a[i] == b[i] {
                json.append(a[i])
                i += 1
                continue
            }
            guard i + Self.markerLength <= a.count, a[i..<i + Self.markerLength].elementsEqual(digitsA),
                b[i..<i + Self.markerLength].elementsEqual(digitsB)
            else { throw Malformed(reason: "the object's JSON differs between two renderings beyond its version") }
            slots.append(json.count)
            i += Self.markerLength
        }
        return (json, slots)
    }

    public static func encode(_ d: Decoded) -> [UInt8] {
        let labels = Array(Labels.encode(d.labels).utf8)
        var out: [UInt8] = [Self.format]
        out.reserveCapacity(1 + 4 + labels.count + 2 + 4 * d.slots.count + d.json.count)
        Self.append(UInt32(labels.count), to: &out)
        out += labels
        out.append(UInt8(d.slots.count >> 8))
        out.append(UInt8(d.slots.count & 0xff))
        for s in d.slots { Self.append(UInt32(s), to: &out) }
        out += d.json
        return out
    }

    private static func append(_ v: UInt32, to out: inout [UInt8]) {
        out += [UInt8(v >> 24), UInt8((v >> 16) & 0xff), UInt8((v >> 8) & 0xff), UInt8(v & 0xff)]
    }

    /// Decodes a stored value; any inconsistency is an error, never a crash.
    public static func decode(_ bytes: [UInt8]) throws(Malformed) -> Decoded {
        var i = 0
        func u32() throws(Malformed) -> Int {
            guard i + 4 <= bytes.count else { throw Malformed(reason: "truncated at byte \(i)") }
            defer { i += 4 }
            return Int(bytes[i]) << 24 | Int(bytes[i + 1]) << 16 | Int(bytes[i + 2]) << 8 | Int(bytes[i + 3])
        }
        guard let first = bytes.first else { throw Malformed(reason: "empty") }
        guard first == Self.format else { throw Malformed(reason: "unknown format \(first)") }
        i = 1
        let labelLength = try u32()
        guard labelLength <= bytes.count - i else { throw Malformed(reason: "labels run past the end") }
        let labelText = String(decoding: bytes[i..<i + labelLength], as: UTF8.self)
        i += labelLength
        guard i + 2 <= bytes.count else { throw Malformed(reason: "truncated at byte \(i)") }
        let count = Int(bytes[i]) << 8 | Int(bytes[i + 1])
        i += 2
        var slots: [Int] = []
        for _ in 0..<count { slots.append(try u32()) }
        let json = Array(bytes[i...])
        var previous = 0
        for s in slots {
            guard s >= previous, s <= json.count else { throw Malformed(reason: "version slot \(s) out of order") }
            previous = s
        }
        return Decoded(labels: Labels.decode(labelText), json: json, slots: slots)
    }
}
