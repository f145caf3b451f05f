import MeshCore
import MeshTestSupport
import NIOCore
import NIOPosix
import Testing

import struct MeshTestSupport.AwaitedTeardown
import func MeshTestSupport.onTeardown

@testable import MeshAgent

/// A UDP client socket bound to `host`, for tests: send, then wait a bounded time for one reply.
private final class UDPTestClient: Sendable {
    let channel: NIOAsyncChannel<AddressedEnvelope<ByteBuffer>, AddressedEnvelope<ByteBuffer>>

    private init(channel: NIOAsyncChannel<AddressedEnvelope<ByteBuffer>, AddressedEnvelope<ByteBuffer>>) {
        self.channel = channel
    }

    /// The socket closes after `closeAfter` seconds, which ends any wait for a reply.
    static func with<T: Sendable>(
        host: String = "127.0.0.1",
        closeAfter: Double = 5,
        _ body: (
            NIOAsyncChannelInboundStream<AddressedEnvelope<ByteBuffer>>.AsyncIterator,
            NIOAsyncChannelOutboundWriter<AddressedEnvelope<ByteBuffer>>
        ) async throws -> T
    ) async throws -> T {
        let channel = try await DatagramBootstrap(group: testGroup).bind(host: host, port: 0) { channel in
            channel.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<AddressedEnvelope<ByteBuffer>, AddressedEnvelope<ByteBuffer>>(
                    wrappingChannelSynchronously: channel
                )
            }
        }
        let raw = channel.channel
        let closer = raw.eventLoop.scheduleTask(in: .milliseconds(Int64(closeAfter * 1000))) { raw.close(promise: nil) }
        defer { closer.cancel() }
        return try await channel.executeThenClose { inbound, outbound in
            try await body(inbound.makeAsyncIterator(), outbound)
        }
    }
}

/// Sends `text` to `target` from a fresh socket and returns the reply and its source, or nil after `wait`
/// seconds (a generous default: a loaded machine may take a while to relay a datagram).
private func udpAsk(_ target: SocketAddress, _ text: String, wait: Double = 10) async throws -> (String, SocketAddress)?
{
    try await UDPTestClient.with(closeAfter: wait) { iterator, outbound in
        var iterator = iterator
        try await outbound.write(AddressedEnvelope(remoteAddress: target, data: ByteBuffer(string: text)))
        guard let reply = try? await iterator.next() else { return nil }
        return (String(buffer: reply.data), reply.remoteAddress)
    }
}

@Suite("Data plane: UDP proxy over real sockets", .timeLimit(.minutes(1)), .awaitedTeardown, .rationed)
struct DataPlaneUDPTests {
    @Test("UDP echo through a VIP: the reply comes from VIP:port; flows per client, round robin")
    func echo() async throws {
        let a = try await TestServers.udpEcho(name: "a")
        let b = try await TestServers.udpEcho(name: "b")
        onTeardown {
            await a.close()
            await b.close()
        }
        try await withDataPlane { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(
                        service: service("dns"),
                        vip: vip,
                        port: 5353,
                        proto: .udp,
                        backends: [a.backend(), b.backend()]
                    )
                ])
            )
            let target = TestClient.vipAddress(vip, 5353)
            let first = try #require(try await udpAsk(target, "q1"))
            #expect(first.1 == target)
            let second = try #require(try await udpAsk(target, "q2"))
            #expect(Set([first.0, second.0]) == ["a:q1", "b:q2"])

            // Several datagrams of one client stay on its flow (one backend). The socket's bound covers five
            // round trips on a loaded machine (5 s did not, under two busy loops).
            let replies = try await UDPTestClient.with(closeAfter: 30) { iterator, outbound in
                var iterator = iterator
                var replies: [String] = []
                for i in 0..<5 {
                    try await outbound.write(
                        AddressedEnvelope(remoteAddress: target, data: ByteBuffer(string: "m\(i)"))
                    )
                    if let r = try await iterator.next() { replies.append(String(buffer: r.data)) }
                }
                return replies
            }
            #expect(Set(replies.map { $0.prefix(1) }).count == 1 && replies.count == 5)
            let route = try #require(dp.snapshot().routes.first)
            #expect(
                route.proto == "udp" && route.totalConnections == 3 && route.bytesIn > 0
                    && route.bytesOut > route.bytesIn
            )
        }
    }

    @Test("idle flows expire")
    func flowExpiry() async throws {
        let echo = try await TestServers.udpEcho()
        onTeardown { await echo.close() }
        try await withDataPlane(
            // Timers long enough that a loaded machine (the whole suite runs in parallel) never expires a
            // flow before the test has made all three.
            testConfiguration(udp: .init(flowIdleTimeout: .seconds(6), maxFlowsPerListener: 16))
        ) { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("u"), vip: vip, port: 5353, proto: .udp, backends: [echo.backend()])
                ])
            )
            for i in 0..<3 { #expect(try await udpAsk(TestClient.vipAddress(vip, 5353), "x\(i)") != nil) }
            #expect(dp.snapshot().routes[0].activeConnections == 3)
            #expect(await eventually(20) { dp.snapshot().routes[0].activeConnections == 0 && dp.openChannels == 0 })
        }
    }

    @Test("the number of flows is bounded: a new client beyond the bound is dropped until a flow expires")
    func flowBound() async throws {
        let echo = try await TestServers.udpEcho()
        onTeardown { await echo.close() }
        try await withDataPlane(
            testConfiguration(udp: .init(flowIdleTimeout: .seconds(6), maxFlowsPerListener: 2))
        ) { dp in
            let vip = TestAddresses.vip()
            let target = TestClient.vipAddress(vip, 5353)
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("u"), vip: vip, port: 5353, proto: .udp, backends: [echo.backend()])
                ])
            )
            #expect(try await udpAsk(target, "one") != nil)
            #expect(try await udpAsk(target, "two") != nil)
            #expect(try await udpAsk(target, "three", wait: 0.2) == nil)
            #expect(dp.snapshot().routes[0].activeConnections == 2)
            #expect(await eventually(20) { dp.snapshot().routes[0].activeConnections == 0 })
            #expect(try await udpAsk(target, "four") != nil)
        }
    }

    @Test("UDP over IPv6 (::1)")
    func ipv6() async throws {
        let echo = try await TestServers.udpEcho(host: "::1", name: "six")
        onTeardown { await echo.close() }
        try await withDataPlane { dp in
            let port = try await TestAddresses.applyOnFreeIPv6Port(dp) {
                RouteTable(routes: [
                    Route(
                        service: service("u6"),
                        vip: IPAddress("::1")!,
                        port: $0,
                        proto: .udp,
                        backends: [echo.backend()]
                    )
                ])
            }
            let reply = try await UDPTestClient.with(host: "::1") { iterator, outbound in
                var iterator = iterator
                try await outbound.write(
                    AddressedEnvelope(
                        remoteAddress: try SocketAddress(ipAddress: "::1", port: port),
                        data: ByteBuffer(string: "hi")
                    )
                )
                return try await iterator.next().map { String(buffer: $0.data) }
            }
            #expect(reply == "six:hi")
        }
    }
}
