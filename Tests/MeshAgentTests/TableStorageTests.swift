import MeshClient
import MeshCore
import MeshTestSupport
import Testing

@testable import MeshAgent

/// What the agent's table keeps of each object (`TableEndpoints`, `TableService`).
@Suite(.rationed) struct TableStorageTests {
    @Test func endpointsAreKeptAsCompactEntriesWithEachNameOnce() {
        let long = "edge-node-with-a-long-name-01"
        var endpoints = Endpoints(
            metadata: ObjectMeta(name: "web", namespace: "shop", labels: ["app": "web"]),
            spec: EndpointsSpec(
                addresses: (0..<10).map { i in
                    EndpointAddress(
                        ip: "198.18.0.\(i + 1)",
                        ports: [EndpointPort(name: "http", port: 8080)],
                        node: String(decoding: Array(long.utf8), as: UTF8.self),
                        site: "a"
                    )
                }
            )
        )
        endpoints.spec.addresses[3].ports = [EndpointPort(name: "http", port: 9090), EndpointPort(port: 9091)]
        endpoints.spec.addresses[4].weight = 7
        endpoints.spec.addresses[5].ready = false
        endpoints.spec.addresses[6].hostname = "db-0"
        endpoints.spec.addresses[7].ip = "2001:db8::7"
        endpoints.metadata.uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
        endpoints.metadata.resourceVersion = "42"
        let kept = TableEndpoints(endpoints)
        // The same addresses, ports, names, weights and flags, in order; the version; nothing else.
        #expect(kept.addresses == endpoints.spec.addresses)
        #expect(kept.resourceVersion == "42")
        #expect(kept[7].address == IPAddress("2001:db8::7") && kept[0].address == IPAddress("198.18.0.1"))
        #expect(kept[4].effectiveWeight == 7 && kept[0].weight == nil)
        #expect(!kept[5].isReady && kept[5].ready == false && kept[0].ready == nil && kept[0].isReady)
        // Each distinct name once (node, site, hostname) and each distinct port list once.
        #expect(kept.names == [long, "a", "db-0"])
        #expect(kept.portLists.count == 2)
        // 40 bytes per address, against 88 for the API's form.
        #expect(MemoryLayout<TableEndpoints.Entry>.stride == 40)
        #expect(MemoryLayout<EndpointAddress>.stride > 40)
    }

    @Test func anAddressThatDoesNotParseIsKeptAsText() {
        let endpoints = Endpoints(
            metadata: ObjectMeta(name: "web", namespace: "shop"),
            spec: EndpointsSpec(addresses: [
                EndpointAddress(ip: "not-an-address", ports: [EndpointPort(port: 80)]),
                EndpointAddress(ip: "10.0.0.1", ports: [EndpointPort(port: 80)]),
            ])
        )
        let kept = TableEndpoints(endpoints)
        #expect(kept[0].address == nil && kept[1].address == IPAddress("10.0.0.1"))
        #expect(kept.addresses == endpoints.spec.addresses)
        #expect(TableEndpoints(endpoints) == kept)
    }

    @Test func theTableFoldsObjectsAsKept() {
        var snapshot = ServiceSnapshot()
        var service = MeshService(
            metadata: ObjectMeta(name: "web", namespace: "shop", annotations: ["note": "x"]),
            spec: ServiceSpec(ports: [ServicePort(port: 80, protocol: .http)], clusterIP: "127.77.0.9")
        )
        service.metadata.uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
        service.metadata.resourceVersion = "7"
        snapshot.apply(ReflectorUpdate<MeshService>.replaced([service], resourceVersion: 7))
        let key = ServiceKey(namespace: "shop", name: "web")
        #expect(snapshot.services[key] == TableService(service))
        #expect(snapshot.services[key]?.spec == service.spec)
        #expect(snapshot.services[key]?.resourceVersion == service.metadata.resourceVersion)
        // The spec and the version, nothing else (no uid, labels, annotations, apiVersion or kind).
        #expect(MemoryLayout<TableService>.stride < MemoryLayout<MeshService>.stride / 2)
        #expect(snapshot.servicesVersion == 7)
        snapshot.apply(ReflectorUpdate<MeshService>.changed(.deleted(service)))
        #expect(snapshot.services[key] == nil)
    }
}
