import MeshCore
import NIOCore
import NodeAgent
import Relay

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Hole punching's settings in the agent's configuration (`punch`, `punchKeepaliveSeconds`,
/// `punchRetrySeconds`), checked and turned into the coordinator's `PunchConfiguration`.
///
/// The environment variables `MESH_PUNCH_OFF`, `MESH_PUNCH_KEEPALIVE_SECONDS` and `MESH_PUNCH_RETRY_SECONDS`
/// (one value: a retry every that many seconds) still override the file and the flags, for the lab and tests.
extension AgentConfig {
    /// The keepalive's bounds: a ping at least every 10 minutes (NATs drop idle TCP mappings after 5 minutes
    /// to 2 hours; 25 s stays under the shortest seen), and not more than 10 a second.
    public static let punchKeepaliveRange = 0.1...600.0
    /// A retry wait's bounds (seconds).
    public static let punchRetryRange = 0.1...86_400.0

    /// Checks the punch settings; the error names the field.
    public func validatePunch() throws {
        guard Self.punchKeepaliveRange.contains(self.punchKeepaliveSeconds) else {
            throw ManifestError(
                "punchKeepaliveSeconds: must be between 0.1 and 600 (default 25), not \(self.punchKeepaliveSeconds)"
            )
        }
        guard !self.punchRetrySeconds.isEmpty, self.punchRetrySeconds.count <= 32 else {
            throw ManifestError(
                "punchRetrySeconds: 1 to 32 waits (seconds; the last repeats), default [1, 10, 30, 60, 120]"
            )
        }
        for (i, s) in self.punchRetrySeconds.enumerated() where !Self.punchRetryRange.contains(s) {
            throw ManifestError("punchRetrySeconds[\(i)]: must be between 0.1 and 86400 seconds, not \(s)")
        }
    }

    /// The punch coordinator's settings: this configuration's, then the environment's overrides.
    public func punchConfiguration(
        linkPort: Int,
        environment: (String) -> String? = { getenv($0).map { String(cString: $0) } }
    ) -> PunchConfiguration {
        var configuration = PunchConfiguration()
        configuration.linkPort = linkPort
        configuration.enabled = self.punch
        configuration.keepaliveInterval = Self.amount(self.punchKeepaliveSeconds)
        configuration.retryBackoff = self.punchRetrySeconds.map(Self.amount)
        if environment("MESH_PUNCH_OFF") != nil { configuration.enabled = false }
        if let s = environment("MESH_PUNCH_KEEPALIVE_SECONDS").flatMap(Double.init),
            Self.punchKeepaliveRange.contains(s)
        {
            configuration.keepaliveInterval = Self.amount(s)
        }
        if let s = environment("MESH_PUNCH_RETRY_SECONDS").flatMap(Double.init), Self.punchRetryRange.contains(s) {
            configuration.retryBackoff = [Self.amount(s)]
        }
        return configuration
    }

    static func amount(_ seconds: Double) -> TimeAmount {
        .milliseconds(Int64((seconds * 1000).rounded()))
    }

    /// The host addresses a punch offers as this node's own: `nodeAddresses` when set, else the host's as its
    /// Node advertises them (not loopback, link-local or the mesh interface's), read each time.
    public func punchHostAddresses() -> @Sendable () -> [IPAddress] {
        let fixed = self.nodeAddresses
        let excluded: Set<String> = [self.interfaceName]
        return {
            let list = fixed.flatMap(HostAddresses.fixed) ?? HostAddresses.current(excludingInterfaces: excluded)
            return list.filter { $0.type != .hostname }.compactMap { IPAddress($0.address) }
        }
    }
}
