import MeshCore

/// Appends a DNS message to a byte array, compressing names (RFC 1035 §4.1.4) against the names
/// already written. Suffixes must match byte for byte (case included), so every name decodes with
/// exactly the bytes it was written with: a 0x20-randomised question and an answer in another case
/// each keep their own case.
struct WireWriter {
    var bytes: [UInt8]
    /// Offsets of label starts already written (candidates for a pointer), and how many labels
    /// follow each to the root: a suffix is only compared with entries of the same label count.
    private var entryOffsets: [UInt16]
    private var entryLabelCounts: [UInt8]
    /// Offset of a name already written whose labels become compression targets before the first name
    /// is written compressed (-1: none).
    private var pendingName = -1

    /// Entries kept for compression: enough for every realistic answer; a huge TCP answer keeps
    /// compressing against the first ones (the question), so its cost stays linear.
    static let maxEntries = 96

    init(reusing bytes: [UInt8] = [], entryOffsets: [UInt16] = [], entryLabelCounts: [UInt8] = []) {
        self.bytes = bytes
        self.entryOffsets = entryOffsets
        self.entryLabelCounts = entryLabelCounts
        self.bytes.removeAll(keepingCapacity: true)
        self.entryOffsets.removeAll(keepingCapacity: true)
        self.entryLabelCounts.removeAll(keepingCapacity: true)
        if self.bytes.capacity < 512 { self.bytes.reserveCapacity(512) }
    }

    /// A writer over buffers taken out of their owner (left empty), so they are uniquely referenced and
    /// reused in place: passing an owner's arrays by value would copy them on the first write.
    init(taking bytes: inout [UInt8], offsets: inout [UInt16], counts: inout [UInt8]) {
        self.bytes = []
        self.entryOffsets = []
        self.entryLabelCounts = []
        swap(&self.bytes, &bytes)
        swap(&self.entryOffsets, &offsets)
        swap(&self.entryLabelCounts, &counts)
        self.bytes.removeAll(keepingCapacity: true)
        self.entryOffsets.removeAll(keepingCapacity: true)
        self.entryLabelCounts.removeAll(keepingCapacity: true)
        if self.bytes.capacity < 512 { self.bytes.reserveCapacity(512) }
    }

    /// Gives back the storage so a caller can reuse it for the next message.
    mutating func takeStorage() -> (bytes: [UInt8], offsets: [UInt16], counts: [UInt8]) {
        self.pendingName = -1
        let r = (self.bytes, self.entryOffsets, self.entryLabelCounts)
        self.bytes = []
        self.entryOffsets = []
        self.entryLabelCounts = []
        return r
    }

    var count: Int { self.bytes.count }

    @inline(__always)
    mutating func writeU8(_ v: UInt8) { self.bytes.append(v) }

    @inline(__always)
    mutating func writeU16(_ v: UInt16) {
        self.bytes.append(UInt8(v >> 8))
        self.bytes.append(UInt8(v & 0xFF))
    }

    @inline(__always)
    mutating func writeU32(_ v: UInt32) {
        self.bytes.append(UInt8(v >> 24))
        self.bytes.append(UInt8((v >> 16) & 0xFF))
        self.bytes.append(UInt8((v >> 8) & 0xFF))
        self.bytes.append(UInt8(v & 0xFF))
    }

    @inline(__always)
    mutating func setU16(_ v: UInt16, at offset: Int) {
        self.bytes[offset] = UInt8(v >> 8)
        self.bytes[offset + 1] = UInt8(v & 0xFF)
    }

    mutating func truncate(to count: Int) {
        self.bytes.removeSubrange(count...)
        // Forget compression targets inside the removed bytes.
        while let last = self.entryOffsets.last, Int(last) >= count {
            self.entryOffsets.removeLast()
            self.entryLabelCounts.removeLast()
        }
    }

    /// Makes the uncompressed name already written at `offset` a compression target, once a name is first
    /// written compressed (the question: most answers write no other name, and need no targets).
    mutating func registerNameLater(at offset: Int) {
        self.registerPending()
        self.pendingName = offset
    }

    @inline(__always)
    private mutating func registerPending() {
        guard self.pendingName >= 0 else { return }
        let offset = self.pendingName
        self.pendingName = -1
        var end = offset
        while end < self.bytes.count, self.bytes[end] != 0 { end += 1 + Int(self.bytes[end]) }
        let name = Array(self.bytes[offset..<min(end + 1, self.bytes.count)])
        self.registerName(name, at: offset)
    }

    /// Makes a name that is already in the message (uncompressed, at `offset`) a compression target.
    mutating func registerName(_ wire: [UInt8], at offset: Int) {
        var total = 0
        var i = 0
        while i < wire.count, wire[i] != 0 {
            total += 1
            i += 1 + Int(wire[i])
        }
        i = 0
        var remaining = total
        while i < wire.count, wire[i] != 0 {
            self.addEntry(offset: offset + i, labels: remaining)
            remaining -= 1
            i += 1 + Int(wire[i])
        }
    }

    @inline(__always)
    private mutating func addEntry(offset: Int, labels: Int) {
        guard offset <= 0x3FFF, self.entryOffsets.count < WireWriter.maxEntries else { return }
        self.entryOffsets.append(UInt16(offset))
        self.entryLabelCounts.append(UInt8(truncatingIfNeeded: labels))
    }

    /// Writes a name given in uncompressed wire form, as a pointer to an earlier copy of its longest
    /// possible suffix when `compress` is true.
    mutating func writeName(_ wire: [UInt8], compress: Bool = true) {
        if compress { self.registerPending() }
        // Count the labels (at most 127 in 255 bytes) without allocating.
        var n = 0
        var i = 0
        while i < wire.count, wire[i] != 0 {
            n += 1
            i += 1 + Int(wire[i])
        }
        let base = self.bytes.count
        if compress && !self.entryOffsets.isEmpty {
            var start = 0
            for k in 0..<n {
                if let target = self.findEntry(wire, from: start, labels: n - k) {
                    self.bytes.append(contentsOf: wire[0..<start])
                    self.registerLabels(wire, upTo: start, labels: n, base: base)
                    self.writeU16(0xC000 | UInt16(target))
                    return
                }
                start += 1 + Int(wire[start])
            }
        }
        self.bytes.append(contentsOf: wire)
        if compress { self.registerLabels(wire, upTo: wire.count, labels: n, base: base) }
    }

    private mutating func registerLabels(_ wire: [UInt8], upTo end: Int, labels n: Int, base: Int) {
        var p = 0
        var remaining = n
        while p < end, wire[p] != 0 {
            self.addEntry(offset: base + p, labels: remaining)
            remaining -= 1
            p += 1 + Int(wire[p])
        }
    }

    /// The offset of an earlier name equal (byte for byte) to `wire[from...]`.
    private func findEntry(_ wire: [UInt8], from: Int, labels: Int) -> Int? {
        let firstLen = wire[from]
        for e in 0..<self.entryOffsets.count where Int(self.entryLabelCounts[e]) == labels {
            let off = Int(self.entryOffsets[e])
            guard self.bytes[off] == firstLen else { continue }
            if self.suffixMatches(wire, from: from, at: off) { return off }
        }
        return nil
    }

    private func suffixMatches(_ wire: [UInt8], from: Int, at offset: Int) -> Bool {
        var p = from
        var q = offset
        while true {
            var len = Int(self.bytes[q])
            if len >= 0xC0 {
                q = (len & 0x3F) << 8 | Int(self.bytes[q + 1])
                len = Int(self.bytes[q])
            }
            guard Int(wire[p]) == len else { return false }
            if len == 0 { return true }
            for k in 1...len where wire[p + k] != self.bytes[q + k] {
                return false
            }
            p += 1 + len
            q += 1 + len
        }
    }

    /// Writes a record's owner, type, class and TTL, then its data.
    mutating func writeRecord(_ record: DNSRecord) throws(DNSWireError) {
        self.writeName(record.name.wire)
        self.writeU16(record.type.rawValue)
        self.writeU16(record.rclass)
        self.writeU32(record.ttl)
        let lengthAt = self.bytes.count
        self.writeU16(0)
        let start = self.bytes.count
        switch record.data {
        case .a(let ip):
            guard case .v4(let v) = ip else { throw .unencodableRecord }
            self.writeU32(v)
        case .aaaa(let ip):
            guard ip.isIPv6 else { throw .unencodableRecord }
            self.bytes.append(contentsOf: ip.bytes)
        case .ns(let n), .cname(let n), .ptr(let n):
            self.writeName(n.wire)
        case .mx(let pref, let exchange):
            self.writeU16(pref)
            self.writeName(exchange.wire)
        case .soa(let soa):
            self.writeName(soa.mname.wire)
            self.writeName(soa.rname.wire)
            self.writeU32(soa.serial)
            self.writeU32(soa.refresh)
            self.writeU32(soa.retry)
            self.writeU32(soa.expire)
            self.writeU32(soa.minimum)
        case .txt(let strings):
            for s in strings {
                guard s.count <= 255 else { throw .unencodableRecord }
                self.writeU8(UInt8(s.count))
                self.bytes.append(contentsOf: s)
            }
        case .srv(let priority, let weight, let port, let target):
            self.writeU16(priority)
            self.writeU16(weight)
            self.writeU16(port)
            // RFC 2782: the target is not compressed.
            self.writeName(target.wire, compress: false)
        case .opaque(let data):
            self.bytes.append(contentsOf: data)
        }
        let length = self.bytes.count - start
        guard length <= 0xFFFF else { throw .unencodableRecord }
        self.setU16(UInt16(length), at: lengthAt)
    }

    /// Writes the EDNS OPT pseudo-record.
    mutating func writeOPT(_ e: DNSEDNS) {
        self.writeU8(0)
        self.writeU16(DNSType.opt.rawValue)
        self.writeU16(e.udpPayloadSize)
        self.writeU32(UInt32(e.extendedRCode) << 24 | UInt32(e.version) << 16 | (e.dnssecOK ? 0x8000 : 0))
        var length = 0
        for o in e.options { length += 4 + o.data.count }
        self.writeU16(UInt16(truncatingIfNeeded: length))
        for o in e.options {
            self.writeU16(o.code)
            self.writeU16(UInt16(truncatingIfNeeded: o.data.count))
            self.bytes.append(contentsOf: o.data)
        }
    }

    mutating func writeHeader(_ h: DNSHeader, qd: Int, an: Int, ns: Int, ar: Int) {
        self.writeU16(h.id)
        self.writeU16(h.flags)
        self.writeU16(UInt16(truncatingIfNeeded: qd))
        self.writeU16(UInt16(truncatingIfNeeded: an))
        self.writeU16(UInt16(truncatingIfNeeded: ns))
        self.writeU16(UInt16(truncatingIfNeeded: ar))
    }
}

extension DNSMessage {
    /// Encodes the message with name compression.
    ///
    /// When the whole message does not fit in `maxSize` (the client's UDP payload size: 512 without
    /// EDNS), the additional records are left out first (RFC 2181 §9: no TC for that); when it still
    /// does not fit, the answer and authority sections are left out and the TC bit is set so the
    /// client retries over TCP. The OPT record is always kept.
    public func encode(maxSize: Int = 65535) throws(DNSWireError) -> [UInt8] {
        let limit = min(max(maxSize, 12), 65535)
        var w = WireWriter()
        try self.write(into: &w, sections: 3, truncated: self.header.truncated)
        if w.count <= limit { return w.bytes }
        if !self.additionals.isEmpty {
            w = WireWriter()
            try self.write(into: &w, sections: 2, truncated: self.header.truncated)
            if w.count <= limit { return w.bytes }
        }
        w = WireWriter()
        try self.write(into: &w, sections: 0, truncated: true)
        return w.bytes
    }

    /// `sections`: 0 = question only, 2 = answers and authorities, 3 = all.
    private func write(into w: inout WireWriter, sections: Int, truncated: Bool) throws(DNSWireError) {
        var h = self.header
        h.truncated = truncated
        let an = sections >= 2 ? self.answers.count : 0
        let ns = sections >= 2 ? self.authorities.count : 0
        let ar = (sections >= 3 ? self.additionals.count : 0) + (self.edns == nil ? 0 : 1)
        w.writeHeader(h, qd: self.questions.count, an: an, ns: ns, ar: ar)
        for q in self.questions {
            w.writeName(q.name.wire)
            w.writeU16(q.type.rawValue)
            w.writeU16(q.qclass)
        }
        if sections >= 2 {
            for r in self.answers { try w.writeRecord(r) }
            for r in self.authorities { try w.writeRecord(r) }
        }
        if sections >= 3 {
            for r in self.additionals { try w.writeRecord(r) }
        }
        if let e = self.edns { w.writeOPT(e) }
    }
}
