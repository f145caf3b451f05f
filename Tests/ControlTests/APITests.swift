import Control
import Foundation
import Logging
import MeshClient
import MeshCore
import MeshHTTP
import MeshTestSupport
import NIOCore
import Testing

import class ServiceLifecycle.ServiceGroup
import struct ServiceLifecycle.ServiceGroupConfiguration

func service(
    _ name: String,
    ns: String = "shop",
    ports: [ServicePort] = [ServicePort(name: "http", port: 80, protocol: .http)],
    clusterIP: String? = nil
) -> MeshService {
    MeshService(
        metadata: ObjectMeta(name: name, namespace: ns, labels: ["app": name]),
        spec: ServiceSpec(ports: ports, clusterIP: clusterIP)
    )
}

@Suite(.rationed) struct APITests {
    @Test func crudThroughTheClient() async throws {
        let cp = try await RunningControl()
        let (created, isNew) = try await cp.client.apply(service("web"))
        #expect(isNew)
        let vip = try #require(created.spec.vip)
        #expect(CIDR("127.77.0.0/16")!.contains(vip))
        #expect(created.spec.ipFamily == .ipv4)
        #expect(created.metadata.uid != nil && created.metadata.creationTimestamp != nil)
        #expect(try await cp.client.get(MeshService.self, namespace: "shop", name: "web") == created)

        // Applying the same object again changes nothing: same version, no event.
        let (same, sameIsNew) = try await cp.client.apply(service("web"))
        #expect(!sameIsNew)
        #expect(same.metadata.resourceVersion == created.metadata.resourceVersion)

        var changed = service("web")
        changed.spec.ports.append(ServicePort(name: "metrics", port: 9090))
        let (updated, _) = try await cp.client.apply(changed)
        #expect(updated.metadata.version! > created.metadata.version!)
        #expect(updated.spec.clusterIP == created.spec.clusterIP)
        #expect(updated.metadata.uid == created.metadata.uid)

        let list = try await cp.client.list(MeshService.self, namespace: "shop")
        #expect(list.kind == "ServiceList" && list.items.map(\.metadata.name) == ["web"])
        #expect(list.metadata.resourceVersion == updated.metadata.resourceVersion)

        let gone = try await cp.client.delete(MeshService.self, namespace: "shop", name: "web")
        #expect(gone.metadata.version! > updated.metadata.version!)
        await #expect {
            try await cp.client.get(MeshService.self, namespace: "shop", name: "web")
        } throws: { ($0 as? Status)?.code == 404 && ($0 as? Status)?.reason == .notFound }
        try await cp.stop()
    }

    @Test func staleWritesGetConflict() async throws {
        let cp = try await RunningControl()
        let (v1, _) = try await cp.client.apply(service("web"))
        var newer = v1
        newer.spec.exported = true
        try await cp.client.apply(newer)
        var stale = v1
        stale.spec.exported = false
        stale.metadata.labels = ["v": "stale"]
        await #expect {
            try await cp.client.apply(stale)
        } throws: { e in
            let s = e as? Status
            return s?.code == 409 && s?.reason == .conflict && s?.message.contains("has been modified") == true
        }
        await #expect { try await cp.client.create(service("web")) } throws: {
            ($0 as? Status)?.reason == .alreadyExists
        }
        try await cp.stop()
    }

    @Test func vipsAreUniqueUnderConcurrencyAndReleasedOnDelete() async throws {
        let cp = try await RunningControl { $0.serviceCIDRs = ["198.18.0.0/27"] }  // 30 usable
        let created = try await withThrowingTaskGroup(of: MeshService.self) { group in
            for i in 0..<30 { group.addTask { try await cp.client.apply(service("s\(i)")).object } }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let vips = Set(created.compactMap(\.spec.clusterIP))
        #expect(vips.count == 30)
        await #expect {
            try await cp.client.apply(service("overflow"))
        } throws: { ($0 as? Status)?.message.contains("no free VIP left in 198.18.0.0/27") == true }
        let freed = try await cp.client.delete(MeshService.self, namespace: "shop", name: "s7").spec.clusterIP
        let again = try await cp.client.apply(service("overflow")).object
        #expect(again.spec.clusterIP == freed)
        try await cp.stop()
    }

    @Test func requestedVIPsAreCheckedAndImmutable() async throws {
        let cp = try await RunningControl()
        let a = try await cp.client.apply(service("a", clusterIP: "127.77.1.1")).object
        #expect(a.spec.clusterIP == "127.77.1.1")
        await #expect { try await cp.client.apply(service("b", clusterIP: "127.77.1.1")) } throws: { e in
            (e as? Status)?.code == 422
                && (e as? Status)?.message.contains("already allocated to services/shop/a") == true
        }
        await #expect { try await cp.client.apply(service("c", clusterIP: "10.1.2.3")) } throws: { e in
            (e as? Status)?.details?.causes?.first?.field == "spec.clusterIP"
        }
        await #expect { try await cp.client.apply(service("a", clusterIP: "127.77.1.2")) } throws: { e in
            (e as? Status)?.message.contains("field is immutable") == true
        }
        let headless = try await cp.client.apply(service("h", clusterIP: "None")).object
        #expect(headless.spec.isHeadless)
        var v6 = service("six")
        v6.spec.ipFamily = .ipv6
        #expect(try await cp.client.apply(v6).object.spec.vip?.isIPv6 == true)
        try await cp.stop()
    }

    @Test func watchFromAVersionSeesEveryChangeExactlyOnceInOrder() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("seed"))
        let start = try await cp.rv()
        let writes = 60
        let seen = Task {
            var got: [Int64] = []
            try await cp.client.watch(MeshService.self, namespace: "shop", after: start) { event in
                switch event {
                case .added(let o), .modified(let o), .deleted(let o): got.append(o.metadata.version!)
                case .bookmark, .error: break
                }
                return got.count < writes
            }
            return got
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for w in 0..<3 {
                group.addTask {
                    for i in 0..<(writes / 3) {
                        var s = service("w\(w)-\(i % 4)")
                        s.metadata.labels = ["i": "\(i)"]
                        if i % 5 == 4 {
                            try await cp.client.delete(MeshService.self, namespace: "shop", name: s.metadata.name)
                        } else {
                            try await cp.client.apply(s)
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        let got = try await seen.value
        #expect(got == Array((start + 1)...(start + Int64(writes))))
        try await cp.stop()
    }

    @Test func watchWithoutVersionStartsWithTheCurrentObjects() async throws {
        let cp = try await RunningControl()
        for n in ["a", "b"] { try await cp.client.apply(service(n)) }
        try await cp.client.apply(service("c", ns: "other"))
        var names: [String] = []
        try await cp.client.watch(MeshService.self, namespace: "shop", after: nil) { event in
            if case .added(let s) = event { names.append(s.metadata.name) }
            if names.count == 2 { try await cp.client.apply(service("d")) }
            return names.count < 3
        }
        #expect(names == ["a", "b", "d"])
        try await cp.stop()
    }

    @Test func compactedVersionGets410() async throws {
        let cp = try await RunningControl { $0.historyLimit = 5 }
        for i in 0..<12 { try await cp.client.apply(service("s\(i)")) }
        await #expect {
            try await cp.client.watch(MeshService.self, after: 2) { _ in false }
        } throws: { e in
            let s = e as? Status
            return s?.code == 410 && s?.reason == .gone && s?.message.contains("too old") == true
        }
        try await cp.stop()
    }

    @Test func idleWatchesGetBookmarks() async throws {
        let cp = try await RunningControl { $0.bookmarkIntervalSeconds = 1 }
        try await cp.client.apply(service("web"))
        try await cp.client.apply(service("other", ns: "elsewhere"))
        let rv = try await cp.rv()
        var bookmark: Int64?
        try await cp.client.watch(MeshService.self, namespace: "shop", after: rv - 1, timeoutSeconds: 10) { event in
            if case .bookmark(let v) = event { bookmark = v }
            return bookmark == nil
        }
        #expect(bookmark == rv)
        try await cp.stop()
    }

    @Test func restartKeepsDataAndVersionsKeepRising() async throws {
        let dir = TempDir()
        var cp = try await RunningControl(dir: dir)
        let before = try await cp.client.apply(service("web")).object
        try await cp.client.apply(service("api"))
        let rv = try await cp.rv()
        try await cp.stop()
        cp = try await RunningControl(dir: dir)
        #expect(try await cp.client.get(MeshService.self, namespace: "shop", name: "web") == before)
        #expect(try await cp.rv() == rv)
        let after = try await cp.client.apply(service("db")).object
        #expect(after.metadata.version! == rv + 1)
        #expect(after.spec.clusterIP != before.spec.clusterIP)
        try await cp.stop()
    }

    @Test func healthReadinessMetricsAndVersion() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(service("web"))
        let http = cp.client.http
        #expect(String(buffer: try await http.send(.GET, "/healthz").body) == "ok\n")
        #expect(try await http.send(.GET, "/readyz").status == .ok)
        let metrics = String(buffer: try await http.send(.GET, "/metrics").body)
        // Metrics are process-wide and tests run in parallel: check presence, not counts.
        #expect(metrics.contains(#"mesh_control_requests_total{verb="update",resource="services",code="201"} "#))
        // The test client (MeshTLS.client, as agents) and the control plane both offer the mesh record layer.
        #expect(metrics.contains("mesh_http_record_layer_connections_total "))
        #expect(String(buffer: try await http.send(.GET, "/version").body).contains(#""apiVersion":"mesh.edge/v1""#))
        let discovery = String(buffer: try await http.send(.GET, "/apis/mesh.edge/v1").body)
        #expect(discovery.contains(#""name":"services""#) && discovery.contains(#""shortNames":["svc"]"#))
        try await cp.stop()
    }
}
