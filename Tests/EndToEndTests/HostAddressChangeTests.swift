import Foundation
import MeshTestSupport
import Testing

/// Host addresses that change under a running agent (issue 14): the agent watches them over netlink,
/// runs its NAT discovery again at once, and its Node's `status.candidates` follow. The agents' heartbeat
/// is 300 s here and the discovery timer 60 s, so only the netlink watch can bring the change in time.
@Suite(
    .serialized,
    .enabled(if: canUseNetns, "needs root and iproute2 to create network namespaces (CI runs as root)"),
    .rationed,
)
struct HostAddressChangeTests {
    let lab = TwoSiteLab()

    /// Node `node`'s `status.candidates.local` (meshctl get node -o json in the cloud host).
    func candidates(_ prefix: String, _ dir: String, _ node: String) async -> [String] {
        guard
            let r = try? await self.lab.inHost(
                prefix,
                "cloud",
                [
                    "env", "MESHCONFIG=\(dir)/control/admin.meshconfig", "HOME=\(dir)", self.lab.bin + "/meshctl",
                    "get",
                    "node", node, "-o", "json",
                ]
            ),
            let doc = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
            let status = doc["status"] as? [String: Any],
            let candidates = status["candidates"] as? [String: Any]
        else { return [] }
        return candidates["local"] as? [String] ?? []
    }

    /// `/peers`' `nat.local` at `host`.
    func peersLocal(_ prefix: String, _ host: String) async -> [String] {
        ((await self.lab.peers(prefix, host))?["nat"] as? [String: Any])?["local"] as? [String] ?? []
    }

    @Test("an address added to (then removed from) the host shows in its Node's status.candidates within seconds")
    func addressAddedAndRemoved() async throws {
        let config = FileManager.default.temporaryDirectory.appendingPathComponent("hostaddr-\(getpid()).yaml").path
        try "heartbeatIntervalSeconds: 300\n".write(toFile: config, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: config) }
        try await self.lab.with("masq", "masq", letter: "h", meshOptions: ["--agent-config", config]) { prefix, dir in
            // The first discovery is in the Node: A's own address with the link port.
            var local: [String] = []
            #expect(
                await eventually(timeout: .seconds(30), every: .milliseconds(250)) {
                    local = await self.candidates(prefix, dir, "a")
                    return local.contains { $0.hasPrefix("198.19.1.2:") }
                },
                "no first candidates: \(local)"
            )
            #expect(!local.contains { $0.hasPrefix("198.19.1.77:") })
            // A second address on A's interface (inside the lab's 198.18.0.0/15).
            let add = try await self.lab.inHost(prefix, "a", ["ip", "addr", "add", "198.19.1.77/24", "dev", "eth0"])
            #expect(add.status == 0, "\(add.stderr)")
            let added = ContinuousClock.now
            var seen: [String] = []
            #expect(
                await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
                    seen = await self.peersLocal(prefix, "a")
                    return seen.contains { $0.hasPrefix("198.19.1.77:") }
                },
                "the agent's discovery did not see the new address: \(seen)"
            )
            let discovered = ContinuousClock.now - added
            #expect(
                await eventually(timeout: .seconds(20), every: .milliseconds(250)) {
                    local = await self.candidates(prefix, dir, "a")
                    return local.contains { $0.hasPrefix("198.19.1.77:") }
                        && local.contains { $0.hasPrefix("198.19.1.2:") }
                },
                "the Node's status.candidates did not follow: \(local)"
            )
            let published = ContinuousClock.now - added
            // Removed again: gone from the candidates too.
            let del = try await self.lab.inHost(prefix, "a", ["ip", "addr", "del", "198.19.1.77/24", "dev", "eth0"])
            #expect(del.status == 0, "\(del.stderr)")
            #expect(
                await eventually(timeout: .seconds(20), every: .milliseconds(250)) {
                    local = await self.candidates(prefix, dir, "a")
                    return !local.contains { $0.hasPrefix("198.19.1.77:") }
                        && local.contains { $0.hasPrefix("198.19.1.2:") }
                },
                "the removed address stayed in status.candidates: \(local)"
            )
            // B, whose addresses did not change, kept its own.
            #expect(await self.candidates(prefix, dir, "b").contains { $0.hasPrefix("198.19.2.2:") })
            print("host address added: in the discovery after \(discovered), in the Node's status after \(published)")
        }
    }
}
