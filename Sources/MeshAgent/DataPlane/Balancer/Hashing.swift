import MeshCore

/// Stable 64-bit hashing for balancing keys and Maglev permutations: the same input hashes the same way in
/// every process and on every agent (Swift's `Hasher` is seeded per process), so agents agree on where a key
/// goes.
enum StableHash {
    static let fnvOffset: UInt64 = 0xcbf2_9ce4_8422_2325
    static let fnvPrime: UInt64 = 0x0000_0100_0000_01b3

    /// FNV-1a over the bytes, then a SplitMix64 finaliser so that nearby inputs spread over all 64 bits.
    @inlinable
    static func hash(_ bytes: some Sequence<UInt8>, seed: UInt64 = 0) -> UInt64 {
        var h = fnvOffset ^ seed
        for b in bytes {
            h ^= UInt64(b)
            h = h &* fnvPrime
        }
        return mix(h)
    }

    static func hash(_ text: String, seed: UInt64 = 0) -> UInt64 {
        hash(text.utf8, seed: seed)
    }

    static func hash(_ text: Substring, seed: UInt64 = 0) -> UInt64 {
        hash(text.utf8, seed: seed)
    }

    static func hash(_ address: IPAddress, seed: UInt64 = 0) -> UInt64 {
        switch address {
        case .v4(let v): return mix(UInt64(v) ^ fnvOffset ^ seed)
        case .v6(let hi, let lo): return mix(mix(hi ^ fnvOffset ^ seed) ^ lo)
        }
    }

    static func hash(_ id: BackendID, seed: UInt64) -> UInt64 {
        mix(hash(id.ip, seed: seed) ^ UInt64(id.port))
    }

    /// SplitMix64's output function.
    @inlinable
    static func mix(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9e37_79b9_7f4a_7c15
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// A small, fast, seedable generator (xoshiro256**), so tests can fix the sequence.
struct FastRandom: RandomNumberGenerator, Sendable {
    private var s0: UInt64
    private var s1: UInt64
    private var s2: UInt64
    private var s3: UInt64

    init(seed: UInt64) {
        var x = seed
        func next() -> UInt64 {
            x = x &+ 0x9e37_79b9_7f4a_7c15
            return StableHash.mix(x)
        }
        self.s0 = next()
        self.s1 = next()
        self.s2 = next()
        self.s3 = next()
    }

    init() {
        var system = SystemRandomNumberGenerator()
        self.init(seed: system.next())
    }

    mutating func next() -> UInt64 {
        let result = ((self.s1 &* 5) << 7 | (self.s1 &* 5) >> 57) &* 9
        let t = self.s1 << 17
        self.s2 ^= self.s0
        self.s3 ^= self.s1
        self.s1 ^= self.s2
        self.s0 ^= self.s3
        self.s2 ^= t
        self.s3 = self.s3 << 45 | self.s3 >> 19
        return result
    }
}
