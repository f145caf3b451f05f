import CLinux
import Logging
import MeshNIO
import NIOCore
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The responder's UDP side: one socket, read and written in batches (`recvmmsg` / `sendmmsg`) by a
/// thread of its own that answers zone queries in place, with nothing allocated per query.
///
/// Why not a NIO `DatagramChannel`: per datagram NIO builds a `SocketAddress` (its text form too, through
/// `inet_ntop`), an `AddressedEnvelope` boxed in `NIOAny`, a `ByteBuffer` for the reply and a pending-write
/// record; callgrind counted ~11,000 instructions per query for that, against ~10,000 for unbound's whole
/// query (perf/dns/RESULTS.md). Here the peer's address stays the `sockaddr` the kernel wrote, and the
/// reply goes out from a preallocated slot next to it.
///
/// The thread blocks in `recvmmsg` (`MSG_WAITFORONE`: the first datagram waits, the rest of the batch is
/// what is queued), so an idle responder costs no wake-ups; ``stop()`` wakes it with `shutdown(2)`.
/// Queries for names outside the zone go to the forwarder on its event loop; their replies are sent from
/// there (`sendto` on the same socket, under the lock that guards closing it).
final class DNSUDPLoop: @unchecked Sendable {
    // @unchecked: the buffers and `state` are used by the loop thread only (and by the initialiser before
    // the thread starts); what other threads touch is `descriptor` (under its lock), `stopping` and
    // `started` (atomics) and `finished` (an event-loop promise).

    /// The bound address (the port chosen when 0 was asked for).
    let localAddress: SocketAddress
    /// Completed once the thread has stopped and the socket is closed.
    let finished: EventLoopPromise<Void>

    private let descriptor: Mutex<Int32?>
    private let fd: Int32
    private let stopping = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)
    private let batch: Int
    private let zones: DNSZoneStore
    private let policy: AnswerPolicy
    private let forwarder: DNSForwarder?
    private let metrics: DNSMetrics
    private let logger: Logger
    private var state = AnswerState()

    /// Bytes read per datagram; a longer one arrives cut (and is answered FORMERR if its header reads).
    static let querySlot = 4096
    private let replySlot: Int
    private let queries: UnsafeMutableRawPointer
    private let replies: UnsafeMutableRawPointer
    private let peers: UnsafeMutablePointer<sockaddr_storage>
    private let queryVectors: UnsafeMutablePointer<iovec>
    private let replyVectors: UnsafeMutablePointer<iovec>
    private let inbound: UnsafeMutablePointer<mesh_mmsghdr>
    private let outbound: UnsafeMutablePointer<mesh_mmsghdr>

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// Opens and binds the socket (on the calling thread, so in its network namespace). The thread starts
    /// with ``start()``.
    init(
        address: SocketAddress,
        batch: Int,
        zones: DNSZoneStore,
        policy: AnswerPolicy,
        forwarder: DNSForwarder?,
        metrics: DNSMetrics,
        logger: Logger,
        eventLoop: any EventLoop
    ) throws {
        let family: Int32
        switch address {
        case .v4: family = AF_INET
        case .v6: family = AF_INET6
        default: throw Failure(description: "dns: cannot listen on \(address): not an IP address")
        }
        let fd = socket(family, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw Failure(description: "dns: socket: errno \(errno)") }
        let rc = address.withSockAddr { bind(fd, $0, socklen_t($1)) }
        guard rc == 0 else {
            let code = errno
            close(fd)
            throw IOError(errnoCode: code, reason: "bind(\(address))")
        }
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let port = withUnsafeMutablePointer(to: &storage) { p -> Int in
            _ = p.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            return family == AF_INET
                ? p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { Int(UInt16(bigEndian: $0.pointee.sin_port)) }
                : p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                    Int(UInt16(bigEndian: $0.pointee.sin6_port))
                }
        }
        do {
            self.localAddress = try SocketAddress(ipAddress: address.ipAddress ?? "", port: port)
        } catch {
            close(fd)
            throw error
        }
        self.fd = fd
        self.descriptor = Mutex(fd)
        self.finished = eventLoop.makePromise(of: Void.self)
        self.batch = max(1, min(batch, 1024))
        self.zones = zones
        self.policy = policy
        self.forwarder = forwarder
        self.metrics = metrics
        self.logger = logger
        self.replySlot = max(512, policy.maxUDPSize)

        let n = self.batch
        self.queries = .allocate(byteCount: n * Self.querySlot, alignment: 16)
        self.replies = .allocate(byteCount: n * self.replySlot, alignment: 16)
        self.peers = .allocate(capacity: n)
        self.peers.initialize(repeating: sockaddr_storage(), count: n)
        self.queryVectors = .allocate(capacity: n)
        self.replyVectors = .allocate(capacity: n)
        self.inbound = .allocate(capacity: n)
        self.outbound = .allocate(capacity: n)
        for i in 0..<n {
            self.queryVectors[i] = iovec(iov_base: self.queries + i * Self.querySlot, iov_len: Self.querySlot)
            self.replyVectors[i] = iovec(iov_base: self.replies + i * self.replySlot, iov_len: 0)
            var m = mesh_mmsghdr()
            m.msg_hdr.msg_name = UnsafeMutableRawPointer(self.peers + i)
            m.msg_hdr.msg_namelen = socklen_t(MemoryLayout<sockaddr_storage>.size)
            m.msg_hdr.msg_iov = self.queryVectors + i
            m.msg_hdr.msg_iovlen = 1
            self.inbound[i] = m
            var o = mesh_mmsghdr()
            o.msg_hdr.msg_iov = self.replyVectors + i
            o.msg_hdr.msg_iovlen = 1
            self.outbound[i] = o
        }
    }

    deinit {
        self.queries.deallocate()
        self.replies.deallocate()
        self.peers.deinitialize(count: self.batch)
        self.peers.deallocate()
        self.queryVectors.deallocate()
        self.replyVectors.deallocate()
        self.inbound.deallocate()
        self.outbound.deallocate()
    }

    /// Starts the thread (once).
    func start() {
        guard !self.started.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if self.stopping.load(ordering: .acquiring) {
            self.closeSocket()
            return
        }
        DedicatedThread.start(name: "mesh-dns-udp") { self.run() }
    }

    /// Stops the thread and closes the socket; ``finished`` completes when both are done. Any thread.
    func stop() {
        guard !self.stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if self.started.load(ordering: .acquiring) {
            // Wakes the thread out of recvmmsg: it then reads 0 datagrams (Linux, also unconnected UDP).
            self.descriptor.withLock { fd in
                if let fd { _ = shutdown(fd, Int32(SHUT_RDWR)) }
            }
        } else if !self.started.exchange(true, ordering: .acquiringAndReleasing) {
            self.closeSocket()
        }
    }

    private func closeSocket() {
        self.descriptor.withLock { fd in
            if let open = fd { close(open) }
            fd = nil
        }
        self.finished.succeed(())
    }

    // MARK: loop thread

    private func run() {
        let fd = self.fd
        let n = self.batch
        let nameSize = socklen_t(MemoryLayout<sockaddr_storage>.size)
        while !self.stopping.load(ordering: .relaxed) {
            let got = mesh_recvmmsg(fd, self.inbound, UInt32(n), Int32(mesh_msg_waitforone))
            if got < 0 {
                let code = errno
                if code == EINTR || code == EAGAIN || code == ENOMEM || code == ENOBUFS { continue }
                if !self.stopping.load(ordering: .relaxed) {
                    self.logger.error("dns: udp receive failed; the listener stops", metadata: ["errno": "\(code)"])
                }
                break
            }
            if got == 0 { continue }  // shut down (stopping is set first) or nothing: check and go again
            self.answerBatch(Int(got))
            for i in 0..<Int(got) { self.inbound[i].msg_hdr.msg_namelen = nameSize }
        }
        self.closeSocket()
    }

    /// Answers the `count` datagrams just read and sends the replies in one `sendmmsg`.
    private func answerBatch(_ count: Int) {
        let zone = self.zones.zone
        let policy = self.policy
        // The buffers, out of the object for the batch (no exclusivity check per query).
        var state = AnswerState()
        swap(&state, &self.state)
        defer { swap(&state, &self.state) }
        var replies = 0
        var malformed = 0
        var fromZone = 0
        var truncated = 0
        var nxDomain = 0
        for i in 0..<count {
            let length = min(Int(self.inbound[i].msg_len), Self.querySlot)
            let query = UnsafeRawBufferPointer(start: self.queries + i * Self.querySlot, count: length)
            let disposition = Answerer.answer(query, zone: zone, overTCP: false, policy: policy, state: &state)
            if state.malformed { malformed += 1 }
            switch disposition {
            case .reply:
                let copied = state.response.withUnsafeBytes { r -> Bool in
                    guard r.count >= 12, r.count <= self.replySlot else { return false }
                    let slot = self.replies + replies * self.replySlot
                    slot.copyMemory(from: r.baseAddress!, byteCount: r.count)
                    if r[2] & 0x04 != 0 { fromZone += 1 }
                    if r[2] & 0x02 != 0 { truncated += 1 }
                    if r[3] & 0x0F == 3 { nxDomain += 1 }
                    self.replyVectors[replies].iov_len = r.count
                    return true
                }
                guard copied else { continue }
                self.outbound[replies].msg_hdr.msg_name = self.inbound[i].msg_hdr.msg_name
                self.outbound[replies].msg_hdr.msg_namelen = self.inbound[i].msg_hdr.msg_namelen
                replies += 1
            case .forward(let request):
                self.forward(request, to: UDPPeer(self.peers[i], length: self.inbound[i].msg_hdr.msg_namelen))
            case .drop:
                break
            }
        }
        // Counted before the replies leave, so a client that has its answer sees it counted.
        self.metrics.queriesUDP.increment(by: count)
        if malformed > 0 { self.metrics.malformed.increment(by: malformed) }
        if fromZone > 0 { self.metrics.answeredFromZone.increment(by: fromZone) }
        if truncated > 0 { self.metrics.truncated.increment(by: truncated) }
        if nxDomain > 0 { self.metrics.nxDomain.increment(by: nxDomain) }
        self.send(replies)
    }

    private func send(_ count: Int) {
        var sent = 0
        while sent < count {
            let r = mesh_sendmmsg(self.fd, self.outbound + sent, UInt32(count - sent), 0)
            if r > 0 {
                sent += Int(r)
                continue
            }
            let code = errno
            if r < 0 && code == EINTR { continue }
            // The first remaining reply failed (e.g. the peer's address is unreachable): skip it.
            self.logger.debug("dns: udp send failed", metadata: ["errno": "\(code)"])
            sent += 1
        }
    }

    private func forward(_ request: ForwardRequest, to peer: UDPPeer) {
        guard let forwarder = self.forwarder else { return }
        let policy = self.policy
        forwarder.resolve(request.upstreamQuestion).whenSuccess { result in
            let bytes = Answerer.composeForwarded(request, result: result, overTCP: false, policy: policy)
            guard !bytes.isEmpty else { return }
            self.sendReply(bytes, to: peer)
        }
    }

    /// Sends one reply from any thread (forwarded answers, on the forwarder's event loop).
    func sendReply(_ bytes: [UInt8], to peer: UDPPeer) {
        self.descriptor.withLock { fd in
            guard let fd else { return }
            var address = peer.storage
            _ = bytes.withUnsafeBytes { b in
                withUnsafePointer(to: &address) { p in
                    p.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        sendto(fd, b.baseAddress, b.count, Int32(MSG_DONTWAIT), $0, peer.length)
                    }
                }
            }
        }
    }
}

/// A client's address as the kernel wrote it.
struct UDPPeer: @unchecked Sendable {
    // @unchecked: plain bytes (sockaddr_storage is a C struct without pointers).
    var storage: sockaddr_storage
    var length: socklen_t

    init(_ storage: sockaddr_storage, length: socklen_t) {
        self.storage = storage
        self.length = length
    }
}
