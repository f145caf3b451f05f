import MeshCore
import MeshSQLite

/// `mesh-control`'s configuration file (YAML); every field has a default, flags override it.
public struct ControlConfig: Codable, Sendable, DefaultConstructible {
    /// `host:port` of the API.
    public var listen: String = "127.0.0.1:7700"
    /// Where the store lives (`control.db`); default: the user's state folder.
    public var dataDir: String = StatePaths.defaultDataDir() + "/control"
    /// VIP ranges, at most one IPv4 and one IPv6. 127.0.0.0/8 ranges suit agents in loopback mode.
    public var serviceCIDRs: [String] = ["127.77.0.0/16", "fd77::/112"]
    /// Changes kept in memory and on disk so watchers can resume; older versions get 410 Gone.
    public var historyLimit: Int = 10_000
    /// The same history bounded by bytes (of watch lines in memory; the `events` table on disk is
    /// trimmed to match): 32 MiB holds 10,000 changes of objects up to ~3 KiB, or 128 of 256 KiB.
    public var historyMaxBytes: Int = 32 * 1024 * 1024
    /// How often idle watchers get a BOOKMARK with the latest resourceVersion.
    public var bookmarkIntervalSeconds: Int = 10
    /// Largest request body accepted (413 beyond).
    public var maxBodyBytes: Int = 3 * 1024 * 1024
    /// How long a client may pause in the middle of sending a request (408 after).
    public var requestTimeoutSeconds: Int = 30
    /// How long an idle keep-alive connection stays open.
    public var idleTimeoutSeconds: Int = 120
    /// Connections the API holds at once (503 beyond). Each agent keeps about three: its heartbeat
    /// and two watches.
    public var maxConnections: Int = 8192
    /// How long a new connection has to complete its TLS handshake before it is closed.
    public var tlsHandshakeTimeoutSeconds: Double = 5
    /// Writes (PUT, POST, DELETE) per second each node (any identity but the admin's) may make, in
    /// a token bucket of `writeBurst`; beyond, 429 with Retry-After. 0: no limit.
    public var writesPerSecond: Double = 10
    public var writeBurst: Int = 50
    /// The admin's write limit; 0 (the default): none, so bulk applies and benchmarks run freely.
    public var adminWritesPerSecond: Double = 0
    public var adminWriteBurst: Int = 1000
    /// A node that sent no heartbeat for this long is marked NotReady (agents beat every 20 s by
    /// default: three beats, so two lost ones on a weak link are not an outage).
    public var nodeGracePeriodSeconds: Double = 60
    /// After a start, how long nodes already registered have to send their first beat before they
    /// can be marked NotReady (agents retry with a backoff capped at their beat interval).
    public var nodeStartupGracePeriodSeconds: Double = 60
    /// Extra names and IP addresses in the API's serving certificate, beside 127.0.0.1, ::1,
    /// localhost and the listen address (the names agents and meshctl dial).
    public var certSANs: [String] = []
    /// Lifetime of the node certificates the join and the renewal issue (agents renew at two
    /// thirds of it, without a token). Default one year.
    public var nodeCertificateValiditySeconds: Double = 365 * 86400
    /// `full` fsyncs every commit; `normal` only at checkpoints.
    public var durability: Durability = .full
    /// trace, debug, info, notice, warning, error, critical.
    public var logLevel: String = "info"
    /// Where objects live: `sqlite` (`control.db` in `dataDir`, one machine) or `etcd` (several
    /// replicas over one etcd cluster: `etcdEndpoints`; README "Replicas on etcd").
    public var store: String = "sqlite"
    /// etcd members, `http://host:port` or `https://host:port` (then `etcdCAFile` is needed).
    public var etcdEndpoints: [String] = []
    /// The key prefix of this mesh in etcd; its replicas share it.
    public var etcdPrefix: String = "/mesh/"
    /// TLS to etcd: the CA that signed etcd's certificate, and a client certificate and key when etcd
    /// asks for one (`--client-cert-auth`). PEM files.
    public var etcdCAFile: String = ""
    public var etcdCertFile: String = ""
    public var etcdKeyFile: String = ""
    /// This replica's name among the others (default: host name and listen address).
    public var replicaName: String = ""
    /// Large connection buffers (NIOSSL's 48 KiB per TLS connection) on pages of their own, so idle
    /// agents' connections keep only what they touch resident (MeshHTTP `LeanAllocator`). false: the
    /// malloc heap, as before (for comparison in perf/scale).
    public var leanConnectionBuffers: Bool = true
    /// With `leanConnectionBuffers`: a TLS connection quiet this long gives the pages of its NIOSSL
    /// buffers back (MeshHTTP `ConnectionBuffers`); 0: never (for comparison in perf/scale).
    public var idleBufferReleaseMilliseconds: Int = 10000
    /// Offer agents and other clients the mesh record layer on their connections (MeshRecords `HTTPRecords`):
    /// after the TLS 1.3 handshake both ends leave NIOSSL and seal TLS 1.3 records of their own, which frees
    /// BoringSSL's and NIOSSL's state of every idle connection. false: TLS records throughout (for comparison in
    /// perf/scale, or a client that cannot).
    public var httpRecords: Bool = true
    /// Every this many seconds, the malloc heap's free pages go back to the system when 8 MiB and an
    /// eighth of what is in use lie free (after a storm of connections and registrations); 0: never.
    public var heapTrimIntervalSeconds: Int = 10

    public init() {}

    /// The parsed service CIDRs; throws naming the bad entry.
    public func parsedCIDRs() throws -> [CIDR] {
        var out: [CIDR] = []
        for (i, text) in self.serviceCIDRs.enumerated() {
            guard let c = CIDR(text) else {
                throw ManifestError(
                    "serviceCIDRs[\(i)]: \"\(text)\" is not a CIDR such as 127.77.0.0/16 (host bits must be zero)"
                )
            }
            if out.contains(where: { $0.network.isIPv4 == c.network.isIPv4 }) {
                throw ManifestError("serviceCIDRs[\(i)]: only one IPv4 and one IPv6 range may be given")
            }
            if c.hostBits < 2 { throw ManifestError("serviceCIDRs[\(i)]: \(text) is too small to hold VIPs") }
            out.append(c)
        }
        return out
    }

    /// Checks every field; the error names the first bad one.
    public func validate() throws {
        _ = try ListenAddress(self.listen, field: "listen")
        _ = try self.parsedCIDRs()
        if self.historyLimit < 1 { throw ManifestError("historyLimit: must be at least 1") }
        if self.idleBufferReleaseMilliseconds < 0 {
            throw ManifestError("idleBufferReleaseMilliseconds: must be 0 (never) or more")
        }
        if self.heapTrimIntervalSeconds < 0 {
            throw ManifestError("heapTrimIntervalSeconds: must be 0 (never) or more")
        }
        if self.bookmarkIntervalSeconds < 1 { throw ManifestError("bookmarkIntervalSeconds: must be at least 1") }
        if self.requestTimeoutSeconds < 1 { throw ManifestError("requestTimeoutSeconds: must be at least 1") }
        if self.idleTimeoutSeconds < 1 { throw ManifestError("idleTimeoutSeconds: must be at least 1") }
        if self.maxConnections < 16 { throw ManifestError("maxConnections: must be at least 16") }
        if self.historyMaxBytes < 1024 * 1024 {
            throw ManifestError("historyMaxBytes: must be at least 1048576 (1 MiB)")
        }
        if !(self.tlsHandshakeTimeoutSeconds >= 0.1) {
            throw ManifestError("tlsHandshakeTimeoutSeconds: must be at least 0.1")
        }
        for (field, rate, burst) in [
            ("writesPerSecond", self.writesPerSecond, self.writeBurst),
            ("adminWritesPerSecond", self.adminWritesPerSecond, self.adminWriteBurst),
        ] {
            if !(rate >= 0) || !rate.isFinite { throw ManifestError("\(field): must be 0 (no limit) or more") }
            if rate > 0 && burst < 1 {
                throw ManifestError(
                    "\(field == "writesPerSecond" ? "writeBurst" : "adminWriteBurst"): must be at least 1"
                )
            }
        }
        if !(self.nodeGracePeriodSeconds >= 0.1) { throw ManifestError("nodeGracePeriodSeconds: must be at least 0.1") }
        if !(self.nodeStartupGracePeriodSeconds >= 0) {
            throw ManifestError("nodeStartupGracePeriodSeconds: must not be negative")
        }
        if !(self.nodeCertificateValiditySeconds >= 2 && self.nodeCertificateValiditySeconds <= 10 * 365 * 86400) {
            throw ManifestError("nodeCertificateValiditySeconds: must be between 2 and 315360000 (10 years)")
        }
        if self.maxBodyBytes < 1024 { throw ManifestError("maxBodyBytes: must be at least 1024") }
        for (i, san) in self.certSANs.enumerated()
        where IPAddress(san) == nil && Names.dns1123SubdomainError(san) != nil {
            throw ManifestError("certSANs[\(i)]: \"\(san)\" is neither an IP address nor a DNS name")
        }
        _ = try LogLevels.parse(self.logLevel)
        switch self.store {
        case "sqlite": break
        case "etcd":
            if self.etcdEndpoints.isEmpty {
                throw ManifestError("etcdEndpoints: at least one etcd URL is needed with store etcd")
            }
            for (i, e) in self.etcdEndpoints.enumerated() {
                guard e.hasPrefix("http://") || e.hasPrefix("https://") else {
                    throw ManifestError("etcdEndpoints[\(i)]: \"\(e)\" is not a URL such as http://127.0.0.1:2379")
                }
                if e.hasPrefix("https://") && self.etcdCAFile.isEmpty {
                    throw ManifestError("etcdCAFile: needed for the https endpoint \(e)")
                }
            }
            if !self.etcdPrefix.hasPrefix("/") || !self.etcdPrefix.hasSuffix("/") {
                throw ManifestError("etcdPrefix: must start and end with / (such as /mesh/)")
            }
            if self.etcdCertFile.isEmpty != self.etcdKeyFile.isEmpty {
                throw ManifestError("etcdCertFile and etcdKeyFile: give both or neither")
            }
        default:
            throw ManifestError("store: \"\(self.store)\" is neither sqlite nor etcd")
        }
    }
}
