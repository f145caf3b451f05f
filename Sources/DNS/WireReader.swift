import MeshCore

/// A bounds-checked cursor over one whole DNS message. Every read checks its bounds and throws
/// ``DNSWireError`` instead of trapping; names are decompressed following only backward pointers.
struct WireReader {
    let bytes: UnsafeRawBufferPointer
    var position: Int

    /// More hops than any legitimate name needs (a 255-byte name has at most 127 labels).
    static let maxPointerHops = 127

    init(_ bytes: UnsafeRawBufferPointer, position: Int = 0) {
        self.bytes = bytes
        self.position = position
    }

    var remaining: Int { self.bytes.count - self.position }

    @inline(__always)
    mutating func readU8() throws(DNSWireError) -> UInt8 {
        guard self.position < self.bytes.count else { throw .truncated }
        let v = self.bytes[self.position]
        self.position += 1
        return v
    }

    @inline(__always)
    mutating func readU16() throws(DNSWireError) -> UInt16 {
        guard self.position + 2 <= self.bytes.count else { throw .truncated }
        let v = UInt16(self.bytes[self.position]) << 8 | UInt16(self.bytes[self.position + 1])
        self.position += 2
        return v
    }

    @inline(__always)
    mutating func readU32() throws(DNSWireError) -> UInt32 {
        guard self.position + 4 <= self.bytes.count else { throw .truncated }
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(self.bytes[self.position + i]) }
        self.position += 4
        return v
    }

    mutating func readBytes(_ n: Int) throws(DNSWireError) -> [UInt8] {
        guard n >= 0, self.position + n <= self.bytes.count else { throw .truncated }
        let out = Array(self.bytes[self.position..<(self.position + n)])
        self.position += n
        return out
    }

    mutating func skip(_ n: Int) throws(DNSWireError) {
        guard n >= 0, self.position + n <= self.bytes.count else { throw .truncated }
        self.position += n
    }

    /// Reads a possibly compressed name into `out` (cleared first) in uncompressed wire form, case kept.
    ///
    /// A pointer must point strictly before the start of the label run that contains it, which makes
    /// every chain of pointers strictly decreasing and so finite; hops are bounded as well.
    @inline(__always)
    mutating func readName(into out: inout [UInt8]) throws(DNSWireError) {
        out.removeAll(keepingCapacity: true)
        var p = self.position
        var runStart = p
        var jumped = false
        var hops = 0
        let count = self.bytes.count
        while true {
            guard p < count else { throw .truncated }
            let len = Int(self.bytes[p])
            if len == 0 {
                out.append(0)
                if !jumped { self.position = p + 1 }
                return
            }
            switch len & 0xC0 {
            case 0x00:
                guard p + 1 + len <= count else { throw .truncated }
                guard out.count + len + 2 <= 255 else { throw .nameTooLong }
                out.append(UInt8(len))
                out.append(contentsOf: UnsafeRawBufferPointer(rebasing: self.bytes[(p + 1)..<(p + 1 + len)]))
                p += 1 + len
            case 0xC0:
                guard p + 2 <= count else { throw .truncated }
                let target = (len & 0x3F) << 8 | Int(self.bytes[p + 1])
                if target >= p { throw .forwardPointer }
                if target >= runStart { throw .pointerLoop }
                if target < 12 { throw .pointerIntoHeader }
                hops += 1
                if hops > WireReader.maxPointerHops { throw .pointerLoop }
                if !jumped {
                    self.position = p + 2
                    jumped = true
                }
                runStart = target
                p = target
            default:
                throw .labelTooLong
            }
        }
    }

    mutating func readName() throws(DNSWireError) -> DNSName {
        var out: [UInt8] = []
        out.reserveCapacity(64)
        try self.readName(into: &out)
        return DNSName(uncheckedWire: out)
    }

    /// Skips a name without decompressing it (the pointer is not followed, only its two bytes).
    mutating func skipName() throws(DNSWireError) {
        var p = self.position
        var total = 0
        let count = self.bytes.count
        while true {
            guard p < count else { throw .truncated }
            let len = Int(self.bytes[p])
            if len == 0 {
                self.position = p + 1
                return
            }
            switch len & 0xC0 {
            case 0x00:
                total += len + 1
                guard total < 255 else { throw .nameTooLong }
                p += 1 + len
            case 0xC0:
                guard p + 2 <= count else { throw .truncated }
                self.position = p + 2
                return
            default:
                throw .labelTooLong
            }
        }
    }
}

extension DNSMessage {
    /// Decodes one whole message. Throws ``DNSWireError`` for anything malformed; trailing bytes after
    /// the last section are ignored.
    public static func decode(_ bytes: some Collection<UInt8>) throws(DNSWireError) -> DNSMessage {
        let array = Array(bytes)
        do {
            return try array.withUnsafeBytes { raw in
                var r = WireReader(raw)
                return try DNSMessage.decode(from: &r)
            }
        } catch let e as DNSWireError {
            throw e
        } catch {
            throw .truncated  // unreachable: only DNSWireError is thrown above
        }
    }

    static func decode(from r: inout WireReader) throws(DNSWireError) -> DNSMessage {
        var msg = DNSMessage()
        let (id, flags, counts) = try DNSWireCounts.read(&r)
        msg.header.id = id
        msg.header.flags = flags
        let (qd, an, ns, ar) = (counts.questions, counts.answers, counts.authorities, counts.additionals)
        // A question takes at least 5 bytes, a record at least 11: refuse impossible counts before
        // reserving anything for them.
        guard qd * 5 + (an + ns + ar) * 11 <= r.remaining else { throw .countExceedsMessage }
        msg.questions.reserveCapacity(qd)
        for _ in 0..<qd {
            let name = try r.readName()
            let type = DNSType(try r.readU16())
            let qclass = try r.readU16()
            msg.questions.append(DNSQuestion(name: name, type: type, qclass: qclass))
        }
        msg.answers = try decodeSection(&r, count: an, edns: nil)
        msg.authorities = try decodeSection(&r, count: ns, edns: nil)
        var edns: DNSEDNS? = nil
        msg.additionals = try decodeSection(&r, count: ar, edns: &edns)
        msg.edns = edns
        return msg
    }

    private static func decodeSection(
        _ r: inout WireReader,
        count: Int,
        edns: UnsafeMutablePointer<DNSEDNS?>?
    )
        throws(DNSWireError) -> [DNSRecord]
    {
        var out: [DNSRecord] = []
        out.reserveCapacity(count)
        for _ in 0..<count {
            let name = try r.readName()
            let type = DNSType(try r.readU16())
            let rclass = try r.readU16()
            let ttl = try r.readU32()
            let rdlength = Int(try r.readU16())
            guard rdlength <= r.remaining else { throw .truncated }
            let end = r.position + rdlength
            if type == .opt {
                guard let edns, edns.pointee == nil, name.wire == [0] else { throw .badOPT }
                edns.pointee = try DNSEDNS.read(&r, rclass: rclass, ttl: ttl, end: end, keepOptions: true)
                continue
            }
            let data = try decodeRData(&r, type: type, end: end)
            out.append(DNSRecord(name: name, type: type, rclass: rclass, ttl: ttl, data: data))
        }
        return out
    }

    private static func decodeRData(_ r: inout WireReader, type: DNSType, end: Int) throws(DNSWireError) -> DNSRData {
        let start = r.position
        let length = end - start
        // Names inside RDATA must not run past it: read them from a reader that ends there.
        var sub = WireReader(UnsafeRawBufferPointer(rebasing: r.bytes[0..<end]), position: start)
        let data: DNSRData
        switch type {
        case .a:
            guard length == 4 else { throw .badRData }
            data = .a(IPAddress(bytes: try sub.readBytes(4))!)
        case .aaaa:
            guard length == 16 else { throw .badRData }
            data = .aaaa(IPAddress(bytes: try sub.readBytes(16))!)
        case .ns:
            data = .ns(try sub.readNameInRData())
        case .cname:
            data = .cname(try sub.readNameInRData())
        case .ptr:
            data = .ptr(try sub.readNameInRData())
        case .mx:
            let pref = try sub.readU16InRData()
            data = .mx(preference: pref, exchange: try sub.readNameInRData())
        case .soa:
            let mname = try sub.readNameInRData()
            let rname = try sub.readNameInRData()
            var v: [UInt32] = []
            for _ in 0..<5 {
                guard sub.remaining >= 4 else { throw .badRData }
                v.append(try sub.readU32())
            }
            data = .soa(
                DNSSOA(
                    mname: mname,
                    rname: rname,
                    serial: v[0],
                    refresh: v[1],
                    retry: v[2],
                    expire: v[3],
                    minimum: v[4]
                )
            )
        case .txt:
            var strings: [[UInt8]] = []
            while sub.position < end {
                let n = Int(try sub.readU8())
                guard sub.remaining >= n else { throw .badRData }
                strings.append(try sub.readBytes(n))
            }
            guard length > 0 else { throw .badRData }
            data = .txt(strings)
        case .srv:
            let priority = try sub.readU16InRData()
            let weight = try sub.readU16InRData()
            let port = try sub.readU16InRData()
            data = .srv(priority: priority, weight: weight, port: port, target: try sub.readNameInRData())
        default:
            data = .opaque(try sub.readBytes(length))
        }
        guard sub.position == end else { throw .badRData }
        r.position = end
        return data
    }
}

extension WireReader {
    /// A name inside RDATA: running out of RDATA is bad RDATA, not a truncated message.
    fileprivate mutating func readNameInRData() throws(DNSWireError) -> DNSName {
        do {
            return try self.readName()
        } catch .truncated {
            throw .badRData
        }
    }

    fileprivate mutating func readU16InRData() throws(DNSWireError) -> UInt16 {
        guard self.remaining >= 2 else { throw .badRData }
        return try self.readU16()
    }
}
