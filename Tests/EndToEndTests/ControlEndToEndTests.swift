import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import Testing

/// The real binaries, as a user runs them: `mesh-control` as a process, `meshctl` against it.
@Suite(.serialized, .rationed) struct ControlEndToEndTests {
    let bin = binaryDirectory()
    static let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
        "../../examples"
    )
    .standardized.path

    /// meshctl with the admin meshconfig that mesh-control wrote in `dir` (its user's own config
    /// folders pointed at empty ones, so nothing of the machine's user leaks in).
    func meshctl(_ args: [String], server: Int, dir: TempDir, stdin: String? = nil) async throws -> ProcessResult {
        try await run(
            self.bin + "/meshctl",
            args,
            environment: Self.isolated(dir).merging([
                "MESHCTL_SERVER": "https://127.0.0.1:\(server)", "MESHCONFIG": dir.path + "/admin.meshconfig",
            ]) { $1 },
            stdin: stdin
        )
    }

    /// XDG folders inside `dir`, so defaults never touch the real user's.
    static func isolated(_ dir: TempDir) -> [String: String] {
        ["XDG_CONFIG_HOME": dir.path + "/xdg-config", "XDG_STATE_HOME": dir.path + "/xdg-state"]
    }

    /// Polls `/readyz` over TLS (no client certificate needed) once the CA file exists.
    static func ready(port: Int, ca: String) async -> Bool {
        await eventually(timeout: .seconds(20)) {
            guard let pem = try? String(contentsOfFile: ca, encoding: .utf8),
                let context = try? MeshTLS.clientContext(caPEM: pem)
            else { return false }
            let client = HTTPClient(
                endpoint: HTTPEndpoint(host: "127.0.0.1", port: port, tls: true),
                tls: HTTPClientTLS(context: context)
            )
            return (try? await client.send(.GET, "/readyz").status) == .ok
        }
    }

    func startControl(_ dir: TempDir, port: Int, extra: [String] = []) async throws -> Subprocess {
        let p = try Subprocess(
            self.bin + "/mesh-control",
            ["--listen", "127.0.0.1:\(port)", "--data-dir", dir.path] + extra,
            environment: Self.isolated(dir)
        )
        let up = await Self.ready(port: port, ca: dir.path + "/pki/ca.crt")
        #expect(up, "mesh-control did not come up: \(p.stderr)")
        return p
    }

    @Test func applyExamplesReadThemBackAndWatchAChange() async throws {
        let dir = TempDir()
        let port = freePort()
        let control = try await self.startControl(dir, port: port)

        let applied = try await self.meshctl(["apply", "-f", Self.examples], server: port, dir: dir)
        #expect(applied.status == 0, "\(applied.stderr)")
        #expect(applied.stdout.contains("service/web created"))
        #expect(applied.stdout.contains("node/edge-a1 created"))

        let got = try await self.meshctl(["get", "services", "-A", "-o", "json"], server: port, dir: dir)
        #expect(got.status == 0)
        let list = try JSONDecoder().decode(ObjectList<MeshService>.self, from: Data(got.stdout.utf8))
        #expect(
            Set(list.items.map { "\($0.metadata.namespace!)/\($0.metadata.name)" }) == [
                "infra/cache", "shop/cart", "shop/db", "shop/web",
            ]
        )
        #expect(list.items.first { $0.metadata.name == "web" }?.spec.vip != nil)
        #expect(list.items.first { $0.metadata.name == "db" }?.spec.isHeadless == true)

        let table = try await self.meshctl(["get", "svc", "-n", "shop"], server: port, dir: dir)
        let lines = table.stdout.split(separator: "\n")
        #expect(lines.first?.hasPrefix("NAME   VIP") == true)
        #expect(lines.count == 4)

        // Applying again changes nothing.
        let again = try await self.meshctl(["apply", "-f", Self.examples], server: port, dir: dir)
        #expect(again.stdout.split(separator: "\n").allSatisfy { $0.hasSuffix("unchanged") })

        // A watcher sees the current endpoints, then the change.
        let watcher = try Subprocess(
            self.bin + "/meshctl",
            ["watch", "endpoints", "-n", "shop", "-o", "json", "--max-events", "4"],
            environment: ["MESHCTL_SERVER": "https://127.0.0.1:\(port)", "MESHCONFIG": dir.path + "/admin.meshconfig"]
        )
        #expect(await eventually { watcher.stdout.split(separator: "\n").count >= 3 })
        let change = """
            apiVersion: mesh.edge/v1
            kind: Endpoints
            metadata: {name: web, namespace: shop}
            spec:
              addresses:
              - {ip: 198.18.7.7, ports: [{name: http, port: 8081}], site: a}
            """
        let changed = try await self.meshctl(["apply", "-f", "-"], server: port, dir: dir, stdin: change)
        #expect(changed.stdout == "endpoints/web configured\n")
        let result = try #require(await watcher.wait(timeout: .seconds(10)))
        #expect(result.status == 0)
        let events = result.stdout.split(separator: "\n")
        #expect(events.count == 4)
        #expect(events.last?.contains(#""type":"MODIFIED""#) == true)
        #expect(events.last?.contains("198.18.7.7") == true)

        control.signal(SIGTERM)
        let exit = try #require(await control.wait(timeout: .seconds(10)))
        #expect(exit.status == 0, "\(exit.stderr)")
        #expect(exit.stderr.contains("store closed"))
    }

    @Test func mistakesGetClearMessagesAndStoreNothing() async throws {
        let dir = TempDir()
        let port = freePort()
        let control = try await self.startControl(dir, port: port)
        let bad = dir.path + "/bad.yaml"
        try "apiVersion: mesh.edge/v1\nkind: Service\nmetadata: {name: web\nspec: {}\n".write(
            toFile: bad,
            atomically: true,
            encoding: .utf8
        )
        var r = try await self.meshctl(["apply", "-f", bad], server: port, dir: dir)
        #expect(r.status != 0)
        #expect(r.stderr.contains("bad.yaml: malformed YAML: line"))

        try "apiVersion: mesh.edge/v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, colour: red}]}\n"
            .write(
                toFile: bad,
                atomically: true,
                encoding: .utf8
            )
        r = try await self.meshctl(["apply", "-f", bad], server: port, dir: dir)
        #expect(r.stderr.contains("spec.ports[0].colour: unknown field"))

        r = try await self.meshctl(["get", "gadgets"], server: port, dir: dir)
        #expect(r.status != 0)
        #expect(r.stderr.contains("unknown resource type \"gadgets\""))

        r = try await self.meshctl(["get", "svc", "nope", "-n", "shop"], server: port, dir: dir)
        #expect(r.status == 1)
        #expect(r.stderr.contains("service \"nope\" not found in namespace \"shop\""))

        r = try await self.meshctl(["get", "svc", "-A"], server: port, dir: dir)
        #expect(r.stderr.contains("No services found"))

        r = try await self.meshctl(["get", "svc"], server: freePort(), dir: dir)
        #expect(r.status == 1)
        #expect(r.stderr.contains("Is the control plane running?"))

        control.signal(SIGINT)
        #expect(await control.wait(timeout: .seconds(10))?.status == 0)
    }

    @Test func badConfigFilesAreExplained() async throws {
        let dir = TempDir()
        let config = dir.path + "/control.yaml"
        try "listen: 127.0.0.1:7700\nserviceCIDR: [10.0.0.0/8]\n".write(
            toFile: config,
            atomically: true,
            encoding: .utf8
        )
        let r = try await run(self.bin + "/mesh-control", ["--config", config])
        #expect(r.status != 0)
        #expect(r.stderr.contains("serviceCIDR: unknown field"))
        try "serviceCIDRs: [10.0.0.1/8]\n".write(toFile: config, atomically: true, encoding: .utf8)
        let r2 = try await run(self.bin + "/mesh-control", ["--config", config])
        #expect(r2.stderr.contains("serviceCIDRs[0]: \"10.0.0.1/8\" is not a CIDR"))
    }

    @Test func meshctlUpRunsTheMeshAndStopsOnCtrlC() async throws {
        let dir = TempDir()
        let (port, dnsPort, adminPort, stunPort) = (freePort(), freePort(), freePort(), freePort())
        let (relayPort, relayAdminPort) = (freePort(), freePort())
        let up = try Subprocess(
            self.bin + "/meshctl",
            [
                "up", "--data-dir", dir.path, "--listen", "127.0.0.1:\(port)", "--dns-listen", "127.0.0.1:\(dnsPort)",
                "--admin-listen", "127.0.0.1:\(adminPort)", "--stun-listen", "127.0.0.1:\(stunPort)",
                "--relay-listen", "127.0.0.1:\(relayPort)", "--relay-admin-listen", "127.0.0.1:\(relayAdminPort)",
                "--link-listen", "127.0.0.1:0",
            ],
            environment: Self.isolated(dir)
        )
        #expect(await Self.ready(port: port, ca: dir.path + "/control/pki/ca.crt"), "\(up.stderr)")
        // Plain meshctl (no flags, no MESHCTL_SERVER) finds the admin credentials meshctl up wrote.
        let config = dir.path + "/xdg-config/edge-mesh/meshconfig.yaml"
        #expect(await eventually { FileManager.default.fileExists(atPath: config) })
        let r = try await run(self.bin + "/meshctl", ["apply", "-f", Self.examples], environment: Self.isolated(dir))
        #expect(r.status == 0, "\(r.stderr)")
        // Its own node registered itself and is Ready, seen a moment ago, on the loopback it serves
        // on; the example nodes have no agent, so no heartbeat yet.
        var nodes = ProcessResult(status: -1, stdout: "", stderr: "")
        let ready = await eventually(timeout: .seconds(20)) {
            nodes = (try? await run(self.bin + "/meshctl", ["get", "nodes"], environment: Self.isolated(dir))) ?? nodes
            return nodes.stdout.split(separator: "\n").contains { line in
                let cells = line.split(separator: " ", omittingEmptySubsequences: true)
                return cells.count == 6 && cells[1] == "Ready" && cells[3] == "127.0.0.1" && cells[4].hasSuffix("s")
            }
        }
        #expect(ready, "\(nodes.stdout)\(nodes.stderr)")
        let lines = nodes.stdout.split(separator: "\n")
        #expect(lines.first?.hasPrefix("NAME") == true && lines.first?.contains("STATUS") == true)
        #expect(lines.contains { $0.hasPrefix("edge-a1") && $0.contains("Unknown") && $0.contains("<never>") })
        // The columns line up: every row's STATUS starts where the header's does.
        let column = lines.first.flatMap { $0.range(of: "STATUS") }.map {
            lines.first!.distance(from: lines.first!.startIndex, to: $0.lowerBound)
        }
        for line in lines.dropFirst() {
            let cells = line.split(separator: " ", omittingEmptySubsequences: true)
            let at = line.range(of: " " + cells[1] + " ").map {
                line.distance(from: line.startIndex, to: $0.lowerBound) + 1
            }
            #expect(at == column, "\(nodes.stdout)")
        }
        let json = try await run(
            self.bin + "/meshctl",
            ["get", "nodes", "-o", "json"],
            environment: Self.isolated(dir)
        )
        #expect(json.stdout.contains("\"phase\": \"Ready\"") && json.stdout.contains("\"lastHeartbeatTime\""))
        // Its relay joined with a relay token of its own and publishes its session address.
        var relays = ProcessResult(status: -1, stdout: "", stderr: "")
        let relayReady = await eventually(timeout: .seconds(20)) {
            relays =
                (try? await run(self.bin + "/meshctl", ["get", "relays"], environment: Self.isolated(dir))) ?? relays
            return relays.stdout.split(separator: "\n").contains { line in
                line.hasPrefix("local ") && line.contains("Ready") && line.contains("127.0.0.1:\(relayPort)")
            }
        }
        #expect(relayReady, "\(relays.stdout)\(relays.stderr)")
        #expect(FileManager.default.fileExists(atPath: dir.path + "/relay/pki/relay.crt"))
        // Its agent joined with a one-use token and holds a node certificate.
        #expect(FileManager.default.fileExists(atPath: dir.path + "/agent/pki/node.crt"))
        #expect(FileManager.default.fileExists(atPath: dir.path + "/control/control.db"))
        // The agent picks the services up: its routes list them, and DNS answers their names.
        var routes = ProcessResult(status: -1, stdout: "", stderr: "")
        let listed = await eventually {
            routes =
                (try? await run(self.bin + "/meshctl", ["routes", "--agent", "http://127.0.0.1:\(adminPort)"]))
                ?? routes
            return routes.stdout.contains("shop/web") && routes.stdout.contains("infra/cache")
                && routes.stdout.contains("table from control")
        }
        #expect(listed, "\(routes.stdout)\(routes.stderr)")
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/dig") {
            let dig = try await run(
                "/usr/bin/dig",
                ["+short", "@127.0.0.1", "-p", "\(dnsPort)", "web.shop.svc.cluster.local"]
            )
            #expect(IPAddress(String(dig.stdout.filter { !$0.isWhitespace })) != nil, "\(dig.stdout)")
        }
        #expect(FileManager.default.fileExists(atPath: dir.path + "/agent/agent.db"))
        // The STUN server answers (over TCP here): a Binding success with the request's cookie and id.
        let request: [UInt8] = [0, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42] + Array(repeating: 7, count: 12)
        let answer = try await blocking { () -> [UInt8] in
            let stun = try RawSocket(port: stunPort)
            stun.send(request)
            var buffer = [UInt8](repeating: 0, count: 512)
            let n = recv(stun.fd, &buffer, buffer.count, 0)
            return Array(buffer[0..<max(0, n)])
        }
        #expect(answer.count > 20, "\(up.stderr)")
        #expect(answer.prefix(2) == [1, 1] && answer.dropFirst(4).prefix(16) == request.dropFirst(4).prefix(16))
        up.signal(SIGINT)
        let exit = try #require(await up.wait(timeout: .seconds(15)))
        #expect(exit.status == 0, "\(exit.stderr)")
        #expect(exit.stderr.contains("all-in-one mesh stopped"))
    }

    @Test func agentsJoinWithATokenAndTheCAHash() async throws {
        let dir = TempDir()
        let port = freePort()
        let control = try await self.startControl(dir, port: port)
        let created = try await self.meshctl(
            ["token", "create", "--ttl", "10m", "--usages", "1", "-o", "json"],
            server: port,
            dir: dir
        )
        #expect(created.status == 0, "\(created.stderr)")
        let token = try JSONDecoder().decode(BootstrapTokenSecret.self, from: Data(created.stdout.utf8))
        let text = try await self.meshctl(["token", "create", "--description", "spare"], server: port, dir: dir)
        #expect(text.stdout.contains("join a node:   mesh-agent --server https://127.0.0.1:\(port) --join-token "))
        #expect(text.stdout.contains("ca-cert-hash:  \(token.caCertHash)"))

        func agent(_ name: String, hash: String, token: String) throws -> Subprocess {
            try Subprocess(
                self.bin + "/mesh-agent",
                [
                    "--server", "https://127.0.0.1:\(port)", "--data-dir", dir.path + "/" + name, "--node-name", name,
                    "--dns-listen", "127.0.0.1:\(freePort())", "--admin-listen", "127.0.0.1:\(freePort())",
                    "--link-listen", "127.0.0.1:0",
                    "--join-token", token, "--ca-cert-hash", hash,
                ],
                environment: Self.isolated(dir)
            )
        }
        // A wrong CA hash: the agent refuses to join and exits non-zero; the token is not spent.
        let wrong = try agent("edge-x", hash: "sha256:" + String(repeating: "ab", count: 32), token: token.token)
        let refused = try #require(await wrong.wait(timeout: .seconds(20)))
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("does not match --ca-cert-hash"), "\(refused.stderr)")
        // The right one: the agent joins, stores its key (0600), certificate and CA, and syncs.
        let good = try agent("edge-y", hash: token.caCertHash, token: token.token)
        #expect(
            await eventually(timeout: .seconds(20)) {
                FileManager.default.fileExists(atPath: dir.path + "/edge-y/pki/node.crt")
            },
            "\(good.stderr)"
        )
        #expect(PEMFiles.mode(dir.path + "/edge-y/pki/node.key") == 0o600)
        // The token had one usage: a second node is refused with a clear message.
        let late = try agent("edge-z", hash: token.caCertHash, token: token.token)
        let lateExit = try #require(await late.wait(timeout: .seconds(20)))
        #expect(lateExit.status != 0)
        #expect(lateExit.stderr.contains("used up"), "\(lateExit.stderr)")
        // The agent restarts without token flags: it reuses its certificate.
        good.signal(SIGTERM)
        #expect(await good.wait(timeout: .seconds(15))?.status == 0)
        let againAdmin = freePort()
        let again = try Subprocess(
            self.bin + "/mesh-agent",
            [
                "--server", "https://127.0.0.1:\(port)", "--data-dir", dir.path + "/edge-y", "--node-name", "edge-y",
                "--dns-listen", "127.0.0.1:\(freePort())", "--admin-listen", "127.0.0.1:\(againAdmin)", "--link-listen",
                "127.0.0.1:0",
            ],
            environment: Self.isolated(dir)
        )
        // Its admin status says the control plane answers it (its certificate works), not a fixed wait.
        struct AgentStatus: Decodable {
            struct Control: Decodable { var state: String }
            var control: Control
        }
        let admin = HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: againAdmin))
        #expect(
            await eventually {
                guard let r = try? await admin.send(.GET, "/status") else { return false }
                let status = try? JSONDecoder().decode(AgentStatus.self, from: Data(r.body.readableBytesView))
                return status?.control.state == "connected"
            },
            "\(again.stderr)"
        )
        #expect(again.isRunning, "\(again.stderr)")
        again.signal(SIGTERM)
        #expect(await again.wait(timeout: .seconds(15))?.status == 0)
        // Tokens are listed without secrets, and deleted by id.
        let listed = try await self.meshctl(["token", "list"], server: port, dir: dir)
        #expect(listed.stdout.contains(String(token.token.prefix(6))) && listed.stdout.contains("spare"))
        #expect(!listed.stdout.contains(token.token))
        let deleted = try await self.meshctl(
            ["token", "delete", String(token.token.prefix(6))],
            server: port,
            dir: dir
        )
        #expect(deleted.status == 0 && deleted.stdout.contains("deleted"))
        // Without credentials meshctl gets a 401 it explains.
        let anonymous = try await run(
            self.bin + "/meshctl",
            [
                "get", "svc", "--server", "https://127.0.0.1:\(port)", "--certificate-authority",
                dir.path + "/pki/ca.crt",
            ],
            environment: Self.isolated(dir)
        )
        #expect(anonymous.status != 0 && anonymous.stderr.contains("client certificate"), "\(anonymous.stderr)")
        control.signal(SIGTERM)
        #expect(await control.wait(timeout: .seconds(10))?.status == 0)
    }

    @Test(arguments: ["mesh-control", "meshctl", "mesh-agent", "mesh-relay"])
    func everyExecutableHasHelp(_ name: String) async throws {
        let r = try await run(self.bin + "/" + name, ["--help"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("USAGE"))
    }
}
