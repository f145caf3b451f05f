import Foundation
import MeshNIO
import MeshTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Spawn: child processes by posix_spawn", .rationed)
struct SpawnTests {
    /// Runs `script` in `sh` with stdout to a file; the exit code and what it printed.
    private func shell(
        _ script: String,
        environment: [String: String] = ["PATH": "/usr/bin:/bin"]
    ) async throws -> (code: Int32, output: String) {
        try await self.spawn("/bin/sh", ["-c", script], environment: environment)
    }

    private func spawn(
        _ path: String,
        _ arguments: [String],
        environment: [String: String] = ["PATH": "/usr/bin:/bin"]
    ) async throws -> (code: Int32, output: String) {
        let dir = TempDir("spawn")
        let out = dir.path + "/out"
        let pid = try Spawn.start(
            path,
            arguments,
            environment: environment,
            descriptors: Spawn.output(to: out, append: false)
        )
        var status: Int32 = 0
        #expect(await eventually { waitpid(pid, &status, WNOHANG) == pid })
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        return (Spawn.exitCode(status), text)
    }

    @Test("the child gets stdin, stdout and stderr and none of the parent's other descriptors")
    func onlyTheThreeStandardDescriptors() async throws {
        // A descriptor without O_CLOEXEC, as another thread might hold when the child starts.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd > 2)
        defer { close(fd) }
        let (code, output) = try await self.shell("ls /proc/$$/fd")
        #expect(code == 0)
        #expect(Set(output.split(separator: "\n")) == ["0", "1", "2"], "\(output)")
    }

    @Test("the environment is exactly the one given")
    func exactEnvironment() async throws {
        let (code, output) = try await self.shell("env | sort", environment: ["A": "1", "PATH": "/usr/bin:/bin"])
        #expect(code == 0)
        let names = Set(output.split(separator: "\n").map { $0.split(separator: "=")[0] })
        // sh adds PWD (and may add SHLVL, _); nothing of the test process's own environment comes through.
        #expect(names.isSuperset(of: ["A", "PATH"]))
        #expect(names.subtracting(["A", "PATH", "PWD", "SHLVL", "_"]).isEmpty, "\(names)")
    }

    @Test("signals start at their defaults: none of 1-31 ignored, none blocked (the test process ignores SIGPIPE)")
    func defaultSignals() async throws {
        // grep reads its own status (a shell's would show what it blocks while it forks).
        let (code, output) = try await self.spawn("/bin/grep", ["-E", "^Sig(Blk|Ign):", "/proc/self/status"])
        #expect(code == 0)
        var masks: [String: UInt64] = [:]
        for line in output.split(separator: "\n") {
            let fields = line.split(separator: ":")
            guard fields.count == 2 else { continue }
            masks[String(fields[0])] = UInt64(fields[1].trimmingCharacters(in: .whitespaces), radix: 16)
        }
        #expect(masks["SigBlk"] == 0, "\(output)")
        // Bits 31 and 32 are glibc's own real-time signals (cancellation, setxid), which it keeps from
        // user code; every standard signal is at its default.
        let ignored = try #require(masks["SigIgn"], "\(output)")
        #expect(ignored & 0x7FFF_FFFF == 0, "\(output)")
    }

    @Test("exit codes, and 128 + the signal for a killed child")
    func exitCodes() async throws {
        #expect(try await self.shell("exit 3").code == 3)
        #expect(try await self.shell("kill -9 $$").code == 128 + 9)
    }

    @Test("a missing program is an error that names it; lookup follows the PATH given")
    func missingProgram() throws {
        #expect(throws: Spawn.Failure.self) {
            _ = try Spawn.start("/nonexistent/prog", [], environment: [:], descriptors: [])
        }
        do {
            _ = try Spawn.start("/nonexistent/prog", [], environment: [:], descriptors: [])
        } catch {
            #expect(error.description == "command not found: /nonexistent/prog")
        }
        #expect(Spawn.lookup("sh", path: "/nonexistent:/bin") == "/bin/sh")
        #expect(Spawn.lookup("sh", path: "/nonexistent") == nil)
    }
}
