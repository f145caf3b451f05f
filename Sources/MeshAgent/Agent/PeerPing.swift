import MeshCore
import NIOCore
import Relay

/// `GET /ping?node=NODE&count=N`, like `tailscale ping`: probes the link to NODE (dialing it when there
/// is none) with mux pings, one every `intervalMillis`, each with the path it took and its RTT, until the
/// path is direct or punched or `count` probes are done.
struct PeerPing {
    struct Probe: Codable, Sendable, Equatable {
        var seq: Int
        /// `direct`, `punched` or `relayed`; nil when the probe failed.
        var path: String?
        var relay: String?
        var rttMicros: Int64?
        var error: String?
    }

    struct Result: Codable, Sendable, Equatable {
        var node: String
        var probes: [Probe]
        /// Whether the last probe went straight (direct or punched).
        var direct: Bool
    }

    let links: LinkManager

    func run(node: String, count: Int, interval: Duration) async -> Result {
        var probes: [Probe] = []
        for seq in 1...max(1, min(count, 100)) {
            if seq > 1 { try? await Task.sleep(for: interval) }
            do {
                let link = try await self.links.link(to: node)
                let rtt = try await link.ping().get()
                probes.append(
                    Probe(
                        seq: seq,
                        path: link.path.description,
                        relay: link.path.relay,
                        rttMicros: rtt.nanoseconds / 1000
                    )
                )
                if link.path.isDirect { break }
            } catch {
                probes.append(Probe(seq: seq, error: "\(error)"))
            }
        }
        let last = probes.last
        return Result(node: node, probes: probes, direct: last?.path != nil && last?.relay == nil)
    }
}
