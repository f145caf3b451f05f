import MeshTestSupport
import MeshWire
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

@testable import Relay

/// A client session and a server session over a real TCP connection on 127.0.0.1.
struct MuxPair {
    let listener: any Channel
    let client: MuxSession
    let server: MuxSession

    static func make(
        serverInbound: MuxStreamInitializer?,
        clientInbound: MuxStreamInitializer? = nil
    ) async throws -> MuxPair {
        let group = MultiThreadedEventLoopGroup.singleton
        let accepted = group.next().makePromise(of: MuxSession.self)
        let listener = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let s = try MuxSession.install(
                        on: channel,
                        configuration: MuxConfiguration(role: .server),
                        inbound: serverInbound
                    )
                    accepted.succeed(s)
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        let connected = group.next().makePromise(of: MuxSession.self)
        _ = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let s = try MuxSession.install(
                        on: channel,
                        configuration: MuxConfiguration(role: .client),
                        inbound: clientInbound
                    )
                    connected.succeed(s)
                }
            }
            .connect(to: listener.localAddress!).get()
        return MuxPair(
            listener: listener,
            client: try await connected.futureResult.get(),
            server: try await accepted.futureResult.get()
        )
    }

    func close() async {
        try? await self.client.channel.close()
        try? await self.server.channel.closeFuture.get()
        try? await self.listener.close()
    }
}

/// Echoes a stream's bytes, and its FIN.
final class EchoHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) { context.write(data, promise: nil) }
    func channelReadComplete(context: ChannelHandlerContext) { context.flush() }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event as? ChannelEvent == .inputClosed { context.close(mode: .output, promise: nil) }
    }
}

let echo: MuxStreamInitializer = { channel in
    channel.eventLoop.makeCompletedFuture {
        try channel.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
        try channel.pipeline.syncOperations.addHandler(EchoHandler())
    }
}

/// Writes `payload` and FIN, collects what comes back until the peer's FIN.
final class SendAndCollect: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let payload: ByteBuffer
    let done: EventLoopPromise<ByteBuffer>
    let written: EventLoopPromise<Void>?
    private var got = ByteBuffer()
    private var finished = false

    init(payload: ByteBuffer, done: EventLoopPromise<ByteBuffer>, written: EventLoopPromise<Void>? = nil) {
        self.payload = payload
        self.done = done
        self.written = written
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(self.wrapOutboundOut(self.payload), promise: self.written)
        context.close(mode: .output, promise: nil)
        context.fireChannelActive()
    }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = self.unwrapInboundIn(data)
        self.got.writeBuffer(&b)
    }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event as? ChannelEvent == .inputClosed { self.finish(.success(self.got)) }
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { self.finish(.failure(error)) }
    func channelInactive(context: ChannelHandlerContext) { self.finish(.failure(ChannelError.eof)) }

    private func finish(_ r: Result<ByteBuffer, any Error>) {
        guard !self.finished else { return }
        self.finished = true
        self.done.completeWith(r)
    }
}

/// Counts a stream's bytes until the peer's FIN, then ends its own side.
final class CountingHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let done: EventLoopPromise<Int>
    private var count = 0
    init(_ done: EventLoopPromise<Int>) { self.done = done }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.count += self.unwrapInboundIn(data).readableBytes
    }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event as? ChannelEvent == .inputClosed {
            self.done.succeed(self.count)
            context.close(mode: .output, promise: nil)
        }
    }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { self.done.fail(error) }
}

@Suite("mux over loopback sockets", .timeLimit(.minutes(3)), .rationed) struct MuxLoopbackTests {
    @Test("1,000 concurrent streams of random sizes (seeded) echo back intact")
    func thousandStreams() async throws {
        let pair = try await MuxPair.make(serverInbound: echo)
        var rng = SplitMix(seed: 0x6D75_7800)
        // 2 MiB of random bytes; stream i sends a slice of it at its own offset, so a byte that crossed
        // streams or moved within one shows.
        let pool = ByteBuffer(bytes: (0..<(2 << 20) / 8).flatMap { _ in withUnsafeBytes(of: rng.next()) { Array($0) } })
        var sent: [ByteBuffer] = []
        var results: [EventLoopFuture<ByteBuffer>] = []
        for i in 0..<1000 {
            // Mostly small, every 25th up to 512 KiB (two windows): 20,133,202 bytes (19.2 MiB) each way.
            let size = i % 25 == 0 ? 65_536 + Int(rng.next() % 458_752) : Int(rng.next() % 16_384)
            let offset = Int(rng.next() % UInt64(pool.readableBytes - size))
            let payload = pool.getSlice(at: offset, length: size)!
            sent.append(payload)
            let done = pair.client.channel.eventLoop.makePromise(of: ByteBuffer.self)
            results.append(done.futureResult)
            _ = pair.client.openStream { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                    try channel.pipeline.syncOperations.addHandler(SendAndCollect(payload: payload, done: done))
                }
            }
        }
        var mismatched: [Int] = []
        for (i, f) in results.enumerated() {
            let got = try await f.get()
            if got != sent[i] { mismatched.append(i) }
        }
        #expect(mismatched.isEmpty, "streams whose echo differs: \(mismatched.prefix(10))")
        let stats = try await pair.client.stats().get()
        let total = sent.reduce(0) { $0 + $1.readableBytes }
        #expect(stats.streamsOpened == 1000)
        #expect(stats.dataBytesSent == UInt64(total) && stats.dataBytesReceived == UInt64(total))
        #expect(stats.protocolErrors.isEmpty)
        let server = try await pair.server.stats().get()
        #expect(server.streamsAccepted == 1000 && server.openStreams == 0)
        await pair.close()
    }

    @Test("a reader that does not read stalls only its own stream; the others complete")
    func slowReaderStallsOnlyItsStream() async throws {
        // What the server read on each stream (ids 1, 3...41), and the slow stream once accepted.
        let loop = MultiThreadedEventLoopGroup.singleton.next()
        var promises: [UInt32: EventLoopPromise<Int>] = [:]
        for id in stride(from: UInt32(1), through: 41, by: 2) { promises[id] = loop.makePromise() }
        let counts = promises
        let slow = loop.makePromise(of: (any Channel).self)
        let pair = try await MuxPair.make(serverInbound: { channel in
            let id = (channel as! MuxStreamChannel).streamID
            let done = counts[id]!
            return channel.eventLoop.makeCompletedFuture {
                try channel.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                if id == 1 {
                    try channel.syncOptions!.setOption(ChannelOptions.autoRead, value: false)
                    slow.succeed(channel)
                }
                try channel.pipeline.syncOperations.addHandler(CountingHandler(done))
            }
        })
        let size = 1 << 20
        let data = payload(size)
        var written: [EventLoopFuture<Void>] = []
        var clientStreams: [any Channel] = []
        for _ in 0..<21 {
            let w = pair.client.channel.eventLoop.makePromise(of: Void.self)
            written.append(w.futureResult)
            let done = pair.client.channel.eventLoop.makePromise(of: ByteBuffer.self)
            let s = try await pair.client.openStream { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                    try channel.pipeline.syncOperations.addHandler(
                        SendAndCollect(payload: data, done: done, written: w)
                    )
                }
            }.get()
            clientStreams.append(s)
        }
        // Streams 3...41 complete: the server read all of each.
        for id in stride(from: UInt32(3), through: 41, by: 2) {
            #expect(try await counts[id]!.futureResult.get() == size)
        }
        // Stream 1 is stalled: its writer has used the whole window and waits.
        let first = clientStreams[0]
        let firstWritten = written[0]
        let stalled = try await first.eventLoop.submit {
            let s = first as! MuxStreamChannel
            return (s.sendWindow, s.queuedBytes, isDone(firstWritten))  // on the loop: isDone is exact
        }.get()
        #expect(stalled.0 == 0)
        #expect(stalled.1 == size - Int(YamuxDefaults.initialWindow))
        #expect(!stalled.2)
        // Reading again lets it finish.
        try await slow.futureResult.get().setOption(ChannelOptions.autoRead, value: true).get()
        #expect(try await counts[1]!.futureResult.get() == size)
        try await written[0].get()
        await pair.close()
    }

    @Test("go away: no new streams either way, open ones finish")
    func goAway() async throws {
        let pair = try await MuxPair.make(serverInbound: echo, clientInbound: echo)
        let done = pair.client.channel.eventLoop.makePromise(of: ByteBuffer.self)
        let gate = pair.client.channel.eventLoop.makePromise(of: Void.self)
        // The stream's initializer waits for the gate, so its data goes out after the go away.
        let opened = pair.client.openStream { channel in
            gate.futureResult.flatMapThrowing {
                try channel.syncOptions!.setOption(ChannelOptions.allowRemoteHalfClosure, value: true)
                try channel.pipeline.syncOperations.addHandler(
                    SendAndCollect(payload: ByteBuffer(string: "after go away"), done: done)
                )
            }
        }
        try await pair.client.goAway().get()
        _ = try await pair.client.ping().get()  // the server has handled the go away when the pong comes
        #expect(try await pair.server.stats().get().goAwayReceived == .normal)
        await #expect(throws: MuxError.goneAway) { try await pair.client.openStream(bare).get() }
        await #expect(throws: MuxError.goneAway) { try await pair.server.openStream(bare).get() }
        gate.succeed(())
        _ = try await opened.get()
        #expect(try await done.futureResult.get() == ByteBuffer(string: "after go away"))
        await pair.close()
    }

    @Test(
        "a peer that overruns a window or sends a malformed frame is cut off: go away, close, counted",
        arguments: [
            (
                [
                    YamuxFrame.windowUpdate(stream: 1, flags: .syn, delta: 0).bytes,
                    YamuxFrame.data(stream: 1, flags: [], payload: payload(262_144)).bytes,
                    YamuxFrame.data(stream: 1, flags: [], payload: payload(1)).bytes,
                ], MuxViolation.windowOverrun
            ),
            ([ByteBuffer(hexString: "00 00 0000 00000005 00000001 00")], .unknownStream),
            ([ByteBuffer(hexString: "00 09 0000 00000001 00000000")], .malformedFrame),
        ]
    )
    func cutOff(input: [ByteBuffer], violation: MuxViolation) async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        let accepted = group.next().makePromise(of: MuxSession.self)
        let streams = AcceptedStreams(autoRead: false)
        let listener = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let s = try MuxSession.install(
                        on: channel,
                        configuration: MuxConfiguration(role: .server),
                        inbound: streams.initializer
                    )
                    accepted.succeed(s)
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        // A raw peer: writes the frames and collects what comes back until the server closes.
        let received = group.next().makePromise(of: ByteBuffer.self)
        let raw = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(CollectUntilClose(received))
                }
            }
            .connect(to: listener.localAddress!).get()
        var all = ByteBuffer()
        for var b in input { all.writeBuffer(&b) }
        try await raw.writeAndFlush(all).get()
        var bytes = try await received.futureResult.get()
        var frames: [YamuxFrame] = []
        while let f = try YamuxFrame.decode(from: &bytes, maxPayload: 1 << 20) { frames.append(f) }
        #expect(frames.last == .goAway(.protocolError))
        let server = try await accepted.futureResult.get()
        #expect(try await server.stats().get().protocolErrors == [violation: 1])
        try? await listener.close()
    }

    @Test("a ping measures the round trip, both ways")
    func rtt() async throws {
        let pair = try await MuxPair.make(serverInbound: echo)
        let rtt = try await pair.client.ping().get()
        #expect(rtt > .zero)
        #expect(try await pair.client.stats().get().lastRTT == rtt)
        let back = try await pair.server.ping().get()
        #expect(back > .zero)
        #expect(try await pair.server.stats().get().lastRTT == back)
        await pair.close()
    }
}

/// Collects bytes until the channel closes.
final class CollectUntilClose: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let done: EventLoopPromise<ByteBuffer>
    private var got = ByteBuffer()
    init(_ done: EventLoopPromise<ByteBuffer>) { self.done = done }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var b = self.unwrapInboundIn(data)
        self.got.writeBuffer(&b)
    }
    func channelInactive(context: ChannelHandlerContext) { self.done.succeed(self.got) }
    func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
}
