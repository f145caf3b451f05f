import MeshCore

/// A route's backends, stored compactly: one array of fixed-size entries (address, port, weight, flags and
/// name numbers, 40 bytes) and each distinct node or site name once per route. A `[Backend]` costs 104 bytes
/// per backend (three optional strings, an enum with a string) plus the array's spare capacity; an agent
/// keeps every route of the mesh, most of them idle (issue 18: 10,000 services with 100,000 endpoints).
///
/// A collection of `Backend` values, built from them and giving them back equal (`port` and `weight` are kept
/// as 32-bit values: larger ones are clamped, which no valid endpoint has). Two lists built from equal backends
/// in the same order are equal.
public struct BackendList: Sendable, Hashable, RandomAccessCollection {
    struct Entry: Sendable, Hashable {
        /// IPv6: the first half of the address; IPv4: 0.
        var high: UInt64
        /// IPv6: the second half; IPv4: the address.
        var low: UInt64
        var port: Int32
        var weight: Int32
        /// 1 + the position of the name in `names`; 0: none.
        var node: UInt32
        var site: UInt32
        /// `.peer(name)`: 1 + the position of `name`; 0: `.direct`.
        var peer: UInt32
        var flags: UInt8

        static let ready: UInt8 = 1
        static let v6: UInt8 = 2
    }

    private var entries: [Entry]
    /// Node, site and peer names, each once, in the order first used.
    private var names: [String]

    public init() {
        self.entries = []
        self.names = []
    }

    public init(_ backends: some Collection<Backend>) {
        var builder = Builder(capacity: backends.count)
        for b in backends { builder.append(b) }
        self = builder.list
    }

    /// Builds a list one backend at a time, with exactly the capacity asked for when the count is known.
    public struct Builder {
        private var entries: [Entry] = []
        private var names: [String] = []
        private var numbers: [String: UInt32] = [:]

        public init(capacity: Int = 0) {
            self.entries.reserveCapacity(capacity)
        }

        public mutating func append(_ b: Backend) {
            let address: (high: UInt64, low: UInt64, v6: Bool)
            switch b.ip {
            case .v4(let v): address = (0, UInt64(v), false)
            case .v6(let hi, let lo): address = (hi, lo, true)
            }
            self.entries.append(
                Entry(
                    high: address.high,
                    low: address.low,
                    port: Int32(clamping: b.port),
                    weight: Int32(clamping: b.weight),
                    node: self.number(b.node),
                    site: self.number(b.site),
                    peer: self.number(b.reach.peer),
                    flags: (b.ready ? Entry.ready : 0) | (address.v6 ? Entry.v6 : 0)
                )
            )
        }

        private mutating func number(_ name: String?) -> UInt32 {
            guard let name else { return 0 }
            if let n = self.numbers[name] { return n }
            self.names.append(name)
            let n = UInt32(self.names.count)
            self.numbers[name] = n
            return n
        }

        /// The list (with no spare capacity in its arrays when the capacity given was the count).
        public var list: BackendList {
            var list = BackendList()
            list.entries = self.entries
            list.names = self.names
            return list
        }
    }

    public var startIndex: Int { 0 }
    public var endIndex: Int { self.entries.count }

    public subscript(position: Int) -> Backend {
        let e = self.entries[position]
        let ip: IPAddress = e.flags & Entry.v6 != 0 ? .v6(e.high, e.low) : .v4(UInt32(truncatingIfNeeded: e.low))
        return Backend(
            ip: ip,
            port: Int(e.port),
            node: self.name(e.node),
            site: self.name(e.site),
            weight: Int(e.weight),
            ready: e.flags & Entry.ready != 0,
            reach: self.name(e.peer).map { Reach.peer($0) } ?? .direct
        )
    }

    private func name(_ number: UInt32) -> String? {
        number == 0 ? nil : self.names[Int(number) - 1]
    }
}
