import Logging
import NIOCore
import NIOPosix
import Synchronization

/// Splits a byte stream into MQTT packets (`MQTTCodec.decode`); a malformed packet closes the connection.
final class MQTTFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = MQTTPacket
    let maxPacketBytes: Int

    init(maxPacketBytes: Int = MQTTCodec.defaultMaxPacketBytes) {
        self.maxPacketBytes = maxPacketBytes
    }

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        // The fixed header first (at most 5 bytes), then copy exactly one packet.
        let head = Array(buffer.readableBytesView.prefix(5))
        var length = 0
        var multiplier = 1
        var headerBytes = 1
        var complete = false
        for b in head.dropFirst() {
            length += Int(b & 0x7F) * multiplier
            headerBytes += 1
            multiplier *= 128
            if b & 0x80 == 0 {
                complete = true
                break
            }
        }
        if !complete {
            if head.count == 5 { throw MQTTCodecError("remaining length longer than 4 bytes") }
            return .needMoreData
        }
        if length > self.maxPacketBytes {
            throw MQTTCodecError("packet of \(length) bytes is larger than the limit of \(self.maxPacketBytes)")
        }
        guard buffer.readableBytes >= headerBytes + length,
            let bytes = buffer.readBytes(length: headerBytes + length)
        else { return .needMoreData }
        guard let (packet, _) = try MQTTCodec.decode(bytes[...], maxPacketBytes: self.maxPacketBytes) else {
            throw MQTTCodecError("packet could not be decoded")
        }
        context.fireChannelRead(self.wrapInboundOut(packet))
        return .continue
    }
}

final class MQTTFrameEncoder: MessageToByteEncoder {
    typealias OutboundIn = MQTTPacket

    func encode(data: MQTTPacket, out: inout ByteBuffer) throws {
        out.writeBytes(MQTTCodec.encode(data))
    }
}

public struct MQTTClientConfiguration: Sendable {
    public var host: String
    public var port: Int
    public var clientID: String
    /// false: the broker keeps the session (subscriptions and QoS 1 messages) while this client is away.
    public var cleanSession = false
    public var keepAliveSeconds: UInt16 = 30
    public var subscriptions: [MQTTSubscription] = []
    public var initialBackoff: Duration = .milliseconds(200)
    public var maxBackoff: Duration = .seconds(10)

    public init(host: String, port: Int, clientID: String) {
        self.host = host
        self.port = port
        self.clientID = clientID
    }
}

/// A small MQTT 3.1.1 client of one broker: connects (and again after any failure, with backoff),
/// subscribes, hands each received PUBLISH to `onPublish` and acknowledges a QoS 1 one only after
/// `onPublish` returned, so a message the handler has not stored is delivered again by the broker.
public final class MQTTClient: Sendable {
    public let configuration: MQTTClientConfiguration
    let logger: Logger
    private let writer = Mutex<NIOAsyncChannelOutboundWriter<MQTTPacket>?>(nil)
    private let packetIDs = Atomic<UInt16>(0)
    private let connects = Atomic<Int>(0)
    private let qos1Sent = Atomic<Int>(0)
    private let qos1Acknowledged = Atomic<Int>(0)
    private let subscribed = Atomic<Bool>(false)

    public init(configuration: MQTTClientConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    /// Whether a connection is up.
    public var isConnected: Bool { self.writer.withLock { $0 != nil } }
    /// Whether the broker acknowledged the current connection's subscriptions (its SUBACK came; true
    /// at once without subscriptions): from then on it delivers what is published on them.
    public var isSubscribed: Bool { self.isConnected && self.subscribed.load(ordering: .acquiring) }
    /// Connections made so far.
    public var connections: Int { self.connects.load(ordering: .relaxed) }
    /// QoS 1 messages published whose PUBACK has not arrived (on any connection: one lost with its
    /// connection stays counted). A client that publishes and leaves waits for 0 first: closing a socket
    /// with unread PUBACKs resets the connection, and the broker drops what it had not read yet.
    public var unacknowledged: Int {
        self.qos1Sent.load(ordering: .relaxed) - self.qos1Acknowledged.load(ordering: .relaxed)
    }

    /// Publishes on the current connection. Throws when not connected. With QoS 1 the broker keeps the
    /// message for subscribers that are away (their sessions); its PUBACK is not awaited.
    public func publish(topic: String, payload: [UInt8], qos: UInt8 = 0, retain: Bool = false) async throws {
        guard let w = self.writer.withLock({ $0 }) else {
            throw MQTTCodecError("not connected to the broker at \(self.configuration.host):\(self.configuration.port)")
        }
        let id: UInt16? = qos > 0 ? self.nextPacketID() : nil
        if id != nil { self.qos1Sent.add(1, ordering: .relaxed) }
        try await w.write(
            .publish(MQTTPublish(topic: topic, payload: payload, qos: min(qos, 1), retain: retain, packetID: id))
        )
    }

    /// Connects and serves until cancelled. `onConnect` runs after each subscription is in place.
    public func run(
        onConnect: @escaping @Sendable () async -> Void = {},
        onPublish: @escaping @Sendable (MQTTPublish) async -> Void
    ) async {
        let c = self.configuration
        var delay = c.initialBackoff
        var failures = 0
        while !Task.isCancelled {
            do {
                try await self.session(onConnect: onConnect, onPublish: onPublish) {
                    if failures > 0 {
                        self.logger.notice("mqtt: connected to \(c.host):\(c.port) again")
                    }
                    failures = 0
                    delay = c.initialBackoff
                }
            } catch {
                if Task.isCancelled { break }
                failures += 1
                if failures == 1 {
                    self.logger.warning("mqtt: broker \(c.host):\(c.port): \(error); retrying")
                } else {
                    self.logger.debug("mqtt: attempt \(failures) failed: \(error)")
                }
            }
            self.writer.withLock { $0 = nil }
            if Task.isCancelled { break }
            try? await Task.sleep(for: delay)
            delay = min(delay * 2, c.maxBackoff)
        }
        self.writer.withLock { $0 = nil }
    }

    private func nextPacketID() -> UInt16 {
        let id = self.packetIDs.wrappingAdd(1, ordering: .relaxed).newValue
        return id == 0 ? self.packetIDs.wrappingAdd(1, ordering: .relaxed).newValue : id
    }

    private func session(
        onConnect: @escaping @Sendable () async -> Void,
        onPublish: @escaping @Sendable (MQTTPublish) async -> Void,
        connected: () -> Void
    ) async throws {
        let c = self.configuration
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .connect(host: c.host, port: c.port) { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(MQTTFrameDecoder()))
                    try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(MQTTFrameEncoder()))
                    return try NIOAsyncChannel<MQTTPacket, MQTTPacket>(wrappingChannelSynchronously: channel)
                }
            }
        try await channel.executeThenClose { inbound, outbound in
            try await outbound.write(
                .connect(
                    MQTTConnect(
                        clientID: c.clientID,
                        cleanSession: c.cleanSession,
                        keepAliveSeconds: c.keepAliveSeconds
                    )
                )
            )
            var packets = inbound.makeAsyncIterator()
            guard let first = try await packets.next() else { throw MQTTCodecError("the broker closed the connection") }
            guard case .connack(_, let code) = first else { throw MQTTCodecError("expected CONNACK, got \(first)") }
            guard code == 0 else { throw MQTTCodecError("the broker refused the connection (CONNACK code \(code))") }
            self.subscribed.store(c.subscriptions.isEmpty, ordering: .releasing)
            if !c.subscriptions.isEmpty {
                try await outbound.write(.subscribe(packetID: self.nextPacketID(), filters: c.subscriptions))
            }
            self.writer.withLock { $0 = outbound }
            self.connects.add(1, ordering: .relaxed)
            connected()
            self.logger.debug("mqtt: connected to \(c.host):\(c.port) as \(c.clientID)")
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    await onConnect()
                }
                group.addTask {
                    let interval = Duration.seconds(max(1, Int(c.keepAliveSeconds) / 2))
                    while !Task.isCancelled {
                        try await Task.sleep(for: interval)
                        try await outbound.write(.pingreq)
                    }
                }
                defer { group.cancelAll() }
                while let packet = try await packets.next() {
                    switch packet {
                    case .publish(let p):
                        await onPublish(p)
                        if p.qos >= 1, let id = p.packetID { try await outbound.write(.puback(packetID: id)) }
                    case .puback:
                        self.qos1Acknowledged.add(1, ordering: .relaxed)
                    case .suback(_, let codes):
                        if codes.contains(0x80) {
                            throw MQTTCodecError("the broker refused a subscription (SUBACK \(codes))")
                        }
                        self.subscribed.store(true, ordering: .releasing)
                    default:
                        continue
                    }
                }
                throw MQTTCodecError("the broker closed the connection")
            }
        }
    }
}
