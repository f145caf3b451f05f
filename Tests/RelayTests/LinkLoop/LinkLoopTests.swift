import Logging
import MeshIdentity
import MeshRecords
import MeshTestSupport
import MeshWire
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import Relay

#if canImport(Glibc)
import Glibc
#endif

/// Both directions' record secrets of a test link (any 32-byte exporter secret will do: both ends share it).
private let testSecrets = LinkRecordSecrets(exporterSecret: [UInt8](repeating: 0x5A, count: 32))!

/// A connected pair of non-blocking stream sockets.
private func socketPair() throws -> (Int32, Int32) {
    var fds: [Int32] = [-1, -1]
    guard
        socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0, &fds) == 0
    else { throw IOError(errnoCode: errno, reason: "socketpair") }
    return (fds[0], fds[1])
}

/// Values recorded from callbacks on other threads.
private final class Recorded<T: Sendable>: Sendable {
    private let values = Mutex<[T]>([])
    func add(_ value: T) { self.values.withLock { $0.append(value) } }
    var all: [T] { self.values.withLock { $0 } }
}

/// A loop per side and a session on each over a socket pair: `a` dialed (odd stream ids), `b` accepted.
private struct LoopPair {
    let loopA: LinkLoop
    let loopB: LinkLoop
    let a: LinkLoopSession
    let b: LinkLoopSession
    let closedA = Recorded<MuxError?>()
    let closedB = Recorded<MuxError?>()
    let refusedB = Recorded<StreamRefusal>()

    init(check: @escaping LinkTargetCheck = { _, _ in nil }) throws {
        let (x, y) = try socketPair()
        self.loopA = try LinkLoop.start(name: "test-link-a")
        self.loopB = try LinkLoop.start(name: "test-link-b")
        let (closedA, closedB, refusedB) = (self.closedA, self.closedB, self.refusedB)
        self.a = LinkLoopSession.adopt(
            socket: x,
            on: self.loopA,
            peer: "b",
            dialer: true,
            secrets: testSecrets,
            check: nil,
            closed: { closedA.add($0) }
        )
        self.b = LinkLoopSession.adopt(
            socket: y,
            on: self.loopB,
            peer: "a",
            dialer: false,
            secrets: testSecrets,
            check: check,
            refused: { refusedB.add($0) },
            closed: { closedB.add($0) }
        )
    }

    func stop() async {
        self.loopA.stop()
        self.loopB.stop()
        _ = await eventually { self.loopA.hasStopped && self.loopB.hasStopped }
    }
}

/// Writes `payload` to `fd` and shuts its write side while reading until EOF, on threads of their own:
/// what came back. `fd` is blocking here.
private func exchange(_ fd: Int32, _ payload: [UInt8]) async throws -> [UInt8] {
    let flags = fcntl(fd, F_GETFL)
    _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK)
    async let wrote: Void = blocking {
        payload.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = write(fd, raw.baseAddress! + off, raw.count - off)
                if n <= 0 { break }
                off += n
            }
        }
        shutdown(fd, Int32(SHUT_WR))
    }
    let back = try await blocking { () -> [UInt8] in
        var got: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n <= 0 { break }
            got += chunk[0..<n]
        }
        return got
    }
    try await wrote
    return back
}

private func randomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SplitMix(seed: seed)
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
}

/// The NIO end of a link (the one ``Link`` builds today): the record handler and the mux session on a channel
/// over `fd`; streams the peer opens are answered by `StreamOpenReceiver` with `check`.
private func nioEnd(
    _ fd: Int32,
    dialer: Bool,
    check: @escaping LinkTargetCheck
) async throws -> MuxSession {
    let installed = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: MuxSession.self)
    _ = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                let sealed = SealedRecordHandler(secrets: testSecrets, dialer: dialer)
                try channel.pipeline.syncOperations.addHandler(sealed)
                let session = try MuxSession.install(
                    on: channel,
                    configuration: MuxConfiguration(role: dialer ? .client : .server)
                ) { stream in
                    stream.eventLoop.makeCompletedFuture {
                        try stream.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                        try stream.pipeline.syncOperations.addHandler(
                            StreamOpenReceiver(
                                peer: "loop",
                                check: check,
                                connectTimeout: .seconds(5),
                                logger: Logger(label: "test"),
                                onRefused: { _ in }
                            )
                        )
                    }
                }
                sealed.start(context: try channel.pipeline.syncOperations.context(handler: sealed))
                installed.succeed(session)
            }
        }
        .withConnectedSocket(fd).get()
    return try await installed.futureResult.get()
}

/// Writes its payload and shuts its output, then collects what comes back until the socket's input ends (EOF,
/// or the channel closing once both directions are shut, as NIO does on a Unix socket).
private final class EchoCollector: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let payload: ByteBuffer
    let done: EventLoopPromise<ByteBuffer>
    private var got = ByteBuffer()

    init(payload: ByteBuffer, done: EventLoopPromise<ByteBuffer>) {
        self.payload = payload
        self.done = done
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(self.wrapOutboundOut(self.payload), promise: nil)
        context.close(mode: .output, promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = self.unwrapInboundIn(data)
        self.got.writeBuffer(&bytes)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event as? ChannelEvent == .inputClosed { self.done.succeed(self.got) }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let error = error as? ChannelError, error == .eof { return }
        self.done.fail(error)
    }

    func channelInactive(context: ChannelHandlerContext) { self.done.succeed(self.got) }
}

@Suite("LinkLoopTests", .serialized, .rationed)
struct LinkLoopTests {
    @Test("a socket spliced to a stream reaches the peer's endpoint: 300 KB echoed intact, FIN both ways")
    func echoThroughLoops() async throws {
        let backend = try await startEchoBackend()
        let pair = try LoopPair()
        let (app, mine) = try socketPair()
        let tally = Mutex<(Int, Int)?>(nil)
        try await pair.a.open(socket: mine, target: webTarget(port: backend.localAddress!.port!)) { from, to in
            tally.withLock { $0 = (from, to) }
        }
        let payload = randomBytes(300_000, seed: 1)
        let back = try await exchange(app, payload)
        close(app)
        #expect(back == payload)
        #expect(await eventually { tally.withLock { $0 } != nil })
        let counted = tally.withLock { $0 }
        #expect(counted?.0 == payload.count && counted?.1 == payload.count)
        #expect(await eventually { await pair.a.stats().0.openStreams == 0 })
        #expect(await eventually { await pair.b.stats().0.openStreams == 0 })
        let (stats, records) = await pair.a.stats()
        #expect(stats.streamsOpened == 1 && stats.dataBytesSent >= UInt64(payload.count))
        #expect(records > 0)
        await pair.stop()
        try await backend.close()
    }

    @Test("300 concurrent streams of random sizes through the loops arrive intact")
    func concurrentStreams() async throws {
        let backend = try await startEchoBackend()
        let pair = try LoopPair()
        let port = backend.localAddress!.port!
        var rng = SplitMix(seed: 42)
        let group = MultiThreadedEventLoopGroup.singleton
        var results: [(ByteBuffer, EventLoopFuture<ByteBuffer>)] = []
        for i in 0..<300 {
            let size = Int.random(in: 0...70_000, using: &rng)
            let payload = ByteBuffer(bytes: randomBytes(size, seed: UInt64(i + 100)))
            let (app, mine) = try socketPair()
            try await pair.a.open(socket: mine, target: webTarget(port: port))
            let done = group.next().makePromise(of: ByteBuffer.self)
            _ = try await ClientBootstrap(group: group)
                .channelOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(EchoCollector(payload: payload, done: done))
                    }
                }
                .withConnectedSocket(app).get()
            results.append((payload, done.futureResult))
        }
        var intact = 0
        for (i, (payload, future)) in results.enumerated() {
            do {
                let got = try await future.get()
                if got == payload {
                    intact += 1
                } else {
                    print("stream \(i): \(got.readableBytes) of \(payload.readableBytes) bytes")
                }
            } catch {
                print("stream \(i) (\(payload.readableBytes) bytes): \(error)")
            }
        }
        #expect(intact == 300)
        #expect(await eventually { await pair.b.stats().0.openStreams == 0 })
        await pair.stop()
        try await backend.close()
    }

    @Test("a refused stream fails the open with the reason and leaves the socket with the caller")
    func refusal() async throws {
        let pair = try LoopPair { target, _ in
            StreamRefusal(.notLocalEndpoint, "\(target.endpoint) is not served here")
        }
        let (app, mine) = try socketPair()
        await #expect(throws: LinkError.refused(StreamRefusal(.notLocalEndpoint, "127.0.0.1 is not served here"))) {
            try await pair.a.open(socket: mine, target: webTarget(port: 9))
        }
        // Still open and ours: it carries bytes.
        var byte: UInt8 = 7
        #expect(write(mine, &byte, 1) == 1)
        #expect(read(app, &byte, 1) == 1)
        #expect(pair.refusedB.all.map(\.code) == [.notLocalEndpoint])
        close(mine)
        close(app)
        await pair.stop()
    }

    @Test("an endpoint that does not answer is refused as a failed dial")
    func dialFailure() async throws {
        // A port nobody listens on: bound, not listening.
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(probe, $0, length) }
        }
        _ = withUnsafeMutablePointer(to: &sin) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(probe, $0, &length) }
        }
        let port = Int(UInt16(bigEndian: sin.sin_port))
        let pair = try LoopPair()
        let (app, mine) = try socketPair()
        do {
            try await pair.a.open(socket: mine, target: webTarget(port: port))
            Issue.record("a stream to a closed port was accepted")
        } catch LinkError.refused(let refusal) {
            #expect(refusal.code == .dialFailed)
        }
        close(probe)
        close(mine)
        close(app)
        await pair.stop()
    }

    @Test("a ping measures the round trip")
    func ping() async throws {
        let pair = try LoopPair()
        let rtt = try await pair.a.ping()
        #expect(rtt > .zero)
        #expect(await pair.a.stats().0.lastRTT == rtt)
        await pair.stop()
    }

    @Test("when the link goes, its streams' sockets are reset, not left hanging")
    func linkLossResetsStreams() async throws {
        let backend = try await startEchoBackend()
        let pair = try LoopPair()
        let (app, mine) = try socketPair()
        try await pair.a.open(socket: mine, target: webTarget(port: backend.localAddress!.port!))
        pair.b.close()
        #expect(await eventually { pair.closedA.all.count == 1 })
        let flags = fcntl(app, F_GETFL)
        _ = fcntl(app, F_SETFL, flags & ~O_NONBLOCK)
        let n = try await blocking { () -> Int in
            var byte: UInt8 = 0
            return read(app, &byte, 1)
        }
        #expect(n <= 0)
        close(app)
        await pair.stop()
        try await backend.close()
    }

    @Test("garbage on the link ends the session, and a loop survives it")
    func garbage() async throws {
        let loop = try LinkLoop.start(name: "test-link-garbage")
        let (x, y) = try socketPair()
        let closed = Mutex<Int>(0)
        _ = LinkLoopSession.adopt(
            socket: x,
            on: loop,
            peer: "junk",
            dialer: false,
            secrets: testSecrets,
            check: { _, _ in nil },
            closed: { _ in closed.withLock { $0 += 1 } }
        )
        let junk = [UInt8](repeating: 0x17, count: 40) + [0x03, 0x03, 0x00, 0x20] + [UInt8](repeating: 1, count: 32)
        _ = junk.withUnsafeBytes { send(y, $0.baseAddress!, $0.count, 0) }
        #expect(await eventually { closed.withLock { $0 } == 1 })
        #expect(loop.sessionCount.load(ordering: .relaxed) == 0)
        close(y)
        loop.stop()
    }

    @Test("the loop's end of a link speaks to the NIO end: streams both ways")
    func interoperatesWithNIO() async throws {
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        let (x, y) = try socketPair()
        let loop = try LinkLoop.start(name: "test-link-nio")
        let session = LinkLoopSession.adopt(
            socket: x,
            on: loop,
            peer: "nio",
            dialer: true,
            secrets: testSecrets,
            check: { _, _ in nil }
        )
        let nio = try await nioEnd(y, dialer: false) { _, _ in nil }
        // Loop -> NIO.
        let (app, mine) = try socketPair()
        try await session.open(socket: mine, target: webTarget(port: port))
        let payload = randomBytes(200_000, seed: 9)
        #expect(try await exchange(app, payload) == payload)
        close(app)
        // NIO -> loop.
        let done = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: ByteBuffer.self)
        let reply = done.futureResult.eventLoop.makePromise(of: Void.self)
        let back = ByteBuffer(bytes: randomBytes(150_000, seed: 10))
        _ = try await nio.openStream { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                try stream.pipeline.syncOperations.addHandler(
                    StreamOpenSender(target: webTarget(port: port), reply: reply)
                )
                try stream.pipeline.syncOperations.addHandler(SendAndCollect(payload: back, done: done))
            }
        }.get()
        try await reply.futureResult.get()
        #expect(try await done.futureResult.get() == back)
        // A ping answered by the other implementation.
        #expect(try await session.ping() > .zero)
        #expect(try await nio.ping().get() > .zero)
        loop.stop()
        try? await nio.channel.close()
        try await backend.close()
    }
}

@Suite("Links on a LinkLoop (LinkConfiguration.loop)", .serialized, .rationed)
struct LinksOnLoopTests {
    @Test("a link whose ends both take the loop: handshake on NIO, then splices, NIO streams and stats on the loop")
    func linkOnLoop() async throws {
        let ca = try CertificateAuthority.create()
        let book = AddressBook()
        let backend = try await startEchoBackend()
        let port = backend.localAddress!.port!
        var configuration = LinkConfiguration()
        configuration.loop = try LinkLoop.start(name: "test-links-a")
        let a = try await LinkNode.make("a", ca: ca, book: book, configuration: configuration)
        configuration.loop = try LinkLoop.start(name: "test-links-b")
        let b = try await LinkNode.make("b", ca: ca, book: book, configuration: configuration)
        // A handed-over socket, as the data plane's TCP path gives one.
        let (app, mine) = try socketPair()
        try await a.manager.splice(socket: mine, to: "b", open: webTarget(port: port))
        let link = try #require(a.manager.currentLink(to: "b"))
        #expect(link.loop != nil && link.session == nil && link.records == "mesh")
        let payload = randomBytes(250_000, seed: 3)
        #expect(try await exchange(app, payload) == payload)
        close(app)
        // A NIO stream over the same link (the HTTP pool's and UDP flows' way), through a socket pair.
        let echoed = ByteBuffer(bytes: randomBytes(80_000, seed: 4))
        let done = MultiThreadedEventLoopGroup.singleton.next().makePromise(of: ByteBuffer.self)
        _ = try await a.manager.stream(to: "b", open: webTarget(port: port)) { stream in
            stream.eventLoop.makeCompletedFuture {
                try stream.pipeline.syncOperations.addHandler(EchoCollector(payload: echoed, done: done))
            }
        }
        #expect(try await done.futureResult.get() == echoed)
        #expect(try await link.ping().get() > .zero)
        let row = try #require(await a.manager.stats().first)
        #expect(row.node == "b" && row.records == "mesh" && row.dataPath == "loop")
        #expect(row.bytesSent >= 330_000 && row.bytesReceived >= 330_000)
        #expect(await eventually { link.openStreams == 0 })
        // A refusal from the loop's side is counted at both ends.
        await #expect(throws: LinkError.self) {
            _ = try await a.manager.stream(to: "b", open: webTarget(port: 1))
        }
        #expect(await eventually { b.manager.refusedSent[StreamRefusal.Code.dialFailed.rawValue] == 1 })
        #expect(a.manager.refusedReceived[StreamRefusal.Code.dialFailed.rawValue] == 1)
        // The peer going away ends the link at both ends.
        await b.stop()
        #expect(await eventually { !link.isActive })
        await a.stop()
        try await backend.close()
    }
}
