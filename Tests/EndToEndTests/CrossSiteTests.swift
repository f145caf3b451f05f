import Foundation
import MeshTestSupport
import Testing

/// The mission, with the real binaries in network namespaces (`scripts/netlab` builds two sites behind
/// gateways of the given kinds and a cloud; `scripts/netlab-mesh` runs the control plane, two relays, an
/// agent per site and site B's backends): an app at site A reaches `web.shop.svc.cluster.local`, served at
/// site B, by name, over a peer link (direct where B can be dialed, through a relay otherwise).
@Suite(
    .serialized,
    .enabled(if: canUseNetns, "needs root and iproute2 to create network namespaces (CI runs as root)"),
    .rationed,
)
struct CrossSiteTests {
    let lab = TwoSiteLab()

    /// A lab of `siteA` x `siteB` with the mesh running in it, torn down after `body`.
    func withLab(
        _ siteA: String,
        _ siteB: String,
        splitRelays: Bool = false,
        noPunch: Bool = false,
        _ body: (String, String) async throws -> Void
    ) async throws {
        try await self.lab.with(
            siteA,
            siteB,
            letter: "x",
            meshOptions: (splitRelays ? ["--split-relays"] : []) + (noPunch ? ["--no-punch"] : []),
            body
        )
    }

    /// `curl -s` of `url` at site A (until it answers `expect`, within `timeout`).
    func curlUntil(_ prefix: String, _ url: String, expect: String, timeout: Duration = .seconds(30)) async -> String {
        var last = ""
        _ = await eventually(timeout: timeout, every: .milliseconds(250)) {
            let r = try? await self.lab.inHost(prefix, "a", ["curl", "-s", "-m", "5", url])
            last = (r?.stdout ?? "") + (r?.stderr ?? "")
            return r?.stdout == expect
        }
        return last
    }

    @Test("a relay killed under relayed links: agents re-home within 5 s, new requests work, open streams end")
    func relayFailover() async throws {
        // No hole punching: the links must stay relayed for the relay's death to matter.
        try await self.withLab("masq", "masq", noPunch: true) { prefix, dir in
            let page = "hello from site b\n"
            let first = await self.curlUntil(prefix, "http://web.shop.svc.cluster.local/", expect: page)
            #expect(first == page)
            let home = try #require((await self.lab.peers(prefix, "a"))?["relay"] as? [String: Any])
            let dead = try #require(home["home"] as? String)
            let other = dead == "r1" ? "r2" : "r1"
            // A slow download holds a stream on the circuit through the relay about to die.
            let slow = try Subprocess(
                "/usr/sbin/ip",
                [
                    "netns", "exec", "\(prefix)-a", "curl", "-s", "-o", "/dev/null", "--limit-rate", "1M", "-m", "60",
                    "-w", "%{http_code} %{size_download}", "http://web.shop.svc.cluster.local:81/big.bin",
                ]
            )
            #expect(
                await eventually(timeout: .seconds(10)) {
                    let items = (await self.lab.peers(prefix, "a"))?["items"] as? [[String: Any]]
                    return (items?.first?["streams"] as? Int ?? 0) > 0
                }
            )
            let killed = try await self.lab.script("netlab-mesh", ["kill", dead, "--prefix", prefix])
            #expect(killed.status == 0)
            let clock = ContinuousClock()
            let start = clock.now
            let rehomed = await eventually(timeout: .seconds(5), every: .milliseconds(100)) {
                let relay = (await self.lab.peers(prefix, "a"))?["relay"] as? [String: Any]
                return relay?["home"] as? String == other
            }
            #expect(rehomed, "a did not re-home to \(other) within 5 s")
            let took = clock.now - start
            // The stream on the dead circuit ends (curl exits with a partial transfer), it does not hang
            // until curl's own 60 s limit.
            let ended = await slow.wait(timeout: .seconds(20))
            #expect(ended != nil && ended?.status != 0, "the download did not end: \(String(describing: ended))")
            slow.signal(SIGKILL)
            // New requests get through the other relay.
            let after = await self.curlUntil(prefix, "http://web.shop.svc.cluster.local/", expect: page)
            #expect(after == page, "after \(dead) died: \(after)")
            let items = (await self.lab.peers(prefix, "a"))?["items"] as? [[String: Any]]
            #expect(items?.first?["relay"] as? String == other)
            print("re-homed from \(dead) to \(other) in \(took)")
        }
    }

    @Test("the relay never sees the link's plaintext: a marker sent through a relayed link is not in a capture")
    func theRelayCannotReadTheLink() async throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/tcpdump") else {
            Issue.record("tcpdump is missing (scripts/bootstrap installs it)")
            return
        }
        try await self.withLab("masq", "masq", noPunch: true) { prefix, dir in
            let page = "hello from site b\n"
            #expect(await self.curlUntil(prefix, "http://web.shop.svc.cluster.local/", expect: page) == page)
            let pcap = dir + "/relay.pcap"
            let capture = try Subprocess(
                "/usr/sbin/ip",
                [
                    "netns", "exec", "\(prefix)-cloud", "tcpdump", "-i", "wan", "-U", "-s", "0", "-w", pcap,
                    "tcp port 7800",
                ]
            )
            #expect(await eventually(timeout: .seconds(10)) { capture.stderr.contains("listening on") })
            let marker = "MARKER-\(UInt64.random(in: 1..<UInt64.max))"
            for _ in 0..<3 {
                let r = try await self.lab.inHost(
                    prefix,
                    "a",
                    ["curl", "-s", "-H", "X-Marker: \(marker)", "http://web.shop.svc.cluster.local/?q=\(marker)"]
                )
                #expect(r.stdout == page)
            }
            // Give tcpdump a moment to write what it saw (-U: per packet), then stop it.
            let captured = await eventually(timeout: .seconds(5)) {
                ((try? FileManager.default.attributesOfItem(atPath: pcap)[.size] as? Int) ?? 0) > 2_000
            }
            capture.signal(SIGINT)
            _ = await capture.wait(timeout: .seconds(5))
            #expect(captured, "the capture holds no relay traffic: \(capture.stderr)")
            let bytes = try Data(contentsOf: URL(fileURLWithPath: pcap))
            #expect(bytes.count > 2_000)
            #expect(bytes.range(of: Data(marker.utf8)) == nil, "the marker crossed the relay in the clear")
            #expect(bytes.range(of: Data("hello from site b".utf8)) == nil, "the page crossed the relay in the clear")
        }
    }

    /// The tail of every log of the lab's mesh, for a failure's message.

    @Test(
        "curl by name from site A to site B; 100 MiB intact over L4 and L7; UDP echo; the path in meshctl peers",
        arguments: [
            ("public", "public", "direct", false), ("masq", "masq", "punched", false),
            ("masq", "firewall", "relayed", true), ("firewall", "firewall", "relayed", false),
        ]
    )
    func aServiceAtAnotherSiteByName(siteA: String, siteB: String, path: String, splitRelays: Bool) async throws {
        try await self.withLab(siteA, siteB, splitRelays: splitRelays) { prefix, dir in
            // The app at site A resolves through the agent (/etc/netns/P-a/resolv.conf) and gets B's page.
            var curl = ProcessResult(status: -1, stdout: "", stderr: "")
            let served = await eventually(timeout: .seconds(30), every: .milliseconds(250)) {
                curl =
                    (try? await self.lab.inHost(
                        prefix,
                        "a",
                        ["curl", "-s", "-m", "10", "-w", " %{http_code}", "http://web.shop.svc.cluster.local/"]
                    )) ?? curl
                return curl.stdout == "hello from site b\n 200"
            }
            #expect(served, "curl: \(curl.stdout) \(curl.stderr)")
            // Relay first, then upgrade (where the NATs allow it): the transfers below run on the final path.
            var last: [String: Any]?
            let onPath = await eventually(timeout: .seconds(30), every: .milliseconds(250)) {
                last = await self.lab.peers(prefix, "a")
                return (last?["items"] as? [[String: Any]])?.first?["path"] as? String == path
            }
            #expect(
                onPath,
                "the link to b never went \(path): /peers at a \(String(describing: last))\n\(TwoSiteLab.logs(prefix))"
            )

            // 100 MiB over the L4 route (port 81) and the L7 route (port 80), checked by SHA-256.
            let sha = try String(contentsOfFile: dir + "/web/big.bin.sha256", encoding: .utf8)
                .trimmingCharacters(in: .whitespacesAndNewlines)
            for port in [81, 80] {
                let got = try await self.lab.inHost(
                    prefix,
                    "a",
                    ["sh", "-c", "curl -s -m 150 http://web.shop.svc.cluster.local:\(port)/big.bin | sha256sum"],
                    timeout: 160
                )
                #expect(got.stdout.hasPrefix(sha), "port \(port): \(got.stdout)\(got.stderr)")
            }

            // A UDP echo at B, by name.
            let udp = try await self.lab.inHost(
                prefix,
                "a",
                [
                    "python3", "-c",
                    """
                    import socket
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
                    ip = socket.gethostbyname("echo.shop.svc.cluster.local")
                    for i in range(3):
                        s.sendto(b"ping%d" % i, (ip, 9053)); print(s.recvfrom(100)[0].decode())
                    """,
                ]
            )
            #expect(udp.stdout == "echo:ping0\necho:ping1\necho:ping2\n", "\(udp.stdout)\(udp.stderr)")

            // The operator's view from A: one link to b, on the expected path.
            let peers = try await self.lab.inHost(
                prefix,
                "a",
                [self.lab.bin + "/meshctl", "peers", "--agent", "127.0.0.1:7780", "-o", "json"]
            )
            #expect(peers.status == 0, "\(peers.stderr)")
            let doc = try JSONSerialization.jsonObject(with: Data(peers.stdout.utf8)) as? [String: Any]
            let items = doc?["items"] as? [[String: Any]] ?? []
            #expect(items.count == 1, "\(peers.stdout)")
            let b = items.first ?? [:]
            #expect(b["node"] as? String == "b" && b["site"] as? String == "b")
            #expect(b["path"] as? String == path, "\(peers.stdout)")
            #expect((b["bytesReceived"] as? Int ?? 0) > 200 * 1024 * 1024, "\(peers.stdout)")
            #expect(b["rttMicros"] is Int)
            if path == "relayed" {
                #expect(b["relay"] is String, "\(peers.stdout)")
            }
            // meshctl route: B's endpoint of web, reached over the link on the same path, counters moved.
            let route = try await self.lab.inHost(
                prefix,
                "a",
                [self.lab.bin + "/meshctl", "route", "web.shop", "--agent", "127.0.0.1:7780", "-o", "json"]
            )
            #expect(route.status == 0, "\(route.stderr)")
            let routeDoc = try JSONSerialization.jsonObject(with: Data(route.stdout.utf8)) as? [String: Any]
            let endpoints = routeDoc?["endpoints"] as? [[String: Any]] ?? []
            #expect(!endpoints.isEmpty, "\(route.stdout)")
            for e in endpoints {
                #expect(e["node"] as? String == "b" && e["via"] as? String == "b", "\(route.stdout)")
                #expect(e["path"] as? String == path, "\(route.stdout)")
                #expect(e["rttMicros"] is Int, "\(route.stdout)")
            }
            #expect(endpoints.contains { ($0["total"] as? Int ?? 0) > 0 }, "\(route.stdout)")
            // meshctl trace: one request by name, the endpoint at b over the link on the same path.
            let trace = try await self.lab.inHost(
                prefix,
                "a",
                [self.lab.bin + "/meshctl", "trace", "web.shop", "--agent", "127.0.0.1:7780", "-o", "json"]
            )
            #expect(trace.status == 0, "\(trace.stderr)")
            let traceDoc = try JSONSerialization.jsonObject(with: Data(trace.stdout.utf8)) as? [String: Any]
            let proxy = traceDoc?["proxy"] as? [String: Any]
            let used = (proxy?["attempts"] as? [[String: Any]])?.last
            #expect(used?["via"] as? String == "b" && used?["path"] as? String == path, "\(trace.stdout)")
            #expect(proxy?["status"] as? Int == 200, "\(trace.stdout)")
            #expect((traceDoc?["dns"] as? [String: Any])?["source"] as? String == "zone", "\(trace.stdout)")
            // meshctl status: connected, with its home relay.
            let status = try await self.lab.inHost(
                prefix,
                "a",
                [self.lab.bin + "/meshctl", "status", "--agent", "127.0.0.1:7780", "-o", "json"]
            )
            let statusDoc = try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any]
            #expect((statusDoc?["control"] as? [String: Any])?["state"] as? String == "connected", "\(status.stdout)")
            #expect(statusDoc?["site"] as? String == "a", "\(status.stdout)")
            #expect((statusDoc?["relay"] as? [String: Any])?["home"] is String, "\(status.stdout)")

            if splitRelays {
                // a homes on r1 and b on r2: the circuit was forwarded relay to relay.
                let relay = doc?["relay"] as? [String: Any]
                #expect(relay?["home"] as? String == "r1", "\(peers.stdout)")
                let bStatus = await self.lab.peers(prefix, "b")
                #expect((bStatus?["relay"] as? [String: Any])?["home"] as? String == "r2")
            }

            // The control plane goes away and comes back: the link and the service stay as they were.
            let killed = try await self.lab.script("netlab-mesh", ["kill", "control", "--prefix", prefix])
            #expect(killed.status == 0, "\(killed.stderr)")
            let offline = try await self.lab.inHost(
                prefix,
                "a",
                ["curl", "-s", "-m", "10", "http://web.shop.svc.cluster.local/"]
            )
            #expect(offline.stdout == "hello from site b\n", "control plane down: \(offline.stdout)\(offline.stderr)")
            let restarted = try await self.lab.script("netlab-mesh", ["restart-control", "--prefix", prefix])
            #expect(restarted.status == 0, "\(restarted.stderr)")
            let again = try await self.lab.inHost(
                prefix,
                "a",
                ["curl", "-s", "-m", "10", "http://web.shop.svc.cluster.local/"]
            )
            #expect(again.stdout == "hello from site b\n", "control plane back: \(again.stdout)\(again.stderr)")
            let after = try await self.lab.inHost(
                prefix,
                "a",
                [self.lab.bin + "/meshctl", "peers", "--agent", "127.0.0.1:7780", "-o", "json"]
            )
            let afterItems =
                (try? JSONSerialization.jsonObject(with: Data(after.stdout.utf8)) as? [String: Any])?["items"]
                as? [[String: Any]] ?? []
            #expect(
                afterItems.first?["since"] as? String == b["since"] as? String,
                "the link was replaced: \(after.stdout)"
            )
        }
    }
}
