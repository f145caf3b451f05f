import MeshCore
import MeshTestSupport
import Testing

@testable import NodeAgent

#if canImport(Glibc)
import Glibc

/// The rtnetlink messages `LinkAddressDump` reads, built byte by byte (host byte order, as the kernel sends them).
@Suite("rtnetlink dump parsing: links, addresses, the dump's end and its errors", .rationed)
struct LinkAddressDumpTests {
    static func u16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }
    static func u32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v) { Array($0) } }

    /// One `struct rtattr`, padded to 4 bytes.
    static func attribute(_ type: UInt16, _ value: [UInt8]) -> [UInt8] {
        var out = Self.u16(UInt16(4 + value.count)) + Self.u16(type) + value
        while out.count % 4 != 0 { out.append(0) }
        return out
    }

    /// One netlink message: header (length, type, flags, sequence, port) and payload, padded to 4 bytes.
    static func message(_ type: UInt16, sequence: UInt32, _ payload: [UInt8]) -> [UInt8] {
        var out = Self.u32(UInt32(16 + payload.count)) + Self.u16(type) + Self.u16(2) + Self.u32(sequence)
        out += Self.u32(0) + payload
        while out.count % 4 != 0 { out.append(0) }
        return out
    }

    static func walk(_ bytes: [UInt8], sequence: UInt32) -> (Bool?, [(UInt16, [UInt8])]) {
        var seen: [(UInt16, [UInt8])] = []
        let outcome = bytes.withUnsafeBytes { raw in
            LinkAddressDump.walk(raw, sequence: sequence) { type, payload in seen.append((type, Array(payload))) }
        }
        return (outcome, seen)
    }

    @Test("an IPv4 address message: its interface and IFA_LOCAL (not the point-to-point peer's IFA_ADDRESS)")
    func ipv4Address() throws {
        let payload =
            [UInt8(AF_INET), 32, 0, 0] + Self.u32(5) + Self.attribute(1, [198, 18, 9, 9])
            + Self.attribute(2, [198, 18, 5, 1])
        let (index, address) = try #require(payload.withUnsafeBytes { LinkAddressDump.parseAddress($0) })
        #expect(index == 5)
        #expect(address == IPAddress("198.18.5.1")!)
        // IFA_ADDRESS alone (a broadcast interface sends both equal; some send only it).
        let only = [UInt8(AF_INET), 24, 0, 0] + Self.u32(7) + Self.attribute(1, [198, 18, 5, 2])
        #expect(only.withUnsafeBytes { LinkAddressDump.parseAddress($0) }?.1 == IPAddress("198.18.5.2")!)
        // A value of the wrong size, or no address at all: nothing.
        let bad = [UInt8(AF_INET), 24, 0, 0] + Self.u32(7) + Self.attribute(2, [198, 18, 5])
        #expect(bad.withUnsafeBytes { LinkAddressDump.parseAddress($0) } == nil)
        #expect([UInt8(AF_INET), 24, 0].withUnsafeBytes { LinkAddressDump.parseAddress($0) } == nil)
    }

    @Test(
        "change notifications: added and removed, IPv4 and IPv6, other messages skipped, a truncated one ends the walk"
    )
    func notifications() {
        let v4 = [UInt8(AF_INET), 24, 0, 0] + Self.u32(3) + Self.attribute(2, [198, 18, 77, 1])
        let v6Address: [UInt8] = [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [1]
        let v6 = [UInt8(AF_INET6), 64, 0, 0] + Self.u32(4) + Self.attribute(1, v6Address)
        let link = [0, 0] + Self.u16(1) + Self.u32(4) + Self.u32(1) + Self.u32(0)
        // A notification carries the sequence number of the request that caused it (0 for the kernel's own,
        // another process's otherwise); a datagram may hold several.
        let datagram =
            Self.message(20, sequence: 0, v4) + Self.message(16, sequence: 0, link) + Self.message(21, sequence: 7, v6)
        let messages = datagram.withUnsafeBytes { LinkAddressDump.addressMessages($0) }
        #expect(
            messages == [
                .init(added: true, interfaceIndex: 3, address: IPAddress("198.18.77.1")!, prefixLength: 24),
                .init(added: false, interfaceIndex: 4, address: IPAddress("2001:db8::1")!, prefixLength: 64),
            ]
        )
        // A message whose length runs past the datagram: the ones before it, then nothing.
        var truncated = Self.message(20, sequence: 0, v4) + Self.message(21, sequence: 0, v6)
        truncated.removeLast(4)
        let some = truncated.withUnsafeBytes { LinkAddressDump.addressMessages($0) }
        #expect(some.count == 1 && some.first?.added == true)
        // An address message without an address, and a header shorter than its own length field says: none.
        let empty = Self.message(20, sequence: 0, [UInt8(AF_INET), 24, 0, 0] + Self.u32(3))
        #expect(empty.withUnsafeBytes { LinkAddressDump.addressMessages($0) }.isEmpty)
        #expect([UInt8](repeating: 0, count: 12).withUnsafeBytes { LinkAddressDump.addressMessages($0) }.isEmpty)
    }

    @Test("a link message: index, flags and name")
    func link() throws {
        let flags = UInt32(IFF_UP) | UInt32(IFF_LOOPBACK)
        let payload =
            [0, 0] + Self.u16(772) + Self.u32(1) + Self.u32(flags) + Self.u32(0)
            + Self.attribute(3, Array("lo".utf8) + [0])
        let link = try #require(payload.withUnsafeBytes { LinkAddressDump.parseLink($0) })
        #expect(link == LinkAddressDump.Interface(index: 1, name: "lo", flags: flags))
        // Without a name: not a link we can exclude by name, so none.
        let nameless = [0, 0] + Self.u16(1) + Self.u32(2) + Self.u32(flags) + Self.u32(0)
        #expect(nameless.withUnsafeBytes { LinkAddressDump.parseLink($0) } == nil)
    }

    @Test("a datagram: messages handed on, another request's skipped, the end, errors, a truncated message")
    func datagrams() {
        let address = [UInt8(AF_INET), 32, 0, 0] + Self.u32(5) + Self.attribute(2, [198, 18, 5, 1])
        // Two messages, then NLMSG_DONE: both handed on, the dump ended.
        var (outcome, seen) = Self.walk(
            Self.message(20, sequence: 9, address) + Self.message(20, sequence: 9, address)
                + Self.message(3, sequence: 9, Self.u32(0)),
            sequence: 9
        )
        #expect(outcome == true && seen.count == 2 && seen[0].0 == 20 && seen[0].1 == address)
        // More to come (no NLMSG_DONE yet): nil.
        (outcome, seen) = Self.walk(Self.message(20, sequence: 9, address), sequence: 9)
        #expect(outcome == nil && seen.count == 1)
        // Another request's messages are skipped.
        (outcome, seen) = Self.walk(Self.message(20, sequence: 8, address), sequence: 9)
        #expect(outcome == nil && seen.isEmpty)
        // NLMSG_ERROR: an acknowledgement (0) and an interface gone in between (-ENODEV) end the dump;
        // anything else (-EPERM) fails it.
        for (code, want) in [(Int32(0), true), (-ENODEV, true), (-EPERM, false)] {
            (outcome, _) = Self.walk(Self.message(2, sequence: 9, Self.u32(UInt32(bitPattern: code))), sequence: 9)
            #expect(outcome == want, "error \(code)")
        }
        // A length past the datagram's end, or under a header's: failed, nothing handed on.
        var truncated = Self.message(20, sequence: 9, address)
        truncated.removeLast(4)
        (outcome, seen) = Self.walk(truncated, sequence: 9)
        #expect(outcome == false && seen.isEmpty)
        (outcome, seen) = Self.walk(Self.u32(8) + Self.u16(20) + Self.u16(0) + Self.u32(9) + Self.u32(0), sequence: 9)
        #expect(outcome == false && seen.isEmpty)
    }
}
#endif
