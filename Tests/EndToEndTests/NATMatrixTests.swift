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
    .enabled(if: canUseNetns, "needs root and iproute2 to create network namespaces (CI runs as root)"),
    .rationed,
)
struct NATMatrixTests {
    let lab = TwoSiteLab()

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
            ("masq", "masq-rst", "punched", nil), ("masq-rst", "masq-rst", "punched", nil),
            ("masq", "random", "relayed", "peer mapping random"), ("random", "random", "relayed", "mapping random"),
            ("firewall", "masq", "relayed", "punch"), ("firewall", "firewall", "relayed", "punch"),
        ] as [(String, String, String, String?)]
    )
    func pairing(siteA: String, siteB: String, path: String, reason: String?) async throws {
        try await self.lab.with(siteA, siteB, letter: "m") { prefix, _ in
            try await self.check(prefix, siteA, siteB, path: path, reason: reason)
        }
    }

    func check(_ prefix: String, _ siteA: String, _ siteB: String, path: String, reason: String?) async throws {
        let page = "hello from site b\n"
        let url = "http://web.shop.svc.cluster.local/"
        // Both agents know their NAT (their first discovery) before the first request: the matrix is
        // about the link, not about an agent still starting.
        #expect(
            await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
                let a = (await self.lab.peers(prefix, "a"))?["nat"] as? [String: Any]
                let b = (await self.lab.peers(prefix, "b"))?["nat"] as? [String: Any]
                return a?["mapping"] as? String != nil && a?["mapping"] as? String != "unknown"
                    && b?["mapping"] as? String != nil && b?["mapping"] as? String != "unknown"
            },
            "NAT discovery did not finish"
        )
        // The first request: over whatever link is up first (the relay, in every pairing but public x public).
        let first = try await self.lab.inHost(
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
            doc = await self.lab.peers(prefix, "a")
            return self.lab.row(doc)["path"] as? String == path
        }
        #expect(settled, "a's link to b: \(self.lab.row(doc))")
        if path == "relayed" {
            // Give punching its first round, then the reason must be there.
            let explained = await eventually(timeout: .seconds(15), every: .milliseconds(250)) {
                doc = await self.lab.peers(prefix, "a")
                return (self.lab.row(doc)["reason"] as? String)?.contains(reason ?? "") == true
            }
            #expect(explained, "no reason containing \(reason ?? "-"): \(self.lab.row(doc))")
            #expect(self.lab.row(doc)["path"] as? String == "relayed", "\(self.lab.row(doc))")
        }
        // Every request succeeds, on the final path.
        for i in 0..<5 {
            let r = try await self.lab.inHost(prefix, "a", ["curl", "-s", "-m", "10", url])
            #expect(r.stdout == page, "request \(i): \(r.stdout) \(r.stderr)")
        }
        let row = self.lab.row(await self.lab.peers(prefix, "a"))
        #expect(row["path"] as? String == path, "\(row)")
        // meshctl ping: the path of each probe, ending on the final path.
        let ping = try await self.lab.inHost(
            prefix,
            "a",
            [self.lab.bin + "/meshctl", "ping", "b", "--count", "3", "--agent", "127.0.0.1:7780", "-o", "json"]
        )
        let probes =
            (try? JSONSerialization.jsonObject(with: Data(ping.stdout.utf8)) as? [String: Any])?["probes"]
            as? [[String: Any]] ?? []
        #expect(probes.last?["path"] as? String == path, "meshctl ping: \(ping.stdout) \(ping.stderr)")
        #expect(probes.last?["rttMicros"] is Int, "meshctl ping: \(ping.stdout)")
        let upgrade = row["upgradeMillis"] as? Int
        // The first byte never waits for a punch: the first stream takes the relayed link as soon as it is
        // up, punching runs beside it (a failed punch takes its timeout and a retry after 1 s or more). On a
        // quiet machine the first byte comes in 50-100 ms; 2 s leaves room for a loaded one (0.57 s was seen
        // at load 8 beside a build).
        #expect(firstByte < 2, "first byte \(firstByte) s")
        if path != "relayed" {
            #expect(upgrade != nil, "no upgrade time: \(row)")
            #expect((row["upgrades"] as? Int ?? 0) >= 1, "\(row)")
        }
        let nats = "\(row["localNAT"] as? String ?? "-") / \(row["peerNAT"] as? String ?? "-")"
        Self.report(
            "| \(siteA) × \(siteB) | \(path) | \(Int((firstByte * 1000).rounded())) ms | "
                + "\(upgrade.map { "\($0) ms" } ?? "-") | \(row["punchAttempts"] as? Int ?? 0) | \(nats) | "
                + "\(row["reason"] as? String ?? "-") |"
        )
    }
}

extension NATMatrixTests {
    /// A router that answers expired packets with an ICMP time exceeded (`scripts/netlab up --router-icmp`):
    /// the low-TTL first SYN draws it, and a Linux connect aborts on it. Each agent learns that once (in a
    /// round where it goes first) and punches without the low TTL from then on, so masq × masq still ends
    /// punched, in a later round (the third or fourth: 18-48 s, with the 1, 10 and 30 s backoff).
    @Test(
        "behind a router that answers expired TTLs with ICMP, the agents drop the low TTL and masq x masq still punches"
    )
    func routerAnsweringWithICMP() async throws {
        try await self.lab.with("masq", "masq", letter: "i", netlabOptions: ["--router-icmp"]) { prefix, dir in
            let url = "http://web.shop.svc.cluster.local/"
            // Both agents up (B too: with only A's discovery awaited, a first request once met B not yet homed
            // on its relay and got 502, and nothing punched after it).
            #expect(await self.lab.bothDiscovered(prefix))
            let first = try await self.lab.inHost(prefix, "a", ["curl", "-s", "-m", "10", url])
            #expect(first.stdout == "hello from site b\n", "\(first.stderr)")
            var row: [String: Any] = [:]
            // Rounds 1 and 2 (each side going first once) draw the ICMP; round 3 comes 10 s later, round 4
            // 30 s after that, round 5 60 s after that: a loaded machine can make round 3 or 4 miss its
            // window (seen under two `yes`), so the wait covers round 5. No stream is open after the first
            // request: the coordinator holds the relayed link between these rounds (past its 60 s idle
            // timeout), or round 5 would never come; B's end, the acceptor's, waits 120 s (the round 4 to 5
            // wait is 60 s: with the same timeout at both ends, B closed the link as round 5 began).
            let punched = await eventually(timeout: .seconds(150), every: .milliseconds(250)) {
                row = self.lab.row(await self.lab.peers(prefix, "a"))
                return row["path"] as? String == "punched"
            }
            #expect(punched, "\(row)")
            let logs = ["a", "b"].map {
                (try? String(contentsOfFile: dir + "/logs/agent-\($0).log", encoding: .utf8)) ?? ""
            }
            #expect(
                logs.contains { $0.contains("low-TTL first SYN drew an ICMP time exceeded") },
                "no agent learned that the low TTL draws an ICMP"
            )
            let again = try await self.lab.inHost(prefix, "a", ["curl", "-s", "-m", "10", url])
            #expect(again.stdout == "hello from site b\n")
            Self.report(
                "| masq × masq, router ICMP | \(row["path"] as? String ?? "-") | - | "
                    + "\((row["upgradeMillis"] as? Int).map { "\($0) ms" } ?? "-") | \(row["punchAttempts"] as? Int ?? 0) | - | - |"
            )
        }
    }
}

/// Relay first, then upgrade, under load: a transfer that starts relayed carries on while the link
/// upgrades; new streams go punched; the relay dies under a punched link's transfer; a punched link that
/// dies falls back to the relay.
@Suite(
    .serialized,
    .enabled(if: canUseNetns, "needs root and iproute2 to create network namespaces (CI runs as root)"),
    .rationed,
)
struct PunchedLinkTests {
    let lab = TwoSiteLab()

    func withLab(_ extra: [String], _ body: (String, String) async throws -> Void) async throws {
        try await self.lab.with("masq", "masq", letter: "u", meshOptions: extra) { prefix, dir in
            #expect(await self.lab.bothDiscovered(prefix))
            try await body(prefix, dir)
        }
    }

    /// `curl URL | sha256sum` at site A, in the background.
    func download(_ prefix: String, _ url: String, rate: String? = nil) throws -> Subprocess {
        let limit = rate.map { "--limit-rate \($0) " } ?? ""
        return try Subprocess(
            "/usr/sbin/ip",
            ["netns", "exec", "\(prefix)-a", "sh", "-c", "curl -s -m 300 \(limit)\(url) | sha256sum"]
        )
    }

    func path(_ prefix: String) async -> String? {
        self.lab.row(await self.lab.peers(prefix, "a"))["path"] as? String
    }

    @Test("1 GiB that starts relayed carries on while the link upgrades; new streams after it go punched")
    func transferAcrossTheUpgrade() async throws {
        try await self.withLab([]) { prefix, dir in
            // 1 GiB of zeros (sparse) at B, and its digest.
            let file = dir + "/web/huge.bin"
            #expect(FileManager.default.createFile(atPath: file, contents: nil))
            #expect(truncate(file, 1 << 30) == 0)
            let expected = try await run("/usr/bin/sha256sum", [file], timeout: .seconds(120)).stdout.prefix(64)
            // The first request of the link: relayed.
            let big = try self.download(prefix, "http://web.shop.svc.cluster.local:81/huge.bin")
            // The link upgrades while the transfer runs.
            #expect(
                await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
                    await self.path(prefix) == "punched"
                },
                "no upgrade during the transfer"
            )
            #expect(big.isRunning, "the transfer ended before the upgrade: measure with a slower one")
            let before = self.lab.row(await self.lab.peers(prefix, "a"))
            let sentBefore = before["bytesReceived"] as? Int ?? 0
            // New requests go over the punched link (its counters grow; the relayed one is not its row).
            for _ in 0..<3 {
                let r = try await self.lab.inHost(
                    prefix,
                    "a",
                    ["curl", "-s", "-m", "10", "http://web.shop.svc.cluster.local/"]
                )
                #expect(r.stdout == "hello from site b\n")
            }
            let after = self.lab.row(await self.lab.peers(prefix, "a"))
            #expect(after["path"] as? String == "punched")
            #expect((after["bytesReceived"] as? Int ?? 0) > sentBefore, "\(after)")
            #expect((after["upgrades"] as? Int ?? 0) == 1, "\(after)")
            // The transfer on the circuit completes, intact.
            let done = await big.wait(timeout: .seconds(300))
            #expect(done?.stdout.hasPrefix(String(expected)) == true, "1 GiB: \(String(describing: done))")
            // Its bytes went over the circuit, not the punched link.
            let final = self.lab.row(await self.lab.peers(prefix, "a"))
            #expect((final["bytesReceived"] as? Int ?? 0) < 1 << 29, "\(final)")
            print("1 GiB across the upgrade: upgrade in \(after["upgradeMillis"] ?? "-") ms")
        }
    }

    @Test(
        "the relay killed under a punched link's transfer: it completes; a punched link cut falls back to the restarted relay"
    )
    func relayKilledUnderAPunchedLink() async throws {
        try await self.withLab(["--one-relay", "--agent-env", "MESH_PUNCH_KEEPALIVE_SECONDS=1"]) { prefix, dir in
            let page = "hello from site b\n"
            let first = try await self.lab.inHost(
                prefix,
                "a",
                ["curl", "-s", "-m", "10", "http://web.shop.svc.cluster.local/"]
            )
            #expect(first.stdout == page)
            #expect(
                await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
                    await self.path(prefix) == "punched"
                }
            )
            let sha = try String(contentsOfFile: dir + "/web/big.bin.sha256", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            // 100 MiB at 20 MB/s over the punched link; the only relay dies under it.
            let big = try self.download(prefix, "http://web.shop.svc.cluster.local:81/big.bin", rate: "20M")
            #expect(
                await eventually(timeout: .seconds(10)) {
                    (self.lab.row(await self.lab.peers(prefix, "a"))["streams"] as? Int ?? 0) > 0
                }
            )
            let killed = try await self.lab.script("netlab-mesh", ["kill", "r1", "--prefix", prefix])
            #expect(killed.status == 0)
            let done = await big.wait(timeout: .seconds(120))
            #expect(done?.stdout.hasPrefix(sha) == true, "100 MiB under a dead relay: \(String(describing: done))")
            #expect(await self.path(prefix) == "punched")
            // The relay comes back; then the direct path is cut: the punched link's keepalive fails and new
            // streams go back to the relay.
            let restarted = try await self.lab.script("netlab-mesh", ["restart-relay", "r1", "--prefix", prefix])
            #expect(restarted.status == 0, "\(restarted.stderr)")
            #expect(
                await eventually(timeout: .seconds(20), every: .milliseconds(250)) {
                    ((await self.lab.peers(prefix, "a"))?["relay"] as? [String: Any])?["home"] as? String == "r1"
                }
            )
            let cut = try await self.lab.inHost(
                prefix,
                "gw-a",
                ["iptables", "-I", "FORWARD", "-d", "198.18.0.22", "-j", "DROP"]
            )
            #expect(cut.status == 0, "\(cut.stderr)")
            let cutAt = ContinuousClock.now
            var row: [String: Any] = [:]
            #expect(
                await eventually(timeout: .seconds(20), every: .milliseconds(100)) {
                    row = self.lab.row(await self.lab.peers(prefix, "a"))
                    return row["path"] as? String == "relayed"
                },
                "no fallback: \(row)"
            )
            let fellBackIn = ContinuousClock.now - cutAt
            let again = try await self.lab.inHost(
                prefix,
                "a",
                ["curl", "-s", "-m", "10", "http://web.shop.svc.cluster.local/"]
            )
            #expect(again.stdout == page, "after the fallback: \(again.stdout) \(again.stderr)")
            row = self.lab.row(await self.lab.peers(prefix, "a"))
            #expect((row["fallbacks"] as? Int ?? 0) >= 1, "\(row)")
            print("punched link cut: relayed again after \(fellBackIn)")
        }
    }
}
