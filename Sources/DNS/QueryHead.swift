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
    /// Where the question's name ends (it starts at 12).
    var nameEnd: Int
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

    /// Parses `query`; the question's name goes into `key` in lowercase wire form. (It is `query[12..<nameEnd]`
    /// as asked: a question name is never compressed, as a pointer in the first name of a message can
    /// only point into the header.)
    static func parse(_ query: UnsafeRawBufferPointer, key: inout [UInt8]) -> Parsed {
        var r = WireReader(query)
        guard let (id, flags, counts) = try? DNSWireCounts.read(&r) else { return .notAQuery }
        guard flags & 0x8000 == 0 else { return .notAQuery }
        guard (flags >> 11) & 0x0F == 0 else { return .notImplemented(id: id, flags: flags) }
        guard counts.questions == 1 else { return .malformed(id: id, flags: flags) }
        do throws(DNSWireError) {
            try r.readQuestionName(lowercasedInto: &key)
            let nameEnd = r.position
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
                DNSQueryHead(
                    id: id,
                    flags: flags,
                    qtype: qtype,
                    qclass: qclass,
                    nameEnd: nameEnd,
                    questionEnd: questionEnd,
                    edns: edns
                )
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

extension WireReader {
    /// Reads the first name of a message, which has nothing before it to point to: labels only, 255 bytes
    /// at most; a pointer is malformed. `out` gets it in lowercase (uncompressed wire form).
    mutating func readQuestionName(lowercasedInto out: inout [UInt8]) throws(DNSWireError) {
        let start = self.position
        let count = self.bytes.count
        var p = start
        while true {
            guard p < count else { throw .truncated }
            let len = Int(self.bytes[p])
            if len == 0 { break }
            switch len & 0xC0 {
            case 0x00:
                guard p + 1 + len <= count else { throw .truncated }
                p += 1 + len
                guard p - start + 1 <= 255 else { throw .nameTooLong }
            case 0xC0:
                throw .pointerIntoHeader
            default:
                throw .labelTooLong
            }
        }
        p += 1
        out.removeAll(keepingCapacity: true)
        out.append(contentsOf: UnsafeRawBufferPointer(rebasing: self.bytes[start..<p]))
        // Length bytes (at most 63) are below "A", so lowering every byte leaves them alone.
        out.withUnsafeMutableBufferPointer { b in
            for i in b.indices { b[i] = asciiLower(b[i]) }
        }
        self.position = p
    }
}
