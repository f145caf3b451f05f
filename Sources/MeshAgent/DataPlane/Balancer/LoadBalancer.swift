import MeshCore
import NIOCore

/// The balancing state of one route: backends with their health and load, the policy, locality. A value
/// type without locks or clocks (time is passed in), so it is unit-testable; `RouteHandle` guards it with a
/// mutex for the event loops.
struct LoadBalancer: Sendable {
    struct Slot: Sendable {
        var backend: Backend
        var id: BackendID
        var address: SocketAddress?
        var weight: Int
        var outlier = OutlierState()
        /// Connections (L4) or requests (HTTP) currently using this backend.
        var inFlight = 0
        /// Connections or requests sent to it.
        var picks = 0
        /// Failures seen (connect failures, resets, 5xx).
        var failures = 0
        /// Successes seen.
        var successes = 0
        /// Bytes sent to it and received from it by connections and requests that finished (a connection's
        /// bytes are counted when it ends; the route's own counters move with every read).
        var bytes = ByteTally()

        /// Ready, not ejected, and with an address the socket layer accepts.
        var usable: Bool { self.backend.ready && !self.outlier.isEjected && self.address != nil }
    }

    /// What a request or connection learned about its backend.
    enum Outcome: Sendable {
        case success
        case failure
        /// No health signal (the client went away first, say).
        case neutral
    }

    private(set) var slots: [Slot]
    private var index: [BackendID: Int]
    private(set) var policy: BalancerPolicy
    private(set) var localSite: String?
    private(set) var outlierConfiguration: OutlierConfiguration

    /// Eligible slots (usable and in the preferred locality tier), rebuilt lazily after a change.
    private var candidates: [Int] = []
    private var candidatesValid = false
    private var roundRobin: SmoothWeightedRoundRobin
    private var maglev: MaglevTable?
    /// The candidates in `BackendID` order, which the Maglev table indexes (so that the order backends are
    /// listed in does not move keys).
    private var maglevCandidates: [Int] = []
    private var nextRecovery: NIODeadline?
    private var rng: FastRandom

    init(
        backends: [Backend],
        policy: BalancerPolicy,
        localSite: String?,
        outlier: OutlierConfiguration,
        previous: LoadBalancer? = nil,
        seed: UInt64? = nil
    ) {
        var slots: [Slot] = []
        var index: [BackendID: Int] = [:]
        for b in backends {
            let id = b.id
            if index[id] != nil { continue }  // duplicates collapse to the first
            var slot = Slot(
                backend: b,
                id: id,
                address: (1...65_535).contains(b.port)
                    ? try? SocketAddress(ipAddress: b.ip.description, port: b.port) : nil,
                weight: max(1, b.weight)
            )
            if let previous, let j = previous.index[id] {
                let old = previous.slots[j]
                slot.outlier = old.outlier
                slot.inFlight = old.inFlight
                slot.picks = old.picks
                slot.failures = old.failures
                slot.successes = old.successes
                slot.bytes = old.bytes
            }
            index[id] = slots.count
            slots.append(slot)
        }
        self.slots = slots
        self.index = index
        self.policy = policy
        self.localSite = localSite
        self.outlierConfiguration = outlier
        self.roundRobin = SmoothWeightedRoundRobin(count: slots.count)
        self.rng = seed.map { FastRandom(seed: $0) } ?? FastRandom()
        self.nextRecovery = slots.compactMap { $0.outlier.ejectedUntil }.min()
    }

    func slot(_ i: Int) -> Slot { self.slots[i] }

    func slot(for id: BackendID) -> Slot? { self.index[id].map { self.slots[$0] } }

    /// Slots currently eligible (after health and locality), in backend order.
    mutating func eligible(now: NIODeadline) -> [Int] {
        self.refresh(now: now)
        return self.candidates
    }

    /// Chooses a backend and counts it in flight. `hash` is the consistent-hash key (ignored by the other
    /// policies); `excluding` names backends already tried for this connection or request.
    mutating func pick(hash: UInt64 = 0, excluding: [BackendID] = [], now: NIODeadline) -> Int? {
        self.refresh(now: now)
        var pool = self.candidates
        if !excluding.isEmpty {
            pool.removeAll { excluding.contains(self.slots[$0].id) }
            if pool.isEmpty {
                // The preferred tier is exhausted for this request: any usable backend not tried yet.
                pool = self.slots.indices.filter { self.slots[$0].usable && !excluding.contains(self.slots[$0].id) }
            }
        }
        guard !pool.isEmpty else { return nil }
        let chosen: Int?
        switch self.policy {
        case .roundRobin:
            chosen = self.roundRobin.pick(from: pool) { self.slots[$0].weight }
        case .random:
            chosen = WeightedRandom.pick(from: pool, weight: { self.slots[$0].weight }, using: &self.rng)
        case .leastRequest:
            chosen = PowerOfTwoChoices.pick(
                from: pool,
                weight: { self.slots[$0].weight },
                load: { self.slots[$0].inFlight },
                using: &self.rng
            )
        case .consistentHash:
            if excluding.isEmpty, let maglev = self.maglev, let position = maglev.lookup(hash) {
                chosen = self.maglevCandidates[position]
            } else {
                chosen = pool[Int(StableHash.mix(hash) % UInt64(pool.count))]
            }
        }
        guard let i = chosen else { return nil }
        self.slots[i].inFlight += 1
        self.slots[i].picks += 1
        return i
    }

    /// The connection or request on `id` is over: no longer in flight; `outcome` feeds outlier detection.
    mutating func finish(_ id: BackendID, outcome: Outcome, bytes: ByteTally = ByteTally(), now: NIODeadline) {
        guard let i = self.index[id] else { return }  // removed from the route meanwhile
        self.finish(slot: i, outcome: outcome, bytes: bytes, now: now)
    }

    /// `finish` by the slot index `pick` returned (no hashing of the `BackendID`). The index is valid only
    /// for this balancer: one that replaced it (`init(previous:)`) may order its slots differently.
    mutating func finish(slot i: Int, outcome: Outcome, bytes: ByteTally = ByteTally(), now: NIODeadline) {
        self.slots[i].inFlight = max(0, self.slots[i].inFlight - 1)
        self.slots[i].bytes.add(bytes)
        self.report(slot: i, outcome: outcome, now: now)
    }

    /// A health signal without ending the use (a TCP connect succeeded, a response head arrived).
    mutating func report(_ id: BackendID, outcome: Outcome, now: NIODeadline) {
        guard let i = self.index[id] else { return }
        self.report(slot: i, outcome: outcome, now: now)
    }

    /// `report` by the slot index `pick` returned (valid for this balancer only, as for `finish(slot:)`).
    mutating func report(slot i: Int, outcome: Outcome, now: NIODeadline) {
        switch outcome {
        case .neutral:
            return
        case .success:
            self.slots[i].successes += 1
            self.slots[i].outlier.recordSuccess()
        case .failure:
            self.slots[i].failures += 1
            guard self.outlierConfiguration.enabled else { return }
            guard self.slots[i].outlier.recordFailure(threshold: self.outlierConfiguration.consecutiveFailures)
            else { return }
            let ejected = self.slots.reduce(0) { $0 + ($1.outlier.isEjected ? 1 : 0) }
            let usable = self.slots.reduce(0) { $0 + ($1.usable ? 1 : 0) }
            guard
                OutlierState.mayEject(
                    ejected: ejected,
                    usableNotEjected: usable,
                    total: self.slots.count,
                    maxPercent: self.outlierConfiguration.maxEjectionPercent
                )
            else { return }
            let until = self.slots[i].outlier.eject(now: now, configuration: self.outlierConfiguration)
            self.nextRecovery = min(self.nextRecovery ?? until, until)
            self.candidatesValid = false
        }
    }

    private mutating func refresh(now: NIODeadline) {
        if let due = self.nextRecovery, due <= now {
            var next: NIODeadline?
            for i in self.slots.indices {
                if self.slots[i].outlier.recoverIfDue(now: now) {
                    self.candidatesValid = false
                } else if let until = self.slots[i].outlier.ejectedUntil {
                    next = min(next ?? until, until)
                }
            }
            self.nextRecovery = next
        }
        guard !self.candidatesValid else { return }
        let usable = self.slots.indices.filter { self.slots[$0].usable }
        self.candidates = Locality.prefer(usable, localSite: self.localSite) { self.slots[$0].backend.site }
        self.roundRobin.reset()
        if case .consistentHash = self.policy {
            self.maglevCandidates = self.candidates.sorted { self.slots[$0].id < self.slots[$1].id }
            self.maglev = MaglevTable(
                identities: self.maglevCandidates.map { StableHash.hash(self.slots[$0].id, seed: 0) },
                weights: self.maglevCandidates.map { self.slots[$0].weight }
            )
        } else {
            self.maglev = nil
            self.maglevCandidates = []
        }
        self.candidatesValid = true
    }
}
