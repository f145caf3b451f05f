import CLinux

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A detached OS thread for blocking work (netlink reads, namespace switching) that must stay off both the
/// Swift concurrency pool and the NIO event loops (the DNS responder's UDP loop, the data plane's splice
/// loops, netlink watches).
public enum DedicatedThread {
    private final class Body {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    /// Starts `body` on a new detached thread named `name` (as `ps -L` and `top -H` show it).
    public static func start(name: String, _ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(
            Body({
                mesh_set_thread_name(name)
                body()
            })
        ).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(
            &thread,
            nil,
            { arg in
                let body = Unmanaged<Body>.fromOpaque(arg!).takeRetainedValue()
                body.run()
                return nil
            },
            box
        )
        precondition(rc == 0, "pthread_create failed: \(rc)")
        pthread_detach(thread)
    }

    /// Runs `body` on a new thread and returns its result.
    public static func run<T: Sendable>(
        name: String,
        _ body: @escaping @Sendable () throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            Self.start(name: name) {
                continuation.resume(with: Result { try body() })
            }
        }
    }
}
