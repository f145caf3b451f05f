import MeshWire
import NIOCore
import NIOEmbedded
import Testing

@testable import Relay

/// The session's frame handling on an EmbeddedChannel: exact frames out for frames in.
@Suite("mux session frames (EmbeddedChannel)") struct MuxSessionFrameTests {
    @Test("a client opens odd streams with SYN; writes become Data frames; FIN after the queued bytes")
    func openAndWrite() throws {
        let (channel, session) = try EmbeddedChannel.muxSession(.client, inbound: nil)
        let log = StreamLog()
        let s1 = try session.openStream(recording(log)).wait()
        let s3 = try session.openStream(bare).wait()
        #expect(
            try channel.outboundFrames() == [
                .windowUpdate(stream: 1, flags: .syn, delta: 0), .windowUpdate(stream: 3, flags: .syn, delta: 0),
            ]
        )
        try s1.writeAndFlush(ByteBuffer(string: "hello")).wait()
        s3.close(mode: .output, promise: nil)
        #expect(
            try channel.outboundFrames() == [
                .data(stream: 1, flags: [], payload: ByteBuffer(string: "hello")),
                .data(stream: 3, flags: .fin, payload: ByteBuffer()),
            ]
        )
        #expect(log.events == ["active"])
        #expect(try session.stats().wait().streamsOpened == 2)
    }

    @Test("the frames of one flush leave as one write (one TLS record below); a payload over 8 KiB as its own")
    func coalescedWrites() throws {
        let (channel, session) = try EmbeddedChannel.muxSession(.client, inbound: nil)
        let s1 = try session.openStream(bare).wait()
        _ = try channel.outboundFrames()
        func writes() throws -> [ByteBuffer] {
            var all: [ByteBuffer] = []
            while let b = try channel.readOutbound(as: ByteBuffer.self) { all.append(b) }
            return all
        }
        // A small write: its header and payload in one buffer.
        try s1.writeAndFlush(ByteBuffer(string: "hello")).wait()
        #expect(try writes() == [YamuxFrame.data(stream: 1, flags: [], payload: ByteBuffer(string: "hello")).bytes])
        // Two pings read at once: both answers in one write, at the read's end.
        var two = YamuxFrame.ping(ack: false, opaque: 7).bytes
        two.writeImmutableBuffer(YamuxFrame.ping(ack: false, opaque: 8).bytes)
        try channel.writeInbound(two)
        var acks = YamuxFrame.ping(ack: true, opaque: 7).bytes
        acks.writeImmutableBuffer(YamuxFrame.ping(ack: true, opaque: 8).bytes)
        #expect(try writes() == [acks])
        // 8 KiB is copied in with its header; one byte more goes as its own write after the header.
        try s1.writeAndFlush(payload(8192)).wait()
        #expect(try writes() == [YamuxFrame.data(stream: 1, flags: [], payload: payload(8192)).bytes])
        try s1.writeAndFlush(payload(8193)).wait()
        let header = try YamuxFrame.data(stream: 1, flags: [], payload: payload(8193)).bytes.getSlice(at: 0, length: 12)
        #expect(try writes() == [header, payload(8193)])
    }

    @Test("a server acknowledges the peer's SYN with ACK and delivers its bytes; the peer's FIN is inputClosed")
    func acceptAndRead() throws {
        let accepted = AcceptedStreams()
        let (channel, _) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        try channel.send(
            .windowUpdate(stream: 1, flags: .syn, delta: 0),
            .data(stream: 1, flags: [], payload: ByteBuffer(string: "hi")),
            .data(stream: 1, flags: .fin, payload: ByteBuffer(string: "!"))
        )
        #expect(try channel.outboundFrames() == [.windowUpdate(stream: 1, flags: .ack, delta: 0)])
        #expect(accepted.logs.count == 1)
        #expect(accepted.logs[0].bytes == ByteBuffer(string: "hi!"))
        #expect(accepted.logs[0].events == ["active", "inputClosed"])
        // Our FIN ends the stream: both sides are done.
        try accepted.channels[0].close(mode: .output).wait()
        #expect(try channel.outboundFrames() == [.data(stream: 1, flags: .fin, payload: ByteBuffer())])
        #expect(accepted.logs[0].events == ["active", "inputClosed", "outputClosed", "inactive"])
        channel.embeddedEventLoop.run()
        try accepted.channels[0].closeFuture.wait()
        // A late frame for the finished stream is dropped, not a violation.
        try channel.send(.windowUpdate(stream: 1, flags: [], delta: 10))
        #expect(channel.isActive)
    }

    @Test("frames cut anywhere (here one byte per read) are put together: the same streams, bytes and events")
    func framesSplitByteByByte() throws {
        let accepted = AcceptedStreams()
        let (channel, _) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        var all = YamuxFrame.windowUpdate(stream: 1, flags: .syn, delta: 0).bytes
        all.writeImmutableBuffer(YamuxFrame.data(stream: 1, flags: [], payload: ByteBuffer(string: "hello")).bytes)
        all.writeImmutableBuffer(YamuxFrame.ping(ack: false, opaque: 9).bytes)
        all.writeImmutableBuffer(YamuxFrame.data(stream: 1, flags: .fin, payload: ByteBuffer(string: "!")).bytes)
        while let byte = all.readSlice(length: 1) { try channel.writeInbound(byte) }
        #expect(
            try channel.outboundFrames() == [
                .windowUpdate(stream: 1, flags: .ack, delta: 0), .ping(ack: true, opaque: 9),
            ]
        )
        #expect(accepted.logs.count == 1)
        #expect(accepted.logs[0].bytes == ByteBuffer(string: "hello!"))
        #expect(accepted.logs[0].events == ["active", "inputClosed"])
        #expect(channel.isActive)
    }

    @Test("a frame that the connection's end cuts short is a malformed frame: counted, streams failed")
    func truncatedAtTheEnd() throws {
        let accepted = AcceptedStreams()
        let (channel, session) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        try channel.send(.windowUpdate(stream: 1, flags: .syn, delta: 0))
        let frame = YamuxFrame.data(stream: 1, flags: [], payload: ByteBuffer(string: "cut short")).bytes
        try channel.writeInbound(frame.getSlice(at: 0, length: 15)!)
        #expect(accepted.logs[0].bytes.readableBytes == 0)
        channel.pipeline.fireChannelInactive()
        #expect(try session.stats().wait().protocolErrors == [.malformedFrame: 1])
        #expect(accepted.logs[0].errors.first as? MuxError == .protocolViolation(.malformedFrame))
    }

    @Test("SYN with Data at once (no window update first) opens the stream too")
    func synWithData() throws {
        let accepted = AcceptedStreams()
        let (channel, _) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        try channel.send(.data(stream: 7, flags: .syn, payload: ByteBuffer(string: "x")))
        #expect(try channel.outboundFrames() == [.windowUpdate(stream: 7, flags: .ack, delta: 0)])
        #expect(accepted.logs[0].bytes == ByteBuffer(string: "x"))
    }

    @Test("SYN over maxStreams, without an acceptor or after Go Away: RST, counted; opens over the limit fail")
    func refusals() throws {
        let accepted = AcceptedStreams()
        let (channel, session) = try EmbeddedChannel.muxSession(.server, maxStreams: 1, inbound: accepted.initializer)
        try channel.send(
            .windowUpdate(stream: 1, flags: .syn, delta: 0),
            .windowUpdate(stream: 3, flags: .syn, delta: 0)
        )
        #expect(
            try channel.outboundFrames() == [
                .windowUpdate(stream: 1, flags: .ack, delta: 0), .windowUpdate(stream: 3, flags: .rst, delta: 0),
            ]
        )
        // Data the peer sent before it saw the RST is dropped.
        try channel.send(.data(stream: 3, flags: [], payload: ByteBuffer(string: "late")))
        try session.goAway().wait()
        try accepted.channels[0].close().wait()  // RST (the peer has not finished)
        try channel.send(.windowUpdate(stream: 5, flags: .syn, delta: 0))
        #expect(
            try channel.outboundFrames() == [
                .goAway(.normal), .windowUpdate(stream: 1, flags: .rst, delta: 0),
                .windowUpdate(stream: 5, flags: .rst, delta: 0),
            ]
        )
        #expect(try session.stats().wait().streamsRefused == 2)
        #expect(channel.isActive)

        let (plain, client) = try EmbeddedChannel.muxSession(.client, maxStreams: 1, inbound: nil)
        try plain.send(.windowUpdate(stream: 2, flags: .syn, delta: 0))
        #expect(try plain.outboundFrames() == [.windowUpdate(stream: 2, flags: .rst, delta: 0)])
        // Our own opens count against the same limit.
        _ = try client.openStream(bare).wait()
        #expect(throws: MuxError.tooManyStreams(limit: 1)) { try client.openStream(bare).wait() }
    }

    @Test("pings: answered with ACK and the same opaque value; ours give the round trip")
    func pings() throws {
        let (channel, session) = try EmbeddedChannel.muxSession(.client, inbound: nil)
        try channel.send(.ping(ack: false, opaque: 0xCAFE))
        #expect(try channel.outboundFrames() == [.ping(ack: true, opaque: 0xCAFE)])
        let rtt = session.ping()
        #expect(try channel.outboundFrames() == [.ping(ack: false, opaque: 1)])
        try channel.send(.ping(ack: true, opaque: 99))  // unknown: ignored
        #expect(!isDone(rtt))
        try channel.send(.ping(ack: true, opaque: 1))
        let measured = try rtt.wait()
        #expect(measured >= .zero)
        #expect(try session.stats().wait().lastRTT == measured)
    }

    @Test("the peer's Go Away stops new streams, not open ones; an error code ends the session")
    func goAway() throws {
        let accepted = AcceptedStreams()
        let (channel, session) = try EmbeddedChannel.muxSession(.client, inbound: accepted.initializer)
        let s1 = try session.openStream(bare).wait()
        try channel.send(.goAway(.normal))
        #expect(throws: MuxError.goneAway) { try session.openStream(bare).wait() }
        try s1.writeAndFlush(ByteBuffer(string: "still")).wait()
        _ = try channel.outboundFrames()
        #expect(try session.stats().wait().goAwayReceived == .normal)
        try channel.send(.goAway(.internalError))
        #expect(!channel.isActive)
        #expect(!s1.isActive)
    }

    @Test("Data beyond the receive window cuts the peer off: Go Away protocol error, close, counted")
    func windowOverrun() throws {
        let accepted = AcceptedStreams(autoRead: false)
        let (channel, session) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        // A reader that never reads: the window is never handed back.
        try channel.send(.windowUpdate(stream: 1, flags: .syn, delta: 0))
        try channel.send(.data(stream: 1, flags: [], payload: payload(200_000)))
        try channel.send(.data(stream: 1, flags: [], payload: payload(62_144)))  // exactly 256 KiB
        #expect(channel.isActive)
        try channel.send(.data(stream: 1, flags: [], payload: payload(1)))
        #expect(
            try channel.outboundFrames() == [.windowUpdate(stream: 1, flags: .ack, delta: 0), .goAway(.protocolError)]
        )
        #expect(!channel.isActive)
        #expect(accepted.logs[0].errors.first as? MuxError == .protocolViolation(.windowOverrun))
        #expect(try session.stats().wait().protocolErrors == [.windowOverrun: 1])
    }

    @Test("a read hands the window back in steps of half a window; the reader that reads nothing holds it shut")
    func windowUpdates() throws {
        let accepted = AcceptedStreams(autoRead: false)
        let (channel, _) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        try channel.send(.windowUpdate(stream: 1, flags: .syn, delta: 0))
        try channel.send(.data(stream: 1, flags: [], payload: payload(100_000)))
        try channel.send(.data(stream: 1, flags: [], payload: payload(100_000)))
        #expect(try channel.outboundFrames() == [.windowUpdate(stream: 1, flags: .ack, delta: 0)])
        #expect(accepted.logs[0].bytes.readableBytes == 0)
        accepted.channels[0].read()  // 200,000 bytes delivered: over half a window, handed back
        #expect(accepted.logs[0].bytes.readableBytes == 200_000)
        #expect(try channel.outboundFrames() == [.windowUpdate(stream: 1, flags: [], delta: 200_000)])
        try channel.send(.data(stream: 1, flags: [], payload: payload(262_144)))  // the whole window again
        #expect(channel.isActive)
    }

    @Test("a writer sends no more than the peer's window, in frames of maxFrameSize, and goes on after its update")
    func sendWindow() throws {
        let (channel, session) = try EmbeddedChannel.muxSession(.client, inbound: nil)
        let s1 = try session.openStream(bare).wait()
        _ = try channel.outboundFrames()
        let done = s1.writeAndFlush(payload(300_000))
        s1.close(mode: .output, promise: nil)
        var frames = try channel.outboundFrames()
        #expect(frames.count == 16)
        #expect(
            frames.allSatisfy {
                if case .data(1, let f, let p) = $0 { f.isEmpty && p.readableBytes == 16_384 } else { false }
            }
        )
        #expect(!isDone(done))
        #expect(!s1.isWritable)  // 300,000 queued, over the high water mark
        try channel.send(.windowUpdate(stream: 1, flags: .ack, delta: 100_000))
        frames = try channel.outboundFrames()
        #expect(frames.count == 3)
        #expect(
            frames.last
                == .data(stream: 1, flags: .fin, payload: payload(300_000).getSlice(at: 294_912, length: 5_088)!)
        )
        #expect(isDone(done))
        #expect(s1.isWritable)
    }

    @Test("without half-closure the peer's FIN closes the stream gracefully: FIN back, no RST")
    func finWithoutHalfClosure() throws {
        let accepted = AcceptedStreams(halfClosure: false)
        let (channel, session) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        try channel.send(.data(stream: 1, flags: [.syn, .fin], payload: ByteBuffer(string: "x")))
        #expect(
            try channel.outboundFrames() == [
                .windowUpdate(stream: 1, flags: .ack, delta: 0), .data(stream: 1, flags: .fin, payload: ByteBuffer()),
            ]
        )
        #expect(accepted.logs[0].bytes == ByteBuffer(string: "x"))
        #expect(accepted.logs[0].events == ["active", "inactive"])
        #expect(try session.stats().wait().openStreams == 0)
    }

    @Test("while the session's channel is unwritable streams queue; they send when it is writable again")
    func parentWritability() throws {
        let (channel, session) = try EmbeddedChannel.muxSession(.client, inbound: nil)
        let s1 = try session.openStream(bare).wait()
        let s3 = try session.openStream(bare).wait()
        _ = try channel.outboundFrames()
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        let w1 = s1.writeAndFlush(ByteBuffer(string: "one"))
        let w3 = s3.writeAndFlush(ByteBuffer(string: "three"))
        #expect(try channel.outboundFrames() == [])
        #expect(!isDone(w1) && !isDone(w3))
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()
        #expect(
            try channel.outboundFrames() == [
                .data(stream: 1, flags: [], payload: ByteBuffer(string: "one")),
                .data(stream: 3, flags: [], payload: ByteBuffer(string: "three")),
            ]
        )
        #expect(isDone(w1) && isDone(w3))
    }

    @Test("close before the peer's FIN resets the stream; the peer's RST fails ours")
    func resets() throws {
        let (channel, session) = try EmbeddedChannel.muxSession(.client, inbound: nil)
        let s1 = try session.openStream(bare).wait()
        let log = StreamLog()
        _ = try session.openStream(recording(log)).wait()
        _ = try channel.outboundFrames()
        try s1.close().wait()
        #expect(try channel.outboundFrames() == [.windowUpdate(stream: 1, flags: .rst, delta: 0)])
        try channel.send(.windowUpdate(stream: 3, flags: .rst, delta: 0))
        #expect(log.errors.first as? MuxError == .streamReset(3))
        #expect(log.events == ["active", "inactive"])
        #expect(try session.stats().wait().streamsResetByPeer == 1)
        #expect(try session.stats().wait().openStreams == 0)
    }

    @Test(
        "protocol violations cut the peer off and are counted",
        arguments: [
            (["00 00 0000 00000009 00000001 00"], MuxViolation.unknownStream),  // never opened
            (["00 01 0001 00000002 00000000"], .badStreamID),  // a server may not receive even ids
            (["00 01 0001 00000003 00000000", "00 01 0001 00000001 00000000"], .badStreamID),  // ids go up
            (
                ["00 01 0001 00000001 00000000", "00 01 0004 00000001 00000000", "00 00 0000 00000001 00000001 00"],
                .dataAfterFin
            ),
            (["00 01 0001 00000001 00000000", "00 01 0000 00000001 ffffffff"], .windowOverflow),
            (["07 00 0000 00000001 00000000"], .malformedFrame),
            (["00 00 0000 00000001 00040001"], .malformedFrame),  // longer than any window
        ]
    )
    func violations(frames: [String], violation: MuxViolation) throws {
        let accepted = AcceptedStreams()
        let (channel, session) = try EmbeddedChannel.muxSession(.server, inbound: accepted.initializer)
        for f in frames where channel.isActive {
            try channel.writeInbound(ByteBuffer(hexString: f))
        }
        #expect(try channel.outboundFrames().last == .goAway(.protocolError))
        #expect(!channel.isActive)
        #expect(try session.stats().wait().protocolErrors == [violation: 1])
        for log in accepted.logs {
            #expect(log.errors.first as? MuxError == .protocolViolation(violation))
        }
    }
}
