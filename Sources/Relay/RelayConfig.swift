import MeshCore

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

    public init() {}

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
