import MeshCore
import MeshHTTP

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension AgentView {
    /// `meshctl status`: this node's agent (control plane, table, relay, NAT, interface, certificate).
    public func status(format: OutputFormat) async -> Bool {
        await self.show("/status", what: "the status", format: format, table: InspectTables.status)
    }

    /// `meshctl route NAME [--key K]`: one service's endpoints with their paths, health and counters.
    public func route(name: String, key: String?, format: OutputFormat) async -> Bool {
        var query = [("name", name)]
        if let key { query.append(("key", key)) }
        return await self.show(
            InspectTables.path("/route", query),
            what: "the route of \(name)",
            format: format,
            table: InspectTables.route
        )
    }

    /// `meshctl dns NAME [TYPE]`: the answer through the agent, and where it came from.
    public func dns(name: String, type: String, format: OutputFormat) async -> Bool {
        await self.show(
            InspectTables.path("/dns", [("name", name), ("type", type)]),
            what: "the answer for \(name)",
            format: format,
            table: InspectTables.dns
        )
    }

    func show(_ path: String, what: String, format: OutputFormat, table: (JSONValue) -> String) async -> Bool {
        guard let value = await AgentDocument(agent: self.agent, err: self.err).fetch(path, what: what) else {
            return false
        }
        switch format {
        case .json: self.out(Printer.json(value))
        case .yaml: self.out(Printer.yaml(value))
        default: self.out(table(value))
        }
        return true
    }
}

/// The tables of `meshctl status`, `route` and `dns`: `<none>` rather than a blank cell, fitting 100 columns.
enum InspectTables {
    /// `path?k=v&...` with the values percent-encoded (everything but RFC 3986's unreserved characters).
    static func path(_ path: String, _ query: [(String, String)]) -> String {
        func encode(_ text: String) -> String {
            var out = ""
            for b in text.utf8 {
                switch b {
                case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"),
                    UInt8(ascii: "~"):
                    out.unicodeScalars.append(Unicode.Scalar(b))
                default:
                    out += "%" + String(b, radix: 16, uppercase: true).leftPadded(to: 2)
                }
            }
            return out
        }
        return path + "?" + query.map { "\($0.0)=\(encode($0.1))" }.joined(separator: "&")
    }

    static func cell(_ v: JSONValue?) -> String {
        let t = Printer.text(v)
        return t.isEmpty ? "<none>" : t
    }

    static func rtt(_ v: JSONValue?) -> String {
        guard case .int(let micros) = v ?? .null else { return "<none>" }
        return micros < 10_000 ? String(format: "%.2fms", Double(micros) / 1000) : "\(micros / 1000)ms"
    }

    static func int(_ v: JSONValue?) -> Int? {
        if case .int(let n) = v ?? .null { return Int(n) }
        return nil
    }

    /// Label-value lines, labels aligned.
    static func lines(_ pairs: [(String, String)]) -> String {
        let width = (pairs.map(\.0.count).max() ?? 0) + 3
        return pairs.map { $0.0.padding(toLength: width, withPad: " ", startingAt: 0) + $0.1 + "\n" }.joined()
    }

    static func status(_ v: JSONValue) -> String {
        let site = Printer.text(v["site"])
        let control = v["control"] ?? .null
        var connection = "\(cell(control["url"])): \(cell(control["state"]))"
        switch Printer.text(control["state"]) {
        case "offline":
            connection += " since \(cell(control["offlineSince"])), serving from the cache"
            connection += " (\(cell(control["failedAttempts"])) attempts failed: \(cell(control["lastError"])))"
        case "connected":
            connection += ", last contact \(cell(control["lastContact"])), \(cell(control["heartbeats"])) heartbeats"
        default:
            connection += ", \(cell(control["failedAttempts"])) attempts so far"
        }
        let relay = v["relay"] ?? .null
        var relayText = "none"
        if !Printer.text(relay["home"]).isEmpty {
            relayText =
                "\(cell(relay["home"])) at \(cell(relay["address"])) since \(cell(relay["since"])), RTT \(rtt(relay["rttMicros"]))"
        } else if !Printer.text(relay["lastError"]).isEmpty {
            relayText = "none (\(cell(relay["lastError"])))"
        }
        let interface = v["interface"] ?? .null
        var certificate = "<none>"
        if let c = v["certificate"], c != .null {
            let left = int(c["expiresInSeconds"]).map { $0 > 0 ? "in \(Printer.duration($0))" : "EXPIRED" } ?? "?"
            certificate =
                "\(cell(c["identity"])), expires \(cell(c["notAfter"])) (\(left)), \(cell(c["renewals"])) renewals"
        }
        return lines([
            ("NODE", "\(cell(v["node"]))\(site.isEmpty ? "" : " (site \(site))")"),
            ("VERSION", "\(cell(v["version"])), up \(int(v["uptimeSeconds"]).map(Printer.duration) ?? "?")"),
            ("CONTROL", connection),
            (
                "TABLE",
                "from \(cell(control["table"])), \(cell(control["resourceVersions"])), \(cell(control["services"])) services, \(cell(control["routes"])) routes"
            ),
            ("RELAY", relayText),
            ("NAT", nat(v["nat"])),
            (
                "INTERFACE",
                "\(cell(interface["mode"])), DNS on \(cell(interface["dns"])), links on \(cell(interface["linkListen"]))"
            ),
            ("CERTIFICATE", certificate),
        ])
    }

    /// A heading per service port (policy, listener, counters), then its endpoints: address, node, site,
    /// weight, health, path (with the relay of a relayed link), link RTT, active, total, failed, and the bytes
    /// sent to it and received from it by the connections and requests that ended.
    /// `endpointIndependent (TCP), endpointIndependent (UDP), seen as 198.18.0.2:7900`.
    static func nat(_ v: JSONValue?) -> String {
        guard let v, v != .null else { return "<none> (not measured)" }
        var text = "\(cell(v["mapping"])) (TCP), \(cell(v["udpMapping"])) (UDP)"
        if !Printer.text(v["reflexive"]).isEmpty { text += ", seen as \(cell(v["reflexive"]))" }
        return text
    }

    static func route(_ v: JSONValue) -> String {
        var out = "service \(cell(v["service"])).\(cell(v["namespace"])) (\(cell(v["fqdn"]))), VIP \(cell(v["vip"]))\n"
        let endpoints = Printer.list(v["endpoints"] ?? .null)
        for p in Printer.list(v["ports"] ?? .null) {
            let listening =
                Printer.text(p["listening"]) == "true" ? "listening" : "NOT listening (\(cell(p["error"])))"
            out += "\nport \(cell(p["port"]))/\(cell(p["proto"])): \(cell(p["policy"])), \(listening)\n"
            out +=
                "traffic: \(cell(p["activeConnections"])) active, \(cell(p["requests"])) requests, \(cell(p["failures"])) failed, \(cell(p["retries"])) retried, in \(PeersView.bytes(p["bytesIn"])), out \(PeersView.bytes(p["bytesOut"]))\n"
            let rows = endpoints.filter { $0["port"] == p["port"] }.map { e in
                var health = Printer.text(e["healthy"]) == "true" ? "healthy" : "unhealthy"
                if Printer.text(e["ready"]) != "true" {
                    health = "not-ready"
                } else if Printer.text(e["ejected"]) == "true" {
                    health = "ejected"
                }
                let relay = Printer.text(e["relay"])
                let path = relay.isEmpty ? cell(e["path"]) : "\(cell(e["path"])) (\(relay))"
                return [
                    cell(e["address"]), cell(e["node"]), cell(e["site"]), cell(e["weight"]), health, path,
                    rtt(e["rttMicros"]), cell(e["active"]), cell(e["total"]), cell(e["failures"]),
                    "\(PeersView.shortBytes(e["bytesIn"]))/\(PeersView.shortBytes(e["bytesOut"]))",
                ]
            }
            out +=
                rows.isEmpty
                ? "no endpoints\n"
                : Printer.table(
                    ["ENDPOINT", "NODE", "SITE", "W", "HEALTH", "PATH", "RTT", "ACT", "TOTAL", "FAIL", "IN/OUT"],
                    rows
                )
        }
        if let key = v["key"], key != .null {
            out += "\n"
            if let note = v["pickNote"], note != .null { out += "key \(cell(key)): \(cell(note))\n" }
            for p in Printer.list(v["picks"] ?? .null) {
                let via = Printer.text(p["via"]).isEmpty ? "" : " via \(cell(p["via"]))"
                let backend = Printer.text(p["backend"]).isEmpty ? "no usable endpoint" : cell(p["backend"]) + via
                out += "key \(cell(key)) on port \(cell(p["port"])) (\(cell(p["policy"]))): \(backend)\n"
            }
        }
        return out
    }

    static func dns(_ v: JSONValue) -> String {
        var out =
            ";; \(cell(v["name"])) \(cell(v["type"])): \(cell(v["rcode"])) from \(cell(v["source"])): \(cell(v["detail"]))\n"
        let answers = Printer.list(v["answers"] ?? .null).map { Printer.text($0) }
        out += answers.isEmpty ? ";; no records\n" : answers.map { $0 + "\n" }.joined()
        return out
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        String(repeating: "0", count: max(0, width - self.count)) + self
    }
}

// MARK: trace

/// What `meshctl trace` asks and does, in order: the route (which port, which policy), the name through the
/// agent's DNS, one real request to the VIP carrying `x-mesh-trace`, and what the agent's proxy saw of it.
struct TraceTarget: Equatable {
    var host: String
    var port: Int?
    var path: String

    init(host: String, port: Int?, path: String) {
        self.host = host
        self.port = port
        self.path = path
    }

    /// `NAME`, `NAME:PORT`, `http://NAME[:PORT][/PATH]`.
    init?(_ text: String) {
        var rest = Substring(text)
        if rest.hasPrefix("https://") { return nil }
        if rest.hasPrefix("http://") { rest = rest.dropFirst(7) }
        let slash = rest.firstIndex(of: "/")
        let authority = slash.map { rest[..<$0] } ?? rest
        self.path = slash.map { String(rest[$0...]) } ?? "/"
        if let colon = authority.lastIndex(of: ":") {
            guard let p = Int(authority[authority.index(after: colon)...]), (1...65535).contains(p) else { return nil }
            self.port = p
            self.host = String(authority[..<colon])
        } else {
            self.port = nil
            self.host = String(authority)
        }
        guard !self.host.isEmpty else { return nil }
    }
}

extension AgentView {
    /// `meshctl trace URL|NAME`.
    public func trace(_ text: String, format: OutputFormat) async -> Bool {
        guard let target = TraceTarget(text) else {
            self.err(
                "error: \"\(text)\" is not a service name or an http:// URL (https is end to end: the mesh cannot see into it)\n"
            )
            return false
        }
        let document = AgentDocument(agent: self.agent, err: self.err)
        // The route: which service, which port, which policy.
        guard
            let route = await document.fetch(
                InspectTables.path("/route", [("name", target.host)]),
                what: "the route of \(target.host)"
            )
        else { return false }
        let ports = Printer.list(route["ports"] ?? .null)
        let port: JSONValue
        if let wanted = target.port {
            guard let p = ports.first(where: { InspectTables.int($0["port"]) == wanted }) else {
                self.err(
                    "error: \(target.host) has no port \(wanted) (ports: \(ports.map { InspectTables.cell($0["port"]) }.joined(separator: ", ")))\n"
                )
                return false
            }
            port = p
        } else {
            guard let p = ports.first(where: { Printer.text($0["proto"]) == "http" }) else {
                self.err(
                    "error: \(target.host) has no HTTP port; trace follows HTTP requests (meshctl route \(target.host) shows where its connections go)\n"
                )
                return false
            }
            port = p
        }
        guard Printer.text(port["proto"]) == "http" else {
            self.err(
                "error: port \(InspectTables.cell(port["port"])) of \(target.host) is \(InspectTables.cell(port["proto"])); trace follows HTTP requests (meshctl route \(target.host) shows where its connections go)\n"
            )
            return false
        }
        let portNumber = InspectTables.int(port["port"]) ?? 80
        let fqdn = Printer.text(route["fqdn"])
        // The name, through the agent's DNS.
        let clock = ContinuousClock()
        let dnsStart = clock.now
        guard
            let dns = await document.fetch(
                InspectTables.path("/dns", [("name", fqdn), ("type", "A")]),
                what: "the address of \(fqdn)"
            )
        else { return false }
        let dnsTime = clock.now - dnsStart
        guard
            let vip = Printer.list(dns["answers"] ?? .null).compactMap({ a -> String? in
                let parts = Printer.text(a).split(separator: " ")
                return parts.count >= 5 && parts[3] == "A" ? String(parts[4]) : nil
            }).first
        else {
            self.err("error: \(fqdn) has no address in the agent's DNS (\(InspectTables.cell(dns["rcode"])))\n")
            return false
        }
        // One real request, marked.
        let id = (0..<4).map { _ in String(UInt32.random(in: 0...UInt32.max), radix: 16) }.joined()
        let requestStart = clock.now
        var status: Int?
        var failure: String?
        do {
            let response = try await HTTPClient(endpoint: HTTPEndpoint(host: vip, port: portNumber)).send(
                .GET,
                target.path,
                headers: ["Host": portNumber == 80 ? fqdn : "\(fqdn):\(portNumber)", "x-mesh-trace": id]
            )
            status = Int(response.status.code)
        } catch {
            failure = "\(error)"
        }
        let requestTime = clock.now - requestStart
        // What the agent saw (recorded when the exchange ended: at most a moment after the response).
        var seen: JSONValue?
        for attempt in 0..<20 {
            let response = try? await HTTPClient(endpoint: self.agent).send(
                .GET,
                InspectTables.path("/trace", [("id", id)])
            )
            if let response, response.status == .ok {
                seen = try? JSONValue.parse(json: Data(response.body.readableBytesView))
                break
            }
            if attempt < 19 { try? await Task.sleep(for: .milliseconds(50)) }
        }
        func micros(_ d: Duration) -> Int64 {
            d.components.seconds * 1_000_000 + d.components.attoseconds / 1_000_000_000_000
        }
        var fields: [(String, JSONValue)] = [
            ("id", .string(id)),
            ("url", .string("http://\(fqdn):\(portNumber)\(target.path)")),
            (
                "dns",
                .object([
                    ("name", .string(fqdn)), ("address", .string(vip)),
                    ("source", dns["source"] ?? .null), ("detail", dns["detail"] ?? .null),
                    ("micros", .int(micros(dnsTime))),
                ])
            ),
            (
                "client",
                .object([
                    ("status", status.map { .int(Int64($0)) } ?? .null),
                    ("error", failure.map(JSONValue.string) ?? .null),
                    ("micros", .int(micros(requestTime))),
                ])
            ),
            ("proxy", seen ?? .null),
        ]
        if seen == nil {
            fields.append(
                ("note", .string("the agent recorded no trace for this request (it did not reach the proxy)"))
            )
        }
        let value = JSONValue.object(fields)
        switch format {
        case .json: self.out(Printer.json(value))
        case .yaml: self.out(Printer.yaml(value))
        default: self.out(InspectTables.trace(value))
        }
        return status != nil
    }
}

extension InspectTables {
    static func ms(_ v: JSONValue?) -> String {
        guard let m = int(v) else { return "<none>" }
        return String(format: "%.2fms", Double(m) / 1000)
    }

    /// The steps of a trace, one per line, with timings (the long descriptions last, so that the table fits
    /// 100 columns).
    static func trace(_ v: JSONValue) -> String {
        let dns = v["dns"] ?? .null
        let client = v["client"] ?? .null
        let proxy = v["proxy"] ?? .null
        var rows: [[String]] = [["dns", ms(dns["micros"]), "\(cell(dns["address"])): \(cell(dns["detail"]))"]]
        if proxy != .null {
            rows.append(["route", "-", "\(cell(proxy["vip"])):\(cell(proxy["port"])), \(cell(proxy["choice"]))"])
            for a in Printer.list(proxy["attempts"] ?? .null) {
                var endpoint = "\(cell(a["backend"]))"
                if !Printer.text(a["node"]).isEmpty { endpoint += " on \(cell(a["node"]))" }
                if !Printer.text(a["site"]).isEmpty { endpoint += " (site \(cell(a["site"])))" }
                endpoint += Printer.text(a["connection"]) == "pooled" ? ", pooled connection" : ", new connection"
                if int(a["connectMicros"]) != nil { endpoint += " in \(ms(a["connectMicros"]))" }
                rows.append(["endpoint", "+" + ms(a["startMicros"]), endpoint])
                var path = cell(a["path"])
                if !Printer.text(a["relay"]).isEmpty { path += " via relay \(cell(a["relay"]))" }
                if int(a["rttMicros"]) != nil { path += ", link RTT \(rtt(a["rttMicros"]))" }
                rows.append(["path", "-", path])
                if !Printer.text(a["error"]).isEmpty { rows.append(["failed", "-", cell(a["error"])]) }
            }
            if int(proxy["firstByteMicros"]) != nil {
                rows.append(["first byte", ms(proxy["firstByteMicros"]), "from the endpoint"])
            }
            var response = "status \(cell(proxy["status"]))"
            if !Printer.text(proxy["error"]).isEmpty { response += " from the proxy: \(cell(proxy["error"]))" }
            rows.append(["response", ms(proxy["totalMicros"]), response])
        } else {
            rows.append(["proxy", "-", cell(v["note"])])
        }
        var seen = "status \(cell(client["status"]))"
        if !Printer.text(client["error"]).isEmpty { seen = "FAILED: \(cell(client["error"]))" }
        rows.append(["client", ms(client["micros"]), "\(seen) (the whole request as meshctl saw it)"])
        return "trace \(cell(v["id"])): GET \(cell(v["url"]))\n" + Printer.table(["STEP", "TIME", "WHAT"], rows)
    }
}
