import Foundation
import MeshCore
import Testing

@testable import MeshCtl

/// Golden output of `meshctl status`, `route` and `dns`: stable order, aligned, `<none>` for what is missing,
/// within 100 columns.
@Suite struct InspectTablesTests {
    func parse(_ text: String) throws -> JSONValue { try JSONValue.parse(json: Data(text.utf8)) }

    func fits(_ text: String) -> Bool { text.split(separator: "\n").allSatisfy { $0.count <= 100 } }

    @Test func statusConnected() throws {
        let v = try self.parse(
            """
            {"node": "a1", "site": "a", "version": "0.1.0", "started": "2026-12-03T10:00:00Z", "uptimeSeconds": 7300,
             "control": {"url": "https://198.18.0.10:7700", "state": "connected", "lastContact": "2026-12-03T12:01:40Z",
               "heartbeats": 361, "failedAttempts": 0, "table": "control",
               "resourceVersions": "services@12 endpoints@40", "services": 3, "routes": 4},
             "relay": {"home": "r1", "address": "198.18.0.10:7901", "since": "2026-12-03T10:00:01Z", "rttMicros": 1200,
               "sessions": 1},
             "interface": {"mode": "loopback", "dns": "127.0.0.1:53", "linkListen": "0.0.0.0:7900"},
             "certificate": {"identity": "mesh://node/a1", "notAfter": "2026-12-04T10:00:00Z",
               "expiresInSeconds": 79100, "renewals": 0}}
            """
        )
        let out = InspectTables.status(v)
        #expect(
            out == """
                NODE          a1 (site a)
                VERSION       0.1.0, up 2h
                CONTROL       https://198.18.0.10:7700: connected, last contact 2026-12-03T12:01:40Z, 361 heartbeats
                TABLE         from control, services@12 endpoints@40, 3 services, 4 routes
                RELAY         r1 at 198.18.0.10:7901 since 2026-12-03T10:00:01Z, RTT 1.20ms
                NAT           <none> (not measured)
                INTERFACE     loopback, DNS on 127.0.0.1:53, links on 0.0.0.0:7900
                CERTIFICATE   mesh://node/a1, expires 2026-12-04T10:00:00Z (in 21h), 0 renewals

                """
        )
        #expect(self.fits(out))
    }

    @Test func statusOffline() throws {
        let v = try self.parse(
            """
            {"node": "a1", "version": "0.1.0", "uptimeSeconds": 59,
             "control": {"url": "https://127.0.0.1:7700", "state": "offline", "offlineSince": "2026-12-03T12:00:00Z",
               "heartbeats": 3, "failedAttempts": 4, "lastError": "connection refused", "table": "cache",
               "resourceVersions": "services@1 endpoints@2", "services": 1, "routes": 1},
             "relay": {"sessions": 0, "lastError": "no relays in the table"},
             "interface": {"mode": "meshInterface(mesh0)", "dns": "169.254.20.10:53", "linkListen": "off"}}
            """
        )
        let out = InspectTables.status(v)
        #expect(out.contains("NODE          a1\n"))
        #expect(
            out.contains(
                "CONTROL       https://127.0.0.1:7700: offline since 2026-12-03T12:00:00Z, serving from the cache (4 attempts failed: connection refused)\n"
            )
        )
        #expect(out.contains("RELAY         none (no relays in the table)\n"))
        #expect(out.contains("CERTIFICATE   <none>\n"))
    }

    @Test func natLine() throws {
        let v = try self.parse(
            #"{"mapping": "endpointIndependent", "udpMapping": "random", "reflexive": "198.18.0.2:7900"}"#
        )
        #expect(InspectTables.nat(v) == "endpointIndependent (TCP), random (UDP), seen as 198.18.0.2:7900")
        #expect(InspectTables.nat(nil) == "<none> (not measured)")
    }

    @Test func routeWithPathsAndAKey() throws {
        let v = try self.parse(
            """
            {"service": "web", "namespace": "shop", "fqdn": "web.shop.svc.cluster.local", "vip": "10.96.0.10",
             "ports": [{"port": 80, "proto": "http", "policy": "consistentHash(header:x-user)", "listening": true,
               "activeConnections": 1, "requests": 120, "failures": 2, "retries": 1, "bytesIn": 2048, "bytesOut": 1048576}],
             "endpoints": [
               {"port": 80, "address": "10.0.0.5:8080", "node": "a1", "site": "a", "weight": 1, "ready": true,
                "healthy": true, "ejected": false, "path": "local", "active": 1, "total": 100, "failures": 0,
                "bytesIn": 2048, "bytesOut": 1048576},
               {"port": 80, "address": "10.1.0.7:8080", "node": "b1", "site": "b", "weight": 2, "ready": true,
                "healthy": false, "ejected": true, "ejectedForSeconds": 4.5, "path": "relayed", "via": "b1",
                "relay": "r1", "rttMicros": 41000, "active": 0, "total": 20, "failures": 2, "bytesIn": 0,
                "bytesOut": 300}],
             "key": "alice", "picks": [{"port": 80, "proto": "http", "policy": "consistentHash(header:x-user)",
               "backend": "10.0.0.5:8080"}]}
            """
        )
        let out = InspectTables.route(v)
        #expect(
            out == """
                service web.shop (web.shop.svc.cluster.local), VIP 10.96.0.10

                port 80/http: consistentHash(header:x-user), listening
                traffic: 1 active, 120 requests, 2 failed, 1 retried, in 2.0KiB, out 1.0MiB
                ENDPOINT        NODE   SITE   W   HEALTH    PATH           RTT      ACT   TOTAL   FAIL   IN/OUT
                10.0.0.5:8080   a1     a      1   healthy   local          <none>   1     100     0      2.0K/1.0M
                10.1.0.7:8080   b1     b      2   ejected   relayed (r1)   41ms     0     20      2      0B/300B

                key alice on port 80 (consistentHash(header:x-user)): 10.0.0.5:8080

                """
        )
        #expect(self.fits(out))
    }

    @Test func routeWithoutEndpointsAndAKeyThatDoesNotChoose() throws {
        let v = try self.parse(
            """
            {"service": "db", "namespace": "shop", "fqdn": "db.shop.svc.cluster.local",
             "ports": [{"port": 5432, "proto": "tcp", "policy": "roundRobin", "listening": false, "error": "address in use",
               "activeConnections": 0, "requests": 0, "failures": 0, "retries": 0, "bytesIn": 0, "bytesOut": 0}],
             "endpoints": [], "key": "k", "picks": [],
             "pickNote": "no port of db.shop hashes a key (policy roundRobin): the pick does not depend on it"}
            """
        )
        #expect(
            InspectTables.route(v) == """
                service db.shop (db.shop.svc.cluster.local), VIP <none>

                port 5432/tcp: roundRobin, NOT listening (address in use)
                traffic: 0 active, 0 requests, 0 failed, 0 retried, in 0B, out 0B
                no endpoints

                key k: no port of db.shop hashes a key (policy roundRobin): the pick does not depend on it

                """
        )
    }

    @Test func dnsAnswerAndSource() throws {
        let v = try self.parse(
            """
            {"name": "example.org.", "type": "A", "rcode": "NOERROR", "answers": ["example.org. 27 IN A 192.0.2.1"],
             "source": "cache", "upstream": "198.18.0.53:53", "ttlLeft": 27,
             "detail": "the forwarder's cache, 27 s left"}
            """
        )
        #expect(
            InspectTables.dns(v) == """
                ;; example.org. A: NOERROR from cache: the forwarder's cache, 27 s left
                example.org. 27 IN A 192.0.2.1

                """
        )
        let empty = try self.parse(
            #"{"name": "x.", "type": "AAAA", "rcode": "NXDOMAIN", "answers": [], "source": "zone", "detail": "the mesh zone (authoritative)"}"#
        )
        #expect(
            InspectTables.dns(empty) == ";; x. AAAA: NXDOMAIN from zone: the mesh zone (authoritative)\n;; no records\n"
        )
    }

    @Test func queryValuesAreEncoded() {
        #expect(
            InspectTables.path("/route", [("name", "web.shop"), ("key", "a&b=c d")])
                == "/route?name=web.shop&key=a%26b%3Dc%20d"
        )
    }
}

@Suite struct TraceTableTests {
    @Test func targets() {
        #expect(TraceTarget("web.shop") == TraceTarget(host: "web.shop", port: nil, path: "/"))
        #expect(TraceTarget("web.shop:8080") == TraceTarget(host: "web.shop", port: 8080, path: "/"))
        #expect(
            TraceTarget("http://web.shop.svc.cluster.local/a/b?c=1")
                == TraceTarget(host: "web.shop.svc.cluster.local", port: nil, path: "/a/b?c=1")
        )
        #expect(TraceTarget("https://web.shop/") == nil)
        #expect(TraceTarget("web.shop:0") == nil)
        #expect(TraceTarget("http:///x") == nil)
    }

    @Test func stepsWithTimings() throws {
        let v = try JSONValue.parse(
            json: Data(
                """
                {"id": "t1", "url": "http://web.shop.svc.cluster.local:80/",
                 "dns": {"name": "web.shop.svc.cluster.local", "address": "10.96.0.10", "source": "zone",
                   "detail": "the mesh zone (authoritative)", "micros": 410},
                 "client": {"status": 200, "micros": 9000},
                 "proxy": {"service": "web", "namespace": "shop", "vip": "10.96.0.10", "port": 80,
                   "choice": "roundRobin: the next endpoint in weighted turn", "status": 200,
                   "firstByteMicros": 7100, "totalMicros": 7400,
                   "attempts": [
                     {"backend": "10.1.0.7:8080", "node": "b1", "site": "b", "via": "b1", "path": "relayed",
                      "relay": "r1", "rttMicros": 3100, "connection": "new", "startMicros": 20,
                      "connectMicros": 3500}]}}
                """.utf8
            )
        )
        #expect(
            InspectTables.trace(v) == """
                trace t1: GET http://web.shop.svc.cluster.local:80/
                STEP         TIME      WHAT
                dns          0.41ms    10.96.0.10: the mesh zone (authoritative)
                route        -         10.96.0.10:80, roundRobin: the next endpoint in weighted turn
                endpoint     +0.02ms   10.1.0.7:8080 on b1 (site b), new connection in 3.50ms
                path         -         relayed via relay r1, link RTT 3.10ms
                first byte   7.10ms    from the endpoint
                response     7.40ms    status 200
                client       9.00ms    status 200 (the whole request as meshctl saw it)

                """
        )
    }
}
