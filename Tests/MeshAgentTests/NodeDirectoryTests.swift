import Logging
import MeshCore
import MeshTestSupport
import Synchronization
import Testing

@testable import MeshAgent

/// The peer nodes an agent looks up when it dials their links (`NodeDirectory`), against a fetch that counts
/// its calls and can be told to fail, and a real cache file.
@Suite(.rationed) struct NodeDirectoryTests {
    final class Control: Sendable {
        let nodes = Mutex<[String: Node]>([:])
        let down = Mutex(false)
        let calls = Mutex(0)

        func fetch(_ name: String) async throws -> Node? {
            self.calls.withLock { $0 += 1 }
            if self.down.withLock({ $0 }) { throw StringError("connection refused") }
            return self.nodes.withLock { $0[name] }
        }
    }

    struct StringError: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { self.description = d }
    }

    static func node(_ name: String, ip: String, port: Int? = 7900) -> Node {
        Node(
            metadata: ObjectMeta(name: name),
            spec: NodeSpec(site: name, addresses: [NodeAddress(type: .internalIP, address: ip)], linkPort: port)
        )
    }

    func directory(_ control: Control, cache: AgentCache?, maxAge: Duration) -> NodeDirectory {
        NodeDirectory(
            fetch: { try await control.fetch($0) },
            cache: cache,
            maxAge: maxAge,
            logger: Logger(label: "test")
        )
    }

    @Test("a node is asked for once while fresh; once stale it answers at once and is asked for again behind")
    func askedOnceWhileFresh() async throws {
        let control = Control()
        control.nodes.withLock { $0["b"] = Self.node("b", ip: "198.18.1.2") }
        let fresh = self.directory(control, cache: nil, maxAge: .seconds(3600))
        #expect(try await fresh.linkAddresses(of: "b").map(\.description) == ["[IPv4]198.18.1.2:7900"])
        #expect(try await fresh.linkAddresses(of: "b").count == 1)
        #expect(control.calls.withLock { $0 } == 1)

        let stale = self.directory(control, cache: nil, maxAge: .zero)
        _ = try await stale.node("b")
        #expect(control.calls.withLock { $0 } == 2)
        control.nodes.withLock { $0["b"] = Self.node("b", ip: "198.18.1.3") }
        // The dial does not wait: what was fetched, while the node is fetched again.
        #expect(try await stale.linkAddresses(of: "b").map(\.description) == ["[IPv4]198.18.1.2:7900"])
        #expect(await eventually { stale.known("b")?.spec.addresses?.first?.address == "198.18.1.3" })
        #expect(try await stale.linkAddresses(of: "b").map(\.description) == ["[IPv4]198.18.1.3:7900"])
    }

    @Test("a node the control plane does not have: no address, nothing kept; a relay-only node: no address")
    func unknownAndRelayOnly() async throws {
        let control = Control()
        control.nodes.withLock { $0["r"] = Self.node("r", ip: "198.18.1.9", port: nil) }
        let dir = self.directory(control, cache: nil, maxAge: .seconds(3600))
        #expect(try await dir.linkAddresses(of: "ghost").isEmpty)
        #expect(dir.known("ghost") == nil)
        #expect(try await dir.linkAddresses(of: "r").isEmpty)
        #expect(dir.known("r")?.spec.site == "r")
    }

    @Test("offline: the last node fetched answers, also in the next run (the cache file); never seen: the error")
    func offlineUsesWhatWasFetched() async throws {
        let tmp = TempDir("node-directory")
        let control = Control()
        control.nodes.withLock { $0["b"] = Self.node("b", ip: "198.18.1.2") }
        do {
            let dir = self.directory(control, cache: try AgentCache(path: tmp.path + "/agent.db"), maxAge: .zero)
            _ = try await dir.node("b")
            control.down.withLock { $0 = true }
            #expect(try await dir.linkAddresses(of: "b").map(\.description) == ["[IPv4]198.18.1.2:7900"])
            await #expect(throws: StringError.self) { try await dir.node("c") }
        }
        // The agent restarts with the control plane still away: read from the file when first needed.
        let again = self.directory(control, cache: try AgentCache(path: tmp.path + "/agent.db"), maxAge: .zero)
        #expect(again.known("b") == nil)
        #expect(try await again.linkAddresses(of: "b").map(\.description) == ["[IPv4]198.18.1.2:7900"])
        #expect(again.known("b")?.spec.addresses?.first?.address == "198.18.1.2")
        // Back, and the node was deleted meanwhile: forgotten (once fetched behind the answer), in the file too.
        control.down.withLock { $0 = false }
        control.nodes.withLock { $0["b"] = nil }
        #expect(
            try await eventually {
                _ = try await again.node("b")
                return again.known("b") == nil
            }
        )
        #expect(try await again.node("b") == nil)
        let third = self.directory(control, cache: try AgentCache(path: tmp.path + "/agent.db"), maxAge: .zero)
        control.down.withLock { $0 = true }
        await #expect(throws: StringError.self) { try await third.node("b") }
    }

    @Test("an earlier agent version's copy of every Node answers offline, one node at a time, none loaded whole")
    func anEarlierAgentsFollowedNodesAnswerOffline() async throws {
        let tmp = TempDir("node-directory")
        let cache = try AgentCache(path: tmp.path + "/agent.db")
        let fleet = (0..<50).map { Self.node("n\($0)", ip: "198.18.2.\($0 + 1)") }
        try cache.replace(fleet, resourceVersion: 77)
        let control = Control()
        control.down.withLock { $0 = true }
        let dir = self.directory(control, cache: cache, maxAge: .seconds(3600))
        #expect(dir.known("n1") == nil)
        #expect(try await dir.linkAddresses(of: "n1").map(\.description) == ["[IPv4]198.18.2.2:7900"])
        #expect(dir.known("n1") == fleet[1] && dir.known("n2") == nil)
        // Back: fetched behind the answer, and kept.
        control.down.withLock { $0 = false }
        control.nodes.withLock { $0["n1"] = Self.node("n1", ip: "198.18.3.1") }
        // (Asked again while waiting: the refresh started while the control plane was away may still be ending.)
        #expect(
            try await eventually {
                _ = try await dir.node("n1")
                return dir.known("n1")?.spec.addresses?.first?.address == "198.18.3.1"
            }
        )
    }
}
