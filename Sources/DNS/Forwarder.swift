import Logging
import MeshCore
import NIOCore
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Sends questions to the upstream resolvers and caches their answers.
///
/// All state lives on one event loop (``eventLoop``): callers on other loops hop there. Each upstream
/// query goes out on a fresh UDP socket connected to that upstream, so the kernel picks a random
/// source port and the local address that faces the upstream, and drops datagrams from any other
/// address or port. The query carries a random ID and, unless turned off, the question name in
/// randomised case (DNS 0x20); a response is only accepted when it comes from the upstream's exact
/// address and port with the same ID and the same question, byte for byte (so the same case).
/// Anything else is dropped and counted in `dns_upstream_mismatched_responses_total`. After a
/// timeout (or SERVFAIL/REFUSED) the next upstream is tried; a truncated UDP answer is fetched again
/// over TCP, with the same checks. Identical questions in flight share one upstream query.
final class DNSForwarder: Sendable {
    let eventLoop: any EventLoop
    private let state: NIOLoopBoundBox<ForwarderState>
    private let logger: Logger
    private let metrics: DNSMetrics

    init(
        configuration: DNSForwardingConfiguration,
        upstreams: [SocketAddress],
        eventLoop: any EventLoop,
        logger: Logger,
        metrics: DNSMetrics
    ) {
        self.eventLoop = eventLoop
        self.logger = logger
        self.metrics = metrics
        self.state = NIOLoopBoundBox.makeBoxSendingValue(
            ForwarderState(configuration: configuration, upstreams: upstreams),
            eventLoop: eventLoop
        )
    }

    /// Nothing to open up front: every upstream query has a socket of its own.
    func start() async throws {}

    /// Removes upstreams that are our own listening addresses (never forward to ourselves).
    func exclude(_ own: [SocketAddress]) async throws {
        let removed = try await self.eventLoop.submit { () -> [SocketAddress] in
            let s = self.state.value
            let before = s.upstreams
            s.upstreams = before.filter { up in !own.contains { isSameEndpoint(up, $0) } }
            return before.filter { !s.upstreams.contains($0) }
        }.get()
        for r in removed {
            self.logger.warning("dns: upstream is our own listening address, skipped", metadata: ["upstream": "\(r)"])
        }
    }

    func shutdown() async {
        let channels = try? await self.eventLoop.submit { () -> [any Channel] in
            let s = self.state.value
            s.closed = true
            for (_, p) in s.pending { p.timeout?.cancel() }
            let waiting = s.pending.values.map(\.key)
            let open = s.pending.values.compactMap(\.channel)
            s.pending.removeAll()
            for key in waiting { s.complete(key, nil) }
            return open
        }.get()
        for c in channels ?? [] { try? await c.close() }
    }

    /// Resolves a question upstream (or from the cache). Succeeds with nil when every upstream failed.
    func resolve(_ question: DNSQuestion) -> EventLoopFuture<DNSMessage?> {
        if self.eventLoop.inEventLoop {
            return self.resolveOnLoop(question)
        }
        return self.eventLoop.flatSubmit { self.resolveOnLoop(question) }
    }

    /// Like ``resolve(_:)``, and also where the answer came from: the cache (with its seconds left) when it
    /// was there before asking, otherwise the upstream that answered.
    func resolveExplained(_ question: DNSQuestion) -> EventLoopFuture<(DNSMessage?, ForwardedSource)> {
        self.eventLoop.flatSubmit {
            let key = DNSCacheKey(question)
            if let cached = self.state.value.cache.provenance(key, now: self.state.value.configuration.now()) {
                return self.resolveOnLoop(question).map {
                    ($0, .cache(secondsLeft: cached.secondsLeft, upstream: cached.upstream))
                }
            }
            return self.resolveOnLoop(question).map { message in
                let answered = self.state.value.cache.provenance(key, now: self.state.value.configuration.now())?
                    .upstream
                return (message, message == nil ? .failed : .upstream(answered))
            }
        }
    }

    /// The local addresses of the upstream sockets open right now (for tests).
    func openSocketAddresses() -> EventLoopFuture<[SocketAddress]> {
        self.eventLoop.submit { self.state.value.pending.values.compactMap { $0.channel?.localAddress } }
    }

    private func resolveOnLoop(_ question: DNSQuestion) -> EventLoopFuture<DNSMessage?> {
        let s = self.state.value
        let key = DNSCacheKey(question)
        if let hit = s.cache.lookup(key, now: s.configuration.now()) {
            self.metrics.cacheHits.increment()
            return self.eventLoop.makeSucceededFuture(hit)
        }
        self.metrics.cacheMisses.increment()
        if s.waiters[key] != nil {
            let promise = self.eventLoop.makePromise(of: DNSMessage?.self)
            s.waiters[key]!.append(promise)
            return promise.futureResult
        }
        guard !s.closed, !s.upstreams.isEmpty, s.pending.count < s.configuration.maxUpstreamQueries else {
            self.metrics.upstreamFailures.increment()
            return self.eventLoop.makeSucceededFuture(nil)
        }
        let promise = self.eventLoop.makePromise(of: DNSMessage?.self)
        s.waiters[key] = [promise]
        let start = s.nextStart
        s.nextStart = (s.nextStart + 1) % s.upstreams.count
        self.send(key: key, question: question, attempt: 0, start: start)
        return promise.futureResult
    }

    /// Sends attempt `attempt` of a question on a socket of its own.
    private func send(key: DNSCacheKey, question: DNSQuestion, attempt: Int, start: Int) {
        let s = self.state.value
        let total = s.upstreams.count * max(1, s.configuration.attempts)
        guard !s.closed, attempt < total, !s.upstreams.isEmpty else {
            self.metrics.upstreamFailures.increment()
            s.complete(key, nil)
            return
        }
        let upstream = s.upstreams[(start + attempt) % s.upstreams.count]
        let id = UInt16.random(in: 0...UInt16.max)
        let sent = DNSQuestion(
            name: s.configuration.caseRandomization ? randomisedCase(question.name) : question.name,
            type: question.type,
            qclass: question.qclass
        )
        let query = DNSMessage(
            header: DNSHeader(id: id, recursionDesired: true),
            questions: [sent],
            edns: DNSEDNS(udpPayloadSize: 1232)
        )
        guard let bytes = try? query.encode() else {
            s.complete(key, nil)
            return
        }
        let token = s.nextToken
        s.nextToken &+= 1
        let timeout = self.eventLoop.scheduleTask(in: s.configuration.timeout) {
            guard let p = self.finish(token) else { return }
            self.metrics.upstreamTimeouts.increment()
            self.send(key: p.key, question: p.question, attempt: p.attempt + 1, start: p.start)
        }
        s.pending[token] = PendingQuery(
            key: key,
            question: question,
            sent: sent,
            id: id,
            upstream: upstream,
            attempt: attempt,
            start: start,
            timeout: timeout
        )
        self.metrics.forwarded.increment()
        // connect(): the kernel binds a random port on the address that routes to the upstream.
        DatagramBootstrap(group: self.eventLoop)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(UpstreamUDPHandler(forwarder: self, token: token))
                }
            }
            .connect(to: upstream)
            .whenComplete { result in
                let s = self.state.value
                switch result {
                case .success(let channel):
                    guard s.pending[token] != nil else {
                        // Timed out or shut down while connecting.
                        channel.close(promise: nil)
                        return
                    }
                    s.pending[token]!.channel = channel
                    channel.writeAndFlush(channel.allocator.buffer(bytes: bytes), promise: nil)
                case .failure(let error):
                    guard let p = self.finish(token) else { return }
                    self.logger.debug(
                        "dns: cannot open a socket to the upstream",
                        metadata: ["upstream": "\(upstream)", "error": "\(error)"]
                    )
                    self.send(key: p.key, question: p.question, attempt: p.attempt + 1, start: p.start)
                }
            }
    }

    /// Ends an upstream query: forgets it, cancels its timeout and closes its socket.
    private func finish(_ token: Int) -> PendingQuery? {
        guard let p = self.state.value.pending.removeValue(forKey: token) else { return nil }
        p.timeout?.cancel()
        p.channel?.close(promise: nil)
        return p
    }

    /// A datagram on the socket of upstream query `token` (on the loop).
    func receive(token: Int, _ envelope: AddressedEnvelope<ByteBuffer>) {
        let s = self.state.value
        guard let p = s.pending[token], let message = try? DNSMessage.decode(envelope.data.readableBytesView) else {
            self.metrics.upstreamMismatched.increment()
            return
        }
        guard isExactEndpoint(p.upstream, envelope.remoteAddress), Self.answers(message, id: p.id, p.sent) else {
            // Not the answer to what we asked (late, forged or garbage): drop it, keep waiting.
            self.metrics.upstreamMismatched.increment()
            if s.configuration.caseRandomization, !s.warnedAboutCase, message.questions.count == 1,
                message.header.id == p.id, message.questions[0].name != p.sent.name,
                message.questions[0].name.equalsIgnoringCase(p.sent.name)
            {
                s.warnedAboutCase = true
                self.logger.warning(
                    "dns: an answer's question came back in another case than sent (0x20) and was dropped; if this upstream does not keep the case of questions, set dnsCaseRandomization: false",
                    metadata: ["upstream": "\(p.upstream)"]
                )
            }
            return
        }
        _ = self.finish(token)
        if message.header.truncated {
            self.resolveOverTCP(p)
            return
        }
        self.accept(message, for: p)
    }

    /// Whether `m` is a response with `id` to exactly `question` (name bytes, type and class).
    static func answers(_ m: DNSMessage, id: UInt16, _ question: DNSQuestion) -> Bool {
        m.header.isResponse && m.header.id == id && m.questions.count == 1
            && m.questions[0].name.wire == question.name.wire && m.questions[0].type == question.type
            && m.questions[0].qclass == question.qclass
    }

    private func accept(_ message: DNSMessage, for p: PendingQuery) {
        let s = self.state.value
        switch message.rcode {
        case .servFail, .refused, .notImp, .formErr:
            self.send(key: p.key, question: p.question, attempt: p.attempt + 1, start: p.start)
        default:
            // Back to the case the question was asked in (0x20 randomised it on the way out), and
            // no TTL above the maximum.
            let m = DNSCache.capping(restoringCase(message, of: p.question.name), at: s.configuration.maxCacheTTL)
            s.cache.insert(p.key, m, now: s.configuration.now(), from: p.upstream)
            s.complete(p.key, m)
        }
    }

    private func resolveOverTCP(_ p: PendingQuery) {
        let s = self.state.value
        let timeout = s.configuration.timeout
        let id = UInt16.random(in: 0...UInt16.max)
        let query = DNSMessage(header: DNSHeader(id: id, recursionDesired: true), questions: [p.sent])
        guard let bytes = try? query.encode() else {
            self.send(key: p.key, question: p.question, attempt: p.attempt + 1, start: p.start)
            return
        }
        let promise = self.eventLoop.makePromise(of: ByteBuffer.self)
        ClientBootstrap(group: self.eventLoop)
            .connectTimeout(timeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(DNSTCPFrameDecoder()))
                    try ch.pipeline.syncOperations.addHandler(OneResponseHandler(promise: promise))
                }
            }
            .connect(to: p.upstream)
            .whenComplete { result in
                switch result {
                case .success(let ch):
                    var out = ch.allocator.buffer(capacity: bytes.count + 2)
                    out.writeInteger(UInt16(bytes.count))
                    out.writeBytes(bytes)
                    ch.writeAndFlush(out, promise: nil)
                    let task = ch.eventLoop.scheduleTask(in: timeout) {
                        promise.fail(ChannelError.connectTimeout(timeout))
                    }
                    promise.futureResult.whenComplete { _ in
                        task.cancel()
                        ch.close(promise: nil)
                    }
                case .failure(let error):
                    promise.fail(error)
                }
            }
        promise.futureResult.hop(to: self.eventLoop).whenComplete { result in
            if case .success(let buffer) = result, let m = try? DNSMessage.decode(buffer.readableBytesView),
                Self.answers(m, id: id, p.sent)
            {
                self.accept(m, for: p)
            } else {
                if case .success = result { self.metrics.upstreamMismatched.increment() }
                self.metrics.upstreamTimeouts.increment()
                self.send(key: p.key, question: p.question, attempt: p.attempt + 1, start: p.start)
            }
        }
    }
}

/// The name with each ASCII letter's case chosen at random (DNS 0x20, draft-vixie-dnsext-dns0x20):
/// an off-path forger must also guess the case of every letter. Length bytes are at most 63, below
/// `A`, so only label bytes change.
func randomisedCase(_ name: DNSName) -> DNSName {
    var wire = name.wire
    var bits = UInt64.random(in: 0...UInt64.max)
    var left = 64
    for i in wire.indices where (wire[i] | 0x20) &- 0x61 < 26 {
        if left == 0 {
            bits = UInt64.random(in: 0...UInt64.max)
            left = 64
        }
        wire[i] = bits & 1 == 1 ? wire[i] & ~0x20 : wire[i] | 0x20
        bits >>= 1
        left -= 1
    }
    return DNSName(uncheckedWire: wire)
}

/// `m` with every record owned by `name` (in any case) owned by `name` as given.
func restoringCase(_ m: DNSMessage, of name: DNSName) -> DNSMessage {
    var m = m
    for i in m.questions.indices where m.questions[i].name.equalsIgnoringCase(name) { m.questions[i].name = name }
    for i in m.answers.indices where m.answers[i].name.equalsIgnoringCase(name) { m.answers[i].name = name }
    for i in m.authorities.indices where m.authorities[i].name.equalsIgnoringCase(name) {
        m.authorities[i].name = name
    }
    for i in m.additionals.indices where m.additionals[i].name.equalsIgnoringCase(name) {
        m.additionals[i].name = name
    }
    return m
}

/// One upstream query in flight: its own socket, ID and (case-randomised) question.
struct PendingQuery {
    var key: DNSCacheKey
    /// The question as asked of us.
    var question: DNSQuestion
    /// The question as sent upstream (0x20 case); the answer must echo it byte for byte.
    var sent: DNSQuestion
    var id: UInt16
    var upstream: SocketAddress
    var attempt: Int
    var start: Int
    var timeout: Scheduled<Void>?
    /// The connected UDP socket, once open.
    var channel: (any Channel)? = nil
}

/// Where a forwarded answer came from.
enum ForwardedSource: Sendable {
    case cache(secondsLeft: Int, upstream: SocketAddress?)
    /// Asked now; the upstream that answered when the answer could be cached.
    case upstream(SocketAddress?)
    /// Every upstream failed (the client gets SERVFAIL).
    case failed
}

/// The forwarder's mutable state; only touched on the forwarder's event loop.
final class ForwarderState {
    let configuration: DNSForwardingConfiguration
    var upstreams: [SocketAddress]
    /// Upstream queries in flight, by a token of their own (IDs alone may repeat across sockets).
    var pending: [Int: PendingQuery] = [:]
    var nextToken = 0
    var waiters: [DNSCacheKey: [EventLoopPromise<DNSMessage?>]] = [:]
    let cache: DNSCache
    var nextStart = 0
    var closed = false
    var warnedAboutCase = false

    init(configuration: DNSForwardingConfiguration, upstreams: [SocketAddress]) {
        self.configuration = configuration
        self.upstreams = upstreams
        self.cache = DNSCache(capacity: configuration.cacheCapacity, maxTTL: configuration.maxCacheTTL)
    }

    func complete(_ key: DNSCacheKey, _ message: DNSMessage?) {
        guard let ws = self.waiters.removeValue(forKey: key) else { return }
        for w in ws { w.succeed(message) }
    }
}

/// Same IP and port (a wildcard listener matches any loopback address on its port).
func isSameEndpoint(_ a: SocketAddress, _ b: SocketAddress) -> Bool {
    guard a.port == b.port, let ia = a.ipAddress, let ib = b.ipAddress,
        let pa = IPAddress(ia), let pb = IPAddress(ib)
    else { return false }
    if pa == pb { return true }
    let wildcard: (IPAddress) -> Bool = { $0 == .v4(0) || $0 == .v6(0, 0) }
    return (wildcard(pa) && pb.isLoopback) || (wildcard(pb) && pa.isLoopback)
}

/// Exactly the same IP and port: where an upstream's answer must come from.
func isExactEndpoint(_ a: SocketAddress, _ b: SocketAddress) -> Bool {
    guard a.port == b.port, let ia = a.ipAddress, let ib = b.ipAddress, let pa = IPAddress(ia) else { return false }
    return pa == IPAddress(ib)
}

/// Hands the datagrams of one upstream query's socket to the forwarder.
private final class UpstreamUDPHandler: ChannelInboundHandler {
    typealias InboundIn = AddressedEnvelope<ByteBuffer>
    let forwarder: DNSForwarder
    let token: Int

    init(forwarder: DNSForwarder, token: Int) {
        self.forwarder = forwarder
        self.token = token
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.forwarder.receive(token: self.token, Self.unwrapInboundIn(data))
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // ICMP port unreachable and the like surface here; the timeout moves on to the next upstream.
    }
}

/// Completes a promise with the first framed message of a TCP connection.
private final class OneResponseHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<ByteBuffer>

    init(promise: EventLoopPromise<ByteBuffer>) { self.promise = promise }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        self.promise.succeed(Self.unwrapInboundIn(data))
    }

    func channelInactive(context: ChannelHandlerContext) {
        self.promise.fail(ChannelError.eof)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        self.promise.fail(error)
        context.close(promise: nil)
    }
}

/// Splits a TCP byte stream into DNS messages (RFC 1035 §4.2.2: a 2-byte length before each).
struct DNSTCPFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ByteBuffer

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self),
            buffer.readableBytes >= 2 + Int(length)
        else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 2)
        let message = buffer.readSlice(length: Int(length))!
        context.fireChannelRead(Self.wrapInboundOut(message))
        return .continue
    }

    mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws
        -> DecodingState
    {
        while try self.decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}
