import Foundation
import Logging
import MeshIdentity
import MeshTestSupport
import NIOCore
import NIOEmbedded
import NIOSSL
import NIOTLS
import Testing

import class ServiceLifecycle.ServiceGroup

@testable import MeshHTTP

/// A connection's TLS buffers (`ConnectionBuffers`, `IdleBuffers`): their pages leave the resident
/// set while the connection is idle, and no byte is lost or changed across a release.
@Suite(.rationed) struct ConnectionBuffersTests {
    /// A buffer written full of a pattern.
    static func filled(_ allocator: ByteBufferAllocator, _ size: Int) -> ByteBuffer {
        var b = allocator.buffer(capacity: size)
        b.writeBytes((0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) })
        return b
    }

    @Test func largeBlocksAreMappedPageAlignedWithNoHeader() {
        let big = Self.filled(LeanAllocator.allocator, 32 * 1024)
        let small = Self.filled(LeanAllocator.allocator, 100)
        big.withUnsafeReadableBytes { bytes in
            #expect(Int(bitPattern: bytes.baseAddress!) % LeanAllocator.pageSize == 0)
            #expect(LeanAllocator.mappedLength(UnsafeMutableRawPointer(mutating: bytes.baseAddress!)) == 32 * 1024)
        }
        small.withUnsafeReadableBytes { bytes in
            #expect(LeanAllocator.mappedLength(UnsafeMutableRawPointer(mutating: bytes.baseAddress!)) == nil)
        }
    }

    @Test func releaseDropsTheTrackedPagesOnly() {
        let buffers = ConnectionBuffers()
        let allocator = LeanAllocator.allocator
        var tracked = buffers.tracking { Self.filled(allocator, 32 * 1024) }
        let other = Self.filled(allocator, 32 * 1024)  // mapped too, but not while tracking
        _ = buffers.tracking { Self.filled(allocator, 1000) }  // on the heap: never tracked
        #expect(buffers.tracked.blocks == 1)
        #expect(buffers.residentBytes == 32 * 1024)

        #expect(buffers.release() == 32 * 1024)
        #expect(buffers.residentBytes == 0)
        #expect(other == Self.filled(allocator, 32 * 1024))  // the untracked buffer kept its bytes

        // Writing faults a page back in; the rest reads as zeros (read faults map the zero page, which
        // mincore counts, so this comes after the count).
        tracked.clear()
        tracked.writeBytes([1, 2, 3])
        #expect(buffers.residentBytes == LeanAllocator.pageSize)
        #expect(tracked.withVeryUnsafeBytes { $0[3..<32 * 1024].allSatisfy { $0 == 0 } })
        // A reallocation (growth) keeps the block tracked.
        tracked.writeBytes([UInt8](repeating: 9, count: 100_000))
        #expect(buffers.tracked.blocks == 1)
        #expect(buffers.tracked.bytes >= 100_003)
        #expect(tracked.getBytes(at: 0, length: 3) == [1, 2, 3])
        buffers.release()
        #expect(buffers.residentBytes == 0)
    }

    @Test func aFreedBlockIsForgotten() {
        let buffers = ConnectionBuffers()
        do {
            let b = buffers.tracking { Self.filled(LeanAllocator.allocator, 20_000) }
            #expect(buffers.tracked.blocks == 1)
            #expect(b.readableBytes == 20_000)
        }
        #expect(buffers.tracked.blocks == 0)
        #expect(buffers.release() == 0)
    }

    /// A plaintext buffer that NIOSSL would own, and an idle handler in front of a recorder.
    func idleChannel(after: TimeAmount = .seconds(1)) throws -> (EmbeddedChannel, ConnectionBuffers, IdleBuffers) {
        let buffers = ConnectionBuffers()
        let idle = IdleBuffers(buffers: buffers, after: after)
        let channel = EmbeddedChannel(handler: idle)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        channel.pipeline.fireUserInboundEventTriggered(TLSUserEvent.handshakeCompleted(negotiatedProtocol: nil))
        return (channel, buffers, idle)
    }

    @Test func plaintextIsHandedOnAsACopySoTheReadBufferIsFree() throws {
        let (channel, buffers, _) = try self.idleChannel()
        let plaintext = buffers.tracking { Self.filled(LeanAllocator.allocator, 32 * 1024) }
        let request = plaintext.getSlice(at: 0, length: 300)!
        try channel.writeInbound(request)
        let out = try #require(try channel.readInbound(as: ByteBuffer.self))
        #expect(out == request)
        // A storage of its own, of the request's size, not a view into the read buffer.
        let outBase = out.withUnsafeReadableBytes { $0.baseAddress! }
        let inBase = plaintext.withUnsafeReadableBytes { $0.baseAddress! }
        #expect(outBase != inBase)
        #expect(out.capacity < 1024)
        _ = try channel.finish()
    }

    @Test func buffersAreReleasedAfterAQuietPeriodOnly() throws {
        let (channel, buffers, idle) = try self.idleChannel(after: .seconds(1))
        let tls = buffers.tracking { Self.filled(LeanAllocator.allocator, 32 * 1024) }
        #expect(buffers.residentBytes == 32 * 1024)
        // Activity keeps them: a read at 0 s, a write at 1.5 s.
        try channel.writeInbound(ByteBuffer(string: "GET / HTTP/1.1\r\n\r\n"))
        channel.embeddedEventLoop.advanceTime(by: .milliseconds(1500))
        #expect(idle.releases == 0)
        try channel.writeOutbound(ByteBuffer(string: "HTTP/1.1 200 OK\r\n\r\n"))
        channel.embeddedEventLoop.advanceTime(by: .milliseconds(1000))
        #expect(idle.releases == 0)
        #expect(buffers.residentBytes == 32 * 1024)
        // Quiet from 1.5 s on: released within two periods.
        channel.embeddedEventLoop.advanceTime(by: .milliseconds(1000))
        #expect(idle.releases == 1)
        #expect(buffers.residentBytes == 0)
        // Idle after that: no timer, no further release.
        channel.embeddedEventLoop.advanceTime(by: .seconds(10))
        #expect(idle.releases == 1)
        #expect(tls.readableBytes == 32 * 1024)
        _ = try channel.finish()
    }

    @Test func nothingIsReleasedWhileWritesWaitOrBeforeTheHandshake() throws {
        let buffers = ConnectionBuffers()
        let idle = IdleBuffers(buffers: buffers, after: .seconds(1))
        let channel = EmbeddedChannel(handler: idle)
        try channel.connect(to: .init(ipAddress: "127.0.0.1", port: 1)).wait()
        let tls = buffers.tracking { Self.filled(LeanAllocator.allocator, 32 * 1024) }
        // No handshake yet: a read arms the timer, but nothing is released.
        try channel.writeInbound(ByteBuffer(string: "x"))
        channel.embeddedEventLoop.advanceTime(by: .seconds(5))
        #expect(idle.releases == 0)
        channel.pipeline.fireUserInboundEventTriggered(TLSUserEvent.handshakeCompleted(negotiatedProtocol: nil))
        // A write not yet flushed: its bytes may still be in the TLS output buffer.
        channel.write(ByteBuffer(string: "pending"), promise: nil)
        channel.embeddedEventLoop.advanceTime(by: .seconds(5))
        #expect(idle.releases == 0)
        #expect(buffers.residentBytes == 32 * 1024)
        channel.flush()
        channel.embeddedEventLoop.advanceTime(by: .seconds(3))
        #expect(idle.releases == 1)
        #expect(buffers.residentBytes == 0)
        #expect(tls.readableBytes == 32 * 1024)
        _ = try channel.finish()
    }

    /// Over real TLS: requests and answers larger than NIOSSL's buffers, with releases between them,
    /// arrive byte for byte.
    @Test func everyByteSurvivesReleasesOverRealTLS() async throws {
        let ca = try CertificateAuthority.create()
        let context = try meshServerContext(ca, identity: .node("server"))
        let (server, group, task, port) = try await startServer(configure: { config in
            config.tls = HTTPServerTLS(context: context) { _ in nil }
            config.releaseIdleBuffersAfter = .milliseconds(50)
        })
        let client = try meshClientContext(ca, identity: .node("client"))
        let replies = try await blocking { () -> [String] in
            let s = try TLSRawSocket(port: port, timeout: 10, tls: client)
            var replies: [String] = []
            for size in [100_000, 40_000, 5] {
                let body = String((0..<size).map { i in Character(UnicodeScalar(UInt8(97 + i % 26))) })
                let before = server.idleBufferReleases
                s.send("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: \(size)\r\n\r\n" + body)
                let reply = s.readFirstResponse()
                replies.append(
                    reply.hasSuffix("\r\n\r\n" + body) ? "ok \(size)" : "wrong \(size): \(reply.prefix(200))"
                )
                // Wait (bounded) for this connection's release before the next request.
                let deadline = ContinuousClock.now + .seconds(10)
                while server.idleBufferReleases == before, ContinuousClock.now < deadline {
                    Thread.sleep(forTimeInterval: 0.01)
                }
            }
            return replies
        }
        #expect(replies == ["ok 100000", "ok 40000", "ok 5"])
        #expect(server.idleBufferReleases >= 3)
        await group.triggerGracefulShutdown()
        try await task.value
    }
}
