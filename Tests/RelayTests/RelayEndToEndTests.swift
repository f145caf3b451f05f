import Foundation
import MeshHTTP
import MeshTestSupport
import Testing

func which(_ tool: String) -> String? {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let path = dir + "/" + tool
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
}

/// Debian's `stun` (package stun-client, the Vovida RFC 3489 client).
let stunClient = which("stun")
/// coturn's RFC 5389 client (package coturn; its server is not started).
let coturnClient = which("turnutils_stunclient")

/// `mesh-relay` as a user runs it, asked by real STUN clients.
@Suite("mesh-relay with real STUN clients", .serialized, .timeLimit(.minutes(2)), .rationed)
struct RelayEndToEndTests {
    let bin = binaryDirectory()

    struct Running {
        let process: Subprocess
        let stunPort: Int
        let admin: HTTPClient

        func metrics() async throws -> String {
            String(buffer: try await self.admin.send(.GET, "/metrics").body)
        }

        /// The value of one Prometheus sample line (`name{labels}`), 0 when absent.
        func sample(_ series: String) async throws -> Int {
            let text = try await self.metrics()
            let line = text.split(separator: "\n").first { $0.hasPrefix(series + " ") }
            return line.flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
        }

        func stop() async -> ProcessResult? {
            self.process.signal(SIGTERM)
            return await self.process.wait(timeout: .seconds(10))
        }
    }

    func start(_ extra: [String] = [], stunPort: Int = freePort(), adminPort: Int = freePort()) async throws -> Running
    {
        let p = try Subprocess(
            self.bin + "/mesh-relay",
            [
                "--stun-listen", "127.0.0.1:\(stunPort)", "--stun-listen", "[::1]:\(stunPort)",
                "--admin-listen", "127.0.0.1:\(adminPort)",
            ] + extra
        )
        let admin = HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: adminPort))
        let up = await eventually(timeout: .seconds(20)) { (try? await admin.send(.GET, "/readyz").status) == .ok }
        #expect(up, "mesh-relay did not come up: \(p.stderr)")
        return Running(process: p, stunPort: stunPort, admin: admin)
    }

    @Test(
        "Debian's stun (RFC 3489): its binding test gets MAPPED-ADDRESS; its NAT tests end without an answer to change requests",
        .enabled(if: stunClient != nil, "Debian's stun is not installed (apt-get install stun-client)")
    )
    func debianStun() async throws {
        let relay = try await self.start()
        let one = try await run(stunClient!, ["127.0.0.1:\(relay.stunPort)", "1", "-v"], timeout: .seconds(30))
        let said = one.stdout + one.stderr  // its -v lines go to stderr
        #expect(said.contains("MappedAddress = 127.0.0.1:"), "\(said)")
        #expect(said.contains("SourceAddress = 127.0.0.1:\(relay.stunPort)"), "\(said)")
        #expect(said.contains("ok=1"))
        // The whole NAT type discovery: tests II and III ask for another address, which a relay
        // with one address cannot answer from, so they go unanswered (counted), never misanswered.
        let full = try await run(stunClient!, ["127.0.0.1:\(relay.stunPort)"], timeout: .seconds(60))
        #expect((full.stdout + full.stderr).contains("Primary:"), "\(full.stdout)\(full.stderr)")
        #expect(try await relay.sample("stun_binding_responses_total{version=\"rfc3489\"}") >= 2)
        #expect(try await relay.sample("stun_dropped_total{reason=\"change_request\"}") >= 2)
        let exit = await relay.stop()
        #expect(exit?.status == 0, "\(exit?.stderr ?? "")")
    }

    @Test(
        "coturn's turnutils_stunclient (RFC 5389) over IPv4 and ::1: its reflexive address",
        .enabled(if: coturnClient != nil, "coturn's turnutils_stunclient is not installed (apt-get install coturn)")
    )
    func coturn() async throws {
        let relay = try await self.start()
        let v4 = try await run(coturnClient!, ["-p", "\(relay.stunPort)", "127.0.0.1"], timeout: .seconds(30))
        #expect(v4.status == 0)
        #expect(v4.stdout.contains("IPv4. UDP reflexive addr: 127.0.0.1:"), "\(v4.stdout)\(v4.stderr)")
        let v6 = try await run(coturnClient!, ["-p", "\(relay.stunPort)", "::1"], timeout: .seconds(30))
        #expect(v6.status == 0)
        #expect(v6.stdout.contains("IPv6. UDP reflexive addr: ::1:"), "\(v6.stdout)\(v6.stderr)")
        #expect(try await relay.sample("stun_binding_responses_total{version=\"rfc5389\"}") >= 2)
        let exit = await relay.stop()
        #expect(exit?.status == 0)
        #expect(exit?.stderr.contains("relay stopped") == true)
    }

    @Test("--config YAML over defaults, flags over the file; /healthz; SIGINT exits 0")
    func configAndFlags() async throws {
        let dir = TempDir()
        let (stunPort, filePort, adminPort) = (freePort(), freePort(), freePort())
        try """
        stunListen: ["127.0.0.1:\(stunPort)"]
        stunTCP: false
        software: from the file
        adminListen: 127.0.0.1:\(filePort)
        """.write(toFile: dir.path + "/relay.yaml", atomically: true, encoding: .utf8)
        let p = try Subprocess(
            self.bin + "/mesh-relay",
            ["--config", dir.path + "/relay.yaml", "--admin-listen", "127.0.0.1:\(adminPort)", "--log-level", "debug"]
        )
        let admin = HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: adminPort))
        #expect(
            await eventually(timeout: .seconds(20)) { (try? await admin.send(.GET, "/healthz").status) == .ok },
            "\(p.stderr)"
        )
        #expect(
            p.stderr.contains("udp=[IPv4]127.0.0.1/127.0.0.1:\(stunPort)") && p.stderr.contains("tcp=off"),
            "\(p.stderr)"
        )
        #expect((try? await admin.send(.GET, "/nope").status) == .notFound)
        p.signal(SIGINT)
        #expect(await p.wait(timeout: .seconds(10))?.status == 0)
    }

    @Test("bad settings are explained by field")
    func badConfig() async throws {
        let dir = TempDir()
        try "stunListn: [127.0.0.1:3478]\n".write(toFile: dir.path + "/a.yaml", atomically: true, encoding: .utf8)
        let a = try await run(self.bin + "/mesh-relay", ["--config", dir.path + "/a.yaml"])
        #expect(a.status != 0)
        #expect(a.stderr.contains("stunListn: unknown field"), "\(a.stderr)")
        let b = try await run(
            self.bin + "/mesh-relay",
            ["--stun-listen", "127.0.0.1", "--admin-listen", "127.0.0.1:0"]
        )
        #expect(b.status != 0)
        #expect(b.stderr.contains("stunListen[0]"), "\(b.stderr)")
        try "controlServer: https://127.0.0.1:9\nstatusIntervalSeconds: 60\nstatusRefreshSeconds: 30\n".write(
            toFile: dir.path + "/c.yaml",
            atomically: true,
            encoding: .utf8
        )
        let c = try await run(self.bin + "/mesh-relay", ["--config", dir.path + "/c.yaml"])
        #expect(c.status != 0)
        #expect(c.stderr.contains("statusRefreshSeconds: must be at least statusIntervalSeconds"), "\(c.stderr)")
    }
}
