import MeshCore

/// A query that the zone does not answer and that goes to the upstream resolvers.
struct ForwardRequest: Sendable {
    var id: UInt16
    /// The client's flags (RD, CD are echoed).
    var flags: UInt16
    /// The question as the client asked it (case kept).
    var question: DNSQuestion
    /// The client's EDNS record, if it sent one (sets the reply size limit and the DO echo).
    var clientEDNS: DNSEDNS?
    /// For an ExternalName service: the CNAME that heads the answer; upstream is asked for its target.
    var cname: DNSRecord?

    /// The question to send upstream.
    var upstreamQuestion: DNSQuestion {
        guard let cname, case .cname(let target) = cname.data else { return self.question }
        return DNSQuestion(name: target, type: self.question.type, qclass: self.question.qclass)
    }
}

/// What the responder does with one datagram or TCP message.
enum QueryDisposition {
    /// The response is in ``AnswerScratch/response``.
    case reply
    case forward(ForwardRequest)
    /// Not answerable at all (shorter than a header, or itself a response).
    case drop
}

/// The answer path's buffers, reused query after query so answering from the zone allocates nothing.
/// One struct: a caller that keeps it in a class pays one exclusivity check per query (or per batch),
/// not one per field and per byte.
struct AnswerState {
    /// The question name in lowercase wire form: the key the zone is indexed by.
    var key: [UInt8] = []
    var response: [UInt8] = []
    var offsets: [UInt16] = []
    var counts: [UInt8] = []
    /// Set for inputs that were not a well-formed query (FORMERR or dropped).
    var malformed = false
    /// The response code of the last reply.
    var rcode: DNSRCode = .noError
}

/// Per-connection scratch space (an ``AnswerState`` in a class). Used from one thread at a time.
final class AnswerScratch {
    var state = AnswerState()

    /// The last reply's bytes.
    var response: [UInt8] { self.state.response }
    var malformed: Bool { self.state.malformed }
    var rcode: DNSRCode { self.state.rcode }

    init() {
        self.state.key.reserveCapacity(256)
        self.state.response.reserveCapacity(1232)
    }
}

/// Limits and switches of the answer path.
struct AnswerPolicy: Sendable {
    /// Largest UDP response we send, whatever the client offers (RFC 9715-style 1232 by default).
    var maxUDPSize: Int = 1232
    /// Whether names outside the zone are forwarded (otherwise they are REFUSED).
    var forwarding: Bool = true
}

/// The pure answer path: bytes in, disposition (and response bytes) out. No I/O.
enum Answerer {
    static let inAddrArpa: [UInt8] = [7] + Array("in-addr".utf8) + [4] + Array("arpa".utf8) + [0]
    static let ip6Arpa: [UInt8] = [3] + Array("ip6".utf8) + [4] + Array("arpa".utf8) + [0]

    static func answer(
        _ query: UnsafeRawBufferPointer,
        zone: DNSZone,
        overTCP: Bool,
        policy: AnswerPolicy,
        scratch: AnswerScratch
    ) -> QueryDisposition {
        Self.answer(query, zone: zone, overTCP: overTCP, policy: policy, state: &scratch.state)
    }

    static func answer(
        _ query: UnsafeRawBufferPointer,
        zone: DNSZone,
        overTCP: Bool,
        policy: AnswerPolicy,
        state: inout AnswerState
    ) -> QueryDisposition {
        state.malformed = false
        state.rcode = .noError
        let head: DNSQueryHead
        // The question name goes into `state.key` in lowercase: the key the zone is indexed by.
        switch DNSQueryHead.parse(query, key: &state.key) {
        case .notAQuery:
            state.malformed = true
            return .drop
        case .notImplemented(let id, let flags):
            headerOnly(id: id, flags: flags, rcode: .notImp, state: &state)
            return .reply
        case .malformed(let id, let flags):
            state.malformed = true
            headerOnly(id: id, flags: flags, rcode: .formErr, state: &state)
            return .reply
        case .query(let parsed):
            head = parsed
        }
        let key = state.key
        // The question's name as asked (case kept): a question name is never compressed.
        let qname = UnsafeRawBufferPointer(rebasing: query[12..<head.nameEnd])

        let limit = Self.responseLimit(head.edns, overTCP: overTCP, policy: policy)
        var w = WireWriter(taking: &state.response, offsets: &state.offsets, counts: &state.counts)
        defer {
            (state.response, state.offsets, state.counts) = w.takeStorage()
        }
        var out = ResponseBuilder(
            id: head.id,
            flags: head.flags,
            query: query,
            questionEnd: head.questionEnd,
            edns: head.edns,
            maxUDPSize: policy.maxUDPSize
        )
        out.recursionAvailable = policy.forwarding
        out.begin(&w)

        /// Finishes a reply without records.
        func reply(_ rcode: DNSRCode, authoritative: Bool = false) -> QueryDisposition {
            out.finish(&w, rcode: rcode, authoritative: authoritative, limit: limit)
            state.rcode = rcode
            return .reply
        }

        if let rcode = Self.refusal(head) { return reply(rcode) }
        // In one of our zones?
        if let apex = zone.apexes.firstIndex(where: { isSuffix($0.name, of: key) }) {
            return Self.answerInZone(
                head,
                key: key,
                qname: qname,
                apex: apex,
                zone: zone,
                policy: policy,
                limit: limit,
                &out,
                &w,
                &state.rcode
            )
        }
        // A search-list expansion such as `web.shop.svc.cluster.local.example.com`: cannot exist.
        if containsInterior(zone.svcSuffix, in: key) { return reply(.nxDomain) }
        // Reverse names of our VIPs and endpoints; other reverse names fall through to upstream.
        if head.qtype == .ptr || head.qtype == .any,
            isSuffix(inAddrArpa, of: key) || isSuffix(ip6Arpa, of: key),
            let node = zone.node(key), !node.ptr.isEmpty
        {
            _ = out.writeNode(&w, node: node, zone: zone, qtype: .ptr)
            return reply(.noError, authoritative: true)
        }
        guard policy.forwarding else { return reply(.refused) }
        return .forward(Self.forwardRequest(head, name: Array(qname)))
    }

    /// The largest response this client may get, less room for our OPT record: 64 KiB over TCP; over UDP
    /// the client's EDNS size within 512...`maxUDPSize`, or 512 without EDNS.
    static func responseLimit(_ edns: DNSEDNS?, overTCP: Bool, policy: AnswerPolicy) -> Int {
        let limit: Int
        if overTCP {
            limit = 65535
        } else if let edns {
            limit = min(max(512, Int(edns.udpPayloadSize)), max(512, policy.maxUDPSize))
        } else {
            limit = 512
        }
        return limit - (edns == nil ? 0 : 11)
    }

    /// Queries refused before looking at any name: an EDNS version we do not speak (BADVERS), a class
    /// other than IN or ANY, and zone transfers (REFUSED).
    static func refusal(_ head: DNSQueryHead) -> DNSRCode? {
        if let edns = head.edns, edns.version != 0 { return .badVers }
        guard head.qclass == 1 || head.qclass == 255 else { return .refused }
        guard head.qtype != .axfr && head.qtype != .ixfr else { return .refused }
        return nil
    }

    /// A name under one of our apexes: its records (following in-zone CNAMEs; an ExternalName pointing
    /// out of the zone is forwarded with its CNAME heading the answer), NODATA with the SOA, or NXDOMAIN.
    static func answerInZone(
        _ head: DNSQueryHead,
        key: [UInt8],
        qname: UnsafeRawBufferPointer,
        apex: Int,
        zone: DNSZone,
        policy: AnswerPolicy,
        limit: Int,
        _ out: inout ResponseBuilder,
        _ w: inout WireWriter,
        _ rcode: inout DNSRCode
    ) -> QueryDisposition {
        let qtype = head.qtype
        guard var node = zone.node(key) else {
            out.writeSOA(&w, zone: zone, apex: apex)
            out.finish(&w, rcode: .nxDomain, authoritative: true, limit: limit)
            rcode = .nxDomain
            return .reply
        }
        var chain = 0
        while let target = node.cname, qtype != .cname, qtype != .any {
            out.writeCNAME(&w, target: target, ttl: zone.ttl)
            chain += 1
            if let next = zone.node(target), chain < 8 {
                node = next
                out.currentOwner = target
                continue
            }
            if !zone.apexes.contains(where: { isSuffix($0.name, of: target) }) && policy.forwarding {
                let qn = Array(qname)
                var request = Self.forwardRequest(head, name: qn)
                request.cname = DNSRecord(
                    name: DNSName(uncheckedWire: qn),
                    ttl: zone.ttl,
                    data: .cname(DNSName(uncheckedWire: target))
                )
                return .forward(request)
            }
            node = ZoneNode()
            break
        }
        let wrote = out.writeNode(&w, node: node, zone: zone, qtype: qtype)
        if wrote == 0 && out.answerCount == 0 {
            out.writeSOA(&w, zone: zone, apex: apex)
        }
        if out.answerCount > 0, qtype == .srv {
            out.writeSRVAdditionals(&w, node: node, zone: zone, limit: limit)
        }
        out.finish(&w, rcode: .noError, authoritative: true, limit: limit)
        return .reply
    }

    static func forwardRequest(_ head: DNSQueryHead, name: [UInt8]) -> ForwardRequest {
        ForwardRequest(
            id: head.id,
            flags: head.flags,
            question: DNSQuestion(name: DNSName(uncheckedWire: name), type: head.qtype, qclass: head.qclass),
            clientEDNS: head.edns
        )
    }

    /// A reply with no sections: for FORMERR and NOTIMP.
    static func headerOnly(id: UInt16, flags: UInt16, rcode: DNSRCode, state: inout AnswerState) {
        state.rcode = rcode
        state.response.removeAll(keepingCapacity: true)
        let f = 0x8000 | (flags & 0x7900) | UInt16(rcode.rawValue & 0x0F)
        state.response.append(contentsOf: [UInt8(id >> 8), UInt8(id & 0xFF), UInt8(f >> 8), UInt8(f & 0xFF)])
        state.response.append(contentsOf: [0, 0, 0, 0, 0, 0, 0, 0])
    }

    /// True when `needle` minus its root byte starts at a label boundary of `key` and more labels follow.
    static func containsInterior(_ needle: [UInt8], in key: [UInt8]) -> Bool {
        let n = needle.count - 1
        var p = 0
        while p < key.count, key[p] != 0 {
            if key.count - p > needle.count, key[p] == needle[0],
                key[p..<(p + n)].elementsEqual(needle[0..<n])
            {
                return true
            }
            p += 1 + Int(key[p])
        }
        return false
    }
}

/// Writes one response: header and echoed question first, then records, then the counts.
struct ResponseBuilder {
    let id: UInt16
    let flags: UInt16
    let query: UnsafeRawBufferPointer
    let questionEnd: Int
    let edns: DNSEDNS?
    let maxUDPSize: Int
    var recursionAvailable = true
    var answerCount = 0
    var authorityCount = 0
    var additionalCount = 0
    /// Owner of the records being written when it is not the question name (after a CNAME).
    var currentOwner: [UInt8]? = nil

    init(
        id: UInt16,
        flags: UInt16,
        query: UnsafeRawBufferPointer,
        questionEnd: Int,
        edns: DNSEDNS?,
        maxUDPSize: Int
    ) {
        self.id = id
        self.flags = flags
        self.query = query
        self.questionEnd = questionEnd
        self.edns = edns
        self.maxUDPSize = maxUDPSize
    }

    func begin(_ w: inout WireWriter) {
        w.writeHeader(DNSHeader(id: self.id), qd: 1, an: 0, ns: 0, ar: 0)
        // The question exactly as asked (0x20 case kept); it was read uncompressed. Its labels become
        // compression targets when a name is first written compressed (an A answer writes none).
        w.bytes.append(contentsOf: UnsafeRawBufferPointer(rebasing: self.query[12..<self.questionEnd]))
        w.registerNameLater(at: 12)
    }

    @inline(__always)
    private func writeOwner(_ w: inout WireWriter) {
        if let owner = self.currentOwner {
            w.writeName(owner)
        } else {
            w.writeU16(0xC00C)
        }
    }

    @inline(__always)
    private func writeRRHead(_ w: inout WireWriter, type: DNSType, ttl: UInt32) {
        self.writeOwner(&w)
        w.writeU16(type.rawValue)
        w.writeU16(1)
        w.writeU32(ttl)
    }

    mutating func writeCNAME(_ w: inout WireWriter, target: [UInt8], ttl: UInt32) {
        self.writeRRHead(&w, type: .cname, ttl: ttl)
        let at = w.count
        w.writeU16(0)
        w.writeName(target)
        w.setU16(UInt16(w.count - at - 2), at: at)
        self.answerCount += 1
    }

    /// Writes the node's records of `qtype` as answers; returns how many.
    mutating func writeNode(_ w: inout WireWriter, node: ZoneNode, zone: DNSZone, qtype: DNSType) -> Int {
        let before = self.answerCount
        let any = qtype == .any
        let ttl = zone.ttl
        if qtype == .a || any {
            for v in node.v4 {
                self.writeRRHead(&w, type: .a, ttl: ttl)
                w.writeU16(4)
                w.writeU32(v)
                self.answerCount += 1
            }
        }
        if qtype == .aaaa || any {
            for v in node.v6 {
                guard case .v6(let hi, let lo) = v else { continue }
                self.writeRRHead(&w, type: .aaaa, ttl: ttl)
                w.writeU16(16)
                w.writeU32(UInt32(truncatingIfNeeded: hi >> 32))
                w.writeU32(UInt32(truncatingIfNeeded: hi))
                w.writeU32(UInt32(truncatingIfNeeded: lo >> 32))
                w.writeU32(UInt32(truncatingIfNeeded: lo))
                self.answerCount += 1
            }
        }
        if qtype == .srv || any {
            for s in node.srv {
                self.writeRRHead(&w, type: .srv, ttl: ttl)
                w.writeU16(UInt16(6 + s.target.count))
                w.writeU16(s.priority)
                w.writeU16(s.weight)
                w.writeU16(s.port)
                w.writeName(s.target, compress: false)
                self.answerCount += 1
            }
        }
        if qtype == .ptr || any {
            for p in node.ptr {
                self.writeRRHead(&w, type: .ptr, ttl: ttl)
                let at = w.count
                w.writeU16(0)
                w.writeName(p)
                w.setU16(UInt16(w.count - at - 2), at: at)
                self.answerCount += 1
            }
        }
        if qtype == .txt || any {
            for t in node.txt {
                self.writeRRHead(&w, type: .txt, ttl: ttl)
                w.writeU16(UInt16(t.count))
                w.bytes.append(contentsOf: t)
                self.answerCount += 1
            }
        }
        if let c = node.cname, qtype == .cname || any {
            self.writeRRHead(&w, type: .cname, ttl: ttl)
            let at = w.count
            w.writeU16(0)
            w.writeName(c)
            w.setU16(UInt16(w.count - at - 2), at: at)
            self.answerCount += 1
        }
        if node.apex >= 0 {
            let apex = zone.apexes[node.apex]
            if qtype == .soa || any {
                self.writeRRHead(&w, type: .soa, ttl: ttl)
                self.writeSOAData(&w, apex.soa)
                self.answerCount += 1
            }
            if qtype == .ns || any {
                self.writeRRHead(&w, type: .ns, ttl: ttl)
                let at = w.count
                w.writeU16(0)
                w.writeName(apex.nameServer)
                w.setU16(UInt16(w.count - at - 2), at: at)
                self.answerCount += 1
            }
        }
        return self.answerCount - before
    }

    private func writeSOAData(_ w: inout WireWriter, _ soa: DNSSOA) {
        let at = w.count
        w.writeU16(0)
        w.writeName(soa.mname.wire)
        w.writeName(soa.rname.wire)
        w.writeU32(soa.serial)
        w.writeU32(soa.refresh)
        w.writeU32(soa.retry)
        w.writeU32(soa.expire)
        w.writeU32(soa.minimum)
        w.setU16(UInt16(w.count - at - 2), at: at)
    }

    /// The apex SOA in the authority section, with the negative TTL (RFC 2308 §3).
    mutating func writeSOA(_ w: inout WireWriter, zone: DNSZone, apex: Int) {
        let a = zone.apexes[apex]
        w.writeName(a.name)
        w.writeU16(DNSType.soa.rawValue)
        w.writeU16(1)
        w.writeU32(min(zone.negativeTTL, a.soa.minimum))
        self.writeSOAData(&w, a.soa)
        self.authorityCount += 1
    }

    /// Addresses of in-zone SRV targets, as far as they fit (no TC for leaving them out).
    mutating func writeSRVAdditionals(_ w: inout WireWriter, node: ZoneNode, zone: DNSZone, limit: Int) {
        let mark = w.count
        let markCount = self.additionalCount
        var seen = 0
        for s in node.srv {
            guard let t = zone.node(s.target) else { continue }
            seen += 1
            if seen > 64 { break }
            for v in t.v4 {
                w.writeName(s.target)
                w.writeU16(DNSType.a.rawValue)
                w.writeU16(1)
                w.writeU32(zone.ttl)
                w.writeU16(4)
                w.writeU32(v)
                self.additionalCount += 1
            }
            for v in t.v6 {
                guard case .v6(let hi, let lo) = v else { continue }
                w.writeName(s.target)
                w.writeU16(DNSType.aaaa.rawValue)
                w.writeU16(1)
                w.writeU32(zone.ttl)
                w.writeU16(16)
                w.writeU32(UInt32(truncatingIfNeeded: hi >> 32))
                w.writeU32(UInt32(truncatingIfNeeded: hi))
                w.writeU32(UInt32(truncatingIfNeeded: lo >> 32))
                w.writeU32(UInt32(truncatingIfNeeded: lo))
                self.additionalCount += 1
            }
            if w.count > limit {
                w.truncate(to: mark)
                self.additionalCount = markCount
                return
            }
        }
    }

    /// Sets flags and counts, truncates (TC) when the sections do not fit, and appends the OPT record.
    mutating func finish(_ w: inout WireWriter, rcode: DNSRCode, authoritative: Bool, limit: Int) {
        var truncated = false
        if w.count > limit {
            w.truncate(to: self.questionEnd)
            self.answerCount = 0
            self.authorityCount = 0
            self.additionalCount = 0
            truncated = true
        }
        var f: UInt16 = 0x8000 | (self.flags & 0x7900) | (self.flags & 0x0010)
        if self.recursionAvailable { f |= 0x0080 }
        if authoritative { f |= 0x0400 }
        if truncated { f |= 0x0200 }
        f |= rcode.rawValue & 0x0F
        w.setU16(f, at: 2)
        w.setU16(UInt16(self.answerCount), at: 6)
        w.setU16(UInt16(self.authorityCount), at: 8)
        var ar = self.additionalCount
        if let e = self.edns {
            w.writeOPT(
                DNSEDNS(
                    udpPayloadSize: UInt16(clamping: self.maxUDPSize),
                    extendedRCode: UInt8(truncatingIfNeeded: rcode.rawValue >> 4),
                    version: 0,
                    dnssecOK: e.dnssecOK
                )
            )
            ar += 1
        }
        w.setU16(UInt16(ar), at: 10)
    }
}
