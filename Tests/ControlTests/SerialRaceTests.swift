import Control
import Foundation
import MeshClient
import MeshCore
import MeshIdentity
import MeshTestSupport
import Testing
import X509

/// Certificate serials stay unique when several `mesh-control` replicas sign at once (issue 17): the store
/// takes each serial as a reservation in the same transaction that records the certificate, so a serial
/// can have one owner only, whichever replica writes it; and concurrent joins through three replicas get
/// serials that are all different and all recorded.
@Suite(.serialized, .awaitedTeardown, .rationed) struct SerialRaceTests {
    @Test("30 writers on 3 replicas race for one serial: exactly one takes it, the others learn who holds it")
    func oneSerialOneOwner() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        var stores: [EtcdStore] = []
        for r in 0..<3 { stores.append(try await etcd.store(prefix: "/race/", replica: "r\(r)")) }
        let token = "serial/5eed0001"
        let outcomes = await withTaskGroup(of: (String, (any Error)?).self) { group in
            for i in 0..<30 {
                let store = stores[i % 3]
                group.addTask {
                    do {
                        _ = try await put(store, "n\(i)", resource: "issued", reserve: [token])
                        return ("n\(i)", nil)
                    } catch {
                        return ("n\(i)", error)
                    }
                }
            }
            var all: [(String, (any Error)?)] = []
            for await outcome in group { all.append(outcome) }
            return all
        }
        let winners = outcomes.filter { $0.1 == nil }.map(\.0)
        #expect(winners.count == 1, "\(outcomes.map { "\($0.0): \($0.1.map { "\($0)" } ?? "ok")" })")
        let owner = "issued/shop/\(winners.first ?? "?")"
        for (name, error) in outcomes where error != nil {
            #expect(
                (error as? StoreError) == .reserved(token: token, owner: owner),
                "\(name): \(String(describing: error))"
            )
        }
        // Every replica sees one holder: a new writer on any of them is refused with the same owner.
        for store in stores {
            await #expect(throws: StoreError.reserved(token: token, owner: owner)) {
                _ = try await put(store, "late", resource: "issued", reserve: [token])
            }
        }
        for store in stores { try await store.close() }
    }

    @Test("30 nodes join through 3 replicas at once: 30 different serials, each recorded for its node")
    func concurrentJoinsGetUniqueRecordedSerials() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let cps = try await ControlReplicaTests.replicas(3, etcd: etcd)
        var tokens: [BootstrapTokenSecret] = []
        for cp in cps { tokens.append(try await cp.token(usages: 10)) }
        let joined = try await withThrowingTaskGroup(of: (String, String).self) { group in
            for i in 0..<30 {
                let cp = cps[i % 3]
                let token = tokens[i % 3]
                group.addTask {
                    let (_, answer) = try await NodeEnrolment.join(
                        server: cp.endpoint,
                        nodeName: "n\(i)",
                        token: token.token,
                        caHash: token.caCertHash
                    )
                    let certificate = try Certificate(pemEncoded: answer.certificate)
                    return ("n\(i)", MeshTLS.serialHex(certificate.serialNumber))
                }
            }
            var all: [String: String] = [:]
            for try await (node, serial) in group { all[node] = serial }
            return all
        }
        #expect(joined.count == 30)
        #expect(Set(joined.values).count == 30, "every serial once")
        // Each replica recorded what it signed where all see it: revoking through another replica names the
        // very serial the node was given.
        for i in [0, 1, 2, 13, 29] {
            let body = try await cps[(i + 1) % 3].client.raw(.POST, "/apis/mesh.edge/v1/nodes/n\(i)/revoke").body
            let revoked = try JSONDecoder().decode(RevokedCertificateList.self, from: Data(body.readableBytesView))
            #expect(revoked.items.map(\.serial) == [joined["n\(i)"] ?? "?"])
        }
        for cp in cps { try await cp.stop() }
    }
}
