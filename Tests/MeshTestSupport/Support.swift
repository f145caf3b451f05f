import Foundation
import MeshNIO
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A directory under /tmp removed when the value is released.
public final class TempDir: Sendable {
    public let path: String

    public init(_ prefix: String = "mesh-test") {
        let base = FileManager.default.temporaryDirectory.path + "/\(prefix)-\(getpid())-\(UUID().uuidString.prefix(8))"
        try! FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        self.path = base
    }

    deinit {
        try? FileManager.default.removeItem(atPath: self.path)
    }
}

/// The folder that holds the package's built executables (beside the test bundle), or
/// `$MESH_BIN_DIR` when set.
public func binaryDirectory() -> String {
    if let dir = ProcessInfo.processInfo.environment["MESH_BIN_DIR"], !dir.isEmpty { return dir }
    let exe = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    // On Linux the test runner is `<bin>/<package>PackageTests.xctest`; elsewhere a bundle inside <bin>.
    while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("meshctl").path), dir.path != "/" {
        dir = dir.deletingLastPathComponent()
    }
    return dir.path
}

/// What a finished process printed and how it ended.
public struct ProcessResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String

    public init(status: Int32, stdout: String, stderr: String) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// A process the test started; killed on release if still running. Its output goes to two files (read
/// whenever asked, complete once it has exited): unlike a pipe read by a handler, nothing it wrote can be
/// lost or late when the machine is loaded, and whatever it leaves running cannot hold the read back.
///
/// Started with `MeshNIO.Spawn` (posix_spawn), not Foundation's `Process`: `Process.run()` called from
/// many tests at once crashed the test process (SIGSEGV in its argument copying), and each `Process`
/// keeps a run-loop thread.
public final class Subprocess: Sendable {
    public let pid: pid_t
    private let outPath: String
    private let errPath: String
    /// The raw `waitpid` status once reaped; the pid is never signalled after that (it may be reused).
    private let reaped = Mutex<Int32?>(nil)

    public init(_ path: String, _ arguments: [String], environment: [String: String] = [:], stdin: String? = nil) throws
    {
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        let base = FileManager.default.temporaryDirectory.path + "/mesh-test-output-\(getpid())-\(UUID().uuidString)"
        self.outPath = base + ".out"
        self.errPath = base + ".err"
        var input: [Int32] = [-1, -1]
        // Children are spawned with every descriptor above stderr closed, so the pipe needs no O_CLOEXEC.
        guard pipe(&input) == 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        defer { if input[1] >= 0 { close(input[1]) } }
        do {
            defer { close(input[0]) }
            self.pid = try Spawn.start(
                path,
                arguments,
                environment: env,
                descriptors: [
                    .copy(0, from: input[0]),
                    .open(1, path: self.outPath, flags: O_WRONLY | O_CREAT | O_TRUNC),
                    .open(2, path: self.errPath, flags: O_WRONLY | O_CREAT | O_TRUNC),
                ]
            )
        }
        if let s = stdin {
            // Small inputs (a token, a manifest): the pipe's buffer takes them whole.
            var bytes = Array(s.utf8)[...]
            while !bytes.isEmpty {
                let n = bytes.withUnsafeBytes { write(input[1], $0.baseAddress, $0.count) }
                if n <= 0 { break }
                bytes = bytes.dropFirst(n)
            }
        }
    }

    private static func text(_ path: String) -> String {
        String(decoding: FileManager.default.contents(atPath: path) ?? Data(), as: UTF8.self)
    }

    public var stdout: String { Self.text(self.outPath) }
    public var stderr: String { Self.text(self.errPath) }

    /// The raw wait status when the process has exited (reaping it), nil while it runs. Never blocks.
    private func poll() -> Int32? {
        self.reaped.withLock { reaped in
            if let reaped { return reaped }
            var status: Int32 = 0
            let r = waitpid(self.pid, &status, WNOHANG)
            if r == self.pid {
                reaped = status
            } else if r < 0 && errno == ECHILD {
                reaped = -1
            }
            return reaped
        }
    }

    public var isRunning: Bool { self.poll() == nil }

    /// Sends `sig` while the process runs.
    public func signal(_ sig: Int32) {
        self.reaped.withLock { reaped in
            if reaped == nil { _ = kill(self.pid, sig) }
        }
    }

    /// Waits up to `timeout` for the process to exit; kills it and returns nil when it does not. The
    /// status is the exit code, or 128 + the signal that ended it.
    public func wait(timeout: Duration = .seconds(30)) async -> ProcessResult? {
        let deadline = ContinuousClock.now + timeout
        while self.poll() == nil && ContinuousClock.now < deadline {
            await pause(.milliseconds(20))
        }
        guard let status = self.poll() else {
            self.signal(SIGTERM)
            return nil
        }
        return ProcessResult(status: Spawn.exitCode(status), stdout: self.stdout, stderr: self.stderr)
    }

    /// Waits for the process to exit, blocking the calling thread (for synchronous helpers; never on the
    /// cooperative pool for long).
    public func waitBlocking() -> ProcessResult {
        let status = self.reaped.withLock { reaped -> Int32 in
            if let reaped { return reaped }
            var status: Int32 = 0
            while waitpid(self.pid, &status, 0) < 0 && errno == EINTR {}
            reaped = status
            return status
        }
        return ProcessResult(status: Spawn.exitCode(status), stdout: self.stdout, stderr: self.stderr)
    }

    deinit {
        if self.poll() == nil {
            kill(self.pid, SIGKILL)
            // Reaped off the caller's thread: SIGKILL ends it at once, but the wait is still a blocking call.
            let pid = self.pid
            DedicatedThread.start(name: "reap") {
                var status: Int32 = 0
                while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
            }
        }
        try? FileManager.default.removeItem(atPath: self.outPath)
        try? FileManager.default.removeItem(atPath: self.errPath)
    }
}

/// Runs `arguments` (looked up in PATH by `/usr/bin/env`) to completion, blocking the calling thread;
/// standard output, and the exit status (for synchronous set-up such as `ip netns add`).
@discardableResult
public func runBlocking(_ arguments: [String]) throws -> (status: Int32, output: String) {
    let result = try Subprocess("/usr/bin/env", arguments).waitBlocking()
    return (result.status, result.stdout)
}

/// Runs a command to completion (bounded by `timeout`).
public func run(
    _ path: String,
    _ arguments: [String],
    environment: [String: String] = [:],
    stdin: String? = nil,
    timeout: Duration = .seconds(60)
) async throws -> ProcessResult {
    let p = try Subprocess(path, arguments, environment: environment, stdin: stdin)
    guard let r = await p.wait(timeout: timeout) else {
        return ProcessResult(status: -1, stdout: p.stdout, stderr: p.stderr + "\n(killed after \(timeout))")
    }
    return r
}

/// Polls `condition` until it holds or `timeout` passes; returns whether it held. The default bound is
/// generous: it only limits how long a failing test waits, and a loaded machine must not make a passing
/// one fail.
public func eventually(
    timeout: Duration = .seconds(30),
    every: Duration = .milliseconds(20),
    _ condition: () async throws -> Bool
) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        // A cancelled test (its time limit ran out) stops polling: `Task.sleep` would throw at once and
        // the loop would spin on a cooperative thread until the deadline, starving the other tests.
        if Task.isCancelled { break }
        try? await Task.sleep(for: every)
    }
    return try await condition()
}

/// Sleeps for `duration` even when the calling task is cancelled: for teardown paths, which must finish
/// (wait for a child process, a lab's `down`) after a time limit cancelled the test. `Task.sleep` throws
/// at once in a cancelled task, so a polling loop on it would spin on a cooperative thread instead.
public func pause(_ duration: Duration) async {
    await Task.detached { try? await Task.sleep(for: duration) }.value
}

/// A port free for TCP and UDP on 127.0.0.1 right now, for a server a test starts (`--listen 127.0.0.1:P`).
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`), never from it: a port the kernel
/// hands out by `bind(0)` is also what it gives the next outgoing connection, and in a test process with
/// hundreds of connections one of them took a port between this call and the server's bind ("Address
/// already in use"). Below the range only explicit binds compete: the other servers of this run, which
/// this process's counter keeps apart.
public func freePort() -> Int {
    let (low, high) = FreePorts.range
    for _ in 0..<(high - low) {
        let port = FreePorts.next()
        if FreePorts.bindable(port, SOCK_STREAM) && FreePorts.bindable(port, SOCK_DGRAM) { return port }
    }
    preconditionFailure("no free port in \(low)..<\(high) on 127.0.0.1")
}

private enum FreePorts {
    /// 12,000 ports below the ephemeral range (32768-60999 by default: 20768-32767).
    static let range: (Int, Int) = {
        let text = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8)) ?? ""
        let low =
            text.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first.flatMap { Int($0) } ?? 32768
        let top = max(low, 2048)
        return (max(1024, top - 12_000), top)
    }()
    /// Where this process starts in the range (apart from another test process running at the same time).
    private static let counter = Atomic<Int>(Int(getpid()) &* 7919)

    static func next() -> Int {
        let (low, high) = Self.range
        let n = Self.counter.add(1, ordering: .relaxed).newValue
        return low + ((n % (high - low)) + (high - low)) % (high - low)
    }

    static func bindable(_ port: Int, _ type: __socket_type) -> Bool {
        let fd = socket(AF_INET, Int32(type.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return withIPv4Address(port: port) { bind(fd, $0, $1) } == 0
    }
}

/// Calls `body` with an IPv4 socket address (`host`, `port`) for bind or connect.
public func withIPv4Address<T>(
    _ host: String = "127.0.0.1",
    port: Int,
    _ body: (UnsafePointer<sockaddr>, socklen_t) -> T
) -> T {
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr(host)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
}

/// A blocking TCP client for sending exact bytes (garbage, half requests) and reading the reply.
public final class RawSocket {
    public let fd: Int32

    public init(host: String = "127.0.0.1", port: Int, timeout: Int = 10) throws {
        self.fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(self.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let fd = self.fd
        if withIPv4Address(host, port: port, { connect(fd, $0, $1) }) != 0 {
            // No close here: every stored property is set, so a throw from here runs `deinit`, which closes
            // the socket. Closing it here as well was a double close, which closed whatever descriptor took
            // the number meanwhile: NIO's sockets, seen as EBADF crashes in NIO when a test polled a port
            // that refused (a workload not started yet) with a RawSocket on a loaded machine.
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .ECONNREFUSED)
        }
    }

    deinit { close(self.fd) }

    public func send(_ text: String) { self.send(Array(text.utf8)) }

    public func send(_ bytes: [UInt8]) {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            off += n
        }
    }

    /// Stops sending (the server sees end of input); reading still works.
    public func shutdownWrite() { shutdown(self.fd, Int32(SHUT_WR)) }

    /// Reads until the server closes or the timeout passes.
    public func readAll() -> String {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(self.fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Reads what one recv returns (waits up to the timeout for it).
    public func readSome() -> String {
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = recv(self.fd, &buf, buf.count, 0)
        return String(decoding: buf[0..<max(0, n)], as: UTF8.self)
    }

    /// Reads until what came contains `marker`, the server closes or the timeout passes; returns all of it.
    public func readUntil(_ marker: String) -> String {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while !String(decoding: out, as: UTF8.self).contains(marker) {
            let n = recv(self.fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Reads one HTTP/1.1 response: its head, then a Content-Length body (or until close).
    public func readFirstResponse() -> String {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let text = String(decoding: out, as: UTF8.self)
            if let headEnd = text.range(of: "\r\n\r\n") {
                let head = text[..<headEnd.lowerBound].lowercased()
                if let cl = head.split(separator: "\r\n").first(where: { $0.hasPrefix("content-length:") }),
                    let n = Int(cl.dropFirst("content-length:".count).trimmingCharacters(in: .whitespaces))
                {
                    let bodyStart = text.utf8.distance(
                        from: text.utf8.startIndex,
                        to: headEnd.upperBound.samePosition(in: text.utf8)!
                    )
                    if out.count >= bodyStart + n { return String(decoding: out[..<(bodyStart + n)], as: UTF8.self) }
                }
            }
            let n = recv(self.fd, &buf, buf.count, 0)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// True when the server has closed the connection (read returns 0 within the timeout).
    public func isClosedByPeer() -> Bool {
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(self.fd, &buf, buf.count, 0)
            if n == 0 { return true }
            if n < 0 { return errno == ECONNRESET }
        }
    }
}

/// The resident set size of a process in bytes, from /proc (0 when unreadable).
public func residentBytes(pid: Int32) -> Int {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        let kb = line.split(separator: " ").compactMap { Int($0) }.first ?? 0
        return kb * 1024
    }
    return 0
}

/// Runs blocking work (raw sockets, waiting on processes) on its own thread, so it never holds
/// one of the few threads Swift concurrency runs everything else on (servers under test included).
public func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let thread = Thread {
            continuation.resume(with: Result { try body() })
        }
        thread.start()
    }
}

/// TCP connections of this machine in state ESTABLISHED whose remote port is `port` (IPv4 and IPv6): from a
/// test process that runs a server and its clients, the clients' ends of their connections to that server.
public func establishedTCPConnections(toPort port: Int) -> Int {
    var count = 0
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // Read to the end: the kernel renders these tables a page at a time, and a read sized by the file's
        // (zero) length would see only part of a long one.
        guard let handle = FileHandle(forReadingAtPath: table) else { continue }
        let text = String(decoding: handle.readDataToEndOfFile(), as: UTF8.self)
        try? handle.close()
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            // sl local_address rem_address st ...; addresses are HEXADDR:HEXPORT, state 01 is ESTABLISHED.
            guard fields.count > 3, fields[3] == "01", let colon = fields[2].lastIndex(of: ":"),
                Int(fields[2][fields[2].index(after: colon)...], radix: 16) == port
            else { continue }
            count += 1
        }
    }
    return count
}
