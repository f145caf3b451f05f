import NIOCore

/// The cache key: lowercase name, type and class.
struct DNSCacheKey: Hashable, Sendable {
    var name: [UInt8]
    var type: UInt16
    var qclass: UInt16

    init(_ q: DNSQuestion) {
        self.name = q.name.lowercased.wire
        self.type = q.type.rawValue
        self.qclass = q.qclass
    }
}

/// A size-bounded, TTL-respecting cache of upstream answers with least-recently-used eviction.
/// Positive answers live for their smallest TTL; negative ones (NXDOMAIN, NODATA) for the SOA's
/// `min(TTL, MINIMUM)` (RFC 2308 §5); answers without an SOA, SERVFAIL and the like are not kept.
/// Every TTL, stored and handed out, is capped at ``maxTTL``.
/// Not thread-safe: owned by one event loop.
final class DNSCache {
    struct Entry {
        var key: DNSCacheKey
        var message: DNSMessage
        var stored: NIODeadline
        var expires: NIODeadline
        /// The upstream resolver that gave this answer (for `meshctl dns`).
        var upstream: SocketAddress?
        var prev: Int
        var next: Int
    }

    let capacity: Int
    let maxTTL: UInt32
    private var index: [DNSCacheKey: Int] = [:]
    private var entries: [Entry] = []
    private var free: [Int] = []
    /// Most recently used.
    private var head = -1
    /// Least recently used.
    private var tail = -1

    init(capacity: Int, maxTTL: UInt32 = 300) {
        self.capacity = max(1, capacity)
        self.maxTTL = maxTTL
    }

    var count: Int { self.index.count }

    /// How long a response may be cached, or nil when it must not be.
    static func cacheTTL(_ m: DNSMessage, maxTTL: UInt32) -> UInt32? {
        guard !m.header.truncated else { return nil }
        let rcode = m.rcode
        if rcode == .noError && !m.answers.isEmpty {
            var ttl = maxTTL
            for r in m.answers { ttl = min(ttl, r.ttl) }
            for r in m.authorities { ttl = min(ttl, r.ttl) }
            return ttl == 0 ? nil : ttl
        }
        if rcode == .noError || rcode == .nxDomain {
            for r in m.authorities {
                if case .soa(let soa) = r.data {
                    let ttl = min(min(r.ttl, soa.minimum), maxTTL)
                    return ttl == 0 ? nil : ttl
                }
            }
        }
        return nil
    }

    /// `m` with every record's TTL at most `cap`: no record leaves the forwarder with a longer
    /// one, so clients that cache in turn keep it no longer than we do.
    static func capping(_ m: DNSMessage, at cap: UInt32) -> DNSMessage {
        var m = m
        for k in m.answers.indices { m.answers[k].ttl = min(m.answers[k].ttl, cap) }
        for k in m.authorities.indices { m.authorities[k].ttl = min(m.authorities[k].ttl, cap) }
        for k in m.additionals.indices { m.additionals[k].ttl = min(m.additionals[k].ttl, cap) }
        return m
    }

    /// Stores `message` (TTLs capped at ``maxTTL``) if it may be cached; returns whether it was.
    @discardableResult
    func insert(
        _ key: DNSCacheKey,
        _ message: DNSMessage,
        now: NIODeadline,
        from upstream: SocketAddress? = nil
    ) -> Bool {
        guard let ttl = DNSCache.cacheTTL(message, maxTTL: self.maxTTL) else { return false }
        let expires = now + .seconds(Int64(ttl))
        let message = DNSCache.capping(message, at: self.maxTTL)
        if let i = self.index[key] {
            self.entries[i].message = message
            self.entries[i].stored = now
            self.entries[i].expires = expires
            self.entries[i].upstream = upstream
            self.moveToFront(i)
            return true
        }
        if self.index.count >= self.capacity { self.evictTail() }
        let entry = Entry(
            key: key,
            message: message,
            stored: now,
            expires: expires,
            upstream: upstream,
            prev: -1,
            next: -1
        )
        let i: Int
        if let f = self.free.popLast() {
            self.entries[f] = entry
            i = f
        } else {
            self.entries.append(entry)
            i = self.entries.count - 1
        }
        self.index[key] = i
        self.linkFront(i)
        return true
    }

    /// Where a cached answer came from and how long it has left, without touching the LRU order.
    func provenance(_ key: DNSCacheKey, now: NIODeadline) -> (secondsLeft: Int, upstream: SocketAddress?)? {
        guard let i = self.index[key], now < self.entries[i].expires else { return nil }
        let e = self.entries[i]
        return (Int((e.expires - now).nanoseconds / 1_000_000_000), e.upstream)
    }

    /// The cached answer with TTLs counted down, or nil when absent or expired.
    func lookup(_ key: DNSCacheKey, now: NIODeadline) -> DNSMessage? {
        guard let i = self.index[key] else { return nil }
        let e = self.entries[i]
        guard now < e.expires else {
            self.remove(i)
            return nil
        }
        self.moveToFront(i)
        let elapsed = UInt32(clamping: (now - e.stored).nanoseconds / 1_000_000_000)
        var m = e.message
        if elapsed > 0 {
            for k in m.answers.indices { m.answers[k].ttl = m.answers[k].ttl &- min(elapsed, m.answers[k].ttl) }
            for k in m.authorities.indices {
                m.authorities[k].ttl = m.authorities[k].ttl &- min(elapsed, m.authorities[k].ttl)
            }
            for k in m.additionals.indices {
                m.additionals[k].ttl = m.additionals[k].ttl &- min(elapsed, m.additionals[k].ttl)
            }
        }
        return m
    }

    private func evictTail() {
        guard self.tail >= 0 else { return }
        self.remove(self.tail)
    }

    private func remove(_ i: Int) {
        self.unlink(i)
        self.index[self.entries[i].key] = nil
        self.entries[i].message = DNSMessage()
        self.free.append(i)
    }

    private func unlink(_ i: Int) {
        let p = self.entries[i].prev
        let n = self.entries[i].next
        if p >= 0 { self.entries[p].next = n } else { self.head = n }
        if n >= 0 { self.entries[n].prev = p } else { self.tail = p }
        self.entries[i].prev = -1
        self.entries[i].next = -1
    }

    private func linkFront(_ i: Int) {
        self.entries[i].prev = -1
        self.entries[i].next = self.head
        if self.head >= 0 { self.entries[self.head].prev = i }
        self.head = i
        if self.tail < 0 { self.tail = i }
    }

    private func moveToFront(_ i: Int) {
        guard self.head != i else { return }
        self.unlink(i)
        self.linkFront(i)
    }
}
