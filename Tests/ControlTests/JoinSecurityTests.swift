import Control
import Foundation
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NIOCore
import Synchronization
import Testing
import X509

/// Who may join as which node, certificate revocation and renewal, and the server identity every
/// client requires (issue 11): a real control plane over TLS on loopback, real files.
@Suite(.rationed) struct JoinSecurityTests {
    static let quiet: Logger = {
        var l = Logger(label: "test")
        l.logLevel = .warning
        return l
    }()

    final class Ended: Sendable {
        let value = Atomic<Bool>(false)
        var isSet: Bool { self.value.load(ordering: .acquiring) }
    }

    /// Joins `name` with `token`: the node's credential and a client presenting it.
    func join(
        _ cp: RunningControl,
        _ name: String,
        _ token: BootstrapTokenSecret
    ) async throws
        -> (client: ControlClient, credential: IssuedCredential)
    {
        let (key, answer) = try await NodeEnrolment.join(
            server: cp.endpoint,
            nodeName: name,
            token: token.token,
            caHash: token.caCertHash
        )
        let credential = IssuedCredential(keyPEM: key, certificatePEM: answer.certificate)
        return (try cp.client(credential), credential)
    }

    func serial(_ credential: IssuedCredential) throws -> String {
        MeshTLS.serialHex(try Certificate(pemEncoded: credential.certificatePEM).serialNumber)
    }

    func node(_ name: String, site: String) -> Node {
        Node(metadata: ObjectMeta(name: name), spec: NodeSpec(site: site))
    }

    @Test func aTokenCannotTakeOverAnExistingNodeButATokenBoundToItCan() async throws {
        let cp = try await RunningControl()
        let token = try await cp.token(usages: 5)
        let (n1, _) = try await self.join(cp, "n1", token)
        // The join registered the Node at once (Unknown until the agent's first beat).
        #expect(try await cp.client.get(Node.self, name: "n1").status?.phase == .unknown)
        try await n1.apply(self.node("n1", site: "a"))
        try await n1.heartbeat(node: "n1")
        #expect(try await cp.client.get(Node.self, name: "n1").status?.phase == .ready)

        // The impersonation: the name of a Ready node with an unbound token. Refused, explained,
        // and the token's usage is not spent.
        let refused = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: "n1",
                token: token.token,
                caHash: token.caCertHash
            )
        }
        let message = refused?.message ?? ""
        #expect(message.contains("node \"n1\" already exists"), "\(message)")
        #expect(message.contains("meshctl delete node n1") && message.contains("meshctl token create --node n1"))
        let listed = try await cp.client.raw(.GET, ControlAPI.tokensPath).body
        let tokens = try JSONDecoder().decode(BootstrapTokenList.self, from: Data(listed.readableBytesView))
        #expect(tokens.items.map(\.usagesLeft) == [4])
        // Nothing changed: the site, and the real node's certificate works.
        #expect(try await cp.client.get(Node.self, name: "n1").spec.site == "a")
        try await n1.heartbeat(node: "n1")

        // A token bound to n1 joins only n1...
        let bound = try await cp.token(usages: 2, node: "n1")
        #expect(bound.nodeName == "n1")
        let elsewhere = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: "n2",
                token: bound.token,
                caHash: bound.caCertHash
            )
        }
        #expect(elsewhere?.message.contains("bound to node n1; it cannot join n2") == true, "\(elsewhere!)")
        // ... and re-joins it while its Node exists (a wiped disk): the earlier certificate is void.
        let (again, _) = try await self.join(cp, "n1", bound)
        try await again.heartbeat(node: "n1")
        let old = await #expect(throws: Status.self) { try await n1.heartbeat(node: "n1") }
        #expect(old?.code == 401 && old?.message.contains("is revoked") == true, "\(String(describing: old))")
        try await cp.stop()
    }

    @Test func aJoinAfterTheNodeWasDeletedSucceedsAndVoidsTheOldCertificate() async throws {
        let cp = try await RunningControl()
        let token = try await cp.token(usages: 2)
        let (first, _) = try await self.join(cp, "n1", token)
        try await first.apply(self.node("n1", site: "a"))
        // kubeadm style: delete the Node, then join the name again with any token.
        try await cp.client.delete(Node.self, name: "n1")
        let (second, _) = try await self.join(cp, "n1", token)
        #expect(try await cp.client.get(Node.self, name: "n1").status?.phase == .unknown)
        try await second.apply(self.node("n1", site: "b"))
        let old = await #expect(throws: Status.self) { _ = try await first.list(MeshService.self) }
        #expect(old?.code == 401)
        #expect(try await cp.client.get(Node.self, name: "n1").spec.site == "b")
        try await cp.stop()
    }

    @Test func aServerHoldingANodeCertificateGetsNoJoinToken() async throws {
        let cp = try await RunningControl()
        let token = try await cp.token(usages: 1)
        // A node's certificate and key, signed by the mesh CA, on a server posing as the control plane.
        let stolen = try cp.pki.ca.issueCredential(identity: .node("n1"), serverAuth: true, clientAuth: true)
        let fake = try await FakeControlPlane(credential: stolen, caPEM: cp.pki.caPEM)
        let error = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: fake.endpoint,
                nodeName: "n9",
                token: token.token,
                caHash: token.caCertHash
            )
        }
        let message = error?.message ?? ""
        #expect(message.contains("presented mesh://node/n1, not the control plane"), "\(message)")
        #expect(message.contains("the join token was not sent"))
        #expect(fake.requests.isEmpty, "\(fake.requests)")
        // The token is intact: the real control plane still takes it.
        _ = try await self.join(cp, "n9", token)
        try await fake.stop()
        try await cp.stop()
    }

    @Test func everyClientRequiresTheIdentityItMeantToReach() async throws {
        let cp = try await RunningControl()
        let nodeA = try cp.pki.ca.issueCredential(identity: .node("a"), serverAuth: true, clientAuth: true)
        let fake = try await FakeControlPlane(credential: nodeA, caPEM: cp.pki.caPEM)
        let admin = try cp.pki.admin.load()
        // An admin client (meshctl) and a node client (agent) refuse it: it is not the control plane.
        for credentials in [admin] {
            let client = try ControlClient(endpoint: fake.endpoint, credentials: credentials)
            let error = await #expect(throws: HTTPClientError.self) { _ = try await client.list(MeshService.self) }
            #expect(error?.message.contains("presented mesh://node/a, not the control plane") == true, "\(error!)")
        }
        let agent = try cp.client(try cp.issue(.node("b")))
        let agentClient = ControlClient(endpoint: fake.endpoint, tls: agent.http.tls)
        await #expect(throws: HTTPClientError.self) { try await agentClient.heartbeat(node: "b") }
        #expect(fake.requests.isEmpty)
        // A link that means node a accepts it; one that means node b does not.
        let toA = try MeshTLS.client(caPEM: cp.pki.caPEM, expect: .exactly(.node("a")))
        #expect(
            try await HTTPClient(endpoint: fake.endpoint, tls: HTTPClientTLS(mesh: toA)).send(.GET, "/").status == .ok
        )
        let toB = try MeshTLS.client(caPEM: cp.pki.caPEM, expect: .exactly(.node("b")))
        let wrong = await #expect(throws: HTTPClientError.self) {
            _ = try await HTTPClient(endpoint: fake.endpoint, tls: HTTPClientTLS(mesh: toB)).send(.GET, "/")
        }
        #expect(wrong?.message.contains("presented mesh://node/a, not mesh://node/b") == true, "\(wrong!)")
        // The real control plane passes the same check.
        #expect(try await cp.client.list(MeshService.self).items.isEmpty)
        try await fake.stop()
        try await cp.stop()
    }

    @Test func aRevokedNodeIsRefusedAndTheListReachesPeersAndRelays() async throws {
        let dir = TempDir()
        var cp = try await RunningControl(dir: dir) { $0.bookmarkIntervalSeconds = 1 }
        let token = try await cp.token(usages: 2)
        let (n1, n1Credential) = try await self.join(cp, "n1", token)
        let (n2, n2Credential) = try await self.join(cp, "n2", token)
        try await n1.apply(self.node("n1", site: "a"))
        // Two watches n1 opened before its revocation: one that lists first (answered by a task), one from a
        // version (started on the connection's event loop).
        let watchEnded = Ended()
        let versionedEnded = Ended()
        let rv = try await cp.rv()
        let watching = Task {
            try? await n1.watch(MeshService.self, after: nil) { _ in true }
            watchEnded.value.store(true, ordering: .releasing)
        }
        let versioned = Task {
            try? await n1.watch(MeshService.self, after: rv) { _ in true }
            versionedEnded.value.store(true, ordering: .releasing)
        }
        #expect(!watchEnded.isSet && !versionedEnded.isSet)
        // A node may not revoke another.
        let denied = await #expect(throws: Status.self) {
            _ = try await n2.raw(.POST, "/apis/mesh.edge/v1/nodes/n1/revoke")
        }
        #expect(denied?.code == 403)
        // The admin revokes n1: its certificate's serial is on the list, and refused at once.
        let body = try await cp.client.raw(.POST, "/apis/mesh.edge/v1/nodes/n1/revoke").body
        let revoked = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(body.readableBytesView))
        #expect(revoked.items.map(\.serial) == [try self.serial(n1Credential)])
        #expect(revoked.items.first?.identity == "mesh://node/n1")
        let refused = await #expect(throws: Status.self) { _ = try await n1.list(MeshService.self) }
        // Its open watch ends at the next bookmark.
        #expect(await eventually(timeout: .seconds(10)) { watchEnded.isSet && versionedEnded.isSet })
        watching.cancel()
        versioned.cancel()
        #expect(refused?.code == 401)
        #expect(refused?.message.contains("mesh://node/n1") == true && refused?.message.contains("is revoked") == true)
        // Peers and relays fetch the list; the verifier hook refuses the serial on a link to n1.
        let relay = try cp.client(try cp.issue(.relay("r1")))
        for reader in [n2, relay] {
            let listed = try await reader.raw(.GET, "/apis/mesh.edge/v1/revokedcertificates").body
            let list = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(listed.readableBytesView))
            #expect(list.items.map(\.serial) == [try self.serial(n1Credential)])
        }
        let relayList = await #expect(throws: Status.self) { _ = try await relay.list(MeshService.self) }
        #expect(relayList?.code == 403)
        let n1Server = try await FakeControlPlane(credential: n1Credential, caPEM: cp.pki.caPEM)
        let set = RevokedSerials([try self.serial(n1Credential)])
        let link = try MeshTLS.client(caPEM: cp.pki.caPEM, expect: .exactly(.node("n1")), revoked: set)
        let error = await #expect(throws: HTTPClientError.self) {
            _ = try await HTTPClient(endpoint: n1Server.endpoint, tls: HTTPClientTLS(mesh: link)).send(.GET, "/")
        }
        #expect(error?.message.contains("is revoked") == true, "\(error!)")
        try await n1Server.stop()
        // The Node stays, so an unbound token cannot take the name; the list survives a restart.
        let again = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: "n1",
                token: token.token,
                caHash: token.caCertHash
            )
        }
        #expect(again != nil)
        try await cp.stop()
        cp = try await RunningControl(dir: dir)
        let afterRestart = await #expect(throws: Status.self) {
            _ = try await cp.client(n1Credential).list(MeshService.self)
        }
        #expect(afterRestart?.code == 401)
        #expect(try await cp.client(n2Credential).list(MeshService.self).items.isEmpty)
        try await cp.stop()
    }

    @Test func renewalGivesALaterCertificateForTheSameIdentityOnly() async throws {
        let clock = ManualClock()
        let cp = try await RunningControl(clock: clock) { $0.nodeCertificateValiditySeconds = 3600 }
        let token = try await cp.token(usages: 1)
        let state = TempDir()
        let loaded = try await NodeEnrolment.credentials(
            stateDir: state.path,
            server: cp.endpoint,
            nodeName: "n1",
            token: token.token,
            caHash: token.caCertHash,
            logger: Self.quiet
        )
        let before = loaded.certificate
        #expect(abs(before.notValidAfter.timeIntervalSinceNow - 3600) < 120)
        let tls = try MeshTLS.client(loaded, expect: .controlPlane)
        let renewer = CertificateRenewer(
            credentials: loaded,
            files: NodeEnrolment.files(stateDir: state.path),
            nodeName: "n1",
            tls: tls,
            endpoint: cp.endpoint,
            logger: Self.quiet
        )
        // Not due for 40 minutes.
        #expect(MeshTLS.renewalTime(of: before).timeIntervalSinceNow > 2000)
        // Certificate times have whole seconds: one passes on the control plane's clock, so the new
        // expiry is later.
        await clock.advance(by: .milliseconds(1100))
        let client = ControlClient(endpoint: cp.endpoint, mesh: tls).keepingAlive()
        try await client.heartbeat(node: "n1")
        let renewed = try await renewer.renew()
        #expect(renewed.certificate.notValidAfter > before.notValidAfter)
        #expect(renewed.certificate.serialNumber != before.serialNumber)
        #expect(renewed.identity == .node("n1"))
        // Stored for the next start, and used from the next request on (the kept connection too).
        #expect(try NodeEnrolment.files(stateDir: state.path).load().certificate == renewed.certificate)
        #expect(tls.current.generation == 1)
        try await client.heartbeat(node: "n1")
        // With the first certificate revoked, the same kept-alive client still works: it presents the new one.
        let oldSerial = MeshTLS.serialHex(before.serialNumber)
        let revokedOld = try await cp.client.raw(.POST, "/apis/mesh.edge/v1/nodes/n1/revoke?serial=\(oldSerial)").body
        let list = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(revokedOld.readableBytesView))
        #expect(list.items.map(\.serial) == [oldSerial])
        try await client.heartbeat(node: "n1")
        let withOld = try cp.client(IssuedCredential(keyPEM: loaded.keyPEM, certificatePEM: loaded.certificatePEM))
        let oldRefused = await #expect(throws: Status.self) { try await withOld.heartbeat(node: "n1") }
        #expect(oldRefused?.code == 401)

        // The renewal keeps the identity: another name's CSR, another node's path, the admin, no certificate.
        let cp2 = try await RunningControl()
        let n1 = try cp2.client(try cp2.issue(.node("n1")))
        let other = CertificateRenewalRequest(csr: try NodeKey().csrPEM(nodeName: "n2"))
        let body = ByteBuffer(bytes: try MeshJSON.encode(other))
        let wrongName = await #expect(throws: Status.self) {
            _ = try await n1.raw(.POST, "/apis/mesh.edge/v1/nodes/n1/certificate", body: body)
        }
        #expect(wrongName?.code == 403 && wrongName?.message.contains("may not ask for n2") == true)
        let own = ByteBuffer(
            bytes: try MeshJSON.encode(CertificateRenewalRequest(csr: try NodeKey().csrPEM(nodeName: "n2")))
        )
        let wrongPath = await #expect(throws: Status.self) {
            _ = try await n1.raw(.POST, "/apis/mesh.edge/v1/nodes/n2/certificate", body: own)
        }
        #expect(wrongPath?.code == 403)
        let byAdmin = await #expect(throws: Status.self) {
            _ = try await cp2.client.raw(.POST, "/apis/mesh.edge/v1/nodes/n2/certificate", body: own)
        }
        #expect(byAdmin?.code == 403 && byAdmin?.message.contains("only mesh://node/n2 itself") == true)
        let anonymous = await #expect(throws: Status.self) {
            _ = try await cp2.client(nil).raw(.POST, "/apis/mesh.edge/v1/nodes/n2/certificate", body: own)
        }
        #expect(anonymous?.code == 401)
        try await cp2.stop()
        try await cp.stop()
    }
}
