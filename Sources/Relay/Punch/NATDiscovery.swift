import Logging
import MeshCore
import NIOCore
import Synchronization

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// What a NAT discovery found: the mapping of the link port over TCP (what a punch uses) and UDP, the
/// reflexive address, and what went wrong.
public struct NATReport: Sendable, Hashable {
    /// The TCP mapping of the link port: the one punching depends on.
    public var mapping: NATMapping
    /// The UDP mapping of the same port number (for `/peers`; punching is TCP).
    public var udpMapping: NATMapping
    /// The link port as the first STUN server saw it over TCP.
    public var reflexive: STUNAddress?
    /// The host's own addresses (global unicast) with the link port.
    public var local: [STUNAddress]
    /// Every answer, TCP and UDP.
    public var bindings: [STUNBinding]
    /// Requests that failed, with why.
    public var errors: [String]
    public var at: Date

    public init(
        mapping: NATMapping = .unknown,
        udpMapping: NATMapping = .unknown,
        reflexive: STUNAddress? = nil,
        local: [STUNAddress] = [],
        bindings: [STUNBinding] = [],
        errors: [String] = [],
        at: Date = Date()
    ) {
        self.mapping = mapping
        self.udpMapping = udpMapping
        self.reflexive = reflexive
        self.local = local
        self.bindings = bindings
        self.errors = errors
        self.at = at
    }

    /// The candidates a punch offer carries: the reflexive address, then the host's own.
    public var punchCandidates: [PunchCandidate] {
        var list: [PunchCandidate] = []
        if let r = self.reflexive { list.append(PunchCandidate(kind: .reflexive, ip: r.ip, port: r.port)) }
        for l in self.local.prefix(PunchCandidates.maxCandidates - list.count) {
            list.append(PunchCandidate(kind: .host, ip: l.ip, port: l.port))
        }
        return list
    }

    /// The Node's `status.candidates` (`updateTime` is set by the publisher).
    public var nodeCandidates: NodeCandidates {
        NodeCandidates(
            local: self.local.map { "\($0)" },
            reflexive: self.reflexive.map { "\($0)" },
            mapping: self.mapping.description
        )
    }
}

/// NAT discovery: Binding requests from the link port to two STUN endpoints (two relays, or two ports
/// of one), over TCP and UDP, and the mapping they show.
public enum NATDiscovery {
    /// The mapping the answers show. `bindings`: what each STUN endpoint saw of `localPort` (one
    /// transport, in the order asked). `localAddresses`: the host's own addresses.
    ///
    /// - none answered: `unknown`;
    /// - a host address and the port itself: `none` (no NAT);
    /// - one answer only: `portPreserving` when it kept the port, else `unknown` (one server cannot tell
    ///   endpoint-independent from dependent);
    /// - every endpoint saw the same address and port: `portPreserving` (the port kept) or
    ///   `endpointIndependent`;
    /// - ports that differ by at most `sequentialSpan`: `endpointDependent`; further apart: `random`.
    public static func classify(
        localPort: Int,
        localAddresses: [IPAddress],
        bindings: [STUNAddress],
        sequentialSpan: Int = 8
    ) -> NATMapping {
        guard let first = bindings.first else { return .unknown }
        let samePort = bindings.allSatisfy { Int($0.port) == localPort }
        if samePort && bindings.allSatisfy({ localAddresses.contains($0.ip) }) { return .none }
        let distinct = Set(bindings)
        if distinct.count == 1 {
            if Int(first.port) == localPort { return .portPreserving }
            return bindings.count >= 2 ? .endpointIndependent : .unknown
        }
        let ports = bindings.map { Int($0.port) }
        let span = (ports.max() ?? 0) - (ports.min() ?? 0)
        return span <= sequentialSpan && Set(bindings.map(\.ip)).count == 1 ? .endpointDependent : .random
    }

    /// Runs the discovery: a TCP and a UDP Binding request from `localPort` to each of `servers` (up to
    /// four, in turn), then classifies. Never throws: failures are in `errors` (no answer at all is
    /// mapping `unknown`).
    public static func discover(
        client: STUNClient,
        servers: [SocketAddress],
        localPort: Int,
        localAddresses: [IPAddress]
    ) async -> NATReport {
        var report = NATReport()
        report.local = localAddresses.map { STUNAddress(ip: $0, port: UInt16(localPort)) }
        var tcp: [STUNAddress] = []
        var udp: [STUNAddress] = []
        for server in servers.prefix(4) {
            let any = server.protocol == .inet6 ? "::" : "0.0.0.0"
            guard let local = try? SocketAddress(ipAddress: any, port: localPort) else { continue }
            do {
                let b = try await client.bindingTCP(server: server, local: local)
                tcp.append(b.mapped)
                report.bindings.append(b)
            } catch {
                report.errors.append("tcp \(server): \(error)")
            }
            do {
                let b = try await client.bindingUDP(server: server, local: local)
                udp.append(b.mapped)
                report.bindings.append(b)
            } catch {
                report.errors.append("udp \(server): \(error)")
            }
        }
        report.mapping = Self.classify(localPort: localPort, localAddresses: localAddresses, bindings: tcp)
        report.udpMapping = Self.classify(localPort: localPort, localAddresses: localAddresses, bindings: udp)
        report.reflexive = tcp.first
        report.at = Date()
        return report
    }
}

/// What theory says a pair of NATs allows (the offerer's view): who dials, or why nobody can.
public enum PunchPlan: Sendable, Hashable {
    case simultaneousOpen
    /// The offerer dials the answerer's reflexive address (the answerer has no NAT).
    case offererDials
    /// The answerer dials the offerer's (the offerer has no NAT).
    case answererDials
    /// No punch can work: the reason (`peer mapping random`, ...).
    case impossible(String)

    /// The plan for an offerer with `mine` and an answerer with `peer` (each with its reflexive address).
    public static func plan(mine: NATMapping, peer: NATMapping, mineReachable: Bool, peerReachable: Bool) -> PunchPlan {
        for (who, m) in [("peer", peer), ("own", mine)] {
            switch m {
            case .random, .endpointDependent: return .impossible("\(who) mapping \(m)")
            case .unknown: return .impossible("\(who) mapping unknown")
            default: break
            }
        }
        guard peerReachable else { return .impossible("peer has no reflexive address") }
        guard mineReachable else { return .impossible("own reflexive address unknown") }
        if peer == .none { return .offererDials }
        if mine == .none { return .answererDials }
        return .simultaneousOpen
    }

    public var start: PunchStart.Mode? {
        switch self {
        case .simultaneousOpen: return .simultaneousOpen
        case .offererDials: return .offererDials
        case .answererDials: return .answererDials
        case .impossible: return nil
        }
    }
}

/// Keeps the agent's latest NAT discovery, re-running it on a timer and when asked (host addresses
/// changed), and gives the Node's `status.candidates`.
public final class NATDiscoveryService: Sendable {
    public typealias Servers = @Sendable () async -> [SocketAddress]
    public typealias LocalAddresses = @Sendable () -> [IPAddress]

    let client: STUNClient
    let localPort: Int
    let servers: Servers
    let localAddresses: LocalAddresses
    let interval: Duration
    let logger: Logger
    private let state = Mutex<(report: NATReport?, candidates: NodeCandidates?, kick: Bool)>((nil, nil, false))

    public init(
        client: STUNClient,
        localPort: Int,
        interval: Duration = .seconds(60),
        logger: Logger = Logger(label: "mesh.punch"),
        servers: @escaping Servers,
        localAddresses: @escaping LocalAddresses
    ) {
        self.client = client
        self.localPort = localPort
        self.interval = interval
        self.logger = logger
        self.servers = servers
        self.localAddresses = localAddresses
    }

    /// The latest discovery (nil before the first).
    public var report: NATReport? { self.state.withLock { $0.report } }

    /// The Node's `status.candidates`: its time moves only when something else does.
    public var candidates: NodeCandidates? { self.state.withLock { $0.candidates } }

    /// A fresh mapping for one punch round: a TCP binding from a new local port to the first STUN
    /// server; the port (free again, closed with SO_LINGER 0) and what the server saw. With an
    /// endpoint-independent mapping that is the address every peer will see. Nil when no server answers.
    public func freshMapping() async -> (port: Int, mapped: STUNAddress)? {
        for server in await self.servers().prefix(2) {
            let any = server.protocol == .inet6 ? "::" : "0.0.0.0"
            guard let local = try? SocketAddress(ipAddress: any, port: 0),
                let b = try? await self.client.bindingTCP(server: server, local: local),
                let port = b.local?.port
            else { continue }
            return (port, b.mapped)
        }
        return nil
    }

    /// Asks for a discovery at the next second (host addresses changed).
    public func refresh() { self.state.withLock { $0.kick = true } }

    /// Runs one discovery now and keeps it.
    @discardableResult
    public func discover() async -> NATReport {
        let servers = await self.servers()
        let report = await NATDiscovery.discover(
            client: self.client,
            servers: servers,
            localPort: self.localPort,
            localAddresses: self.localAddresses()
        )
        let changed = self.state.withLock { s -> Bool in
            var fresh = report.nodeCandidates
            let old = s.candidates
            let moved = old.map { o in
                o.local != fresh.local || o.reflexive != fresh.reflexive || o.mapping != fresh.mapping
            }
            if moved ?? true {
                fresh.updateTime = Timestamp.now()
                s.candidates = fresh
            }
            s.report = report
            return moved ?? true
        }
        if changed {
            self.logger.info(
                "NAT discovery",
                metadata: [
                    "mapping": "\(report.mapping)", "udp": "\(report.udpMapping)",
                    "reflexive": "\(report.reflexive.map { "\($0)" } ?? "-")",
                    "servers": "\(servers.count)", "errors": "\(report.errors.joined(separator: "; "))",
                ]
            )
        }
        return report
    }

    /// Discovers at once, then every `interval` (sooner after `refresh()`), until cancelled.
    public func run() async {
        while !Task.isCancelled {
            let report = await self.discover()
            // Until a server answers (relays not known yet), try again soon.
            let wait: Duration = report.bindings.isEmpty ? .seconds(2) : self.interval
            let deadline = ContinuousClock.now + wait
            while ContinuousClock.now < deadline {
                do { try await Task.sleep(for: .seconds(1)) } catch { return }
                let kick = self.state.withLock { s -> Bool in
                    defer { s.kick = false }
                    return s.kick
                }
                if kick { break }
            }
        }
    }
}
