import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The descriptor of a connected TCP socket, found by its two addresses. NIO gives no channel's descriptor
/// away; a server that wants to move a connection off NIO (the relay's circuits onto its epoll splice) finds it
/// here, duplicates it, and then lets NIO close its own.
public enum SocketDescriptor {
    /// The descriptor of this process whose socket has `local` as its own address and `remote` as its peer's;
    /// nil when none has (a closed channel, a Unix socket). Reads `/proc/self/fd` and asks each socket
    /// (`getsockname`, `getpeername`): two system calls per open socket, once per connection moved. Two
    /// connected TCP sockets of one host never share both addresses, so the match is the channel's own.
    public static func find(local: SocketAddress, remote: SocketAddress) -> Int32? {
        guard let directory = opendir("/proc/self/fd") else { return nil }
        defer { closedir(directory) }
        let own = dirfd(directory)
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { bytes in
                String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard let fd = Int32(name), fd != own else { continue }
            guard Self.address(of: fd, peer: false) == local, Self.address(of: fd, peer: true) == remote else {
                continue
            }
            return fd
        }
        return nil
    }

    /// A duplicate (close-on-exec) of the socket under `channel`; the channel still owns and closes its own.
    /// Call it on the channel's event loop while the channel is open, so that its descriptor cannot be closed
    /// (and its number reused) meanwhile.
    public static func duplicate(of channel: any Channel) -> Int32? {
        guard let local = channel.localAddress, let remote = channel.remoteAddress,
            let fd = Self.find(local: local, remote: remote)
        else { return nil }
        let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        return copy >= 0 ? copy : nil
    }

    private static func address(of fd: Int32, peer: Bool) -> SocketAddress? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                peer ? getpeername(fd, address, &length) : getsockname(fd, address, &length)
            }
        }
        guard rc == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafeBytes(of: &storage) { SocketAddress($0.load(as: sockaddr_in.self)) }
        case AF_INET6:
            return withUnsafeBytes(of: &storage) { SocketAddress($0.load(as: sockaddr_in6.self)) }
        default:
            return nil
        }
    }
}
