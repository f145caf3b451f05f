import MeshCore
import MeshTestSupport
import NIOCore
import Testing

@testable import MeshAgent

/// The compact storage of a route's backends (`BackendList`): every field comes back as it went in.
@Suite(.rationed) struct BackendListTests {
    static let mixed: [Backend] = [
        Backend(ip: .v4(0xC612_0001), port: 8080, node: "edge-node-with-a-long-name-01", site: "a"),
        Backend(ip: IPAddress("2001:db8::7")!, port: 443, node: nil, site: nil, weight: 5, ready: false),
        Backend(ip: .v4(0xC612_0002), port: 8080, node: "n2", site: "b", weight: 0, reach: .peer("n2")),
        Backend(ip: .v4(0xC612_0003), port: 70_000, node: "edge-node-with-a-long-name-01", site: "a", weight: 1000),
        Backend(ip: .v4(0), port: 0, weight: -3),
    ]

    @Test func everyFieldRoundTrips() {
        let list = BackendList(Self.mixed)
        #expect(list.count == Self.mixed.count)
        #expect(Array(list) == Self.mixed)
        for (i, b) in Self.mixed.enumerated() {
            #expect(list[i] == b)
            #expect(list[i].id == b.id)
        }
    }

    @Test func aRouteReadsAndWritesItsBackendsAsValues() {
        var route = Route(
            service: ServiceKey(namespace: "shop", name: "web"),
            vip: .v4(0x7F40_0001),
            port: 80,
            backends: Self.mixed
        )
        #expect(route.backends == Self.mixed)
        route.backends[1].ready = true
        route.backends.append(Backend(ip: .v4(0xC612_0009), port: 9))
        #expect(route.backends.count == Self.mixed.count + 1)
        #expect(route.backends[1].ready)
        #expect(route.backends.last == Backend(ip: .v4(0xC612_0009), port: 9))
        #expect(route.backendList == BackendList(route.backends))
    }

    @Test func equalBackendsMakeEqualListsAndRoutes() {
        let a = BackendList(Self.mixed)
        let b = BackendList(Self.mixed)
        #expect(a == b)
        #expect(a.hashValue == b.hashValue)
        var changed = Self.mixed
        changed[2].reach = .direct
        #expect(BackendList(changed) != a)
        changed = Self.mixed
        changed[0].site = "b"
        #expect(BackendList(changed) != a)
        let key = ServiceKey(namespace: "shop", name: "web")
        let r1 = Route(service: key, vip: .v4(1), port: 80, backends: Self.mixed)
        var builder = BackendList.Builder(capacity: Self.mixed.count)
        for b in Self.mixed { builder.append(b) }
        let r2 = Route(service: key, vip: .v4(1), port: 80, backendList: builder.list)
        #expect(r1 == r2)
    }

    @Test func portsAndWeightsBeyond32BitsAreClamped() {
        let list = BackendList([Backend(ip: .v4(1), port: Int.max, weight: Int.min)])
        #expect(list[0].port == Int(Int32.max))
        #expect(list[0].weight == Int(Int32.min))
    }

    /// `/routes` shows a route that never carried traffic as a fresh balancer would, without building one.
    @Test func anIdleRouteSnapshotsAsAFreshBalancer() {
        var backends = Self.mixed
        backends.append(Self.mixed[0])  // a duplicate collapses to the first
        let list = BackendList(backends)
        let balancer = LoadBalancer(backends: backends, policy: .roundRobin, localSite: "a", outlier: .init())
        let now = NIODeadline.now()
        #expect(RouteHandle.fresh(list) == balancer.slots.map { BackendSnapshot(slot: $0, now: now) })
    }
}
