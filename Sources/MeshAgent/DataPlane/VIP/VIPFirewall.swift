#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Runs `iptables`/`ip6tables` (and their `-restore`) for the VIP redirect chain of one address family. Each
/// call spawns the tool from the calling thread, so it acts in that thread's network namespace: call it from
/// an event-loop thread of the data plane's group. Blocking (a few ms per call); only at start, on a change of
/// the VIP cover, and at shutdown.
struct VIPFirewall: Sendable {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    let chain: String
    let v6: Bool

    private var tool: String { self.v6 ? "ip6tables" : "iptables" }

    /// Removes what a previous run may have left (jumps from OUTPUT and PREROUTING, the chain), then creates
    /// the chain with `prefixes` redirected to `port` and hooks it in, in one transaction.
    func install(prefixes: [String], port: Int) throws {
        self.remove()
        try self.restore(VIPRules.restoreInput(chain: self.chain, prefixes: prefixes, port: port, hook: true))
    }

    /// Replaces the chain's rules in one transaction (connections already redirected keep their NAT entry).
    func update(prefixes: [String], port: Int) throws {
        try self.restore(VIPRules.restoreInput(chain: self.chain, prefixes: prefixes, port: port, hook: false))
    }

    /// Unhooks and deletes the chain, if there. Idempotent; errors are ignored (nothing to remove).
    func remove() {
        for hook in ["OUTPUT", "PREROUTING"] {
            // Every jump (a crashed run may have left more than one).
            for _ in 0..<16 {
                guard (try? self.run([self.tool, "-w", "-t", "nat", "-D", hook, "-j", self.chain])) == 0 else { break }
            }
        }
        _ = try? self.run([self.tool, "-w", "-t", "nat", "-F", self.chain])
        _ = try? self.run([self.tool, "-w", "-t", "nat", "-X", self.chain])
    }

    /// Whether the chain exists (for tests and `/status`).
    func exists() -> Bool {
        (try? self.run([self.tool, "-w", "-t", "nat", "-S", self.chain])) == 0
    }

    /// The chain's rules as `iptables -S` prints them (nil when it does not exist).
    func listing() -> String? {
        var output = ""
        guard (try? self.run([self.tool, "-w", "-t", "nat", "-S", self.chain], output: &output)) == 0 else {
            return nil
        }
        return output
    }

    private func restore(_ input: String) throws {
        var output = ""
        let status = try self.run([self.tool + "-restore", "-w", "--noflush"], input: input, output: &output)
        guard status == 0 else {
            throw Failure(description: "\(self.tool)-restore exited \(status): \(output.prefix(500))")
        }
    }

    private func run(_ argv: [String], input: String = "") throws -> Int32 {
        var output = ""
        return try self.run(argv, input: input, output: &output)
    }

    /// Runs `argv` (the tool looked up in the sbin and bin folders) with `input` on stdin; returns its exit
    /// status, with stdout and stderr in `output`.
    private func run(_ argv: [String], input: String = "", output: inout String) throws -> Int32 {
        guard let path = Self.lookup(argv[0]) else {
            throw Failure(description: "\(argv[0]) not found (the VIP redirect needs iptables)")
        }
        let inFD = try Self.temporaryFile()
        defer { close(inFD) }
        let outFD = try Self.temporaryFile()
        defer { close(outFD) }
        var bytes = Array(input.utf8)
        if !bytes.isEmpty { _ = write(inFD, &bytes, bytes.count) }
        lseek(inFD, 0, SEEK_SET)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, inFD, 0)
        posix_spawn_file_actions_adddup2(&actions, outFD, 1)
        posix_spawn_file_actions_adddup2(&actions, outFD, 2)
        let args = ([path] + argv.dropFirst()).map { strdup($0) } + [nil]
        defer { for a in args { free(a) } }
        let env = [strdup("PATH=/usr/sbin:/sbin:/usr/bin:/bin"), nil]
        defer { free(env[0]) }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, nil, args, env)
        guard rc == 0 else { throw Failure(description: "cannot start \(path): \(String(cString: strerror(rc)))") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            guard errno == EINTR else { throw Failure(description: "waitpid \(path): errno \(errno)") }
        }
        var buffer = [UInt8](repeating: 0, count: 4096)
        lseek(outFD, 0, SEEK_SET)
        let n = read(outFD, &buffer, buffer.count)
        if n > 0 { output = String(decoding: buffer[0..<n], as: UTF8.self) }
        // WIFEXITED / WEXITSTATUS by hand (macros).
        return status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
    }

    /// An open temporary file already unlinked.
    private static func temporaryFile() throws -> Int32 {
        var template = Array("/tmp/mesh-vip-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { pointer -> Int32 in
            let fd = mkstemp(pointer.baseAddress!)
            if fd >= 0 { unlink(pointer.baseAddress!) }
            return fd
        }
        guard fd >= 0 else { throw Failure(description: "mkstemp: errno \(errno)") }
        return fd
    }

    private static func lookup(_ name: String) -> String? {
        for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
            let candidate = "\(dir)/\(name)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }
}
