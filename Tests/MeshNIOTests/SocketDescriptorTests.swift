import MeshTestSupport
import NIOCore
import NIOPosix
import Testing

@testable import MeshNIO

#if canImport(Glibc)
import Glibc
#endif

@Suite("MeshNIO: a NIO channel's socket, found and duplicated", .rationed)
struct SocketDescriptorTests {
    @Test("the duplicate is the channel's own connection: it has its addresses and outlives NIO's close")
    func duplicateOutlivesTheChannel() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let accepted = group.next().makePromise(of: (any Channel).self)
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                accepted.succeed(channel)
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .bind(host: "127.0.0.1", port: 0).get()
        // Two connections, so that the match has to tell them apart.
        let other = try await ClientBootstrap(group: group).connect(to: server.localAddress!).get()
        let client = try await ClientBootstrap(group: group).connect(to: server.localAddress!).get()
        let fd = try #require(try await client.eventLoop.submit { SocketDescriptor.duplicate(of: client) }.get())
        defer { close(fd) }
        var peer = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &peer) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &length) }
        }
        #expect(SocketAddress(peer) == client.remoteAddress)
        var local = sockaddr_in()
        _ = withUnsafeMutablePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        #expect(SocketAddress(local) == client.localAddress)
        #expect(SocketAddress(local) != other.localAddress)

        // NIO closes its descriptor; the connection lives on in the duplicate, which still reaches the server's end.
        try await client.close()
        _ = try await accepted.futureResult.get()
        let sent = "after NIO let go".utf8.map { $0 }
        #expect(send(fd, sent, sent.count, Int32(MSG_NOSIGNAL)) == sent.count)
        try await other.close()
        try await server.close()
        #expect(SocketDescriptor.find(local: SocketAddress(local), remote: SocketAddress(peer)) == fd)
    }

    @Test("a closed channel or one without a socket has none")
    func noneForAClosedChannel() async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let server = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        let client = try await ClientBootstrap(group: group).connect(to: server.localAddress!).get()
        let (local, remote) = (client.localAddress!, client.remoteAddress!)
        try await client.close()
        #expect(SocketDescriptor.find(local: local, remote: remote) == nil)
        try await server.close()
    }
}
