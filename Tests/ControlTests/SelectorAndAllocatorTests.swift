import Control
import MeshCore
import MeshTestSupport
import Testing

@Suite(.rationed) struct LabelSelectorTests {
    @Test func parsesAndMatches() throws {
        let s = try LabelSelector(parsing: "app=web, tier!=db,canary,!legacy")
        #expect(
            s.requirements == [
                .equals("app", "web"), .notEquals("tier", "db"), .exists("canary"), .notExists("legacy"),
            ]
        )
        #expect(s.matches(["app": "web", "canary": ""]))
        #expect(!s.matches(["app": "web", "canary": "", "legacy": "1"]))
        #expect(!s.matches(["app": "web", "tier": "db", "canary": ""]))
        #expect(!s.matches(["app": "api", "canary": ""]))
        #expect(try LabelSelector(parsing: "a==b").matches(["a": "b"]))
    }

    @Test(arguments: ["", "a,,b", "=x", "a b=c"])
    func rejects(_ text: String) {
        #expect(throws: SelectorError.self) { try LabelSelector(parsing: text) }
    }
}

@Suite(.rationed) struct VIPAllocatorTests {
    @Test func proposesFreeAddressesSkippingNetworkAndBroadcast() throws {
        let v4 = try #require(CIDR("198.18.0.0/29"))
        let a = VIPAllocator(cidrs: [v4])
        var got: [String] = []
        while let ip = a.propose(family: .ipv4) {
            got.append(ip.description)
            a.markUsed(ip)
        }
        #expect(got == (1...6).map { "198.18.0.\($0)" })
        a.markFree(IPAddress("198.18.0.3")!)
        #expect(a.propose(family: .ipv4)?.description == "198.18.0.3")
        #expect(a.propose(family: .ipv6) == nil)
    }

    @Test func cursorMovesOnSoAFreedAddressIsNotReusedAtOnce() throws {
        let a = VIPAllocator(cidrs: [try #require(CIDR("198.18.0.0/24"))])
        let first = try #require(a.propose(family: .ipv4))
        a.markUsed(first)
        a.markFree(first)
        #expect(a.propose(family: .ipv4) != first)
    }

    @Test func rejectsAddressesOutsideOrReserved() throws {
        let a = VIPAllocator(cidrs: [try #require(CIDR("127.77.0.0/16")), try #require(CIDR("fd77::/112"))])
        #expect(a.rejection(of: IPAddress("127.77.0.9")!) == nil)
        #expect(a.rejection(of: IPAddress("fd77::9")!) == nil)
        #expect(a.rejection(of: IPAddress("127.78.0.1")!)?.contains("outside") == true)
        #expect(a.rejection(of: IPAddress("127.77.0.0")!)?.contains("network or broadcast") == true)
        #expect(a.rejection(of: IPAddress("127.77.255.255")!)?.contains("network or broadcast") == true)
        #expect(a.propose(family: .ipv6)?.description == "fd77::1")
    }
}
