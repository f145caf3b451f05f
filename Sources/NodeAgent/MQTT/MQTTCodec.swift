/// MQTT 3.1.1 control packets (OASIS standard, section 3): the subset a client of a broker uses.
public enum MQTTPacket: Sendable, Equatable {
    case connect(MQTTConnect)
    case connack(sessionPresent: Bool, returnCode: UInt8)
    case publish(MQTTPublish)
    case puback(packetID: UInt16)
    case subscribe(packetID: UInt16, filters: [MQTTSubscription])
    case suback(packetID: UInt16, returnCodes: [UInt8])
    case unsubscribe(packetID: UInt16, filters: [String])
    case unsuback(packetID: UInt16)
    case pingreq
    case pingresp
    case disconnect
}

public struct MQTTConnect: Sendable, Equatable {
    public var clientID: String
    public var cleanSession: Bool
    public var keepAliveSeconds: UInt16
    public var username: String?
    public var password: [UInt8]?

    public init(
        clientID: String,
        cleanSession: Bool,
        keepAliveSeconds: UInt16,
        username: String? = nil,
        password: [UInt8]? = nil
    ) {
        self.clientID = clientID
        self.cleanSession = cleanSession
        self.keepAliveSeconds = keepAliveSeconds
        self.username = username
        self.password = password
    }
}

public struct MQTTPublish: Sendable, Equatable {
    public var topic: String
    public var payload: [UInt8]
    public var qos: UInt8
    public var retain: Bool
    public var dup: Bool
    /// Present for QoS 1 and 2.
    public var packetID: UInt16?

    public init(
        topic: String,
        payload: [UInt8],
        qos: UInt8 = 0,
        retain: Bool = false,
        dup: Bool = false,
        packetID: UInt16? = nil
    ) {
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packetID = packetID
    }
}

public struct MQTTSubscription: Sendable, Equatable {
    public var filter: String
    public var qos: UInt8

    public init(filter: String, qos: UInt8) {
        self.filter = filter
        self.qos = qos
    }
}

public struct MQTTCodecError: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { "MQTT: \(self.message)" }
}

/// Encodes and decodes MQTT 3.1.1 packets: pure functions over bytes, no I/O.
public enum MQTTCodec {
    /// Packets larger than this are refused (the protocol allows 256 MiB).
    public static let defaultMaxPacketBytes = 1 << 20

    // MARK: encode

    public static func encode(_ packet: MQTTPacket) -> [UInt8] {
        var body: [UInt8] = []
        let header: UInt8
        switch packet {
        case .connect(let c):
            header = 0x10
            Self.string("MQTT", into: &body)
            body.append(4)  // protocol level 3.1.1
            var flags: UInt8 = c.cleanSession ? 0x02 : 0
            if c.username != nil { flags |= 0x80 }
            if c.password != nil { flags |= 0x40 }
            body.append(flags)
            Self.u16(c.keepAliveSeconds, into: &body)
            Self.string(c.clientID, into: &body)
            if let u = c.username { Self.string(u, into: &body) }
            if let p = c.password { Self.bytes(p, into: &body) }
        case .connack(let present, let code):
            header = 0x20
            body = [present ? 1 : 0, code]
        case .publish(let p):
            header = 0x30 | (p.dup ? 0x08 : 0) | ((p.qos & 0x03) << 1) | (p.retain ? 0x01 : 0)
            Self.string(p.topic, into: &body)
            if p.qos > 0 { Self.u16(p.packetID ?? 0, into: &body) }
            body += p.payload
        case .puback(let id):
            header = 0x40
            Self.u16(id, into: &body)
        case .subscribe(let id, let filters):
            header = 0x82
            Self.u16(id, into: &body)
            for f in filters {
                Self.string(f.filter, into: &body)
                body.append(f.qos)
            }
        case .suback(let id, let codes):
            header = 0x90
            Self.u16(id, into: &body)
            body += codes
        case .unsubscribe(let id, let filters):
            header = 0xA2
            Self.u16(id, into: &body)
            for f in filters { Self.string(f, into: &body) }
        case .unsuback(let id):
            header = 0xB0
            Self.u16(id, into: &body)
        case .pingreq: header = 0xC0
        case .pingresp: header = 0xD0
        case .disconnect: header = 0xE0
        }
        var out: [UInt8] = [header]
        var n = body.count
        repeat {
            var b = UInt8(n % 128)
            n /= 128
            if n > 0 { b |= 0x80 }
            out.append(b)
        } while n > 0
        return out + body
    }

    static func u16(_ v: UInt16, into out: inout [UInt8]) {
        out.append(UInt8(v >> 8))
        out.append(UInt8(v & 0xFF))
    }

    static func string(_ s: String, into out: inout [UInt8]) { Self.bytes(Array(s.utf8), into: &out) }

    static func bytes(_ b: [UInt8], into out: inout [UInt8]) {
        Self.u16(UInt16(min(b.count, 65535)), into: &out)
        out += b.prefix(65535)
    }

    // MARK: decode

    /// The first packet in `bytes` and how many bytes it took; nil when `bytes` holds only part of one.
    /// Throws for a malformed packet, or one longer than `maxPacketBytes`.
    public static func decode(
        _ bytes: ArraySlice<UInt8>,
        maxPacketBytes: Int = defaultMaxPacketBytes
    ) throws(MQTTCodecError) -> (packet: MQTTPacket, consumed: Int)? {
        guard let first = bytes.first else { return nil }
        var length = 0
        var multiplier = 1
        var i = bytes.startIndex + 1
        var lengthBytes = 0
        while true {
            guard i < bytes.endIndex else { return nil }
            let b = bytes[i]
            length += Int(b & 0x7F) * multiplier
            lengthBytes += 1
            i += 1
            if b & 0x80 == 0 { break }
            if lengthBytes == 4 { throw MQTTCodecError("remaining length longer than 4 bytes") }
            multiplier *= 128
        }
        if length > maxPacketBytes {
            throw MQTTCodecError("packet of \(length) bytes is larger than the limit of \(maxPacketBytes)")
        }
        guard bytes.endIndex - i >= length else { return nil }
        var r = Reader(bytes: bytes[i..<(i + length)])
        let packet = try Self.packet(type: first >> 4, flags: first & 0x0F, &r)
        return (packet, 1 + lengthBytes + length)
    }

    struct Reader {
        var bytes: ArraySlice<UInt8>

        var isEmpty: Bool { self.bytes.isEmpty }

        mutating func u8() throws(MQTTCodecError) -> UInt8 {
            guard let b = self.bytes.popFirst() else { throw MQTTCodecError("packet ends early") }
            return b
        }

        mutating func u16() throws(MQTTCodecError) -> UInt16 {
            let hi = try self.u8()
            let lo = try self.u8()
            return UInt16(hi) << 8 | UInt16(lo)
        }

        mutating func data() throws(MQTTCodecError) -> [UInt8] {
            let n = Int(try self.u16())
            guard self.bytes.count >= n else { throw MQTTCodecError("a string runs past the end of the packet") }
            let out = Array(self.bytes.prefix(n))
            self.bytes = self.bytes.dropFirst(n)
            return out
        }

        mutating func string() throws(MQTTCodecError) -> String {
            let raw = try self.data()
            guard let s = String(validating: raw, as: UTF8.self), !s.contains("\0") else {
                throw MQTTCodecError("a string is not valid UTF-8 (or holds NUL)")
            }
            return s
        }

        mutating func rest() -> [UInt8] {
            let out = Array(self.bytes)
            self.bytes = []
            return out
        }
    }

    static func packet(type: UInt8, flags: UInt8, _ r: inout Reader) throws(MQTTCodecError) -> MQTTPacket {
        func requireFlags(_ expected: UInt8, _ name: String) throws(MQTTCodecError) {
            if flags != expected { throw MQTTCodecError("\(name) with reserved flags \(flags)") }
        }
        func requireEnd(_ name: String) throws(MQTTCodecError) {
            if !r.isEmpty { throw MQTTCodecError("\(name) has \(r.bytes.count) bytes too many") }
        }
        switch type {
        case 1:
            try requireFlags(0, "CONNECT")
            let proto = try r.string()
            let level = try r.u8()
            guard proto == "MQTT", level == 4 else {
                throw MQTTCodecError("CONNECT for protocol \(proto) level \(level); only MQTT 3.1.1 (level 4)")
            }
            let f = try r.u8()
            if f & 0x01 != 0 { throw MQTTCodecError("CONNECT with the reserved flag set") }
            let keepAlive = try r.u16()
            let clientID = try r.string()
            if f & 0x04 != 0 {
                _ = try r.string()  // will topic
                _ = try r.data()  // will message
            }
            let username = f & 0x80 != 0 ? try r.string() : nil
            let password = f & 0x40 != 0 ? try r.data() : nil
            try requireEnd("CONNECT")
            return .connect(
                MQTTConnect(
                    clientID: clientID,
                    cleanSession: f & 0x02 != 0,
                    keepAliveSeconds: keepAlive,
                    username: username,
                    password: password
                )
            )
        case 2:
            try requireFlags(0, "CONNACK")
            let ack = try r.u8()
            let code = try r.u8()
            try requireEnd("CONNACK")
            if ack & 0xFE != 0 { throw MQTTCodecError("CONNACK with reserved bits set") }
            return .connack(sessionPresent: ack & 1 == 1, returnCode: code)
        case 3:
            let qos = (flags >> 1) & 0x03
            if qos == 3 { throw MQTTCodecError("PUBLISH with QoS 3") }
            let topic = try r.string()
            if topic.isEmpty { throw MQTTCodecError("PUBLISH with an empty topic") }
            if topic.contains("+") || topic.contains("#") {
                throw MQTTCodecError("PUBLISH to a topic with wildcards")
            }
            let id = qos > 0 ? try r.u16() : nil
            if id == 0 { throw MQTTCodecError("PUBLISH with packet id 0") }
            return .publish(
                MQTTPublish(
                    topic: topic,
                    payload: r.rest(),
                    qos: qos,
                    retain: flags & 0x01 != 0,
                    dup: flags & 0x08 != 0,
                    packetID: id
                )
            )
        case 4:
            try requireFlags(0, "PUBACK")
            let id = try r.u16()
            try requireEnd("PUBACK")
            return .puback(packetID: id)
        case 8:
            try requireFlags(2, "SUBSCRIBE")
            let id = try r.u16()
            var filters: [MQTTSubscription] = []
            while !r.isEmpty {
                let f = try r.string()
                let q = try r.u8()
                if q > 2 { throw MQTTCodecError("SUBSCRIBE with QoS \(q)") }
                filters.append(MQTTSubscription(filter: f, qos: q))
            }
            if filters.isEmpty { throw MQTTCodecError("SUBSCRIBE without a topic filter") }
            return .subscribe(packetID: id, filters: filters)
        case 9:
            try requireFlags(0, "SUBACK")
            let id = try r.u16()
            return .suback(packetID: id, returnCodes: r.rest())
        case 10:
            try requireFlags(2, "UNSUBSCRIBE")
            let id = try r.u16()
            var filters: [String] = []
            while !r.isEmpty { filters.append(try r.string()) }
            return .unsubscribe(packetID: id, filters: filters)
        case 11:
            try requireFlags(0, "UNSUBACK")
            let id = try r.u16()
            try requireEnd("UNSUBACK")
            return .unsuback(packetID: id)
        case 12:
            try requireFlags(0, "PINGREQ")
            try requireEnd("PINGREQ")
            return .pingreq
        case 13:
            try requireFlags(0, "PINGRESP")
            try requireEnd("PINGRESP")
            return .pingresp
        case 14:
            try requireFlags(0, "DISCONNECT")
            try requireEnd("DISCONNECT")
            return .disconnect
        default:
            throw MQTTCodecError("packet type \(type) is not handled (QoS 2 and reserved types)")
        }
    }

    /// Whether `topic` matches the subscription `filter` (`+` one level, `#` the rest).
    public static func matches(_ filter: String, _ topic: String) -> Bool {
        let f = filter.split(separator: "/", omittingEmptySubsequences: false)
        let t = topic.split(separator: "/", omittingEmptySubsequences: false)
        var i = 0
        while i < f.count {
            if f[i] == "#" { return true }
            guard i < t.count else { return false }
            if f[i] != "+" && f[i] != t[i] { return false }
            i += 1
        }
        return i == t.count
    }
}
