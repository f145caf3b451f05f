import CNetlink
import Logging
import MeshCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The mesh link (`mesh0`, a dummy link) holding the agent's DNS address and every service VIP, so that listeners bind
/// VIP:port directly and local apps reach VIPs without any NAT rule. Created over netlink (libnl-route-3),
/// reused when it already exists (an agent restart), its addresses reconciled to the wanted set, and deleted
/// by `destroy()`. Needs CAP_NET_ADMIN: without it `open` throws a `NetlinkError` whose
/// `isPermissionDenied` is true, and the data plane falls back to loopback mode.
public final class MeshInterface: Sendable {
    public let name: String
    /// The kernel's interface index.
    public let index: Int32
    /// The link kind: `dummy`, or `bridge` (a bridge without ports behaves the same for local addresses) on
    /// kernels built without the dummy driver.
    public let kind: String
    private let socket: Mutex<NetlinkSocket>
    private let logger: Logger

    private init(name: String, index: Int32, kind: String, socket: consuming sending NetlinkSocket, logger: Logger) {
        self.name = name
        self.index = index
        self.kind = kind
        self.socket = Mutex(socket)
        self.logger = logger
    }

    /// Creates the dummy link `name` (or reuses an existing one) and brings it up.
    public static func open(name: String = "mesh0", logger: Logger) throws(NetlinkError) -> MeshInterface {
        let sock = try NetlinkSocket()
        let (index, kind, created) = try Self.ensureLink(sock, name, logger: logger)
        logger.info(
            "\(created ? "created" : "reusing") mesh interface",
            metadata: ["interface": "\(name)", "index": "\(index)", "kind": "\(kind)"]
        )
        return MeshInterface(name: name, index: index, kind: kind, socket: sock, logger: logger)
    }

    /// Link kinds this code creates and is willing to reuse, in order of preference.
    static let kinds = ["dummy", "bridge"]

    /// Finds or creates the link and sets it up; returns its index, kind and whether it was created.
    private static func ensureLink(
        _ sock: NetlinkSocket,
        _ name: String,
        logger: Logger
    ) throws(NetlinkError) -> (Int32, String, Bool) {
        var created = false
        var link = try Self.lookup(sock, name)
        if link == nil {
            for kind in Self.kinds {
                let rc = try Self.create(sock, name, kind: kind)
                if rc < 0 && abs(rc) == MESH_NLE_OPNOTSUPP && kind != Self.kinds.last {
                    logger.notice(
                        "kernel has no \(kind) links, trying the next kind",
                        metadata: ["interface": "\(name)"]
                    )
                    continue
                }
                if rc < 0 && abs(rc) != MESH_NLE_EXIST { throw NetlinkError("create \(kind) link \(name)", code: rc) }
                created = rc == 0
                break
            }
            link = try Self.lookup(sock, name)
        }
        guard let link else { throw NetlinkError("find link \(name)", code: MESH_NLE_OBJ_NOTFOUND) }
        defer { mesh_rtnl_link_put(link) }
        let kind = mesh_rtnl_link_get_type(link).map { String(cString: $0) } ?? "?"
        guard Self.kinds.contains(kind) else {
            throw NetlinkError("link \(name) exists with kind \(kind), not one of \(Self.kinds)", code: MESH_NLE_EXIST)
        }
        let index = mesh_rtnl_link_get_ifindex(link)
        if mesh_rtnl_link_get_flags(link) & UInt32(Self.iffUp) == 0 {
            guard let change = mesh_rtnl_link_alloc() else {
                throw NetlinkError("rtnl_link_alloc", code: MESH_NLE_NOMEM)
            }
            defer { mesh_rtnl_link_put(change) }
            mesh_rtnl_link_set_flags(change, UInt32(Self.iffUp))
            let rc = mesh_rtnl_link_change(sock.raw, link, change, 0)
            guard rc == 0 else { throw NetlinkError("set \(name) up", code: rc) }
        }
        return (index, kind, created)
    }

    /// RTM_NEWLINK for a link of `kind`, up; returns libnl's code.
    private static func create(_ sock: NetlinkSocket, _ name: String, kind: String) throws(NetlinkError) -> Int32 {
        guard let newLink = mesh_rtnl_link_alloc() else { throw NetlinkError("rtnl_link_alloc", code: MESH_NLE_NOMEM) }
        defer { mesh_rtnl_link_put(newLink) }
        mesh_rtnl_link_set_name(newLink, name)
        let rc0 = mesh_rtnl_link_set_type(newLink, kind)
        guard rc0 == 0 else { throw NetlinkError("mesh_rtnl_link_set_type(\(kind))", code: rc0) }
        mesh_rtnl_link_set_flags(newLink, UInt32(Self.iffUp))
        return mesh_rtnl_link_add(sock.raw, newLink, NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The addresses on the link, without the IPv6 link-local one the kernel adds.
    public func addresses() throws(NetlinkError) -> Set<IPAddress> {
        try self.socket.withLock { sock throws(NetlinkError) in try Self.addresses(sock, index: self.index) }
    }

    /// Adds what is missing from `wanted` and removes what is on the link but not wanted (stale addresses
    /// from an earlier run included). Returns what changed.
    @discardableResult
    public func reconcile(
        _ wanted: Set<IPAddress>
    ) throws(NetlinkError) -> (added: Set<IPAddress>, removed: Set<IPAddress>) {
        try self.socket.withLock { sock throws(NetlinkError) in
            let present = try Self.addresses(sock, index: self.index)
            let toAdd = wanted.subtracting(present)
            let toRemove = present.subtracting(wanted)
            for address in toRemove.sorted() { try Self.change(sock, index: self.index, address, add: false) }
            for address in toAdd.sorted() { try Self.change(sock, index: self.index, address, add: true) }
            if !toAdd.isEmpty || !toRemove.isEmpty {
                self.logger.debug(
                    "mesh interface addresses",
                    metadata: [
                        "interface": "\(self.name)", "added": "\(toAdd.sorted())", "removed": "\(toRemove.sorted())",
                    ]
                )
            }
            return (toAdd, toRemove)
        }
    }

    public func add(_ address: IPAddress) throws(NetlinkError) {
        try self.socket.withLock { sock throws(NetlinkError) in
            try Self.change(sock, index: self.index, address, add: true)
        }
    }

    public func remove(_ address: IPAddress) throws(NetlinkError) {
        try self.socket.withLock { sock throws(NetlinkError) in
            try Self.change(sock, index: self.index, address, add: false)
        }
    }

    /// Deletes the link (and with it every address on it). Idempotent.
    public func destroy() throws(NetlinkError) {
        try self.socket.withLock { sock throws(NetlinkError) in
            guard let link = try Self.lookup(sock, self.name) else { return }
            defer { mesh_rtnl_link_put(link) }
            let rc = mesh_rtnl_link_delete(sock.raw, link)
            if rc < 0 && abs(rc) != MESH_NLE_OBJ_NOTFOUND && abs(rc) != MESH_NLE_NODEV {
                throw NetlinkError("delete link \(self.name)", code: rc)
            }
            self.logger.info("removed mesh interface", metadata: ["interface": "\(self.name)"])
        }
    }

    // MARK: libnl plumbing

    static let iffUp: Int32 = 0x1

    /// The link named `name`, with a reference the caller puts; nil when there is none.
    private static func lookup(_ sock: NetlinkSocket, _ name: String) throws(NetlinkError) -> OpaquePointer? {
        var link: OpaquePointer?
        let rc = mesh_rtnl_link_get_kernel(sock.raw, 0, name, &link)
        if rc == 0 { return link }
        if abs(rc) == MESH_NLE_OBJ_NOTFOUND || abs(rc) == MESH_NLE_NODEV { return nil }
        throw NetlinkError("get link \(name)", code: rc)
    }

    static func addresses(_ sock: NetlinkSocket, index: Int32?) throws(NetlinkError) -> Set<IPAddress> {
        var cache: OpaquePointer?
        let rc = mesh_rtnl_addr_alloc_cache(sock.raw, &cache)
        guard rc == 0, let cache else { throw NetlinkError("list addresses", code: rc) }
        defer { mesh_nl_cache_free(cache) }
        var result: Set<IPAddress> = []
        var object = mesh_nl_cache_get_first(cache)
        while let obj = object {
            let addr = obj
            if index == nil || mesh_rtnl_addr_get_ifindex(addr) == index!,
                let local = mesh_rtnl_addr_get_local(addr),
                let ip = IPAddress(netlink: local),
                !ip.isIPv6LinkLocal
            {
                result.insert(ip)
            }
            object = mesh_nl_cache_get_next(obj)
        }
        return result
    }

    private static func change(
        _ sock: NetlinkSocket,
        index: Int32,
        _ address: IPAddress,
        add: Bool
    ) throws(NetlinkError) {
        guard let addr = mesh_rtnl_addr_alloc() else { throw NetlinkError("rtnl_addr_alloc", code: MESH_NLE_NOMEM) }
        defer { mesh_rtnl_addr_put(addr) }
        let local = try NetlinkAddress(address)
        mesh_rtnl_addr_set_ifindex(addr, index)
        let rc0 = mesh_rtnl_addr_set_local(addr, local.raw)
        guard rc0 == 0 else { throw NetlinkError("rtnl_addr_set_local", code: rc0) }
        mesh_rtnl_addr_set_prefixlen(addr, Int32(address.bitWidth))
        if add {
            if address.isIPv6 { mesh_rtnl_addr_set_flags(addr, UInt32(IFA_F_NODAD)) }
            let rc = mesh_rtnl_addr_add(sock.raw, addr, 0)
            if rc < 0 && abs(rc) != MESH_NLE_EXIST { throw NetlinkError("add \(address)", code: rc) }
        } else {
            let rc = mesh_rtnl_addr_delete(sock.raw, addr, 0)
            if rc < 0 && abs(rc) != MESH_NLE_OBJ_NOTFOUND && abs(rc) != MESH_NLE_NOADDR {
                throw NetlinkError("remove \(address)", code: rc)
            }
        }
    }
}
