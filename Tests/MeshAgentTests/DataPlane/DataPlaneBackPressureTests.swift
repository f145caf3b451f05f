import MeshCore
import MeshTestSupport
import NIOCore
import NIOPosix
import Testing

@testable import MeshAgent

#if canImport(Glibc)
import Glibc
import func MeshTestSupport.onTeardown
import struct MeshTestSupport.AwaitedTeardown
#endif

/// VmRSS of this process, in bytes.
func residentSetSize() -> Int {
    guard let file = fopen("/proc/self/status", "r") else { return 0 }
    defer { fclose(file) }
    var line = [CChar](repeating: 0, count: 256)
    while fgets(&line, Int32(line.count), file) != nil {
        let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if text.hasPrefix("VmRSS:") {
            let kb =
                text.dropFirst(6).split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).first
                .flatMap { Int($0) } ?? 0
            return kb * 1024
        }
    }
    return 0
}

/// Reads one 64 KiB buffer at a time and waits `pause` between reads: a client slower than the proxy.
private final class SlowReader: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    private let done: EventLoopPromise<Int>
    private let pause: TimeAmount
    private var total = 0

    init(done: EventLoopPromise<Int>, pause: TimeAmount) {
        self.done = done
        self.pause = pause
    }

    func channelActive(context: ChannelHandlerContext) {
        context.read()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.total += self.unwrapInboundIn(data).readableBytes
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        context.eventLoop.assumeIsolated().scheduleTask(in: self.pause) { context.read() }
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.done.succeed(self.total)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.done.fail(error)
        context.close(promise: nil)
    }
}

@Suite("Data plane: back-pressure", .awaitedTeardown, .rationed)
struct DataPlaneBackPressureTests {
    /// Bytes to push through; `MESH_BACKPRESSURE_BYTES` overrides (e.g. 268435456 for a quick run).
    static let size: Int = {
        if let text = getenv("MESH_BACKPRESSURE_BYTES"), let n = Int(String(cString: text)) { return n }
        return 1 << 30
    }()

    @Test(
        "1 GiB from a fast backend to a slow reader: the relay holds at most one 64 KiB read",
        // A guard against a hang, not a speed check: 13 s in CI, 228 s in a whole-suite run beside two busy
        // loops (16,384 reads, each paused and rescheduled on a starved event loop).
        .timeLimit(.minutes(5))
    )
    func bulkToSlowReader() async throws {
        let size = Self.size
        let backend = try await TestServers.tcp(name: "bulk") { BulkSendHandler(size: size) }
        onTeardown { await backend.close() }
        try await withDataPlane { dp in
            let vip = TestAddresses.vip()
            try await dp.apply(
                RouteTable(routes: [
                    Route(service: service("bulk"), vip: vip, port: 8080, backends: [backend.backend()])
                ])
            )
            let baseline = residentSetSize()
            #expect(baseline > 1024 * 1024, "VmRSS must be readable")
            let done = testGroup.next().makePromise(of: Int.self)
            _ = try await ClientBootstrap(group: testGroup)
                .channelOption(.autoRead, value: false)
                .channelOption(.recvAllocator, value: FixedSizeRecvByteBufferAllocator(capacity: 64 * 1024))
                .channelOption(.maxMessagesPerRead, value: 1)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            SlowReader(done: done, pause: .microseconds(200))
                        )
                    }
                }
                .connect(to: TestClient.vipAddress(vip, 8080))
                .get()
            // Sample RSS while the transfer runs.
            let sampler = Task {
                var peak = residentSetSize()
                while !Task.isCancelled {
                    peak = max(peak, residentSetSize())
                    try? await Task.sleep(for: .milliseconds(20))
                }
                return peak
            }
            let started = ContinuousClock.now
            let received = try await done.futureResult.get()
            let elapsed = ContinuousClock.now - started
            sampler.cancel()
            let peak = max(await sampler.value, residentSetSize())
            let growth = peak - baseline
            #expect(received == size)
            // RSS is the whole test process's, which the suites running beside this one move by tens of MiB:
            // printed, not asserted (perf/proxy/bulk measures the proxy's memory alone). What bounds the
            // relay's memory is the backlog below.
            let backlog = dp.bufferedBytesHighWater
            // The relay holds what the slow side did not take of one read (at most its 64 KiB buffer) and reads
            // no more from the fast side until that is gone. Independent of the size sent.
            #expect(backlog <= 64 * 1024, "proxy write backlog reached \(backlog) bytes")
            #expect(backlog > 0, "the slow reader should have pushed back (backlog \(backlog))")
            print(
                "back-pressure: \(size) bytes in \(elapsed), RSS growth \(growth / 1024) KiB,"
                    + " proxy backlog high water \(backlog) bytes"
            )
        }
    }
}
