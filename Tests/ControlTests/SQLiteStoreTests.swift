import Control
import Foundation
import MeshCore
import MeshSQLite
import MeshTestSupport
import NIOCore
import Testing

@Suite(.rationed) struct SQLiteStoreTests {
    @Test func createReadUpdateDelete() async throws {
        let dir = TempDir()
        let store = try await openStore(dir)
        let created = try await put(store, "web", expect: .absent, labels: ["app": "web"])
        #expect(created.resourceVersion == 1)
        let read = try #require(try await store.get(key("web")))
        #expect(read.resourceVersion == 1)
        #expect(String(buffer: read.json) == String(buffer: body("web", 1)))
        #expect(read.labels == ["app": "web"])

        let updated = try await put(store, "web", expect: .version(1), value: 7)
        #expect(updated.resourceVersion == 2)
        #expect(String(buffer: try #require(try await store.get(key("web"))).json).contains(#""value":7"#))

        let deleted = try await remove(store, "web")
        #expect(deleted.resourceVersion == 3)
        #expect(try await store.get(key("web")) == nil)
        await #expect(throws: StoreError.notFound(key("web"))) { try await remove(store, "web") }
        #expect(try await store.currentResourceVersion() == 3)
        try await store.close()
    }

    @Test func preconditionsRefuseStaleWrites() async throws {
        let dir = TempDir()
        let store = try await openStore(dir)
        try await put(store, "web", expect: .absent)
        await #expect(throws: StoreError.alreadyExists(key("web"))) { try await put(store, "web", expect: .absent) }
        try await put(store, "web", expect: .version(1))
        await #expect(throws: StoreError.conflict(key("web"), current: 2)) {
            try await put(store, "web", expect: .version(1))
        }
        await #expect(throws: StoreError.conflict(key("nope"), current: nil)) {
            try await put(store, "nope", expect: .version(1))
        }
        // A refused write changes nothing: no version is used up.
        #expect(try await store.currentResourceVersion() == 2)
        try await store.close()
    }

    @Test func reservationsAreExclusiveAndFreedOnDelete() async throws {
        let dir = TempDir()
        let store = try await openStore(dir)
        try await put(store, "a", reserve: ["vip/127.77.0.1"])
        // The owner may re-reserve its own token (idempotent updates).
        try await put(store, "a", reserve: ["vip/127.77.0.1"])
        await #expect(throws: StoreError.reserved(token: "vip/127.77.0.1", owner: "services/shop/a")) {
            try await put(store, "b", reserve: ["vip/127.77.0.1"])
        }
        #expect(try await store.get(key("b")) == nil)
        try await remove(store, "a")
        try await put(store, "b", reserve: ["vip/127.77.0.1"])
        #expect(try await store.reservations(prefix: "vip/") == ["vip/127.77.0.1": "services/shop/b"])
        try await store.close()
    }

    @Test func listIsOneSnapshotPerNamespace() async throws {
        let dir = TempDir()
        let store = try await openStore(dir)
        for name in ["c", "a", "b"] { try await put(store, name) }
        try await put(store, "x", ns: "other")
        try await put(store, "e", resource: "endpoints")
        let (items, rv) = try await store.list(resource: "services", namespace: "shop")
        #expect(items.map(\.key.name) == ["a", "b", "c"])
        #expect(rv == 5)
        let (all, _) = try await store.list(resource: "services", namespace: nil)
        #expect(
            all.map(\.key.description) == ["services/other/x", "services/shop/a", "services/shop/b", "services/shop/c"]
        )
        try await store.close()
    }

    @Test func watchSeesEveryLaterChangeExactlyOnceInOrder() async throws {
        let dir = TempDir()
        let store = try await openStore(dir)
        for i in 0..<10 { try await put(store, "pre\(i)") }
        // Watchers from the start, from the middle and from now.
        let subs = try [0, 5, 10].map { try store.watch(after: Int64($0), filter: WatchFilter(resource: "services")) }
        let writers = 4
        let perWriter = 50
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<writers {
                group.addTask {
                    for i in 0..<perWriter { try await put(store, "w\(w)-\(i % 7)", value: i) }
                }
            }
            try await group.waitForAll()
        }
        let total = 10 + writers * perWriter
        for (start, sub) in zip([0, 5, 10], subs) {
            let seen = await collect(sub, count: total - start)
            #expect(seen == Array(Int64(start + 1)...Int64(total)), "watch after \(start)")
        }
        try await store.close()
    }

    @Test func watchFiltersByNamespaceAndLabels() async throws {
        let dir = TempDir()
        let store = try await openStore(dir)
        let sub = try store.watch(
            after: 0,
            filter: WatchFilter(
                resource: "services",
                namespace: "shop",
                selector: try LabelSelector(parsing: "app=web")
            )
        )
        try await put(store, "a", labels: ["app": "web"])  // 1: yes
        try await put(store, "b", labels: ["app": "db"])  // 2: no
        try await put(store, "c", ns: "other", labels: ["app": "web"])  // 3: no
        try await put(store, "d", resource: "endpoints", labels: ["app": "web"])  // 4: no
        try await put(store, "e", labels: ["app": "web", "x": "y"])  // 5: yes
        #expect(await collect(sub, count: 2) == [1, 5])
        try await store.close()
    }

    @Test func compactedVersionsAreGoneAndFutureOnesTooNew() async throws {
        let dir = TempDir()
        let store = try await openStore(dir, historyLimit: 10)
        for i in 0..<30 { try await put(store, "s\(i)") }
        #expect(throws: StoreError.gone(requested: 5, oldest: 21)) {
            try store.watch(after: 5, filter: WatchFilter(resource: "services"))
        }
        #expect(throws: StoreError.tooNew(requested: 31, current: 30)) {
            try store.watch(after: 31, filter: WatchFilter(resource: "services"))
        }
        let sub = try store.watch(after: 20, filter: WatchFilter(resource: "services"))
        #expect(await collect(sub, count: 10) == Array(21...30))
        try await store.close()
    }

    @Test func restartKeepsDataHistoryAndVersionOrder() async throws {
        let dir = TempDir()
        do {
            let store = try await openStore(dir, durability: .full)
            for i in 0..<5 { try await put(store, "s\(i)", value: i) }
            try await remove(store, "s0")
            try await store.close()
        }
        let store = try await openStore(dir, durability: .full)
        #expect(try await store.currentResourceVersion() == 6)
        #expect(try await store.get(key("s0")) == nil)
        #expect(String(buffer: try #require(try await store.get(key("s4"))).json).contains(#""value":4"#))
        let next = try await put(store, "s9")
        #expect(next.resourceVersion == 7)
        // Watches resume across the restart from the persisted history.
        let sub = try store.watch(after: 3, filter: WatchFilter(resource: "services"))
        #expect(await collect(sub, count: 4) == [4, 5, 6, 7])
        try await store.close()
    }

    @Test func historyOnDiskIsBoundedAcrossRestarts() async throws {
        let dir = TempDir()
        do {
            let store = try await openStore(dir, historyLimit: 20)
            for i in 0..<600 { try await put(store, "s\(i % 13)") }
            try await store.close()
        }
        let db = try SQLiteDatabase(path: dir.path + "/control.db")
        let rows = try db.query("SELECT COUNT(*), MIN(rv) FROM events")
        let count = try #require(rows.first?[0].int)
        // Compaction runs every 512 writes: at most the limit plus one compaction period remain.
        #expect(count <= 20 + 512)
        #expect(count >= 20)
        let store = try await openStore(dir, historyLimit: 20)
        #expect(store.hub.oldestResumable == 580)
        try await store.close()
    }

    @Test func aSecondProcessCannotOpenALockedDataDirectory() throws {
        let dir = TempDir()
        let lock = try DirectoryLockHolder(dir.path)
        #expect(throws: (any Error).self) { try DirectoryLockHolder(dir.path) }
        withExtendedLifetime(lock) {}
    }
}

/// Holds the control plane's data-directory lock.
struct DirectoryLockHolder {
    let lock: DirectoryLock
    init(_ dir: String) throws { self.lock = try DirectoryLock(directory: dir, name: "mesh-control") }
}
