import MeshCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A named port of a service; its SRV record is `_<name>._<protocol>.<service>.<namespace>.svc.<domain>`.
public struct DNSServicePort: Hashable, Sendable {
    public enum TransportProtocol: String, Hashable, Sendable {
        case tcp
        case udp
        case sctp
    }

    /// The port's name; unnamed ports (empty name) get no SRV record.
    public var name: String
    public var port: UInt16
    public var transportProtocol: TransportProtocol

    public init(name: String, port: UInt16, protocol transportProtocol: TransportProtocol = .tcp) {
        self.name = name
        self.port = port
        self.transportProtocol = transportProtocol
    }
}

/// One endpoint (pod address) of a service. Only headless services publish their endpoints in DNS.
public struct DNSEndpoint: Hashable, Sendable {
    public var ip: IPAddress
    /// The endpoint's hostname; without one, a name derived from the address (`10-0-0-7`) stands in.
    public var hostname: String?
    /// Only ready endpoints are published.
    public var ready: Bool

    public init(ip: IPAddress, hostname: String? = nil, ready: Bool = true) {
        self.ip = ip
        self.hostname = hostname
        self.ready = ready
    }
}

/// A service as DNS needs to see it: the agent maps its service table into these.
public struct DNSService: Hashable, Sendable {
    public var name: String
    public var namespace: String
    /// The service VIPs (IPv4 and/or IPv6). Empty means headless: the name answers the ready endpoints.
    public var clusterIPs: [IPAddress]
    public var ports: [DNSServicePort]
    /// Exported to the cluster set (Kubernetes MCS): also answers under the clusterset domain.
    public var exported: Bool
    public var endpoints: [DNSEndpoint]
    /// An ExternalName service: the name is a CNAME to this name and has no other records.
    public var externalName: String?

    public init(
        name: String,
        namespace: String,
        clusterIPs: [IPAddress] = [],
        ports: [DNSServicePort] = [],
        exported: Bool = false,
        endpoints: [DNSEndpoint] = [],
        externalName: String? = nil
    ) {
        self.name = name
        self.namespace = namespace
        self.clusterIPs = clusterIPs
        self.ports = ports
        self.exported = exported
        self.endpoints = endpoints
        self.externalName = externalName
    }

    public var isHeadless: Bool { self.clusterIPs.isEmpty && self.externalName == nil }
}

/// A neutral snapshot of everything the service zone answers from.
public struct ZoneInput: Sendable {
    /// The cluster domain, `cluster.local` by default.
    public var domain: String
    /// The Kubernetes multi-cluster services domain for exported services.
    public var clustersetDomain: String
    /// TTL of positive answers (seconds).
    public var ttl: UInt32
    /// TTL of negative answers: the SOA minimum and the SOA record's own TTL (RFC 2308).
    public var negativeTTL: UInt32
    public var services: [DNSService]

    public init(
        domain: String = "cluster.local",
        clustersetDomain: String = "clusterset.local",
        ttl: UInt32 = 30,
        negativeTTL: UInt32 = 30,
        services: [DNSService] = []
    ) {
        self.domain = domain
        self.clustersetDomain = clustersetDomain
        self.ttl = ttl
        self.negativeTTL = negativeTTL
        self.services = services
    }
}

/// An SRV target in a zone node.
struct ZoneSRV {
    var priority: UInt16
    var weight: UInt16
    var port: UInt16
    /// Lowercase wire form.
    var target: [UInt8]
}

/// All records of one owner name. A node with no records is an empty non-terminal (NODATA, not NXDOMAIN).
///
/// A zone of 10,000 services has ~40,000 nodes (each service's name, its SRV names and their parent, its
/// reverse name), nearly all with A, SRV or PTR records only: the rarer kinds (AAAA, TXT, CNAME, the apexes'
/// SOA and NS) live in a box that most nodes do not have, so a node is 32 bytes, not 56.
struct ZoneNode {
    var v4: [UInt32] = []
    var srv: [ZoneSRV] = []
    var ptr: [[UInt8]] = []
    private var rare: Rare?

    /// The rarer records, copied on write (nodes are values). Unchecked: a box is written only while its node
    /// holds the only reference (`rareForWriting`), that is while a zone is built, never once it is shared.
    private final class Rare: @unchecked Sendable {
        var v6: [IPAddress] = []
        var txt: [[UInt8]] = []
        var cname: [UInt8]? = nil
        var apex: Int = -1

        func copy() -> Rare {
            let r = Rare()
            (r.v6, r.txt, r.cname, r.apex) = (self.v6, self.txt, self.cname, self.apex)
            return r
        }
    }

    /// The box, unique to this node, made when absent.
    private mutating func rareForWriting() -> Rare {
        if let r = self.rare, isKnownUniquelyReferenced(&self.rare) { return r }
        let r = self.rare?.copy() ?? Rare()
        self.rare = r
        return r
    }

    var v6: [IPAddress] {
        get { self.rare?.v6 ?? [] }
        set { self.rareForWriting().v6 = newValue }
    }
    /// TXT RDATA, already in wire form.
    var txt: [[UInt8]] {
        get { self.rare?.txt ?? [] }
        set { self.rareForWriting().txt = newValue }
    }
    var cname: [UInt8]? {
        get { self.rare?.cname }
        set { self.rareForWriting().cname = newValue }
    }
    /// Index into ``DNSZone/apexes`` when this node is a zone apex (it then has SOA and NS).
    var apex: Int {
        get { self.rare?.apex ?? -1 }
        set { self.rareForWriting().apex = newValue }
    }
}

/// The apex of one authoritative zone (the cluster domain or the clusterset domain).
struct ZoneApex {
    /// Lowercase wire form.
    var name: [UInt8]
    var soa: DNSSOA
    var nameServer: [UInt8]
}

/// An immutable, fully built service zone. Build one off to the side and hand it to a
/// ``DNSZoneStore``: queries never see a half-built zone.
public final class DNSZone: Sendable {
    /// Owner names → node numbers in ``nodeList``.
    let index: ZoneNameIndex
    let nodeList: [ZoneNode]
    let apexes: [ZoneApex]
    /// Lowercase wire form of `svc.<domain>`: a name that has it followed by more labels is a
    /// search-list expansion that cannot exist.
    let svcSuffix: [UInt8]
    public let ttl: UInt32
    public let negativeTTL: UInt32
    public let serial: UInt32
    /// Services or endpoints left out because a name did not make a valid DNS label.
    public let problems: [String]

    /// Number of owner names (including empty non-terminals).
    public var nameCount: Int { self.nodeList.count }

    /// The node of an owner name (lowercase wire form).
    @inline(__always)
    func node(_ key: [UInt8]) -> ZoneNode? {
        guard let i = self.index.find(key) else { return nil }
        return self.nodeList[i]
    }

    /// Builds the zone. Names are compared case-insensitively; invalid names are skipped and listed
    /// in ``problems``.
    public init(_ input: ZoneInput, serial: UInt32 = 1) throws(DNSWireError) {
        var b = ZoneBuilder(ttl: input.ttl)
        let domain = try DNSName(input.domain).lowercased
        let clusterset = try DNSName(input.clustersetDomain).lowercased
        let ttl = input.ttl
        var apexes: [ZoneApex] = []
        for apexName in [domain, clusterset] {
            let ns = try DNSName("ns.dns." + String(apexName.description.dropLast())).lowercased
            let hostmaster = try DNSName("hostmaster." + String(apexName.description.dropLast())).lowercased
            let soa = DNSSOA(
                mname: ns,
                rname: hostmaster,
                serial: serial,
                refresh: 7200,
                retry: 1800,
                expire: 86400,
                minimum: input.negativeTTL
            )
            b.nodes[apexName.wire, default: ZoneNode()].apex = apexes.count
            apexes.append(ZoneApex(name: apexName.wire, soa: soa, nameServer: ns.wire))
        }
        // Schema version (Kubernetes DNS spec §2.2).
        let versionName = try DNSName("dns-version." + input.domain).lowercased
        b.nodes[versionName.wire, default: ZoneNode()].txt.append([5] + Array("1.1.0".utf8))

        for service in input.services {
            do {
                try b.add(service, domain: domain, clusterset: clusterset)
            } catch {
                b.problems.append("\(service.namespace)/\(service.name): \(error)")
            }
        }
        // Empty non-terminals: every ancestor of an owner name, up to its apex, exists.
        let apexSet = Set(apexes.map(\.name))
        for key in Array(b.nodes.keys) where apexes.contains(where: { isSuffix($0.name, of: key) }) {
            var k = key
            while k.count > 1, !apexSet.contains(k) {
                k.removeSubrange(0...Int(k[0]))
                if b.nodes[k] != nil { break }
                if k.count <= 1 { break }
                b.nodes[k] = ZoneNode()
            }
        }
        var names: [[UInt8]] = []
        var list: [ZoneNode] = []
        names.reserveCapacity(b.nodes.count)
        list.reserveCapacity(b.nodes.count)
        for (name, node) in b.nodes {
            names.append(name)
            list.append(node)
        }
        self.index = ZoneNameIndex(names)
        self.nodeList = list
        self.apexes = apexes
        self.svcSuffix = [3] + Array("svc".utf8) + domain.wire
        self.ttl = ttl
        self.negativeTTL = input.negativeTTL
        self.serial = serial
        self.problems = b.problems
    }

    /// The records the zone holds for a name and type, in presentation-independent form (for tests
    /// and tools; the responder answers from the zone directly). `nil` when the name does not exist.
    public func records(for name: DNSName, type: DNSType) -> [DNSRecord]? {
        guard let node = self.node(name.lowercased.wire) else { return nil }
        var out: [DNSRecord] = []
        let owner = name
        if type == .a || type == .any {
            for v in node.v4 { out.append(DNSRecord(name: owner, ttl: self.ttl, data: .a(.v4(v)))) }
        }
        if type == .aaaa || type == .any {
            for v in node.v6 { out.append(DNSRecord(name: owner, ttl: self.ttl, data: .aaaa(v))) }
        }
        if type == .srv || type == .any {
            for s in node.srv {
                out.append(
                    DNSRecord(
                        name: owner,
                        ttl: self.ttl,
                        data: .srv(
                            priority: s.priority,
                            weight: s.weight,
                            port: s.port,
                            target: DNSName(uncheckedWire: s.target)
                        )
                    )
                )
            }
        }
        if type == .ptr || type == .any {
            for p in node.ptr {
                out.append(DNSRecord(name: owner, ttl: self.ttl, data: .ptr(DNSName(uncheckedWire: p))))
            }
        }
        if type == .txt || type == .any {
            for t in node.txt {
                var strings: [[UInt8]] = []
                var i = 0
                while i < t.count {
                    let n = Int(t[i])
                    strings.append(Array(t[(i + 1)..<(i + 1 + n)]))
                    i += 1 + n
                }
                out.append(DNSRecord(name: owner, ttl: self.ttl, data: .txt(strings)))
            }
        }
        if let c = node.cname, type == .cname || type == .any || out.isEmpty {
            out.append(DNSRecord(name: owner, ttl: self.ttl, data: .cname(DNSName(uncheckedWire: c))))
        }
        if node.apex >= 0 {
            let apex = self.apexes[node.apex]
            if type == .soa || type == .any {
                out.append(DNSRecord(name: owner, ttl: self.ttl, data: .soa(apex.soa)))
            }
            if type == .ns || type == .any {
                out.append(DNSRecord(name: owner, ttl: self.ttl, data: .ns(DNSName(uncheckedWire: apex.nameServer))))
            }
        }
        return out
    }
}

/// Collects nodes while a zone is built.
private struct ZoneBuilder {
    var nodes: [[UInt8]: ZoneNode] = [:]
    var problems: [String] = []
    let ttl: UInt32

    init(ttl: UInt32) {
        self.ttl = ttl
        self.nodes.reserveCapacity(1024)
    }

    mutating func add(_ s: DNSService, domain: DNSName, clusterset: DNSName) throws {
        let svc = try label(s.name)
        let ns = try label(s.namespace)
        let base = svc + ns + [3] + Array("svc".utf8)
        let clusterName = base + domain.wire
        self.addRecords(s, owner: clusterName, svcLabel: svc, withPTR: true)
        if s.exported {
            self.addRecords(s, owner: base + clusterset.wire, svcLabel: svc, withPTR: false)
        }
    }

    private mutating func addRecords(_ s: DNSService, owner: [UInt8], svcLabel: [UInt8], withPTR: Bool) {
        if let ext = s.externalName {
            guard let target = try? DNSName(ext).lowercased else {
                self.problems.append("\(s.namespace)/\(s.name): invalid externalName \(ext)")
                return
            }
            self.nodes[owner, default: ZoneNode()].cname = target.wire
            return
        }
        let namedPorts: [(label: [UInt8], DNSServicePort)] = s.ports.compactMap { p in
            guard !p.name.isEmpty, let l = try? label("_" + p.name) else { return nil }
            return (l, p)
        }
        if !s.isHeadless {
            var node = self.nodes[owner] ?? ZoneNode()
            for ip in s.clusterIPs {
                switch ip {
                case .v4(let v): if !node.v4.contains(v) { node.v4.append(v) }
                case .v6: if !node.v6.contains(ip) { node.v6.append(ip) }
                }
                if withPTR, let rev = try? DNSName(ip.reverseName).lowercased {
                    self.nodes[rev.wire, default: ZoneNode()].ptr.append(owner)
                }
            }
            self.nodes[owner] = node
            for (portLabel, p) in namedPorts {
                let name = portLabel + protoLabel(p.transportProtocol) + owner
                self.nodes[name, default: ZoneNode()].srv.append(
                    ZoneSRV(priority: 0, weight: 100, port: p.port, target: owner)
                )
            }
            return
        }
        // Headless: the ready endpoints (no ready endpoint: the name does not exist).
        let ready = s.endpoints.filter(\.ready)
        guard !ready.isEmpty else { return }
        var node = self.nodes[owner] ?? ZoneNode()
        var hosts: [[UInt8]] = []
        for ep in ready {
            switch ep.ip {
            case .v4(let v): node.v4.append(v)
            case .v6: node.v6.append(ep.ip)
            }
            let hostLabel: [UInt8]
            if let h = ep.hostname, !h.isEmpty, let l = try? label(h) {
                hostLabel = l
            } else {
                if let h = ep.hostname, !h.isEmpty {
                    self.problems.append("\(s.namespace)/\(s.name): invalid endpoint hostname \(h)")
                }
                hostLabel = dashedLabel(ep.ip)
            }
            let hostName = hostLabel + owner
            var hostNode = self.nodes[hostName] ?? ZoneNode()
            switch ep.ip {
            case .v4(let v): if !hostNode.v4.contains(v) { hostNode.v4.append(v) }
            case .v6: if !hostNode.v6.contains(ep.ip) { hostNode.v6.append(ep.ip) }
            }
            self.nodes[hostName] = hostNode
            if !hosts.contains(hostName) { hosts.append(hostName) }
            if withPTR, let rev = try? DNSName(ep.ip.reverseName).lowercased {
                self.nodes[rev.wire, default: ZoneNode()].ptr.append(hostName)
            }
        }
        self.nodes[owner] = node
        let weight = UInt16(max(1, 100 / max(1, hosts.count)))
        for (portLabel, p) in namedPorts {
            let name = portLabel + protoLabel(p.transportProtocol) + owner
            var srvNode = self.nodes[name] ?? ZoneNode()
            for h in hosts {
                srvNode.srv.append(ZoneSRV(priority: 0, weight: weight, port: p.port, target: h))
            }
            self.nodes[name] = srvNode
        }
    }
}

/// True when wire name `suffix` is `name` or an ancestor of it (both lowercase wire form).
func isSuffix(_ suffix: [UInt8], of name: [UInt8]) -> Bool {
    guard suffix.count <= name.count else { return false }
    return name.withUnsafeBufferPointer { n in
        suffix.withUnsafeBufferPointer { s in
            var i = 0
            while n.count - i > s.count {
                if n[i] == 0 { return false }
                i += 1 + Int(n[i])
            }
            guard n.count - i == s.count else { return false }
            return s.isEmpty || memcmp(n.baseAddress! + i, s.baseAddress!, s.count) == 0
        }
    }
}

/// One lowercase label in wire form (length byte + bytes).
private func label(_ text: String) throws -> [UInt8] {
    let bytes = Array(text.utf8).map(asciiLower)
    guard !bytes.isEmpty, bytes.count <= 63, !bytes.contains(UInt8(ascii: ".")) else {
        throw DNSWireError.invalidName
    }
    return [UInt8(bytes.count)] + bytes
}

private func protoLabel(_ p: DNSServicePort.TransportProtocol) -> [UInt8] {
    let text = "_" + p.rawValue
    return [UInt8(text.utf8.count)] + Array(text.utf8)
}

/// `10-0-0-7` for 10.0.0.7, `fd00--7` for fd00::7 (the address with separators as dashes).
private func dashedLabel(_ ip: IPAddress) -> [UInt8] {
    let text = ip.description.map { $0 == "." || $0 == ":" ? "-" : $0 }
    let bytes = Array(String(text).utf8)
    return [UInt8(bytes.count)] + bytes
}

/// Holds the zone the responder answers from. ``replace(_:)`` swaps a fully built zone in
/// atomically; readers take a reference under a short lock and keep using it.
public final class DNSZoneStore: Sendable {
    private let current: Mutex<DNSZone>

    public init(_ zone: DNSZone) {
        self.current = Mutex(zone)
    }

    /// An empty zone for the default domain.
    public convenience init() {
        // The default input always builds: its names are valid.
        self.init(try! DNSZone(ZoneInput()))
    }

    /// The zone in service now.
    public var zone: DNSZone { self.current.withLock { $0 } }

    /// Swaps in a zone built elsewhere.
    public func replace(_ zone: DNSZone) {
        self.current.withLock { $0 = zone }
    }

    /// Builds a zone from `input` (outside the lock) with the next serial and swaps it in.
    @discardableResult
    public func update(_ input: ZoneInput) throws(DNSWireError) -> DNSZone {
        let zone = try DNSZone(input, serial: self.zone.serial &+ 1)
        self.replace(zone)
        return zone
    }
}
