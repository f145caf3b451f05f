import MeshNIO

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

    /// Starts `command` (a path, or a name looked up in the child's PATH) with `args` and `environment`
    /// (`MeshNIO.Spawn`: default signal dispositions, an empty mask, no descriptor of the agent's).
    static func spawn(
        command: String,
        args: [String],
        environment: [String: String],
        logPath: String
    ) throws -> ChildProcess {
        // posix_spawnp looks the command up in the PATH of the *agent's* environment; use the child's.
        let path: String
        if command.contains("/") {
            path = command
        } else {
            guard let found = Spawn.lookup(command, path: environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin") else {
                throw SpawnError(description: "command not found: \(command) (not in PATH)")
            }
            path = found
        }
        do {
            let pid = try Spawn.start(
                path,
                args,
                environment: environment,
                descriptors: Spawn.output(to: logPath, append: true),
                newProcessGroup: true,
                argv0: command
            )
            return ChildProcess(pid: pid)
        } catch {
            throw SpawnError(description: error.description)
        }
    }

    /// The exit status when the child has exited (reaping it), nil while it runs. Never blocks.
    func exitStatus() -> Int? {
        var status: Int32 = 0
        let r = waitpid(self.pid, &status, WNOHANG)
        if r == 0 { return nil }
        if r < 0 { return errno == ECHILD ? -1 : nil }
        return Int(Spawn.exitCode(status))
    }

    /// Signals the whole process group.
    func signalGroup(_ signal: Int32) {
        _ = kill(-self.pid, signal)
    }

    static func groupAlive(_ pgid: pid_t) -> Bool {
        kill(-pgid, 0) == 0
    }
}
