import Synchronization

/// A value set once by one task (or failed once) and awaited by any number of others: how a
/// daemon hands out the address it listens on after `run()` has bound it.
public final class AsyncOnce<T: Sendable>: Sendable {
    private let state = Mutex<(value: Result<T, any Error>?, waiters: [CheckedContinuation<T, any Error>])>((nil, []))

    public init() {}

    public func set(_ value: T) { self.complete(.success(value)) }
    public func fail(_ error: any Error) { self.complete(.failure(error)) }

    private func complete(_ result: Result<T, any Error>) {
        let waiters = self.state.withLock { s -> [CheckedContinuation<T, any Error>] in
            guard s.value == nil else { return [] }
            s.value = result
            defer { s.waiters = [] }
            return s.waiters
        }
        for w in waiters { w.resume(with: result) }
    }

    /// The value once set; throws the failure if it failed.
    public func value() async throws -> T {
        try await withCheckedThrowingContinuation { c in
            let ready = self.state.withLock { s -> Result<T, any Error>? in
                if let v = s.value { return v }
                s.waiters.append(c)
                return nil
            }
            if let r = ready { c.resume(with: r) }
        }
    }
}
