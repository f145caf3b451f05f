import MeshCore
import Relay

/// The peer links' stream window, from the agent's configuration.
///
/// Each stream on a link grants its sender `linkStreamWindowKiB` before it must wait for a window update. With
/// yamux's 256 KiB a 1 GiB transfer sends a window update every 128 KiB received and the sender stalls whenever
/// the update is late; 1024 KiB cut the agents' CPU per GiB by about a third in `perf/links` (see its README).
/// The window is also the most a stream buffers unread, so it bounds memory: at most `maxStreams` × the window
/// per link in the worst case.
extension AgentConfig {
    /// yamux's own window.
    public static let defaultLinkStreamWindowKiB = Int(YamuxDefaults.initialWindow / 1024)
    /// The largest window accepted (16 MiB).
    public static let maxLinkStreamWindowKiB = 16 * 1024

    /// Checks ``linkStreamWindowKiB``.
    public func validateLinkStreamWindow() throws {
        let range = AgentConfig.defaultLinkStreamWindowKiB...AgentConfig.maxLinkStreamWindowKiB
        guard range.contains(self.linkStreamWindowKiB) else {
            throw ManifestError(
                "linkStreamWindowKiB: must be between \(range.lowerBound) and \(range.upperBound) (default \(range.lowerBound)), not \(self.linkStreamWindowKiB)"
            )
        }
    }

    /// Checks ``linkDataPath``.
    public func validateLinkDataPath() throws {
        guard ["nio", "loop"].contains(self.linkDataPath) else {
            throw ManifestError("linkDataPath: must be loop or nio (default loop), not \"\(self.linkDataPath)\"")
        }
    }

    /// The settings of this agent's peer links (with ``linkDataPath`` `loop`, the caller sets the loop).
    public func linkConfiguration() -> LinkConfiguration {
        var configuration = LinkConfiguration()
        let kib = min(
            max(self.linkStreamWindowKiB, AgentConfig.defaultLinkStreamWindowKiB),
            AgentConfig.maxLinkStreamWindowKiB
        )
        configuration.mux.receiveWindow = UInt32(kib * 1024)
        return configuration
    }
}
