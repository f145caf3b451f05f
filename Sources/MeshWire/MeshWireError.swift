/// Why bytes could not be decoded as one of MeshWire's messages, or a value could not be encoded.
///
/// Shaped like swift-asn1's `ASN1Error`: a ``code`` to switch on, and a reason and the throwing site for
/// people. Two errors are equal when their codes are, so a test can write the error it expects as
/// `MeshWireError.unsupportedVersion(1)` without repeating the reason. The codecs throw these and never trap.
public struct MeshWireError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong: a closed set today, a struct so that codes can be added without breaking a `switch`.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Backing: String, Hashable, Sendable {
            case unsupportedVersion, unknownFrameType, unknownFlags, conflictingFlags, streamFrameOnSession
            case sessionFrameOnStream, badPingFlags, flagsNotAllowed, unknownGoAway, frameTooLarge
            case truncated, unknownProtocol, badAddressFamily, badName, headerTooLarge, unknownReplyStatus
            case badReason, datagramTooLarge, unencodable
        }
        let backing: Backing

        /// A yamux header whose version byte is not 0, or a stream-open header whose version is not 1.
        public static let unsupportedVersion = Code(backing: .unsupportedVersion)
        /// A yamux type byte other than Data (0), Window Update (1), Ping (2) or Go Away (3).
        public static let unknownFrameType = Code(backing: .unknownFrameType)
        /// Flag bits other than SYN (0x1), ACK (0x2), FIN (0x4) and RST (0x8).
        public static let unknownFlags = Code(backing: .unknownFlags)
        /// SYN and ACK on one stream frame: a stream is either opened or acknowledged.
        public static let conflictingFlags = Code(backing: .conflictingFlags)
        /// A Data or Window Update frame on stream 0, which names the session.
        public static let streamFrameOnSession = Code(backing: .streamFrameOnSession)
        /// A Ping or Go Away frame on a stream other than 0.
        public static let sessionFrameOnStream = Code(backing: .sessionFrameOnStream)
        /// A Ping whose flags are not exactly SYN (a request) or ACK (a response).
        public static let badPingFlags = Code(backing: .badPingFlags)
        /// Flags on a Go Away frame, which takes none.
        public static let flagsNotAllowed = Code(backing: .flagsNotAllowed)
        /// A Go Away code other than normal (0), protocol error (1) and internal error (2).
        public static let unknownGoAway = Code(backing: .unknownGoAway)
        /// A Data frame longer than the receiver allows.
        public static let frameTooLarge = Code(backing: .frameTooLarge)
        /// The bytes end inside a message (at the end of a stream: nothing more will come).
        public static let truncated = Code(backing: .truncated)
        /// A stream-open header naming a protocol other than TCP (6) or UDP (17).
        public static let unknownProtocol = Code(backing: .unknownProtocol)
        /// An address whose family byte is neither 4 nor 6.
        public static let badAddressFamily = Code(backing: .badAddressFamily)
        /// A namespace or service name that is empty, over 253 bytes or not UTF-8.
        public static let badName = Code(backing: .badName)
        /// A stream-open header longer than its limit, or whose length disagrees with its fields.
        public static let headerTooLarge = Code(backing: .headerTooLarge)
        /// A stream-open reply whose status byte is unknown.
        public static let unknownReplyStatus = Code(backing: .unknownReplyStatus)
        /// A refusal reason that is not UTF-8.
        public static let badReason = Code(backing: .badReason)
        /// A datagram longer than the limit (at most 65,535 bytes).
        public static let datagramTooLarge = Code(backing: .datagramTooLarge)
        /// A value that cannot be encoded (a field out of range).
        public static let unencodable = Code(backing: .unencodable)

        public var description: String { self.backing.rawValue }
    }

    public let code: Code
    /// A human explanation (not part of equality).
    public let reason: String
    /// Where the error was thrown (not part of equality).
    public let file: String
    public let line: UInt

    init(_ code: Code, _ reason: String, file: String, line: UInt) {
        self.code = code
        self.reason = reason
        self.file = file
        self.line = line
    }

    public static func == (a: MeshWireError, b: MeshWireError) -> Bool { a.code == b.code }
    public func hash(into hasher: inout Hasher) { hasher.combine(self.code) }

    public var description: String { "MeshWireError.\(self.code): \(self.reason)" }

    @inline(never)
    public static func unsupportedVersion(
        _ v: UInt8,
        of what: String = "yamux",
        expected: UInt8 = 0,
        file: String = #fileID,
        line: UInt = #line
    ) -> MeshWireError {
        MeshWireError(.unsupportedVersion, "\(what) version \(v), only \(expected) is spoken", file: file, line: line)
    }
    @inline(never)
    public static func unknownFrameType(_ t: UInt8, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.unknownFrameType, "yamux frame type \(t) (0-3 are defined)", file: file, line: line)
    }
    @inline(never)
    public static func unknownFlags(_ f: UInt16, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        let hex = String(f, radix: 16)
        return MeshWireError(.unknownFlags, "yamux flags 0x\(hex) (only SYN, ACK, FIN, RST)", file: file, line: line)
    }
    @inline(never)
    public static func conflictingFlags(stream: UInt32, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.conflictingFlags, "SYN and ACK together on stream \(stream)", file: file, line: line)
    }
    @inline(never)
    public static func streamFrameOnSession(_ t: UInt8, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.streamFrameOnSession, "frame type \(t) on stream 0 (the session)", file: file, line: line)
    }
    @inline(never)
    public static func sessionFrameOnStream(
        _ t: UInt8,
        stream: UInt32,
        file: String = #fileID,
        line: UInt = #line
    ) -> MeshWireError {
        MeshWireError(.sessionFrameOnStream, "frame type \(t) on stream \(stream), not 0", file: file, line: line)
    }
    @inline(never)
    public static func badPingFlags(_ f: UInt16, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.badPingFlags, "ping flags 0x\(String(f, radix: 16)), not SYN or ACK", file: file, line: line)
    }
    @inline(never)
    public static func flagsNotAllowed(_ f: UInt16, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.flagsNotAllowed, "go away with flags 0x\(String(f, radix: 16))", file: file, line: line)
    }
    @inline(never)
    public static func unknownGoAway(_ c: UInt32, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.unknownGoAway, "go away code \(c) (0-2 are defined)", file: file, line: line)
    }
    @inline(never)
    public static func frameTooLarge(
        _ length: UInt32,
        limit: Int,
        file: String = #fileID,
        line: UInt = #line
    ) -> MeshWireError {
        MeshWireError(.frameTooLarge, "data frame of \(length) bytes, limit \(limit)", file: file, line: line)
    }
    @inline(never)
    public static func truncated(_ what: String, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.truncated, "the bytes end inside \(what)", file: file, line: line)
    }
    @inline(never)
    public static func unknownProtocol(_ p: UInt8, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.unknownProtocol, "protocol \(p) (6 tcp, 17 udp)", file: file, line: line)
    }
    @inline(never)
    public static func badAddressFamily(_ f: UInt8, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.badAddressFamily, "address family \(f) (4 or 6)", file: file, line: line)
    }
    @inline(never)
    public static func badName(_ what: String, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.badName, what, file: file, line: line)
    }
    @inline(never)
    public static func headerTooLarge(_ what: String, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.headerTooLarge, what, file: file, line: line)
    }
    @inline(never)
    public static func unknownReplyStatus(_ s: UInt8, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.unknownReplyStatus, "stream-open reply status \(s)", file: file, line: line)
    }
    @inline(never)
    public static func badReason(file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.badReason, "refusal reason is not UTF-8", file: file, line: line)
    }
    @inline(never)
    public static func datagramTooLarge(
        _ length: Int,
        limit: Int,
        file: String = #fileID,
        line: UInt = #line
    ) -> MeshWireError {
        MeshWireError(.datagramTooLarge, "datagram of \(length) bytes, limit \(limit)", file: file, line: line)
    }
    @inline(never)
    public static func unencodable(_ what: String, file: String = #fileID, line: UInt = #line) -> MeshWireError {
        MeshWireError(.unencodable, what, file: file, line: line)
    }
}
