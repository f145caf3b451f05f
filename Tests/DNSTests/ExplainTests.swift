import Foundation
import MeshCore
import MeshTestSupport
import Testing

@testable import DNS

/// `DNSServer.explain`, what `meshctl dns` shows: the same answer a client gets (checked against dig), and
/// the right source for each way an answer is made.
@Suite(
    "Explained lookups",
    .serialized,
    .enabled(if: digPath != nil, "dig is not installed (apt-get install dnsutils)"),
    .rationed,
)
struct ExplainTests {
    @Test("the mesh zone, the upstream, then the cache with its TTL left; the answers are dig's")
    func sources() async throws {
        let upstream = try await RunningServer.start(zone: upstreamInput())
        let fwd = DNSForwardingConfiguration(
            upstreams: ["127.0.0.1:\(upstream.port)"],
            // Generous: on a loaded machine the in-process upstream may take a while to answer, and what
            // is tested is where an answer came from, not how fast.
            timeout: .seconds(5),
            attempts: 1
        )
        let s = try await RunningServer.start(zone: meshInput(), forwarding: fwd)

        let zone = try await s.server.explain(name: "web.shop.svc.cluster.local", type: .a)
        #expect(zone.source == .zone)
        #expect(zone.rcode == "NOERROR")
        #expect(zone.answers == (try await digAnswers(s.port, ["web.shop.svc.cluster.local", "A"])))
        #expect(zone.answers.count == 1 && zone.answers[0].hasSuffix("IN A 10.96.0.10"))

        let missing = try await s.server.explain(name: "nope.shop.svc.cluster.local", type: .a)
        #expect(missing.source == .zone && missing.rcode == "NXDOMAIN" && missing.answers.isEmpty)

        let first = try await s.server.explain(name: "api.prod.svc.remote.test", type: .a)
        #expect(first.source == .upstream)
        #expect(first.upstream == "127.0.0.1:\(upstream.port)")
        #expect(first.answers == ["api.prod.svc.remote.test. 60 IN A 192.0.2.80"])

        let second = try await s.server.explain(name: "api.prod.svc.remote.test", type: .a)
        #expect(second.source == .cache)
        #expect(second.upstream == "127.0.0.1:\(upstream.port)")
        let left = try #require(second.ttlLeft)
        #expect(left > 0 && left <= 60)
        // What a client gets from the same cache entry.
        #expect(
            (try await digAnswers(s.port, ["api.prod.svc.remote.test", "A"])).map { $0.replacingTTL() }
                == second.answers.map { $0.replacingTTL() }
        )

        // An ExternalName service: its CNAME from the zone heads the upstream's answer.
        let ext = try await s.server.explain(name: "ext2.shop.svc.cluster.local", type: .a)
        #expect(ext.source == .upstream || ext.source == .cache)
        #expect(ext.answers.first == "ext2.shop.svc.cluster.local. 30 IN CNAME www.org.svc.remote.test.")
        #expect(ext.detail.contains("ExternalName"))

        // The upstream gone and nothing cached: SERVFAIL from the agent, and it says why.
        await upstream.stop()
        let failed = try await s.server.explain(name: "api.prod.svc.remote.test", type: .aaaa)
        #expect(failed.source == .agent && failed.rcode == "SERVFAIL")
        #expect(failed.detail.contains("upstream"))
        await s.stop()
    }

    @Test("without forwarding: names outside the zone are refused, and the detail says so")
    func refused() async throws {
        let s = try await RunningServer.start(zone: meshInput(), forwarding: nil)
        let r = try await s.server.explain(name: "example.org", type: .a)
        #expect(r.source == .agent && r.rcode == "REFUSED")
        #expect(r.detail.contains("forwards no names"))
        let expansion = try await s.server.explain(name: "web.shop.svc.cluster.local.corp.test", type: .a)
        #expect(expansion.rcode == "NXDOMAIN" && expansion.detail.contains("search-list"))
        await s.stop()
    }

    @Test("bad names and types are errors; a stopped server says it is not running")
    func badInput() async throws {
        #expect(DNSType(text: "srv") == .srv)
        #expect(DNSType(text: "65") == DNSType(65))
        #expect(DNSType(text: "BOGUS") == nil)
        let s = try await RunningServer.start(zone: meshInput(), forwarding: nil)
        let long = String(repeating: "a", count: 64) + ".test"
        await #expect(throws: DNSExplainError.self) { try await s.server.explain(name: long, type: .a) }
        await s.stop()
        await #expect(throws: DNSExplainError.self) { try await s.server.explain(name: "web.shop", type: .a) }
    }

    @Test("records in presentation form, as dig prints them")
    func presentation() throws {
        let name = try DNSName("x.test")
        let target = try DNSName("t.test")
        #expect(DNSRecord(name: name, ttl: 5, data: .a(ip("192.0.2.1"))).presentation == "x.test. 5 IN A 192.0.2.1")
        #expect(
            DNSRecord(name: name, ttl: 5, data: .srv(priority: 0, weight: 1, port: 80, target: target)).presentation
                == "x.test. 5 IN SRV 0 1 80 t.test."
        )
        #expect(DNSRecord(name: name, ttl: 5, data: .txt([Array("hi".utf8)])).presentation == "x.test. 5 IN TXT \"hi\"")
        #expect(
            DNSRecord(name: name, type: DNSType(99), ttl: 5, data: .opaque([0xAB, 0x01])).presentation
                == "x.test. 5 IN TYPE99 \\# 2 ab01"
        )
    }
}

extension String {
    /// The record with its TTL (second field) blanked, for comparing answers read a second apart.
    fileprivate func replacingTTL() -> String {
        var parts = self.split(separator: " ").map(String.init)
        if parts.count > 1 { parts[1] = "_" }
        return parts.joined(separator: " ")
    }
}
