import Foundation
import MeshCore
import Testing

@testable import MeshCtl

/// Golden output of meshctl's tables: column order, alignment (three spaces), `<none>` for empty cells,
/// kubectl's ages, and indented JSON/YAML renderings with members in key order (stable for scripts and diffs).
@Suite struct PrinterTests {
    static let created = "2026-12-03T10:00:00Z"
    static var now: Int { Timestamp.parse(Self.created)! + 300 }

    func objects(_ json: String) throws -> [JSONValue] {
        guard case .array(let items) = try JSONValue.parse(json: Data(json.utf8)) else {
            Issue.record("not an array")
            return []
        }
        return items
    }

    @Test func servicesTableIsAlignedInAFixedColumnOrder() throws {
        let items = try self.objects(
            """
            [{"metadata": {"name": "web", "namespace": "shop", "creationTimestamp": "\(Self.created)"},
              "spec": {"clusterIP": "127.77.0.2", "ports": [{"port": 80, "protocol": "HTTP"}], "exported": true}},
             {"metadata": {"name": "cart", "namespace": "shop", "creationTimestamp": "\(Self.created)"},
              "spec": {"ports": [{"port": 8080}, {"port": 9090, "protocol": "UDP"}],
                       "loadBalancer": {"policy": "consistentHash", "hashOn": {"header": "x-user"}}}}]
            """
        )
        let (header, rows) = Printer.rows(MeshService.resource, items, allNamespaces: true, wide: false, now: Self.now)
        let table = Printer.table(header, rows)
        #expect(
            table == """
                NAMESPACE   NAME   VIP          PORTS               POLICY                          EXPORTED   AGE
                shop        web    127.77.0.2   80/HTTP             roundRobin                      yes        5m
                shop        cart   <pending>    8080/TCP,9090/UDP   consistentHash(header:x-user)   no         5m

                """
        )
    }

    @Test func endpointsTableCutsLongListsAndWideShowsSites() throws {
        let items = try self.objects(
            """
            [{"metadata": {"name": "web", "creationTimestamp": "\(Self.created)"},
              "spec": {"addresses": [
                {"ip": "198.19.1.2", "ports": [{"port": 80}], "site": "a"},
                {"ip": "198.19.2.2", "ports": [{"port": 80}], "site": "b", "ready": false},
                {"ip": "fd00::1", "ports": [{"port": 80}, {"port": 81}], "site": "a"}]}},
             {"metadata": {"name": "empty", "creationTimestamp": "\(Self.created)"}, "spec": {"addresses": []}}]
            """
        )
        let narrow = Printer.rows(Endpoints.resource, items, allNamespaces: false, wide: false, now: Self.now)
        #expect(
            Printer.table(narrow.header, narrow.rows) == """
                NAME    ENDPOINTS                                              READY   AGE
                web     198.19.1.2:80,198.19.2.2:80,[fd00::1]:80 + 1 more...   2/3     5m
                empty   <none>                                                 0/0     5m

                """
        )
        let wide = Printer.rows(Endpoints.resource, items, allNamespaces: false, wide: true, now: Self.now)
        #expect(wide.header == ["NAME", "ENDPOINTS", "READY", "SITES", "AGE"])
        #expect(wide.rows[0] == ["web", "198.19.1.2:80,198.19.2.2:80,[fd00::1]:80,[fd00::1]:81", "2/3", "a,b", "5m"])
        #expect(wide.rows[1][3] == "")
    }

    @Test func nodesTableSaysNoneAndNever() throws {
        let items = try self.objects(
            """
            [{"metadata": {"name": "edge-a1", "creationTimestamp": "\(Self.created)"},
              "spec": {"site": "a", "addresses": [{"address": "198.19.1.2"}]},
              "status": {"phase": "Ready", "lastHeartbeatTime": "2026-12-03T10:04:50Z"}},
             {"metadata": {"name": "edge-b1", "creationTimestamp": "\(Self.created)"}, "spec": {}}]
            """
        )
        let (header, rows) = Printer.rows(Node.resource, items, allNamespaces: true, wide: false, now: Self.now)
        #expect(
            Printer.table(header, rows) == """
                NAME      STATUS    SITE     ADDRESSES    LAST-SEEN   AGE
                edge-a1   Ready     a        198.19.1.2   10s         5m
                edge-b1   Unknown   <none>   <none>       <never>     5m

                """
        )
    }

    @Test func relaysTableShowsAddressesSessionsAndTheLastUpdate() throws {
        let items = try self.objects(
            """
            [{"metadata": {"name": "r1", "creationTimestamp": "\(Self.created)"},
              "spec": {"site": "cloud", "addresses": ["198.18.0.10:7800", "[2001:db8::1]:7800"]},
              "status": {"phase": "Ready", "lastUpdateTime": "2026-12-03T10:04:30Z", "sessions": 12}},
             {"metadata": {"name": "r2", "creationTimestamp": "\(Self.created)"}, "spec": {"addresses": []}}]
            """
        )
        let (header, rows) = Printer.rows(Relay.resource, items, allNamespaces: true, wide: false, now: Self.now)
        #expect(
            Printer.table(header, rows) == """
                NAME   STATUS    SITE     ADDRESSES                             SESSIONS   UPDATED   AGE
                r1     Ready     cloud    198.18.0.10:7800,[2001:db8::1]:7800   12         30s       5m
                r2     Unknown   <none>   <none>                                0          <never>   5m

                """
        )
    }

    @Test func peersTableShowsPathRelayRTTAndBytes() throws {
        let value = try JSONValue.parse(
            json: Data(
                """
                {"node": "a", "site": "a", "linkListen": "0.0.0.0:7900", "items": [
                  {"node": "b", "site": "b", "path": "direct", "rttMicros": 840, "streams": 2,
                   "bytesSent": 1536, "bytesReceived": 104857600, "since": "2026-12-03T10:00:00Z", "dialer": "a"},
                  {"node": "c", "path": "relayed", "relay": "r1", "rttMicros": 41000, "streams": 0,
                   "bytesSent": 0, "bytesReceived": 12, "since": "2026-12-03T10:01:00Z", "dialer": "c"}]}
                """.utf8
            )
        )
        #expect(
            PeersView.table(value, wide: false) == """
                node a, site a, links on 0.0.0.0:7900
                NODE   SITE     PATH      RELAY    RTT      STREAMS   SENT     RECEIVED   SINCE
                b      b        direct    <none>   0.84ms   2         1.5KiB   100.0MiB   2026-12-03T10:00:00Z
                c      <none>   relayed   r1       41ms     0         0B       12B        2026-12-03T10:01:00Z

                """
        )
        #expect(
            PeersView.table(try JSONValue.parse(json: Data(#"{"node": "a", "items": []}"#.utf8)), wide: true)
                == "node a, site <none>, links on <none>\nno peer links\n"
        )
    }

    @Test func peersTableShowsNATPunchedPathsAndWhyNotDirect() throws {
        let value = try JSONValue.parse(
            json: Data(
                """
                {"node": "a", "site": "a", "linkListen": "0.0.0.0:7900",
                 "nat": {"mapping": "portPreserving", "udpMapping": "portPreserving", "reflexive": "198.18.0.21:7900"},
                 "items": [
                  {"node": "b", "site": "b", "path": "punched", "rttMicros": 840, "streams": 1, "bytesSent": 10,
                   "bytesReceived": 20, "since": "2026-12-03T10:00:00Z", "dialer": "a", "localNAT": "portPreserving",
                   "peerNAT": "portPreserving", "upgrades": 1, "fallbacks": 0, "upgradeMillis": 223, "records": "mesh",
                   "dataPath": "loop"},
                  {"node": "c", "site": "c", "path": "relayed", "relay": "r1", "rttMicros": 2000, "streams": 0,
                   "bytesSent": 0, "bytesReceived": 0, "since": "2026-12-03T10:01:00Z", "dialer": "a",
                   "reason": "peer mapping random", "localNAT": "portPreserving", "peerNAT": "random",
                   "upgrades": 0, "fallbacks": 0}]}
                """.utf8
            )
        )
        #expect(
            PeersView.table(value, wide: false) == """
                node a, site a, links on 0.0.0.0:7900
                NAT: portPreserving (tcp), portPreserving (udp), reflexive 198.18.0.21:7900
                NODE   SITE   PATH      RELAY    RTT      STREAMS   SENT   RECEIVED   SINCE
                b      b      punched   <none>   0.84ms   1         10B    20B        2026-12-03T10:00:00Z
                c      c      relayed   r1       2.00ms   0         0B     0B         2026-12-03T10:01:00Z
                c: not direct: peer mapping random

                """
        )
        let wide = PeersView.table(value, wide: true)
        #expect(wide.contains("NAT (OWN/PEER)") && wide.contains("TIME TO UPGRADE"), "\(wide)")
        #expect(wide.contains("portPreserving/random") && wide.contains("223ms"), "\(wide)")
        #expect(wide.contains("RECORDS") && wide.contains("DATA PATH"), "\(wide)")
        // The last two columns, RECORDS and DATA PATH.
        func last2(_ node: String) -> [Substring]? {
            wide.split(separator: "\n").first { $0.hasPrefix(node + " ") }.map {
                Array($0.split(separator: " ").suffix(2))
            }
        }
        #expect(last2("b") == ["mesh", "loop"], "\(wide)")
        #expect(last2("c") == ["<none>", "<none>"], "\(wide)")
    }

    @Test func agesAreKubectlShort() {
        #expect(
            [0, 119, 120, 7199, 7200, 172_799, 172_800, -5].map(Printer.duration) == [
                "0s", "119s", "2m", "119m", "2h", "47h", "2d", "0s",
            ]
        )
    }

    @Test func jsonAndYAMLAreIndentedWithMembersInKeyOrder() throws {
        let value = try JSONValue.parse(json: Data(#"{"b": 1, "a": [true, "x"], "c": {}, "d": "123"}"#.utf8))
        #expect(
            Printer.json(value) == """
                {
                    "a": [
                        true,
                        "x"
                    ],
                    "b": 1,
                    "c": {},
                    "d": "123"
                }

                """
        )
        let yaml = Printer.yaml(value)
        #expect(yaml.hasPrefix("a:\n- true\n- x\nb: 1\n"), "\(yaml)")
        #expect(yaml.contains("d: \"123\""), "a string that reads as a number is quoted: \(yaml)")
    }
}
