import MeshHTTP
import MeshTestSupport
import NIOCore
import Testing

@Suite(.rationed) struct LeanAllocatorTests {
    @Test func buffersOfEverySizeKeepTheirBytesThroughGrowthAndCopies() {
        let allocator = LeanAllocator.allocator
        for size in [1, 100, 16 * 1024 - 17, 16 * 1024, 32 * 1024, 100_000] {
            var b = allocator.buffer(capacity: size)
            #expect(b.capacity >= size)
            let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            b.writeBytes(bytes)
            // Growing across the threshold both ways (heap → mapped, mapped → bigger mapped).
            b.writeBytes(bytes)
            #expect(b.readableBytesView.elementsEqual(bytes + bytes))
            let copy = b  // copy on write: the copy keeps the old bytes
            b.setBytes([0xff], at: 0)
            #expect(copy.getInteger(at: 0, as: UInt8.self) == bytes[0])
            #expect(b.getInteger(at: 0, as: UInt8.self) == 0xff)
        }
    }
}
