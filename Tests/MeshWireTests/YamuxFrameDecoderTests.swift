import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing

@testable import MeshWire

@Suite("yamux frame decoder") struct YamuxFrameDecoderTests {
    @Test("ByteToMessageDecoderVerifier: drip-fed, batched, whole")
    func verifier() throws {
        let pairs = YamuxFrameTests.samples.map { (buffer($0.0), [$0.1]) }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { YamuxFrameDecoder(maxPayload: 1024) }
    }

    @Test("a malformed header is an error in the pipeline, after the frames before it")
    func malformedInPipeline() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(YamuxFrameDecoder(maxPayload: 16)))
        let input = buffer("00 02 0001 00000000 00000001  00 00 0000 00000001 00000011")
        #expect(throws: MeshWireError(.frameTooLarge, "", file: "", line: 0)) { try channel.writeInbound(input) }
        #expect(try channel.readInbound(as: YamuxFrame.self) == .ping(ack: false, opaque: 1))
        #expect(try channel.readInbound(as: YamuxFrame.self) == nil)
    }

    @Test("bytes left inside a frame when the stream ends are an error")
    func truncatedAtEOF() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(YamuxFrameDecoder(maxPayload: 16)))
        try channel.writeInbound(buffer("00 00 0000 00000001 00000004 0102"))
        #expect(try channel.readInbound(as: YamuxFrame.self) == nil)
        #expect(throws: MeshWireError(.truncated, "", file: "", line: 0)) { try channel.finish() }
    }
}
