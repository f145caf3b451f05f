// The balancing policies as pure functions over "candidates": indices into a route's backend list that are
// currently eligible (ready, not ejected, in the preferred locality tier). No locks, no time, no I/O.

/// Smooth weighted round robin (the nginx algorithm). Each pick adds every candidate's weight to its running
/// score, takes the highest score and subtracts the total weight from it. Over any `sum(weights)` consecutive
/// picks over the same candidates, backend `i` is picked exactly `weight[i]` times, interleaved (5,1,1 gives
/// a a b a c a a, not a a a a a b c).
struct SmoothWeightedRoundRobin: Sendable {
    /// Running score per backend index.
    private(set) var current: [Int]

    init(count: Int) {
        self.current = Array(repeating: 0, count: count)
    }

    mutating func pick(from candidates: [Int], weight: (Int) -> Int) -> Int? {
        guard !candidates.isEmpty else { return nil }
        if candidates.count == 1 { return candidates[0] }
        var total = 0
        var best = -1
        var bestScore = Int.min
        for i in candidates {
            let w = weight(i)
            self.current[i] += w
            total += w
            if self.current[i] > bestScore {
                bestScore = self.current[i]
                best = i
            }
        }
        self.current[best] -= total
        return best
    }

    /// Forgets the scores (when the candidate set changes, the new cycle starts fresh).
    mutating func reset() {
        for i in self.current.indices { self.current[i] = 0 }
    }
}

enum WeightedRandom {
    /// A candidate with probability proportional to its weight.
    static func pick<R: RandomNumberGenerator>(
        from candidates: [Int],
        weight: (Int) -> Int,
        using rng: inout R
    ) -> Int? {
        guard !candidates.isEmpty else { return nil }
        if candidates.count == 1 { return candidates[0] }
        var total = 0
        for i in candidates { total += weight(i) }
        var r = Int.random(in: 0..<total, using: &rng)
        for i in candidates {
            r -= weight(i)
            if r < 0 { return i }
        }
        return candidates[candidates.count - 1]
    }
}

/// Least request by the power of two choices: sample two distinct candidates by weight and take the one with
/// fewer in-flight requests per unit of weight (ties, such as both idle, go to the first sample, so the
/// weights show when nothing is in flight). Avoids the herd effect of a global minimum and costs O(candidates) only for the
/// weighted sampling.
enum PowerOfTwoChoices {
    static func pick<R: RandomNumberGenerator>(
        from candidates: [Int],
        weight: (Int) -> Int,
        load: (Int) -> Int,
        using rng: inout R
    ) -> Int? {
        guard candidates.count > 1 else { return candidates.first }
        guard let a = WeightedRandom.pick(from: candidates, weight: weight, using: &rng) else { return nil }
        // Second sample: weighted over the others.
        var total = 0
        for i in candidates where i != a { total += weight(i) }
        var r = Int.random(in: 0..<total, using: &rng)
        var b = a
        for i in candidates where i != a {
            r -= weight(i)
            if r < 0 {
                b = i
                break
            }
        }
        // load/weight compared without division; equal (both idle, say) keeps the first, weighted sample.
        let costA = load(a) * weight(b)
        let costB = load(b) * weight(a)
        return costB < costA ? b : a
    }
}

enum Locality {
    /// The candidates of the local site when there is any healthy one there, otherwise all of them.
    /// `localSite == nil` means no preference.
    static func prefer(_ healthy: [Int], localSite: String?, site: (Int) -> String?) -> [Int] {
        guard let localSite else { return healthy }
        let local = healthy.filter { site($0) == localSite }
        return local.isEmpty ? healthy : local
    }
}
