import MeshCore

/// What the answer path needs of a query, read by the codec in one pass with nothing allocated: the
/// header, the one question (its name into the caller's buffer) and the EDNS OPT record; the other
/// records are checked and skipped. `DNSMessage.decode` reads the header counts and the OPT record with
/// the same functions (``DNSWireCounts/read(_:)``, ``DNSEDNS/read(_:name:rclass:ttl:end:keepOptions:)``).
struct DNSQueryHead {
    var id: UInt16
    /// The flag bits as they came (RD and CD are echoed).
    var flags: UInt16
    var qtype: DNSType
    var qclass: UInt16
    /// Where the question ends: the response echoes the query's bytes up to here.
    var questionEnd: Int
    var edns: DNSEDNS?

    /// What a datagram turned out to be.
    enum Parsed {
        /// Shorter than a header, or itself a response: never answered (no reflection loops).
        case notAQuery
        /// An opcode other than QUERY: NOTIMP.
        case notImplemented(id: UInt16, flags: UInt16)
        /// Not exactly one question, a malformed section, a misplaced OPT, or a question of type OPT:
        /// FORMERR.
        case malformed(id: UInt16, flags: UInt16)
        case query(DNSQueryHead)
    }

    /// Parses `query`; the question's name (uncompressed wire form, case kept) goes into `name`.
    static func parse(_ query: UnsafeRawBufferPointer, name: inout [UInt8]) -> Parsed {
        var r = WireReader(query)
        guard let (id, flags, counts) = try? DNSWireCounts.read(&r) else { return .notAQuery }
        guard flags & 0x8000 == 0 else { return .notAQuery }
        guard (flags >> 11) & 0x0F == 0 else { return .notImplemented(id: id, flags: flags) }
        guard counts.questions == 1 else { return .malformed(id: id, flags: flags) }
        do throws(DNSWireError) {
            try r.readName(into: &name)
            let qtype = DNSType(try r.readU16())
            let qclass = try r.readU16()
            let questionEnd = r.position
            guard (counts.answers + counts.authorities + counts.additionals) * 11 <= r.remaining else {
                throw .countExceedsMessage
            }
            for _ in 0..<(counts.answers + counts.authorities) {
                try r.skipName()
                try r.skip(8)
                try r.skip(Int(try r.readU16()))
            }
            var edns: DNSEDNS?
            for _ in 0..<counts.additionals {
                let isRoot = r.position < query.count && query[r.position] == 0
                try r.skipName()
                let type = DNSType(try r.readU16())
                let rclass = try r.readU16()
                let ttl = try r.readU32()
                let rdlength = Int(try r.readU16())
                guard rdlength <= r.remaining else { throw .truncated }
                let end = r.position + rdlength
                if type == .opt {
                    guard isRoot, edns == nil else { throw .badOPT }
                    edns = try DNSEDNS.read(&r, rclass: rclass, ttl: ttl, end: end, keepOptions: false)
                }
                r.position = end
            }
            guard qtype != .opt else { throw .badOPT }
            return .query(
                DNSQueryHead(id: id, flags: flags, qtype: qtype, qclass: qclass, questionEnd: questionEnd, edns: edns)
            )
        } catch {
            return .malformed(id: id, flags: flags)
        }
    }
}

/// The header's four section counts.
struct DNSWireCounts {
    var questions: Int
    var answers: Int
    var authorities: Int
    var additionals: Int

    /// Reads the 12-byte header: id, flags and the counts.
    static func read(_ r: inout WireReader) throws(DNSWireError) -> (id: UInt16, flags: UInt16, counts: DNSWireCounts) {
        let id = try r.readU16()
        let flags = try r.readU16()
        let counts = DNSWireCounts(
            questions: Int(try r.readU16()),
            answers: Int(try r.readU16()),
            authorities: Int(try r.readU16()),
            additionals: Int(try r.readU16())
        )
        return (id, flags, counts)
    }
}

extension DNSEDNS {
    /// The OPT record's fields (RFC 6891 §6.1.3: the class holds the UDP payload size, the TTL the
    /// extended RCODE, version and DO bit) and its options up to `end`, each checked to fit; the options
    /// are kept only when `keepOptions` (the answer path needs none of them).
    static func read(
        _ r: inout WireReader,
        rclass: UInt16,
        ttl: UInt32,
        end: Int,
        keepOptions: Bool
    ) throws(DNSWireError) -> DNSEDNS {
        var e = DNSEDNS(
            udpPayloadSize: rclass,
            extendedRCode: UInt8(ttl >> 24),
            version: UInt8((ttl >> 16) & 0xFF),
            dnssecOK: ttl & 0x8000 != 0
        )
        while r.position < end {
            guard end - r.position >= 4 else { throw .badRData }
            let code = try r.readU16()
            let len = Int(try r.readU16())
            guard r.position + len <= end else { throw .badRData }
            if keepOptions {
                e.options.append(.init(code: code, data: try r.readBytes(len)))
            } else {
                try r.skip(len)
            }
        }
        return e
    }
}
