import Logging
import MeshCore
import NIOCore
import NIOPosix
import Relay
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The agent's direct paths through NATs: its NAT discovery (from the link port, against the relays'
/// STUN servers in the table), published as its Node's `status.candidates`, and the punch coordinator
/// that upgrades relayed links (`Relay/Punch`). A `Service`: discovery runs until shutdown, again at once
/// when the host's addresses change (netlink, `HostAddressWatcher`) or the relays' STUN endpoints do.
final class DirectPaths: ServiceLifecycle.Service, Sendable {
    typealias HostAddressList = @Sendable () -> [IPAddress]

    let discovery: NATDiscoveryService
    let coordinator: PunchCoordinator
    let current: CurrentTable
    let nodeName: String
    /// The addresses the candidates list as this host's own: the configured `nodeAddresses`, or the
    /// host's (as the Node advertises them), read when a discovery runs.
    let hostAddresses: HostAddressList
    /// The mesh interface: its addresses (the VIPs) are none of the host's own, so its events are skipped.
    let ignoredInterface: String?
    let logger: Logger

    init(
        links: LinkManager,
        linkPort: Int,
        nodeName: String,
        current: CurrentTable,
        configuration: PunchConfiguration,
        hostAddresses: @escaping HostAddressList,
        ignoredInterface: String? = nil,
        logger: Logger
    ) {
        self.current = current
        self.nodeName = nodeName
        self.hostAddresses = hostAddresses
        self.ignoredInterface = ignoredInterface
        self.logger = logger
        self.discovery = NATDiscoveryService(
            client: STUNClient(group: links.group),
            localPort: linkPort,
            logger: logger,
            servers: { PeerDirectory.stunServers(in: current.value) },
            localAddresses: hostAddresses
        )
        self.coordinator = PunchCoordinator(
            links: links,
            discovery: self.discovery,
            configuration: configuration,
            logger: logger
        )
        self.coordinator.install()
    }

    /// The Node's `status.candidates` (nil before the first discovery).
    var candidates: NodeCandidates? { self.discovery.candidates }

    func run() async throws {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.discovery.run() }
            group.addTask { await self.watchHostAddresses() }
            group.addTask {
                // The relays' STUN endpoints changed: discover again.
                var seen = PeerDirectory.stunServers(in: self.current.value).map { "\($0)" }
                while !Task.isCancelled {
                    do { try await Task.sleep(for: .seconds(1)) } catch { return }
                    let now = PeerDirectory.stunServers(in: self.current.value).map { "\($0)" }
                    if now != seen {
                        seen = now
                        self.discovery.refresh()
                    }
                }
            }
            try? await gracefulShutdown()
            group.cancelAll()
        }
    }

    /// The host's addresses changed (an address added to or removed from an interface, over netlink):
    /// discover again, so the candidates (and the Node's `status.candidates`, which the node agent
    /// reports as soon as they move) follow within about a second. Events that leave the advertised list
    /// as it was (link-local addresses) do not. Without netlink (not Linux, or no permission), the list is
    /// compared every 5 s instead.
    ///
    /// The mesh interface's own events (its VIPs) are skipped before anything is read, and a burst of events
    /// (an interface coming up with its addresses) is one comparison after it settles (`settle`): each
    /// comparison lists every address of the host, and an agent that puts 10,000 VIPs on the mesh interface
    /// at start-up once compared 10,000 times a list of 10,000 (77 s of CPU before every route listened).
    func watchHostAddresses(settle: Duration = .milliseconds(250)) async {
        var seen = Set(self.hostAddresses())
        let check = { @Sendable (seen: inout Set<IPAddress>) in
            let now = Set(self.hostAddresses())
            if now != seen {
                self.logger.info(
                    "host addresses changed: NAT discovery again",
                    metadata: [
                        "added": "\(now.subtracting(seen).map { "\($0)" }.sorted())",
                        "removed": "\(seen.subtracting(now).map { "\($0)" }.sorted())",
                    ]
                )
                seen = now
                self.discovery.refresh()
            }
        }
        let events: AsyncStream<HostAddressEvent>
        do {
            events = try HostAddressWatcher.events(logger: self.logger)
        } catch {
            self.logger.notice("host address watch unavailable (\(error)): the addresses are compared every 5 s")
            while !Task.isCancelled {
                do { try await Task.sleep(for: .seconds(5)) } catch { return }
                check(&seen)
            }
            return
        }
        let ignored = self.ignoredInterface
        let box = Mutex(seen)
        await Self.followBursts(
            of: events,
            ignoring: { event in
                guard let ignored else { return false }
                return event.interfaceIndex == Int32(bitPattern: if_nametoindex(ignored))
            },
            settle: { try? await Task.sleep(for: settle) },
            changed: { box.withLock { check(&$0) } }
        )
    }

    /// Calls `changed` once per burst of `events` that `ignoring` does not skip: after the first of a burst,
    /// `settle` runs (a short sleep) while the rest are read, then one call covers them all; when the events
    /// end, one more call covers any that came after the last. `ignoring` sees every event, in order.
    static func followBursts(
        of events: AsyncStream<HostAddressEvent>,
        ignoring: @escaping @Sendable (HostAddressEvent) -> Bool,
        settle: @escaping @Sendable () async -> Void,
        changed: @escaping @Sendable () async -> Void
    ) async {
        let wake = AsyncWakeup()
        // Events not yet covered by a call.
        let pending = PendingEvents()
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                for await event in events where !ignoring(event) {
                    pending.count.add(1, ordering: .sequentiallyConsistent)
                    wake.signal()
                }
                wake.cancel()
            }
            group.addTask {
                while await wake.wait() {
                    await settle()
                    if pending.count.exchange(0, ordering: .sequentiallyConsistent) > 0 { await changed() }
                }
                if pending.count.exchange(0, ordering: .sequentiallyConsistent) > 0 { await changed() }
            }
        }
    }
}

/// `followBursts`' count of events not yet covered, shared by its reader and its comparer.
private final class PendingEvents: Sendable {
    let count = Atomic<Int>(0)
}

extension PeerDirectory {
    /// The STUN endpoints of the Ready relays in the table (each relay's `stunAddresses`), at most four,
    /// spread over the relays first (two relays, or two ports of one, tell the mapping kinds apart).
    static func stunServers(in snapshot: ServiceSnapshot) -> [SocketAddress] {
        let relays = Self.relays(in: snapshot, preferred: nil)
        let lists = relays.map { r in
            (r.spec.stunAddresses ?? []).compactMap { text -> SocketAddress? in
                guard let (host, port) = Self.splitHostPort(text) else { return nil }
                return try? SocketAddress(ipAddress: host, port: port)
            }
        }
        var out: [SocketAddress] = []
        var i = 0
        while out.count < 4, lists.contains(where: { $0.count > i }) {
            for l in lists where l.count > i && out.count < 4 { out.append(l[i]) }
            i += 1
        }
        return out
    }

    /// `IP:PORT` or `[IPv6]:PORT`.
    static func splitHostPort(_ text: String) -> (String, Int)? {
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            let host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":"), let port = Int(rest.dropFirst()) else { return nil }
            return (host, port)
        }
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return nil }
        return (String(text[..<colon]), port)
    }
}
