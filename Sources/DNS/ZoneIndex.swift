#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The zone's owner names → node numbers: open addressing over one flat byte array of names.
///
/// The answer path looks a name up once or twice per query. A `Dictionary<[UInt8], ZoneNode>` hashes the
/// key byte by byte through SipHash (~700 instructions for a 30-byte name, callgrind) and holds an array
/// object per name; here a name costs a multiply and a shift per 8 bytes to hash and no object of its own.
/// The hash is seeded per zone (a random seed), so a crafted set of service names cannot line up on one
/// probe chain that a builder could predict.
struct ZoneNameIndex: Sendable {
    /// Node number + 1 per slot; 0 is an empty slot. A power-of-two count, at most half full.
    private let slots: [UInt32]
    private let mask: Int
    /// Every name's lowercase wire form, back to back; name `i` is `bytes[starts[i]..<starts[i + 1]]`.
    private let bytes: [UInt8]
    private let starts: [UInt32]
    private let hashes: [UInt64]
    private let seed: UInt64

    var count: Int { self.hashes.count }

    /// Indexes `names` (distinct, lowercase wire form); a name's number is its position in `names`.
    init(_ names: [[UInt8]], seed: UInt64 = UInt64.random(in: .min ... .max)) {
        self.seed = seed
        var capacity = 16
        while capacity < names.count * 2 { capacity <<= 1 }
        self.mask = capacity - 1
        var slots = [UInt32](repeating: 0, count: capacity)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(names.reduce(0) { $0 + $1.count })
        var starts: [UInt32] = []
        starts.reserveCapacity(names.count + 1)
        var hashes: [UInt64] = []
        hashes.reserveCapacity(names.count)
        for (i, name) in names.enumerated() {
            starts.append(UInt32(bytes.count))
            bytes.append(contentsOf: name)
            let h = name.withUnsafeBytes { Self.hash($0, seed: seed) }
            hashes.append(h)
            var s = Int(truncatingIfNeeded: h) & (capacity - 1)
            while slots[s] != 0 { s = (s + 1) & (capacity - 1) }
            slots[s] = UInt32(i + 1)
        }
        starts.append(UInt32(bytes.count))
        self.slots = slots
        self.bytes = bytes
        self.starts = starts
        self.hashes = hashes
    }

    /// The number of the node named `name` (lowercase wire form), if there is one.
    @inline(__always)
    func find(_ name: [UInt8]) -> Int? {
        name.withUnsafeBytes { self.find($0) }
    }

    func find(_ name: UnsafeRawBufferPointer) -> Int? {
        let h = Self.hash(name, seed: self.seed)
        return self.slots.withUnsafeBufferPointer { slots in
            self.bytes.withUnsafeBytes { bytes in
                self.starts.withUnsafeBufferPointer { starts in
                    self.hashes.withUnsafeBufferPointer { hashes in
                        var s = Int(truncatingIfNeeded: h) & self.mask
                        while true {
                            let v = Int(slots[s])
                            if v == 0 { return nil }
                            let i = v - 1
                            if hashes[i] == h {
                                let start = Int(starts[i])
                                let length = Int(starts[i + 1]) - start
                                if length == name.count,
                                    memcmp(bytes.baseAddress! + start, name.baseAddress!, length) == 0
                                {
                                    return i
                                }
                            }
                            s = (s + 1) & self.mask
                        }
                    }
                }
            }
        }
    }

    /// Name `i`'s bytes.
    func name(_ i: Int) -> [UInt8] {
        Array(self.bytes[Int(self.starts[i])..<Int(self.starts[i + 1])])
    }

    /// A seeded multiply-xorshift hash over 8-byte words (the last one zero-padded), then the length.
    @inline(__always)
    static func hash(_ b: UnsafeRawBufferPointer, seed: UInt64) -> UInt64 {
        let k: UInt64 = 0x9E37_79B9_7F4A_7C15
        var h = seed ^ (UInt64(b.count) &* k)
        var i = 0
        let n = b.count
        while i + 8 <= n {
            let w = b.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            h = (h ^ w) &* k
            h ^= h >> 32
            i += 8
        }
        if i < n {
            var w: UInt64 = 0
            var shift: UInt64 = 0
            while i < n {
                w |= UInt64(b[i]) << shift
                shift += 8
                i += 1
            }
            h = (h ^ w) &* k
            h ^= h >> 32
        }
        h = (h ^ (h >> 29)) &* 0xBF58_476D_1CE4_E5B9
        return h ^ (h >> 32)
    }
}
