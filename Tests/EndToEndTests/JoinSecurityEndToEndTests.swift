import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import Testing
import X509

/// Issue 11 with the real binaries: an impersonating `mesh-agent` is refused, a bound token
/// re-joins, an agent gives no token to a server with a node's certificate, agents renew their
/// certificate and keep working on it, and malformed join flags exit 1.
@Suite(.serialized, .rationed) struct JoinSecurityEndToEndTests {
    let bin = binaryDirectory()

    static func isolated(_ dir: TempDir) -> [String: String] {
        ["XDG_CONFIG_HOME": dir.path + "/xdg-config", "XDG_STATE_HOME": dir.path + "/xdg-state"]
    }

    func meshctl(_ args: [String], port: Int, dir: TempDir) async throws -> ProcessResult {
        try await run(
            self.bin + "/meshctl",
            args,
            environment: Self.isolated(dir).merging([
                "MESHCTL_SERVER": "https://127.0.0.1:\(port)", "MESHCONFIG": dir.path + "/control/admin.meshconfig",
            ]) { $1 }
        )
    }

    /// mesh-control on `port` with its data in `<dir>/control`, optionally with extra YAML settings.
    func startControl(_ dir: TempDir, port: Int, yaml: String = "") async throws -> Subprocess {
        let configPath = dir.path + "/control.yaml"
        try "listen: 127.0.0.1:\(port)\ndataDir: \(dir.path)/control\n\(yaml)".write(
            toFile: configPath,
            atomically: true,
            encoding: .utf8
        )
        let p = try Subprocess(self.bin + "/mesh-control", ["--config", configPath], environment: Self.isolated(dir))
        let ca = dir.path + "/control/pki/ca.crt"
        let up = await eventually(timeout: .seconds(20)) {
            guard let pem = try? String(contentsOfFile: ca, encoding: .utf8),
                let tls = try? MeshTLS.client(caPEM: pem, expect: .controlPlane)
            else { return false }
            let client = HTTPClient(
                endpoint: HTTPEndpoint(host: "127.0.0.1", port: port, tls: true),
                tls: HTTPClientTLS(mesh: tls)
            )
            return (try? await client.send(.GET, "/readyz").status) == .ok
        }
        #expect(up, "mesh-control did not come up: \(p.stderr)")
        return p
    }

    func agent(
        _ dir: TempDir,
        port: Int,
        name: String,
        site: String,
        state: String,
        token: BootstrapTokenSecret?,
        extra: [String] = []
    ) throws -> Subprocess {
        var args = [
            "--server", "https://127.0.0.1:\(port)", "--data-dir", state, "--node-name", name, "--site", site,
            "--dns-listen", "127.0.0.1:\(freePort())", "--admin-listen", "127.0.0.1:\(freePort())", "--link-listen",
            "127.0.0.1:0",
        ]
        if let token { args += ["--join-token", token.token, "--ca-cert-hash", token.caCertHash] }
        return try Subprocess(self.bin + "/mesh-agent", args + extra, environment: Self.isolated(dir))
    }

    func token(_ dir: TempDir, port: Int, _ extra: [String] = []) async throws -> BootstrapTokenSecret {
        let created = try await self.meshctl(
            ["token", "create", "--ttl", "10m", "-o", "json"] + extra,
            port: port,
            dir: dir
        )
        #expect(created.status == 0, "\(created.stderr)")
        return try JSONDecoder().decode(BootstrapTokenSecret.self, from: Data(created.stdout.utf8))
    }

    func getNode(_ dir: TempDir, port: Int, _ name: String) async throws -> Node? {
        let got = try await self.meshctl(["get", "node", name, "-o", "json"], port: port, dir: dir)
        guard got.status == 0 else { return nil }
        return try? JSONDecoder().decode(Node.self, from: Data(got.stdout.utf8))
    }

    @Test func anImpersonatingAgentIsRefusedAndABoundTokenRejoinsTheNode() async throws {
        let dir = TempDir()
        let port = freePort()
        let control = try await self.startControl(dir, port: port)
        let token = try await self.token(dir, port: port, ["--usages", "3"])
        let real = try self.agent(dir, port: port, name: "n1", site: "a", state: dir.path + "/a", token: token)
        #expect(
            try await eventually(timeout: .seconds(20)) {
                try await self.getNode(dir, port: port, "n1")?.status?.phase == .ready
            },
            "\(real.stderr)"
        )
        // Another host with the same (unbound) token claims n1 from site "evil": refused, explained.
        let evil = try self.agent(dir, port: port, name: "n1", site: "evil", state: dir.path + "/evil", token: token)
        let refused = try #require(await evil.wait(timeout: .seconds(20)))
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("node \"n1\" already exists"), "\(refused.stderr)")
        #expect(refused.stderr.contains("meshctl token create --node n1"))
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/evil/pki/node.crt"))
        #expect(try await self.getNode(dir, port: port, "n1")?.spec.site == "a")

        // n1 loses its disk: a token bound to n1 re-joins it, and the lost certificate is revoked.
        real.signal(SIGTERM)
        #expect(await real.wait(timeout: .seconds(15))?.status == 0)
        let bound = try await self.token(dir, port: port, ["--usages", "1", "--node", "n1"])
        #expect(bound.nodeName == "n1")
        let text = try await self.meshctl(["token", "create", "--node", "n1"], port: port, dir: dir)
        #expect(text.stdout.contains("--node-name n1"), "\(text.stdout)")
        let rejoined = try self.agent(dir, port: port, name: "n1", site: "a", state: dir.path + "/a2", token: bound)
        #expect(
            await eventually(timeout: .seconds(20)) {
                FileManager.default.fileExists(atPath: dir.path + "/a2/pki/node.crt")
            },
            "\(rejoined.stderr)"
        )
        let list = try await self.meshctl(["revoke", "list"], port: port, dir: dir)
        #expect(list.stdout.contains("mesh://node/n1") && list.stdout.contains("superseded"), "\(list.stdout)")
        // meshctl revoke node: the running agent's certificate is refused from then on.
        let revoked = try await self.meshctl(["revoke", "node", "n1"], port: port, dir: dir)
        #expect(revoked.status == 0 && revoked.stdout.contains("node/n1 revoked: 1 certificate"), "\(revoked.stderr)")
        rejoined.signal(SIGTERM)
        #expect(await rejoined.wait(timeout: .seconds(15))?.status == 0)
        control.signal(SIGTERM)
        #expect(await control.wait(timeout: .seconds(10))?.status == 0)
    }

    @Test func anAgentGivesNoTokenToAServerWithANodeCertificate() async throws {
        let dir = TempDir()
        // A mesh CA and a node certificate it signed, served by something that is not the control plane.
        let ca = try CertificateAuthority.create()
        let stolen = try ca.issueCredential(identity: .node("n1"), serverAuth: true, clientAuth: true)
        let fake = try await FakeControlPlane(credential: stolen, caPEM: try ca.certificatePEM())
        let token = BootstrapTokenSecret(
            token: "abcdef.0123456789abcdef",
            caCertHash: ca.hash,
            expires: "",
            usagesLeft: 1
        )
        let agent = try self.agent(dir, port: fake.port, name: "n9", site: "a", state: dir.path + "/n9", token: token)
        let result = try #require(await agent.wait(timeout: .seconds(20)))
        #expect(result.status == 1)
        #expect(result.stderr.contains("presented mesh://node/n1, not the control plane"), "\(result.stderr)")
        #expect(result.stderr.contains("the join token was not sent"))
        #expect(fake.requests.isEmpty, "\(fake.requests)")
        try await fake.stop()
    }

    @Test func malformedJoinFlagsExit1WithAClearMessage() async throws {
        let dir = TempDir()
        let hash = "sha256:" + String(repeating: "ab", count: 32)
        let cases: [([String], String)] = [
            (["--join-token", "nope", "--ca-cert-hash", hash], "joinToken: must look like abcdef.0123456789abcdef"),
            (["--join-token", "abcdef.0123456789abcdef", "--ca-cert-hash", "md5:12"], "caCertHash: must be sha256:"),
        ]
        for (flags, message) in cases {
            let r = try await run(
                self.bin + "/mesh-agent",
                ["--server", "https://127.0.0.1:1", "--data-dir", dir.path + "/a", "--node-name", "n1"] + flags,
                environment: Self.isolated(dir)
            )
            #expect(r.status == 1, "\(flags): \(r.stderr)")
            #expect(r.stderr.contains(message), "\(r.stderr)")
        }
    }

    @Test func theAgentRenewsItsCertificateBeforeItExpiresAndKeepsWorking() async throws {
        let dir = TempDir()
        let port = freePort()
        // Six-second certificates: the agent renews at four seconds, again and again.
        let control = try await self.startControl(dir, port: port, yaml: "nodeCertificateValiditySeconds: 6\n")
        let token = try await self.token(dir, port: port, ["--usages", "1"])
        let agentConfig = dir.path + "/agent.yaml"
        try "heartbeatIntervalSeconds: 0.5\n".write(toFile: agentConfig, atomically: true, encoding: .utf8)
        let agent = try self.agent(
            dir,
            port: port,
            name: "n1",
            site: "a",
            state: dir.path + "/n1",
            token: token,
            extra: ["--config", agentConfig]
        )
        let certPath = dir.path + "/n1/pki/node.crt"
        func certificate() -> Certificate? {
            (try? String(contentsOfFile: certPath, encoding: .utf8)).flatMap { try? Certificate(pemEncoded: $0) }
        }
        #expect(await eventually(timeout: .seconds(20)) { certificate() != nil }, "\(agent.stderr)")
        let first = try #require(certificate())
        #expect(
            await eventually(timeout: .seconds(20)) {
                (certificate()?.notValidAfter ?? first.notValidAfter) > first.notValidAfter
            },
            "\(agent.stderr)"
        )
        #expect(certificate()?.serialNumber != first.serialNumber)
        #expect(await eventually { agent.stderr.contains("renewed this node's certificate") })
        // The first certificate revoked, the agent's beats still get through (its kept-alive
        // connection included): it presents the renewed one.
        let oldSerial = MeshTLS.serialHex(first.serialNumber)
        let revoked = try await self.meshctl(["revoke", "node", "n1", "--serial", oldSerial], port: port, dir: dir)
        #expect(revoked.status == 0 && revoked.stdout.contains(oldSerial), "\(revoked.stderr)")
        let after = Int(Date().timeIntervalSince1970)
        #expect(
            try await eventually(timeout: .seconds(20)) {
                let beat = try await self.getNode(dir, port: port, "n1")?.status?.lastHeartbeatTime
                return (beat.flatMap(Timestamp.parse) ?? 0) > after + 1
            },
            "\(agent.stderr)"
        )
        #expect(!agent.stderr.contains("is revoked"), "\(agent.stderr)")
        #expect(agent.isRunning)
        agent.signal(SIGTERM)
        #expect(await agent.wait(timeout: .seconds(15))?.status == 0)
        control.signal(SIGTERM)
        #expect(await control.wait(timeout: .seconds(10))?.status == 0)
    }
}
