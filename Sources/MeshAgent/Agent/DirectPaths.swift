import Logging
import MeshCore
import NIOCore
import NIOPosix
import Relay
import ServiceLifecycle

/// The agent's direct paths through NATs: its NAT discovery (from the link port, against the relays'
/// STUN servers in the table), published as its Node's `status.candidates`, and the punch coordinator
/// that upgrades relayed links (`Relay/Punch`). A `Service`: discovery runs until shutdown, again when
/// the node's own addresses change.
final class DirectPaths: ServiceLifecycle.Service, Sendable {
    let discovery: NATDiscoveryService
    let coordinator: PunchCoordinator
    let current: CurrentTable
    let nodeName: String

    init(
        links: LinkManager,
        linkPort: Int,
        nodeName: String,
        current: CurrentTable,
        configuration: PunchConfiguration,
        logger: Logger
    ) {
        self.current = current
        self.nodeName = nodeName
        self.discovery = NATDiscoveryService(
            client: STUNClient(group: links.group),
            localPort: linkPort,
            logger: logger,
            servers: { PeerDirectory.stunServers(in: current.value) },
            localAddresses: { PeerDirectory.ownAddresses(of: nodeName, in: current.value) }
        )
        self.coordinator = PunchCoordinator(
            links: links,
            discovery: self.discovery,
            configuration: configuration,
            logger: logger
        )
        self.coordinator.install()
    }

    /// The Node's `status.candidates` (nil before the first discovery).
    var candidates: NodeCandidates? { self.discovery.candidates }

    func run() async throws {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.discovery.run() }
            group.addTask {
                // The node's addresses (as registered) or the relays changed: discover again.
                var seen = (
                    PeerDirectory.ownAddresses(of: self.nodeName, in: self.current.value),
                    PeerDirectory.stunServers(in: self.current.value).map { "\($0)" }
                )
                while !Task.isCancelled {
                    do { try await Task.sleep(for: .seconds(1)) } catch { return }
                    let now = (
                        PeerDirectory.ownAddresses(of: self.nodeName, in: self.current.value),
                        PeerDirectory.stunServers(in: self.current.value).map { "\($0)" }
                    )
                    if now.0 != seen.0 || now.1 != seen.1 {
                        seen = now
                        self.discovery.refresh()
                    }
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

extension PeerDirectory {
    /// The STUN endpoints of the Ready relays in the table (each relay's `stunAddresses`), at most four,
    /// spread over the relays first (two relays, or two ports of one, tell the mapping kinds apart).
    static func stunServers(in snapshot: ServiceSnapshot) -> [SocketAddress] {
        let relays = Self.relays(in: snapshot, preferred: nil)
        let lists = relays.map { r in
            (r.spec.stunAddresses ?? []).compactMap { text -> SocketAddress? in
                guard let (host, port) = Self.splitHostPort(text) else { return nil }
                return try? SocketAddress(ipAddress: host, port: port)
            }
        }
        var out: [SocketAddress] = []
        var i = 0
        while out.count < 4, lists.contains(where: { $0.count > i }) {
            for l in lists where l.count > i && out.count < 4 { out.append(l[i]) }
            i += 1
        }
        return out
    }

    /// This node's own IP addresses as registered (its NAT discovery tells them from reflexive ones).
    static func ownAddresses(of node: String, in snapshot: ServiceSnapshot) -> [IPAddress] {
        (snapshot.nodes[node]?.spec.addresses ?? []).filter { $0.type != .hostname }.compactMap {
            IPAddress($0.address)
        }
    }

    /// `IP:PORT` or `[IPv6]:PORT`.
    static func splitHostPort(_ text: String) -> (String, Int)? {
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            let host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":"), let port = Int(rest.dropFirst()) else { return nil }
            return (host, port)
        }
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return nil }
        return (String(text[..<colon]), port)
    }
}
