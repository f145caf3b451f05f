// Consistent hashing: Maglev (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
// NSDI 2016), chosen over a ring hash with virtual nodes because:
// - lookup is one array index (`table[hash % M]`), O(1) and cache friendly, where a ring needs a binary
//   search over N x vnodes points on every request;
// - the spread is even by construction (every backend gets M/N slots +-1, scaled by weight) without tuning a
//   virtual-node count, whereas a ring with 100 vnodes per host still shows ~10% imbalance;
// - weights fit naturally (a backend takes turns in proportion to its weight while the table fills);
// - the price is slightly more than minimal disruption: removing one of N backends moves its 1/N share plus
//   a small extra (a few percent of the keys with M >= 100 x N), which the tests bound.
// Bounded load (Mirrokni et al.) is not implemented: least-request covers "avoid the hot backend" and a
// consistent-hash route by definition prefers stickiness.

/// A Maglev lookup table over a list of candidates. Entries are positions in that list.
struct MaglevTable: Sendable {
    let size: Int
    private let entries: [Int32]

    /// - Parameters:
    ///   - identities: one stable hash per candidate (of its `ip:port`), which fixes its permutation.
    ///   - weights: relative weights (>= 1), same order.
    ///   - size: the table size, a prime; `tableSize(for:)` by default.
    init(identities: [UInt64], weights: [Int], size: Int? = nil) {
        precondition(identities.count == weights.count)
        let n = identities.count
        let m = size ?? MaglevTable.tableSize(for: n)
        self.size = m
        guard n > 0 else {
            self.entries = []
            return
        }
        var offset = [Int](repeating: 0, count: n)
        var skip = [Int](repeating: 0, count: n)
        for i in 0..<n {
            offset[i] = Int(StableHash.mix(identities[i] ^ 0x6d61_676c_6576_6f66) % UInt64(m))
            skip[i] = Int(StableHash.mix(identities[i] ^ 0x6d61_676c_6576_736b) % UInt64(m - 1)) + 1
        }
        let w = weights.map { max(1, $0) }
        let maxWeight = w.max() ?? 1
        var next = [Int](repeating: 0, count: n)
        var placed = [Int](repeating: 0, count: n)
        var table = [Int32](repeating: -1, count: m)
        var filled = 0
        var round = 0
        fill: while true {
            round += 1
            for i in 0..<n {
                // Weighted turns: backend i places its round-th entry only while placed/round < w/maxWeight.
                if placed[i] * maxWeight >= round * w[i] { continue }
                var c = (offset[i] + next[i] * skip[i]) % m
                while table[c] >= 0 {
                    next[i] += 1
                    c = (offset[i] + next[i] * skip[i]) % m
                }
                table[c] = Int32(i)
                next[i] += 1
                placed[i] += 1
                filled += 1
                if filled == m { break fill }
            }
        }
        self.entries = table
    }

    /// The candidate position for a key hash.
    @inline(__always)
    func lookup(_ hash: UInt64) -> Int? {
        guard !self.entries.isEmpty else { return nil }
        return Int(self.entries[Int(hash % UInt64(self.size))])
    }

    /// Smallest prime at least 100 x count (and at least 1009), capped near 65537 unless count needs more.
    static func tableSize(for count: Int) -> Int {
        var m = max(1009, min(100 * count, 65_537))
        m = max(m, count)
        while !isPrime(m) { m += 1 }
        return m
    }

    static func isPrime(_ n: Int) -> Bool {
        if n < 2 { return false }
        if n % 2 == 0 { return n == 2 }
        var d = 3
        while d * d <= n {
            if n % d == 0 { return false }
            d += 2
        }
        return true
    }
}
