import Logging
import MeshClient
import MeshCore
import NIOCore
import Synchronization

/// The peer nodes this agent has dialed: where their links are. The agent follows no Node (an endpoint
/// carries its node's site, so routes need none); when a link to a node is dialed, the node is looked up
/// here. A node never looked up is fetched from the control plane (one GET on the agent's kept-alive
/// connection) and the dial waits for it. A node looked up before is answered at once from what was fetched
/// (in memory, or in the agent's cache file from an earlier run), and fetched again in the background when
/// that is older than `maxAge`: a dial never waits on a slow or unreachable control plane for a node it has
/// seen (a moved node's old addresses fail to dial, the relay path takes over, and the next dial has the new
/// ones). So each agent asks for the few nodes it
/// talks to, instead of the whole fleet listing and watching every Node (N² deliveries; perf/RESULTS.md).
final class NodeDirectory: Sendable {
    struct Entry: Sendable {
        var node: Node
        /// When it came from the control plane in this run; nil: loaded from the cache file.
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
        var loaded: [String: Entry] = [:]
        if let cache {
            do {
                // An agent before this one followed every Node: that copy is not the peers this one looked up.
                let dropped = try cache.forgetFollowed(Node.self)
                if dropped > 0 { logger.info("peer nodes: forgot the \(dropped) Nodes an earlier agent followed") }
                for n in try cache.load(Node.self).items { loaded[n.metadata.name] = Entry(node: n, fetched: nil) }
            } catch {
                logger.warning("peer nodes: the cache could not be read, looking each up again: \(error)")
            }
        }
        self.entries = Mutex(loaded)
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

    /// The node `name` as known now (nil: never looked up, or not registered). No request.
    func known(_ name: String) -> Node? { self.entries.withLock { $0[name]?.node } }

    /// The node `name`: the one known (fetched again in the background when older than `maxAge`), else fetched
    /// now; nil when the control plane has no such node.
    func node(_ name: String) async throws -> Node? {
        let kept = self.entries.withLock { $0[name] }
        guard let kept else { return try await self.fetched(name, kept: nil) }
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
