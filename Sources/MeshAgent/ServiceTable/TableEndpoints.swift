import MeshCore

/// What the agent's table keeps of an Endpoints object (issue 18): its resourceVersion and its addresses as one
/// array of 40-byte entries. Each entry holds the address already parsed (two words), its weight and ready flag,
/// and numbers into the object's own lists of strings (node, site, hostname) and of port lists, where each
/// distinct one is stored once.
///
/// As decoded, an `EndpointAddress` is 88 bytes inline (the address as text, a port array and three optional
/// strings), and the table's copy of a 100,000-address mesh was ~9.7 MB of them; these entries are 4 MB. The zone
/// and the routes are built from the entries straight (no address is parsed again at every rebuild); the API's
/// form is made on demand (`addresses`, or an element's `endpointAddress`) for the few readers that want it.
public struct TableEndpoints: Sendable, Equatable, RandomAccessCollection {
    /// The object's resourceVersion (its name and namespace are the table's key).
    public var resourceVersion: String?
    private var entries: [Entry]
    /// Node, site and hostname strings, and addresses that did not parse, each distinct one once.
    private(set) var names: [String]
    /// The distinct port lists (in the common case every address has the same one).
    private(set) var portLists: [[EndpointPort]]

    struct Entry: Equatable {
        /// IPv4: 0 and the address; IPv6: the two big-endian halves; unparsed: 0 and the text's number in `names`.
        var high: UInt64
        var low: UInt64
        var ports: UInt32
        /// Numbers in `names`, plus one; 0 is none.
        var node: UInt32
        var site: UInt32
        var hostname: UInt32
        /// 0 is unset (the API's default, 1).
        var weight: UInt16
        var flags: UInt8

        static let v6: UInt8 = 1
        static let readySet: UInt8 = 2
        static let ready: UInt8 = 4
        static let unparsed: UInt8 = 8
    }

    public init() {
        self.entries = []
        self.names = []
        self.portLists = []
    }

    public init(_ endpoints: Endpoints) {
        self.resourceVersion = endpoints.metadata.resourceVersion
        var builder = Builder()
        self.entries = endpoints.spec.addresses.map { builder.entry($0) }
        self.names = builder.names
        self.portLists = builder.portLists
    }

    private struct Builder {
        var names: [String] = []
        var portLists: [[EndpointPort]] = []
        var nameNumbers: [String: UInt32] = [:]

        mutating func number(_ name: String?) -> UInt32 {
            guard let name else { return 0 }
            if let n = self.nameNumbers[name] { return n }
            self.names.append(name)
            let n = UInt32(self.names.count)
            self.nameNumbers[name] = n
            return n
        }

        mutating func entry(_ a: EndpointAddress) -> Entry {
            let ports: UInt32
            if let i = self.portLists.firstIndex(of: a.ports) {
                ports = UInt32(i)
            } else {
                ports = UInt32(self.portLists.count)
                self.portLists.append(a.ports)
            }
            var flags: UInt8 = 0
            if let ready = a.ready { flags |= Entry.readySet | (ready ? Entry.ready : 0) }
            var high: UInt64 = 0
            var low: UInt64 = 0
            switch IPAddress(a.ip) {
            case .v4(let v)?: low = UInt64(v)
            case .v6(let h, let l)?:
                (high, low) = (h, l)
                flags |= Entry.v6
            case nil:
                low = UInt64(self.number(a.ip))
                flags |= Entry.unparsed
            }
            return Entry(
                high: high,
                low: low,
                ports: ports,
                node: self.number(a.node),
                site: self.number(a.site),
                hostname: self.number(a.hostname),
                // The API admits 1-1000; a weight outside 1-65535 (never admitted) is kept clamped, not wrapped.
                weight: a.weight.map { UInt16(clamping: Swift.max($0, 1)) } ?? 0,
                flags: flags
            )
        }
    }

    /// One address of the object, read from its entry.
    public struct Address: Sendable {
        /// The address; nil when its text did not parse (the control plane admits only addresses).
        public var address: IPAddress?
        public var ports: [EndpointPort]
        public var node: String?
        public var site: String?
        public var weight: Int?
        public var ready: Bool?
        public var hostname: String?
        /// The text of an address that did not parse.
        var unparsed: String?

        public var isReady: Bool { self.ready ?? true }
        public var effectiveWeight: Int { self.weight ?? 1 }

        /// The API's form (the address as canonical text).
        public var endpointAddress: EndpointAddress {
            EndpointAddress(
                ip: self.address.map { "\($0)" } ?? self.unparsed ?? "",
                ports: self.ports,
                node: self.node,
                site: self.site,
                weight: self.weight,
                ready: self.ready,
                hostname: self.hostname
            )
        }
    }

    public var startIndex: Int { 0 }
    public var endIndex: Int { self.entries.count }

    public subscript(position: Int) -> Address {
        let e = self.entries[position]
        let address: IPAddress?
        var unparsed: String?
        if e.flags & Entry.unparsed != 0 {
            address = nil
            unparsed = self.name(UInt32(truncatingIfNeeded: e.low))
        } else if e.flags & Entry.v6 != 0 {
            address = .v6(e.high, e.low)
        } else {
            address = .v4(UInt32(truncatingIfNeeded: e.low))
        }
        return Address(
            address: address,
            ports: self.portLists[Int(e.ports)],
            node: self.name(e.node),
            site: self.name(e.site),
            weight: e.weight == 0 ? nil : Int(e.weight),
            ready: e.flags & Entry.readySet == 0 ? nil : e.flags & Entry.ready != 0,
            hostname: self.name(e.hostname),
            unparsed: unparsed
        )
    }

    private func name(_ number: UInt32) -> String? {
        number == 0 ? nil : self.names[Int(number) - 1]
    }

    /// The addresses in the API's form.
    public var addresses: [EndpointAddress] { self.map(\.endpointAddress) }
}
