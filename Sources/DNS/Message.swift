import MeshCore

/// A record type (RFC 1035 §3.2.2 and later RFCs); unknown values are kept as they are.
public struct DNSType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public init(_ rawValue: UInt16) { self.rawValue = rawValue }

    public static let a = DNSType(1)
    public static let ns = DNSType(2)
    public static let cname = DNSType(5)
    public static let soa = DNSType(6)
    public static let ptr = DNSType(12)
    public static let mx = DNSType(15)
    public static let txt = DNSType(16)
    public static let aaaa = DNSType(28)
    public static let srv = DNSType(33)
    public static let opt = DNSType(41)
    public static let ixfr = DNSType(251)
    public static let axfr = DNSType(252)
    public static let any = DNSType(255)

    public var description: String {
        switch self {
        case .a: return "A"
        case .ns: return "NS"
        case .cname: return "CNAME"
        case .soa: return "SOA"
        case .ptr: return "PTR"
        case .mx: return "MX"
        case .txt: return "TXT"
        case .aaaa: return "AAAA"
        case .srv: return "SRV"
        case .opt: return "OPT"
        case .any: return "ANY"
        default: return "TYPE\(self.rawValue)"
        }
    }
}

/// A response code, including the EDNS extended codes (the upper 8 bits travel in the OPT record).
public struct DNSRCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public init(_ rawValue: UInt16) { self.rawValue = rawValue }

    public static let noError = DNSRCode(0)
    public static let formErr = DNSRCode(1)
    public static let servFail = DNSRCode(2)
    public static let nxDomain = DNSRCode(3)
    public static let notImp = DNSRCode(4)
    public static let refused = DNSRCode(5)
    public static let badVers = DNSRCode(16)

    public var description: String {
        switch self {
        case .noError: return "NOERROR"
        case .formErr: return "FORMERR"
        case .servFail: return "SERVFAIL"
        case .nxDomain: return "NXDOMAIN"
        case .notImp: return "NOTIMP"
        case .refused: return "REFUSED"
        case .badVers: return "BADVERS"
        default: return "RCODE\(self.rawValue)"
        }
    }
}

/// The 12-byte message header without its counts (those follow from the sections).
public struct DNSHeader: Hashable, Sendable {
    public var id: UInt16
    public var isResponse: Bool
    public var opcode: UInt8
    public var authoritative: Bool
    public var truncated: Bool
    public var recursionDesired: Bool
    public var recursionAvailable: Bool
    public var authenticData: Bool
    public var checkingDisabled: Bool
    /// The low 4 bits of the response code (the header field itself).
    public var rcodeLow: UInt8

    public init(
        id: UInt16 = 0,
        isResponse: Bool = false,
        opcode: UInt8 = 0,
        authoritative: Bool = false,
        truncated: Bool = false,
        recursionDesired: Bool = false,
        recursionAvailable: Bool = false,
        authenticData: Bool = false,
        checkingDisabled: Bool = false,
        rcodeLow: UInt8 = 0
    ) {
        self.id = id
        self.isResponse = isResponse
        self.opcode = opcode
        self.authoritative = authoritative
        self.truncated = truncated
        self.recursionDesired = recursionDesired
        self.recursionAvailable = recursionAvailable
        self.authenticData = authenticData
        self.checkingDisabled = checkingDisabled
        self.rcodeLow = rcodeLow
    }

    /// The 16 flag bits as they appear on the wire.
    public var flags: UInt16 {
        get {
            var f: UInt16 = 0
            if self.isResponse { f |= 0x8000 }
            f |= UInt16(self.opcode & 0x0F) << 11
            if self.authoritative { f |= 0x0400 }
            if self.truncated { f |= 0x0200 }
            if self.recursionDesired { f |= 0x0100 }
            if self.recursionAvailable { f |= 0x0080 }
            if self.authenticData { f |= 0x0020 }
            if self.checkingDisabled { f |= 0x0010 }
            f |= UInt16(self.rcodeLow & 0x0F)
            return f
        }
        set {
            self.isResponse = newValue & 0x8000 != 0
            self.opcode = UInt8((newValue >> 11) & 0x0F)
            self.authoritative = newValue & 0x0400 != 0
            self.truncated = newValue & 0x0200 != 0
            self.recursionDesired = newValue & 0x0100 != 0
            self.recursionAvailable = newValue & 0x0080 != 0
            self.authenticData = newValue & 0x0020 != 0
            self.checkingDisabled = newValue & 0x0010 != 0
            self.rcodeLow = UInt8(newValue & 0x0F)
        }
    }
}

/// A domain name in uncompressed wire form (length-prefixed labels ending in the root byte 0),
/// with the case of every byte kept as it came (so 0x20-randomised questions echo unchanged).
/// Equality is byte-exact; use ``lowercased`` or ``equalsIgnoringCase(_:)`` to compare as DNS does.
public struct DNSName: Hashable, Sendable, CustomStringConvertible {
    /// The wire bytes, at most 255, ending in 0.
    public let wire: [UInt8]

    /// The root name `.`.
    public static let root = DNSName(uncheckedWire: [0])

    init(uncheckedWire: [UInt8]) { self.wire = uncheckedWire }

    /// Validates wire bytes (uncompressed, ending in the root label, at most 255 bytes).
    public init(wire: [UInt8]) throws(DNSWireError) {
        var i = 0
        while true {
            guard i < wire.count else { throw .truncated }
            let len = Int(wire[i])
            if len == 0 { break }
            guard len <= 63 else { throw .labelTooLong }
            i += 1 + len
        }
        guard i == wire.count - 1 else { throw .badRData }
        guard wire.count <= 255 else { throw .nameTooLong }
        self.wire = wire
    }

    /// Parses dotted text such as `web.shop.svc.cluster.local` (a trailing dot is optional, `.` is
    /// the root). Bytes are taken as they are: no escapes, and empty labels are rejected.
    public init(_ text: some StringProtocol) throws(DNSWireError) {
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count + 2)
        var utf8 = Array(text.utf8)
        if utf8 == [UInt8(ascii: ".")] { utf8 = [] }
        if utf8.last == UInt8(ascii: ".") { utf8.removeLast() }
        if !utf8.isEmpty {
            var start = 0
            while start <= utf8.count {
                var end = start
                while end < utf8.count && utf8[end] != UInt8(ascii: ".") { end += 1 }
                let len = end - start
                guard len > 0 else { throw .invalidName }
                guard len <= 63 else { throw .labelTooLong }
                out.append(UInt8(len))
                out.append(contentsOf: utf8[start..<end])
                start = end + 1
            }
        }
        out.append(0)
        guard out.count <= 255 else { throw .nameTooLong }
        self.wire = out
    }

    /// The labels as byte arrays (no length bytes).
    public var labels: [ArraySlice<UInt8>] {
        var result: [ArraySlice<UInt8>] = []
        var i = 0
        while i < self.wire.count, self.wire[i] != 0 {
            let len = Int(self.wire[i])
            result.append(self.wire[(i + 1)..<(i + 1 + len)])
            i += 1 + len
        }
        return result
    }

    /// The same name with ASCII A–Z folded to a–z.
    public var lowercased: DNSName { DNSName(uncheckedWire: self.wire.map(asciiLower)) }

    /// Compares as DNS does: ASCII case-insensitively.
    public func equalsIgnoringCase(_ other: DNSName) -> Bool {
        guard self.wire.count == other.wire.count else { return false }
        for i in 0..<self.wire.count where asciiLower(self.wire[i]) != asciiLower(other.wire[i]) {
            return false
        }
        return true
    }

    /// True when this name is `suffix` or below it (case-insensitive, on label boundaries).
    public func isSubdomain(of suffix: DNSName) -> Bool {
        let n = self.wire.count
        let m = suffix.wire.count
        guard m <= n else { return false }
        var i = 0
        while true {
            if n - i == m {
                for k in 0..<m where asciiLower(self.wire[i + k]) != asciiLower(suffix.wire[k]) { return false }
                return true
            }
            if self.wire[i] == 0 || n - i < m { return false }
            i += 1 + Int(self.wire[i])
        }
    }

    /// Dotted text with a trailing dot; bytes outside printable ASCII and `.`/`\` are escaped as `\DDD`.
    public var description: String {
        if self.wire.count <= 1 { return "." }
        var s = ""
        for label in self.labels {
            for b in label {
                if b > 0x20 && b < 0x7F && b != UInt8(ascii: ".") && b != UInt8(ascii: "\\") {
                    s.unicodeScalars.append(Unicode.Scalar(b))
                } else {
                    let d = String(b)
                    s += "\\" + String(repeating: "0", count: 3 - d.count) + d
                }
            }
            s += "."
        }
        return s
    }
}

@inline(__always)
func asciiLower(_ b: UInt8) -> UInt8 {
    (b &- 0x41) < 26 ? b | 0x20 : b
}

/// One entry of the question section.
public struct DNSQuestion: Hashable, Sendable {
    public var name: DNSName
    public var type: DNSType
    public var qclass: UInt16

    public init(name: DNSName, type: DNSType, qclass: UInt16 = 1) {
        self.name = name
        self.type = type
        self.qclass = qclass
    }
}

/// SOA record data (RFC 1035 §3.3.13).
public struct DNSSOA: Hashable, Sendable {
    public var mname: DNSName
    public var rname: DNSName
    public var serial: UInt32
    public var refresh: UInt32
    public var retry: UInt32
    public var expire: UInt32
    /// The negative-caching TTL (RFC 2308 §4).
    public var minimum: UInt32

    public init(
        mname: DNSName,
        rname: DNSName,
        serial: UInt32,
        refresh: UInt32,
        retry: UInt32,
        expire: UInt32,
        minimum: UInt32
    ) {
        self.mname = mname
        self.rname = rname
        self.serial = serial
        self.refresh = refresh
        self.retry = retry
        self.expire = expire
        self.minimum = minimum
    }
}

/// Record data. Types whose data hold names that RFC 1035 lets senders compress are decoded, so
/// they can be re-encoded safely; every other type is kept as opaque bytes (RFC 3597).
public enum DNSRData: Hashable, Sendable {
    case a(IPAddress)
    case aaaa(IPAddress)
    case ns(DNSName)
    case cname(DNSName)
    case ptr(DNSName)
    case mx(preference: UInt16, exchange: DNSName)
    case soa(DNSSOA)
    /// The character-strings, each at most 255 bytes.
    case txt([[UInt8]])
    case srv(priority: UInt16, weight: UInt16, port: UInt16, target: DNSName)
    case opaque([UInt8])
}

/// A resource record (never the EDNS OPT pseudo-record: that is ``DNSMessage/edns``).
public struct DNSRecord: Hashable, Sendable {
    public var name: DNSName
    public var type: DNSType
    public var rclass: UInt16
    public var ttl: UInt32
    public var data: DNSRData

    public init(name: DNSName, type: DNSType, rclass: UInt16 = 1, ttl: UInt32, data: DNSRData) {
        self.name = name
        self.type = type
        self.rclass = rclass
        self.ttl = ttl
        self.data = data
    }

    /// A record whose type follows from its data (opaque data needs the explicit initialiser).
    public init(name: DNSName, ttl: UInt32, data: DNSRData) {
        let type: DNSType
        switch data {
        case .a: type = .a
        case .aaaa: type = .aaaa
        case .ns: type = .ns
        case .cname: type = .cname
        case .ptr: type = .ptr
        case .mx: type = .mx
        case .soa: type = .soa
        case .txt: type = .txt
        case .srv: type = .srv
        case .opaque: type = DNSType(0)
        }
        self.init(name: name, type: type, ttl: ttl, data: data)
    }
}

/// The EDNS(0) OPT pseudo-record (RFC 6891).
public struct DNSEDNS: Hashable, Sendable {
    /// The requestor's (or responder's) UDP payload size; values below 512 mean 512.
    public var udpPayloadSize: UInt16
    /// The upper 8 bits of the 12-bit response code.
    public var extendedRCode: UInt8
    public var version: UInt8
    /// The DNSSEC OK bit (RFC 3225).
    public var dnssecOK: Bool
    /// Options as (code, data), kept as they came.
    public var options: [EDNSOption]

    public struct EDNSOption: Hashable, Sendable {
        public var code: UInt16
        public var data: [UInt8]
        public init(code: UInt16, data: [UInt8]) {
            self.code = code
            self.data = data
        }
    }

    public init(
        udpPayloadSize: UInt16 = 1232,
        extendedRCode: UInt8 = 0,
        version: UInt8 = 0,
        dnssecOK: Bool = false,
        options: [EDNSOption] = []
    ) {
        self.udpPayloadSize = udpPayloadSize
        self.extendedRCode = extendedRCode
        self.version = version
        self.dnssecOK = dnssecOK
        self.options = options
    }
}

/// A whole DNS message. ``decode(_:)`` and ``encode(maxSize:)`` are the pure codec.
public struct DNSMessage: Hashable, Sendable {
    public var header: DNSHeader
    public var questions: [DNSQuestion]
    public var answers: [DNSRecord]
    public var authorities: [DNSRecord]
    /// The additional section without the OPT record.
    public var additionals: [DNSRecord]
    public var edns: DNSEDNS?

    public init(
        header: DNSHeader = DNSHeader(),
        questions: [DNSQuestion] = [],
        answers: [DNSRecord] = [],
        authorities: [DNSRecord] = [],
        additionals: [DNSRecord] = [],
        edns: DNSEDNS? = nil
    ) {
        self.header = header
        self.questions = questions
        self.answers = answers
        self.authorities = authorities
        self.additionals = additionals
        self.edns = edns
    }

    /// The full response code: the header's 4 bits and, with EDNS, the OPT record's upper 8 bits.
    public var rcode: DNSRCode {
        get { DNSRCode(UInt16(self.edns?.extendedRCode ?? 0) << 4 | UInt16(self.header.rcodeLow)) }
        set {
            self.header.rcodeLow = UInt8(newValue.rawValue & 0x0F)
            if newValue.rawValue > 0x0F {
                if self.edns == nil { self.edns = DNSEDNS() }
                self.edns!.extendedRCode = UInt8(truncatingIfNeeded: newValue.rawValue >> 4)
            } else if self.edns != nil {
                self.edns!.extendedRCode = 0
            }
        }
    }
}
