import CoreMetrics
import MeshCore
import NIOCore
import Testing

@testable import MeshAgent

private func backends(_ count: Int, weights: [Int]? = nil, sites: [String?]? = nil) -> [Backend] {
    (0..<count).map { i in
        Backend(
            ip: .v4(0x0A00_0000 + UInt32(i + 1)),
            port: 8000 + i,
            node: "n\(i)",
            site: sites?[i],
            weight: weights?[i] ?? 1
        )
    }
}

private let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

private func balancer(
    _ backends: [Backend],
    _ policy: BalancerPolicy,
    localSite: String? = nil,
    outlier: OutlierConfiguration = .init(),
    seed: UInt64 = 42
) -> LoadBalancer {
    LoadBalancer(backends: backends, policy: policy, localSite: localSite, outlier: outlier, seed: seed)
}

/// Picks `n` times (each pick finished at once) and counts per backend index.
private func distribution(_ lb: inout LoadBalancer, _ n: Int, hash: (Int) -> UInt64 = { _ in 0 }) -> [Int: Int] {
    var counts: [Int: Int] = [:]
    for k in 0..<n {
        guard let i = lb.pick(hash: hash(k), now: t0) else { continue }
        counts[i, default: 0] += 1
        lb.finish(lb.slot(i).id, outcome: .success, now: t0)
    }
    return counts
}

@Suite("Balancer policies")
struct BalancerPolicyTests {
    @Test("smooth weighted round robin is exact and interleaved")
    func smoothWeightedRoundRobin() {
        var rr = SmoothWeightedRoundRobin(count: 3)
        let weights = [5, 1, 1]
        var sequence: [Int] = []
        for _ in 0..<7 { sequence.append(rr.pick(from: [0, 1, 2]) { weights[$0] }!) }
        // nginx's reference sequence for 5,1,1.
        #expect(sequence == [0, 0, 1, 0, 2, 0, 0])
        var counts = [0, 0, 0]
        for _ in 0..<700 { counts[rr.pick(from: [0, 1, 2]) { weights[$0] }!] += 1 }
        #expect(counts == [500, 100, 100])
    }

    @Test("round robin over N is exact, weights included", arguments: [[1, 1, 1], [3, 1, 2], [1, 4]])
    func roundRobinExact(weights: [Int]) {
        var lb = balancer(backends(weights.count, weights: weights), .roundRobin)
        let total = weights.reduce(0, +)
        let counts = distribution(&lb, total * 50)
        for (i, w) in weights.enumerated() { #expect(counts[i] == w * 50) }
    }

    @Test("weighted random follows the weights")
    func weightedRandom() {
        var lb = balancer(backends(3, weights: [1, 2, 5]), .random)
        let n = 40_000
        let counts = distribution(&lb, n)
        for (i, w) in [1, 2, 5].enumerated() {
            let share = Double(counts[i, default: 0]) / Double(n)
            #expect(abs(share - Double(w) / 8) < 0.02, "backend \(i): \(share)")
        }
    }

    @Test("least request (power of two choices) avoids the loaded backend and keeps weights when idle")
    func leastRequest() {
        // Backend 0 holds 20 requests that do not finish (set up through round robin, carried over).
        var setup = balancer(backends(3), .roundRobin)
        for _ in 0..<60 {
            let i = setup.pick(now: t0)!
            if i != 0 { setup.finish(setup.slot(i).id, outcome: .success, now: t0) }
        }
        #expect(setup.slot(0).inFlight == 20)
        var lb = LoadBalancer(
            backends: backends(3),
            policy: .leastRequest,
            localSite: nil,
            outlier: .init(),
            previous: setup,
            seed: 7
        )
        let counts = distribution(&lb, 3000)
        #expect(counts[0, default: 0] < 100, "loaded backend got \(counts[0, default: 0])")
        #expect(counts[1, default: 0] > 1200 && counts[2, default: 0] > 1200)

        // Nothing in flight: the first (weighted) sample wins, so weights show.
        var weighted = balancer(backends(2, weights: [1, 3]), .leastRequest)
        let w = distribution(&weighted, 8000)
        let share = Double(w[1, default: 0]) / 8000
        #expect(abs(share - 0.75) < 0.03, "weight-3 share \(share)")
    }

    @Test("locality: same-site backends only while one of them is healthy")
    func locality() {
        let list = backends(4, sites: ["a", "a", "b", "b"])
        var lb = balancer(list, .roundRobin, localSite: "a")
        let counts = distribution(&lb, 100)
        #expect(counts[2] == nil && counts[3] == nil)
        #expect(counts[0] == 50 && counts[1] == 50)

        // Site a not ready: site b takes over.
        var notReady = list
        notReady[0].ready = false
        notReady[1].ready = false
        var lb2 = balancer(notReady, .roundRobin, localSite: "a")
        let counts2 = distribution(&lb2, 100)
        #expect(counts2[2] == 50 && counts2[3] == 50)

        // No local site configured: everyone.
        var lb3 = balancer(list, .roundRobin)
        #expect(distribution(&lb3, 100).count == 4)
    }

    @Test("outlier ejection after consecutive failures, bounded, and recovery after the ejection time")
    func outlierEjection() {
        let outlier = OutlierConfiguration(
            consecutiveFailures: 5,
            baseEjectionTime: .seconds(30),
            maxEjectionTime: .seconds(300),
            maxEjectionPercent: 10
        )
        var lb = balancer(backends(3), .roundRobin, outlier: outlier)
        let bad = lb.slot(1).id
        for k in 0..<4 { lb.report(bad, outcome: .failure, now: t0 + .seconds(Int64(k))) }
        #expect(!lb.slot(1).outlier.isEjected)
        lb.report(bad, outcome: .success, now: t0)  // a success breaks the streak
        for _ in 0..<4 { lb.report(bad, outcome: .failure, now: t0) }
        #expect(!lb.slot(1).outlier.isEjected)
        lb.report(bad, outcome: .failure, now: t0)
        #expect(lb.slot(1).outlier.isEjected)
        #expect(!lb.eligible(now: t0).contains(1))

        // 10% of 3 rounds down to 0, but one ejection is always allowed; a second is not.
        let other = lb.slot(2).id
        for _ in 0..<5 { lb.report(other, outcome: .failure, now: t0) }
        #expect(!lb.slot(2).outlier.isEjected)

        // Back after 30 s; the second ejection lasts 60 s.
        #expect(!lb.eligible(now: t0 + .seconds(29)).contains(1))
        #expect(lb.eligible(now: t0 + .seconds(30)).contains(1))
        for _ in 0..<5 { lb.report(bad, outcome: .failure, now: t0 + .seconds(31)) }
        #expect(lb.slot(1).outlier.ejections == 2)
        #expect(!lb.eligible(now: t0 + .seconds(90)).contains(1))
        #expect(lb.eligible(now: t0 + .seconds(91)).contains(1))
    }

    @Test("the last usable backend is never ejected")
    func lastBackendKept() {
        var lb = balancer(backends(2), .roundRobin, outlier: .init(consecutiveFailures: 1, maxEjectionPercent: 100))
        lb.report(lb.slot(0).id, outcome: .failure, now: t0)
        #expect(lb.slot(0).outlier.isEjected)
        lb.report(lb.slot(1).id, outcome: .failure, now: t0)
        #expect(!lb.slot(1).outlier.isEjected)
        #expect(lb.pick(now: t0) == 1)
    }

    @Test("retries skip backends already tried")
    func excluding() {
        var lb = balancer(backends(3), .roundRobin)
        let tried = [lb.slot(0).id, lb.slot(1).id]
        for _ in 0..<10 { #expect(lb.pick(excluding: tried, now: t0) == 2) }
        #expect(lb.pick(excluding: tried + [lb.slot(2).id], now: t0) == nil)
    }

    @Test("an update keeps per-backend health and in-flight counts")
    func updateCarriesState() {
        var lb = balancer(backends(3), .roundRobin, outlier: .init(consecutiveFailures: 1, maxEjectionPercent: 50))
        let first = lb.pick(now: t0)!
        lb.report(lb.slot(2).id, outcome: .failure, now: t0)
        #expect(lb.slot(2).outlier.isEjected)
        var list = backends(4)
        list[0].weight = 7
        let next = LoadBalancer(backends: list, policy: .random, localSite: nil, outlier: .init(), previous: lb)
        #expect(next.slot(for: lb.slot(first).id)?.inFlight == 1)
        #expect(next.slot(for: lb.slot(2).id)?.outlier.isEjected == true)
        #expect(next.slot(for: list[3].id)?.inFlight == 0)
    }
}

@Suite("Maglev consistent hashing")
struct MaglevTests {
    private func keyHashes(_ n: Int) -> [UInt64] { (0..<n).map { StableHash.hash("user-\($0)") } }

    @Test("a key sticks to its backend")
    func sticky() {
        var lb = balancer(backends(5), .consistentHash(.header("x-user")))
        for hash in self.keyHashes(200) {
            let first = lb.pick(hash: hash, now: t0)!
            for _ in 0..<5 { #expect(lb.pick(hash: hash, now: t0) == first) }
        }
    }

    @Test("keys spread evenly, weights honoured")
    func spread() {
        var lb = balancer(backends(5), .consistentHash(.sourceIP))
        let hashes = self.keyHashes(50_000)
        let counts = distribution(&lb, hashes.count) { hashes[$0] }
        for i in 0..<5 { #expect(abs(Double(counts[i, default: 0]) / 50_000 - 0.2) < 0.02) }

        var weighted = balancer(backends(2, weights: [1, 3]), .consistentHash(.sourceIP))
        let w = distribution(&weighted, hashes.count) { hashes[$0] }
        #expect(abs(Double(w[1, default: 0]) / 50_000 - 0.75) < 0.03)
    }

    @Test("removing one of N backends moves about 1/N of the keys", arguments: [3, 5, 10])
    func minimalDisruption(n: Int) {
        let all = backends(n)
        var before = balancer(all, .consistentHash(.sourceIP))
        var after = balancer(Array(all.dropLast()), .consistentHash(.sourceIP))
        let hashes = self.keyHashes(20_000)
        var moved = 0
        var movedFromSurvivors = 0
        for hash in hashes {
            let a = before.slot(before.pick(hash: hash, now: t0)!).id
            let b = after.slot(after.pick(hash: hash, now: t0)!).id
            if a != b {
                moved += 1
                if a != all.last!.id { movedFromSurvivors += 1 }
            }
        }
        let share = Double(moved) / Double(hashes.count)
        let ideal = 1.0 / Double(n)
        // The removed backend's keys must move (≈1/N); Maglev moves a few percent more at most.
        #expect(share >= ideal - 0.02 && share <= ideal + 0.05, "moved \(share) for 1/N = \(ideal)")
        #expect(Double(movedFromSurvivors) / Double(hashes.count) < 0.05)
    }

    @Test("table sizes are primes at least 100 x N")
    func tableSize() {
        for n in [1, 3, 10, 100, 700] {
            let m = MaglevTable.tableSize(for: n)
            #expect(MaglevTable.isPrime(m))
            #expect(m >= min(100 * n, 65_537))
        }
    }

    @Test("the order backends are listed in does not move keys")
    func orderIndependent() {
        let list = backends(6)
        var a = balancer(list, .consistentHash(.sourceIP))
        var b = balancer(list.reversed(), .consistentHash(.sourceIP))
        for hash in self.keyHashes(2000) {
            #expect(a.slot(a.pick(hash: hash, now: t0)!).id == b.slot(b.pick(hash: hash, now: t0)!).id)
        }
    }
}

@Suite("Route handle: finishing a pick by its slot")
struct RouteHandleFinishTests {
    private func route(_ list: [Backend]) -> Route {
        Route(service: ServiceKey(namespace: "test", name: "svc"), vip: .v4(0x0A63_0001), port: 80, backends: list)
    }

    private func handle(_ list: [Backend]) -> RouteHandle {
        RouteHandle(
            route: self.route(list),
            settings: RouteSettings(
                localSite: nil,
                outlier: .init(consecutiveFailures: 1, maxEjectionPercent: 100),
                metricsFactory: NOOPMetricsHandler.instance
            )
        )
    }

    /// Active requests and failures per backend `ip:port`, from the handle's snapshot.
    private func counts(_ handle: RouteHandle) -> [String: (active: Int, failures: Int)] {
        var out: [String: (active: Int, failures: Int)] = [:]
        for b in handle.snapshot(listening: true, error: nil).backends {
            out["\(b.ip):\(b.port)"] = (b.active, b.failures)
        }
        return out
    }

    @Test("finish and report land on the picked backend")
    func sameBalancer() throws {
        let list = backends(3)
        let handle = self.handle(list)
        let pick = try #require(handle.pick())
        #expect(self.counts(handle)[pick.id.description]?.active == 1)
        handle.report(pick, outcome: .success)
        handle.finish(pick, outcome: .failure)
        let after = self.counts(handle)
        #expect(after[pick.id.description]?.active == 0)
        #expect(after[pick.id.description]?.failures == 1)
        #expect(after.values.map { $0.failures }.reduce(0, +) == 1)
    }

    @Test("a pick finished after the balancer was swapped lands on its backend, not on its old slot index")
    func afterSwap() throws {
        let list = backends(3)
        let handle = self.handle(list)
        let pick = try #require(handle.pick())
        let other = try #require(handle.pick())
        // Reordered, with a backend in front: every slot index now names another backend.
        let reordered = [backends(4)[3]] + list.reversed()
        let defaults = RouteSettings(localSite: nil, outlier: .init(), metricsFactory: NOOPMetricsHandler.instance)
        handle.update(route: self.route(reordered), settings: defaults)
        handle.finish(pick, outcome: .failure)
        var after = self.counts(handle)
        #expect(after[pick.id.description]?.active == 0)
        #expect(after[pick.id.description]?.failures == 1)
        #expect(after[other.id.description]?.active == 1)
        #expect(after.values.map { $0.failures }.reduce(0, +) == 1)
        // A backend removed meanwhile: finishing its pick changes nothing (and does not trap).
        handle.update(route: self.route(list.filter { $0.id != other.id }), settings: defaults)
        handle.finish(other, outcome: .failure)
        after = self.counts(handle)
        #expect(after[other.id.description] == nil)
        #expect(after.values.map { $0.active }.reduce(0, +) == 0)
        #expect(after.values.map { $0.failures }.reduce(0, +) == 1)
        // Picks of the current balancer finish by slot again.
        let fresh = try #require(handle.pick())
        handle.finish(fresh, outcome: .success)
        #expect(self.counts(handle).values.map { $0.active }.reduce(0, +) == 0)
    }
}
