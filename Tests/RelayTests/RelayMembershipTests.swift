import Foundation
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NIOCore
import NIOSSL
import Relay
import ServiceLifecycle
import Testing

/// A relay enrols with a relay token and publishes its Relay (issue 13, item 1): an in-process
/// control plane and relay over TLS on loopback, real files.
@Suite("relay membership", .timeLimit(.minutes(2)), .rationed)
struct RelayMembershipTests {
    static let quiet: Logger = {
        var l = Logger(label: "relay-test")
        l.logLevel = .critical
        return l
    }()

    func config(
        _ cp: RunningControl,
        dir: TempDir,
        token: BootstrapTokenSecret?,
        port: Int = freePort()
    ) -> RelayConfig {
        var c = RelayConfig()
        c.stunListen = ["127.0.0.1:0"]
        c.adminListen = "127.0.0.1:0"
        c.controlServer = cp.url
        c.joinToken = token?.token
        c.caCertHash = token?.caCertHash
        c.name = "r1"
        c.site = "cloud"
        c.listen = "127.0.0.1:\(port)"
        c.dataDir = dir.path
        c.statusIntervalSeconds = 1
        c.statusRefreshSeconds = 3
        return c
    }

    /// Runs a relay until `body` returns, then stops it gracefully.
    func withRelay(_ config: RelayConfig, _ body: (RelayServer) async throws -> Void) async throws {
        let relay = RelayServer(config: config, logger: Self.quiet)
        let group = ServiceGroup(configuration: .init(services: [.init(service: relay)], logger: Self.quiet))
        let task = Task { try await group.run() }
        do {
            try await body(relay)
        } catch {
            await group.triggerGracefulShutdown()
            _ = try? await task.value
            throw error
        }
        await group.triggerGracefulShutdown()
        try await task.value
    }

    @Test func aRelayEnrolsPublishesItselfDrainsOnStopAndRestartsWithoutAToken() async throws {
        let cp = try await RunningControl()
        let dir = TempDir()
        let token = try await cp.token(usages: 1, relay: "r1")
        let port = freePort()
        try await self.withRelay(self.config(cp, dir: dir, token: token, port: port)) { relay in
            let published = await eventually(timeout: .seconds(20)) {
                (try? await cp.client.get(Relay.self, name: "r1"))?.status?.phase == .ready
            }
            #expect(published)
            let r1 = try await cp.client.get(Relay.self, name: "r1")
            #expect(r1.spec == RelaySpec(site: "cloud", addresses: ["127.0.0.1:\(port)"], stunAddresses: []))
            let credentials = try await relay.membership()!.credentials()
            #expect(credentials.identity == .relay("r1"))
            // It keeps its status fresh.
            let first = r1.metadata.resourceVersion
            #expect(
                await eventually(timeout: .seconds(20)) {
                    (try? await cp.client.get(Relay.self, name: "r1"))?.metadata.resourceVersion != first
                }
            )
            // A node of the same mesh opens a session on the advertised address; the status counts it.
            let node = try cp.pki.ca.issueCredential(identity: .node("a"), serverAuth: true, clientAuth: true)
            let files = CredentialFiles(directory: dir.path + "/node-a", name: "node")
            try FileManager.default.createDirectory(atPath: dir.path + "/node-a", withIntermediateDirectories: true)
            try files.write(keyPEM: node.keyPEM, certificatePEM: node.certificatePEM, caPEM: cp.pki.caPEM)
            let session = try await RelaySessionServerTests().connect(port, as: try files.load())
            try await session.send(.hello(version: 1, node: "a"))
            #expect(await session.next() == .welcome(relay: "r1", keepaliveSeconds: 15))
            #expect(
                await eventually(timeout: .seconds(20)) {
                    (try? await cp.client.get(Relay.self, name: "r1"))?.status?.sessions == 1
                }
            )
            try await session.channel.close()
            let admin = try await relay.adminAddress()
            let ready = try await HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: admin.port!))
                .send(.GET, "/readyz")
            #expect(ready.status == .ok)
        }
        #expect(try await cp.client.get(Relay.self, name: "r1").status?.phase == .draining)
        #expect(FileManager.default.fileExists(atPath: dir.path + "/pki/relay.crt"))
        // The token had one usage: the restart reuses the certificate in the data directory.
        try await self.withRelay(self.config(cp, dir: dir, token: nil)) { _ in
            let again = await eventually(timeout: .seconds(20)) {
                (try? await cp.client.get(Relay.self, name: "r1"))?.status?.phase == .ready
            }
            #expect(again)
        }
        try await cp.stop()
    }

    @Test func theRelayLocatesANodesHomeRelayFromItsNodeStatus() async throws {
        let cp = try await RunningControl()
        let dir = TempDir()
        let token = try await cp.token(usages: 1, relay: "r1")
        // Another relay, r2, and nodes homed on r2, on r1, and on none (their heartbeats say so).
        try await cp.client.apply(
            Relay(
                metadata: ObjectMeta(name: "r2"),
                spec: RelaySpec(addresses: ["127.0.0.1:7899"]),
                status: RelayStatus(phase: .ready)
            )
        )
        for (name, home) in [("b", "r2"), ("c", "r1"), ("d", nil)] as [(String, String?)] {
            let node = try cp.client(try cp.issue(.node(name)))
            try await node.apply(Node(metadata: ObjectMeta(name: name), spec: NodeSpec(site: name)))
            try await node.heartbeat(node: name, report: NodeHeartbeatReport(relay: home))
        }
        try await self.withRelay(self.config(cp, dir: dir, token: token)) { relay in
            let membership = try #require(try await relay.membership())
            let want = RelayLocation(relay: "r2", addresses: [try SocketAddress(ipAddress: "127.0.0.1", port: 7899)])
            #expect(await eventually(timeout: .seconds(20)) { await membership.locate("b") == want })
            #expect(await membership.locate("c") == nil)  // this relay itself
            #expect(await membership.locate("d") == nil)  // homed nowhere
            #expect(await membership.locate("nobody") == nil)
        }
        try await cp.stop()
    }

    @Test func aRelayRenewsItsCertificateServesWithItAndCanBeRevoked() async throws {
        let cp = try await RunningControl()
        let dir = TempDir()
        let token = try await cp.token(usages: 1, relay: "r1")
        let port = freePort()
        try await self.withRelay(self.config(cp, dir: dir, token: token, port: port)) { relay in
            let membership = try #require(try await relay.membership())
            let first = try await membership.credentials()
            #expect(
                await eventually(timeout: .seconds(20)) {
                    (try? await cp.client.get(Relay.self, name: "r1"))?.status?.phase == .ready
                }
            )
            // Renewal over the current certificate: a new serial, the same identity, on disk.
            let renewed = try await membership.renewNow()
            #expect(renewed.identity == .relay("r1"))
            #expect(renewed.certificate.serialNumber != first.certificate.serialNumber)
            let onDisk = try NodeEnrolment.files(stateDir: dir.path, role: .relay).load()
            #expect(onDisk.certificate.serialNumber == renewed.certificate.serialNumber)
            // The session listener presents the new certificate to the next node.
            let node = try cp.pki.ca.issueCredential(identity: .node("a"), serverAuth: true, clientAuth: true)
            let files = CredentialFiles(directory: dir.path + "/node-a", name: "node")
            try FileManager.default.createDirectory(atPath: dir.path + "/node-a", withIntermediateDirectories: true)
            try files.write(keyPEM: node.keyPEM, certificatePEM: node.certificatePEM, caPEM: cp.pki.caPEM)
            let session = try await RelaySessionServerTests().connect(port, as: try files.load())
            try await session.send(.hello(version: 1, node: "a"))
            #expect(await session.next() == .welcome(relay: "r1", keepaliveSeconds: 15))
            let served = try await session.channel.eventLoop.submit {
                try session.channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate
            }.get()
            let servedSerial = try #require(served).serialNumber
            #expect(MeshTLS.serialHex(bytes: servedSerial) == MeshTLS.serialHex(renewed.certificate.serialNumber))
            try await session.channel.close()
            // A node may not renew a relay's certificate.
            let other = try cp.client(try cp.issue(.node("a")))
            let denied = await #expect(throws: Status.self) {
                _ = try await other.raw(
                    .POST,
                    "/apis/mesh.edge/v1/relays/r1/certificate",
                    body: ByteBuffer(string: "{}")
                )
            }
            #expect(denied?.code == 403)
            // The admin revokes the relay: both certificates are on the list as mesh://relay/r1.
            let body = try await cp.client.raw(.POST, "/apis/mesh.edge/v1/relays/r1/revoke").body
            let list = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(body.readableBytesView))
            #expect(
                Set(list.items.map(\.serial)) == [
                    MeshTLS.serialHex(first.certificate.serialNumber),
                    MeshTLS.serialHex(renewed.certificate.serialNumber),
                ]
            )
            #expect(list.items.allSatisfy { $0.identity == "mesh://relay/r1" })
            let unknown = await #expect(throws: Status.self) {
                _ = try await cp.client.raw(.POST, "/apis/mesh.edge/v1/relays/r9/revoke")
            }
            #expect(unknown?.code == 404 && unknown?.message.contains("relay \"r9\"") == true)
        }
        try await cp.stop()
    }

    @Test func aNodeTokenDoesNotEnrolARelayAndTheRelayStopsSayingWhy() async throws {
        let cp = try await RunningControl()
        let dir = TempDir()
        let token = try await cp.token(usages: 1)
        let relay = RelayServer(config: self.config(cp, dir: dir, token: token), logger: Self.quiet)
        let error = await #expect(throws: IdentityError.self) { try await relay.run() }
        #expect(error?.message.contains("enrols nodes, not relays") == true, "\(String(describing: error))")
        #expect(error?.message.contains("meshctl token create --relay r1") == true)
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/pki/relay.key"))
        try await cp.stop()
    }

    @Test func membershipSettingsAreChecked() throws {
        var c = RelayConfig()
        #expect(try c.membership() == nil)
        c.controlServer = "https://127.0.0.1:7700"
        c.listen = "0.0.0.0:7800"
        #expect(throws: ManifestError.self) { try c.validate() }
        c.advertise = ["198.18.0.10:7800"]
        c.name = "r1"
        try c.validate()
        #expect(try c.membership()?.spec.addresses == ["198.18.0.10:7800"])
        c.advertise = ["relay.example:7800"]
        let bad = #expect(throws: ManifestError.self) { try c.validate() }
        #expect(bad?.message.hasPrefix("advertise[0]") == true, "\(bad!)")
        c.advertise = nil
        c.listen = "127.0.0.1:7800"
        c.joinToken = "abcdef.0123456789abcdef"
        let alone = #expect(throws: ManifestError.self) { try c.validate() }
        #expect(alone?.message.contains("go together") == true)
        c.controlServer = "http://127.0.0.1:7700"
        c.joinToken = nil
        let plain = #expect(throws: ManifestError.self) { try c.validate() }
        #expect(plain?.message.contains("HTTPS only") == true)
    }
}

/// `mesh-relay` as the issue's acceptance checks run it, against a real control plane.
@Suite("mesh-relay joins as a process", .timeLimit(.minutes(2)), .rationed)
struct RelayProcessTests {
    @Test func theIssuesCommandLineEnrolsPublishesAndServesSessions() async throws {
        let cp = try await RunningControl()
        let dir = TempDir()
        let token = try await cp.token(usages: 1, relay: "r1")
        let (listen, stun, admin) = (freePort(), freePort(), freePort())
        let p = try Subprocess(
            binaryDirectory() + "/mesh-relay",
            [
                "--server", cp.url, "--join-token", token.token, "--ca-cert-hash", token.caCertHash,
                "--name", "r1", "--listen", "127.0.0.1:\(listen)", "--stun-listen", "127.0.0.1:\(stun)",
                "--data-dir", dir.path, "--admin-listen", "127.0.0.1:\(admin)",
            ]
        )
        let published = await eventually(timeout: .seconds(30)) {
            (try? await cp.client.get(Relay.self, name: "r1"))?.status?.phase == .ready
        }
        #expect(published, "\(p.stderr)")
        let relay = try await cp.client.get(Relay.self, name: "r1")
        #expect(relay.spec.addresses == ["127.0.0.1:\(listen)"] && relay.spec.stunAddresses == ["127.0.0.1:\(stun)"])
        // A node session on the published address.
        let node = try cp.pki.ca.issueCredential(identity: .node("a"), serverAuth: true, clientAuth: true)
        let files = CredentialFiles(directory: dir.path + "/node-a", name: "node")
        try FileManager.default.createDirectory(atPath: dir.path + "/node-a", withIntermediateDirectories: true)
        try files.write(keyPEM: node.keyPEM, certificatePEM: node.certificatePEM, caPEM: cp.pki.caPEM)
        let session = try await RelaySessionServerTests().connect(listen, as: try files.load())
        try await session.send(.hello(version: 1, node: "a"))
        #expect(await session.next() == .welcome(relay: "r1", keepaliveSeconds: 15))
        let metrics = try await HTTPClient(endpoint: HTTPEndpoint(host: "127.0.0.1", port: admin)).send(
            .GET,
            "/metrics"
        )
        #expect(String(buffer: metrics.body).contains("relay_sessions_total 1"), "\(String(buffer: metrics.body))")
        p.signal(SIGTERM)
        let exit = await p.wait(timeout: .seconds(15))
        #expect(exit?.status == 0, "\(exit?.stderr ?? "")")
        #expect(await session.closedByRelay())
        #expect(try await cp.client.get(Relay.self, name: "r1").status?.phase == .draining)
        // A second start with the used-up token still works: the certificate is in the data dir.
        let again = try Subprocess(
            binaryDirectory() + "/mesh-relay",
            [
                "--server", cp.url, "--join-token", token.token, "--ca-cert-hash", token.caCertHash,
                "--name", "r1", "--listen", "127.0.0.1:\(listen)", "--stun-listen", "127.0.0.1:\(stun)",
                "--data-dir", dir.path, "--admin-listen", "127.0.0.1:\(admin)",
            ]
        )
        #expect(
            await eventually(timeout: .seconds(30)) {
                (try? await cp.client.get(Relay.self, name: "r1"))?.status?.phase == .ready
            },
            "\(again.stderr)"
        )
        again.signal(SIGTERM)
        #expect(await again.wait(timeout: .seconds(15))?.status == 0)
        // A node token: mesh-relay exits 1 saying why.
        let nodeToken = try await cp.token(usages: 1)
        let refused = try await run(
            binaryDirectory() + "/mesh-relay",
            [
                "--server", cp.url, "--join-token", nodeToken.token, "--ca-cert-hash", nodeToken.caCertHash,
                "--name", "r2", "--listen", "127.0.0.1:\(freePort())", "--stun-listen", "127.0.0.1:\(freePort())",
                "--data-dir", TempDir().path, "--admin-listen", "127.0.0.1:\(freePort())",
            ],
            timeout: .seconds(30)
        )
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("enrols nodes, not relays"), "\(refused.stderr)")
        try await cp.stop()
    }
}

/// When a relay rewrites its status (`RelayStatusPolicy`): each write goes to every agent's watch.
@Suite(.rationed) struct RelayStatusPolicyTests {
    @Test("written first, on a tenth's move of the session count (at least one), and after the refresh")
    func due() {
        let t0 = ContinuousClock.now
        let refresh = Duration.seconds(300)
        func due(_ sessions: Int, last: Int?, after seconds: Int64 = 30) -> Bool {
            RelayStatusPolicy.due(
                sessions: sessions,
                last: last.map { ($0, t0) },
                now: t0 + .seconds(seconds),
                refresh: refresh
            )
        }
        #expect(due(0, last: nil))
        #expect(!due(0, last: 0))
        #expect(due(1, last: 0) && due(4, last: 5))
        #expect(!due(105, last: 100) && !due(91, last: 100))
        #expect(due(110, last: 100) && due(90, last: 100))
        #expect(!due(1_000, last: 1_000, after: 299))
        #expect(due(1_000, last: 1_000, after: 300))
    }
}
