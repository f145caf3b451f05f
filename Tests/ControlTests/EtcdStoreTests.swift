import Control
import Foundation
import MeshCore
import MeshTestSupport
import NIOCore
import Synchronization
import Testing

/// What the etcd store adds to the conformance suite: several stores (replicas) over one prefix,
/// etcd's own compaction, and a cluster losing a member.
@Suite(.rationed) struct EtcdStoreTests {
    @Test func replicasSeeEachOthersWritesInListsAndWatches() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let a = try await etcd.store(prefix: "/shared/", replica: "a")
        let b = try await etcd.store(prefix: "/shared/", replica: "b")
        let start = try await b.currentResourceVersion()
        let sub = try await b.watch(after: start, filter: WatchFilter(resource: "services"))
        var written: [Int64] = []
        for i in 0..<20 {
            let store: any Store = i % 2 == 0 ? a : b
            written.append(try await put(store, "s\(i % 5)", value: i).resourceVersion)
            // Read your writes on the other replica: its list waits for its cache to catch up.
            let other: any Store = i % 2 == 0 ? b : a
            let (items, rv) = try await other.list(resource: "services", namespace: "shop")
            #expect(rv >= written.last!)
            #expect(items.first { $0.key.name == "s\(i % 5)" }?.resourceVersion == written.last!)
        }
        #expect(await collect(sub, count: 20) == written)
        try await a.close()
        try await b.close()
    }

    @Test func aReplicaStartedLaterLoadsEveryObject() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let a = try await etcd.store(prefix: "/m/", replica: "a")
        for i in 0..<30 { try await put(a, "s\(i)", labels: ["i": "\(i)"]) }
        try await remove(a, "s0")
        let b = try await etcd.store(prefix: "/m/", replica: "b")
        let (items, _) = try await b.list(resource: "services", namespace: nil)
        #expect(items.count == 29)
        #expect(items.first { $0.key.name == "s7" }?.labels == ["i": "7"])
        // Another prefix is another mesh.
        let other = try await etcd.store(prefix: "/other/", replica: "a")
        #expect(try await other.list(resource: "services", namespace: nil).items.isEmpty)
        for s in [a, b, other] { try await s.close() }
    }

    /// A replica started after writes replays them into its watch history, also when etcd holds fewer revisions
    /// than the history's limit (a small mesh's only replica, restarted): its watchers resume rather than list.
    @Test func aReplicaStartedLaterResumesWatchesFromBeforeItsStart() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let a = try await etcd.store(prefix: "/h/", replica: "a")
        var rvs: [Int64] = []
        for i in 0..<10 { rvs.append(try await put(a, "s\(i)").resourceVersion) }
        try await a.close()
        let b = try await etcd.store(prefix: "/h/", replica: "b")
        let sub = try await b.watch(after: rvs[2], filter: WatchFilter(resource: "services"))
        #expect(await collect(sub, count: 7) == Array(rvs[3...]))
        try await b.close()
    }

    @Test func etcdCompactionMakesOldVersionsGoneForANewReplica() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let a = try await etcd.store(prefix: "/c/", replica: "a")
        var rvs: [Int64] = []
        for i in 0..<10 { rvs.append(try await put(a, "s\(i)").resourceVersion) }
        try await a.client.compact(revision: rvs[8])
        // A replica that starts now has no history before its start: 410, and the client lists again.
        let b = try await etcd.store(prefix: "/c/", replica: "b")
        await #expect {
            _ = try await b.watch(after: rvs[2], filter: WatchFilter(resource: "services"))
        } throws: { error in
            if case StoreError.gone = error { return true }
            return false
        }
        // The running replica still serves from its own history.
        let sub = try await a.watch(after: rvs[2], filter: WatchFilter(resource: "services"))
        #expect(await collect(sub, count: 7) == Array(rvs[3...]))
        try await a.close()
        try await b.close()
    }

    @Test func sharedBeatsReachTheOtherReplicas() async throws {
        let etcd = try await EtcdCluster.start()
        defer { etcd.stop() }
        let a = try await etcd.store(prefix: "/b/", replica: "a")
        let b = try await etcd.store(prefix: "/b/", replica: "b")
        let seen = Recorder()
        b.onSharedBeats { beats in seen.add(beats) }
        a.onSharedBeats { _ in Issue.record("a replica got its own beats back") }
        try await a.shareBeats(["n1": 10, "n2": 20])
        #expect(await eventually { seen.value == ["n1": 10, "n2": 20] })
        try await a.close()
        try await b.close()
    }

    @Test func aThreeMemberClusterLosingOneKeepsServingReadsWritesAndWatches() async throws {
        let etcd = try await EtcdCluster.start(members: 3)
        defer { etcd.stop() }
        let store = try await etcd.store(prefix: "/ha/", replica: "a")
        let before = try await put(store, "web", value: 1)
        let sub = try await store.watch(after: before.resourceVersion, filter: WatchFilter(resource: "services"))
        // Kill the member the store talks to first (its watch runs there too).
        etcd.kill(member: 0)
        var after: [Int64] = []
        for i in 0..<10 { after.append(try await put(store, "web", value: i + 2).resourceVersion) }
        #expect(try #require(try await store.get(key("web"))).resourceVersion == after.last)
        #expect(try await store.list(resource: "services", namespace: "shop").items.count == 1)
        #expect(await collect(sub, count: 10, timeout: .seconds(30)) == after)
        try await store.close()
    }
}

final class Recorder: Sendable {
    private let state = Mutex<[String: Int64]>([:])
    func add(_ beats: [String: Int64]) { self.state.withLock { $0.merge(beats) { $1 } } }
    var value: [String: Int64] { self.state.withLock { $0 } }
}
