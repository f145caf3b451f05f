import MeshCore
import MeshHTTP
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// What the agent's admin API shows of the edge part (`meshctl logs` reads `/workloads/NS/NAME/logs`).
public struct EdgeWorkloadList: Codable, Sendable {
    public var node: String
    public var items: [Item]

    public struct Item: Codable, Sendable {
        public var namespace: String
        public var name: String
        public var instance: WorkloadInstance
        public var log: String
    }
}

public struct EdgeTwinList: Codable, Sendable {
    public var node: String
    /// Messages waiting for the control plane.
    public var outbox: Int
    public var items: [Item]

    public struct Item: Codable, Sendable {
        public var device: String
        public var twins: [Twin]
    }

    public struct Twin: Codable, Sendable {
        public var property: String
        public var desired: String?
        public var desiredVersion: Int64
        public var reported: String?
        public var reportedVersion: Int64
        public var converged: Bool
    }
}

extension EdgeServices {
    /// At most this much of a log is answered.
    static let maxLogAnswer = 1 << 20

    /// The admin API's edge paths: `/workloads`, `/workloads/NS/NAME/logs[?tail=N]`, `/twins`; nil for others.
    public func adminResponse(path: String, query: [String: String]) -> HTTPResponse? {
        let node = self.configuration.nodeName
        if path == "/workloads" {
            let snapshot = self.supervisor.snapshot
            let items = snapshot.keys.sorted().map { key in
                let parts = key.split(separator: "/", maxSplits: 1).map(String.init)
                return EdgeWorkloadList.Item(
                    namespace: parts[0],
                    name: parts[1],
                    instance: snapshot[key]!,
                    log: self.supervisor.logPath(namespace: parts[0], name: parts[1])
                )
            }
            return Self.json(EdgeWorkloadList(node: node, items: items))
        }
        if path == "/twins" {
            let ids = (try? self.store.deviceIDs()) ?? []
            let items = ids.map { id in
                EdgeTwinList.Item(
                    device: id,
                    twins: ((try? self.store.twins(id)) ?? []).map {
                        EdgeTwinList.Twin(
                            property: $0.property,
                            desired: $0.desired,
                            desiredVersion: $0.desiredVersion,
                            reported: $0.reported,
                            reportedVersion: $0.reportedVersion,
                            converged: $0.converged
                        )
                    }
                )
            }
            return Self.json(EdgeTwinList(node: node, outbox: (try? self.store.outboxCount()) ?? -1, items: items))
        }
        let parts = path.split(separator: "/").map(String.init)
        guard parts.count == 4, parts[0] == "workloads", parts[3] == "logs" else { return nil }
        let (ns, name) = (parts[1], parts[2])
        guard self.supervisor.snapshot["\(ns)/\(name)"] != nil else {
            return .text(.notFound, "workload \(ns)/\(name) does not run on node \(node)")
        }
        let text = Self.tail(
            self.supervisor.logPath(namespace: ns, name: name),
            lines: query["tail"].flatMap { Int($0) }
        )
        // The log as it is (`.text` would add a newline).
        return HTTPResponse(
            status: .ok,
            headers: ["Content-Type": "text/plain; charset=utf-8"],
            body: .bytes(ByteBuffer(string: text ?? ""))
        )
    }

    static func json(_ value: some Encodable) -> HTTPResponse {
        do {
            return .json(.ok, ByteBuffer(bytes: try MeshJSON.encode(value)))
        } catch {
            return .text(.internalServerError, "cannot encode: \(error)")
        }
    }

    /// The end of a file (its last `lines` lines, or its last MiB).
    static func tail(_ path: String, lines: Int?) -> String? {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        let size = lseek(fd, 0, SEEK_END)
        guard size > 0 else { return "" }
        let start = max(0, Int(size) - Self.maxLogAnswer)
        lseek(fd, off_t(start), SEEK_SET)
        var bytes = [UInt8](repeating: 0, count: Int(size) - start)
        let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return "" }
        var text = String(decoding: bytes.prefix(n), as: UTF8.self)
        if let count = lines, count >= 0 {
            var kept = text.split(separator: "\n", omittingEmptySubsequences: false)
            if kept.last == "" { kept.removeLast() }
            let last = kept.suffix(count)
            text = last.isEmpty ? "" : last.joined(separator: "\n") + "\n"
        }
        return text
    }
}
