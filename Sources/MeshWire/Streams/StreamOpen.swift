import NIOCore

/// An endpoint's IP address on the wire.
public enum WireIPAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt64, UInt64)

    public var description: String {
        switch self {
        case .v4(let a):
            return "\(a >> 24).\((a >> 16) & 0xFF).\((a >> 8) & 0xFF).\(a & 0xFF)"
        case .v6(let hi, let lo):
            let groups = (0..<8).map { i -> String in
                let word = i < 4 ? hi >> (48 - 16 * UInt64(i)) : lo >> (48 - 16 * UInt64(i - 4))
                return String(word & 0xFFFF, radix: 16)
            }
            return groups.joined(separator: ":")
        }
    }
}

/// The transport a stream carries: a TCP connection's bytes, or UDP datagrams framed by ``DatagramFraming``.
public enum StreamProtocol: UInt8, Hashable, Sendable {
    case tcp = 6
    case udp = 17
}

/// The header that opens every stream of a peer link: which endpoint the sender wants reached.
///
/// The receiving agent dials the endpoint only when its own node serves it for that service and port, per
/// its service table, and answers with a ``StreamOpenReply``. Wire layout, big endian:
///
///     length  u16   bytes that follow (at most `maxLength`)
///     version u8    1
///     proto   u8    6 tcp, 17 udp
///     svcPort u16   the service's port
///     family  u8    4 or 6, then 4 or 16 address bytes: the endpoint's IP
///     epPort  u16   the endpoint's port
///     nsLen   u8    then the namespace, UTF-8, 1-253 bytes
///     svcLen  u8    then the service name, UTF-8, 1-253 bytes
public struct StreamTarget: Hashable, Sendable, CustomStringConvertible {
    public var namespace: String
    public var service: String
    public var servicePort: UInt16
    public var endpoint: WireIPAddress
    public var endpointPort: UInt16
    public var transport: StreamProtocol

    public init(
        namespace: String,
        service: String,
        servicePort: UInt16,
        endpoint: WireIPAddress,
        endpointPort: UInt16,
        transport: StreamProtocol
    ) {
        self.namespace = namespace
        self.service = service
        self.servicePort = servicePort
        self.endpoint = endpoint
        self.endpointPort = endpointPort
        self.transport = transport
    }

    /// The link's own control stream (hole-punch coordination, `Relay/Punch`): no service has this
    /// name (`_link` is not a DNS-1123 label), so no table can serve it by mistake.
    public static let linkControl = StreamTarget(
        namespace: "_link",
        service: "control",
        servicePort: 0,
        endpoint: .v4(0),
        endpointPort: 0,
        transport: .tcp
    )

    /// The header's version.
    public static let version: UInt8 = 1
    /// The largest `length` accepted (the largest valid header is 531 bytes).
    public static let maxLength = 1024
    /// The longest name (a DNS name's limit).
    public static let maxNameBytes = 253

    public var description: String {
        let ep = self.endpoint.description.contains(":") ? "[\(self.endpoint)]" : "\(self.endpoint)"
        return "\(self.transport) \(self.service).\(self.namespace):\(self.servicePort) -> \(ep):\(self.endpointPort)"
    }

    /// Appends the header (with its length prefix) to `buffer`.
    public func encode(into buffer: inout ByteBuffer) throws(MeshWireError) {
        let ns = Array(self.namespace.utf8)
        let svc = Array(self.service.utf8)
        for name in [ns, svc] where name.isEmpty || name.count > Self.maxNameBytes {
            throw .unencodable("a name of \(name.count) bytes (1-\(Self.maxNameBytes))")
        }
        let addressBytes = self.endpoint.isV4 ? 4 : 16
        let length = 1 + 1 + 2 + 1 + addressBytes + 2 + 1 + ns.count + 1 + svc.count
        buffer.writeMultipleIntegers(UInt16(length), Self.version, self.transport.rawValue, self.servicePort)
        switch self.endpoint {
        case .v4(let a): buffer.writeMultipleIntegers(UInt8(4), a)
        case .v6(let hi, let lo): buffer.writeMultipleIntegers(UInt8(6), hi, lo)
        }
        buffer.writeInteger(self.endpointPort)
        buffer.writeInteger(UInt8(ns.count))
        buffer.writeBytes(ns)
        buffer.writeInteger(UInt8(svc.count))
        buffer.writeBytes(svc)
    }

    /// Reads a header from the front of `buffer`: nil (nothing consumed) until all its bytes are there, then
    /// the target (consumed). A length over `maxLength` throws as soon as the prefix is there.
    public static func decode(from buffer: inout ByteBuffer) throws(MeshWireError) -> StreamTarget? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, as: UInt16.self) else { return nil }
        guard length <= Self.maxLength else {
            throw .headerTooLarge("stream-open header of \(length) bytes, limit \(Self.maxLength)")
        }
        guard var body = buffer.getSlice(at: buffer.readerIndex + 2, length: Int(length)) else { return nil }
        let target = try Self.decodeBody(&body)
        guard body.readableBytes == 0 else {
            throw .headerTooLarge("stream-open header: \(body.readableBytes) bytes after its fields")
        }
        buffer.moveReaderIndex(forwardBy: 2 + Int(length))
        return target
    }

    private static func decodeBody(_ body: inout ByteBuffer) throws(MeshWireError) -> StreamTarget {
        let short = MeshWireError.headerTooLarge("stream-open header shorter than its fields")
        guard
            let (version, proto, servicePort, family) = body.readMultipleIntegers(
                as: (UInt8, UInt8, UInt16, UInt8).self
            )
        else { throw short }
        guard version == Self.version else {
            throw .unsupportedVersion(version, of: "stream-open header", expected: Self.version)
        }
        guard let transport = StreamProtocol(rawValue: proto) else { throw .unknownProtocol(proto) }
        let endpoint: WireIPAddress
        switch family {
        case 4:
            guard let a = body.readInteger(as: UInt32.self) else { throw short }
            endpoint = .v4(a)
        case 6:
            guard let (hi, lo) = body.readMultipleIntegers(as: (UInt64, UInt64).self) else { throw short }
            endpoint = .v6(hi, lo)
        default:
            throw .badAddressFamily(family)
        }
        guard let port = body.readInteger(as: UInt16.self) else { throw short }
        let namespace = try Self.readName(&body, "namespace")
        let service = try Self.readName(&body, "service")
        return StreamTarget(
            namespace: namespace,
            service: service,
            servicePort: servicePort,
            endpoint: endpoint,
            endpointPort: port,
            transport: transport
        )
    }

    private static func readName(_ body: inout ByteBuffer, _ what: String) throws(MeshWireError) -> String {
        guard let n = body.readInteger(as: UInt8.self), let bytes = body.readBytes(length: Int(n)) else {
            throw .headerTooLarge("stream-open header shorter than its fields")
        }
        guard n > 0, n <= Self.maxNameBytes else { throw .badName("\(what) of \(n) bytes (1-\(Self.maxNameBytes))") }
        guard let name = String(validating: bytes, as: UTF8.self) else { throw .badName("\(what) is not UTF-8") }
        return name
    }
}

extension WireIPAddress {
    var isV4: Bool {
        if case .v4 = self { return true }
        return false
    }
}

/// Why a stream was refused: a code for programs and counters, a reason for people.
public struct StreamRefusal: Hashable, Sendable, CustomStringConvertible {
    /// A refusal code; unknown codes decode as they are, for peers newer than this one.
    public struct Code: RawRepresentable, Hashable, Sendable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }

        /// The target is not an endpoint the receiving node serves (per its service table).
        public static let notLocalEndpoint = Code(rawValue: 1)
        /// The receiving node does not know the service or port.
        public static let unknownService = Code(rawValue: 2)
        /// The endpoint could not be dialed (refused, unreachable, timed out).
        public static let dialFailed = Code(rawValue: 3)
        /// A limit of the receiving node was reached.
        public static let overLimit = Code(rawValue: 4)
        /// The stream-open header was malformed.
        public static let malformedHeader = Code(rawValue: 5)
    }

    public var code: Code
    /// A sentence for logs, at most 255 bytes of UTF-8 (longer text is cut at a character boundary).
    public var reason: String

    public init(_ code: Code, _ reason: String) {
        self.code = code
        self.reason = reason
    }

    public var description: String { "refused (\(self.code.rawValue)): \(self.reason)" }
}

/// The receiving agent's answer to a ``StreamTarget``: the first bytes it sends on the stream.
///
///     status u8   0 accepted (the endpoint's bytes follow), 1 refused
///     (refused) code u8, reasonLen u8, reason UTF-8; the receiver then closes the stream.
public enum StreamOpenReply: Hashable, Sendable {
    case accepted
    case refused(StreamRefusal)

    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .accepted:
            buffer.writeInteger(UInt8(0))
        case .refused(let r):
            var reason = Array(r.reason.utf8)
            if reason.count > 255 {
                var cut = 255
                while cut > 0 && (reason[cut] & 0xC0) == 0x80 { cut -= 1 }  // not inside a character
                reason = Array(reason[..<cut])
            }
            buffer.writeMultipleIntegers(UInt8(1), r.code.rawValue, UInt8(reason.count))
            buffer.writeBytes(reason)
        }
    }

    /// Reads a reply from the front of `buffer`: nil (nothing consumed) until it is whole.
    public static func decode(from buffer: inout ByteBuffer) throws(MeshWireError) -> StreamOpenReply? {
        guard let status = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return nil }
        switch status {
        case 0:
            buffer.moveReaderIndex(forwardBy: 1)
            return .accepted
        case 1:
            guard let (_, code, n) = buffer.getMultipleIntegers(at: buffer.readerIndex, as: (UInt8, UInt8, UInt8).self),
                let bytes = buffer.getBytes(at: buffer.readerIndex + 3, length: Int(n))
            else { return nil }
            guard let reason = String(validating: bytes, as: UTF8.self) else { throw .badReason() }
            buffer.moveReaderIndex(forwardBy: 3 + Int(n))
            return .refused(StreamRefusal(StreamRefusal.Code(rawValue: code), reason))
        default:
            throw .unknownReplyStatus(status)
        }
    }
}
