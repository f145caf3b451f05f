import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshTestSupport
import Testing

/// The real binaries, as a user runs them: `mesh-control` as a process, `meshctl` against it.
@Suite(.serialized) struct ControlEndToEndTests {
    let bin = binaryDirectory()
    static let examples = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent(
        "../../examples"
    )
    .standardized.path

    func meshctl(_ args: [String], server: Int, stdin: String? = nil) async throws -> ProcessResult {
        try await run(
            self.bin + "/meshctl",
            args,
            environment: ["MESHCTL_SERVER": "http://127.0.0.1:\(server)"],
            stdin: stdin
        )
    }

    func startControl(_ dir: TempDir, port: Int, extra: [String] = []) async throws -> Subprocess {
        let p = try Subprocess(
            self.bin + "/mesh-control",
            ["--listen", "127.0.0.1:\(port)", "--data-dir", dir.path] + extra
        )
        let client = HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port))
        let up = await eventually(timeout: .seconds(20)) { (try? await client.send(.GET, "/readyz").status) == .ok }
        #expect(up, "mesh-control did not come up: \(p.stderr)")
        return p
    }

    @Test func applyExamplesReadThemBackAndWatchAChange() async throws {
        let dir = TempDir()
        let port = freePort()
        let control = try await self.startControl(dir, port: port)

        let applied = try await self.meshctl(["apply", "-f", Self.examples], server: port)
        #expect(applied.status == 0, "\(applied.stderr)")
        #expect(applied.stdout.contains("service/web created"))
        #expect(applied.stdout.contains("node/edge-a1 created"))

        let got = try await self.meshctl(["get", "services", "-A", "-o", "json"], server: port)
        #expect(got.status == 0)
        let list = try JSONDecoder().decode(ObjectList<Service>.self, from: Data(got.stdout.utf8))
        #expect(
            Set(list.items.map { "\($0.metadata.namespace!)/\($0.metadata.name)" }) == [
                "infra/cache", "shop/cart", "shop/db", "shop/web",
            ]
        )
        #expect(list.items.first { $0.metadata.name == "web" }?.spec.vip != nil)
        #expect(list.items.first { $0.metadata.name == "db" }?.spec.isHeadless == true)

        let table = try await self.meshctl(["get", "svc", "-n", "shop"], server: port)
        let lines = table.stdout.split(separator: "\n")
        #expect(lines.first?.hasPrefix("NAME   VIP") == true)
        #expect(lines.count == 4)

        // Applying again changes nothing.
        let again = try await self.meshctl(["apply", "-f", Self.examples], server: port)
        #expect(again.stdout.split(separator: "\n").allSatisfy { $0.hasSuffix("unchanged") })

        // A watcher sees the current endpoints, then the change.
        let watcher = try Subprocess(
            self.bin + "/meshctl",
            ["watch", "endpoints", "-n", "shop", "-o", "json", "--max-events", "4"],
            environment: ["MESHCTL_SERVER": "http://127.0.0.1:\(port)"]
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
        let changed = try await self.meshctl(["apply", "-f", "-"], server: port, stdin: change)
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
        var r = try await self.meshctl(["apply", "-f", bad], server: port)
        #expect(r.status != 0)
        #expect(r.stderr.contains("bad.yaml: malformed YAML: line"))

        try "apiVersion: mesh.edge/v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, colour: red}]}\n"
            .write(
                toFile: bad,
                atomically: true,
                encoding: .utf8
            )
        r = try await self.meshctl(["apply", "-f", bad], server: port)
        #expect(r.stderr.contains("spec.ports[0].colour: unknown field"))

        r = try await self.meshctl(["get", "gadgets"], server: port)
        #expect(r.status != 0)
        #expect(r.stderr.contains("unknown resource type \"gadgets\""))

        r = try await self.meshctl(["get", "svc", "nope", "-n", "shop"], server: port)
        #expect(r.status == 1)
        #expect(r.stderr.contains("service \"nope\" not found in namespace \"shop\""))

        r = try await self.meshctl(["get", "svc", "-A"], server: port)
        #expect(r.stderr.contains("No services found"))

        r = try await self.meshctl(["get", "svc"], server: freePort())
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
        let up = try Subprocess(
            self.bin + "/meshctl",
            [
                "up", "--data-dir", dir.path, "--listen", "127.0.0.1:\(port)", "--dns-listen", "127.0.0.1:\(dnsPort)",
                "--admin-listen", "127.0.0.1:\(adminPort)", "--stun-listen", "127.0.0.1:\(stunPort)",
            ]
        )
        let client = HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: port))
        #expect(
            await eventually(timeout: .seconds(20)) { (try? await client.send(.GET, "/readyz").status) == .ok },
            "\(up.stderr)"
        )
        let r = try await self.meshctl(["apply", "-f", Self.examples], server: port)
        #expect(r.status == 0)
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

    @Test(arguments: ["mesh-control", "meshctl", "mesh-agent", "mesh-relay"])
    func everyExecutableHasHelp(_ name: String) async throws {
        let r = try await run(self.bin + "/" + name, ["--help"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("USAGE"))
    }
}
