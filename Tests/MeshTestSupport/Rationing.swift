import Foundation
import Synchronization
import Testing

/// A limit on how many suites that open sockets, start servers or run child processes run at once in one
/// test process.
///
/// Swift Testing starts every suite of a process at once. A plain `swift test` holds some 140 suites; on two
/// cores the servers, child processes and etcd members of all of them at once share the machine so thinly
/// that waits made for a busy machine (a server answering within 15 s) run out. A suite with `.rationed`
/// takes one of a fixed number of places before its tests start and gives it back when they have all ended;
/// its own tests still run in parallel. Codec and state-machine suites need no place.
///
/// The place is taken around the suite, not around each test: Swift Testing's time limits run around a
/// test's scope, so a test waiting in line would be charged for the wait. A suite inside a suite that
/// already holds a place does not take a second one.
///
/// `MESH_TEST_SUITES_AT_ONCE` sets the number of places (default: 4 per core, at least 4).
public struct Rationed: SuiteTrait, TestScoping {
    public init() {}

    public var isRecursive: Bool { false }

    public func scopeProvider(for test: Test, testCase: Test.Case?) -> Rationed? {
        test.isSuite && testCase == nil ? self : nil
    }

    public func provideScope(
        for test: Test,
        testCase: Test.Case?,
        performing function: @Sendable () async throws -> Void
    ) async throws {
        if SuitePlaces.holding {
            try await function()
            return
        }
        await SuitePlaces.shared.take()
        defer { SuitePlaces.shared.giveBack() }
        try await SuitePlaces.$holding.withValue(true) { try await function() }
    }
}

extension Trait where Self == Rationed {
    /// Runs the suite when one of a limited number of places is free (see `Rationed`).
    public static var rationed: Self { Rationed() }
}

/// The places `Rationed` suites take: a counting semaphore whose waiters are resumed in arrival order.
final class SuitePlaces: Sendable {
    static let shared = SuitePlaces(count: SuitePlaces.configuredCount())

    @TaskLocal static var holding = false

    private struct State {
        var free: Int
        var waiting: [CheckedContinuation<Void, Never>] = []
        var head = 0
    }

    private let state: Mutex<State>

    init(count: Int) {
        self.state = Mutex(State(free: max(count, 1)))
    }

    static func configuredCount() -> Int {
        if let text = ProcessInfo.processInfo.environment["MESH_TEST_SUITES_AT_ONCE"], let n = Int(text), n > 0 {
            return n
        }
        return max(4, 4 * ProcessInfo.processInfo.activeProcessorCount)
    }

    func take() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = self.state.withLock { state -> Bool in
                if state.free > 0 {
                    state.free -= 1
                    return true
                }
                state.waiting.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    func giveBack() {
        let next = self.state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard state.head < state.waiting.count else {
                state.free += 1
                return nil
            }
            let next = state.waiting[state.head]
            state.head += 1
            if state.head == state.waiting.count {
                state.waiting.removeAll()
                state.head = 0
            }
            return next
        }
        next?.resume()
    }
}
