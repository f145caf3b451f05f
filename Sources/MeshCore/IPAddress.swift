#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An IPv4 or IPv6 address as plain bytes: parsed and printed without touching the network.
public enum IPAddress: Hashable, Sendable, Comparable, CustomStringConvertible {
    case v4(UInt32)
    /// The 16 bytes in network order, as two big-endian halves.
    case v6(UInt64, UInt64)

    /// Parses dotted-quad IPv4 or RFC 4291 IPv6 text (no zone id, no brackets).
    public init?(_ text: some StringProtocol) {
        let s = String(text)
        if s.contains(":") {
            var a = in6_addr()
            guard inet_pton(AF_INET6, s, &a) == 1 else { return nil }
            let bytes = withUnsafeBytes(of: &a) { Array($0) }
            self.init(v6Bytes: bytes)
        } else {
            var a = in_addr()
            // inet_pton accepts only the strict dotted-quad form (no "010.1", no "1.2.3").
            guard inet_pton(AF_INET, s, &a) == 1 else { return nil }
            self = .v4(UInt32(bigEndian: a.s_addr))
        }
    }

    /// Builds an address from 4 or 16 network-order bytes.
    public init?(bytes: some Collection<UInt8>) {
        let b = Array(bytes)
        switch b.count {
        case 4: self = .v4(b.reduce(0) { $0 << 8 | UInt32($1) })
        case 16: self.init(v6Bytes: b)
        default: return nil
        }
    }

    private init(v6Bytes b: [UInt8]) {
        let hi = b[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let lo = b[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        self = .v6(hi, lo)
    }

    public var isIPv4: Bool {
        if case .v4 = self { return true }
        return false
    }

    public var isIPv6: Bool { !self.isIPv4 }

    /// The address bits: 32 for IPv4, 128 for IPv6.
    public var bitWidth: Int { self.isIPv4 ? 32 : 128 }

    /// The address in network byte order (4 or 16 bytes).
    public var bytes: [UInt8] {
        switch self {
        case .v4(let v):
            return [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)]
        case .v6(let hi, let lo):
            return (0..<8).map { UInt8(hi >> (56 - 8 * $0) & 0xff) } + (0..<8).map { UInt8(lo >> (56 - 8 * $0) & 0xff) }
        }
    }

    /// True for 0.0.0.0 and ::.
    public var isUnspecified: Bool {
        switch self {
        case .v4(let v): return v == 0
        case .v6(let hi, let lo): return hi == 0 && lo == 0
        }
    }

    /// True for 127.0.0.0/8 and ::1.
    public var isLoopback: Bool {
        switch self {
        case .v4(let v): return v >> 24 == 127
        case .v6(let hi, let lo): return hi == 0 && lo == 1
        }
    }

    /// Canonical text: dotted quad, or RFC 5952 IPv6 (lowercase, longest zero run compressed).
    public var description: String {
        switch self {
        case .v4(let v):
            return "\(v >> 24).\(v >> 16 & 0xff).\(v >> 8 & 0xff).\(v & 0xff)"
        case .v6:
            var a = in6_addr()
            let b = self.bytes
            withUnsafeMutableBytes(of: &a) { raw in
                for i in 0..<16 { raw[i] = b[i] }
            }
            var buf = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
            guard inet_ntop(AF_INET6, &a, &buf, socklen_t(buf.count)) != nil else { return "::" }
            return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    /// The reverse-lookup name: `4.3.2.1.in-addr.arpa` or the nibble form under `ip6.arpa`.
    public var reverseName: String {
        switch self {
        case .v4:
            return self.bytes.reversed().map(String.init).joined(separator: ".") + ".in-addr.arpa"
        case .v6:
            let hex = Array("0123456789abcdef")
            var nibbles: [String] = []
            for byte in self.bytes.reversed() {
                nibbles.append(String(hex[Int(byte & 0xf)]))
                nibbles.append(String(hex[Int(byte >> 4)]))
            }
            return nibbles.joined(separator: ".") + ".ip6.arpa"
        }
    }

    public static func < (lhs: IPAddress, rhs: IPAddress) -> Bool {
        switch (lhs, rhs) {
        case (.v4(let a), .v4(let b)): return a < b
        case (.v4, .v6): return true
        case (.v6, .v4): return false
        case (.v6(let ah, let al), .v6(let bh, let bl)): return (ah, al) < (bh, bl)
        }
    }
}

/// A CIDR block such as `127.77.0.0/16` or `fd00:77::/112`.
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    /// The network address (host bits cleared).
    public let network: IPAddress
    public let prefixLength: Int

    /// Parses `address/prefix`; the host bits of the address must be zero.
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let addr = IPAddress(parts[0]), let len = Int(parts[1]),
            len >= 0, len <= addr.bitWidth
        else { return nil }
        guard CIDR.mask(addr, len) == addr else { return nil }
        self.network = addr
        self.prefixLength = len
    }

    /// Number of host bits.
    public var hostBits: Int { self.network.bitWidth - self.prefixLength }

    public var description: String { "\(self.network)/\(self.prefixLength)" }

    public func contains(_ address: IPAddress) -> Bool {
        address.isIPv4 == self.network.isIPv4 && CIDR.mask(address, self.prefixLength) == self.network
    }

    /// The address at `offset` from the network address (offset must be below 2^hostBits).
    public func address(at offset: UInt64) -> IPAddress {
        switch self.network {
        case .v4(let v): return .v4(v &+ UInt32(truncatingIfNeeded: offset))
        case .v6(let hi, let lo):
            let (sum, carry) = lo.addingReportingOverflow(offset)
            return .v6(carry ? hi &+ 1 : hi, sum)
        }
    }

    /// The offset of `address` from the network address, when inside and below 2^64.
    public func offset(of address: IPAddress) -> UInt64? {
        guard self.contains(address) else { return nil }
        switch (self.network, address) {
        case (.v4(let n), .v4(let a)): return UInt64(a - n)
        case (.v6(let nh, let nl), .v6(let ah, let al)):
            guard ah == nh else { return nil }
            return al &- nl
        default: return nil
        }
    }

    static func mask(_ a: IPAddress, _ len: Int) -> IPAddress {
        switch a {
        case .v4(let v):
            return .v4(len == 0 ? 0 : v & (UInt32.max << (32 - len)))
        case .v6(let hi, let lo):
            let hiMask: UInt64 = len >= 64 ? .max : (len == 0 ? 0 : .max << (64 - len))
            let loMask: UInt64 = len <= 64 ? 0 : (len == 128 ? .max : .max << (128 - len))
            return .v6(hi & hiMask, lo & loMask)
        }
    }
}
