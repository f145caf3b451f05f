import Logging
import MeshCore
import MeshNIO
import NodeAgent
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// An address appearing on or leaving one of the host's interfaces.
public struct HostAddressEvent: Sendable, Hashable, CustomStringConvertible {
    public enum Kind: String, Sendable, Hashable {
        case added
        case removed
    }

    public var kind: Kind
    public var address: IPAddress
    public var prefixLength: Int
    public var interfaceIndex: Int32

    public var description: String {
        "\(self.kind.rawValue) \(self.address)/\(self.prefixLength) if\(self.interfaceIndex)"
    }
}

/// Why the host address watch could not start.
public struct HostAddressWatchError: Error, CustomStringConvertible, Sendable {
    public var operation: String
    public var code: Int32

    public var description: String { "\(self.operation): \(String(cString: strerror(self.code))) (errno \(self.code))" }
}

/// Watches the host's addresses over rtnetlink (a `NETLINK_ROUTE` socket bound to RTMGRP_IPV4_IFADDR and
/// RTMGRP_IPV6_IFADDR; messages decoded by NodeAgent's `LinkAddressDump`, no libnl: an agent in loopback mode
/// maps none of it) on a dedicated thread. The stream starts with an `added` event per address present, then
/// follows changes; when the kernel dropped notifications (ENOBUFS: a burst larger than the socket's buffer,
/// such as thousands of VIPs added at once) every present address comes again as `added`, so a consumer that
/// compares lists misses nothing. It finishes when the consumer stops iterating (or on a socket error).
public enum HostAddressWatcher {
    public static func events(logger: Logger) throws(HostAddressWatchError) -> AsyncStream<HostAddressEvent> {
        // Room for a burst (the kernel takes the memory only while messages wait); past it, ENOBUFS and a resync.
        let fd: Int32
        switch LinkAddressDump.addressChangeSocket(receiveBuffer: 256 * 1024) {
        case .success(let socket): fd = socket
        case .failure(let failure): throw HostAddressWatchError(operation: failure.operation, code: failure.code)
        }
        // The snapshot comes after subscribing so that nothing falls in between (duplicates may).
        guard let initial = LinkAddressDump.allAddresses() else {
            let code = errno
            close(fd)
            throw HostAddressWatchError(operation: "list the host's addresses", code: code == 0 ? EIO : code)
        }
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else {
            let code = errno
            close(fd)
            throw HostAddressWatchError(operation: "pipe", code: code)
        }
        for end in pipeFDs { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        let (stream, continuation) = AsyncStream.makeStream(of: HostAddressEvent.self)
        for message in initial { continuation.yield(HostAddressEvent(message)) }
        let stopWriter = StopPipe(pipeFDs[1])
        continuation.onTermination = { _ in stopWriter.signal() }
        let reader = WatchLoop(socket: fd, wake: pipeFDs[0], stopWriter: stopWriter, continuation: continuation)
        DedicatedThread.start(name: "mesh-netlink-watch") { reader.run(logger: logger) }
        return stream
    }

    /// The write end of the stop pipe, -1 once closed. The consumer's termination writes to it and the loop
    /// closes it, both under the lock: no write can land in a descriptor that took the number after the close.
    private final class StopPipe: Sendable {
        private let fd: Mutex<Int32>
        init(_ fd: Int32) { self.fd = Mutex(fd) }

        func signal() {
            self.fd.withLock { fd in
                guard fd >= 0 else { return }
                var one: UInt8 = 1
                _ = write(fd, &one, 1)
            }
        }

        func close() {
            self.fd.withLock { fd in
                guard fd >= 0 else { return }
                _ = Glibc.close(fd)
                fd = -1
            }
        }
    }

    /// Owns the watch socket on its thread.
    private final class WatchLoop: Sendable {
        let socket: Int32
        let wake: Int32
        let stopWriter: StopPipe
        let continuation: AsyncStream<HostAddressEvent>.Continuation

        init(
            socket: Int32,
            wake: Int32,
            stopWriter: StopPipe,
            continuation: AsyncStream<HostAddressEvent>.Continuation
        ) {
            self.socket = socket
            self.wake = wake
            self.stopWriter = stopWriter
            self.continuation = continuation
        }

        func run(logger: Logger) {
            self.loop(logger: logger)
            close(self.socket)
            // The write end is closed under its lock: a termination that comes later (the loop ended on a
            // socket error, or `finish` below) finds -1 instead of writing into whatever descriptor took the
            // number meanwhile (another connection's socket).
            self.stopWriter.close()
            close(self.wake)
            self.continuation.finish()
        }

        private func loop(logger: Logger) {
            // Notifications are a few hundred bytes; a datagram holds one or a few.
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * 1024, alignment: 8)
            defer { buffer.deallocate() }
            var fds = [
                pollfd(fd: self.socket, events: Int16(POLLIN), revents: 0),
                pollfd(fd: self.wake, events: Int16(POLLIN), revents: 0),
            ]
            while true {
                let n = poll(&fds, 2, -1)
                if n < 0 {
                    if errno == EINTR { continue }
                    break
                }
                if fds[1].revents != 0 { break }
                guard fds[0].revents != 0 else { continue }
                while true {
                    let got = recv(self.socket, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT))
                    if got > 0 {
                        let datagram = UnsafeRawBufferPointer(rebasing: buffer[0..<got])
                        for message in LinkAddressDump.addressMessages(datagram) {
                            self.continuation.yield(HostAddressEvent(message))
                        }
                        continue
                    }
                    let code = errno
                    if got < 0 && code == EINTR { continue }
                    if got < 0 && (code == EAGAIN || code == EWOULDBLOCK) { break }
                    if got < 0 && code == ENOBUFS {
                        // Notifications were dropped: what is there now, in full.
                        logger.debug("host address watch: notifications dropped (ENOBUFS); listing the addresses")
                        for message in LinkAddressDump.allAddresses() ?? [] {
                            self.continuation.yield(HostAddressEvent(message))
                        }
                        continue
                    }
                    logger.warning(
                        "host address watch stopped",
                        metadata: ["error": "\(HostAddressWatchError(operation: "recv", code: got == 0 ? EIO : code))"]
                    )
                    return
                }
            }
        }
    }
}

extension HostAddressEvent {
    init(_ message: LinkAddressDump.AddressMessage) {
        self.init(
            kind: message.added ? .added : .removed,
            address: message.address,
            prefixLength: message.prefixLength,
            interfaceIndex: message.interfaceIndex
        )
    }
}
