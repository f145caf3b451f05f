import MeshTestSupport
import Synchronization
import Testing

@testable import MeshHTTP

@Suite("Heap trim: the malloc heap's free pages go back after a storm, once per growth", .rationed)
struct HeapTrimTests {
    @Test(
        "the policy trims when free bytes grew by the minimum and an eighth of those in use, then waits for more growth"
    )
    func policy() {
        var p = HeapTrimPolicy(minimumFree: 8 << 20)
        // (MiB in use, MiB free, trim?)
        let steps: [(Int, Int, Bool)] = [
            (40, 2, false),  // a little free: nothing
            (400, 40, false),  // 40 MiB free, but under an eighth of 400
            (400, 120, true),  // the storm's aftermath
            // After a trim the free count stays (the chunks stay free, their pages went): no trim again.
            (400, 120, false),
            (400, 130, false),
            // Chunks reused (free falls), then a new storm frees as much again: trimmed again.
            (500, 20, false),
            (400, 90, true),
        ]
        for (i, (used, free, want)) in steps.enumerated() {
            let got = p.shouldTrim(used: used << 20, free: free << 20)
            #expect(got == want, "step \(i): \(used) MiB used, \(free) MiB free")
        }
    }

    @Test("the loop trims on the policy's word and reports, and ends when cancelled")
    func loop() async throws {
        let readings = Mutex<[(used: Int, free: Int)]>([
            (40 << 20, 1 << 20), (400 << 20, 120 << 20), (400 << 20, 120 << 20), (400 << 20, 121 << 20),
        ])
        let trims = Atomic<Int>(0)
        let reports = Mutex<[Int]>([])
        let drained = AsyncStream<Void>.makeStream()
        let task = Task {
            await ProcessResources.trimWhenFragmented(
                every: .milliseconds(1),
                usage: {
                    readings.withLock { r in
                        if r.count == 1 { drained.continuation.yield() }
                        return r.count > 1 ? r.removeFirst() : r.first
                    }
                },
                trim: { trims.add(1, ordering: .relaxed) },
                report: { free, _ in reports.withLock { $0.append(free) } }
            )
        }
        var it = drained.stream.makeAsyncIterator()
        _ = await it.next()  // every reading taken (the last one repeats from then on)
        task.cancel()
        await task.value
        #expect(trims.load(ordering: .relaxed) == 1)
        #expect(reports.withLock { $0 } == [120 << 20])
    }

    @Test("the heap's usage is read (glibc's mallinfo2): something is in use in a running process")
    func usage() throws {
        let u = try #require(ProcessResources.heapUsage())
        #expect(u.used > 0 && u.free >= 0)
    }
}
