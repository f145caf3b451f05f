import Foundation
import MeshTestSupport
import Testing

/// The NAT matrix (issue 14): for each pairing of gateway kinds (`scripts/netlab`), the mesh runs with
/// hole punching on; an app at site A fetches B's page by name. Every request succeeds; the first one's
/// first byte comes over the relay without waiting for a punch; the link ends on the path theory allows:
/// direct when one side has no NAT (the NAT side dials), punched behind two endpoint-independent NATs,
/// relayed (with the reason) where a mapping is random or a firewall lets nothing through.
@Suite(
    .serialized,
    .enabled(if: canUseNetns, "needs root and iproute2 to create network namespaces (CI runs as root)")
)
struct NATMatrixTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    let bin = binaryDirectory()

    func script(_ name: String, _ args: [String]) async throws -> ProcessResult {
        try await run(Self.root + "/scripts/" + name, args, timeout: .seconds(180))
    }

    func inHost(_ prefix: String, _ host: String, _ command: [String], timeout: Int = 60) async throws -> ProcessResult
    {
        try await run("/usr/sbin/ip", ["netns", "exec", "\(prefix)-\(host)"] + command, timeout: .seconds(timeout))
    }

    func peers(_ prefix: String, _ host: String) async -> [String: Any]? {
        guard
            let r = try? await self.inHost(
                prefix,
                host,
                [self.bin + "/meshctl", "peers", "--agent", "127.0.0.1:7780", "-o", "json"]
            )
        else { return nil }
        return try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
    }

    func row(_ doc: [String: Any]?) -> [String: Any] { (doc?["items"] as? [[String: Any]])?.first ?? [:] }

    /// One pairing's line of the matrix (printed, and appended to `$NAT_MATRIX_OUT` when set).
    static func report(_ line: String) {
        print(line)
        if let out = ProcessInfo.processInfo.environment["NAT_MATRIX_OUT"],
            let h = FileHandle(forWritingAtPath: out)
                ?? {
                    _ = FileManager.default.createFile(atPath: out, contents: nil)
                    return FileHandle(forWritingAtPath: out)
                }()
        {
            h.seekToEndOfFile()
            h.write(Data((line + "\n").utf8))
            try? h.close()
        }
    }

    @Test(
        "the NAT matrix: every request succeeds, the first byte never waits for a punch, the final path is theory's",
        arguments: [
            ("public", "masq", "direct", nil), ("masq", "masq", "punched", nil),
            ("masq", "masq-rst", "punched", nil), ("masq-rst", "masq-rst", "relayed", "punch"),
            ("masq", "random", "relayed", "peer mapping random"), ("random", "random", "relayed", "mapping random"),
            ("firewall", "masq", "relayed", "punch"), ("firewall", "firewall", "relayed", "punch"),
        ] as [(String, String, String, String?)]
    )
    func pairing(siteA: String, siteB: String, path: String, reason: String?) async throws {
        let prefix = "m\(getpid() % 10_000)\(Int.random(in: 0..<10))"
        let up = try await self.script("netlab", ["up", "--site-a", siteA, "--site-b", siteB, "--prefix", prefix])
        try #require(up.status == 0, "netlab up: \(up.stderr)")
        do {
            let mesh = try await self.script("netlab-mesh", ["start", "--prefix", prefix, "--bin", self.bin])
            try #require(mesh.status == 0, "netlab-mesh start: \(mesh.stderr)")
            try await self.check(prefix, siteA, siteB, path: path, reason: reason)
        } catch {
            Issue.record("logs:\n\(CrossSiteTests.logs(prefix))")
            _ = try? await self.script("netlab", ["down", "--prefix", prefix])
            throw error
        }
        let down = try await self.script("netlab", ["down", "--prefix", prefix])
        #expect(down.status == 0, "netlab down: \(down.stderr)")
    }

    func check(_ prefix: String, _ siteA: String, _ siteB: String, path: String, reason: String?) async throws {
        let page = "hello from site b\n"
        let url = "http://web.shop.svc.cluster.local/"
        // Both agents know their NAT (their first discovery) before the first request: the matrix is
        // about the link, not about an agent still starting.
        #expect(
            await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
                let a = (await self.peers(prefix, "a"))?["nat"] as? [String: Any]
                let b = (await self.peers(prefix, "b"))?["nat"] as? [String: Any]
                return a?["mapping"] as? String != nil && a?["mapping"] as? String != "unknown"
                    && b?["mapping"] as? String != nil && b?["mapping"] as? String != "unknown"
            },
            "NAT discovery did not finish"
        )
        // The first request: over whatever link is up first (the relay, in every pairing but public x public).
        let first = try await self.inHost(
            prefix,
            "a",
            ["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code} %{time_starttransfer}", url]
        )
        let parts = first.stdout.split(separator: " ")
        #expect(parts.first == "200", "first request: \(first.stdout) \(first.stderr)")
        let firstByte = Double(parts.last ?? "") ?? .infinity
        // The final path.
        var doc: [String: Any]?
        let settled = await eventually(timeout: .seconds(40), every: .milliseconds(250)) {
            doc = await self.peers(prefix, "a")
            return self.row(doc)["path"] as? String == path
        }
        #expect(settled, "a's link to b: \(self.row(doc))")
        if path == "relayed" {
            // Give punching its first round, then the reason must be there.
            let explained = await eventually(timeout: .seconds(15), every: .milliseconds(250)) {
                doc = await self.peers(prefix, "a")
                return (self.row(doc)["reason"] as? String)?.contains(reason ?? "") == true
            }
            #expect(explained, "no reason containing \(reason ?? "-"): \(self.row(doc))")
            #expect(self.row(doc)["path"] as? String == "relayed", "\(self.row(doc))")
        }
        // Every request succeeds, on the final path.
        for i in 0..<5 {
            let r = try await self.inHost(prefix, "a", ["curl", "-s", "-m", "10", url])
            #expect(r.stdout == page, "request \(i): \(r.stdout) \(r.stderr)")
        }
        let row = self.row(await self.peers(prefix, "a"))
        #expect(row["path"] as? String == path, "\(row)")
        let upgrade = row["upgradeMillis"] as? Int
        if path != "relayed" {
            let upgrade = try #require(upgrade, "no upgrade time: \(row)")
            // The first byte came before the upgrade: it did not wait for the punch.
            #expect(firstByte * 1000 < Double(upgrade), "first byte \(firstByte) s, upgrade \(upgrade) ms")
            #expect((row["upgrades"] as? Int ?? 0) >= 1, "\(row)")
        } else {
            #expect(firstByte < 1.0, "first byte \(firstByte) s")
        }
        let nats = "\(row["localNAT"] as? String ?? "-") / \(row["peerNAT"] as? String ?? "-")"
        Self.report(
            "| \(siteA) × \(siteB) | \(path) | \(Int((firstByte * 1000).rounded())) ms | "
                + "\(upgrade.map { "\($0) ms" } ?? "-") | \(nats) | \(row["reason"] as? String ?? "-") |"
        )
    }
}
