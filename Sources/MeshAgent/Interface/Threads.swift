import CLinux
import CNetlink
import MeshNIO

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

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
