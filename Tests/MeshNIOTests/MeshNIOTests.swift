import Foundation
import MeshTestSupport
import NIOCore
import NIOEmbedded
import Testing

@testable import MeshNIO

@Suite("MeshNIO: host:port text, the connection registry, UDP and TCP on one port", .rationed)
struct MeshNIOTests {
    @Test("hostPort: IPv4 as is, IPv6 in brackets, a Unix socket by its description")
    func hostPortText() throws {
        #expect(hostPort(try SocketAddress(ipAddress: "127.0.0.1", port: 53)) == "127.0.0.1:53")
        #expect(hostPort(try SocketAddress(ipAddress: "198.18.0.7", port: 7900)) == "198.18.0.7:7900")
        #expect(hostPort(try SocketAddress(ipAddress: "::1", port: 53)) == "[::1]:53")
        #expect(hostPort(try SocketAddress(ipAddress: "fd77::a", port: 8080)) == "[fd77::a]:8080")
        let unix = try SocketAddress(unixDomainSocketPath: "/tmp/mesh.sock")
        #expect(hostPort(unix) == "\(unix)")
        #expect(!hostPort(unix).hasSuffix(":0"))
    }

    @Test("the affinity count is the number of CPUs the kernel lists as allowed for this thread")
    func affinityCount() throws {
        let status = try String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") })
        // "0-1,4,6-7": ranges and single CPUs.
        let allowed = line.split(separator: ":")[1].split(separator: ",").map { part -> Int in
            let bounds = part.trimmingCharacters(in: .whitespaces).split(separator: "-").compactMap { Int($0) }
            return bounds.count == 2 ? bounds[1] - bounds[0] + 1 : 1
        }.reduce(0, +)
        #expect(EventLoopThreads.affinityCount() == allowed)
        #expect(allowed >= 1)
    }

    @Test("the registry admits up to its limit, forgets closed connections, and closeAll closes and refuses")
    func registryLimitAndCloseAll() async throws {
        let registry = ConnectionRegistry(limit: 2)
        let a = try await connected()
        let b = try await connected()
        let c = try await connected()
        #expect(a.isActive && b.isActive && c.isActive)
        #expect(registry.admit(a) && registry.admit(b))
        #expect(registry.count == 2)
        // Full: refused, and not counted.
        #expect(!registry.admit(c))
        #expect(registry.count == 2)
        // One closes: forgotten, so the next is admitted.
        try await a.close()
        await a.testingEventLoop.run()  // the close future's callbacks
        #expect(registry.count == 1)
        #expect(registry.admit(c))
        #expect(registry.count == 2)
        // Shutdown: every open one is closed, and later ones are refused even under the limit.
        await registry.closeAll()
        await b.testingEventLoop.run()
        await c.testingEventLoop.run()
        #expect(!b.isActive && !c.isActive)
        #expect(registry.count == 0)
        let late = try await connected()
        #expect(!registry.admit(late))
        #expect(registry.count == 0)
        #expect(late.isActive)  // the caller closes what is refused
        _ = try await late.finish()
    }

    @Test("a limit below one admits one connection")
    func registryLimitAtLeastOne() async throws {
        let registry = ConnectionRegistry(limit: 0)
        #expect(registry.admit(try await connected()))
        #expect(!registry.admit(try await connected()))
        #expect(registry.count == 1)
    }

    @Test("bindUDPAndTCP with port 0: a TCP port taken is retried on a new UDP port, the loser's UDP closed")
    func bindRetriesOnAnyPort() async throws {
        let attempts = Attempts()
        let (udp, tcp) = try await bindUDPAndTCP(
            port: 0,
            udp: { port in
                #expect(port == 0)
                let channel = try await connected()
                channel.localAddress = try SocketAddress(ipAddress: "127.0.0.1", port: 40_000 + attempts.udp.count)
                attempts.udp.append(channel)
                return channel
            },
            tcp: { port in
                attempts.tcpPorts.append(port)
                if attempts.tcpPorts.count < 3 { throw IOError(errnoCode: 98, reason: "bind") }  // EADDRINUSE
                return try await connected()
            }
        )
        #expect(attempts.tcpPorts == [40_000, 40_001, 40_002])
        #expect(udp.localAddress?.port == 40_002 && tcp.isActive)
        #expect(attempts.udp.prefix(2).allSatisfy { !$0.isActive })
        #expect(attempts.udp[2].isActive)
    }

    @Test("bindUDPAndTCP with a fixed port: the first failure is thrown, the UDP channel closed")
    func bindFixedPortFailsAtOnce() async throws {
        let attempts = Attempts()
        await #expect(throws: IOError.self) {
            _ = try await bindUDPAndTCP(
                port: 5353,
                udp: { port in
                    let channel = try await connected()
                    channel.localAddress = try SocketAddress(ipAddress: "127.0.0.1", port: port)
                    attempts.udp.append(channel)
                    return channel
                },
                tcp: { port in
                    attempts.tcpPorts.append(port)
                    throw IOError(errnoCode: 98, reason: "bind")
                }
            )
        }
        #expect(attempts.tcpPorts == [5353])
        #expect(attempts.udp.count == 1 && !attempts.udp[0].isActive)
    }

    @Test("bindUDPAndTCP gives up after its attempts with the last error")
    func bindGivesUp() async throws {
        let attempts = Attempts()
        await #expect(throws: IOError.self) {
            _ = try await bindUDPAndTCP(
                port: 0,
                attempts: 4,
                udp: { _ in
                    let channel = try await connected()
                    attempts.udp.append(channel)
                    return channel
                },
                tcp: { port in
                    attempts.tcpPorts.append(port)
                    throw IOError(errnoCode: 98, reason: "bind")
                }
            )
        }
        #expect(attempts.tcpPorts.count == 4)
        #expect(attempts.udp.allSatisfy { !$0.isActive })
    }
}

/// A test channel that is active (connected), as an accepted connection is. `NIOAsyncTestingChannel`, not
/// `EmbeddedChannel`: these tests await, and may resume on another thread, which an EmbeddedChannel forbids.
func connected() async throws -> NIOAsyncTestingChannel {
    let channel = NIOAsyncTestingChannel()
    try await channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).get()
    return channel
}

/// What the bind closures were called with (they run one at a time, on the test's task).
final class Attempts: @unchecked Sendable {
    // Only touched by the closures bindUDPAndTCP calls in turn, never concurrently.
    var udp: [NIOAsyncTestingChannel] = []
    var tcpPorts: [Int] = []
}
