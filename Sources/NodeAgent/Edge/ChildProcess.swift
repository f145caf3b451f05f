#if canImport(Glibc)
import Glibc
#endif

/// A child process started with posix_spawn in a process group of its own (so a stop signals
/// everything it started), stdin from /dev/null, stdout and stderr appended to a log file.
struct ChildProcess: Sendable {
    let pid: pid_t

    struct SpawnError: Error, CustomStringConvertible {
        var description: String
    }

    /// Starts `command` (a path, or a name looked up in PATH) with `args` and `environment`.
    static func spawn(
        command: String,
        args: [String],
        environment: [String: String],
        logPath: String
    ) throws -> ChildProcess {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_APPEND, 0o640)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Its own process group (pgid = its pid), default signal dispositions and an empty mask.
        var defaults = sigset_t()
        sigfillset(&defaults)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setsigmask(&attr, &empty)
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(
            &attr,
            Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK)
        )
        let argv = ([command] + args).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        let envp = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for e in envp { free(e) } }
        var pid: pid_t = 0
        // posix_spawnp looks the command up in the PATH of the *agent's* environment; use the child's.
        let rc: Int32
        if command.contains("/") {
            rc = posix_spawn(&pid, command, &actions, &attr, argv, envp)
        } else {
            guard let path = Self.lookup(command, path: environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin") else {
                throw SpawnError(description: "command not found: \(command) (not in PATH)")
            }
            rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
        }
        guard rc == 0 else {
            let why = String(cString: strerror(rc))
            throw SpawnError(
                description: rc == ENOENT ? "command not found: \(command)" : "cannot start \(command): \(why)"
            )
        }
        return ChildProcess(pid: pid)
    }

    static func lookup(_ name: String, path: String) -> String? {
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// The exit status when the child has exited (reaping it), nil while it runs. Never blocks.
    func exitStatus() -> Int? {
        var status: Int32 = 0
        let r = waitpid(self.pid, &status, WNOHANG)
        if r == 0 { return nil }
        if r < 0 { return errno == ECHILD ? -1 : nil }
        let low = status & 0x7F
        if low == 0 { return Int((status >> 8) & 0xFF) }  // exited
        return 128 + Int(low)  // killed by a signal
    }

    /// Signals the whole process group.
    func signalGroup(_ signal: Int32) {
        _ = kill(-self.pid, signal)
    }

    static func groupAlive(_ pgid: pid_t) -> Bool {
        kill(-pgid, 0) == 0
    }
}
