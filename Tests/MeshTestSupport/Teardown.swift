import Synchronization
import Testing

/// Teardown steps a test awaits when it ends, whether it returned or threw (Swift has no async
/// `defer`, and a `defer` that starts an unawaited `Task` to stop a server lets the test end before it stops).
///
/// A suite or test with the `.awaitedTeardown` trait gets one; `onTeardown { ... }` registers a step
/// where the resource is made, and the steps run in reverse order, each awaited, after the test body.
public final class Teardown: Sendable {
    @TaskLocal public static var current: Teardown?

    private let steps = Mutex<[@Sendable () async -> Void]>([])

    public init() {}

    public func add(_ step: @escaping @Sendable () async -> Void) {
        self.steps.withLock { $0.append(step) }
    }

    /// Runs the steps registered so far, last first, and forgets them.
    public func run() async {
        let steps = self.steps.withLock { s in
            defer { s.removeAll() }
            return s
        }
        for step in steps.reversed() { await step() }
    }
}

/// Gives each test a `Teardown` and awaits it after the test, on every path.
public struct AwaitedTeardown: SuiteTrait, TestTrait, TestScoping {
    public init() {}

    public var isRecursive: Bool { true }

    public func provideScope(
        for test: Test,
        testCase: Test.Case?,
        performing function: @Sendable () async throws -> Void
    ) async throws {
        let teardown = Teardown()
        do {
            try await Teardown.$current.withValue(teardown) { try await function() }
        } catch {
            await teardown.run()
            throw error
        }
        await teardown.run()
    }
}

extension Trait where Self == AwaitedTeardown {
    /// Each test's `onTeardown` steps are awaited when it ends, whether it returned or threw.
    public static var awaitedTeardown: Self { Self() }
}

/// Registers `step` to run, awaited, when the current test ends (returned or threw). The test or
/// its suite needs the `.awaitedTeardown` trait; without it the step is recorded as an issue.
public func onTeardown(
    sourceLocation: SourceLocation = #_sourceLocation,
    _ step: @escaping @Sendable () async -> Void
) {
    guard let teardown = Teardown.current else {
        Issue.record("onTeardown outside a test with the .awaitedTeardown trait", sourceLocation: sourceLocation)
        return
    }
    teardown.add(step)
}
