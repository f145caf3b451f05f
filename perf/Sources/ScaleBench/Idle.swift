import ArgumentParser
import Foundation
import MeshClient
import MeshCore
import MeshHTTP
import MeshIdentity
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import PerfSupport
import Synchronization

/// `scale-bench idle`: where one replica's memory per idle node connection goes, stage by stage.
///
/// One mesh-control (SQLite store, no etcd: the connections are what is measured) and N raw TLS 1.3
/// connections with the admin's client certificate, opened by this process. After each stage, once
/// the replica is quiet, its resident memory (VmRSS, and RssAnon: the heap and mappings without the
/// binary's pages) is read; the growth divided by N is the cost of that stage per connection:
///
/// 1. `tls`: the connections are open and their handshakes done, no request yet;
/// 2. `request`: each has sent one small request and read its answer (a kept-alive connection);
/// 3. `watch`: each then started a watch on Services and read its first bookmark (an idle agent);
/// 4. `event`: one Service change went out to every watch.
///
/// `--wrapper` runs the replica under a tool (e.g. `heaptrack -o FILE`) to see who holds the heap.
struct Idle: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Memory per idle TLS connection of one mesh-control, stage by stage (see perf/scale-idle)."
    )

    @Option(help: "mesh-control binary.") var control: String
    @Option(help: "Working folder (the replica's data directory and log).") var work: String
    @Option(help: "Connections to open (at most 15000).") var connections = 1000
    @Option(help: "mesh-control's leanConnectionBuffers.") var lean = true
    @Option(
        help:
            "Offer the mesh record layer (mesh-control's httpRecords, and these clients): connections leave NIOSSL after the handshake."
    )
    var records = true
    @Option(help: "Extra lines for the replica's YAML configuration (key: value; separated by ';').")
    var config: String = ""
    @Option(help: "Run the replica under this command (space-separated, e.g. \"heaptrack -o /tmp/h\").")
    var wrapper: String?
    @Option(help: "Seconds to wait after each stage before reading memory.") var settle = 3.0
    @Option(help: "Write the figures as JSON to this file.") var json: String?
    @Option(help: "Seconds to hold the connections open at the end (to probe the replica from outside).")
    var hold = 0.0

    /// One raw connection: counts what it received, keeps the text of the last answer's start.
    final class Peer: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        struct State {
            var handshaken = false
            var received = ""
            var closed = false
        }
        let state = Mutex(State())

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case TLSUserEvent.handshakeCompleted = event as? TLSUserEvent ?? .shutdownCompleted {
                self.state.withLock { $0.handshaken = true }
            }
            context.fireUserInboundEventTriggered(event)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let bytes = Self.unwrapInboundIn(data)
            let text = String(buffer: bytes)
            self.state.withLock { s in
                s.received += text
                // Keep the tail only: the checks look for markers in what came last.
                if s.received.utf8.count > 8192 { s.received = String(s.received.suffix(4096)) }
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            self.state.withLock { $0.closed = true }
        }

        func take() -> String {
            self.state.withLock { s in
                defer { s.received = "" }
                return s.received
            }
        }
        func has(_ marker: String) -> Bool { self.state.withLock { $0.received.contains(marker) } }
    }

    func run() async throws {
        guard (1...15_000).contains(self.connections) else { throw ValidationError("connections 1-15000") }
        try FileManager.default.createDirectory(atPath: self.work, withIntermediateDirectories: true)
        let port = try freeLoopbackPorts(1)[0]
        let url = "https://127.0.0.1:\(port)"
        let configPath = self.work + "/control.yaml"
        let extra = self.config.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces) }
        try
            ([
                "maxConnections: 16000", "nodeGracePeriodSeconds: 600", "bookmarkIntervalSeconds: 3600",
                "idleTimeoutSeconds: 3600", "logLevel: warning", "leanConnectionBuffers: \(self.lean)",
                "httpRecords: \(self.records)",
            ] + extra).joined(separator: "\n").appending("\n").write(
                toFile: configPath,
                atomically: true,
                encoding: .utf8
            )
        var command = [
            self.control, "--config", configPath, "--listen", "127.0.0.1:\(port)", "--data-dir", self.work + "/r0",
        ]
        if let w = self.wrapper { command = w.split(separator: " ").map(String.init) + command }
        let replica = try Drive.Child(command[0], Array(command.dropFirst()), log: self.work + "/r0.log")
        defer {
            replica.process.terminate()
            replica.process.waitUntilExit()
        }
        let pki = self.work + "/r0/pki"
        let (admin, _) = try await replicaReady(
            pki: pki,
            url: url,
            timeout: .seconds(120),
            log: self.work + "/r0.log",
            process: replica.process
        )
        // The process whose memory is read: the replica itself, not a wrapper's shell.
        let pid = try await self.controlPID(replica.process.processIdentifier)
        _ = try? await admin.create(
            MeshService(
                metadata: ObjectMeta(name: "probe", namespace: "default"),
                spec: ServiceSpec(ports: [ServicePort(port: 80)])
            )
        )
        var figures: [(String, String)] = [
            ("connections", "\(self.connections)"), ("lean connection buffers", "\(self.lean)"),
            ("mesh record layer", "\(self.records)"),
            ("extra configuration", self.config),
        ]
        var last = try await self.memory(pid)
        figures.append(
            ("replica before connections: RSS / anonymous (KiB)", "\(last.rss / 1024) / \(last.anon / 1024)")
        )
        let n = self.connections
        func stage(_ name: String) async throws {
            let now = try await self.memory(pid)
            let line = String(
                format: "%.2f / %.2f",
                Double(now.rss - last.rss) / Double(n) / 1024,
                Double(now.anon - last.anon) / Double(n) / 1024
            )
            figures.append(("\(name): per connection RSS / anonymous (KiB)", line))
            print("\(name.padding(toLength: 10, withPad: " ", startingAt: 0)) per connection: \(line) KiB (RSS / anon)")
            fflush(nil)
            last = now
        }

        let credentials = try CredentialFiles(directory: pki, name: "admin").load()
        let context = try MeshTLS.clientContext(credentials, httpRecords: self.records)
        let group = MultiThreadedEventLoopGroup.singleton
        var peers: [(Channel, Peer)] = []
        peers.reserveCapacity(n)
        // 1. Connections, handshakes only (64 at a time).
        for start in stride(from: 0, to: n, by: 64) {
            var batch: [EventLoopFuture<(Channel, Peer)>] = []
            for _ in start..<min(n, start + 64) {
                let peer = Peer()
                let f = ClientBootstrap(group: group)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            // As HTTPClient: the switch holds what is written until the connection has
                            // settled on the record layer (or on TLS records).
                            try HTTPRecordSwitch.addHandlers(
                                try NIOSSLClientHandler(context: context, serverHostname: nil),
                                role: .client,
                                to: channel.pipeline.syncOperations
                            )
                            try channel.pipeline.syncOperations.addHandler(peer)
                        }
                    }
                    .connect(host: "127.0.0.1", port: port)
                    .map { ($0, peer) }
                batch.append(f)
            }
            for f in batch { peers.append(try await f.get()) }
        }
        try await waitUntil("handshakes", timeout: .seconds(300)) {
            peers.allSatisfy { $0.1.state.withLock { $0.handshaken } }
        }
        try await stage("tls")

        // 2. One small request each; the connection stays open.
        let get =
            "GET /apis/mesh.edge/v1/namespaces/default/services/probe HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\n\r\n"
        for (channel, _) in peers { channel.writeAndFlush(ByteBuffer(string: get), promise: nil) }
        try await waitUntil("answers", timeout: .seconds(300)) { peers.allSatisfy { $0.1.has("\"probe\"") } }
        for (_, p) in peers { _ = p.take() }
        try await stage("request")

        // 3. A watch each, from the current version: the replica answers with a bookmark.
        let rv =
            try await admin.get(MeshService.self, namespace: "default", name: "probe").metadata.resourceVersion ?? "0"
        let watch =
            "GET /apis/mesh.edge/v1/services?watch=true&resourceVersion=\(rv) HTTP/1.1\r\nHost: c\r\nAccept: application/json\r\n\r\n"
        for (channel, _) in peers { channel.writeAndFlush(ByteBuffer(string: watch), promise: nil) }
        try await waitUntil("bookmarks", timeout: .seconds(300)) { peers.allSatisfy { $0.1.has("BOOKMARK") } }
        for (_, p) in peers { _ = p.take() }
        try await stage("watch")

        // 4. One change to every watcher.
        var svc = try await admin.get(MeshService.self, namespace: "default", name: "probe")
        svc.metadata.labels = ["change": "1"]
        _ = try await admin.apply(svc)
        try await waitUntil("events", timeout: .seconds(300)) { peers.allSatisfy { $0.1.has("\"change\"") } }
        try await stage("event")
        let closed = peers.filter { $0.1.state.withLock { $0.closed } }.count
        figures.append(("connections closed by the replica", "\(closed)"))

        for (k, v) in figures { print(k.padding(toLength: 58, withPad: " ", startingAt: 0) + v) }
        if let path = self.json {
            try JSONSerialization.data(
                withJSONObject: Dictionary(uniqueKeysWithValues: figures),
                options: [.prettyPrinted, .sortedKeys]
            ).write(to: URL(fileURLWithPath: path))
        }
        if self.hold > 0 {
            print("holding \(n) connections for \(self.hold) s: replica pid \(pid)")
            fflush(nil)
            try await Task.sleep(for: .seconds(self.hold))
        }
        for (channel, _) in peers { channel.close(promise: nil) }
    }

    /// The replica's memory once it is quiet: `settle` seconds after the stage, then until its CPU
    /// time stops moving (bounded).
    func memory(_ pid: Int32) async throws -> (rss: Int, anon: Int) {
        try await Task.sleep(for: .seconds(self.settle))
        for _ in 0..<20 {
            let c0 = ProcessStats.cpuSeconds(pid)
            try await Task.sleep(for: .milliseconds(500))
            if ProcessStats.cpuSeconds(pid) - c0 < 0.02 { break }
        }
        return (ProcessStats.rss(pid), ProcessStats.rssAnon(pid))
    }

    /// The mesh-control process: `launched` itself, or the one a wrapper started (which may have
    /// left it to init): the process whose command line holds this run's data directory.
    func controlPID(_ launched: Int32) async throws -> Int32 {
        let name = URL(fileURLWithPath: self.control).lastPathComponent
        let marker = self.work + "/r0"
        for _ in 0..<100 {
            let all = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
            for p in [launched] + all.compactMap({ Int32($0) }) {
                guard let comm = try? String(contentsOfFile: "/proc/\(p)/comm", encoding: .utf8),
                    name.hasPrefix(comm.trimmingCharacters(in: .whitespacesAndNewlines)),
                    let cmd = try? String(contentsOfFile: "/proc/\(p)/cmdline", encoding: .utf8),
                    cmd.contains(marker)
                else { continue }
                return p
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw ValidationError("no \(name) process with \(marker)")
    }
}
