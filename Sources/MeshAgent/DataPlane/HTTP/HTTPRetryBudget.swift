import Synchronization

/// The retry budget of a route (Envoy's retry budget): retries in flight may be at most
/// `retryBudgetPercent` of the requests in flight, but `minRetryConcurrency` are always allowed. An exchange
/// takes one slot for its first retry and keeps it until it ends, however often it retries.
struct HTTPRetryBudget {
    let percent: Double
    let minimum: Int

    init(_ configuration: HTTPConfiguration) {
        self.percent = configuration.retryBudgetPercent
        self.minimum = configuration.minRetryConcurrency
    }

    /// How many retries may be in flight while `activeRequests` requests are.
    func limit(activeRequests: Int) -> Int {
        max(self.minimum, Int(Double(activeRequests) * self.percent / 100))
    }

    /// Takes a slot from the route's counters when one is free.
    func take(_ stats: RouteStats) -> Bool {
        let active = stats.activeRequests.load(ordering: .relaxed)
        let retrying = stats.activeRetries.load(ordering: .relaxed)
        guard retrying < self.limit(activeRequests: active) else { return false }
        stats.activeRetries.add(1, ordering: .relaxed)
        return true
    }

    /// Gives a slot back (the exchange that held it ended).
    func give(_ stats: RouteStats) {
        stats.activeRetries.subtract(1, ordering: .relaxed)
    }
}
