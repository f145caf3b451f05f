import MeshCore
import MeshWire
import NIOCore
import Relay
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The table the agent serves now, shared with the peer links: whom to dial (a node's addresses and link
/// port) and which incoming streams to accept (endpoints this node serves).
final class CurrentTable: Sendable {
    private let snapshot = Mutex(ServiceSnapshot())

    var value: ServiceSnapshot { self.snapshot.withLock { $0 } }

    func set(_ snapshot: ServiceSnapshot) { self.snapshot.withLock { $0 = snapshot } }
}

/// The data plane's streams to other sites, over the agent's `LinkManager`.
struct LinkPeerStreams: PeerStreams {
    let links: LinkManager

    func splice(
        socket: NIOBSDSocket.Handle,
        to node: String,
        open target: StreamTarget,
        ended: (@Sendable (_ fromSocket: Int, _ toSocket: Int) -> Void)?
    ) async throws {
        try await self.links.splice(socket: socket, to: node, open: target, ended: ended)
    }

    func stream(
        to node: String,
        open target: StreamTarget,
        initializer: @escaping @Sendable (any Channel) -> EventLoopFuture<Void>
    ) async throws -> any Channel {
        try await self.links.stream(to: node, open: target, initializer: initializer)
    }
}

/// What the agent's links need from its service table and the peer nodes it looked up. Pure functions.
enum PeerDirectory {
    /// Where `n`'s agent accepts links: each of its registered IP addresses on its link port, internal
    /// addresses first. None when it registered no link port (it is reached through a relay only).
    static func linkAddresses(of n: Node) -> [SocketAddress] {
        guard let port = n.spec.linkPort else { return [] }
        let addresses = (n.spec.addresses ?? []).filter { $0.type != .hostname }
        let ordered = addresses.filter { $0.type == .internalIP } + addresses.filter { $0.type != .internalIP }
        return ordered.compactMap { try? SocketAddress(ipAddress: $0.address, port: port) }
    }

    /// `node`'s site as the table's endpoints give it (the control plane stamps each address with its node's
    /// site), for a peer this agent has not looked up (one that dialed in). Nil: no endpoint names it with one.
    static func site(of node: String, in snapshot: ServiceSnapshot) -> String? {
        Self.sites(in: snapshot)[node]
    }

    /// Every node's site as the endpoints naming it carry it, in one pass over the table (`/peers` asks for
    /// many nodes: one scan, not one per row).
    static func sites(in snapshot: ServiceSnapshot) -> [String: String] {
        var out: [String: String] = [:]
        for endpoints in snapshot.endpoints.values {
            for a in endpoints {
                if let node = a.node, let s = a.site, out[node] == nil { out[node] = s }
            }
        }
        return out
    }

    /// The relays this agent may home on: the Ready ones of the table, or only those named in `preferred`
    /// (the agent's `relays` setting), in that order.
    static func relays(in snapshot: ServiceSnapshot, preferred: [String]?) -> [Relay] {
        let ready = snapshot.relays.values.filter { ($0.status?.phase ?? .ready) == .ready }
        guard let preferred, !preferred.isEmpty else { return ready.sorted { $0.metadata.name < $1.metadata.name } }
        return preferred.compactMap { name in ready.first { $0.metadata.name == name } }
    }

    /// Whether a stream from `peer` for `target` may be accepted by `localNode`: the target must be an
    /// endpoint address and port of the named service that this node serves, per the table. Anything else
    /// is refused with the reason, which the sender logs and counts.
    static func check(
        _ target: StreamTarget,
        from peer: String,
        localNode: String,
        in snapshot: ServiceSnapshot
    ) -> StreamRefusal? {
        let key = ServiceKey(namespace: target.namespace, name: target.service)
        guard snapshot.services[key] != nil, let endpoints = snapshot.endpoints[key] else {
            return StreamRefusal(.unknownService, "no service \(key) at node \(localNode)")
        }
        let ip = target.endpoint.ipAddress
        let port = Int(target.endpointPort)
        let served = endpoints.contains { a in
            a.node == localNode && a.address == ip && a.ports.contains { $0.port == port }
        }
        guard served else {
            return StreamRefusal(
                .notLocalEndpoint,
                "\(target.endpoint):\(port) is not an endpoint of \(key) served by node \(localNode)"
            )
        }
        return nil
    }
}

/// One row of `GET /peers` and `meshctl peers`: a link's figures with the peer's site.
struct PeerRow: Codable, Sendable, Equatable {
    var node: String
    var site: String?
    /// `direct`, `punched` or `relayed`.
    var path: String
    var relay: String?
    var rttMicros: Int64?
    var streams: Int
    var bytesSent: UInt64
    var bytesReceived: UInt64
    var since: String
    /// The node that dialed the link.
    var dialer: String
    /// What seals the link's records after its handshake: `mesh` (the mesh record layer) or `tls`.
    var records: String?
    /// What carries its bytes after the handshake: `loop` (the agent's link loop) or `nio`.
    var dataPath: String?
    /// Why the link is not direct (`peer mapping random`, `punch failed ...`); nil when it is.
    var reason: String?
    /// This node's and the peer's NAT mappings (`portPreserving`, `random`, ...), as last exchanged.
    var localNAT: String?
    var peerNAT: String?
    /// Relayed links made direct, direct ones lost back to a relay, punch rounds.
    var upgrades: Int?
    var fallbacks: Int?
    var punchAttempts: Int?
    /// From the relayed link up to the direct one, for the last upgrade.
    var upgradeMillis: Int?

    init(_ stats: LinkStats, site: String?, punch: PunchPeerStats? = nil) {
        self.node = stats.node
        self.site = site
        self.path = stats.path
        self.relay = stats.relay
        self.rttMicros = stats.rttMicros
        self.streams = stats.streams
        self.bytesSent = stats.bytesSent
        self.bytesReceived = stats.bytesReceived
        self.since = Timestamp.format(secondsSinceEpoch: Int(stats.since.timeIntervalSince1970))
        self.dialer = stats.dialer
        self.records = stats.records
        self.dataPath = stats.dataPath
        if let punch {
            self.reason = stats.path == "relayed" ? punch.reason : nil
            self.localNAT = punch.localMapping
            self.peerNAT = punch.peerMapping
            self.upgrades = punch.upgrades
            self.fallbacks = punch.fallbacks
            self.punchAttempts = punch.attempts
            self.upgradeMillis = punch.upgradeMillis
        }
    }
}

/// The body of `GET /peers`.
struct PeerList: Codable, Sendable {
    var node: String
    var site: String?
    /// Where this agent accepts links (`off`: it does not).
    var linkListen: String
    /// Its relay session: the home relay, its address, RTT, since when, circuits.
    var relay: RelayClientStatus
    /// This node's NAT discovery: the link port's TCP mapping, its UDP mapping, the reflexive address.
    var nat: NATStatus?
    var items: [PeerRow]
}

/// `/peers`' `nat`.
struct NATStatus: Codable, Sendable, Equatable {
    var mapping: String
    var udpMapping: String
    var reflexive: String?
    /// The host's own addresses with the link port, as the last discovery saw them.
    var local: [String]?
    var errors: [String]?

    init(_ report: NATReport) {
        self.mapping = report.mapping.description
        self.udpMapping = report.udpMapping.description
        self.reflexive = report.reflexive.map { "\($0)" }
        self.local = report.local.isEmpty ? nil : report.local.map { "\($0)" }
        self.errors = report.errors.isEmpty ? nil : report.errors
    }
}
