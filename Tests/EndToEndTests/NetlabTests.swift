import Foundation
import MeshTestSupport
import Testing

/// scripts/netlab, the two-site lab the cross-NAT tests and users share: for each gateway kind, what
/// `scripts/netlab check` asserts (reaching the cloud, unsolicited SYNs dropped, refused or accepted, ports
/// kept or randomised, a firewall site reaching nothing but the cloud) holds on a lab it builds.
@Suite(
    .serialized,
    .enabled(if: canUseNetns, "needs root and iproute2 to create network namespaces (CI runs as root)"),
    .rationed,
)
struct NetlabTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    func netlab(_ args: [String]) async throws -> ProcessResult {
        try await run(Self.root + "/scripts/netlab", args, timeout: .seconds(120))
    }

    @Test(arguments: [("public", "masq-rst"), ("masq", "random"), ("firewall", "masq")])
    func gatewayKindsBehaveAsDocumented(siteA: String, siteB: String) async throws {
        let prefix = "t\(getpid() % 10_000)\(Int.random(in: 0..<10))"
        let up = try await self.netlab(["up", "--site-a", siteA, "--site-b", siteB, "--prefix", prefix])
        #expect(up.status == 0, "netlab up failed: \(up.stderr)")
        let check = up.status == 0 ? try await self.netlab(["check", "--prefix", prefix]) : nil
        let down = try await self.netlab(["down", "--prefix", prefix])
        #expect(down.status == 0, "netlab down failed: \(down.stderr)")
        let left = try await run("/usr/sbin/ip", ["netns", "list"])
        #expect(!left.stdout.contains("\(prefix)-"), "namespaces left behind: \(left.stdout)")
        guard let check else { return }
        #expect(check.status == 0, "netlab check (\(siteA) x \(siteB)):\n\(check.stdout)\(check.stderr)")
        #expect(check.stdout.contains(" passed, 0 failed"), "\(check.stdout)")
        #expect(up.stdout.contains("NETLAB_A_KIND=\(siteA)") && up.stdout.contains("NETLAB_B_KIND=\(siteB)"))
    }
}
