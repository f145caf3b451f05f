import Foundation
import MeshCore
import MeshIdentity
import MeshTestSupport
import Testing

@testable import MeshAgent

/// The agent's admin API has no authentication: it listens on loopback only, and answers only
/// requests that name a loopback host (a web page using DNS rebinding sends its own name).
@Suite(.rationed) struct AdminSecurityTests {
    /// One request with `host` (nil: no Host header, as HTTP/1.0) over a real socket; the response text.
    func request(port: Int, host: String?) async throws -> String {
        try await blocking {
            let s = try RawSocket(host: "127.0.0.1", port: port, timeout: 5)
            let hostLine = host.map { "Host: \($0)\r\n" } ?? ""
            s.send("GET /routes HTTP/1.1\r\n\(hostLine)Connection: close\r\n\r\n")
            return s.readAll()
        }
    }

    @Test func requestsForAnotherHostAreRefused() async throws {
        let dir = TempDir()
        try seedNodeCredentials(stateDir: dir.path, nodeName: "edge-test")
        let agent = try await RunningAgent(control: "https://127.0.0.1:9", dataDir: dir.path)
        let port = try await agent.agent.adminAddress().port!
        for evil in [
            "evil.example", "evil.example:\(port)", "127.0.0.1.evil.example", "localhost.evil.example:\(port)",
        ] {
            let r = try await self.request(port: port, host: evil)
            #expect(r.hasPrefix("HTTP/1.1 403"), "Host \(evil): \(r)")
            #expect(r.contains("is not a loopback name or address"), "Host \(evil): \(r)")
            #expect(!r.contains("\"routes\""))
        }
        for good in ["127.0.0.1:\(port)", "localhost:\(port)", "LOCALHOST", "[::1]:\(port)", "127.0.0.2"] {
            let r = try await self.request(port: port, host: good)
            #expect(r.hasPrefix("HTTP/1.1 200"), "Host \(good): \(r)")
        }
        #expect(try await agent.admin.send(.GET, "/readyz").status == .ok)
        try await agent.stop()
    }

    /// With `adminAllowRemote`: TLS only, and only admin certificates of the mesh CA get answers.
    @Test func remoteAdminIsMutualTLSForAdminsOnly() async throws {
        let dir = TempDir()
        let ca = try seedNodeCredentials(stateDir: dir.path, nodeName: "edge-test")
        let agent = try await RunningAgent(control: "https://127.0.0.1:9", dataDir: dir.path) {
            $0.adminAllowRemote = true
        }
        let port = try await agent.agent.adminAddress().port!
        func get(_ identity: MeshPrincipal?, host: String = "evil.example") async throws -> String {
            let tls = try meshClientContext(ca, identity: identity)
            return try await blocking {
                let s = try TLSRawSocket(port: port, timeout: 5, tls: tls)
                s.send("GET /routes HTTP/1.1\r\nHost: \(host)\r\nConnection: close\r\n\r\n")
                return s.readFirstResponse()
            }
        }
        // An admin of the mesh: answered (the Host does not matter over mutual TLS).
        let admin = try await get(.admin("ops"))
        #expect(admin.hasPrefix("HTTP/1.1 200") && admin.contains("\"node\":\"edge-test\""), "\(admin)")
        // A node's certificate: 403; no certificate: 401.
        let node = try await get(.node("other"))
        #expect(node.hasPrefix("HTTP/1.1 403") && node.contains("admin certificates"), "\(node)")
        let anonymous = try await get(nil)
        #expect(anonymous.hasPrefix("HTTP/1.1 401") && anonymous.contains("client certificate"), "\(anonymous)")
        // Plain HTTP gets no answer.
        let plain = try await self.request(port: port, host: "127.0.0.1")
        #expect(!plain.contains("HTTP/1.1 200"))
        // Another CA's admin cannot even finish the handshake.
        let stranger = try CertificateAuthority.create()
        let foreign = try meshClientContext(stranger, identity: .admin("ops"))
        let refused = try await blocking {
            let s = try TLSRawSocket(port: port, timeout: 5, tls: foreign)
            s.send("GET /routes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return s.readFirstResponse()
        }
        #expect(!refused.contains("HTTP/1.1 200"))
        try await agent.stop()
    }

    @Test func hostHeaderParsing() {
        #expect(AdminHostCheck.refusal(hostHeaders: []) == nil)
        #expect(AdminHostCheck.refusal(hostHeaders: ["127.0.0.1:7780"]) == nil)
        #expect(AdminHostCheck.refusal(hostHeaders: ["localhost."]) == nil)
        #expect(AdminHostCheck.refusal(hostHeaders: ["127.0.0.1", "evil.example"]) == "more than one Host header")
        for bad in ["evil.example", "::1", "[::1", "[::1]x", "127.0.0.1:x", ":7780", "", "0.0.0.0:7780", "10.0.0.1"] {
            #expect(AdminHostCheck.refusal(hostHeaders: [bad]) != nil, "\(bad)")
        }
    }

    @Test func aNonLoopbackAdminListenFailsValidation() throws {
        for listen in ["0.0.0.0:7780", "[::]:7780", "192.0.2.1:7780", "admin.example:7780"] {
            var config = AgentConfig()
            config.adminListen = listen
            #expect {
                try config.validate()
            } throws: { e in
                (e as? ManifestError)?.message.contains("adminListen: \"\(listen)\" is not a loopback address") == true
            }
        }
        for listen in ["127.0.0.1:7780", "[::1]:0", "localhost:7780", "127.0.0.53:1"] {
            var config = AgentConfig()
            config.adminListen = listen
            #expect(throws: Never.self) { try config.validate() }
        }
        // Asked for explicitly: then served over mutual TLS (remoteAdminIsMutualTLSForAdminsOnly).
        var remote = AgentConfig()
        remote.adminListen = "0.0.0.0:7780"
        remote.adminAllowRemote = true
        #expect(throws: Never.self) { try remote.validate() }
    }

    @Test func theAgentBinaryRefusesAnAdminListenOf0000() async throws {
        let dir = TempDir()
        let r = try await run(
            binaryDirectory() + "/mesh-agent",
            ["--admin-listen", "0.0.0.0:7780", "--data-dir", dir.path, "--server", "https://127.0.0.1:9"]
        )
        #expect(r.status != 0)
        #expect(r.stderr.contains("adminListen: \"0.0.0.0:7780\" is not a loopback address"), "\(r.stderr)")
        #expect(r.stderr.contains("unless adminAllowRemote: true"))
    }

    @Test func theDNSCacheCapIsAnAgentSettingWithLimits() throws {
        #expect(AgentConfig().dnsMaxCacheTTLSeconds == 300 && AgentConfig().dnsCaseRandomization)
        let config = try ConfigFile.decode(
            AgentConfig.self,
            yaml: "dnsMaxCacheTTLSeconds: 60\ndnsCaseRandomization: false\n"
        )
        #expect(config.dnsMaxCacheTTLSeconds == 60 && !config.dnsCaseRandomization)
        for bad in [0, 86401] {
            var c = AgentConfig()
            c.dnsMaxCacheTTLSeconds = bad
            #expect(throws: ManifestError.self) { try c.validate() }
        }
    }
}
