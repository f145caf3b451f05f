import Foundation
import MeshTestSupport
import Testing

/// The two-site lab of the end-to-end suites (`scripts/netlab` builds two sites behind gateways of the
/// given kinds and a cloud; `scripts/netlab-mesh` runs the mesh in it): the scripts, commands in one of its
/// hosts, an agent's `/peers`, and a lab that is torn down after use, with the parts' logs on failure.
struct TwoSiteLab {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path
    let bin = binaryDirectory()

    func script(_ name: String, _ args: [String]) async throws -> ProcessResult {
        try await run(Self.root + "/scripts/" + name, args, timeout: .seconds(180))
    }

    /// Runs `command` in host `host` of lab `prefix`.
    func inHost(_ prefix: String, _ host: String, _ command: [String], timeout: Int = 60) async throws -> ProcessResult
    {
        try await run("/usr/sbin/ip", ["netns", "exec", "\(prefix)-\(host)"] + command, timeout: .seconds(timeout))
    }

    /// The agent's `/peers` document at `host` (`meshctl peers -o json`); nil when it cannot be read.
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

    /// Whether both agents' NAT discovery found `mapping` (port-preserving: both sites behind `masq`), waited
    /// for before a first request so that each agent is up and homed on its relay.
    func bothDiscovered(_ prefix: String, mapping: String = "portPreserving") async -> Bool {
        await eventually(timeout: .seconds(20), every: .milliseconds(200)) {
            let a = (await self.peers(prefix, "a"))?["nat"] as? [String: Any]
            let b = (await self.peers(prefix, "b"))?["nat"] as? [String: Any]
            return a?["mapping"] as? String == mapping && b?["mapping"] as? String == mapping
        }
    }

    /// The first row of a `/peers` document (the link to the other site).
    func row(_ doc: [String: Any]?) -> [String: Any] { (doc?["items"] as? [[String: Any]])?.first ?? [:] }

    /// A lab of `siteA` x `siteB` (prefix `letter` + a number of this process) with the mesh started with
    /// `meshOptions` (and `netlabOptions` for `scripts/netlab up`); `body` gets the prefix and the mesh's state
    /// directory. Torn down after `body`.
    func with(
        _ siteA: String,
        _ siteB: String,
        letter: String,
        meshOptions: [String] = [],
        netlabOptions: [String] = [],
        _ body: (String, String) async throws -> Void
    ) async throws {
        let prefix = "\(letter)\(getpid() % 10_000)\(Int.random(in: 0..<10))"
        let up = try await self.script(
            "netlab",
            ["up", "--site-a", siteA, "--site-b", siteB, "--prefix", prefix] + netlabOptions
        )
        try #require(up.status == 0, "netlab up: \(up.stderr)")
        do {
            let mesh = try await self.script(
                "netlab-mesh",
                ["start", "--prefix", prefix, "--bin", self.bin] + meshOptions
            )
            try #require(mesh.status == 0, "netlab-mesh start: \(mesh.stderr)\(Self.logs(prefix))")
            try await body(prefix, "/run/netlab-\(prefix)-mesh")
        } catch {
            Issue.record("logs:\n\(Self.logs(prefix))")
            _ = try? await self.script("netlab", ["down", "--prefix", prefix])
            throw error
        }
        let down = try await self.script("netlab", ["down", "--prefix", prefix])
        #expect(down.status == 0, "netlab down: \(down.stderr)")
    }

    /// The last lines of every part's log in lab `prefix`.
    static func logs(_ prefix: String) -> String {
        let dir = "/run/netlab-\(prefix)-mesh/logs"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return names.sorted().map { name in
            let text = (try? String(contentsOfFile: dir + "/" + name, encoding: .utf8)) ?? ""
            return "--- \(name)\n" + text.split(separator: "\n").suffix(15).joined(separator: "\n")
        }.joined(separator: "\n")
    }
}
