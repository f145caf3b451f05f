import Control
import Foundation
import MeshCore
import MeshTestSupport
import NIOCore
import Testing

/// Watches scoped to a node (`?node=`, `NodePlacement`): a node's agent gets its own devices and workloads and
/// every object of the other kinds; an object moving on or off the node arrives as ADDED or DELETED there; a
/// workload's instance counts reach no node-scoped watcher; with every agent following every device, a twin
/// report reached all of them.
@Suite(.rationed) struct NodeScopedWatchTests {
    static func stored<T: MeshObject>(_ object: T, rv: Int64) -> StoredObject {
        var o = object
        o.metadata.resourceVersion = String(rv)
        return StoredObject(
            key: ObjectKey(resource: T.resource.plural, namespace: "shop", name: o.metadata.name),
            resourceVersion: rv,
            labels: [:],
            json: ByteBuffer(bytes: try! MeshJSON.encode(o))
        )
    }

    static func device(_ name: String, on node: String, rv: Int64, reported: String? = nil) -> StoredObject {
        let status = reported.map {
            DeviceStatus(twins: [DeviceTwinStatus(name: "temperature", reported: $0)])
        }
        return Self.stored(
            Device(
                metadata: ObjectMeta(name: name, namespace: "shop"),
                spec: DeviceSpec(model: "thermostat", node: node),
                status: status
            ),
            rv: rv
        )
    }

    static func workload(_ name: String, on nodes: [String], rv: Int64, running: Int = 0) -> StoredObject {
        Self.stored(
            Workload(
                metadata: ObjectMeta(name: name, namespace: "shop"),
                spec: WorkloadSpec(command: "/bin/true"),
                status: WorkloadStatus(nodes: nodes, running: running)
            ),
            rv: rv
        )
    }

    static func service(_ name: String, rv: Int64) -> StoredObject {
        Self.stored(
            MeshService(
                metadata: ObjectMeta(name: name, namespace: "shop"),
                spec: ServiceSpec(ports: [ServicePort(port: 80)])
            ),
            rv: rv
        )
    }

    /// `TYPE name` for each line of a chunk; `BOOKMARK` for a bookmark.
    static func lines(_ chunk: ByteBuffer?) -> [String] {
        String(buffer: chunk ?? ByteBuffer()).split(separator: "\n").map { line in
            let value = try? JSONValue.parse(json: Data(line.utf8))
            let type = value?["type"]?.stringValue ?? "?"
            if type == "BOOKMARK" { return type }
            return "\(type) \(value?["object"]?["metadata"]?["name"]?.stringValue ?? "?")"
        }
    }

    /// What each watcher got since it was last read: a bookmark is sent to those that got nothing, so that
    /// reading never waits.
    static func taken(_ hub: WatchHub, _ subs: [WatchSubscription]) async -> [[String]] {
        hub.sendBookmarks()
        var out: [[String]] = []
        for sub in subs { out.append(Self.lines(await sub.next(kind: "Bookmark"))) }
        return out
    }

    @Test func aNodeGetsItsOwnDevicesAndWorkloadsAndEveryOtherKind() async throws {
        let hub = WatchHub(current: 0)
        let kinds = ["services", "devices", "workloads"]
        let a = try hub.subscribe(after: 0, filter: WatchFilter(resources: kinds, node: "a"))
        let b = try hub.subscribe(after: 0, filter: WatchFilter(resources: kinds, node: "b"))
        let all = try hub.subscribe(after: 0, filter: WatchFilter(resources: kinds))
        _ = await Self.taken(hub, [a, b, all])  // the opening bookmarks
        #expect(hub.subscriberCount(of: "devices") == 3 && hub.subscriberCount(of: "devices", node: "a") == 1)
        #expect(hub.subscriberCount(of: "services") == 3)

        hub.publish(StoreEvent(kind: .added, object: Self.device("d1", on: "a", rv: 1)))
        hub.publish(StoreEvent(kind: .added, object: Self.service("s", rv: 2)))
        hub.publish(StoreEvent(kind: .added, object: Self.workload("w", on: ["a", "b"], rv: 3)))
        var got = await Self.taken(hub, [a, b, all])
        #expect(got[0] == ["ADDED d1", "ADDED s", "ADDED w"])
        #expect(got[1] == ["ADDED s", "ADDED w"])
        #expect(got[2] == ["ADDED d1", "ADDED s", "ADDED w"])
        var seenByA = got[0]

        // A twin report (the device's status) reaches its node only.
        hub.publish(StoreEvent(kind: .modified, object: Self.device("d1", on: "a", rv: 4, reported: "21.5")))
        got = await Self.taken(hub, [a, b, all])
        #expect(got == [["MODIFIED d1"], ["BOOKMARK"], ["MODIFIED d1"]])
        seenByA += got[0]

        // A workload's instance counts reach no node: what a node uses of it did not change.
        hub.publish(StoreEvent(kind: .modified, object: Self.workload("w", on: ["a", "b"], rv: 5, running: 1)))
        hub.publish(StoreEvent(kind: .modified, object: Self.workload("w", on: ["a", "b"], rv: 6, running: 2)))
        got = await Self.taken(hub, [a, b, all])
        #expect(got == [["BOOKMARK"], ["BOOKMARK"], ["MODIFIED w", "MODIFIED w"]])

        // Moving: DELETED where it left, ADDED where it arrived.
        hub.publish(StoreEvent(kind: .modified, object: Self.device("d1", on: "b", rv: 7)))
        hub.publish(StoreEvent(kind: .modified, object: Self.workload("w", on: ["b"], rv: 8)))
        got = await Self.taken(hub, [a, b, all])
        #expect(got == [["DELETED d1", "DELETED w"], ["ADDED d1", "MODIFIED w"], ["MODIFIED d1", "MODIFIED w"]])
        seenByA += got[0]

        // Deleted: only where it was.
        hub.publish(StoreEvent(kind: .deleted, object: Self.device("d1", on: "b", rv: 9)))
        got = await Self.taken(hub, [a, b, all])
        #expect(got == [["BOOKMARK"], ["DELETED d1"], ["DELETED d1"]])

        // The index a node-scoped list reads: where each object is now.
        #expect(hub.placed(on: "b", resource: "workloads").keys.map(\.name) == ["w"])
        #expect(hub.placed(on: "a", resource: "workloads").keys.isEmpty)
        #expect(hub.placed(on: "b", resource: "devices").keys.isEmpty)  // deleted
        #expect(hub.placed(on: "b", resource: "devices").version == 9)

        // A watch resumed from the start gets what the live one got, from the history.
        let late = try hub.subscribe(after: 0, filter: WatchFilter(resources: kinds, node: "a"))
        #expect(Self.lines(await late.next(kind: "Bookmark")) == seenByA + ["BOOKMARK"])
        for sub in [a, b, all, late] { sub.cancel() }
        #expect(hub.subscriberCount(of: "devices") == 0 && hub.subscriberCount(of: "devices", node: "a") == 0)
    }

    /// A store hands the hub where its devices and workloads are when it opens: the next change moves from
    /// there. A change in the history it loads whose "before" is not known goes to every node-scoped watcher;
    /// an ADDED was nowhere before.
    @Test func placementsGivenAtStartAreWhereTheNextChangeMovesFrom() async throws {
        let d2 = Self.device("d2", on: "a", rv: 10)
        let hub = WatchHub(
            current: 10,
            history: [
                StoreEvent(kind: .added, object: Self.device("d2", on: "a", rv: 9)),
                StoreEvent(kind: .modified, object: d2),
            ],
            placed: [d2, Self.service("s", rv: 9)]
        )
        let replayed = try hub.subscribe(after: 8, filter: WatchFilter(resource: "devices", node: "b"))
        #expect(Self.lines(await replayed.next(kind: "Bookmark")) == ["MODIFIED d2", "BOOKMARK"])
        replayed.cancel()
        let a = try hub.subscribe(after: 10, filter: WatchFilter(resource: "devices", node: "a"))
        let b = try hub.subscribe(after: 10, filter: WatchFilter(resource: "devices", node: "b"))
        _ = await Self.taken(hub, [a, b])
        hub.publish(StoreEvent(kind: .modified, object: Self.device("d2", on: "b", rv: 11)))
        #expect(await Self.taken(hub, [a, b]) == [["DELETED d2"], ["ADDED d2"]])
        a.cancel()
        b.cancel()
    }

    /// SQLite keeps where each change moved an object from (`placed_before`): after a restart, the history
    /// goes only to the node-scoped watchers it concerns (not to every agent resuming, 10,000 × the history),
    /// and a move is still DELETED where it left.
    @Test func aRestartedStoreSendsItsHistoryOnlyWhereItConcerns() async throws {
        let dir = TempDir()
        var store = try await openStore(dir)
        func write(_ node: String) async throws -> Int64 {
            try await store.commit(
                Write(
                    key: ObjectKey(resource: "devices", namespace: "shop", name: "d1"),
                    expect: .any,
                    operation: .put { rv in (Self.device("d1", on: node, rv: rv).json, [:]) }
                )
            ).resourceVersion
        }
        let start = try await store.currentResourceVersion()
        _ = try await write("a")
        _ = try await write("a")  // a report
        _ = try await write("b")  // moved
        try await store.close()
        store = try await openStore(dir)
        var got: [String: [String]] = [:]
        for node in ["a", "b", "c"] {
            let sub = try store.watch(after: start, filter: WatchFilter(resource: "devices", node: node))
            got[node] = Self.lines(await sub.next(kind: "Bookmark"))
            sub.cancel()
        }
        #expect(got["a"] == ["ADDED d1", "MODIFIED d1", "DELETED d1", "BOOKMARK"])
        #expect(got["b"] == ["ADDED d1", "BOOKMARK"])
        #expect(got["c"] == ["BOOKMARK"])
        try await store.close()
    }

    /// An object of a placed kind that does not decode is placed nowhere, and every other kind is everyone's.
    @Test func placementOfEachKind() async throws {
        let w = Self.workload("w", on: ["b", "a", "b"], rv: 1)
        #expect(NodePlacement.resources == ["devices", "workloads"])
        #expect(NodePlacement.admits(w, node: "a"))
        #expect(!NodePlacement.admits(w, node: "c"))
        #expect(NodePlacement.admits(Self.service("s", rv: 1), node: "c"))
        var broken = Self.device("d", on: "a", rv: 1)
        broken.json = ByteBuffer(string: "{\"spec\":{}}")
        #expect(!NodePlacement.admits(broken, node: "a"))
        // An unscoped watch still gets it; a node-scoped one does not.
        let hub = WatchHub(current: 0)
        let all = try hub.subscribe(after: 0, filter: WatchFilter(resource: "devices"))
        let a = try hub.subscribe(after: 0, filter: WatchFilter(resource: "devices", node: "a"))
        _ = await Self.taken(hub, [all, a])
        broken.resourceVersion = 1
        hub.publish(StoreEvent(kind: .added, object: broken))
        #expect(await Self.taken(hub, [all, a]) == [["ADDED ?"], ["BOOKMARK"]])
        all.cancel()
        a.cancel()
    }
}
