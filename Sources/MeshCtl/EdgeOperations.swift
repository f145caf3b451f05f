import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import NIOCore

/// Tables of the edge kinds (`meshctl get workloads|devices|devicemodels`).
enum EdgeTables {
    static func rows(_ plural: String, _ items: [JSONValue], now: Int) -> (header: [String], rows: [[String]])? {
        func name(_ o: JSONValue) -> String { Printer.text(o["metadata"]?["name"]) }
        func none(_ s: String) -> String { s.isEmpty ? "<none>" : s }
        switch plural {
        case "workloads":
            let header = ["NAME", "COMMAND", "NODES", "RUNNING", "RESTARTS", "SERVICE", "AGE"]
            let rows = items.map { o -> [String] in
                let spec = o["spec"]
                let nodes = Printer.list(o["status"]?["nodes"] ?? .null).map { Printer.text($0) }
                // The instances are in each node's status; the workload's holds their sums.
                let running = Int(Printer.text(o["status"]?["running"])) ?? 0
                let restarts = Int(Printer.text(o["status"]?["restarts"])) ?? 0
                let ports = Printer.list(spec?["ports"] ?? .null)
                let service = ports.isEmpty ? "<none>" : (spec?["service"]?.stringValue ?? name(o))
                return [
                    name(o), Printer.text(spec?["command"]), none(nodes.joined(separator: ",")),
                    "\(running)/\(nodes.count)", "\(restarts)", service, Printer.age(o, now: now),
                ]
            }
            return (header, rows)
        case "devices":
            let header = ["NAME", "MODEL", "NODE", "CONVERGED", "LAST-REPORT", "AGE"]
            let rows = items.map { o -> [String] in
                let view = TwinView(o)
                let desired = view.properties.filter { $0.desired != nil }
                let converged = desired.filter(\.converged).count
                let last = view.properties.compactMap { $0.reportedTime.flatMap(Timestamp.parse) }.max()
                return [
                    name(o), Printer.text(o["spec"]?["model"]), Printer.text(o["spec"]?["node"]),
                    "\(converged)/\(desired.count)", last.map { Printer.duration(now - $0) } ?? "<never>",
                    Printer.age(o, now: now),
                ]
            }
            return (header, rows)
        case "devicemodels":
            let header = ["NAME", "PROPERTIES", "AGE"]
            let rows = items.map { o -> [String] in
                let props = Printer.list(o["spec"]?["properties"] ?? .null).map {
                    "\(Printer.text($0["name"])):\(Printer.text($0["type"]))"
                }
                return [name(o), none(props.joined(separator: ",")), Printer.age(o, now: now)]
            }
            return (header, rows)
        default:
            return nil
        }
    }
}

/// A device's twins as `meshctl twin get` shows them: desired against reported, and whether they converged.
public struct TwinView: Codable, Sendable, Equatable {
    public var device: String
    public var namespace: String
    public var node: String
    /// Every desired value is reported back.
    public var converged: Bool
    public var properties: [Property]

    public struct Property: Codable, Sendable, Equatable {
        public var name: String
        public var desired: String?
        public var desiredVersion: Int64?
        public var reported: String?
        public var reportedVersion: Int64?
        public var reportedTime: String?
        public var converged: Bool
    }

    init(_ o: JSONValue) {
        self.device = Printer.text(o["metadata"]?["name"])
        self.namespace = o["metadata"]?["namespace"]?.stringValue ?? "default"
        self.node = Printer.text(o["spec"]?["node"])
        var names: [String] = []
        var desired: [String: String] = [:]
        for p in Printer.list(o["spec"]?["properties"] ?? .null) {
            let n = Printer.text(p["name"])
            names.append(n)
            desired[n] = p["desired"]?.stringValue
        }
        var twins: [String: JSONValue] = [:]
        for t in Printer.list(o["status"]?["twins"] ?? .null) {
            let n = Printer.text(t["name"])
            if !names.contains(n) { names.append(n) }
            twins[n] = t
        }
        self.properties = names.sorted().map { n in
            let t = twins[n]
            let reported = t?["reported"]?.stringValue
            func int(_ v: JSONValue?) -> Int64? {
                if case .int(let i) = v ?? .null { return Int64(i) }
                return nil
            }
            return Property(
                name: n,
                desired: desired[n],
                desiredVersion: desired[n] == nil ? nil : int(t?["desiredVersion"]),
                reported: reported,
                reportedVersion: int(t?["reportedVersion"]),
                reportedTime: t?["reportedTime"]?.stringValue,
                converged: desired[n] == nil || desired[n] == reported
            )
        }
        self.converged = self.properties.allSatisfy(\.converged)
    }
}

extension Operations {
    /// `meshctl twin get DEVICE`.
    public func twinGet(device: String, namespace: String?, format: OutputFormat) async -> Bool {
        do {
            let ns = namespace ?? "default"
            let body = try await self.client.raw(.GET, ControlClient.path(Device.resource, namespace: ns, name: device))
                .body
            let view = TwinView(try JSONValue.parse(json: Data(body.readableBytesView)))
            switch format {
            case .json, .yaml:
                let value = try JSONValue.parse(json: try MeshJSON.encode(view))
                self.out(format == .json ? Printer.json(value) : Printer.yaml(value))
            default:
                self.out(
                    "device \(view.namespace)/\(view.device) on node \(view.node): \(view.converged ? "converged" : "not converged")\n"
                )
                let rows = view.properties.map { p in
                    [
                        p.name, p.desired.map { "\($0) (v\(p.desiredVersion ?? 0))" } ?? "<none>",
                        p.reported.map { "\($0) (v\(p.reportedVersion ?? 0))" } ?? "<none>",
                        p.desired == nil ? "-" : (p.converged ? "yes" : "no"), p.reportedTime ?? "<never>",
                    ]
                }
                self.out(Printer.table(["PROPERTY", "DESIRED", "REPORTED", "CONVERGED", "REPORTED-AT"], rows))
            }
            return true
        } catch {
            self.err("error: \(self.explain(error))\n")
            return false
        }
    }

    /// `meshctl twin set DEVICE PROP=VALUE...`: the desired values, written with the version read
    /// (read again on a conflict); a value that breaks the model is refused by the control plane.
    public func twinSet(device: String, namespace: String?, assignments: [String]) async -> Bool {
        var values: [(String, String)] = []
        for a in assignments {
            guard let eq = a.firstIndex(of: "="), eq != a.startIndex else {
                self.err("error: \"\(a)\" is not PROPERTY=VALUE\n")
                return false
            }
            values.append((String(a[..<eq]), String(a[a.index(after: eq)...])))
        }
        if values.isEmpty {
            self.err("error: name at least one PROPERTY=VALUE\n")
            return false
        }
        do {
            for attempt in 0..<8 {
                var d = try await self.client.get(Device.self, namespace: namespace ?? "default", name: device)
                var props = d.spec.properties ?? []
                for (k, v) in values {
                    if let i = props.firstIndex(where: { $0.name == k }) {
                        props[i].desired = v
                    } else {
                        props.append(DeviceDesired(name: k, desired: v))
                    }
                }
                d.spec.properties = props
                do {
                    let (written, _) = try await self.client.apply(d)
                    for (k, v) in values {
                        let version = written.twin(k)?.desiredVersion.map { " (desired version \($0))" } ?? ""
                        self.out("device/\(device) \(k)=\(v)\(version)\n")
                    }
                    return true
                } catch let s as Status where s.code == 409 && attempt < 7 {
                    continue
                }
            }
            return false
        } catch {
            self.err("error: \(self.explain(error))\n")
            return false
        }
    }
}

extension AgentView {
    /// `meshctl logs WORKLOAD [--node N]`: the workload's log from the agent's admin API.
    public func logs(workload: String, namespace: String?, node: String?, tail: Int?) async -> Bool {
        let document = AgentDocument(agent: self.agent, err: self.err)
        guard let list = await document.fetch("/workloads", what: "workloads") else { return false }
        let agentNode = Printer.text(list["node"])
        if let n = node, n != agentNode {
            self.err(
                "error: the agent at \(self.agent) is node \(agentNode), not \(n); point --agent at the admin API of \(n)'s agent\n"
            )
            return false
        }
        let ns = namespace ?? "default"
        var path = "/workloads/\(HTTPRequest.percentEncode(ns))/\(HTTPRequest.percentEncode(workload))/logs"
        if let t = tail { path += "?tail=\(t)" }
        do {
            let response = try await HTTPClient(endpoint: self.agent).send(.GET, path)
            guard response.status == .ok else {
                self.err("error: \(String(buffer: response.body))\n")
                return false
            }
            self.out(String(buffer: response.body))
            return true
        } catch {
            self.err("error: cannot read the log from the agent at \(self.agent): \(error)\n")
            return false
        }
    }
}
