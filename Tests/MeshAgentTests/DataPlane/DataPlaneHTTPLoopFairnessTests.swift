import MeshCore
import MeshNIO
import MeshTestSupport
import NIOCore
import NIOPosix
import Synchronization
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

#if canImport(Glibc)
import Glibc
#endif

/// The epoll HTTP engine shares a splice loop between connections: one connection's transfer must not hold
/// it. A client (or backend) that keeps its socket full is read at most `HTTPLoopState.readsPerTurn` times per
/// turn, then the loop serves its other ready sockets and comes back.
@Suite("Data plane: epoll HTTP engine, loop fairness", .timeLimit(.minutes(1)), .awaitedTeardown, .rationed)
struct DataPlaneHTTPLoopFairnessTests {
    enum Direction: String, CaseIterable, Sendable {
        /// The client streams a request body up.
        case upload
        /// The backend streams a response body down.
        case download
    }

    /// What the streaming thread and the test share.
    final class Stream: Sendable {
        let bytes = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)
    }

    @Test(
        "a connection streaming a large body yields its loop at the read bound: another connection on the same loop is served meanwhile",
        arguments: Direction.allCases
    )
    func streamDoesNotHoldTheLoop(direction: Direction) async throws {
        try await TestEngine.$current.withValue(.epoll) {
            // The stream's backend: a sink for the upload; for the download a blocking server on a thread of its
            // own (the NIO test backend's `/big` pump would hold its event loop, which other test connections
            // share). The other request goes to a route of its own, on the same splice loop.
            let sink = try await TestServers.http("sink")
            onTeardown { await sink.close() }
            let other = try await TestServers.http("other")
            onTeardown { await other.close() }
            // One event loop, so one splice loop: both connections are served by the same thread.
            let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
            let dp = DataPlane(configuration: testConfiguration(), eventLoopGroup: group, logger: testLogger)
            let stream = Stream()
            // Bounded: the stream stops once the other connection was served, or at this many bytes. Large: the
            // stream runs on threads of its own at full speed while the other request waits for the test's NIO
            // backend; on a busy machine 512 MiB went by before that answer came.
            let limit = 8 * 1024 * 1024 * 1024
            do {
                let backend =
                    direction == .upload ? sink.backend() : try Self.blockingSource(limit: limit, stream)
                let vip = TestAddresses.vip()
                let otherVIP = TestAddresses.vip()
                try await dp.apply(
                    RouteTable(routes: [
                        Route(service: service("fair"), vip: vip, port: 8080, proto: .http, backends: [backend]),
                        Route(
                            service: service("other"),
                            vip: otherVIP,
                            port: 8080,
                            proto: .http,
                            backends: [other.backend()]
                        ),
                    ])
                )
                let address = TestClient.vipAddress(vip, 8080)
                let streamer = Task {
                    try await DedicatedThread.run(name: "fairness-stream") {
                        try Self.stream(direction, to: address, limit: limit, stream)
                    }
                }
                defer { stream.stop.store(true, ordering: .relaxed) }
                // The stream is under way (several times the bytes one turn may move).
                #expect(await eventually(30) { stream.bytes.load(ordering: .relaxed) >= 8 * 1024 * 1024 })
                // And it has met the read bound at least once: on a busy machine the source may write slower than
                // the loop reads for a while (each read drains the socket), so this is waited for, not assumed.
                #expect(
                    await eventually(60) { dp.httpLoopYields > 0 },
                    "the streaming connection never yielded its loop at the read bound"
                )
                let answer = try await TestHTTPConnection.get(TestClient.vipAddress(otherVIP, 8080), "/", timeout: 30)
                let bytesWhenServed = stream.bytes.load(ordering: .relaxed)
                stream.stop.store(true, ordering: .relaxed)
                let total = try await streamer.value
                #expect(answer?.status == 200 && answer?.body == "other")
                #expect(bytesWhenServed < limit, "the other request was answered only after the stream ended")
                #expect(total >= bytesWhenServed)
                #expect(dp.httpLoopYields > 0, "the streaming connection never yielded its loop at the read bound")
            } catch {
                stream.stop.store(true, ordering: .relaxed)
                await dp.shutdown(drain: false)
                try await group.shutdownGracefully()
                throw error
            }
            await dp.shutdown(drain: false)
            try await group.shutdownGracefully()
        }
    }

    /// Upload: a POST whose body (`limit` bytes announced) is sent as fast as the proxy takes it. Download: a
    /// GET of `/big/<limit>` read as fast as the proxy sends it. Either stops at `stream.stop`; returns the
    /// body bytes moved (also kept current in `stream.bytes`). Blocking socket, dedicated thread.
    private static func stream(
        _ direction: Direction,
        to address: SocketAddress,
        limit: Int,
        _ stream: Stream
    ) throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        try #require(fd >= 0)
        defer { close(fd) }
        var timeout = timeval(tv_sec: 20, tv_usec: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard SpliceSocket.withSockAddr(address, { connect(fd, $0, $1) }) == 0 else {
            throw SpliceLoop.Failure("connect", errno)
        }
        let head =
            direction == .upload
            ? "POST / HTTP/1.1\r\nhost: test\r\ncontent-length: \(limit)\r\n\r\n"
            : "GET / HTTP/1.1\r\nhost: test\r\n\r\n"
        try Self.sendAll(fd, Array(head.utf8))
        var buffer = [UInt8](repeating: UInt8(ascii: "x"), count: 256 * 1024)
        var moved = 0
        while moved < limit, !stream.stop.load(ordering: .relaxed) {
            let n: Int
            if direction == .upload {
                n = min(buffer.count, limit - moved)
                try Self.sendAll(fd, buffer[0..<n])
            } else {
                n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
                if n < 0 { throw SpliceLoop.Failure("recv", errno) }
                if n == 0 { break }
            }
            moved += n
            stream.bytes.store(moved, ordering: .relaxed)
        }
        return moved
    }

    /// A backend on a thread of its own: accepts one connection, reads a request head, answers 200 with a
    /// `limit`-byte body sent as fast as the proxy takes it, until `stream.stop`; then closes.
    private static func blockingSource(limit: Int, _ stream: Stream) throws -> Backend {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        try #require(listener >= 0)
        let bound = try SocketAddress(ipAddress: "127.0.0.1", port: 0)
        guard SpliceSocket.withSockAddr(bound, { bind(listener, $0, $1) }) == 0, listen(listener, 4) == 0 else {
            close(listener)
            throw SpliceLoop.Failure("bind", errno)
        }
        var address = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &length) }
        }
        let port = Int(UInt16(bigEndian: address.sin_port))
        DedicatedThread.start(name: "fairness-source") {
            defer { close(listener) }
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            defer { close(fd) }
            var timeout = timeval(tv_sec: 20, tv_usec: 0)
            _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            var head: [UInt8] = []
            var byte = [UInt8](repeating: 0, count: 1)
            while !head.suffix(4).elementsEqual([13, 10, 13, 10]) {
                guard recv(fd, &byte, 1, 0) == 1 else { return }
                head.append(byte[0])
            }
            do {
                try Self.sendAll(fd, Array("HTTP/1.1 200 OK\r\ncontent-length: \(limit)\r\n\r\n".utf8))
                let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 256 * 1024)
                var sent = 0
                while sent < limit, !stream.stop.load(ordering: .relaxed) {
                    let n = min(chunk.count, limit - sent)
                    try Self.sendAll(fd, chunk[0..<n])
                    sent += n
                }
            } catch {
                return
            }
        }
        return Backend(ip: IPAddress("127.0.0.1")!, port: port)
    }

    private static func sendAll(_ fd: Int32, _ bytes: some Collection<UInt8>) throws {
        let array = Array(bytes)
        var done = 0
        while done < array.count {
            let sent = array.withUnsafeBytes {
                send(fd, $0.baseAddress! + done, array.count - done, Int32(MSG_NOSIGNAL))
            }
            if sent < 0 { throw SpliceLoop.Failure("send", errno) }
            done += sent
        }
    }
}
