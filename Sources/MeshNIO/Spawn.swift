import CLinux

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Starts child processes with `posix_spawn`, the same way everywhere a mesh process or a test starts one:
/// the environment given and no other, default signal dispositions and an empty signal mask (a threaded
/// Swift process ignores SIGPIPE and blocks signals on some threads; a child must not inherit either), and
/// every descriptor above stderr closed in the child (`posix_spawn_file_actions_addclosefrom_np`), so a
/// listener or connection another thread opened meanwhile never leaks into it and outlives its owner.
///
/// Foundation's `Process` is not used: it starts a run-loop thread per process, and concurrent `run()`s
/// in one process crashed in its argument copying under a parallel test run.
public enum Spawn {
    /// What the child's descriptor `fd` is set to before it starts.
    public enum Descriptor: Sendable {
        /// Opened from `path` with `flags` (and `mode` when created).
        case open(Int32, path: String, flags: Int32, mode: mode_t = 0o640)
        /// A copy of the parent's descriptor `from`.
        case copy(Int32, from: Int32)
    }

    /// stdin from /dev/null, stdout and stderr into the file at `path` (created; appended to or emptied).
    public static func output(to path: String, append: Bool) -> [Descriptor] {
        [
            .open(0, path: "/dev/null", flags: O_RDONLY),
            .open(1, path: path, flags: O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC)),
            .copy(2, from: 1),
        ]
    }

    public struct Failure: Error, CustomStringConvertible, Equatable {
        public var command: String
        public var code: Int32
        public var description: String {
            self.code == ENOENT
                ? "command not found: \(self.command)"
                : "cannot start \(self.command): \(String(cString: strerror(self.code)))"
        }
    }

    /// Starts `path` with `arguments` (argv[1...]; argv[0] is `argv0`, else `path`) and exactly `environment`; returns
    /// its pid. With `newProcessGroup` the child leads a group of its own (pgid = pid), so a signal to
    /// the group reaches everything it starts.
    public static func start(
        _ path: String,
        _ arguments: [String],
        environment: [String: String],
        descriptors: [Descriptor],
        newProcessGroup: Bool = false,
        argv0: String? = nil
    ) throws(Failure) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        for descriptor in descriptors {
            switch descriptor {
            case .open(let fd, let file, let flags, let mode):
                posix_spawn_file_actions_addopen(&actions, fd, file, flags, mode)
            case .copy(let fd, let from):
                posix_spawn_file_actions_adddup2(&actions, from, fd)
            }
        }
        mesh_spawn_closefrom(&actions, 3)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var defaults = sigset_t()
        sigfillset(&defaults)
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setsigmask(&attr, &empty)
        var flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK
        if newProcessGroup {
            posix_spawnattr_setpgroup(&attr, 0)
            flags |= POSIX_SPAWN_SETPGROUP
        }
        posix_spawnattr_setflags(&attr, Int16(flags))
        let argv = ([argv0 ?? path] + arguments).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        let envp = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for e in envp { free(e) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attr, argv, envp)
        guard rc == 0 else { throw Failure(command: argv0 ?? path, code: rc) }
        return pid
    }

    /// The first executable `name` in the directories of `path` (a PATH value).
    public static func lookup(_ name: String, path: String) -> String? {
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    /// How a child ended, from `waitpid`'s status: its exit code, or 128 + the signal that killed it (as
    /// a shell reports it).
    public static func exitCode(_ status: Int32) -> Int32 {
        let low = status & 0x7F
        return low == 0 ? (status >> 8) & 0xFF : 128 + low
    }
}
