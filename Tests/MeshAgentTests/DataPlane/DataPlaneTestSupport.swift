import Logging
import MeshCore
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Testing

@testable import MeshAgent

#if canImport(Glibc)
import Glibc
#endif

// Shared fixtures of the data-plane tests: backends the tests start (TCP echo and friends, a tiny HTTP
// server, UDP echo), clients, unique VIPs inside 127.0.0.0/8, and a harness that checks no channel leaks.

let testGroup = MultiThreadedEventLoopGroup.singleton

struct TestTimeout: Error, CustomStringConvertible {
    var what: String
    var description: String { "timed out: \(self.what)" }
}

/// Runs `body`, failing with `TestTimeout` after `seconds`.
func withTimeout<T: Sendable>(
    _ seconds: Double,
    _ what: String = "operation",
    _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
            throw TestTimeout(what: what)
        }
        let result = try await group.next()!
        group.cancelAll()
        return result
    }
}

/// Polls `condition` every 5 ms until it holds or `seconds` pass; returns whether it held.
func eventually(_ seconds: Double = 10, _ condition: () async -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if await condition() { return true }
        if Task.isCancelled { break }  // no spinning on a cooperative thread once the test is cancelled
        try? await Task.sleep(for: .milliseconds(5))
    }
    return await condition()
}

enum TestAddresses {
    private static let counter = Atomic<UInt32>(0)
    private static let base: UInt32 = UInt32(getpid() % 50) * 0x1_0000

    /// A VIP inside 127.0.0.0/8 that no other test of this process uses (127.150-199.x.y).
    static func vip() -> IPAddress {
        let n = Self.counter.add(1, ordering: .relaxed).newValue
        return .v4(0x7F96_0000 + Self.base + (n & 0xFFFF))
    }

    /// A TCP port on ::1 that nothing listens on right now.
    static func freeIPv6Port() throws -> Int {
        let probe = try ServerBootstrap(group: testGroup).bind(host: "::1", port: 0).wait()
        let port = probe.localAddress!.port!
        try probe.close().wait()
        return port
    }

    /// Applies `table(port)` on a free port of ::1, and again on another one when that port was taken in
    /// between: ::1 is shared by every test running at once, and a probed port is free only when probed (a CI
    /// run once lost one to another test's connection). Returns the port served.
    static func applyOnFreeIPv6Port(_ dp: DataPlane, _ table: (Int) -> RouteTable) async throws -> Int {
        var attempt = 0
        while true {
            attempt += 1
            let port = try freeIPv6Port()
            do {
                try await dp.apply(table(port))
                return port
            } catch let error as DataPlaneError where attempt < 8 && "\(error)".contains("Address already in use") {
                continue
            }
        }
    }
}

let testLogger: Logger = {
    var logger = Logger(label: "test.dataplane")
    logger.logLevel = .warning
    return logger
}()

/// Test configuration: short timers so ejection, idle and expiry run in well under a second.
func testConfiguration(
    connectTimeout: TimeAmount = .seconds(5),  // a loaded machine must not turn a loopback connect into a 504
    tcpIdleTimeout: TimeAmount = .seconds(30),
    outlier: OutlierConfiguration = .init(
        consecutiveFailures: 3,
        baseEjectionTime: .milliseconds(400),
        maxEjectionTime: .seconds(2),
        maxEjectionPercent: 10
    ),
    udp: UDPConfiguration = .init(flowIdleTimeout: .seconds(5), maxFlowsPerListener: 64),
    http: HTTPConfiguration = .init(),
    drainTimeout: TimeAmount = .milliseconds(200)
) -> DataPlaneConfiguration {
    var http = http
    http.engine = TestEngine.current
    return DataPlaneConfiguration(
        bindMode: .loopback,
        connectTimeout: connectTimeout,
        connectAttempts: 3,
        tcpIdleTimeout: tcpIdleTimeout,
        udp: udp,
        http: http,
        outlier: outlier,
        drainTimeout: drainTimeout
    )
}

/// The HTTP engine the tests of an HTTP suite run on (they run once per engine: `arguments: HTTPEngine.allCases`,
/// body in `TestEngine.$current.withValue(engine)`); `testConfiguration()` sets it.
enum TestEngine {
    @TaskLocal static var current: HTTPEngine = HTTPConfiguration().engine
}

/// Runs `body` against a fresh data plane, then shuts it down and checks that no channel is left open.
func withDataPlane<T: Sendable>(
    _ configuration: DataPlaneConfiguration = testConfiguration(),
    _ body: (DataPlane) async throws -> T
) async throws -> T {
    let dataPlane = DataPlane(configuration: configuration, eventLoopGroup: testGroup, logger: testLogger)
    let result: T
    do {
        result = try await body(dataPlane)
    } catch {
        await dataPlane.shutdown(drain: false)
        throw error
    }
    await dataPlane.shutdown(drain: false)
    let leaked = dataPlane.openChannels
    #expect(leaked == 0, "channels left open after shutdown")
    return result
}

func service(_ name: String) -> ServiceKey { ServiceKey(namespace: "test", name: name) }

// MARK: backends

/// A backend the test started.
struct TestServer: Sendable {
    let channel: any Channel
    let name: String

    var port: Int { self.channel.localAddress!.port! }
    var ip: IPAddress { IPAddress(socketAddress: self.channel.localAddress!)! }

    func backend(weight: Int = 1, site: String? = nil, ready: Bool = true) -> Backend {
        Backend(ip: self.ip, port: self.port, node: self.name, site: site, weight: weight, ready: ready)
    }

    func close() async {
        try? await self.channel.close()
    }
}

enum TestServers {
    /// A TCP server whose connections each get the handler `make` builds.
    static func tcp(
        host: String = "127.0.0.1",
        name: String = "tcp",
        _ make: @escaping @Sendable () -> any ChannelHandler
    ) async throws -> TestServer {
        let channel = try await ServerBootstrap(group: testGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(make())
                }
            }
            .bind(host: host, port: 0)
            .get()
        return TestServer(channel: channel, name: name)
    }

    static func echo(host: String = "127.0.0.1", name: String = "echo") async throws -> TestServer {
        try await Self.tcp(host: host, name: name) { EchoHandler() }
    }

    /// Writes its name on connect, then closes.
    static func greeter(_ name: String, host: String = "127.0.0.1") async throws -> TestServer {
        try await Self.tcp(host: host, name: name) { GreeterHandler(name: name) }
    }

    /// A port on `host` where nothing listens (connections are refused) for the rest of the test run: a
    /// socket stays bound to it without listening, so no other test's server can take the port (a port merely
    /// released can be, and then a connection there was accepted instead of refused).
    static func refusedBackend(host: String = "127.0.0.1") async throws -> Backend {
        let ip = try #require(IPAddress(host))
        let family: Int32 = ip.isIPv4 ? AF_INET : AF_INET6
        let fd = socket(family, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        try #require(fd >= 0)
        let address = try SocketAddress(ipAddress: host, port: 0)
        try #require(SpliceSocket.withSockAddr(address) { Glibc.bind(fd, $0, $1) } == 0, "bind: errno \(errno)")
        var bound = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &bound) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        let port = withUnsafeBytes(of: &bound) { raw in
            // sin_port and sin6_port sit at the same offset, in network order.
            Int(UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self)))
        }
        // The descriptor is kept open on purpose until the test process ends.
        return Backend(ip: ip, port: port, node: "refused")
    }

    /// UDP echo.
    static func udpEcho(host: String = "127.0.0.1", name: String = "udp") async throws -> TestServer {
        let channel = try await DatagramBootstrap(group: testGroup)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(UDPEchoHandler(name: name))
                }
            }
            .bind(host: host, port: 0)
            .get()
        return TestServer(channel: channel, name: name)
    }
}

final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        context.write(data, promise: nil)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.flush()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            context.close(mode: .output, promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

final class GreeterHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let name: String

    init(name: String) { self.name = name }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer(string: self.name))).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Reads until the client half-closes, then answers with `size` bytes and closes.
final class ReplyOnEOFHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let size: Int
    private var received = 0

    init(size: Int) { self.size = size }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.received += self.unwrapInboundIn(data).readableBytes
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let event = event as? ChannelEvent, event == .inputClosed else { return }
        var header = ByteBuffer()
        header.writeString("got \(self.received)\n")
        context.write(self.wrapOutboundOut(header), promise: nil)
        var remaining = self.size
        let chunk = ByteBuffer(repeating: UInt8(ascii: "r"), count: 64 * 1024)
        while remaining > 0 {
            context.write(
                self.wrapOutboundOut(chunk.getSlice(at: 0, length: min(remaining, chunk.readableBytes))!),
                promise: nil
            )
            remaining -= min(remaining, chunk.readableBytes)
        }
        context.writeAndFlush(self.wrapOutboundOut(ByteBuffer())).assumeIsolated().whenComplete { _ in
            context.close(promise: nil)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// Sends `size` bytes as fast as the connection takes them (only while writable), then closes.
final class BulkSendHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let size: Int
    private var sent = 0
    private var pumping = false
    private let chunk = ByteBuffer(repeating: UInt8(ascii: "b"), count: 64 * 1024)

    init(size: Int) { self.size = size }

    func channelActive(context: ChannelHandlerContext) {
        self.pump(context: context)
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        self.pump(context: context)
    }

    private func pump(context: ChannelHandlerContext) {
        // A flush can drain the socket and fire a writability change right here: no re-entry.
        guard !self.pumping, self.sent < self.size else { return }
        self.pumping = true
        defer { self.pumping = false }
        while context.channel.isWritable && self.sent < self.size {
            let n = min(self.chunk.readableBytes, self.size - self.sent)
            self.sent += n
            context.write(self.wrapOutboundOut(self.chunk.getSlice(at: 0, length: n)!), promise: nil)
            if self.sent == self.size {
                context.writeAndFlush(self.wrapOutboundOut(ByteBuffer())).assumeIsolated().whenComplete { _ in
                    context.close(promise: nil)
                }
                return
            }
        }
        context.flush()
        if context.channel.isWritable && self.sent < self.size {
            context.eventLoop.assumeIsolated().execute { self.pump(context: context) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

final class UDPEchoHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    typealias OutboundOut = AddressedEnvelope<ByteBuffer>
    let name: String

    init(name: String) { self.name = name }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var envelope = self.unwrapInboundIn(data)
        var reply = ByteBuffer(string: "\(self.name):")
        reply.writeBuffer(&envelope.data)
        context.writeAndFlush(
            self.wrapOutboundOut(AddressedEnvelope(remoteAddress: envelope.remoteAddress, data: reply)),
            promise: nil
        )
    }
}

// MARK: clients

enum TestClient {
    /// Connects to `address`, sends `send`, half-closes when asked, and reads until the server closes (or
    /// `maxBytes` arrived). Returns what it read.
    static func exchange(
        _ address: SocketAddress,
        send: String? = nil,
        halfClose: Bool = false,
        maxBytes: Int = .max,
        timeout: Double = 30
    ) async throws -> ByteBuffer {
        try await withTimeout(timeout, "exchange with \(address)") {
            let channel = try await ClientBootstrap(group: testGroup)
                .channelOption(.allowRemoteHalfClosure, value: true)
                .connect(to: address) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try NIOAsyncChannel<ByteBuffer, ByteBuffer>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(isOutboundHalfClosureEnabled: true)
                        )
                    }
                }
            return try await channel.executeThenClose { inbound, outbound in
                if let send { try await outbound.write(ByteBuffer(string: send)) }
                if halfClose { outbound.finish() }
                var received = ByteBuffer()
                for try await var chunk in inbound {
                    received.writeBuffer(&chunk)
                    if received.readableBytes >= maxBytes { break }
                }
                return received
            }
        }
    }

    static func vipAddress(_ vip: IPAddress, _ port: Int) -> SocketAddress {
        try! SocketAddress(ipAddress: vip.description, port: port)
    }
}

/// A keep-alive HTTP/1.1 client connection for tests.
final class TestHTTPConnection {
    struct Response: Sendable {
        var head: HTTPResponseHead
        var body: String
        var bodyBytes: Int
        var status: Int { Int(self.head.status.code) }
        func header(_ name: String) -> String? { self.head.headers.first(name: name) }
    }

    private var iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
    private let outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>

    private init(
        iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator,
        outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
    ) {
        self.iterator = iterator
        self.outbound = outbound
    }

    static func with<T: Sendable>(
        _ address: SocketAddress,
        _ body: (TestHTTPConnection) async throws -> T
    ) async throws -> T {
        let channel = try await ClientBootstrap(group: testGroup)
            .connect(to: address) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    return try NIOAsyncChannel<HTTPClientResponsePart, HTTPClientRequestPart>(
                        wrappingChannelSynchronously: channel
                    )
                }
            }
        return try await channel.executeThenClose { inbound, outbound in
            let connection = TestHTTPConnection(iterator: inbound.makeAsyncIterator(), outbound: outbound)
            return try await body(connection)
        }
    }

    /// One request; nil when the connection closed before a full response.
    func request(
        _ method: HTTPMethod = .GET,
        _ uri: String,
        headers: [(String, String)] = [],
        body: String? = nil,
        countBodyOnly: Bool = false
    ) async throws -> Response? {
        var h = HTTPHeaders(headers)
        if h["host"].isEmpty { h.add(name: "host", value: "test") }
        if let body { h.replaceOrAdd(name: "content-length", value: "\(body.utf8.count)") }
        try await self.outbound.write(.head(HTTPRequestHead(version: .http1_1, method: method, uri: uri, headers: h)))
        if let body { try await self.outbound.write(.body(.byteBuffer(ByteBuffer(string: body)))) }
        try await self.outbound.write(.end(nil))
        var head: HTTPResponseHead?
        var collected = ByteBuffer()
        var count = 0
        while let part = try await self.iterator.next() {
            switch part {
            case .head(let h):
                head = h
            case .body(var b):
                count += b.readableBytes
                if !countBodyOnly { collected.writeBuffer(&b) }
            case .end:
                guard let head else { return nil }
                return Response(head: head, body: String(buffer: collected), bodyBytes: count)
            }
        }
        return nil
    }

    /// A single request on a fresh connection.
    static func get(
        _ address: SocketAddress,
        _ uri: String,
        headers: [(String, String)] = [],
        timeout: Double = 30
    ) async throws -> Response? {
        try await withTimeout(timeout, "GET \(uri)") {
            try await Self.with(address) { try await $0.request(.GET, uri, headers: headers) }
        }
    }
}
