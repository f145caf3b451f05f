import Control
import MeshClient
import MeshCore
import MeshTestSupport
import Testing

@testable import Control

/// Endpoint addresses carry their node's site (`EndpointSites`), so agents need not follow Nodes: stamped
/// when written, fixed when the node registers later or changes site, over a real control plane.
@Suite(.rationed) struct EndpointSitesTests {
    func endpoints(_ name: String, _ addresses: [(node: String?, site: String?)]) -> Endpoints {
        Endpoints(
            metadata: ObjectMeta(name: name, namespace: "shop"),
            spec: EndpointsSpec(
                addresses: addresses.enumerated().map { i, a in
                    EndpointAddress(
                        ip: "198.18.0.\(i + 1)",
                        ports: [EndpointPort(port: 8080)],
                        node: a.node,
                        site: a.site
                    )
                }
            )
        )
    }

    func sites(_ client: ControlClient, _ name: String) async throws -> [String?] {
        try await client.get(Endpoints.self, namespace: "shop", name: name).spec.addresses.map(\.site)
    }

    @Test("stamp: a registered node's site wins; an unknown or siteless node keeps what was written")
    func stampRules() {
        let written: [(node: String?, site: String?)] = [
            ("b", nil), ("b", "wrong"), ("ghost", "g"), ("plain", "p"), (nil, "x"),
        ]
        var e = self.endpoints("web", written)
        var known: [String: String?] = ["b": "b"]
        known["plain"] = .some(nil)  // registered, without a site
        #expect(EndpointSites.stamp(&e) { known[$0] })
        #expect(e.spec.addresses.map(\.site) == ["b", "b", "g", "p", "x"])
        #expect(!EndpointSites.stamp(&e) { known[$0] })
    }

    @Test("a write of endpoints takes the sites of the nodes registered then, in the same version")
    func stampedWhenWritten() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(Node(metadata: ObjectMeta(name: "b"), spec: NodeSpec(site: "site-b")))
        let written = try await cp.client.apply(self.endpoints("web", [("b", nil), ("ghost", nil), (nil, nil)]))
        #expect(written.object.spec.addresses.map(\.site) == ["site-b", nil, nil])
        #expect(try await self.sites(cp.client, "web") == ["site-b", nil, nil])
        try await cp.stop()
    }

    @Test("a node registered after its endpoints, then moved to another site: its endpoints follow it")
    func fixedWhenTheNodeComesOrMoves() async throws {
        let cp = try await RunningControl()
        try await cp.client.apply(self.endpoints("web", [("c", nil), ("other", "x")]))
        try await cp.client.apply(self.endpoints("api", [("c", "stale")]))
        try await cp.client.apply(Node(metadata: ObjectMeta(name: "c"), spec: NodeSpec(site: "site-c")))
        /// Whether web's and api's addresses come to have these sites.
        func become(_ web: [String?], _ api: [String?]) async throws -> Bool {
            try await eventually {
                let now = (try await self.sites(cp.client, "web"), try await self.sites(cp.client, "api"))
                return now.0 == web && now.1 == api
            }
        }
        #expect(try await become(["site-c", "x"], ["site-c"]))
        try await cp.client.apply(Node(metadata: ObjectMeta(name: "c"), spec: NodeSpec(site: "site-d")))
        #expect(try await become(["site-d", "x"], ["site-d"]))
        // A node's status changes (its heartbeats) rewrite nothing.
        let before = try await cp.client.get(Endpoints.self, namespace: "shop", name: "web").metadata.resourceVersion
        _ = try await cp.client.heartbeat(node: "c")
        try await cp.client.apply(self.endpoints("other", [("c", nil)]))  // a later write, to wait on
        #expect(try await eventually { try await self.sites(cp.client, "other") == ["site-d"] })
        #expect(
            try await cp.client.get(Endpoints.self, namespace: "shop", name: "web").metadata.resourceVersion == before
        )
        try await cp.stop()
    }
}
