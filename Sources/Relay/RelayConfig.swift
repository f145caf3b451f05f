import MeshCore
import MeshHTTP
import MeshIdentity

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// `mesh-relay`'s configuration file (YAML); every field has a default, flags override it.
public struct RelayConfig: Codable, Sendable, DefaultConstructible {
    /// STUN addresses (`host:port`, `[v6]:port`), each served over UDP and TCP. Loopback by default,
    /// like every daemon here; a public relay sets `0.0.0.0:3478` and/or `[::]:3478`.
    public var stunListen: [String] = ["127.0.0.1:3478"]
    /// Serve STUN over TCP too.
    public var stunTCP: Bool = true
    /// SOFTWARE sent in STUN answers; empty sends none.
    public var software: String = "edge-mesh mesh-relay"
    /// `/metrics`, `/healthz`, `/readyz`.
    public var adminListen: String = "127.0.0.1:7801"
    /// A STUN TCP connection that sends nothing for this long is closed.
    public var tcpIdleTimeoutSeconds: Int = 30
    /// STUN TCP connections at most.
    public var maxTCPConnections: Int = 1024
    /// trace, debug, info, notice, warning, error, critical.
    public var logLevel: String = "info"

    // Membership (issue 13): with `controlServer` set, the relay enrols and publishes its Relay.
    /// The control plane (`https://IP:7700`); nil: a STUN-only relay that joins nothing.
    public var controlServer: String?
    /// A relay token (`meshctl token create --relay NAME`), used once when there is no certificate yet.
    public var joinToken: String?
    /// `sha256:<hex>` of the control plane CA's public key: the join trusts only that CA.
    public var caCertHash: String?
    /// The relay's name: its identity is `mesh://relay/<name>` (default: the host name).
    public var name: String = RelayConfig.hostName()
    /// The site it runs at, published in its Relay.
    public var site: String?
    /// Relay sessions (7800/tcp), `host:port`.
    public var listen: String = "127.0.0.1:7800"
    /// Addresses agents use to reach `listen` (`IP:port`); default: `listen` when it names one address.
    public var advertise: [String]?
    /// Where its key and certificate live (`pki/relay.key`, `relay.crt`, `ca.crt`).
    public var dataDir: String = StatePaths.defaultDataDir() + "/relay"
    /// Seconds between checks of its Relay's status (and fetches of the revocation list).
    public var statusIntervalSeconds: Double = 30
    /// The most seconds its Relay's status goes unwritten while nothing changes (a change of phase, or of
    /// the session count by a tenth, is written at the next check).
    public var statusRefreshSeconds: Double = 300

    public init() {}

    static func hostName() -> String {
        let name = ProcessInfo.processInfo.hostName.lowercased()
        return Names.dns1123SubdomainError(name) == nil ? name : "relay"
    }

    /// The membership's configuration; nil for a relay without `controlServer`.
    public func membership() throws -> RelayMembershipConfiguration? {
        guard let server = self.controlServer else { return nil }
        guard let endpoint = HTTPEndpoint(url: server, defaultTLS: true), endpoint.tls else {
            throw ManifestError("controlServer: \"\(server)\" is not a URL like https://127.0.0.1:7700 (HTTPS only)")
        }
        let listen = try ListenAddress(self.listen, field: "listen")
        let advertised: [String]
        if let a = self.advertise {
            advertised = a
        } else if let ip = IPAddress(listen.host), !ip.isUnspecified {
            advertised = [listen.description]
        } else {
            throw ManifestError(
                "advertise: listen \(self.listen) is a wildcard, so say where agents reach the relay (--advertise IP:PORT)"
            )
        }
        let spec = RelaySpec(
            site: self.site,
            addresses: advertised,
            // The STUN addresses that name one address and port (not wildcards, not port 0).
            stunAddresses: try self.parsedSTUNListen().filter {
                $0.port != 0 && (IPAddress($0.host).map { !$0.isUnspecified } ?? false)
            }.map(\.description)
        )
        let relay = Relay(metadata: ObjectMeta(name: self.name), spec: spec)
        if let e = relay.validationErrors().first {
            let prefix = "spec.addresses"
            let field = e.path.hasPrefix(prefix) ? "advertise" + e.path.dropFirst(prefix.count) : e.path
            throw ManifestError("\(field): \(e.message)")
        }
        var m = RelayMembershipConfiguration(
            server: endpoint,
            name: self.name,
            joinToken: self.joinToken,
            caCertHash: self.caCertHash,
            dataDir: self.dataDir,
            spec: spec
        )
        m.statusInterval = .milliseconds(Int64(self.statusIntervalSeconds * 1000))
        m.statusRefresh = .milliseconds(Int64(self.statusRefreshSeconds * 1000))
        return m
    }

    /// The parsed STUN addresses; throws naming the bad entry.
    public func parsedSTUNListen() throws -> [ListenAddress] {
        guard !self.stunListen.isEmpty else { throw ManifestError("stunListen: give at least one address") }
        return try self.stunListen.enumerated().map { try ListenAddress($0.element, field: "stunListen[\($0.offset)]") }
    }

    /// Checks every field; the error names the first bad one.
    public func validate() throws {
        _ = try self.parsedSTUNListen()
        _ = try ListenAddress(self.adminListen, field: "adminListen")
        if self.software.utf8.count > 763 || self.software.count >= 128 {
            throw ManifestError("software: at most 127 characters")
        }
        if self.tcpIdleTimeoutSeconds < 1 { throw ManifestError("tcpIdleTimeoutSeconds: must be at least 1") }
        if self.maxTCPConnections < 1 { throw ManifestError("maxTCPConnections: must be at least 1") }
        _ = try LogLevels.parse(self.logLevel)
        if let e = Names.dns1123SubdomainError(self.name) { throw ManifestError("name: \(e)") }
        if let s = self.site, let e = Names.dns1123LabelError(s) { throw ManifestError("site: \(e)") }
        if let t = self.joinToken, JoinTokens.parse(t) == nil {
            throw ManifestError("joinToken: must look like abcdef.0123456789abcdef (6 and 16 of a-z, 0-9)")
        }
        if let h = self.caCertHash, !MeshTLS.isValidCAHash(h) {
            throw ManifestError("caCertHash: must be sha256: followed by 64 hex digits")
        }
        if (self.joinToken == nil) != (self.caCertHash == nil) {
            throw ManifestError(
                "joinToken and caCertHash go together: the hash is how the relay knows it joins the right control plane"
            )
        }
        if self.joinToken != nil && self.controlServer == nil {
            throw ManifestError("joinToken: a join needs controlServer (--server https://IP:7700)")
        }
        if !(self.statusIntervalSeconds >= 1) { throw ManifestError("statusIntervalSeconds: must be at least 1") }
        if !(self.statusRefreshSeconds >= self.statusIntervalSeconds) {
            throw ManifestError(
                "statusRefreshSeconds: must be at least statusIntervalSeconds (\(self.statusIntervalSeconds)), not \(self.statusRefreshSeconds)"
            )
        }
        _ = try self.membership()
    }

    /// The STUN server's configuration from these settings.
    public func stunConfiguration() throws -> STUNServerConfiguration {
        STUNServerConfiguration(
            listen: try self.parsedSTUNListen(),
            tcp: self.stunTCP,
            policy: STUNResponderPolicy(software: self.software.isEmpty ? nil : self.software),
            tcpIdleTimeout: .seconds(Int64(self.tcpIdleTimeoutSeconds)),
            maxTCPConnections: self.maxTCPConnections
        )
    }
}
