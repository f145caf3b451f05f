import MeshCore
import MeshTestSupport
import Testing

@testable import Control

/// The `WorkloadController`'s cache: what it wants of each workload and service, and that a change marks
/// dirty only the workloads and services it can change (a node's report: the workloads on that node).
@Suite struct WorkloadIndexTests {
    typealias Ref = WorkloadIndex.Ref

    static func node(
        _ name: String,
        rv: Int,
        ready: Bool = true,
        labels: [String: String]? = nil,
        ip: String = "198.18.0.1",
        site: String? = nil,
        running: [String] = [],
        restarts: Int = 0
    ) -> Node {
        var meta = ObjectMeta(name: name)
        meta.labels = labels
        meta.resourceVersion = String(rv)
        return Node(
            metadata: meta,
            spec: NodeSpec(site: site, addresses: [NodeAddress(type: .internalIP, address: ip)]),
            status: NodeStatus(
                phase: ready ? .ready : .notReady,
                workloads: running.map {
                    NodeWorkload(
                        namespace: "default",
                        name: $0,
                        instance: WorkloadInstance(node: name, phase: .running, restarts: restarts)
                    )
                }
            )
        )
    }

    static func workload(
        _ name: String,
        rv: Int,
        selector: WorkloadNodeSelector? = nil,
        ports: [Int] = [8080],
        nodes: [String]? = nil
    ) -> Workload {
        var meta = ObjectMeta(name: name, namespace: "default")
        meta.resourceVersion = String(rv)
        var w = Workload(
            metadata: meta,
            spec: WorkloadSpec(
                command: "/bin/true",
                ports: ports.isEmpty ? nil : ports.map { WorkloadPort(port: $0) },
                nodeSelector: selector
            )
        )
        w.status = nodes.map { WorkloadStatus(nodes: $0) }
        return w
    }

    static func ref(_ name: String) -> Ref { Ref(namespace: "default", name: name) }

    @Test("assignment: the Ready nodes the selector matches; an assigned node keeps it while NotReady")
    func assignment() {
        var index = WorkloadIndex()
        index.put(Self.node("a", rv: 1, labels: ["zone": "x"]))
        index.put(Self.node("b", rv: 2, labels: ["zone": "y"]))
        index.put(Self.node("c", rv: 3, ready: false, labels: ["zone": "x"]))
        index.put(Self.workload("all", rv: 4))
        index.put(Self.workload("x", rv: 5, selector: WorkloadNodeSelector(matchLabels: ["zone": "x"])))
        index.put(Self.workload("named", rv: 6, selector: WorkloadNodeSelector(nodeNames: ["b", "c", "ghost"])))
        #expect(index.wantedStatus(of: Self.ref("all"))?.nodes == ["a", "b"])
        #expect(index.wantedStatus(of: Self.ref("x"))?.nodes == ["a"])
        #expect(index.wantedStatus(of: Self.ref("named"))?.nodes == ["b"])
        #expect(index.wantedStatus(of: Self.ref("missing")) == nil)
        // Assigned to a and c (the controller wrote it when c was Ready): c keeps it NotReady.
        index.put(
            Self.workload("x", rv: 7, selector: WorkloadNodeSelector(matchLabels: ["zone": "x"]), nodes: ["a", "c"])
        )
        #expect(index.wantedStatus(of: Self.ref("x"))?.nodes == ["a", "c"])
        // c no longer matches: it loses it; a is deleted: it loses it.
        index.put(Self.node("c", rv: 8, ready: false, labels: ["zone": "z"]))
        index.removeNode("a", version: 9)
        #expect(index.wantedStatus(of: Self.ref("x"))?.nodes == nil)
    }

    @Test("status sums and endpoints come from the assigned nodes' instances")
    func sumsAndEndpoints() {
        var index = WorkloadIndex()
        index.put(Self.node("a", rv: 1, ip: "198.18.0.1", site: "s1", running: ["web"], restarts: 2))
        index.put(Self.node("b", rv: 2, ready: false, ip: "198.18.0.2", running: ["web"], restarts: 1))
        index.put(Self.node("c", rv: 3, ip: "198.18.0.3"))  // assigned, no instance reported
        index.put(Self.node("d", rv: 4, ip: "198.18.0.4", running: ["web"]))  // reports it, not assigned
        index.put(Self.workload("web", rv: 5, nodes: ["a", "b", "c"]))
        let status = index.wantedStatus(of: Self.ref("web"))
        #expect(status == WorkloadStatus(nodes: ["a", "b", "c", "d"], running: 3, restarts: 3))
        let addresses = index.wantedAddresses(of: Self.ref("web"))
        #expect(addresses.map(\.ip) == ["198.18.0.1", "198.18.0.2"])
        #expect(addresses.map(\.ready) == [true, false])  // b's node is NotReady
        #expect(addresses.map(\.site) == ["s1", nil])
        #expect(addresses.first?.ports == [EndpointPort(port: 8080)])
        // A workload without ports serves no endpoints.
        index.put(Self.workload("batch", rv: 6, ports: [], nodes: ["a"]))
        #expect(index.wantedAddresses(of: Self.ref("batch")).isEmpty)
    }

    @Test("a node's report dirties the workloads assigned to it, not the others")
    func reportDirtiesOnlyItsWorkloads() {
        var index = WorkloadIndex()
        for i in 0..<50 { index.put(Self.node("n\(i)", rv: 1 + i)) }
        index.put(Self.workload("on-n1", rv: 100, selector: WorkloadNodeSelector(nodeNames: ["n1"]), nodes: ["n1"]))
        index.put(Self.workload("on-n2", rv: 101, selector: WorkloadNodeSelector(nodeNames: ["n2"]), nodes: ["n2"]))
        _ = index.takeDirtyWorkloads()
        _ = index.takeDirtyServices()
        #expect(!index.hasDirty)
        // n1 reports an instance: on-n1 only, and its service with it.
        index.put(Self.node("n1", rv: 200, running: ["on-n1"]))
        #expect(index.dirtyWorkloads == [Self.ref("on-n1")])
        #expect(index.takeDirtyWorkloads() == [Self.ref("on-n1")])
        #expect(index.takeDirtyServices() == [Self.ref("on-n1")])
        // A node no workload is on or selects changes: nothing.
        index.put(Self.node("n7", rv: 201, ip: "198.18.0.77"))
        #expect(!index.hasDirty)
        // An old line (at or below what the index holds) is skipped.
        index.put(Self.node("n1", rv: 150))
        #expect(!index.hasDirty)
        #expect(index.nodes["n1"]?.instances[Self.ref("on-n1")] != nil)
    }

    @Test("a node that comes or turns Ready or changes labels dirties the workloads that select it")
    func readinessAndLabelsDirtySelectors() {
        var index = WorkloadIndex()
        index.put(Self.workload("x", rv: 1, selector: WorkloadNodeSelector(matchLabels: ["zone": "x"])))
        index.put(Self.workload("y", rv: 2, selector: WorkloadNodeSelector(matchLabels: ["zone": "y"])))
        _ = index.takeDirtyWorkloads()
        _ = index.takeDirtyServices()
        index.put(Self.node("a", rv: 3, ready: false, labels: ["zone": "x"]))
        #expect(index.takeDirtyWorkloads() == [Self.ref("x")])
        index.put(Self.node("a", rv: 4, ready: true, labels: ["zone": "x"]))
        #expect(index.takeDirtyWorkloads() == [Self.ref("x")])
        index.put(Self.node("a", rv: 5, ready: true, labels: ["zone": "y"]))
        #expect(index.takeDirtyWorkloads() == [Self.ref("y")])  // x is not assigned to it yet: only y selects it
    }

    @Test("the echo of the controller's own write changes nothing; another writer's change is redone")
    func ownWritesAreNotRedone() {
        var index = WorkloadIndex()
        index.put(Self.node("a", rv: 1))
        index.put(Self.workload("web", rv: 2))
        #expect(index.takeDirtyWorkloads() == [Self.ref("web")])
        _ = index.takeDirtyServices()
        // The controller wrote status.nodes = [a], read at version 2.
        var written = Self.workload("web", rv: 2, nodes: ["a"])
        index.put(written, dirty: false)
        #expect(!index.hasDirty)
        // Its line arrives (version 3): the same facts.
        written.metadata.resourceVersion = "3"
        index.put(written)
        #expect(!index.hasDirty)
        // Someone changes the selector: redone, and its service with it.
        index.put(Self.workload("web", rv: 4, selector: WorkloadNodeSelector(nodeNames: ["b"]), nodes: ["a"]))
        #expect(index.takeDirtyWorkloads() == [Self.ref("web")])
        #expect(index.takeDirtyServices() == [Self.ref("web")])
        #expect(index.wantedStatus(of: Self.ref("web"))?.nodes == nil)
    }

    @Test("endpoints: a deleted workload's service is redone (emptied); others' Endpoints mark the service")
    func endpointsFollowWorkloads() {
        var index = WorkloadIndex()
        index.put(Self.node("a", rv: 1, running: ["web"]))
        index.put(Self.workload("web", rv: 2, nodes: ["a"]))
        _ = index.takeDirtyWorkloads()
        _ = index.takeDirtyServices()
        var managed = ObjectMeta(name: "web", namespace: "default")
        managed.annotations = [WorkloadController.managedKey: WorkloadController.managedValue]
        managed.resourceVersion = "3"
        let ours = Endpoints(
            metadata: managed,
            spec: EndpointsSpec(addresses: index.wantedAddresses(of: Self.ref("web")))
        )
        index.put(ours)
        // Someone edits our Endpoints: redone.
        #expect(index.takeDirtyServices() == [Self.ref("web")])
        index.removeWorkload(Self.ref("web"), version: 4)
        #expect(index.takeDirtyServices() == [Self.ref("web")])
        #expect(index.wantedAddresses(of: Self.ref("web")).isEmpty)
        // Endpoints of a service no workload serves, not ours: nothing to do.
        var other = ObjectMeta(name: "db", namespace: "default")
        other.resourceVersion = "5"
        index.put(Endpoints(metadata: other, spec: EndpointsSpec(addresses: [])))
        #expect(!index.hasDirty)
        // After a list: every workload and every service that has workloads or our Endpoints.
        index.put(Self.workload("api", rv: 6))
        index.dirtyEverything()
        #expect(index.takeDirtyWorkloads() == [Self.ref("api")])
        #expect(index.takeDirtyServices() == [Self.ref("api"), Self.ref("web")])
    }

    @Test(
        "the selector and label indexes find what a scan of every workload and every node finds (2,000 seeded changes)"
    )
    func indexesAgreeWithAScan() {
        var random = SplitMix(seed: 17)
        let names = (0..<16).map { "n\($0)" }
        let zones = ["a", "b", "c"]
        func pick<T>(_ list: [T]) -> T { list[Int(random.next() % UInt64(list.count))] }
        func chance(_ percent: UInt64) -> Bool { random.next() % 100 < percent }
        func labels() -> [String: String] {
            var l: [String: String] = [:]
            if chance(80) { l["zone"] = pick(zones) }
            if chance(50) { l["tier"] = pick(["x", "y"]) }
            return l
        }
        func selector() -> WorkloadNodeSelector? {
            switch random.next() % 5 {
            case 0: return nil
            case 1: return WorkloadNodeSelector(matchLabels: labels())  // may be empty: every node
            case 2: return WorkloadNodeSelector(nodeNames: (0..<3).map { _ in pick(names) })
            case 3: return WorkloadNodeSelector(nodeNames: [pick(names)], matchLabels: labels())
            default: return WorkloadNodeSelector(nodeNames: [], matchLabels: ["zone": pick(zones)])
            }
        }
        // The model: what was put, as a scan would read it.
        var nodes: [String: (labels: [String: String], ready: Bool)] = [:]
        var workloads: [String: (selector: WorkloadNodeSelector?, assigned: [String])] = [:]
        var index = WorkloadIndex()
        var rv = 0
        func selecting(_ name: String, _ node: (labels: [String: String], ready: Bool)) -> Set<Ref> {
            Set(
                workloads.filter { $0.value.selector?.matches(name: name, labels: node.labels) ?? true }.keys.map {
                    Self.ref($0)
                }
            )
        }
        func assigned(to name: String) -> Set<Ref> {
            Set(workloads.filter { $0.value.assigned.contains(name) }.keys.map { Self.ref($0) })
        }
        for step in 0..<2_000 {
            rv += 1
            _ = index.takeDirtyWorkloads()
            switch random.next() % 10 {
            case 0...4:
                let name = pick(names)
                let node = (labels: chance(70) ? labels() : nodes[name]?.labels ?? [:], ready: chance(80))
                let old = nodes[name]
                nodes[name] = node
                index.put(Self.node(name, rv: rv, ready: node.ready, labels: node.labels))
                let expected: Set<Ref> =
                    if let old {
                        old.labels == node.labels && old.ready == node.ready
                            ? [] : assigned(to: name).union(selecting(name, node))
                    } else {
                        selecting(name, node)
                    }
                #expect(Set(index.takeDirtyWorkloads()) == expected, "step \(step): put node \(name)")
            case 5:
                let name = pick(names)
                guard nodes.removeValue(forKey: name) != nil else { continue }
                index.removeNode(name, version: Int64(rv))
                #expect(Set(index.takeDirtyWorkloads()) == assigned(to: name), "step \(step): node \(name) gone")
            case 6...8:
                let name = "w\(random.next() % 12)"
                let w = (selector: selector(), assigned: names.filter { nodes[$0] != nil && chance(30) })
                workloads[name] = w
                index.put(Self.workload(name, rv: rv, selector: w.selector, nodes: w.assigned))
            default:
                let name = "w\(random.next() % 12)"
                guard workloads.removeValue(forKey: name) != nil else { continue }
                index.removeWorkload(Self.ref(name), version: Int64(rv))
            }
            for (name, w) in workloads {
                let wanted = nodes.filter { n, node in
                    (w.selector?.matches(name: n, labels: node.labels) ?? true)
                        && (node.ready || w.assigned.contains(n))
                }.keys.sorted()
                #expect(
                    index.wantedStatus(of: Self.ref(name))?.nodes ?? [] == wanted,
                    "step \(step): nodes of \(name) (\(String(describing: w.selector)))"
                )
            }
        }
    }
}
