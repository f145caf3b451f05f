import Control
import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import MeshTestSupport
import NIOCore
import Testing
import X509

/// Relays enrol like nodes, but only with a relay token for their name (`meshctl token create
/// --relay NAME`); the CA signs `mesh://relay/NAME`; the relay writes its own Relay, nodes read
/// them (issue 13, item 1). A real control plane over TLS on loopback.
@Suite(.rationed) struct RelayJoinTests {
    func joinRelay(
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
            caHash: token.caCertHash,
            role: .relay
        )
        let credential = IssuedCredential(keyPEM: key, certificatePEM: answer.certificate)
        return (try cp.client(credential), credential)
    }

    func relay(_ name: String) -> Relay {
        Relay(
            metadata: ObjectMeta(name: name),
            spec: RelaySpec(site: "cloud", addresses: ["127.0.0.1:7800"], stunAddresses: ["127.0.0.1:3478"]),
            status: RelayStatus(phase: .ready, lastUpdateTime: Timestamp.now(), sessions: 0)
        )
    }

    @Test func aRelayTokenEnrolsThatRelayAsMeshRelayForServingAndAsAClient() async throws {
        let cp = try await RunningControl()
        let token = try await cp.token(usages: 2, relay: "r1")
        #expect(token.relayName == "r1" && token.nodeName == nil)
        let (_, credential) = try await self.joinRelay(cp, "r1", token)
        let certificate = try Certificate(pemEncoded: credential.certificatePEM)
        #expect(meshIdentity(of: certificate) == .relay("r1"))
        let eku = try certificate.extensions.extendedKeyUsage
        #expect(eku?.contains(.serverAuth) == true && eku?.contains(.clientAuth) == true)
        // No Node was created for it.
        let nodes = try await cp.client.list(Node.self)
        #expect(nodes.items.isEmpty)
        // Listed as a relay token.
        let listed = try await cp.client.raw(.GET, "/apis/mesh.edge/v1/bootstraptokens").body
        let tokens = try JSONDecoder().decode(BootstrapTokenList.self, from: Data(listed.readableBytesView))
        #expect(tokens.items.map(\.relayName) == ["r1"])
        try await cp.stop()
    }

    @Test func tokensEnrolOnlyTheirKind() async throws {
        let cp = try await RunningControl()
        let nodeToken = try await cp.token(usages: 5)
        let refused = await #expect(throws: IdentityError.self) {
            _ = try await self.joinRelay(cp, "r1", nodeToken)
        }
        #expect(refused?.message.contains("enrols nodes, not relays") == true, "\(refused!)")
        #expect(refused?.message.contains("meshctl token create --relay r1") == true)
        let relayToken = try await cp.token(usages: 5, relay: "r1")
        let asNode = await #expect(throws: IdentityError.self) {
            _ = try await NodeEnrolment.join(
                server: cp.endpoint,
                nodeName: "r1",
                token: relayToken.token,
                caHash: relayToken.caCertHash
            )
        }
        #expect(asNode?.message.contains("enrols relay r1 only") == true, "\(asNode!)")
        let otherRelay = await #expect(throws: IdentityError.self) {
            _ = try await self.joinRelay(cp, "r2", relayToken)
        }
        #expect(otherRelay?.message.contains("it cannot enrol relay r2") == true, "\(otherRelay!)")
        // Refusals spent no usage: the token still enrols r1.
        _ = try await self.joinRelay(cp, "r1", relayToken)
        // Both bindings at once is a bad request.
        let both = await #expect(throws: Status.self) {
            _ = try await cp.client.raw(
                .POST,
                "/apis/mesh.edge/v1/bootstraptokens",
                body: ByteBuffer(bytes: try MeshJSON.encode(BootstrapTokenRequest(nodeName: "n1", relayName: "r1")))
            )
        }
        #expect(both?.code == 400 && both?.message.contains("either a node or a relay") == true)
        // A role that is not node or relay is a bad request.
        let badRole = await #expect(throws: Status.self) {
            _ = try await cp.client(nil).raw(
                .POST,
                "/apis/mesh.edge/v1/join",
                body: ByteBuffer(
                    string:
                        #"{"apiVersion":"mesh.edge/v1","kind":"JoinRequest","token":"\#(relayToken.token)","csr":"x","role":"admin"}"#
                )
            )
        }
        #expect(badRole?.code == 400 && badRole?.message.contains("role") == true, "\(badRole!)")
        try await cp.stop()
    }

    @Test func aRelayRejoinRevokesItsEarlierCertificate() async throws {
        let cp = try await RunningControl()
        let token = try await cp.token(usages: 2, relay: "r1")
        let (first, firstCredential) = try await self.joinRelay(cp, "r1", token)
        _ = try await first.apply(self.relay("r1"))
        let (second, _) = try await self.joinRelay(cp, "r1", token)
        _ = try await second.apply(self.relay("r1"))
        let old = await #expect(throws: Status.self) { _ = try await first.list(Relay.self) }
        #expect(old?.code == 401 && old?.message.contains("mesh://relay/r1") == true, "\(old!)")
        let body = try await cp.client.raw(.GET, "/apis/mesh.edge/v1/revokedcertificates").body
        let list = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(body.readableBytesView))
        let serial = MeshTLS.serialHex(try Certificate(pemEncoded: firstCredential.certificatePEM).serialNumber)
        #expect(list.items.map(\.serial) == [serial])
        #expect(list.items.first?.identity == "mesh://relay/r1")
        try await cp.stop()
    }

    @Test func aRelayWritesOnlyItsOwnRelayAndNodesListAndWatchRelays() async throws {
        let cp = try await RunningControl()
        let (r1, _) = try await self.joinRelay(cp, "r1", try await cp.token(relay: "r1"))
        let (created, isNew) = try await r1.apply(self.relay("r1"))
        #expect(isNew && created.spec.addresses == ["127.0.0.1:7800"] && created.status?.phase == .ready)
        let other = await #expect(throws: Status.self) { _ = try await r1.apply(self.relay("r2")) }
        #expect(other?.code == 403 && other?.message.contains("mesh://relay/r1 may not PUT") == true)
        let node = await #expect(throws: Status.self) {
            _ = try await r1.apply(Node(metadata: ObjectMeta(name: "r1"), spec: NodeSpec()))
        }
        #expect(node?.code == 403)
        let delete = await #expect(throws: Status.self) { _ = try await r1.delete(Relay.self, name: "r1") }
        #expect(delete?.code == 403)
        // A relay reads nodes and relays (to forward circuits later), not services.
        _ = try await r1.list(Node.self)
        #expect(try await r1.get(Relay.self, name: "r1").spec.site == "cloud")
        let services = await #expect(throws: Status.self) { _ = try await r1.list(MeshService.self) }
        #expect(services?.code == 403)

        // A node lists and watches relays, and may not write one.
        let n1 = try cp.client(try cp.issue(.node("n1")))
        #expect(try await n1.list(Relay.self).items.map(\.metadata.name) == ["r1"])
        let nodeWrite = await #expect(throws: Status.self) { _ = try await n1.apply(self.relay("r1")) }
        #expect(nodeWrite?.code == 403)
        var seen: [String] = []
        try await n1.watch(Relay.self, after: nil, timeoutSeconds: 5) { event in
            guard case .added(let relay) = event else { return true }
            seen.append(relay.metadata.name)
            return false
        }
        #expect(seen == ["r1"])
        try await cp.stop()
    }

    @Test func aRelayObjectIsValidated() async throws {
        let cp = try await RunningControl()
        var bad = self.relay("r1")
        bad.spec.addresses = ["relay.example:7800", "127.0.0.1:0", "[::1]:7800"]
        bad.spec.site = "Not A Label"
        let refused = await #expect(throws: Status.self) { _ = try await cp.client.apply(bad) }
        let message = refused?.message ?? ""
        #expect(refused?.code == 422 || refused?.code == 400, "\(message)")
        #expect(message.contains("spec.addresses[0]") && message.contains("not an IP address"), "\(message)")
        #expect(message.contains("spec.addresses[1]") && message.contains("1-65535"), "\(message)")
        #expect(!message.contains("spec.addresses[2]"), "\(message)")
        #expect(message.contains("spec.site"), "\(message)")
        var empty = self.relay("r1")
        empty.spec.addresses = []
        let none = await #expect(throws: Status.self) { _ = try await cp.client.apply(empty) }
        #expect(none?.message.contains("at least one IP:port") == true)
        try await cp.stop()
    }
}
