import Metrics

/// The responder's counters, created once (creating a Counter per increment would be slow).
struct DNSMetrics: Sendable {
    let queriesUDP: Counter
    let queriesTCP: Counter
    /// Inputs that were not a well-formed query: answered FORMERR when the header was readable,
    /// dropped otherwise.
    let malformed: Counter
    let answeredFromZone: Counter
    let nxDomain: Counter
    let truncated: Counter
    let forwarded: Counter
    let cacheHits: Counter
    let cacheMisses: Counter
    let upstreamTimeouts: Counter
    let upstreamFailures: Counter
    let upstreamMismatched: Counter
    let tcpConnectionsRejected: Counter

    init(factory: any MetricsFactory) {
        func c(_ label: String, _ dims: [(String, String)] = []) -> Counter {
            Counter(label: label, dimensions: dims, factory: factory)
        }
        self.queriesUDP = c("dns_queries_total", [("transport", "udp")])
        self.queriesTCP = c("dns_queries_total", [("transport", "tcp")])
        self.malformed = c("dns_malformed_queries_total")
        self.answeredFromZone = c("dns_zone_answers_total")
        self.nxDomain = c("dns_nxdomain_total")
        self.truncated = c("dns_truncated_answers_total")
        self.forwarded = c("dns_upstream_queries_total")
        self.cacheHits = c("dns_cache_hits_total")
        self.cacheMisses = c("dns_cache_misses_total")
        self.upstreamTimeouts = c("dns_upstream_timeouts_total")
        self.upstreamFailures = c("dns_upstream_failures_total")
        self.upstreamMismatched = c("dns_upstream_mismatched_responses_total")
        self.tcpConnectionsRejected = c("dns_tcp_connections_rejected_total")
    }
}
