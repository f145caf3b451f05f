import CLinux
import CNetlink

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A detached OS thread for blocking work (netlink reads, namespace switching) that must stay off both the
/// Swift concurrency pool and the NIO event loops.
enum DedicatedThread {
    private final class Body {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    /// Starts `body` on a new detached thread named `name` (as `ps -L` and `top -H` show it).
    static func start(name: String, _ body: @escaping @Sendable () -> Void) {
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
    static func run<T: Sendable>(
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

/// Entering a named network namespace (`ip netns add NAME`, bound at /var/run/netns/NAME).
public enum NetworkNamespace {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Moves the calling thread into namespace `name` (setns(2)); other threads stay where they are. For
    /// threads the caller owns: a dedicated thread, or an event loop's thread of a group made for it.
    public static func enter(_ name: String) throws {
        let fd = open("/var/run/netns/\(name)", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure(description: "open netns \(name): errno \(errno)") }
        defer { close(fd) }
        guard mesh_setns_net(fd) == 0 else { throw Failure(description: "setns \(name): errno \(errno)") }
    }

    /// Runs `body` on a fresh thread that has entered namespace `name` (setns(2) affects only that thread).
    /// Netlink and other sockets created inside `body` stay in that namespace for their whole life, whichever
    /// thread uses them later.
    public static func run<T: Sendable>(
        _ name: String,
        _ body: @escaping @Sendable () throws -> T
    ) async throws -> T {
        try await DedicatedThread.run(name: "netns-\(name)") {
            try Self.enter(name)
            return try body()
        }
    }
}
