import MeshCore
import MeshNIO
import MeshTestSupport
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import MeshAgent

#if canImport(Glibc)
import Glibc
import func MeshTestSupport.onTeardown
import struct MeshTestSupport.AwaitedTeardown
#endif

/// A blocking TCP client on plain sockets, for byte-exact checks of the relay without NIO on the client side.
private struct BlockingClient {
    let fd: Int32

    static func connect(_ address: SocketAddress) throws -> BlockingClient {
        let family: Int32
        if case .v6 = address { family = AF_INET6 } else { family = AF_INET }
        let fd = socket(family, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let rc = SpliceSocket.withSockAddr(address) { Glibc.connect(fd, $0, $1) }
        if rc != 0 {
            let code = errno
            Glibc.close(fd)
            throw SpliceLoop.Failure("connect", code)
        }
        return BlockingClient(fd: fd)
    }

    /// Byte `i` of a stream seeded with `seed`: the receiver checks every byte against it.
    static func pattern(_ i: Int, seed: Int) -> UInt8 { UInt8(truncatingIfNeeded: (i &* 31) &+ (i >> 13) &+ seed) }

    func sendPattern(count: Int, seed: Int) throws {
        var buffer = [UInt8](repeating: 0, count: 24 * 1024 + 7)  // odd size: chunks do not line up with reads
        var offset = 0
        while offset < count {
            let n = min(buffer.count, count - offset)
            for i in 0..<n { buffer[i] = Self.pattern(offset + i, seed: seed) }
            var done = 0
            while done < n {
                let sent = buffer.withUnsafeBytes { Glibc.send(self.fd, $0.baseAddress! + done, n - done, 0) }
                if sent < 0 { throw SpliceLoop.Failure("send", errno) }
                done += sent
            }
            offset += n
        }
    }

    /// Reads until EOF; returns the count and whether every byte matched the pattern.
    func receivePattern(seed: Int) throws -> (count: Int, intact: Bool) {
        var buffer = [UInt8](repeating: 0, count: 40 * 1024 + 3)
        var total = 0
        var intact = true
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress!, $0.count, 0) }
            if n < 0 { throw SpliceLoop.Failure("recv", errno) }
            if n == 0 { return (total, intact) }
            for i in 0..<n where buffer[i] != Self.pattern(total + i, seed: seed) { intact = false }
            total += n
        }
    }

    /// Sends `count` pattern bytes and reads as many back: true when they all came back unchanged.
    func echoes(count: Int, seed: Int) throws -> Bool {
        try self.sendPattern(count: count, seed: seed)
        var buffer = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = buffer.withUnsafeMutableBytes { recv(self.fd, $0.baseAddress! + got, count - got, 0) }
            guard n > 0 else { return false }
            got += n
        }
        return buffer.indices.allSatisfy { buffer[$0] == Self.pattern($0, seed: seed) }
    }

    func shutdownWrite() { _ = shutdown(self.fd, Int32(SHUT_WR)) }

    /// Closes with a reset (SO_LINGER 0) rather than a FIN.
    func reset() {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(self.fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        Glibc.close(self.fd)
    }

    func close() { Glibc.close(self.fd) }
}

/// The names of this process's threads (/proc/self/task/*/comm).
private func threadNames() -> [String] {
    guard let dir = opendir("/proc/self/task") else { return [] }
    defer { closedir(dir) }
    var names: [String] = []
    while let entry = readdir(dir) {
        let tid = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        guard !tid.hasPrefix("."), let file = fopen("/proc/self/task/\(tid)/comm", "r") else { continue }
        var line = [CChar](repeating: 0, count: 64)
        if fgets(&line, Int32(line.count), file) != nil {
            names.append(
                String(decoding: line.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            )
        }
        fclose(file)
    }
    return names
}

/// A data plane with one TCP route (service `name`, a fresh VIP, port 8080) to a fresh echo backend; `body`
/// gets the data plane and the VIP's address.
private func withEchoRoute<T: Sendable>(
    _ name: String,
    _ configuration: DataPlaneConfiguration = testConfiguration(),
    _ body: (DataPlane, SocketAddress) async throws -> T
) async throws -> T {
    let backend = try await TestServers.echo()
    onTeardown { await backend.close() }
    return try await withDataPlane(configuration) { dp in
        let vip = TestAddresses.vip()
        try await dp.apply(
            RouteTable(routes: [Route(service: service(name), vip: vip, port: 8080, backends: [backend.backend()])])
        )
        return try await body(dp, TestClient.vipAddress(vip, 8080))
    }
}

@Suite("Data plane: TCP splice loops", .timeLimit(.minutes(1)), .awaitedTeardown, .rationed)
struct DataPlaneSpliceTests {
    @Test("splice threads: one per event loop, named mesh-splice-N, from the first TCP route to shutdown")
    func threadsStartLazilyAndAreNamed() async throws {
        let backend = try await TestServers.echo()
        onTeardown { await backend.close() }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let dataPlane = DataPlane(configuration: testConfiguration(), eventLoopGroup: group, logger: testLogger)
        let vip = TestAddresses.vip()
        try await dataPlane.apply(
            RouteTable(routes: [
                Route(service: service("udp-only"), vip: vip, port: 8081, proto: .udp, backends: [backend.backend()])
            ])
        )
        #expect(dataPlane.spliceThreads == 0, "no splice thread without a TCP route")
        try await dataPlane.apply(
            RouteTable(routes: [
                Route(service: service("named"), vip: vip, port: 8080, backends: [backend.backend()])
            ])
        )
        #expect(dataPlane.spliceThreads == 2)
        let names = threadNames()
        #expect(names.contains("mesh-splice-0") && names.contains("mesh-splice-1"), "threads: \(names)")
        let reply = try await TestClient.exchange(TestClient.vipAddress(vip, 8080), send: "hi", halfClose: true)
        #expect(String(buffer: reply) == "hi")
        await dataPlane.shutdown(drain: false)
        #expect(dataPlane.spliceThreads == 0, "splice threads must exit at shutdown")
        try await group.shutdownGracefully()
    }

    @Test("8 connections echo 4 MiB each both ways at once: every byte arrives, in order, and all close")
    func bulkEchoIntegrity() async throws {
        try await withEchoRoute("bulk-echo") { dp, address in
            let size = 4 * 1024 * 1024
            let results = try await withThrowingTaskGroup(of: (Int, Bool).self) { group in
                for seed in 0..<8 {
                    group.addTask {
                        try await DedicatedThread.run(name: "relay-test") {
                            let client = try BlockingClient.connect(address)
                            defer { client.close() }
                            // Send and receive at once: the echo pushes back while the client still sends.
                            let sender = Mutex<(any Error)?>(nil)
                            let sent = Atomic<Bool>(false)
                            DedicatedThread.start(name: "relay-test-send") {
                                do { try client.sendPattern(count: size, seed: seed) } catch {
                                    sender.withLock { $0 = error }
                                }
                                client.shutdownWrite()
                                sent.store(true, ordering: .releasing)
                            }
                            let result = try client.receivePattern(seed: seed)
                            while !sent.load(ordering: .acquiring) { usleep(1000) }
                            if let error = sender.withLock({ $0 }) { throw error }
                            return result
                        }
                    }
                }
                var all: [(Int, Bool)] = []
                for try await result in group { all.append(result) }
                return all
            }
            #expect(results.count == 8)
            for (count, intact) in results {
                #expect(count == size)
                #expect(intact, "bytes changed or reordered through the relay")
            }
            #expect(await eventually { dp.openChannels == 0 })
            let route = try #require(dp.snapshot().routes.first)
            #expect(route.bytesIn == 8 * size && route.bytesOut == 8 * size)
        }
    }

    @Test("a client reset tears down both sides")
    func clientReset() async throws {
        try await withEchoRoute("reset") { dp, address in
            try await DedicatedThread.run(name: "relay-test") {
                let client = try BlockingClient.connect(address)
                try #require(try client.echoes(count: 1000, seed: 1))
                client.reset()
            }
            #expect(await eventually { dp.openChannels == 0 }, "the upstream side must close too")
        }
    }

    @Test("beyond maxConnectionsPerListener a new connection is closed at once; the open ones keep working")
    func connectionLimit() async throws {
        var configuration = testConfiguration()
        configuration.maxConnectionsPerListener = 2
        try await withEchoRoute("limit", configuration) { dp, address in
            try await DedicatedThread.run(name: "relay-test") {
                let a = try BlockingClient.connect(address)
                let b = try BlockingClient.connect(address)
                defer {
                    a.close()
                    b.close()
                }
                for client in [a, b] { try #require(try client.echoes(count: 10, seed: 2)) }
                // The third is accepted by the kernel and closed by the relay: EOF (or a reset), no echo.
                let c = try BlockingClient.connect(address)
                defer { c.close() }
                try? c.sendPattern(count: 10, seed: 2)
                var byte: UInt8 = 0
                let n = recv(c.fd, &byte, 1, 0)
                #expect(n <= 0, "the connection over the limit must not be proxied")
            }
            #expect(dp.snapshot().routes.first?.totalConnections == 2)
        }
    }

    @Test("a removed route's open connection is closed when drainTimeout ends")
    func drainDeadline() async throws {
        try await withEchoRoute("drain", testConfiguration(drainTimeout: .milliseconds(300))) { dp, address in
            let client = try await DedicatedThread.run(name: "relay-test") {
                let client = try BlockingClient.connect(address)
                try client.sendPattern(count: 10, seed: 3)
                return client
            }
            defer { client.close() }
            #expect(await eventually { dp.openClientChannels == 1 })
            // The echo is back before the route goes (a loaded machine may take longer than the drain
            // time to relay it): what is tested is the close at the drain deadline, not the relay's speed.
            #expect(
                await eventually {
                    var peek = [UInt8](repeating: 0, count: 10)
                    return recv(client.fd, &peek, peek.count, Int32(MSG_PEEK | MSG_DONTWAIT)) == peek.count
                }
            )
            let removed = ContinuousClock.now
            try await dp.apply(RouteTable())
            // The relay closes it after the drain time: the client reads its echo, then EOF.
            let (count, intact) = try await DedicatedThread.run(name: "relay-test") {
                try client.receivePattern(seed: 3)
            }
            let waited = ContinuousClock.now - removed
            #expect(count == 10 && intact)
            #expect(waited >= .milliseconds(250), "closed before the drain time (\(waited))")
            #expect(await eventually { dp.openChannels == 0 })
        }
    }
}
