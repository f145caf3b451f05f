import MeshCore

extension RelaySessionMessage {
    /// The frame's bytes. Throws `unencodable` for a name that is not a DNS-1123 subdomain or a
    /// message over `maxPayload` bytes.
    public func encode() throws(RelaySessionWireError) -> [UInt8] {
        var payload: [UInt8] = []
        switch self {
        case .hello(let version, let node):
            payload.append(version)
            try Self.put(name: node, into: &payload)
        case .welcome(let relay, let keepalive):
            try Self.put(name: relay, into: &payload)
            Self.put(keepalive, into: &payload)
        case .ping(let value), .pong(let value):
            Self.put(value, into: &payload)
        case .connect(let node):
            try Self.put(name: node, into: &payload)
        case .open(let circuit, let from):
            Self.put(circuit, into: &payload)
            try Self.put(name: from, into: &payload)
        case .accept(let circuit), .ready(let circuit):
            Self.put(circuit, into: &payload)
        case .forward(let from, let to):
            try Self.put(name: from, into: &payload)
            try Self.put(name: to, into: &payload)
        case .refused(let reason, let message):
            payload.append(reason.code)
            try Self.put(text: message, what: "a refusal's text", into: &payload)
        case .punchOffer(let c), .punchAnswer(let c):
            try Self.put(c, into: &payload)
        case .punchStart(let s):
            Self.put(s.id, into: &payload)
            payload.append(s.mode.rawValue)
            Self.put(s.delayMillis, into: &payload)
            Self.put(UInt16(s.rttMicros >> 16), into: &payload)
            Self.put(UInt16(s.rttMicros & 0xFFFF), into: &payload)
            Self.put(s.staggerMillis, into: &payload)
            payload.append(s.answererFirst ? 1 : 0)
        case .punchResult(let id, let ok, let message):
            Self.put(id, into: &payload)
            payload.append(ok ? 1 : 0)
            try Self.put(text: message, what: "a punch result's text", into: &payload)
        }
        guard payload.count <= Self.maxPayload else {
            throw RelaySessionWireError(
                .unencodable,
                at: 0,
                "a payload of \(payload.count) bytes is over \(Self.maxPayload)"
            )
        }
        return [self.kind.rawValue, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)] + payload
    }

    /// Decodes the frame at the start of `bytes`: the message and the frame's length, or nil when
    /// `bytes` holds only part of a frame (read more). Bytes after the frame are not looked at.
    public static func decode(_ bytes: [UInt8]) throws(RelaySessionWireError) -> (message: Self, length: Int)? {
        guard let first = bytes.first else { return nil }
        guard let kind = Kind(rawValue: first) else {
            throw RelaySessionWireError(
                .unknownType,
                at: 0,
                "type 0x\(String(first, radix: 16)) is no relay session message"
            )
        }
        guard bytes.count >= Self.headerSize else { return nil }
        let length = Int(bytes[1]) << 8 | Int(bytes[2])
        guard length <= Self.maxPayload else {
            throw RelaySessionWireError(.tooLong, at: 1, "a payload of \(length) bytes is over \(Self.maxPayload)")
        }
        guard bytes.count >= Self.headerSize + length else { return nil }
        var r = Reader(bytes: bytes, at: Self.headerSize, end: Self.headerSize + length)
        let message: Self
        switch kind {
        case .hello:
            let version = try r.byte()
            message = .hello(version: version, node: try r.name())
        case .welcome:
            let relay = try r.name()
            message = .welcome(relay: relay, keepaliveSeconds: try r.u16())
        case .ping: message = .ping(try r.u64())
        case .pong: message = .pong(try r.u64())
        case .connect: message = .connect(node: try r.name())
        case .open:
            let circuit = try r.u64()
            message = .open(circuit: circuit, from: try r.name())
        case .accept: message = .accept(circuit: try r.u64())
        case .ready: message = .ready(circuit: try r.u64())
        case .forward:
            let from = try r.name()
            message = .forward(from: from, to: try r.name())
        case .refused:
            let code = try r.byte()
            message = .refused(RelayRefusal(code: code), message: try r.text())
        case .punchOffer: message = .punchOffer(try r.candidates())
        case .punchAnswer: message = .punchAnswer(try r.candidates())
        case .punchStart:
            let id = try r.u64()
            let at = r.at
            guard let mode = PunchStart.Mode(rawValue: try r.byte()) else {
                throw RelaySessionWireError(.badValue, at: at, "punch mode \(bytes[at]) (1-3)")
            }
            let delay = try r.u16()
            let rtt = UInt32(try r.u16()) << 16 | UInt32(try r.u16())
            let stagger = try r.u16()
            let first = try r.flag("who goes first")
            message = .punchStart(
                PunchStart(
                    id: id,
                    mode: mode,
                    delayMillis: delay,
                    rttMicros: rtt,
                    staggerMillis: stagger,
                    answererFirst: first
                )
            )
        case .punchResult:
            let id = try r.u64()
            let ok = try r.flag("ok")
            message = .punchResult(id: id, ok: ok, message: try r.text())
        }
        guard r.at == r.end else {
            throw RelaySessionWireError(
                .trailingBytes,
                at: r.at,
                "\(r.end - r.at) byte(s) after the last field of \(kind)"
            )
        }
        return (message, r.end)
    }

    static func put(name: String, into payload: inout [UInt8]) throws(RelaySessionWireError) {
        if let e = Names.dns1123SubdomainError(name) {
            throw RelaySessionWireError(.unencodable, at: 0, "name \"\(name)\" \(e)")
        }
        payload.append(UInt8(name.utf8.count))
        payload += Array(name.utf8)
    }

    /// Text that ends the payload: its UTF-8 length (2) and bytes, within what is left of `maxPayload`.
    static func put(text: String, what: String, into payload: inout [UInt8]) throws(RelaySessionWireError) {
        let bytes = Array(text.utf8)
        let limit = Self.maxPayload - payload.count - 2
        guard bytes.count <= limit else {
            throw RelaySessionWireError(.unencodable, at: 0, "\(what) is over \(limit) bytes")
        }
        Self.put(UInt16(bytes.count), into: &payload)
        payload += bytes
    }

    /// id (8), mapping (1), count (1), then each: kind (1), family (1: 4 or 6), address (4 or 16), port (2).
    static func put(_ c: PunchCandidates, into payload: inout [UInt8]) throws(RelaySessionWireError) {
        guard c.candidates.count <= PunchCandidates.maxCandidates else {
            throw RelaySessionWireError(
                .unencodable,
                at: 0,
                "\(c.candidates.count) punch candidates (at most \(PunchCandidates.maxCandidates))"
            )
        }
        Self.put(c.id, into: &payload)
        payload.append(c.mapping.rawValue)
        payload.append(UInt8(c.candidates.count))
        for candidate in c.candidates {
            payload.append(candidate.kind.rawValue)
            payload.append(candidate.ip.isIPv4 ? 4 : 6)
            payload += candidate.ip.bytes
            Self.put(candidate.port, into: &payload)
        }
    }

    static func put(_ v: UInt16, into payload: inout [UInt8]) {
        payload += [UInt8(v >> 8), UInt8(v & 0xFF)]
    }

    static func put(_ v: UInt64, into payload: inout [UInt8]) {
        for shift in stride(from: 56, through: 0, by: -8) { payload.append(UInt8((v >> UInt64(shift)) & 0xFF)) }
    }

    struct Reader {
        let bytes: [UInt8]
        var at: Int
        let end: Int

        mutating func take(_ n: Int, _ what: String) throws(RelaySessionWireError) -> ArraySlice<UInt8> {
            guard self.end - self.at >= n else {
                throw RelaySessionWireError(.truncated, at: self.at, "the payload ends inside \(what)")
            }
            defer { self.at += n }
            return self.bytes[self.at..<self.at + n]
        }

        mutating func byte() throws(RelaySessionWireError) -> UInt8 { try self.take(1, "a byte field").first! }

        mutating func u16() throws(RelaySessionWireError) -> UInt16 {
            try self.take(2, "a 2-byte field").reduce(0) { $0 << 8 | UInt16($1) }
        }

        mutating func u64() throws(RelaySessionWireError) -> UInt64 {
            try self.take(8, "an 8-byte field").reduce(0) { $0 << 8 | UInt64($1) }
        }

        mutating func name() throws(RelaySessionWireError) -> String {
            let start = self.at
            let count = Int(try self.take(1, "a name's length").first!)
            let raw = try self.take(count, "a name")
            guard let name = String(validating: raw, as: UTF8.self), Names.dns1123SubdomainError(name) == nil else {
                throw RelaySessionWireError(
                    .badName,
                    at: start,
                    "a name must be a DNS-1123 subdomain (a-z, 0-9, - and .)"
                )
            }
            return name
        }

        mutating func flag(_ what: String) throws(RelaySessionWireError) -> Bool {
            let at = self.at
            switch try self.byte() {
            case 0: return false
            case 1: return true
            case let b: throw RelaySessionWireError(.badValue, at: at, "\(what): \(b) (0 or 1)")
            }
        }

        mutating func candidates() throws(RelaySessionWireError) -> PunchCandidates {
            let id = try self.u64()
            let mappingAt = self.at
            let rawMapping = try self.byte()
            guard let mapping = NATMapping(rawValue: rawMapping) else {
                throw RelaySessionWireError(.badValue, at: mappingAt, "NAT mapping \(rawMapping) (0-5)")
            }
            let countAt = self.at
            let count = Int(try self.byte())
            guard count <= PunchCandidates.maxCandidates else {
                throw RelaySessionWireError(
                    .badValue,
                    at: countAt,
                    "\(count) punch candidates (at most \(PunchCandidates.maxCandidates))"
                )
            }
            var list: [PunchCandidate] = []
            for _ in 0..<count {
                let kindAt = self.at
                let rawKind = try self.byte()
                guard let kind = PunchCandidate.Kind(rawValue: rawKind) else {
                    throw RelaySessionWireError(.badValue, at: kindAt, "candidate kind \(rawKind) (1 or 2)")
                }
                let familyAt = self.at
                let family = try self.byte()
                guard family == 4 || family == 6 else {
                    throw RelaySessionWireError(.badValue, at: familyAt, "address family \(family) (4 or 6)")
                }
                let raw = try self.take(family == 4 ? 4 : 16, "an address")
                let ip = IPAddress(bytes: raw)!
                list.append(PunchCandidate(kind: kind, ip: ip, port: try self.u16()))
            }
            return PunchCandidates(id: id, mapping: mapping, candidates: list)
        }

        mutating func text() throws(RelaySessionWireError) -> String {
            let start = self.at
            let count = Int(try self.u16())
            let raw = try self.take(count, "a text")
            guard let text = String(validating: raw, as: UTF8.self) else {
                throw RelaySessionWireError(.badText, at: start, "a text that is not UTF-8")
            }
            return text
        }
    }
}
