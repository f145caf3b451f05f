import MeshCore

#if canImport(Glibc)
import Glibc

/// The host's addresses read over rtnetlink one interface at a time, so that an interface left out (the
/// mesh interface, which holds a VIP per service) costs nothing. getifaddrs(3) dumps every address of every
/// interface: with 10,000 VIPs on mesh0 each call made the kernel format 10,000 addresses, and NAT
/// discovery and the host-address watch call it every few seconds.
///
/// One dump of the links (a host has few), then one address dump per interface that is up, not loopback
/// and not left out, with `NETLINK_GET_STRICT_CHK` so that the kernel walks that interface alone (Linux
/// 4.20 and later). Nil when any step fails (no strict checking, no netlink): the caller falls back to
/// getifaddrs.
package enum LinkAddressDump {
    private static let rtmNewLink: UInt16 = 16
    private static let rtmGetLink: UInt16 = 18
    private static let rtmNewAddr: UInt16 = 20
    private static let rtmDelAddr: UInt16 = 21
    private static let rtmGetAddr: UInt16 = 22
    private static let nlmsgError: UInt16 = 2
    private static let nlmsgDone: UInt16 = 3
    private static let requestDump: UInt16 = 0x1 | 0x300  // NLM_F_REQUEST | NLM_F_DUMP
    private static let solNetlink: Int32 = 270
    private static let getStrictCheck: Int32 = 12
    private static let iflaName: UInt16 = 3
    private static let ifaAddress: UInt16 = 1
    private static let ifaLocal: UInt16 = 2

    /// One network interface from the link dump.
    struct Interface: Equatable {
        var index: Int32
        var name: String
        var flags: UInt32
    }

    /// Every address of the interfaces that are up, not loopback and not named in `excluded`.
    static func addresses(excluding excluded: Set<String>) -> [IPAddress]? {
        let fd = Self.routeSocket()
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var on: Int32 = 1
        guard setsockopt(fd, Self.solNetlink, Self.getStrictCheck, &on, socklen_t(MemoryLayout<Int32>.size)) == 0
        else { return nil }
        var sequence: UInt32 = 1
        var interfaces: [Interface] = []
        // struct ifinfomsg: 16 bytes, all zero (strict checking refuses anything else in a link dump).
        let linkRequest = [UInt8](repeating: 0, count: 16)
        guard
            Self.dump(
                fd,
                type: Self.rtmGetLink,
                body: linkRequest,
                sequence: sequence,
                each: { type, payload in
                    if type == Self.rtmNewLink, let i = Self.parseLink(payload) { interfaces.append(i) }
                }
            )
        else { return nil }
        var found: [IPAddress] = []
        for interface in interfaces {
            guard interface.flags & UInt32(IFF_UP) != 0, interface.flags & UInt32(IFF_LOOPBACK) == 0,
                !excluded.contains(interface.name)
            else { continue }
            for family in [UInt8(AF_INET), UInt8(AF_INET6)] {
                sequence &+= 1
                // struct ifaddrmsg: family, prefix length, flags, scope, then the interface index.
                var addressRequest: [UInt8] = [family, 0, 0, 0]
                withUnsafeBytes(of: UInt32(bitPattern: interface.index)) { addressRequest += $0 }
                let ok = Self.dump(fd, type: Self.rtmGetAddr, body: addressRequest, sequence: sequence) {
                    type,
                    payload in
                    guard type == Self.rtmNewAddr, let (index, address) = Self.parseAddress(payload),
                        index == interface.index
                    else { return }
                    found.append(address)
                }
                guard ok else { return nil }
            }
        }
        return found
    }

    /// One address of an interface, from an address dump or a change notification (RTM_NEWADDR: `added`,
    /// RTM_DELADDR: not).
    package struct AddressMessage: Equatable, Sendable {
        package var added: Bool
        package var interfaceIndex: Int32
        package var address: IPAddress
        package var prefixLength: Int

        package init(added: Bool, interfaceIndex: Int32, address: IPAddress, prefixLength: Int) {
            self.added = added
            self.interfaceIndex = interfaceIndex
            self.address = address
            self.prefixLength = prefixLength
        }
    }

    /// A `NETLINK_ROUTE` socket subscribed to address changes (RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR) with
    /// room for `receiveBuffer` bytes of notifications; on failure, the step and its errno.
    package static func addressChangeSocket(receiveBuffer: Int32) -> Result<Int32, AddressSocketFailure> {
        let fd = Self.routeSocket()
        guard fd >= 0 else { return .failure(AddressSocketFailure(operation: "open a netlink socket", code: errno)) }
        // struct sockaddr_nl: family, padding, port id (0: the kernel picks), multicast groups.
        var address = [UInt8](repeating: 0, count: 12)
        withUnsafeBytes(of: UInt16(AF_NETLINK)) { address.replaceSubrange(0..<2, with: $0) }
        withUnsafeBytes(of: UInt32(0x10 | 0x100)) { address.replaceSubrange(8..<12, with: $0) }
        let bound = address.withUnsafeBytes {
            bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
        }
        guard bound == 0 else {
            let code = errno
            close(fd)
            return .failure(AddressSocketFailure(operation: "subscribe to address changes", code: code))
        }
        var size = receiveBuffer
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        return .success(fd)
    }

    package struct AddressSocketFailure: Error, Sendable {
        package var operation: String
        package var code: Int32
    }

    /// Every address of every interface (one dump, no strict checking needed), as `added` messages; nil when
    /// the dump fails.
    package static func allAddresses() -> [AddressMessage]? {
        let fd = Self.routeSocket()
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var found: [AddressMessage] = []
        // struct ifaddrmsg, all zero: every family, every interface.
        let ok = Self.dump(fd, type: Self.rtmGetAddr, body: [UInt8](repeating: 0, count: 8), sequence: 1) {
            type,
            payload in
            if let message = Self.addressMessage(type, payload) { found.append(message) }
        }
        return ok ? found : nil
    }

    /// The address messages in one datagram read from a socket subscribed to address changes
    /// (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR), one or more per datagram, whatever their sequence number.
    /// Other messages are skipped; a message whose length runs past the datagram ends the walk.
    package static func addressMessages(_ data: UnsafeRawBufferPointer) -> [AddressMessage] {
        var found: [AddressMessage] = []
        _ = Self.walk(data, sequence: nil) { type, payload in
            if let message = Self.addressMessage(type, payload) { found.append(message) }
        }
        return found
    }

    /// An RTM_NEWADDR or RTM_DELADDR message's address; nil for other types and malformed payloads.
    static func addressMessage(_ type: UInt16, _ payload: UnsafeRawBufferPointer) -> AddressMessage? {
        guard type == Self.rtmNewAddr || type == Self.rtmDelAddr, let (index, address) = Self.parseAddress(payload)
        else { return nil }
        return AddressMessage(
            added: type == Self.rtmNewAddr,
            interfaceIndex: index,
            address: address,
            prefixLength: Int(payload[1])
        )
    }

    /// A `NETLINK_ROUTE` socket, or -1 (errno says why).
    private static func routeSocket() -> Int32 {
        socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    }

    /// Sends one dump request and hands each answer's type and payload to `each` until the dump ends.
    /// False on an error (an interface gone in between ends its dump with ENODEV: that is not one).
    private static func dump(
        _ fd: Int32,
        type: UInt16,
        body: [UInt8],
        sequence: UInt32,
        each: (UInt16, UnsafeRawBufferPointer) -> Void
    ) -> Bool {
        var request: [UInt8] = []
        withUnsafeBytes(of: UInt32(16 + body.count)) { request += $0 }
        withUnsafeBytes(of: type) { request += $0 }
        withUnsafeBytes(of: Self.requestDump) { request += $0 }
        withUnsafeBytes(of: sequence) { request += $0 }
        withUnsafeBytes(of: UInt32(0)) { request += $0 }
        request += body
        let sent = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        guard sent == request.count else { return false }
        // A dump message is at most 32 KiB (the kernel sizes it by the reader's buffer, up to that); twice that.
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return false }
            let outcome = buffer.withUnsafeBytes { raw -> Bool? in
                Self.walk(UnsafeRawBufferPointer(rebasing: raw[0..<n]), sequence: sequence, each: each)
            }
            if let outcome { return outcome }
        }
    }

    /// The messages in one datagram: true at the end of the dump, false at an error, nil for more to come.
    /// `sequence` nil: every message (change notifications carry the sequence number of whatever request
    /// caused them, another process's).
    static func walk(
        _ data: UnsafeRawBufferPointer,
        sequence: UInt32?,
        each: (UInt16, UnsafeRawBufferPointer) -> Void
    ) -> Bool? {
        var offset = 0
        while offset + 16 <= data.count {
            let length = Int(data.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
            let type = data.loadUnaligned(fromByteOffset: offset + 4, as: UInt16.self)
            let seq = data.loadUnaligned(fromByteOffset: offset + 8, as: UInt32.self)
            guard length >= 16, offset + length <= data.count else { return false }
            let payload = UnsafeRawBufferPointer(rebasing: data[(offset + 16)..<(offset + length)])
            offset += (length + 3) & ~3
            if let sequence, seq != sequence { continue }
            switch type {
            case Self.nlmsgDone: return true
            case Self.nlmsgError:
                guard payload.count >= 4 else { return false }
                let code = payload.loadUnaligned(as: Int32.self)
                return code == 0 || code == -ENODEV
            default: each(type, payload)
            }
        }
        return nil
    }

    /// struct ifinfomsg (16 bytes) and its IFLA_IFNAME attribute.
    static func parseLink(_ payload: UnsafeRawBufferPointer) -> Interface? {
        guard payload.count >= 16 else { return nil }
        let index = payload.loadUnaligned(fromByteOffset: 4, as: Int32.self)
        let flags = payload.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
        var name: String?
        Self.attributes(payload, from: 16) { type, value in
            guard type == Self.iflaName else { return }
            let bytes = value.prefix { $0 != 0 }
            name = String(decoding: bytes, as: UTF8.self)
        }
        guard let name else { return nil }
        return Interface(index: index, name: name, flags: flags)
    }

    /// struct ifaddrmsg (8 bytes) and its address: IFA_LOCAL for IPv4 (IFA_ADDRESS is the peer's on a
    /// point-to-point link), IFA_ADDRESS otherwise.
    static func parseAddress(_ payload: UnsafeRawBufferPointer) -> (Int32, IPAddress)? {
        guard payload.count >= 8 else { return nil }
        let family = payload[0]
        let index = payload.loadUnaligned(fromByteOffset: 4, as: Int32.self)
        var local: IPAddress?
        var address: IPAddress?
        Self.attributes(payload, from: 8) { type, value in
            let size = family == UInt8(AF_INET) ? 4 : 16
            guard value.count == size else { return }
            if type == Self.ifaLocal { local = IPAddress(bytes: value) }
            if type == Self.ifaAddress { address = IPAddress(bytes: value) }
        }
        guard let chosen = family == UInt8(AF_INET) ? (local ?? address) : address else { return nil }
        return (index, chosen)
    }

    /// Each `struct rtattr` (length, type, value; 4-byte aligned) from `start`.
    private static func attributes(
        _ payload: UnsafeRawBufferPointer,
        from start: Int,
        _ each: (UInt16, UnsafeRawBufferPointer) -> Void
    ) {
        var offset = start
        while offset + 4 <= payload.count {
            let length = Int(payload.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            let type = payload.loadUnaligned(fromByteOffset: offset + 2, as: UInt16.self)
            guard length >= 4, offset + length <= payload.count else { return }
            each(type & 0x3FFF, UnsafeRawBufferPointer(rebasing: payload[(offset + 4)..<(offset + length)]))
            offset += (length + 3) & ~3
        }
    }
}
#endif
