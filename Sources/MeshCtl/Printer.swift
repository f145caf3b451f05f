import Foundation
import MeshCore

/// Output formats of `meshctl get` and `meshctl watch`.
public enum OutputFormat: String, CaseIterable, Sendable {
    case table
    case wide
    case json
    case yaml
    case name
}

/// Renders objects for people (aligned tables like kubectl's) and for programs (JSON, YAML).
public enum Printer {
    /// Aligns columns with three spaces between them, headers upper-case.
    public static func table(_ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for row in rows {
            for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) }
        }
        func line(_ cells: [String]) -> String {
            var out = ""
            for (i, cell) in cells.enumerated() {
                if i == cells.count - 1 {
                    out += cell
                } else {
                    out += cell + String(repeating: " ", count: widths[i] - cell.count + 3)
                }
            }
            return out
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n") + "\n"
    }

    /// The columns of a kind's table; `allNamespaces` adds a NAMESPACE column first.
    public static func rows(
        _ type: ResourceType,
        _ items: [JSONValue],
        allNamespaces: Bool,
        wide: Bool,
        now: Int
    ) -> (
        header: [String], rows: [[String]]
    ) {
        var header: [String]
        var rows: [[String]] = []
        switch type.plural {
        case "services":
            header = ["NAME", "VIP", "PORTS", "POLICY", "EXPORTED", "AGE"]
            for o in items {
                let spec = o["spec"]
                let ports =
                    (spec?["ports"]).map(Self.list)?.map { p -> String in
                        let num = Self.text(p["port"])
                        let proto = Self.text(p["protocol"]).isEmpty ? "TCP" : Self.text(p["protocol"])
                        return "\(num)/\(proto)"
                    }.joined(separator: ",") ?? ""
                var policy = Self.text(spec?["loadBalancer"]?["policy"])
                if policy.isEmpty { policy = "roundRobin" }
                if let h = spec?["loadBalancer"]?["hashOn"] {
                    if let v = h["header"]?.stringValue { policy += "(header:\(v))" }
                    if let v = h["cookie"]?.stringValue { policy += "(cookie:\(v))" }
                    if case .bool(true) = h["sourceIP"] ?? .null { policy += "(sourceIP)" }
                }
                let vip = Self.text(spec?["clusterIP"])
                rows.append([
                    Self.text(o["metadata"]?["name"]), vip.isEmpty ? "<pending>" : vip, ports, policy,
                    Self.text(spec?["exported"]) == "true" ? "yes" : "no", Self.age(o, now: now),
                ])
            }
        case "endpoints":
            header = ["NAME", "ENDPOINTS", "READY", "AGE"]
            if wide { header.insert("SITES", at: 3) }
            for o in items {
                let addrs = (o["spec"]?["addresses"]).map(Self.list) ?? []
                var shown: [String] = []
                var ready = 0
                var sites = Set<String>()
                for a in addrs {
                    let ip = Self.text(a["ip"])
                    let ipText = ip.contains(":") ? "[\(ip)]" : ip
                    for p in (a["ports"]).map(Self.list) ?? [] { shown.append("\(ipText):\(Self.text(p["port"]))") }
                    if Self.text(a["ready"]) != "false" { ready += 1 }
                    let s = Self.text(a["site"])
                    if !s.isEmpty { sites.insert(s) }
                }
                var cell = shown.prefix(wide ? shown.count : 3).joined(separator: ",")
                if !wide && shown.count > 3 { cell += " + \(shown.count - 3) more..." }
                if cell.isEmpty { cell = "<none>" }
                var row = [Self.text(o["metadata"]?["name"]), cell, "\(ready)/\(addrs.count)", Self.age(o, now: now)]
                if wide { row.insert(sites.sorted().joined(separator: ","), at: 3) }
                rows.append(row)
            }
        case "nodes":
            // LAST-SEEN: the age of the last heartbeat (the control plane serves it live from memory).
            header = ["NAME", "STATUS", "SITE", "ADDRESSES", "LAST-SEEN", "AGE"]
            for o in items {
                let addrs =
                    (o["spec"]?["addresses"]).map(Self.list)?.map { Self.text($0["address"]) }.joined(separator: ",")
                    ?? ""
                let phase = Self.text(o["status"]?["phase"])
                let seen = o["status"]?["lastHeartbeatTime"]?.stringValue.flatMap(Timestamp.parse).map {
                    Self.duration(now - $0)
                }
                let site = Self.text(o["spec"]?["site"])
                rows.append([
                    Self.text(o["metadata"]?["name"]), phase.isEmpty ? "Unknown" : phase,
                    site.isEmpty ? "<none>" : site, addrs.isEmpty ? "<none>" : addrs, seen ?? "<never>",
                    Self.age(o, now: now),
                ])
            }
        case "relays":
            // UPDATED: the age of the relay's last status write (every 30 s while it runs).
            header = ["NAME", "STATUS", "SITE", "ADDRESSES", "SESSIONS", "UPDATED", "AGE"]
            for o in items {
                let addrs = (o["spec"]?["addresses"]).map(Self.list)?.map { Self.text($0) }.joined(separator: ",") ?? ""
                let phase = Self.text(o["status"]?["phase"])
                let updated = o["status"]?["lastUpdateTime"]?.stringValue.flatMap(Timestamp.parse).map {
                    Self.duration(now - $0)
                }
                let site = Self.text(o["spec"]?["site"])
                let sessions = Self.text(o["status"]?["sessions"])
                rows.append([
                    Self.text(o["metadata"]?["name"]), phase.isEmpty ? "Unknown" : phase,
                    site.isEmpty ? "<none>" : site, addrs.isEmpty ? "<none>" : addrs,
                    sessions.isEmpty ? "0" : sessions, updated ?? "<never>", Self.age(o, now: now),
                ])
            }
        default:
            if let edge = EdgeTables.rows(type.plural, items, now: now) {
                (header, rows) = edge
            } else {
                header = ["NAME", "AGE"]
                rows = items.map { [Self.text($0["metadata"]?["name"]), Self.age($0, now: now)] }
            }
        }
        if allNamespaces && type.namespaced {
            header.insert("NAMESPACE", at: 0)
            for (i, o) in items.enumerated() { rows[i].insert(Self.text(o["metadata"]?["namespace"]), at: 0) }
        }
        return (header, rows)
    }

    static func list(_ v: JSONValue) -> [JSONValue] {
        if case .array(let a) = v { return a }
        return []
    }

    static func text(_ v: JSONValue?) -> String {
        switch v {
        case .string(let s): return s
        case .int(let i): return String(i)
        case .double(let d): return String(d)
        case .bool(let b): return b ? "true" : "false"
        default: return ""
        }
    }

    static func age(_ o: JSONValue, now: Int) -> String {
        guard let t = o["metadata"]?["creationTimestamp"]?.stringValue.flatMap(Timestamp.parse) else {
            return "<unknown>"
        }
        return Self.duration(now - t)
    }

    /// kubectl's short ages: 45s, 12m, 5h, 3d.
    public static func duration(_ seconds: Int) -> String {
        let s = max(0, seconds)
        if s < 120 { return "\(s)s" }
        if s < 3600 * 2 { return "\(s / 60)m" }
        if s < 86400 * 2 { return "\(s / 3600)h" }
        return "\(s / 86400)d"
    }

    /// Indented JSON, members in their order.
    public static func json(_ v: JSONValue) -> String {
        var out = ""
        self.writeJSON(v, indent: 0, into: &out)
        return out + "\n"
    }

    private static func writeJSON(_ v: JSONValue, indent: Int, into out: inout String) {
        let pad = String(repeating: "    ", count: indent + 1)
        let closePad = String(repeating: "    ", count: indent)
        switch v {
        case .array(let a) where !a.isEmpty:
            out += "[\n"
            for (i, item) in a.enumerated() {
                out += pad
                self.writeJSON(item, indent: indent + 1, into: &out)
                out += i == a.count - 1 ? "\n" : ",\n"
            }
            out += closePad + "]"
        case .object(let o) where !o.isEmpty:
            out += "{\n"
            for (i, (k, item)) in o.enumerated() {
                out += pad
                out += String(decoding: JSONValue.string(k).jsonData(), as: UTF8.self) + ": "
                self.writeJSON(item, indent: indent + 1, into: &out)
                out += i == o.count - 1 ? "\n" : ",\n"
            }
            out += closePad + "}"
        default:
            out += String(decoding: v.jsonData(), as: UTF8.self)
        }
    }

    /// YAML, block style, members in their order; strings that would read back as another type are quoted.
    public static func yaml(_ v: JSONValue) -> String {
        YAML.emit(v)
    }
}
