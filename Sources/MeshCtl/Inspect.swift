import MeshCore

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
            ("NAT", Printer.text(v["nat"]).isEmpty ? "<none> (not measured)" : cell(v["nat"])),
            (
                "INTERFACE",
                "\(cell(interface["mode"])), DNS on \(cell(interface["dns"])), links on \(cell(interface["linkListen"]))"
            ),
            ("CERTIFICATE", certificate),
        ])
    }

    /// A heading per service port (policy, listener, counters), then its endpoints: address, node, site,
    /// weight, health, path (with the relay of a relayed link), link RTT, active, total and failed.
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
                ]
            }
            out +=
                rows.isEmpty
                ? "no endpoints\n"
                : Printer.table(
                    ["ENDPOINT", "NODE", "SITE", "W", "HEALTH", "PATH", "RTT", "ACT", "TOTAL", "FAIL"],
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
