import CNetlink
import Logging
import MeshCore
import MeshNIO
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

/// Watches the host's addresses over netlink (RTNLGRP_IPV4_IFADDR / RTNLGRP_IPV6_IFADDR) on a dedicated
/// thread. The stream starts with an `added` event per address present, then follows changes; it finishes
/// when the consumer stops iterating (or on a netlink error).
public enum HostAddressWatcher {
    public static func events(logger: Logger) throws(NetlinkError) -> AsyncStream<HostAddressEvent> {
        let sock = try NetlinkSocket()
        mesh_nl_socket_disable_seq_check(sock.raw)
        for group in [RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR] {
            let rc = mesh_nl_socket_add_membership(sock.raw, Int32(group.rawValue))
            guard rc == 0 else { throw NetlinkError("subscribe to address changes", code: rc) }
        }
        _ = mesh_nl_socket_set_nonblocking(sock.raw)
        // The snapshot comes after subscribing so that nothing falls in between (duplicates may).
        let initial = try MeshInterface.addresses(sock: try NetlinkSocket())
        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else { throw NetlinkError("pipe", code: MESH_NLE_FAILURE) }
        let (stream, continuation) = AsyncStream.makeStream(of: HostAddressEvent.self)
        for event in initial { continuation.yield(event) }
        let stopWriter = StopPipe(pipeFDs[1])
        continuation.onTermination = { _ in stopWriter.signal() }
        let reader = WatchLoop(socket: sock, wake: pipeFDs[0], stopWriter: stopWriter, continuation: continuation)
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
        /// Held by the dedicated thread for as long as it runs (its only user).
        let socket: Mutex<NetlinkSocket>
        let wake: Int32
        let stopWriter: StopPipe
        let continuation: AsyncStream<HostAddressEvent>.Continuation

        init(
            socket: consuming sending NetlinkSocket,
            wake: Int32,
            stopWriter: StopPipe,
            continuation: AsyncStream<HostAddressEvent>.Continuation
        ) {
            self.socket = Mutex(socket)
            self.wake = wake
            self.stopWriter = stopWriter
            self.continuation = continuation
        }

        func run(logger: Logger) {
            self.socket.withLock { sock in self.loop(sock, logger: logger) }
            // The write end is closed under its lock: a termination that comes later (the loop ended on a
            // netlink error, or `finish` below) finds -1 instead of writing into whatever descriptor took the
            // number meanwhile (another connection's socket).
            self.stopWriter.close()
            close(self.wake)
            self.continuation.finish()
        }

        private func loop(_ sock: NetlinkSocket, logger: Logger) {
            let context = Unmanaged.passUnretained(self).toOpaque()
            mesh_nl_socket_modify_cb(
                sock.raw,
                MESH_NL_CB_VALID,
                MESH_NL_CB_CUSTOM,
                { msg, arg in
                    guard let msg, let arg else { return MESH_NL_OK }
                    let loop = Unmanaged<WatchLoop>.fromOpaque(arg).takeUnretainedValue()
                    if let event = HostAddressWatcher.parse(msg) { loop.continuation.yield(event) }
                    return MESH_NL_OK
                },
                context
            )
            var fds = [
                pollfd(fd: sock.fileDescriptor, events: Int16(POLLIN), revents: 0),
                pollfd(fd: self.wake, events: Int16(POLLIN), revents: 0),
            ]
            while true {
                let n = poll(&fds, 2, -1)
                if n < 0 {
                    if errno == EINTR { continue }
                    break
                }
                if fds[1].revents != 0 { break }
                if fds[0].revents != 0 {
                    let rc = mesh_nl_recvmsgs_default(sock.raw)
                    if rc < 0 && abs(rc) != MESH_NLE_AGAIN {
                        logger.warning(
                            "host address watch stopped",
                            metadata: ["error": "\(NetlinkError("recv", code: rc))"]
                        )
                        break
                    }
                }
            }
        }
    }

    fileprivate static func parse(_ msg: OpaquePointer) -> HostAddressEvent? {
        guard let header = mesh_nlmsg_hdr(msg) else { return nil }
        let type = Int32(header.pointee.nlmsg_type)
        let kind: HostAddressEvent.Kind
        switch type {
        case Int32(RTM_NEWADDR): kind = .added
        case Int32(RTM_DELADDR): kind = .removed
        default: return nil
        }
        guard let data = mesh_nlmsg_data(header) else { return nil }
        let ifa = data.assumingMemoryBound(to: ifaddrmsg.self).pointee
        let headerLength = Int32(MemoryLayout<ifaddrmsg>.size)
        let attribute =
            mesh_nlmsg_find_attr(header, headerLength, Int32(IFA_LOCAL))
            ?? mesh_nlmsg_find_attr(header, headerLength, Int32(IFA_ADDRESS))
        guard let attribute, let payload = mesh_nla_data(attribute) else { return nil }
        let bytes = UnsafeRawBufferPointer(start: payload, count: Int(mesh_nla_len(attribute)))
        guard let address = IPAddress(bytes: bytes) else { return nil }
        return HostAddressEvent(
            kind: kind,
            address: address,
            prefixLength: Int(ifa.ifa_prefixlen),
            interfaceIndex: Int32(bitPattern: ifa.ifa_index)
        )
    }
}

extension MeshInterface {
    /// Every address of the namespace, as `added` events.
    static func addresses(sock: NetlinkSocket) throws(NetlinkError) -> [HostAddressEvent] {
        var cache: OpaquePointer?
        let rc = mesh_rtnl_addr_alloc_cache(sock.raw, &cache)
        guard rc == 0, let cache else { throw NetlinkError("list addresses", code: rc) }
        defer { mesh_nl_cache_free(cache) }
        var result: [HostAddressEvent] = []
        var object = mesh_nl_cache_get_first(cache)
        while let obj = object {
            let addr = obj
            if let local = mesh_rtnl_addr_get_local(addr), let ip = IPAddress(netlink: local) {
                result.append(
                    HostAddressEvent(
                        kind: .added,
                        address: ip,
                        prefixLength: Int(mesh_rtnl_addr_get_prefixlen(addr)),
                        interfaceIndex: mesh_rtnl_addr_get_ifindex(addr)
                    )
                )
            }
            object = mesh_nl_cache_get_next(obj)
        }
        return result
    }
}
