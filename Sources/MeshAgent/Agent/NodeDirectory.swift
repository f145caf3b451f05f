import Logging
import MeshClient
import MeshCore
import NIOCore
import Synchronization

/// The peer nodes this agent has dialed: where their links are. The agent follows no Node (an endpoint
/// carries its node's site, so routes need none); when a link to a node is dialed, the node is looked up
/// here. A node never looked up is fetched from the control plane (one GET on the agent's kept-alive
/// connection) and the dial waits for it. A node looked up before is answered at once from what was fetched
/// (in memory, or in the agent's cache file: an earlier run's lookups, or the Nodes an earlier agent version
/// followed; read one by one, on first use, never loaded whole), and fetched again in the background when
/// that is older than `maxAge`: a dial never waits on a slow or unreachable control plane for a node it has
/// seen (a moved node's old addresses fail to dial, the relay path takes over, and the next dial has the new
/// ones). So each agent asks for the few nodes it
/// talks to, instead of the whole fleet listing and watching every Node (N² deliveries; perf/RESULTS.md).
final class NodeDirectory: Sendable {
    struct Entry: Sendable {
        var node: Node
        /// When it came from the control plane in this run; nil: read from the cache file.
        var fetched: ContinuousClock.Instant?
    }

    /// Fetches a node: nil when the control plane has no node of that name.
    typealias Fetch = @Sendable (_ name: String) async throws -> Node?

    let fetch: Fetch
    let cache: AgentCache?
    let maxAge: Duration
    let logger: Logger
    private let entries: Mutex<[String: Entry]>
    /// Nodes being fetched again in the background.
    private let refreshing = Mutex<Set<String>>([])

    init(fetch: @escaping Fetch, cache: AgentCache?, maxAge: Duration = .seconds(30), logger: Logger) {
        self.fetch = fetch
        self.cache = cache
        self.maxAge = maxAge
        self.logger = logger
        self.entries = Mutex([:])
    }

    /// Looks `client` up for nodes (`GET /apis/mesh.edge/v1/nodes/NAME`; 404: no such node).
    convenience init(client: ControlClient, cache: AgentCache?, logger: Logger) {
        self.init(
            fetch: { name in
                do {
                    return try await client.get(Node.self, name: name)
                } catch let status as Status where status.code == 404 {
                    return nil
                }
            },
            cache: cache,
            logger: logger
        )
    }

    /// The node `name` as looked up in this run (nil: not yet, or not registered). No request.
    func known(_ name: String) -> Node? { self.entries.withLock { $0[name]?.node } }

    /// The node in memory, else in the cache file (then kept in memory, to be fetched again).
    private func kept(_ name: String) -> Entry? {
        if let e = self.entries.withLock({ $0[name] }) { return e }
        let stored: Node?
        do {
            stored = try self.cache?.get(Node.self, name: name)
        } catch {
            self.logger.warning("peer node \(name): the cache could not be read: \(error)")
            return nil
        }
        guard let stored else { return nil }
        let entry = Entry(node: stored, fetched: nil)
        self.entries.withLock { $0[name] = $0[name] ?? entry }
        return entry
    }

    /// The node `name`: the one known (fetched again in the background when older than `maxAge`), else fetched
    /// now; nil when the control plane has no such node.
    func node(_ name: String) async throws -> Node? {
        guard let kept = self.kept(name) else { return try await self.fetched(name, kept: nil) }
        if kept.fetched.map({ ContinuousClock.now - $0 >= self.maxAge }) ?? true,
            self.refreshing.withLock({ $0.insert(name).inserted })
        {
            Task {
                _ = try? await self.fetched(name, kept: kept)
                self.refreshing.withLock { _ = $0.remove(name) }
            }
        }
        return kept.node
    }

    /// Fetches `name` and keeps the answer; when the control plane does not answer, `kept` (or the error).
    private func fetched(_ name: String, kept: Entry?) async throws -> Node? {
        let now = ContinuousClock.now
        let node: Node?
        do {
            node = try await self.fetch(name)
        } catch {
            guard let kept else { throw error }
            self.logger.debug(
                "peer node \(name): the control plane did not answer (\(error)); using what was known before"
            )
            return kept.node
        }
        // The file first, then memory: whoever sees the new answer in memory finds it in the file too.
        do {
            if let node {
                if node != kept?.node { try self.cache?.put(node) }
            } else if kept != nil {
                try self.cache?.remove(Node.self, name: name)
            }
        } catch {
            self.logger.warning("peer node \(name): not kept in the cache: \(error)")
        }
        self.entries.withLock { $0[name] = node.map { Entry(node: $0, fetched: now) } }
        return node
    }

    /// Where `name`'s agent accepts links (`PeerDirectory.linkAddresses`); none for a node that is not
    /// registered or has no link port.
    func linkAddresses(of name: String) async throws -> [SocketAddress] {
        guard let node = try await self.node(name) else { return [] }
        return PeerDirectory.linkAddresses(of: node)
    }
}
