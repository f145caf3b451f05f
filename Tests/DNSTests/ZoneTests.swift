import MeshCore
import MeshTestSupport
import Synchronization
import Testing

@testable import DNS

@Suite("Service zone answers")
struct ZoneTests {
    let zone = fixtureZone()

    func answers(_ r: AskResult) -> [DNSRData] { r.response?.answers.map(\.data) ?? [] }

    @Test("A and AAAA for a service VIP, byte for byte")
    func serviceVIP() throws {
        let r = try ask(zone, "web.shop.svc.cluster.local", .a)
        let expected = hex(
            """
            4242 8580 0001 0001 0000 0000
            03776562 0473686f70 03737663 07636c7573746572 056c6f63616c 00 0001 0001
            c00c 0001 0001 0000001e 0004 0a60000a
            """
        )
        #expect(r.raw == expected)
        let v6 = try ask(zone, "web.shop.svc.cluster.local", .aaaa)
        #expect(answers(v6) == [.aaaa(ip("fd00:96::10"))])
        #expect(v6.response?.header.authoritative == true)
        #expect(v6.response?.answers.first?.ttl == 30)
    }

    @Test("SRV per named port targets the service, with its addresses as additionals")
    func serviceSRV() throws {
        let r = try ask(zone, "_http._tcp.web.shop.svc.cluster.local", .srv)
        #expect(answers(r) == [.srv(priority: 0, weight: 100, port: 80, target: name("web.shop.svc.cluster.local"))])
        #expect(Set(r.response!.additionals.map(\.data)) == [.a(ip("10.96.0.10")), .aaaa(ip("fd00:96::10"))])
        let udp = try ask(zone, "_dns._udp.web.shop.svc.cluster.local", .srv)
        #expect(answers(udp) == [.srv(priority: 0, weight: 100, port: 53, target: name("web.shop.svc.cluster.local"))])
        // Wrong protocol: the name does not exist. The unnamed port has no SRV at all.
        #expect(try ask(zone, "_http._udp.web.shop.svc.cluster.local", .srv).response?.rcode == .nxDomain)
        let all = try ask(zone, "web.shop.svc.cluster.local", .srv)
        #expect(all.response?.rcode == .noError && all.response?.answers.isEmpty == true)
    }

    @Test("headless: every ready endpoint, per-host names, SRV per host and port")
    func headless() throws {
        let a = try ask(zone, "db.shop.svc.cluster.local", .a)
        #expect(Set(answers(a)) == [.a(ip("10.1.0.1")), .a(ip("10.1.0.2")), .a(ip("10.1.0.3"))])
        #expect(answers(try ask(zone, "db.shop.svc.cluster.local", .aaaa)) == [.aaaa(ip("fd00:1::5"))])
        #expect(answers(try ask(zone, "db-0.db.shop.svc.cluster.local", .a)) == [.a(ip("10.1.0.1"))])
        #expect(answers(try ask(zone, "db-4.db.shop.svc.cluster.local", .aaaa)) == [.aaaa(ip("fd00:1::5"))])
        // Without a hostname the address stands in; the unready endpoint is not published.
        #expect(answers(try ask(zone, "10-1-0-3.db.shop.svc.cluster.local", .a)) == [.a(ip("10.1.0.3"))])
        #expect(try ask(zone, "db-3.db.shop.svc.cluster.local", .a).response?.rcode == .nxDomain)
        let srv = try ask(zone, "_pg._tcp.db.shop.svc.cluster.local", .srv)
        let targets = Set(
            answers(srv).compactMap { d -> String? in
                guard case .srv(_, _, let port, let target) = d, port == 5432 else { return nil }
                return target.description
            }
        )
        #expect(
            targets == [
                "db-0.db.shop.svc.cluster.local.", "db-1.db.shop.svc.cluster.local.",
                "10-1-0-3.db.shop.svc.cluster.local.", "db-4.db.shop.svc.cluster.local.",
            ]
        )
        #expect(srv.response!.additionals.count == 4)
        // PTR for a headless endpoint.
        #expect(answers(try ask(zone, "1.0.1.10.in-addr.arpa", .ptr)) == [.ptr(name("db-0.db.shop.svc.cluster.local"))])
    }

    @Test("a headless service without ready endpoints does not exist")
    func headlessNoReady() throws {
        let r = try ask(zone, "empty.shop.svc.cluster.local", .a)
        #expect(r.response?.rcode == .nxDomain)
    }

    @Test("PTR for IPv4 and IPv6 VIPs; unknown reverse names go upstream")
    func reverse() throws {
        let v4 = try ask(zone, "10.0.96.10.in-addr.arpa", .ptr)
        #expect(answers(v4) == [.ptr(name("web.shop.svc.cluster.local"))])
        #expect(v4.response?.header.authoritative == true)
        let v6name = ip("fd00:96::10").reverseName
        #expect(answers(try ask(zone, v6name, .ptr)) == [.ptr(name("web.shop.svc.cluster.local"))])
        #expect(try ask(zone, "1.2.0.192.in-addr.arpa", .ptr).forwarded != nil)
    }

    @Test("NXDOMAIN and NODATA carry the SOA with the negative TTL")
    func negative() throws {
        let input = ZoneInput(ttl: 30, negativeTTL: 7, services: fixtureInput().services)
        let z = try DNSZone(input)
        let nx = try ask(z, "nope.shop.svc.cluster.local", .a)
        #expect(nx.response?.rcode == .nxDomain)
        #expect(nx.response?.header.authoritative == true)
        #expect(nx.response?.answers.isEmpty == true)
        let soa = try #require(nx.response?.authorities.first)
        #expect(soa.name == name("cluster.local") && soa.ttl == 7)
        guard case .soa(let data) = soa.data else {
            Issue.record("not an SOA")
            return
        }
        #expect(data.minimum == 7 && data.mname == name("ns.dns.cluster.local"))
        // NODATA: the name exists, the type does not.
        let nodata = try ask(z, "internal.ops.svc.cluster.local", .aaaa)
        #expect(nodata.response?.rcode == .noError && nodata.response?.answers.isEmpty == true)
        #expect(nodata.response?.authorities.first?.type == .soa)
        // Empty non-terminals are NODATA, not NXDOMAIN.
        for ent in ["shop.svc.cluster.local", "svc.cluster.local", "_tcp.web.shop.svc.cluster.local"] {
            let r = try ask(z, ent, .a)
            #expect(r.response?.rcode == .noError, "\(ent)")
            #expect(r.response?.authorities.first?.type == .soa, "\(ent)")
        }
        #expect(try ask(z, "nope.svc.cluster.local", .a).response?.rcode == .nxDomain)
    }

    @Test("the apex answers SOA and NS; dns-version answers TXT")
    func apex() throws {
        let soa = try ask(zone, "cluster.local", .soa)
        #expect(soa.response?.answers.first?.type == .soa)
        #expect(answers(try ask(zone, "cluster.local", .ns)) == [.ns(name("ns.dns.cluster.local"))])
        #expect(answers(try ask(zone, "dns-version.cluster.local", .txt)) == [.txt([Array("1.1.0".utf8)])])
    }

    @Test("exported services also answer under clusterset.local")
    func clusterset() throws {
        let r = try ask(zone, "web.shop.svc.clusterset.local", .a)
        #expect(answers(r) == [.a(ip("10.96.0.10"))])
        let srv = try ask(zone, "_http._tcp.web.shop.svc.clusterset.local", .srv)
        #expect(
            answers(srv) == [.srv(priority: 0, weight: 100, port: 80, target: name("web.shop.svc.clusterset.local"))]
        )
        let notExported = try ask(zone, "internal.ops.svc.clusterset.local", .a)
        #expect(notExported.response?.rcode == .nxDomain)
        #expect(notExported.response?.authorities.first?.name == name("clusterset.local"))
    }

    @Test("names compare case-insensitively and the question echoes the client's case (0x20)")
    func caseHandling() throws {
        let r = try ask(zone, "WeB.sHoP.SvC.ClUsTeR.LoCaL", .a)
        #expect(answers(r) == [.a(ip("10.96.0.10"))])
        #expect(r.response?.questions.first?.name.wire == name("WeB.sHoP.SvC.ClUsTeR.LoCaL").wire)
    }

    @Test("search-list expansions of service names are NXDOMAIN without going upstream")
    func searchListJunk() throws {
        for junk in [
            "web.shop.svc.cluster.local.shop.svc.cluster.local",
            "foo.svc.cluster.local.cluster.local",
            "web.shop.svc.cluster.local.example.com",
        ] {
            let r = try ask(zone, junk, .a)
            #expect(r.forwarded == nil, "\(junk)")
            #expect(r.response?.rcode == .nxDomain, "\(junk)")
        }
        // Other names are forwarded.
        let f = try #require(try ask(zone, "www.Example.com", .a).forwarded)
        #expect(f.question.name == name("www.Example.com") && f.question.type == .a)
        // Without forwarding they are refused.
        let refused = try ask(zone, "www.example.com", .a, policy: AnswerPolicy(forwarding: false))
        #expect(refused.response?.rcode == .refused)
    }

    @Test("ExternalName: a CNAME, chased in the zone or forwarded for its target")
    func externalName() throws {
        let ext = try ask(zone, "ext.shop.svc.cluster.local", .a)
        let f = try #require(ext.forwarded)
        #expect(f.cname?.data == .cname(name("www.example.org")))
        #expect(f.upstreamQuestion.name == name("www.example.org"))
        let cnameOnly = try ask(zone, "ext.shop.svc.cluster.local", .cname)
        #expect(answers(cnameOnly) == [.cname(name("www.example.org"))])
        let alias = try ask(zone, "alias.shop.svc.cluster.local", .a)
        #expect(answers(alias) == [.cname(name("web.shop.svc.cluster.local")), .a(ip("10.96.0.10"))])
        #expect(alias.response?.answers[1].name == name("web.shop.svc.cluster.local"))
    }

    @Test("UDP answers that do not fit set TC; TCP carries them whole")
    func truncation() throws {
        let endpoints = (0..<300).map { DNSEndpoint(ip: .v4(0x0A02_0000 | UInt32($0))) }
        let z = try DNSZone(ZoneInput(services: [DNSService(name: "big", namespace: "ns", endpoints: endpoints)]))
        let udp = try ask(z, "big.ns.svc.cluster.local", .a)
        #expect(udp.response?.header.truncated == true && udp.response?.answers.isEmpty == true)
        #expect(udp.raw.count <= 512)
        let edns = try ask(z, "big.ns.svc.cluster.local", .a, edns: DNSEDNS(udpPayloadSize: 4096))
        #expect(edns.response?.header.truncated == true)
        #expect(edns.response?.edns?.udpPayloadSize == 1232)
        let tcp = try ask(z, "big.ns.svc.cluster.local", .a, tcp: true)
        #expect(tcp.response?.header.truncated == false && tcp.response?.answers.count == 300)
        // 60 fit in 1232 bytes with EDNS: not truncated.
        let mid = try DNSZone(
            ZoneInput(services: [DNSService(name: "m", namespace: "ns", endpoints: Array(endpoints.prefix(60)))])
        )
        let fits = try ask(mid, "m.ns.svc.cluster.local", .a, edns: DNSEDNS(udpPayloadSize: 1232))
        #expect(fits.response?.header.truncated == false && fits.response?.answers.count == 60)
        #expect(try ask(mid, "m.ns.svc.cluster.local", .a).response?.header.truncated == true)
    }

    @Test("EDNS: OPT echoed with our size and the DO bit; version 1 gets BADVERS")
    func edns() throws {
        let r = try ask(zone, "web.shop.svc.cluster.local", .a, edns: DNSEDNS(udpPayloadSize: 4096, dnssecOK: true))
        #expect(r.response?.edns == DNSEDNS(udpPayloadSize: 1232, dnssecOK: true))
        let bad = try ask(zone, "web.shop.svc.cluster.local", .a, edns: DNSEDNS(version: 1))
        #expect(bad.response?.rcode == .badVers && bad.response?.answers.isEmpty == true)
    }

    @Test("garbage: FORMERR when the header is readable, dropped otherwise")
    func garbage() throws {
        #expect(try askRaw(zone, [1, 2, 3]).dropped)
        // A response (QR set) is never answered.
        var response = try ask(zone, "web.shop.svc.cluster.local", .a).raw
        #expect(try askRaw(zone, response).dropped)
        // Header readable, question broken.
        response = hex("abcd 0100 0001 0000 0000 0000 05 6162")
        let r = try askRaw(zone, response)
        #expect(r.response?.rcode == .formErr && r.response?.header.id == 0xABCD && r.malformed)
        // Two questions.
        #expect(
            try askRaw(zone, hex("0001 0000 0002 0000 0000 0000 0000010001 0000010001")).response?.rcode == .formErr
        )
        // Opcode STATUS (2): not implemented.
        #expect(try askRaw(zone, hex("0001 1000 0000 0000 0000 0000")).response?.rcode == .notImp)
        // Class CHAOS is refused; AXFR is refused.
        let chaos = DNSMessage(questions: [DNSQuestion(name: name("version.bind"), type: .txt, qclass: 3)])
        #expect(try askRaw(zone, try chaos.encode()).response?.rcode == .refused)
        #expect(try ask(zone, "cluster.local", .axfr).response?.rcode == .refused)
    }

    @Test("zone updates swap atomically under concurrent queries")
    func atomicSwap() async throws {
        // Version v: one headless service with 50 endpoints 10.v.0.i and a VIP service 10.v.1.1.
        @Sendable func input(_ v: UInt32) -> ZoneInput {
            ZoneInput(services: [
                DNSService(
                    name: "h",
                    namespace: "ns",
                    endpoints: (0..<50).map { DNSEndpoint(ip: .v4(0x0A00_0000 | v << 16 | UInt32($0))) }
                ),
                DNSService(name: "s", namespace: "ns", clusterIPs: [.v4(0x0A00_0000 | v << 16 | 0x0101)]),
            ])
        }
        let store = DNSZoneStore(try DNSZone(input(0)))
        let counters = SwapCounters()
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask {
                for v in 1...40 {
                    try store.update(input(UInt32(v)))
                    try await Task.sleep(for: .milliseconds(2))
                }
                counters.doneFlag.store(true, ordering: .sequentiallyConsistent)
            }
            // The readers spin on threads of their own, as the DNS server's threads do: on the
            // cooperative pool two spinning readers would hold both of its threads (2 cores) and starve
            // the updater, and every other test of the process, until their bound ran out.
            for _ in 0..<2 {
                group.addTask {
                    try await blocking {
                        var n = 0
                        while !counters.doneFlag.load(ordering: .sequentiallyConsistent) && n < 200_000 {
                            n += 1
                            let r = try ask(store.zone, "h.ns.svc.cluster.local", .a, tcp: true)
                            let versions = Set(
                                r.response!.answers.compactMap { rec -> UInt32? in
                                    guard case .a(.v4(let v)) = rec.data else { return nil }
                                    return (v >> 16) & 0xFF
                                }
                            )
                            if versions.count != 1 || r.response!.answers.count != 50 {
                                counters.inconsistentCount.add(1, ordering: .relaxed)
                            }
                            counters.queriedCount.add(1, ordering: .relaxed)
                        }
                    }
                }
            }
            try await group.waitForAll()
        }
        #expect(counters.inconsistentCount.load(ordering: .relaxed) == 0)
        #expect(counters.queriedCount.load(ordering: .relaxed) > 10)
        #expect(store.zone.serial == 41)
        #expect(try ask(store.zone, "s.ns.svc.cluster.local", .a).response?.answers.first?.data == .a(.v4(0x0A28_0101)))
    }

    @Test("10,000 services with 100,000 endpoints build and answer by dictionary lookup")
    func scale() async throws {
        // CPU-bound for seconds in a debug build: on a thread of its own, not one of the cooperative pool's.
        try await blocking { try Self.scaleBody() }
    }

    static func scaleBody() throws {
        var services: [DNSService] = []
        for i in 0..<9_000 {
            services.append(
                DNSService(
                    name: "s\(i)",
                    namespace: "n\(i % 50)",
                    clusterIPs: [.v4(0x0A60_0000 | UInt32(i))],
                    ports: [DNSServicePort(name: "http", port: 80)]
                )
            )
        }
        for i in 0..<1_000 {
            let eps = (0..<100).map {
                DNSEndpoint(ip: .v4(0x0B00_0000 | UInt32(i) << 8 | UInt32($0)), hostname: "p\($0)")
            }
            services.append(
                DNSService(
                    name: "h\(i)",
                    namespace: "n\(i % 50)",
                    ports: [DNSServicePort(name: "http", port: 80)],
                    endpoints: eps
                )
            )
        }
        let z = try DNSZone(ZoneInput(services: services))
        #expect(z.problems.isEmpty)
        #expect(z.nameCount > 200_000)
        // Every name answers (how fast is perf/dns's business, not a unit test's).
        for i in 0..<20_000 {
            let r = try ask(z, "s\(i % 9_000).n\(i % 9_000 % 50).svc.cluster.local", .a)
            if r.response?.answers.count != 1 { Issue.record("missing answer for s\(i % 9_000)") }
        }
        #expect(try ask(z, "p7.h3.n3.svc.cluster.local", .a).response?.answers.first?.data == .a(.v4(0x0B00_0307)))
    }

    @Test("invalid names are skipped and reported, the rest of the zone builds")
    func invalidNames() throws {
        let z = try DNSZone(
            ZoneInput(services: [
                DNSService(name: "bad.name", namespace: "ns", clusterIPs: [ip("10.0.0.1")]),
                DNSService(name: "ok", namespace: "ns", clusterIPs: [ip("10.0.0.2")]),
            ])
        )
        #expect(z.problems.count == 1)
        #expect(
            z.records(for: name("ok.ns.svc.cluster.local"), type: .a) == [
                DNSRecord(name: name("ok.ns.svc.cluster.local"), ttl: 30, data: .a(ip("10.0.0.2")))
            ]
        )
    }
}

/// Shared counters of the concurrent swap test. Sendable: every field is an atomic.
final class SwapCounters: Sendable {
    let doneFlag = Atomic<Bool>(false)
    let inconsistentCount = Atomic<Int>(0)
    let queriedCount = Atomic<Int>(0)
}

/// `ZoneNode`: the rare record kinds in a box most nodes do not have, copied on write.
@Suite(.rationed) struct ZoneNodeStorageTests {
    @Test func aNodeIsThirtyTwoBytes() {
        #expect(MemoryLayout<ZoneNode>.stride == 32)
    }

    @Test func theRareRecordsAreCopiedOnWrite() {
        var a = ZoneNode()
        #expect(a.apex == -1 && a.cname == nil && a.v6.isEmpty && a.txt.isEmpty)
        a.txt.append([1, 0x61])
        a.apex = 0
        var b = a
        b.txt.append([1, 0x62])
        b.cname = [0]
        b.v6.append(.v6(1, 2))
        // The copy changed, the original did not.
        #expect(a.txt == [[1, 0x61]] && a.cname == nil && a.v6.isEmpty && a.apex == 0)
        #expect(b.txt == [[1, 0x61], [1, 0x62]] && b.cname == [0] && b.v6 == [.v6(1, 2)] && b.apex == 0)
        b.apex = 1
        #expect(a.apex == 0 && b.apex == 1)
    }
}
