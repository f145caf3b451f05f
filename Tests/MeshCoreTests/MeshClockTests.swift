import MeshCore
import MeshTestSupport
import Synchronization
import Testing

/// The clock production code takes, and the hand-moved one tests pass it (MeshTestSupport), whose
/// `advance` the liveness and node-agent tests rely on to wait on nothing.
@Suite("MeshClock: the system clock, and ManualClock for tests")
struct MeshClockTests {
    @Test("the system clock reads both clocks and sleeps for real")
    func systemClock() async throws {
        let clock: any MeshClock = .system
        let before = clock.now
        let wall = clock.epochMillis
        try await clock.sleep(for: .milliseconds(20))
        #expect(clock.now - before >= .milliseconds(20))
        #expect(clock.epochMillis >= wall + 19)
        #expect(clock.epochSeconds == Int(clock.epochMillis / 1000) || clock.epochSeconds == Int(wall / 1000) + 1)
    }

    @Test("a manual clock stands still until advanced; both clocks move together")
    func manualTime() async {
        let clock = ManualClock()
        let start = clock.now
        let wall = clock.epochMillis
        #expect(clock.now == start && clock.epochMillis == wall)
        await clock.advance(by: .milliseconds(1500))
        #expect(clock.now - start == .milliseconds(1500))
        #expect(clock.epochMillis - wall == 1500)
        #expect(clock.elapsed == .milliseconds(1500))
    }

    @Test("a sleeper wakes when an advance reaches its deadline, and advance returns once it sleeps again")
    func sleepersWakeAndSettle() async {
        let clock = ManualClock()
        let passes = Mutex(0)
        let loop = Task {
            while !Task.isCancelled {
                do { try await clock.sleep(for: .milliseconds(250)) } catch { return }
                passes.withLock { $0 += 1 }
            }
        }
        #expect(await clock.waitForSleepers(1))
        await clock.advance(by: .milliseconds(200))
        #expect(passes.withLock { $0 } == 0)
        await clock.advance(by: .milliseconds(50))
        #expect(passes.withLock { $0 } == 1)  // settled: the pass is done, not merely started
        await clock.advance(by: .seconds(1), in: .milliseconds(250))
        #expect(passes.withLock { $0 } == 5)
        // One big step wakes it once: sleeps are not replayed.
        await clock.advance(by: .seconds(10))
        #expect(passes.withLock { $0 } == 6)
        // Cancelled while asleep: it ends, and nobody sleeps any more.
        loop.cancel()
        await loop.value
        #expect(clock.sleepers == 0)
        #expect(await clock.advance(by: .seconds(1)))
    }
}

/// The awaited teardown trait (MeshTestSupport/Teardown.swift).
@Suite("awaited teardown")
struct TeardownTests {
    @Test("steps run last first, each awaited, on return and on a throw")
    func stepsRunOnEveryPath() async throws {
        struct Failure: Error {}
        let order = Mutex<[String]>([])
        let test = try #require(Test.current)
        // Returned.
        try await AwaitedTeardown().provideScope(for: test, testCase: nil) {
            onTeardown { order.withLock { $0.append("first") } }
            onTeardown {
                try? await Task.sleep(for: .milliseconds(10))
                order.withLock { $0.append("second") }
            }
        }
        #expect(order.withLock { $0 } == ["second", "first"])
        // Thrown: the steps ran before the error came out.
        order.withLock { $0 = [] }
        await #expect(throws: Failure.self) {
            try await AwaitedTeardown().provideScope(for: test, testCase: nil) {
                onTeardown { order.withLock { $0.append("stopped") } }
                throw Failure()
            }
        }
        #expect(order.withLock { $0 } == ["stopped"])
    }
}
