import Logging
import MeshCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

public struct WorkloadSupervisorConfiguration: Sendable {
    public var nodeName: String
    /// Where each workload's log goes: `<logDirectory>/<namespace>_<name>.log`, rotated to `.1`, `.2`...
    public var logDirectory: String
    /// A log is rotated when it grows past this (copy, then truncate: the process keeps its file).
    public var maxLogBytes = 1 << 20
    /// Rotated files kept beside the live one.
    public var keptLogFiles = 2
    public var initialBackoff: Duration = .seconds(1)
    public var maxBackoff: Duration = .seconds(60)
    /// A run this long resets the backoff.
    public var stableAfter: Duration = .seconds(10)
    /// Between SIGTERM and SIGKILL when a workload stops.
    public var stopGrace: Duration = .seconds(5)
    /// How often exits are looked for.
    public var pollInterval: Duration = .milliseconds(100)

    public init(nodeName: String, logDirectory: String) {
        self.nodeName = nodeName
        self.logDirectory = logDirectory
    }
}

/// Runs the workloads assigned to this node as supervised child processes: each in a process group of
/// its own, output appended to a log file that rotates, restarted by its policy with exponential
/// backoff (1 s doubling to 60 s, reset after a stable run), its status reported on each change. A
/// command that cannot be started (missing, not executable) is `Failed` with the reason and tried
/// again with the same backoff, in case it is installed later.
public final class WorkloadSupervisor: Sendable {
    public let configuration: WorkloadSupervisorConfiguration
    let store: EdgeStore
    let logger: Logger
    let onStatus: @Sendable (WorkloadReport) -> Void
    private let instances = Mutex<[String: Instance]>([:])

    struct Instance {
        var workload: Workload
        var process: ChildProcess?
        var phase: WorkloadInstance.Phase = .stopped
        var restarts = 0
        var exitCode: Int?
        var lastStart: String?
        var message: String?
        var startedAt: ContinuousClock.Instant?
        var nextStart: ContinuousClock.Instant? = .now
        var backoff: Duration

        var key: String { "\(self.workload.effectiveNamespace)/\(self.workload.metadata.name)" }
    }

    public init(
        configuration: WorkloadSupervisorConfiguration,
        store: EdgeStore,
        logger: Logger,
        onStatus: @escaping @Sendable (WorkloadReport) -> Void
    ) {
        self.configuration = configuration
        self.store = store
        self.logger = logger
        self.onStatus = onStatus
    }

    public func logPath(namespace: String, name: String) -> String {
        "\(self.configuration.logDirectory)/\(namespace)_\(name).log"
    }

    /// Each workload's instance as last reported.
    public var snapshot: [String: WorkloadInstance] {
        self.instances.withLock { $0.mapValues { self.report($0).instance } }
    }

    func report(_ i: Instance) -> WorkloadReport {
        WorkloadReport(
            namespace: i.workload.effectiveNamespace,
            name: i.workload.metadata.name,
            instance: WorkloadInstance(
                node: self.configuration.nodeName,
                phase: i.phase,
                pid: i.process.map { Int($0.pid) },
                exitCode: i.exitCode,
                restarts: i.restarts,
                lastStart: i.lastStart,
                message: i.message
            )
        )
    }

    /// Stops process groups an agent that was killed left running (their pids are in the store).
    public func stopLeftovers() async {
        for (ns, name, pid) in (try? self.store.leftoverPIDs()) ?? [] where pid > 1 {
            if ChildProcess.groupAlive(pid) {
                self.logger.notice("workload \(ns)/\(name): stopping process group \(pid) left by the previous run")
                _ = kill(-pid, SIGTERM)
                let deadline = ContinuousClock.now + self.configuration.stopGrace
                while ChildProcess.groupAlive(pid), ContinuousClock.now < deadline {
                    try? await Task.sleep(for: .milliseconds(50))
                }
                if ChildProcess.groupAlive(pid) { _ = kill(-pid, SIGKILL) }
            }
            try? self.store.setPID(namespace: ns, name: name, pid: nil)
        }
    }

    /// Makes the running set `workloads` (the store's desired set): new ones start, removed ones
    /// stop, changed ones restart.
    public func update(_ workloads: [Workload]) async {
        var stopping: [(String, ChildProcess)] = []
        var removed: [WorkloadReport] = []
        self.instances.withLock { instances in
            let wanted = Dictionary(
                workloads.map { ("\($0.effectiveNamespace)/\($0.metadata.name)", $0) },
                uniquingKeysWith: { a, _ in a }
            )
            for (key, i) in instances where wanted[key] == nil || wanted[key]!.spec != i.workload.spec {
                if let p = i.process { stopping.append((key, p)) }
                if wanted[key] == nil {
                    var gone = i
                    gone.process = nil
                    gone.phase = .stopped
                    removed.append(self.report(gone))
                }
                instances[key] = nil
            }
            for (key, w) in wanted where instances[key] == nil {
                instances[key] = Instance(workload: w, backoff: self.configuration.initialBackoff)
            }
        }
        for (key, p) in stopping {
            await self.stop(p)
            let parts = key.split(separator: "/", maxSplits: 1).map(String.init)
            try? self.store.setPID(namespace: parts[0], name: parts[1], pid: nil)
            self.logger.info("workload \(key): stopped")
        }
        // No longer this node's: Stopped, which takes its instance out of the node's status.
        for report in removed { self.onStatus(report) }
    }

    /// SIGTERM to the group, SIGKILL after the grace; reaps it.
    func stop(_ p: ChildProcess) async {
        p.signalGroup(SIGTERM)
        let deadline = ContinuousClock.now + self.configuration.stopGrace
        while p.exitStatus() == nil {
            if ContinuousClock.now >= deadline {
                p.signalGroup(SIGKILL)
                while p.exitStatus() == nil { try? await Task.sleep(for: .milliseconds(10)) }
                break
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
        // Whatever else is left in its group.
        p.signalGroup(SIGKILL)
    }

    /// Supervises until cancelled, then stops every workload.
    public func run() async {
        var lastRotation = ContinuousClock.now
        while !Task.isCancelled {
            self.tick()
            if ContinuousClock.now - lastRotation >= .seconds(1) {
                lastRotation = .now
                self.rotateLogs()
            }
            try? await Task.sleep(for: self.configuration.pollInterval)
        }
        let running = self.instances.withLock { instances in
            instances.values.compactMap { i in i.process.map { (i.key, $0) } }
        }
        for (key, p) in running {
            await self.stop(p)
            let parts = key.split(separator: "/", maxSplits: 1).map(String.init)
            try? self.store.setPID(namespace: parts[0], name: parts[1], pid: nil)
        }
    }

    /// Reaps exits and starts what is due.
    func tick() {
        var reports: [WorkloadReport] = []
        var pids: [(String, String, Int32?)] = []
        self.instances.withLock { instances in
            let now = ContinuousClock.now
            for key in instances.keys.sorted() {
                var i = instances[key]!
                defer { instances[key] = i }
                if let p = i.process, let code = p.exitStatus() {
                    p.signalGroup(SIGKILL)  // what it started and left behind
                    i.process = nil
                    i.exitCode = code
                    pids.append((i.workload.effectiveNamespace, i.workload.metadata.name, nil))
                    if let started = i.startedAt, now - started >= self.configuration.stableAfter {
                        i.backoff = self.configuration.initialBackoff
                    }
                    let policy = i.workload.spec.restartPolicy ?? .always
                    let again = policy == .always || (policy == .onFailure && code != 0)
                    if again {
                        i.phase = .backoff
                        i.nextStart = now + i.backoff
                        i.message = "exited with \(code); restarting in \(i.backoff)"
                        i.backoff = min(i.backoff * 2, self.configuration.maxBackoff)
                    } else {
                        i.phase = .exited
                        i.nextStart = nil
                        i.message = "exited with \(code); restart policy \(policy.rawValue)"
                    }
                    self.logger.info("workload \(key): \(i.message!)")
                    reports.append(self.report(i))
                }
                guard i.process == nil, let due = i.nextStart, due <= now else { continue }
                let w = i.workload
                var env = ["PATH": ProcessEnvironment.path, "MESH_NODE_NAME": self.configuration.nodeName]
                for (k, v) in w.spec.env ?? [:] { env[k] = v }
                let log = self.logPath(namespace: w.effectiveNamespace, name: w.metadata.name)
                do {
                    let p = try ChildProcess.spawn(
                        command: w.spec.command,
                        args: w.spec.args ?? [],
                        environment: env,
                        logPath: log
                    )
                    if i.lastStart != nil { i.restarts += 1 }
                    i.process = p
                    i.phase = .running
                    i.startedAt = now
                    i.lastStart = Timestamp.now()
                    i.nextStart = nil
                    i.message = nil
                    pids.append((w.effectiveNamespace, w.metadata.name, p.pid))
                    self.logger.info("workload \(key): started \(w.spec.command) as pid \(p.pid), log \(log)")
                } catch {
                    i.phase = .failed
                    i.message = "\(error)"
                    i.nextStart = now + i.backoff
                    i.backoff = min(i.backoff * 2, self.configuration.maxBackoff)
                    self.logger.warning("workload \(key): \(error); trying again later")
                }
                reports.append(self.report(i))
            }
        }
        for (ns, name, pid) in pids { try? self.store.setPID(namespace: ns, name: name, pid: pid) }
        for r in reports { self.onStatus(r) }
    }

    /// Copy-then-truncate rotation: the process keeps writing (O_APPEND) to the same file. Lines
    /// written between the copy and the truncate are lost; a pipe through the agent would avoid that.
    func rotateLogs() {
        let c = self.configuration
        let paths = self.instances.withLock {
            $0.values.map { self.logPath(namespace: $0.workload.effectiveNamespace, name: $0.workload.metadata.name) }
        }
        for path in paths {
            var st = stat()
            guard stat(path, &st) == 0, Int(st.st_size) > c.maxLogBytes else { continue }
            if c.keptLogFiles > 0 {
                for n in stride(from: c.keptLogFiles - 1, through: 1, by: -1) {
                    _ = rename("\(path).\(n)", "\(path).\(n + 1)")
                }
                Self.copy(path, to: "\(path).1")
            }
            _ = truncate(path, 0)
        }
    }

    static func copy(_ from: String, to: String) {
        let src = open(from, O_RDONLY)
        guard src >= 0 else { return }
        defer { close(src) }
        let dst = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0o640)
        guard dst >= 0 else { return }
        defer { close(dst) }
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(src, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            _ = buffer.withUnsafeBytes { write(dst, $0.baseAddress, n) }
        }
    }
}

enum ProcessEnvironment {
    static var path: String {
        getenv("PATH").map { String(cString: $0) } ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    }
}
