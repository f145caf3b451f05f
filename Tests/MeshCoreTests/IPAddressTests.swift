import MeshCore
import Testing

@Suite struct IPAddressTests {
    @Test func parsesAndPrintsIPv4() {
        let a = IPAddress("198.18.0.1")
        #expect(a == .v4(0xC612_0001))
        #expect(a?.description == "198.18.0.1")
        #expect(a?.bytes == [198, 18, 0, 1])
        #expect(a?.isIPv4 == true)
    }

    @Test(arguments: [
        "", "1.2.3", "1.2.3.4.5", "256.1.1.1", "1.2.3.-1", "a.b.c.d", "1.2.3.4 ", "::g", "1:2:3:4:5:6:7:8:9",
    ])
    func rejectsMalformed(_ text: String) {
        #expect(IPAddress(text) == nil)
    }

    @Test func parsesAndPrintsIPv6Canonically() {
        let a = IPAddress("2001:0DB8:0:0:0:0:0:1")
        #expect(a?.description == "2001:db8::1")
        #expect(IPAddress("::1")?.isLoopback == true)
        #expect(IPAddress("::")?.description == "::")
        #expect(IPAddress("fd77::5")?.bytes == [0xfd, 0x77] + Array(repeating: 0, count: 13) + [5])
        #expect(IPAddress(bytes: IPAddress("fd77::5")!.bytes) == IPAddress("fd77::5"))
    }

    @Test func reverseNames() {
        #expect(IPAddress("127.77.0.5")?.reverseName == "5.0.77.127.in-addr.arpa")
        #expect(
            IPAddress("2001:db8::567:89ab")?.reverseName
                == "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        )
    }

    @Test func orderingPutsIPv4First() {
        let list = ["::1", "10.0.0.2", "10.0.0.1"].compactMap { IPAddress($0) }.sorted()
        #expect(list.map(\.description) == ["10.0.0.1", "10.0.0.2", "::1"])
    }

    @Test func cidrContainsAndOffsets() throws {
        let c = try #require(CIDR("127.77.0.0/16"))
        #expect(c.contains(IPAddress("127.77.255.255")!))
        #expect(!c.contains(IPAddress("127.78.0.0")!))
        #expect(!c.contains(IPAddress("::1")!))
        #expect(c.address(at: 258).description == "127.77.1.2")
        #expect(c.offset(of: IPAddress("127.77.1.2")!) == 258)
        #expect(c.hostBits == 16)
        let v6 = try #require(CIDR("fd77::/112"))
        #expect(v6.address(at: 0x1_0001 - 1).description == "fd77::1:0")
        #expect(v6.contains(IPAddress("fd77::ffff")!))
        #expect(!v6.contains(IPAddress("fd77::1:0")!))
    }

    @Test(arguments: ["127.77.0.1/16", "10.0.0.0/33", "10.0.0.0", "x/8", "fd77::1/112", "10.0.0.0/-1"])
    func rejectsBadCIDRs(_ text: String) {
        #expect(CIDR(text) == nil)
    }
}
