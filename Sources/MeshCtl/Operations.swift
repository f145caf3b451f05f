import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import NIOCore

/// What meshctl does, apart from parsing flags: each operation writes what a person (or a
/// program, with -o json) reads and returns whether everything succeeded.
public struct Operations: Sendable {
    public var client: ControlClient
    let out: @Sendable (String) -> Void
    let err: @Sendable (String) -> Void

    public init(
        client: ControlClient,
        out: @escaping @Sendable (String) -> Void = { FileHandle.standardOutput.write(Data($0.utf8)) },
        err: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data($0.utf8)) }
    ) {
        self.client = client
        self.out = out
        self.err = err
    }

    /// The kind a user typed (`svc`, `services`, `Service`...), or an error listing the known ones.
    public static func kind(_ name: String) throws -> ResourceType {
        guard let entry = Registry.lookup(name) else {
            let known = Registry.types.map { "\($0.plural) (\($0.shortNames.joined(separator: ", ")))" }.joined(
                separator: ", "
            )
            throw ManifestError("unknown resource type \"\(name)\"; known: \(known)")
        }
        return entry.type
    }

    /// A one-line explanation of a failure, with a hint where one helps.
    public func explain(_ error: any Error) -> String {
        switch error {
        case let s as Status:
            return s.message
        case let e as HTTPClientError where e.message.hasPrefix("cannot connect"):
            return
                "\(e.message)\nIs the control plane running? Start one with `meshctl up`, or point --server / MESHCTL_SERVER at it."
        case let e as ManifestError:
            return e.message
        default:
            return "\(error)"
        }
    }

    // MARK: apply / delete -f

    /// Creates or updates every object in the documents, in order. Continues past failures.
    public func apply(_ docs: [ManifestDocument], outputJSON: Bool = false) async -> Bool {
        var ok = true
        for doc in docs {
            do {
                let object = try Self.check(doc)
                let type = Swift.type(of: object).resource
                let ns = type.namespaced ? (object.metadata.namespace ?? "default") : nil
                let path = ControlClient.path(type, namespace: ns, name: object.metadata.name)
                let body = ByteBuffer(bytes: try MeshJSON.encode(object))
                let response = try await self.client.http.send(
                    .PUT,
                    path,
                    headers: ["Content-Type": "application/json", "Accept": "application/json"],
                    body: body
                )
                guard (200..<300).contains(response.status.code) else {
                    throw ControlClient.status(from: response.body, httpStatus: response.status)
                }
                let result =
                    response.status == .created
                    ? "created"
                    : response.headers.first(name: "X-Mesh-Result") == "unchanged" ? "unchanged" : "configured"
                if outputJSON {
                    self.out(Printer.json(try JSONValue.parse(json: Data(response.body.readableBytesView))))
                } else {
                    self.out("\(type.singular)/\(object.metadata.name) \(result)\n")
                }
            } catch {
                ok = false
                self.err("error: \(doc.source): \(self.explain(error))\n")
            }
        }
        return ok
    }

    /// Deletes every object named in the documents.
    public func delete(_ docs: [ManifestDocument], ignoreNotFound: Bool) async -> Bool {
        var ok = true
        for doc in docs {
            do {
                let object = try Self.check(doc)
                let type = Swift.type(of: object).resource
                ok =
                    await self.delete(
                        type,
                        names: [object.metadata.name],
                        namespace: object.metadata.namespace,
                        ignoreNotFound: ignoreNotFound
                    ) && ok
            } catch {
                ok = false
                self.err("error: \(doc.source): \(self.explain(error))\n")
            }
        }
        return ok
    }

    static func check(_ doc: ManifestDocument) throws -> any MeshObject {
        do {
            return try Registry.object(from: doc.value)
        } catch let e as ValidationError {
            throw ManifestError(e.description)
        }
    }

    // MARK: get / delete by name

    public func delete(_ type: ResourceType, names: [String], namespace: String?, ignoreNotFound: Bool) async -> Bool {
        var ok = true
        for name in names {
            do {
                let ns = type.namespaced ? (namespace ?? "default") : nil
                _ = try await self.client.raw(.DELETE, ControlClient.path(type, namespace: ns, name: name))
                self.out("\(type.singular) \"\(name)\" deleted\n")
            } catch let s as Status where s.code == 404 && ignoreNotFound {
                continue
            } catch {
                ok = false
                self.err("error: \(self.explain(error))\n")
            }
        }
        return ok
    }

    /// Prints one object or a list, in the chosen format.
    public func get(
        _ type: ResourceType,
        name: String?,
        namespace: String?,
        allNamespaces: Bool,
        selector: String?,
        format: OutputFormat
    ) async -> Bool {
        do {
            let ns = type.namespaced ? (allNamespaces ? nil : (namespace ?? "default")) : nil
            var path = ControlClient.path(type, namespace: ns, name: name)
            if name == nil, let sel = selector { path += "?labelSelector=" + HTTPRequest.percentEncode(sel) }
            let body = try await self.client.raw(.GET, path).body
            let value = try JSONValue.parse(json: Data(body.readableBytesView))
            let items: [JSONValue] = name == nil ? (value["items"].map(Printer.list) ?? []) : [value]
            switch format {
            case .json: self.out(Printer.json(value))
            case .yaml: self.out(Printer.yaml(value))
            case .name:
                for o in items { self.out("\(type.singular)/\(Printer.text(o["metadata"]?["name"]))\n") }
            case .table, .wide:
                if items.isEmpty {
                    let where_ =
                        type.namespaced
                        ? (allNamespaces ? " in any namespace" : " in namespace \(ns ?? "default")") : ""
                    self.err("No \(type.plural) found\(where_).\n")
                } else {
                    let (header, rows) = Printer.rows(
                        type,
                        items,
                        allNamespaces: allNamespaces,
                        wide: format == .wide,
                        now: Int(Date().timeIntervalSince1970)
                    )
                    self.out(Printer.table(header, rows))
                }
            }
            return true
        } catch {
            self.err("error: \(self.explain(error))\n")
            return false
        }
    }

    // MARK: watch

    /// Prints each change as it happens (a line per event, or one JSON event per line) until
    /// cancelled or `maxEvents` have been printed. Resumes across dropped connections.
    public func watch(
        _ type: ResourceType,
        namespace: String?,
        allNamespaces: Bool,
        selector: String?,
        format: OutputFormat,
        maxEvents: Int? = nil
    ) async -> Bool {
        let ns = type.namespaced ? (allNamespaces ? nil : (namespace ?? "default")) : nil
        var rv: Int64?
        var printed = 0
        var failures = 0
        while !Task.isCancelled {
            do {
                try await self.client.watchLines(type, namespace: ns, after: rv, labelSelector: selector) { line in
                    failures = 0
                    let event = try JSONValue.parse(json: Data(line.readableBytesView))
                    let kind = event["type"]?.stringValue ?? "?"
                    let object = event["object"] ?? .null
                    if let v = object["metadata"]?["resourceVersion"]?.stringValue.flatMap({ Int64($0) }) { rv = v }
                    if kind == "BOOKMARK" { return true }
                    if kind == "ERROR" {
                        throw (try? Strict.decode(Status.self, from: object)) ?? Status.badRequest("watch error")
                    }
                    switch format {
                    case .json: self.out(String(decoding: line.readableBytesView, as: UTF8.self) + "\n")
                    case .yaml: self.out("---\n" + Printer.yaml(event))
                    default:
                        let name = Printer.text(object["metadata"]?["name"])
                        let nsText = type.namespaced ? Printer.text(object["metadata"]?["namespace"]) + "/" : ""
                        self.out(
                            "\(kind.padding(toLength: 9, withPad: " ", startingAt: 0)) \(type.singular)/\(nsText)\(name)  resourceVersion=\(rv ?? 0)\n"
                        )
                    }
                    printed += 1
                    return maxEvents.map { printed < $0 } ?? true
                }
                if let m = maxEvents, printed >= m { return true }
            } catch let s as Status where s.code == 410 {
                self.err("watch: \(s.message)\n")
                rv = nil
            } catch {
                if Task.isCancelled { return true }
                failures += 1
                if failures > 1 {
                    self.err("error: \(self.explain(error))\n")
                    return false
                }
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
        return true
    }
}

/// Reads one document from an agent's admin API (`meshctl routes`, `meshctl peers`); on failure prints
/// what went wrong and how to point `--agent` elsewhere, and returns nil.
struct AgentDocument: Sendable {
    var agent: HTTPEndpoint
    let err: @Sendable (String) -> Void

    func fetch(_ path: String, what: String) async -> JSONValue? {
        let response: HTTPClientResponse
        do {
            response = try await HTTPClient(endpoint: self.agent).send(.GET, path)
            if response.status == .badRequest || response.status == .notFound {
                // The agent understood and says what is wrong with the question.
                self.err("error: \(String(buffer: response.body))\n")
                return nil
            }
            guard response.status == .ok else {
                throw HTTPClientError(
                    "the agent answered \(response.status.code) \(String(buffer: response.body).prefix(200))"
                )
            }
        } catch {
            self.err(
                "error: cannot read \(what) from the agent at \(self.agent): \(error)\nIs a mesh-agent (or `meshctl up`) running? Point --agent at its admin API.\n"
            )
            return nil
        }
        guard let value = try? JSONValue.parse(json: Data(response.body.readableBytesView)) else {
            self.err("error: the agent's \(path) answer is not JSON\n")
            return nil
        }
        return value
    }
}

/// What `meshctl routes` and `meshctl peers` show: documents of an agent's admin API, as tables, JSON or
/// YAML.
public struct AgentView: Sendable {
    public var agent: HTTPEndpoint
    let out: @Sendable (String) -> Void
    let err: @Sendable (String) -> Void

    public init(
        agent: HTTPEndpoint,
        out: @escaping @Sendable (String) -> Void = { FileHandle.standardOutput.write(Data($0.utf8)) },
        err: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data($0.utf8)) }
    ) {
        self.agent = agent
        self.out = out
        self.err = err
    }

    /// `meshctl peers`: the agent's peer links, one row per remote node (path, relay, RTT, streams, bytes).
    public func peers(format: OutputFormat) async -> Bool {
        guard let value = await AgentDocument(agent: self.agent, err: self.err).fetch("/peers", what: "peers") else {
            return false
        }
        switch format {
        case .json: self.out(Printer.json(value))
        case .yaml: self.out(Printer.yaml(value))
        default: self.out(PeersView.table(value, wide: format == .wide))
        }
        return true
    }

    /// `meshctl ping NODE`: each probe's path and RTT; fails when no probe got an answer.
    public func ping(node: String, count: Int, intervalMillis: Int, format: OutputFormat) async -> Bool {
        let path = "/ping?node=\(node)&count=\(count)&intervalMillis=\(intervalMillis)"
        guard let value = await AgentDocument(agent: self.agent, err: self.err).fetch(path, what: "ping") else {
            return false
        }
        switch format {
        case .json: self.out(Printer.json(value))
        case .yaml: self.out(Printer.yaml(value))
        default:
            var lines = ""
            for p in Printer.list(value["probes"] ?? .null) {
                let seq = Printer.text(p["seq"])
                if case .string(let e) = p["error"] ?? .null {
                    lines += "probe \(seq): no answer: \(e)\n"
                    continue
                }
                var rtt = "?"
                if case .int(let micros) = p["rttMicros"] ?? .null {
                    rtt = String(format: "%.2fms", Double(micros) / 1000)
                }
                let via = Printer.text(p["relay"])
                lines +=
                    "pong from \(node) via \(Printer.text(p["path"]))\(via.isEmpty ? "" : " (relay \(via))") in \(rtt)\n"
            }
            if case .bool(false) = value["direct"] ?? .null { lines += "direct connection not established\n" }
            self.out(lines)
        }
        return Printer.list(value["probes"] ?? .null).contains { ($0["error"] ?? .null) == .null }
    }

    /// `meshctl routes`: what an agent is serving right now.
    public func routes(format: OutputFormat) async -> Bool {
        guard let value = await AgentDocument(agent: self.agent, err: self.err).fetch("/routes", what: "routes") else {
            return false
        }
        RoutesView.show(value, format: format, out: self.out)
        return true
    }
}

/// `meshctl peers` as a table.
enum PeersView {
    /// The table: `<none>` rather than a blank cell; RTT in ms, bytes in IEC units; fits 100 columns.
    static func table(_ value: JSONValue, wide: Bool) -> String {
        func cell(_ v: JSONValue?) -> String {
            let t = Printer.text(v)
            return t.isEmpty ? "<none>" : t
        }
        var rows: [[String]] = []
        var reasons: [String] = []
        for p in Printer.list(value["items"] ?? .null) {
            let rtt: String
            if case .int(let micros) = p["rttMicros"] ?? .null {
                rtt = micros < 10_000 ? String(format: "%.2fms", Double(micros) / 1000) : "\(micros / 1000)ms"
            } else {
                rtt = "<none>"
            }
            var row = [
                cell(p["node"]), cell(p["site"]), cell(p["path"]), cell(p["relay"]), rtt, cell(p["streams"]),
                Self.bytes(p["bytesSent"]), Self.bytes(p["bytesReceived"]), cell(p["since"]),
            ]
            if wide {
                var upgrade = "<none>"
                if case .int(let ms) = p["upgradeMillis"] ?? .null { upgrade = "\(ms)ms" }
                row += [
                    cell(p["dialer"]), "\(cell(p["localNAT"]))/\(cell(p["peerNAT"]))", cell(p["upgrades"]),
                    cell(p["fallbacks"]), upgrade, cell(p["records"]), cell(p["dataPath"]),
                ]
            }
            rows.append(row)
            if case .string(let why) = p["reason"] ?? .null { reasons.append("\(cell(p["node"])): not direct: \(why)") }
        }
        var header = ["NODE", "SITE", "PATH", "RELAY", "RTT", "STREAMS", "SENT", "RECEIVED", "SINCE"]
        if wide {
            header += ["DIALER", "NAT (OWN/PEER)", "UPGRADES", "FALLBACKS", "TIME TO UPGRADE", "RECORDS", "DATA PATH"]
        }
        let site = Printer.text(value["site"])
        var heading =
            "node \(cell(value["node"])), site \(site.isEmpty ? "<none>" : site), links on \(cell(value["linkListen"]))\n"
        if let nat = value["nat"], nat != .null {
            let reflexive = Printer.text(nat["reflexive"])
            heading +=
                "NAT: \(cell(nat["mapping"])) (tcp), \(cell(nat["udpMapping"])) (udp), reflexive \(reflexive.isEmpty ? "<none>" : reflexive)\n"
        }
        let why = reasons.isEmpty ? "" : reasons.joined(separator: "\n") + "\n"
        return heading + (rows.isEmpty ? "no peer links\n" : Printer.table(header, rows)) + why
    }

    static func bytes(_ v: JSONValue?) -> String {
        guard case .int(let n) = v ?? .null else { return "<none>" }
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(n)
        var unit = 0
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        return unit == 0 ? "\(n)B" : String(format: "%.1f%@", value, units[unit])
    }

    /// `bytes` without the `iB` (`2.0K`, `1.0M`, `512B`): for a column of two sizes.
    static func shortBytes(_ v: JSONValue?) -> String {
        let text = Self.bytes(v)
        return text.hasSuffix("iB") ? String(text.dropLast(2)) : text
    }
}

/// `meshctl routes` as a table.
enum RoutesView {
    static func show(_ value: JSONValue, format: OutputFormat, out: @Sendable (String) -> Void) {
        switch format {
        case .json:
            out(Printer.json(value))
        case .yaml:
            out(Printer.yaml(value))
        default:
            let table = value["table"]
            out(
                "node \(Printer.text(value["node"])), site \(Printer.text(value["site"]).isEmpty ? "-" : Printer.text(value["site"])); "
                    + "table from \(Printer.text(table?["source"])) (\(Printer.text(table?["versions"]))); "
                    + "mode \(Printer.text(value["dataPlane"]?["mode"]))\n"
            )
            var rows: [[String]] = []
            for r in Printer.list(value["dataPlane"]?["routes"] ?? .null) {
                let backends = Printer.list(r["backends"] ?? .null)
                let healthy = backends.filter { Printer.text($0["healthy"]) == "true" }.count
                let vip = Printer.text(r["vip"])
                var row = [
                    "\(Printer.text(r["namespace"]))/\(Printer.text(r["service"]))",
                    (vip.contains(":") ? "[\(vip)]" : vip) + ":" + Printer.text(r["port"]),
                    Printer.text(r["proto"]), Printer.text(r["policy"]),
                    "\(healthy)/\(backends.count)", Printer.text(r["activeConnections"]), Printer.text(r["requests"]),
                    Printer.text(r["failures"]),
                    Printer.text(r["listening"]) == "true" ? "yes" : "no: " + Printer.text(r["error"]),
                ]
                if format == .wide {
                    row.append(
                        backends.map { b in
                            let ip = Printer.text(b["ip"])
                            let state =
                                Printer.text(b["healthy"]) == "true"
                                ? "" : (Printer.text(b["ejected"]) == "true" ? "(ejected)" : "(down)")
                            return (ip.contains(":") ? "[\(ip)]" : ip) + ":" + Printer.text(b["port"]) + state
                        }.joined(separator: ",")
                    )
                }
                rows.append(row)
            }
            var header = [
                "SERVICE", "VIP:PORT", "PROTO", "POLICY", "HEALTHY", "ACTIVE", "REQUESTS", "FAILURES", "LISTENING",
            ]
            if format == .wide { header.append("BACKENDS") }
            out(rows.isEmpty ? "no routes\n" : Printer.table(header, rows))
        }
    }
}
