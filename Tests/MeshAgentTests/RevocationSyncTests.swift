import Foundation
import Logging
import MeshClient
import MeshCore
import MeshIdentity
import MeshTestSupport
import Testing

@testable import MeshAgent

@Suite("The agent's revocation list for its peer links", .timeLimit(.minutes(1)), .rationed)
struct RevocationSyncTests {
    @Test func aRevokedNodeReachesTheLinkVerifierAndStaysRevokedOffline() async throws {
        let cp = try await RunningControl()
        let dir = TempDir()
        let token = try await cp.token(usages: 1)
        // n1 joins (the control plane records the certificates it issues), and is revoked below.
        _ = try await NodeEnrolment.join(
            server: cp.endpoint,
            nodeName: "n1",
            token: token.token,
            caHash: token.caCertHash
        )
        let reader = try cp.client(try cp.issue(.node("n2")))
        let sync = RevocationSync(
            client: reader,
            revoked: RevokedSerials(),
            path: dir.path + "/revoked.json",
            interval: .milliseconds(100),
            logger: Logger(label: "test")
        )
        let running = Task { await sync.run() }
        _ = try await cp.client.raw(.POST, "/apis/mesh.edge/v1/nodes/n1/revoke")
        let body = try await cp.client.raw(.GET, "/apis/mesh.edge/v1/revokedcertificates").body
        let expected = Set(
            try JSONDecoder().decode(RevokedCertificateList.self, from: Data(body.readableBytesView)).items.map(
                \.serial
            )
        )
        #expect(!expected.isEmpty)
        #expect(await eventually(timeout: .seconds(10)) { sync.revoked.all == expected })
        running.cancel()
        await running.value
        // A restart with the control plane away starts from the kept list.
        try await cp.stop()
        let restarted = RevocationSync(
            client: reader,
            revoked: RevokedSerials(),
            path: dir.path + "/revoked.json",
            logger: Logger(label: "test")
        )
        restarted.loadKept()
        #expect(restarted.revoked.all == expected)
    }
}
