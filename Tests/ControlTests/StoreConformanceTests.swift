import Control
import Foundation
import MeshCore
import MeshTestSupport
import NIOCore
import Testing

/// One suite, both stores: what `Store` promises holds for SQLite and for a real etcd started on
/// loopback. Versions are compared relative to what the writes returned (etcd's revision also
/// counts writes to side keys).
@Suite(.rationed) struct StoreConformanceTests {
    enum Backend: String, CaseIterable, Sendable, CustomStringConvertible {
        case sqlite, etcd
        var description: String { self.rawValue }
    }

    /// Runs `body` on a fresh store of `backend` and closes it (and its etcd) after.
    func withStore(
        _ backend: Backend,
        historyLimit: Int = 10_000,
        _ body: (any Store) async throws -> Void
    ) async throws {
        switch backend {
        case .sqlite:
            let dir = TempDir()
            let store = try await openStore(dir, historyLimit: historyLimit)
            do { try await body(store) } catch {
                try? await store.close()
                throw error
            }
            try await store.close()
        case .etcd:
            let etcd = try await EtcdCluster.start()
            defer { etcd.stop() }
            let store = try await etcd.store(historyLimit: historyLimit)
            do { try await body(store) } catch {
                try? await store.close()
                throw error
            }
            try await store.close()
        }
    }

    @Test(arguments: Backend.allCases) func createReadUpdateDelete(_ backend: Backend) async throws {
        try await self.withStore(backend) { store in
            let created = try await put(store, "web", expect: .absent, labels: ["app": "web"])
            let read = try #require(try await store.get(key("web")))
            #expect(read.resourceVersion == created.resourceVersion)
            // The stored JSON carries the version the store gave it.
            #expect(String(buffer: read.json) == String(buffer: body("web", created.resourceVersion)))
            #expect(read.labels == ["app": "web"])

            let updated = try await put(store, "web", expect: .version(created.resourceVersion), value: 7)
            #expect(updated.resourceVersion > created.resourceVersion)
            let reread = try #require(try await store.get(key("web")))
            #expect(String(buffer: reread.json) == String(buffer: body("web", updated.resourceVersion, value: 7)))

            let deleted = try await remove(store, "web")
            #expect(deleted.resourceVersion > updated.resourceVersion)
            #expect(String(buffer: deleted.json) == String(buffer: body("web", deleted.resourceVersion)))
            #expect(try await store.get(key("web")) == nil)
            await #expect(throws: StoreError.notFound(key("web"))) { try await remove(store, "web") }
        }
    }

    /// Several keys in one read (a node-scoped list's own objects): those that exist, as `get` has them.
    @Test(arguments: Backend.allCases) func getOfSeveralKeysReturnsThoseThatExist(_ backend: Backend) async throws {
        try await self.withStore(backend) { store in
            let a = try await put(store, "a")
            try await put(store, "b", ns: "other")
            let c = try await put(store, "c", value: 3)
            try await remove(store, "b", ns: "other")
            let got = try await store.get([key("c"), key("b", ns: "other"), key("a"), key("ghost")])
            #expect(got.map(\.key.name) == ["c", "a"])
            #expect(got.map(\.resourceVersion) == [c.resourceVersion, a.resourceVersion])
            #expect(String(buffer: got[0].json) == String(buffer: body("c", c.resourceVersion, value: 3)))
            #expect(try await store.get([ObjectKey]()).isEmpty)
        }
    }

    @Test(arguments: Backend.allCases) func preconditionsRefuseStaleWrites(_ backend: Backend) async throws {
        try await self.withStore(backend) { store in
            let first = try await put(store, "web", expect: .absent)
            await #expect(throws: StoreError.alreadyExists(key("web"))) { try await put(store, "web", expect: .absent) }
            let second = try await put(store, "web", expect: .version(first.resourceVersion))
            await #expect(throws: StoreError.conflict(key("web"), current: second.resourceVersion)) {
                try await put(store, "web", expect: .version(first.resourceVersion))
            }
            await #expect(throws: StoreError.conflict(key("nope"), current: nil)) {
                try await put(store, "nope", expect: .version(1))
            }
            // A refused write changes nothing.
            #expect(try #require(try await store.get(key("web"))).resourceVersion == second.resourceVersion)
            #expect(try await store.get(key("nope")) == nil)
        }
    }

    @Test(arguments: Backend.allCases) func reservationsAreExclusiveAndFreedOnDelete(_ backend: Backend) async throws {
        try await self.withStore(backend) { store in
            try await put(store, "a", reserve: ["vip/127.77.0.1"])
            try await put(store, "a", reserve: ["vip/127.77.0.1"])  // its own token again: fine
            await #expect(throws: StoreError.reserved(token: "vip/127.77.0.1", owner: "services/shop/a")) {
                try await put(store, "b", reserve: ["vip/127.77.0.1"])
            }
            #expect(try await store.get(key("b")) == nil)
            #expect(try await store.reservations(prefix: "vip/") == ["vip/127.77.0.1": "services/shop/a"])
            try await remove(store, "a")
            #expect(try await store.reservations(prefix: "vip/") == [:])
            try await put(store, "b", reserve: ["vip/127.77.0.1"])
            #expect(try await store.reservations(prefix: "vip/") == ["vip/127.77.0.1": "services/shop/b"])
        }
    }

    @Test(arguments: Backend.allCases) func racingWritersNeverShareAToken(_ backend: Backend) async throws {
        try await self.withStore(backend) { store in
            // 8 writers race for 4 tokens, each trying every token in turn until it holds one.
            let winners = try await withThrowingTaskGroup(of: (String, String)?.self) { group in
                for w in 0..<8 {
                    group.addTask {
                        for t in 0..<4 {
                            do {
                                try await put(store, "w\(w)", reserve: ["vip/127.77.0.\(t + 1)"])
                                return ("w\(w)", "vip/127.77.0.\(t + 1)")
                            } catch StoreError.reserved {
                                continue
                            }
                        }
                        return nil
                    }
                }
                var out: [(String, String)] = []
                for try await r in group { if let r { out.append(r) } }
                return out
            }
            #expect(winners.count == 4)
            #expect(Set(winners.map(\.1)).count == 4)
            let held = try await store.reservations(prefix: "vip/")
            #expect(held.count == 4)
            for (owner, token) in winners { #expect(held[token] == "services/shop/\(owner)") }
        }
    }

    @Test(arguments: Backend.allCases) func listIsOneSnapshotPerNamespace(_ backend: Backend) async throws {
        try await self.withStore(backend) { store in
            for name in ["c", "a", "b"] { try await put(store, name) }
            try await put(store, "x", ns: "other")
            let last = try await put(store, "e", resource: "endpoints")
            let (items, rv) = try await store.list(resource: "services", namespace: "shop")
            #expect(items.map(\.key.name) == ["a", "b", "c"])
            #expect(rv >= last.resourceVersion)
            let (all, _) = try await store.list(resource: "services", namespace: nil)
            #expect(
                all.map(\.key.description) == [
                    "services/other/x", "services/shop/a", "services/shop/b", "services/shop/c",
                ]
            )
            // Each list sees the writes before it (etcd keeps each kind's sorted list until the kind changes).
            let updated = try await put(store, "b", value: 9)
            try await remove(store, "a")
            try await put(store, "0", ns: "other")
            try await put(store, "f", resource: "endpoints")
            let (after, _) = try await store.list(resource: "services", namespace: nil)
            #expect(
                after.map(\.key.description) == [
                    "services/other/0", "services/other/x", "services/shop/b", "services/shop/c",
                ]
            )
            #expect(after[2].resourceVersion == updated.resourceVersion)
            let (endpoints, _) = try await store.list(resource: "endpoints", namespace: nil)
            #expect(endpoints.map(\.key.name) == ["e", "f"])
        }
    }

    @Test(arguments: Backend.allCases) func watchSeesEveryLaterChangeExactlyOnceInOrder(_ backend: Backend) async throws
    {
        try await self.withStore(backend) { store in
            var written: [Int64] = []
            for i in 0..<10 { written.append(try await put(store, "pre\(i)").resourceVersion) }
            let starts = [written[0] - 1, written[4], written[9]]
            var subs: [WatchSubscription] = []
            for s in starts { subs.append(try await store.watch(after: s, filter: WatchFilter(resource: "services"))) }
            let later = try await withThrowingTaskGroup(of: [Int64].self) { group in
                for w in 0..<4 {
                    group.addTask {
                        var out: [Int64] = []
                        for i in 0..<40 { out.append(try await put(store, "w\(w)-\(i % 7)", value: i).resourceVersion) }
                        return out
                    }
                }
                var all: [Int64] = []
                for try await part in group { all += part }
                return all
            }
            let everything = (written + later).sorted()
            for (start, sub) in zip(starts, subs) {
                let expected = everything.filter { $0 > start }
                let seen = await collect(sub, count: expected.count)
                #expect(seen == expected, "watch after \(start)")
            }
        }
    }

    @Test(arguments: Backend.allCases) func watchFiltersAndDeletionsCarryTheirFinalState(
        _ backend: Backend
    ) async throws {
        try await self.withStore(backend) { store in
            let rv = try await store.currentResourceVersion()
            let sub = try await store.watch(
                after: rv,
                filter: WatchFilter(
                    resource: "services",
                    namespace: "shop",
                    selector: try LabelSelector(parsing: "app=web")
                )
            )
            let a = try await put(store, "a", labels: ["app": "web"])
            try await put(store, "b", labels: ["app": "db"])
            try await put(store, "c", ns: "other", labels: ["app": "web"])
            try await put(store, "d", resource: "endpoints", labels: ["app": "web"])
            let gone = try await remove(store, "a")
            let lines = await self.lines(sub, count: 2)
            #expect(lines.count == 2)
            #expect(lines.first == #"{"type":"ADDED","object":\#(String(buffer: body("a", a.resourceVersion)))}"#)
            #expect(lines.last == #"{"type":"DELETED","object":\#(String(buffer: body("a", gone.resourceVersion)))}"#)
        }
    }

    @Test(arguments: Backend.allCases) func futureVersionsAreTooNewAndOldOnesGone(_ backend: Backend) async throws {
        try await self.withStore(backend, historyLimit: 10) { store in
            var rvs: [Int64] = []
            for i in 0..<30 { rvs.append(try await put(store, "s\(i)").resourceVersion) }
            await #expect {
                _ = try await store.watch(after: rvs[5], filter: WatchFilter(resource: "services"))
            } throws: { error in
                if case StoreError.gone = error { return true }
                return false
            }
            let sub = try await store.watch(after: rvs[19], filter: WatchFilter(resource: "services"))
            #expect(await collect(sub, count: 10) == Array(rvs[20...]))
            let future = try await store.currentResourceVersion() + 1000
            await #expect {
                _ = try await store.watch(after: future, filter: WatchFilter(resource: "services"))
            } throws: { error in
                if case StoreError.tooNew = error { return true }
                return false
            }
        }
    }

    @Test(arguments: Backend.allCases) func heartbeatTimesAreSavedAndForgotten(_ backend: Backend) async throws {
        try await self.withStore(backend) { store in
            var beats: [String: Int64] = [:]
            for i in 0..<250 { beats["n\(i)"] = 1_700_000_000_000 + Int64(i) }
            try await store.saveHeartbeats(beats, forget: [])
            #expect(try await store.loadHeartbeats() == beats)
            try await store.saveHeartbeats(["n0": 5], forget: ["n1", "n2"])
            var expected = beats
            expected["n0"] = 5
            expected["n1"] = nil
            expected["n2"] = nil
            #expect(try await store.loadHeartbeats() == expected)
        }
    }

    /// The watch lines (bookmarks left out) until `count` arrived or 10 s passed.
    func lines(_ sub: WatchSubscription, count: Int) async -> [String] {
        await withTaskGroup(of: [String].self) { group in
            group.addTask {
                var out: [String] = []
                while out.count < count, let chunk = await sub.next(kind: "Service") {
                    out += String(buffer: chunk).split(separator: "\n").map(String.init)
                        .filter { !$0.contains("\"BOOKMARK\"") }
                }
                return out
            }
            group.addTask {
                try? await Task.sleep(for: .seconds(10))
                sub.cancel()
                return []
            }
            let first = await group.next()!
            sub.cancel()
            group.cancelAll()
            return first
        }
    }
}
