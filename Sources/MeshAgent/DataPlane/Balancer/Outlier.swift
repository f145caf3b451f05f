import NIOCore

/// Passive health of one backend (see `OutlierConfiguration`).
struct OutlierState: Sendable, Hashable {
    var consecutiveFailures = 0
    /// Times this backend has been ejected; multiplies the next ejection time. No decay: capped by
    /// `maxEjectionTime` instead.
    var ejections = 0
    var ejectedUntil: NIODeadline?

    var isEjected: Bool { self.ejectedUntil != nil }

    /// A success ends a failure streak.
    mutating func recordSuccess() {
        self.consecutiveFailures = 0
    }

    /// Counts a failure; true when the streak reached the threshold and the caller may eject.
    mutating func recordFailure(threshold: Int) -> Bool {
        self.consecutiveFailures += 1
        return !self.isEjected && self.consecutiveFailures >= threshold
    }

    /// Ejects until `now + base x ejections` (capped); returns the end of the ejection.
    mutating func eject(now: NIODeadline, configuration: OutlierConfiguration) -> NIODeadline {
        self.ejections += 1
        let nanos = min(
            configuration.baseEjectionTime.nanoseconds * Int64(self.ejections),
            configuration.maxEjectionTime.nanoseconds
        )
        let until = now + .nanoseconds(nanos)
        self.ejectedUntil = until
        self.consecutiveFailures = 0
        return until
    }

    /// Ends the ejection when its time is over; true if it ended.
    mutating func recoverIfDue(now: NIODeadline) -> Bool {
        guard let until = self.ejectedUntil, until <= now else { return false }
        self.ejectedUntil = nil
        self.consecutiveFailures = 0
        return true
    }

    /// Whether one more backend may be ejected: fewer than max(1, total x percent / 100) are ejected, and
    /// at least one other backend stays usable.
    static func mayEject(ejected: Int, usableNotEjected: Int, total: Int, maxPercent: Int) -> Bool {
        let allowed = max(1, total * maxPercent / 100)
        return ejected < allowed && usableNotEjected > 1
    }
}
