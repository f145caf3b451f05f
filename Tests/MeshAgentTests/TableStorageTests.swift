import MeshClient
import MeshCore
import Testing

@testable import MeshAgent

/// What the agent's table keeps of each object (ServiceTable.swift `forTable`).
@Suite struct TableStorageTests {
    @Test func endpointsShareEqualPortListsAndLongNames() {
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
        endpoints.metadata.uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
        endpoints.metadata.resourceVersion = "42"
        endpoints.metadata.creationTimestamp = "2026-12-04T20:00:00Z"
        let kept = endpoints.forTable
        // The same addresses, ports and names.
        #expect(kept.spec == endpoints.spec)
        #expect(kept.metadata.name == "web" && kept.metadata.namespace == "shop")
        #expect(kept.metadata.resourceVersion == "42")
        #expect(kept.metadata.uid == nil && kept.metadata.labels == nil && kept.metadata.creationTimestamp == nil)
        // One port list and one node name for all ten addresses.
        #expect(Set(kept.spec.addresses.map { storage(of: $0.ports) }).count == 1)
        #expect(Set(kept.spec.addresses.map { storage(of: $0.node!) }).count == 1)
        // As decoded (or built), each address had its own.
        #expect(Set(endpoints.spec.addresses.map { storage(of: $0.ports) }).count == 10)
        #expect(Set(endpoints.spec.addresses.map { storage(of: $0.node!) }).count == 10)
    }

    @Test func theTableFoldsObjectsAsKept() {
        var snapshot = ServiceSnapshot()
        var service = MeshService(
            metadata: ObjectMeta(name: "web", namespace: "shop", annotations: ["note": "x"]),
            spec: ServiceSpec(ports: [ServicePort(port: 80, protocol: .http)], clusterIP: "127.77.0.9")
        )
        service.metadata.uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
        snapshot.apply(ReflectorUpdate<MeshService>.replaced([service], resourceVersion: 7))
        let key = ServiceKey(namespace: "shop", name: "web")
        #expect(snapshot.services[key]?.spec == service.spec)
        #expect(snapshot.services[key]?.metadata.annotations == nil && snapshot.services[key]?.metadata.uid == nil)
        #expect(snapshot.servicesVersion == 7)
        snapshot.apply(ReflectorUpdate<MeshService>.changed(.deleted(service)))
        #expect(snapshot.services[key] == nil)
    }
}

/// Where an array's elements are stored.
private func storage(of array: [EndpointPort]) -> UInt {
    array.withUnsafeBufferPointer { UInt(bitPattern: $0.baseAddress) }
}

/// Where a (native, heap-stored) string's bytes are stored.
private func storage(of string: String) -> UInt {
    string.utf8.withContiguousStorageIfAvailable { UInt(bitPattern: $0.baseAddress) } ?? 0
}
