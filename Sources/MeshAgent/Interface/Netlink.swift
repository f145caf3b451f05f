import CNetlink
import MeshCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A libnl error, with the operation that failed.
public struct NetlinkError: Error, CustomStringConvertible, Sendable {
    /// The libnl error code (positive `NLE_*`).
    public var code: Int32
    public var operation: String
    /// Why libnl could not be loaded (dlerror's text), when that is the failure.
    public var loadFailure: String?

    init(_ operation: String, code: Int32) {
        self.operation = operation
        self.code = abs(code)
    }

    /// libnl-route-3 is loaded on first use (dlopen), not linked: an agent that never opens the mesh interface
    /// maps none of it. Throws when the library or one of its functions is missing.
    static func loadLibrary() throws(NetlinkError) {
        guard mesh_nl_load() != 0 else { return }
        var error = NetlinkError(
            "load libnl (the mesh interface needs the libnl-3-200 and libnl-route-3-200 packages)",
            code: MESH_NLE_FAILURE
        )
        error.loadFailure = mesh_nl_load_error().map { String(cString: $0) } ?? "unknown error"
        throw error
    }

    /// EPERM / EACCES from the kernel: the process lacks CAP_NET_ADMIN.
    public var isPermissionDenied: Bool { self.code == MESH_NLE_PERM || self.code == MESH_NLE_NOACCESS }

    public var description: String {
        if let loadFailure = self.loadFailure { return "\(self.operation): \(loadFailure)" }
        let message = mesh_nl_geterror(-self.code).map { String(cString: $0) } ?? "error \(self.code)"
        return "\(self.operation): \(message)"
    }
}

/// An owning handle of a libnl `nl_sock` connected to NETLINK_ROUTE. Not thread-safe by itself: its owners
/// keep it behind a mutex. The socket belongs to the network namespace of the thread that created it.
final class NetlinkSocket {
    let raw: OpaquePointer

    init() throws(NetlinkError) {
        try NetlinkError.loadLibrary()
        guard let sock = mesh_nl_socket_alloc() else { throw NetlinkError("nl_socket_alloc", code: MESH_NLE_NOMEM) }
        let rc = mesh_nl_connect(sock, NETLINK_ROUTE)
        guard rc == 0 else {
            mesh_nl_socket_free(sock)
            throw NetlinkError("nl_connect", code: rc)
        }
        self.raw = sock
    }

    deinit {
        mesh_nl_socket_free(self.raw)  // closes the socket too
    }

    var fileDescriptor: Int32 { mesh_nl_socket_get_fd(self.raw) }
}

/// An owning handle of a libnl `nl_addr`.
final class NetlinkAddress {
    let raw: OpaquePointer

    init(_ address: IPAddress) throws(NetlinkError) {
        var bytes = address.bytes
        let family = address.isIPv4 ? AF_INET : AF_INET6
        guard let a = mesh_nl_addr_build(family, &bytes, bytes.count) else {
            throw NetlinkError("nl_addr_build", code: MESH_NLE_NOMEM)
        }
        mesh_nl_addr_set_prefixlen(a, Int32(address.bitWidth))
        self.raw = a
    }

    deinit {
        mesh_nl_addr_put(self.raw)
    }
}

extension IPAddress {
    /// Reads a borrowed libnl `nl_addr` (IPv4 or IPv6 only).
    init?(netlink a: OpaquePointer) {
        let family = mesh_nl_addr_get_family(a)
        guard family == AF_INET || family == AF_INET6, let data = mesh_nl_addr_get_binary_addr(a) else { return nil }
        let length = Int(mesh_nl_addr_get_len(a))
        let bytes = UnsafeRawBufferPointer(start: data, count: length)
        self.init(bytes: bytes)
    }

    /// fe80::/10: the kernel puts one on every link that is up; never ours to manage.
    var isIPv6LinkLocal: Bool {
        if case .v6(let hi, _) = self { return hi >> 54 == 0x3fa }
        return false
    }
}
