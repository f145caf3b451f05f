import Foundation
import MeshCore
import Testing

@Suite struct ModelTests {
    func object(_ yaml: String) throws -> any MeshObject {
        try Registry.object(from: try #require(Strict.documents(yaml: yaml).first))
    }

    func fields(_ yaml: String) -> [String] {
        do {
            _ = try self.object(yaml)
            return []
        } catch let e as ValidationError {
            return e.fields.map(\.description)
        } catch {
            return ["\(error)"]
        }
    }

    @Test func validServiceDecodesWithDefaults() throws {
        let o = try self.object(
            """
            apiVersion: mesh.edge/v1
            kind: Service
            metadata: {name: web, namespace: shop}
            spec:
              ports: [{port: 80}]
            """
        )
        let s = try #require(o as? MeshService)
        #expect(s.spec.ports == [ServicePort(port: 80, protocol: .tcp)])
        #expect(s.effectiveNamespace == "shop")
    }

    @Test func serviceRulesNameEveryBadField() {
        let errs = self.fields(
            """
            apiVersion: mesh.edge/v1
            kind: Service
            metadata: {name: Web}
            spec:
              clusterIP: 10.0.0.300
              ports: [{port: 0}, {name: a, port: 80}, {name: a, port: 80}]
              loadBalancer: {policy: roundRobin, hashOn: {header: x}}
            """
        )
        #expect(errs.contains { $0.hasPrefix("metadata.name: invalid character") })
        #expect(errs.contains("spec.ports[0].port: must be 1-65535"))
        #expect(errs.contains("spec.ports[0].name: is required when a service has more than one port"))
        #expect(errs.contains("spec.ports[2].name: duplicate port name \"a\""))
        #expect(errs.contains("spec.ports[2].port: duplicate port 80/TCP"))
        #expect(errs.contains("spec.clusterIP: must be an IP address or \"None\" (is \"10.0.0.300\")"))
        #expect(errs.contains("spec.loadBalancer.hashOn: applies only to policy consistentHash"))
    }

    @Test func upgradeProtocolsAreShortTokens() throws {
        let base = """
            apiVersion: mesh.edge/v1
            kind: Service
            metadata: {name: web}
            spec:
              ports: [{port: 80, protocol: HTTP}]
            """
        #expect(self.fields(base + "\n  upgradeProtocols: [websocket, h2c]").isEmpty)
        #expect(self.fields(base + "\n  upgradeProtocols: []").isEmpty)
        #expect(
            self.fields(base + "\n  upgradeProtocols: [websocket, \"h2c, x\"]").first?.hasPrefix(
                "spec.upgradeProtocols[1]: must be a protocol name"
            ) == true
        )
        #expect(
            self.fields(base + "\n  upgradeProtocols: [a, b, c, d, e, f, g, h, i]")
                .contains("spec.upgradeProtocols: must list at most 8 protocols")
        )
    }

    @Test func consistentHashNeedsExactlyOneKey() {
        let base = """
            apiVersion: mesh.edge/v1
            kind: Service
            metadata: {name: web}
            spec:
              ports: [{port: 80, protocol: TCP}]
            """
        #expect(
            self.fields(base + "\n  loadBalancer: {policy: consistentHash}").first?.contains(
                "is required for consistentHash"
            ) == true
        )
        #expect(
            self.fields(base + "\n  loadBalancer: {policy: consistentHash, hashOn: {header: x, sourceIP: true}}")
                .contains("spec.loadBalancer.hashOn: must set exactly one of header, cookie or sourceIP: true")
        )
        #expect(
            self.fields(base + "\n  loadBalancer: {policy: consistentHash, hashOn: {header: x}}")
                .contains("spec.loadBalancer.hashOn: header and cookie hashing need a port with protocol HTTP")
        )
        #expect(self.fields(base + "\n  loadBalancer: {policy: consistentHash, hashOn: {sourceIP: true}}").isEmpty)
    }

    @Test func enumErrorsListTheAllowedValues() {
        let errs = self.fields(
            """
            apiVersion: mesh.edge/v1
            kind: Service
            metadata: {name: web}
            spec: {ports: [{port: 80, protocol: SCTP}]}
            """
        )
        #expect(errs == ["spec.ports[0].protocol: \"SCTP\" is not one of TCP, UDP, HTTP"])
    }

    @Test func endpointsRules() {
        let errs = self.fields(
            """
            apiVersion: mesh.edge/v1
            kind: Endpoints
            metadata: {name: web}
            spec:
              addresses:
              - {ip: 198.18.0.1, ports: [{port: 8080}], weight: 0, site: Site_A}
              - {ip: nope, ports: []}
            """
        )
        #expect(errs.contains("spec.addresses[0].weight: must be 1-1000"))
        #expect(errs.contains { $0.hasPrefix("spec.addresses[0].site: invalid character") })
        #expect(errs.contains("spec.addresses[1].ip: must be an IP address (is \"nope\")"))
        #expect(errs.contains("spec.addresses[1].ports: must have at least one port"))
    }

    @Test func nodesAreClusterScopedWithSubdomainNames() {
        #expect(
            self.fields(
                """
                apiVersion: mesh.edge/v1
                kind: Node
                metadata: {name: edge-a1.site-a}
                spec: {site: a, addresses: [{type: InternalIP, address: 198.18.0.1}]}
                status: {phase: Ready, lastHeartbeatTime: "2026-11-25T10:00:00Z"}
                """
            ).isEmpty
        )
        let errs = self.fields(
            """
            apiVersion: mesh.edge/v1
            kind: Node
            metadata: {name: edge, namespace: shop}
            spec: {addresses: [{type: InternalIP, address: host.example}]}
            status: {lastHeartbeatTime: yesterday}
            """
        )
        #expect(errs.contains("metadata.namespace: must be empty: nodes are not namespaced"))
        #expect(errs.contains("spec.addresses[0].address: must be an IP address for type InternalIP"))
        #expect(errs.contains { $0.hasPrefix("status.lastHeartbeatTime") })
    }

    @Test func unknownKindAndWrongVersion() {
        #expect(throws: ManifestError.self) {
            try self.object("apiVersion: mesh.edge/v1\nkind: Gadget\nmetadata: {name: x}")
        }
        let errs = self.fields("apiVersion: v1\nkind: Node\nmetadata: {name: x}\nspec: {}")
        #expect(errs == ["apiVersion: must be mesh.edge/v1 (is \"v1\")"])
    }

    @Test func registryFindsKindsByAnyName() {
        for name in ["svc", "service", "services", "Service", "SERVICES"] {
            #expect(Registry.lookup(name)?.type.plural == "services")
        }
        #expect(Registry.lookup("ep")?.type.kind == "Endpoints")
        #expect(Registry.lookup("no")?.type.namespaced == false)
        #expect(Registry.lookup("pods") == nil)
    }

    @Test func watchEventsDecode() throws {
        let line =
            #"{"type":"BOOKMARK","object":{"apiVersion":"mesh.edge/v1","kind":"Service","metadata":{"resourceVersion":"42"}}}"#
        let e = try JSONDecoder().decode(WatchEvent<MeshService>.self, from: Data(line.utf8))
        #expect(e.resourceVersion == 42)
        let err =
            #"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","message":"gone","reason":"Gone","code":410}}"#
        guard case .error(let s) = try JSONDecoder().decode(WatchEvent<MeshService>.self, from: Data(err.utf8)) else {
            Issue.record("not an error event")
            return
        }
        #expect(s.code == 410)
    }
}
