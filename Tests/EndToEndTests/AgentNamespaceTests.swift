import Foundation
import MeshCore
import MeshTestSupport
import Testing

/// Whether this process may create network namespaces (root with iproute2).
let canUseNetns: Bool = {
    guard getuid() == 0,
        FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
            || FileManager.default.isExecutableFile(atPath: "/sbin/ip")
    else {
        return false
    }
    return true
}()

/// The real binaries in a network namespace of their own, the agent holding its VIPs on `mesh0`.
@Suite(
    .serialized,
    .enabled(if: canUseNetns, "needs root and iproute2 to create a network namespace (CI runs as root)"),
    .rationed,
)
struct AgentNamespaceTests {
    let bin = binaryDirectory()

    func ip(_ args: [String]) async throws -> ProcessResult {
        try await run("/usr/sbin/ip", args, timeout: .seconds(20))
    }

    func inNS(_ ns: String, _ path: String, _ args: [String], stdin: String? = nil) async throws -> ProcessResult {
        try await run("/usr/sbin/ip", ["netns", "exec", ns, path] + args, stdin: stdin, timeout: .seconds(30))
    }

    @Test func agentHoldsVIPsOnMesh0AndLeavesNothingBehind() async throws {
        let ns = "meshe2e-\(getpid() % 100_000)-\(Int.random(in: 0..<10_000))"
        _ = try await self.ip(["netns", "add", ns])
        defer {
            // Processes in the namespace are ours; the namespace goes with the test.
            _ = try? runBlocking(["ip", "netns", "delete", ns])
        }
        _ = try await self.ip(["-n", ns, "link", "set", "lo", "up"])
        let dir = TempDir()
        // A backend inside the namespace (started first: it takes a while to listen).
        let backend = try Subprocess(
            "/usr/sbin/ip",
            ["netns", "exec", ns, "python3", "-m", "http.server", "18080", "--bind", "127.0.0.1"]
        )
        defer { backend.signal(SIGKILL) }
        let control = try Subprocess(
            "/usr/sbin/ip",
            [
                "netns", "exec", ns, self.bin + "/mesh-control", "--listen", "127.0.0.1:7700", "--data-dir",
                dir.path + "/control",
                "--service-cidr", "198.18.100.0/24",
            ]
        )
        defer { control.signal(SIGKILL) }
        // meshctl uses the admin credentials mesh-control wrote; a join token enrols the agent.
        let env = [
            "MESHCONFIG": dir.path + "/control/admin.meshconfig", "XDG_CONFIG_HOME": dir.path + "/xdg-config",
        ]
        var created = ProcessResult(status: -1, stdout: "", stderr: "")
        let controlUp = await eventually(timeout: .seconds(20)) {
            created =
                (try? await self.inNS(
                    ns,
                    "/usr/bin/env",
                    env.map { "\($0)=\($1)" } + [
                        self.bin + "/meshctl", "token", "create", "--usages", "1", "-o", "json",
                    ]
                )) ?? created
            return created.status == 0
        }
        #expect(controlUp, "\(created.stderr)\n\(control.stderr)")
        let token = try JSONDecoder().decode(BootstrapTokenSecret.self, from: Data(created.stdout.utf8))
        let agent = try Subprocess(
            "/usr/sbin/ip",
            [
                "netns", "exec", ns, self.bin + "/mesh-agent", "--server", "https://127.0.0.1:7700", "--data-dir",
                dir.path + "/agent",
                "--interface-mode", "meshInterface", "--node-name", "ns-node",
                "--join-token", token.token, "--ca-cert-hash", token.caCertHash,
            ]
        )
        defer { agent.signal(SIGKILL) }

        let manifest = """
            apiVersion: mesh.edge/v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec: {ports: [{name: http, port: 80, protocol: HTTP}, {name: raw, port: 81, protocol: TCP}]}
            ---
            apiVersion: mesh.edge/v1
            kind: Endpoints
            metadata: {name: web, namespace: shop}
            spec: {addresses: [{ip: 127.0.0.1, ports: [{name: http, port: 18080}, {name: raw, port: 18080}]}]}
            """
        var applied = ProcessResult(status: -1, stdout: "", stderr: "")
        let up = await eventually(timeout: .seconds(20)) {
            applied =
                (try? await self.inNS(
                    ns,
                    "/usr/bin/env",
                    env.map { "\($0)=\($1)" } + [self.bin + "/meshctl", "apply", "-f", "-"],
                    stdin: manifest
                )) ?? applied
            return applied.status == 0
        }
        #expect(up, "\(applied.stderr)\n\(control.stderr)")

        // mesh0 holds the DNS address and the VIP.
        var addrs = ""
        let holds = await eventually(timeout: .seconds(20)) {
            addrs = (try? await self.ip(["-n", ns, "addr", "show", "mesh0"]).stdout) ?? ""
            return addrs.contains("169.254.96.16") && addrs.contains("198.18.100.1")
        }
        #expect(holds, "\(addrs)\n\(agent.stderr)")

        // DNS on 169.254.96.16:53 answers the name with the VIP, and the VIP proxies to the backend.
        let dig = try await self.inNS(
            ns,
            "/usr/bin/dig",
            ["+short", "+time=2", "@169.254.96.16", "web.shop.svc.cluster.local"]
        )
        #expect(
            dig.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "198.18.100.1",
            "\(dig.stdout)\(dig.stderr)"
        )
        // (The backend may still be starting: python takes its time.)
        var curl = ProcessResult(status: -1, stdout: "", stderr: "")
        let proxied = await eventually(timeout: .seconds(15), every: .milliseconds(200)) {
            curl =
                (try? await self.inNS(
                    ns,
                    "/usr/bin/curl",
                    ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://198.18.100.1/"]
                )) ?? curl
            return curl.stdout == "200"
        }
        #expect(proxied, "\(curl.stdout)\(curl.stderr)")
        // The TCP port of the same service goes through the L4 relay to the same backend.
        let relayed = try await self.inNS(
            ns,
            "/usr/bin/curl",
            ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "http://198.18.100.1:81/"]
        )
        #expect(relayed.stdout == "200", "\(relayed.stdout)\(relayed.stderr)\n\(agent.stderr)")

        // Deleting the service takes its VIP off mesh0.
        let deleted = try await self.inNS(
            ns,
            "/usr/bin/env",
            env.map { "\($0)=\($1)" } + [self.bin + "/meshctl", "delete", "svc", "web", "-n", "shop"]
        )
        #expect(deleted.status == 0)
        let gone = await eventually(timeout: .seconds(30)) {
            addrs = (try? await self.ip(["-n", ns, "addr", "show", "mesh0"]).stdout) ?? ""
            return !addrs.contains("198.18.100.1") && addrs.contains("169.254.96.16")
        }
        #expect(gone, "\(addrs)")

        // Stopping the agent removes mesh0.
        agent.signal(SIGTERM)
        let exit = await agent.wait(timeout: .seconds(20))
        #expect(exit?.status == 0, "\(agent.stderr)")
        let link = try await self.ip(["-n", ns, "link", "show", "mesh0"])
        #expect(link.status != 0, "mesh0 is still there: \(link.stdout)")
        control.signal(SIGTERM)
        _ = await control.wait(timeout: .seconds(10))
    }
}
