import MeshCore
import MeshHTTP
import MeshIdentity
import NIOHTTP1
import Synchronization

/// A token bucket per client identity for writes (every method but GET and HEAD; heartbeats are not
/// counted), so that one node
/// cannot stall the others: a bucket holds `burst` writes and refills at `perSecond`. A write that
/// finds its bucket empty is answered 429 with `Retry-After` and a Status saying when to retry.
///
/// The admin has its own limit, off by default: the operator's bulk `meshctl apply` and the
/// benchmarks write as admin, and the admin can do anything anyway. Requests without an identity
/// (the join) are not counted here. Sendable: the buckets sit behind a Mutex.
public final class WriteRateLimiter: Sendable {
    /// A sustained rate and a burst; a rate of 0 means no limit.
    public struct Limit: Sendable, Equatable {
        public var perSecond: Double
        public var burst: Int

        public init(perSecond: Double, burst: Int) {
            self.perSecond = perSecond
            self.burst = burst
        }

        public static let unlimited = Limit(perSecond: 0, burst: 0)
        var isUnlimited: Bool { self.perSecond <= 0 }
    }

    struct Bucket {
        var tokens: Double
        var updated: ContinuousClock.Instant
    }

    /// Buckets are forgotten once full again, when more than this many exist.
    static let pruneAbove = 4096

    let nodeLimit: Limit
    let adminLimit: Limit
    private let buckets = Mutex<[String: Bucket]>([:])

    /// `node`: for every identity but the admin's (nodes, and any later kind); `admin`: the admin's.
    public init(node: Limit, admin: Limit = .unlimited) {
        self.nodeLimit = node
        self.adminLimit = admin
    }

    /// The limit that applies to `identity`.
    func limit(for identity: String) -> Limit {
        if case .admin = MeshPrincipal(uri: identity) { return self.adminLimit }
        return self.nodeLimit
    }

    /// Takes one write from `identity`'s bucket: nil when allowed, or how long until one is available.
    public func take(_ identity: String, now: ContinuousClock.Instant = .now) -> Duration? {
        let limit = self.limit(for: identity)
        if limit.isUnlimited { return nil }
        let burst = Double(max(1, limit.burst))
        return self.buckets.withLock { buckets -> Duration? in
            var bucket = buckets[identity] ?? Bucket(tokens: burst, updated: now)
            let elapsed = bucket.updated < now ? (now - bucket.updated) : .zero
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            bucket.tokens = min(burst, bucket.tokens + seconds * limit.perSecond)
            bucket.updated = now
            defer {
                buckets[identity] = bucket
                if buckets.count > Self.pruneAbove { Self.prune(&buckets, now: now, limit: limit) }
            }
            if bucket.tokens >= 1 {
                bucket.tokens -= 1
                return nil
            }
            let wait = (1 - bucket.tokens) / limit.perSecond
            return .milliseconds(Int64((wait * 1000).rounded(.up)))
        }
    }

    /// Drops buckets that have refilled completely: they hold nothing a new bucket would not.
    private static func prune(_ buckets: inout [String: Bucket], now: ContinuousClock.Instant, limit: Limit) {
        let full = Double(max(1, limit.burst))
        buckets = buckets.filter { _, b in
            let elapsed = now - b.updated
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            return b.tokens + seconds * limit.perSecond < full
        }
    }

    /// Whether `request` counts as a write for the limiter: every method but GET and HEAD, except
    /// heartbeats, which touch only memory (NodeLifecycle) and come every 20 s from an agent.
    static func isWrite(_ request: HTTPRequest) -> Bool {
        request.method != .GET && request.method != .HEAD && !request.path.hasSuffix("/heartbeat")
    }

    /// The 429 answer for a write refused after `wait`: `Retry-After` in whole seconds (at least 1)
    /// and a Kubernetes Status with `details.retryAfterSeconds`.
    func refusal(identity: String, wait: Duration) -> HTTPResponse {
        let limit = self.limit(for: identity)
        let ms = wait.components.seconds * 1000 + wait.components.attoseconds / 1_000_000_000_000_000
        let seconds = max(1, Int((ms + 999) / 1000))
        let rate = limit.perSecond == limit.perSecond.rounded() ? "\(Int(limit.perSecond))" : "\(limit.perSecond)"
        let status = Status(
            code: 429,
            reason: .tooManyRequests,
            message:
                "\(identity) is writing too fast: at most \(rate) writes per second (bursts of \(limit.burst)); retry in \(seconds)s",
            details: Status.Details(retryAfterSeconds: seconds)
        )
        var response = HTTPResponse.json(.tooManyRequests, ControlAPI.encode(status))
        response.headers.add(name: "Retry-After", value: "\(seconds)")
        return response
    }
}
