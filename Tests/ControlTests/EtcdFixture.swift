import Control
import Foundation
import Logging
import MeshTestSupport
import Synchronization

/// A real etcd (Debian's etcd-server, installed by scripts/bootstrap) of one or more members on
/// loopback ports, each in its own data directory under a temporary folder; killed on `stop()` or
/// when released.
final class EtcdCluster: Sendable {
    struct Member: Sendable {
        var name: String
        var clientPort: Int
        var peerPort: Int
        var clientURL: String { "http://127.0.0.1:\(self.clientPort)" }
        var peerURL: String { "http://127.0.0.1:\(self.peerPort)" }
    }

    static let binary = "/usr/bin/etcd"
    let dir = TempDir()
    let members: [Member]
    private let processes: Mutex<[Int: Subprocess]>

    var endpoints: [String] { self.members.map(\.clientURL) }

    /// Starts `size` members and waits until the cluster answers.
    static func start(members size: Int = 1) async throws -> EtcdCluster {
        guard FileManager.default.isExecutableFile(atPath: Self.binary) else {
            throw EtcdMissing()
        }
        for attempt in 0..<3 {
            let members = (0..<size).map { Member(name: "m\($0)", clientPort: freePort(), peerPort: freePort()) }
            let cluster = EtcdCluster(members: members)
            for i in members.indices { try cluster.startMember(i) }
            if await cluster.waitHealthy(timeout: .seconds(20)) { return cluster }
            cluster.stop()
            if attempt == 2 { throw EtcdStartFailed(log: cluster.log) }
        }
        throw EtcdStartFailed(log: "")
    }

    private init(members: [Member]) {
        self.members = members
        self.processes = Mutex([:])
    }

    func startMember(_ i: Int) throws {
        let m = self.members[i]
        let initial = self.members.map { "\($0.name)=\($0.peerURL)" }.joined(separator: ",")
        let p = try Subprocess(
            Self.binary,
            [
                "--name", m.name, "--data-dir", self.dir.path + "/\(m.name)",
                "--listen-client-urls", m.clientURL, "--advertise-client-urls", m.clientURL,
                "--listen-peer-urls", m.peerURL, "--initial-advertise-peer-urls", m.peerURL,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", "test-\(self.members[0].peerPort)",
                // Elections slow enough that a loaded machine does not make the leader flap ("etcdserver:
                // request timed out" under two `yes` with 50/500 ms), fast enough for the failover tests.
                "--heartbeat-interval", "100", "--election-timeout", "1500",
                "--log-level", "error", "--logger", "zap",
            ]
        )
        self.processes.withLock { $0[i] = p }
    }

    /// Kills one member (SIGKILL).
    func kill(member i: Int) {
        if let p = self.processes.withLock({ $0.removeValue(forKey: i) }) {
            p.signal(SIGKILL)
            _ = p.isRunning
        }
    }

    func stop() {
        let all = self.processes.withLock { p -> [Subprocess] in
            defer { p.removeAll() }
            return Array(p.values)
        }
        for p in all { p.signal(SIGKILL) }
    }

    var log: String { self.processes.withLock { $0.values.map(\.stderr).joined(separator: "\n") } }

    func waitHealthy(timeout: Duration) async -> Bool {
        guard let client = try? EtcdClient(configuration: .init(endpoints: self.endpoints)) else { return false }
        return await eventually(timeout: timeout, every: .milliseconds(50)) {
            (try? await client.revision()) != nil
        }
    }

    /// A store over this cluster under its own prefix.
    func store(
        prefix: String = "/t\(UInt32.random(in: 0...UInt32.max))/",
        replica: String = "r0",
        historyLimit: Int? = nil
    ) async throws -> EtcdStore {
        var c = EtcdStore.Configuration(endpoints: self.endpoints, replica: replica)
        c.prefix = prefix
        if let h = historyLimit { c.hub.historyLimit = h }
        c.catchUpTimeout = .seconds(2)
        // Members here are on loopback (a dead one refuses at once): a long connect bound only tolerates a
        // loaded machine (2 s was exceeded once under 2x `yes` and the whole suite).
        c.client.connectTimeout = .seconds(30)
        var logger = Logger(label: "etcd-store")
        logger.logLevel = .error
        return try await EtcdStore(configuration: c, logger: logger)
    }

    deinit { self.stop() }
}

struct EtcdMissing: Error, CustomStringConvertible {
    var description: String { "\(EtcdCluster.binary) is missing: scripts/bootstrap installs etcd-server" }
}

struct EtcdStartFailed: Error, CustomStringConvertible {
    var log: String
    var description: String { "etcd did not start:\n\(self.log.suffix(2000))" }
}
