import MeshCore

/// What the binding server says about itself in its answers.
public struct STUNResponderPolicy: Sendable, Hashable {
    /// SOFTWARE in answers to RFC 5389/8489 requests (nil: none). At most 763 bytes.
    public var software: String?

    public init(software: String? = "edge-mesh mesh-relay") {
        self.software = software
    }
}

/// Why an input got no answer.
public enum STUNDropReason: String, Sendable, Hashable, CaseIterable {
    /// Not a STUN message: fails the framing checks (first bits, length, attribute bounds, FINGERPRINT).
    case notSTUN = "not_stun"
    /// A STUN indication or response: nothing to answer (a Binding indication is a keepalive).
    case notRequest = "not_request"
    /// An RFC 3489 request asking for an answer from another address or port, which this server
    /// does not have. A 3489 client counts any answer to such a test as coming from the other
    /// address, so silence is the honest reply (an RFC 5389 client gets 420 instead).
    case changeRequest = "change_request"
}

/// The server's decision for one input, and the bytes to send back.
public struct STUNResponse: Sendable, Hashable {
    public enum Outcome: Sendable, Hashable {
        /// A Binding success response; `classic` for an RFC 3489 request (MAPPED-ADDRESS).
        case binding(classic: Bool)
        /// An error response with this code (400 or 420).
        case error(code: Int)
        case dropped(STUNDropReason)
    }

    public var outcome: Outcome
    /// The response message (empty when dropped).
    public var bytes: [UInt8]
}

/// The Binding server's logic: request bytes and the address they came from in, response bytes
/// out. Pure (no I/O), so it is tested byte for byte and fuzzed; `STUNServer` runs it on sockets.
public enum STUNResponder {
    /// Comprehension-required attributes a request may carry that need no action here: credentials
    /// (this server asks for none, RFC 8489 §9) and addresses. Any other type below 0x8000 gets 420.
    static let understood: Set<UInt16> = [
        STUNAttributeType.mappedAddress, STUNAttributeType.changeRequest, STUNAttributeType.sourceAddress,
        STUNAttributeType.changedAddress, STUNAttributeType.username, STUNAttributeType.messageIntegrity,
        STUNAttributeType.errorCode, STUNAttributeType.unknownAttributes, STUNAttributeType.realm,
        STUNAttributeType.nonce, STUNAttributeType.messageIntegritySHA256, STUNAttributeType.passwordAlgorithm,
        STUNAttributeType.userhash, STUNAttributeType.xorMappedAddress,
    ]

    /// At most this many types are listed in UNKNOWN-ATTRIBUTES.
    static let maxUnknownListed = 16

    /// Answers one message.
    /// - Parameters:
    ///   - source: where the request came from (what XOR-MAPPED-ADDRESS reports).
    ///   - local: the address the answer leaves from (RESPONSE-ORIGIN / SOURCE-ADDRESS), when known.
    public static func respond(
        to bytes: UnsafeRawBufferPointer,
        from source: STUNAddress,
        local: STUNAddress?,
        policy: STUNResponderPolicy
    ) -> STUNResponse {
        let request: STUNMessage
        do {
            request = try STUNMessage.decode(bytes)
        } catch {
            if error.code.isFraming { return STUNResponse(outcome: .dropped(.notSTUN), bytes: []) }
            // The header is sound but an attribute is not: a request gets 400.
            guard let header = try? STUNMessage.header(bytes), header.type.messageClass == .request else {
                return STUNResponse(outcome: .dropped(.notRequest), bytes: [])
            }
            let shell = STUNMessage(type: header.type, cookie: header.cookie, transactionID: header.transactionID)
            return self.error(
                to: shell,
                code: STUNErrorCode.badRequest,
                reason: "Bad Request: \(error.code.rawValue)",
                policy: policy
            )
        }
        guard request.type.messageClass == .request else {
            return STUNResponse(outcome: .dropped(.notRequest), bytes: [])
        }
        guard request.type.method == .binding else {
            return self.error(
                to: request,
                code: STUNErrorCode.badRequest,
                reason: "Bad Request: only Binding is served here",
                policy: policy
            )
        }
        var unknown: [UInt16] = []
        var wantsChange = false
        for attribute in request.attributes {
            switch attribute {
            case .changeRequest(let ip, let port):
                wantsChange = wantsChange || ip || port
            case .other(let type, _):
                if STUNAttributeType.isComprehensionRequired(type), !self.understood.contains(type),
                    !unknown.contains(type), unknown.count < self.maxUnknownListed
                {
                    unknown.append(type)
                }
            default:
                break
            }
        }
        if wantsChange && request.isClassic && unknown.isEmpty {
            return STUNResponse(outcome: .dropped(.changeRequest), bytes: [])
        }
        if wantsChange && !request.isClassic {
            // No alternate address to answer from: list CHANGE-REQUEST as not understood, what a
            // server without RFC 5780 support says, and what RFC 5780 clients read as "no NAT
            // behaviour discovery here".
            unknown.append(STUNAttributeType.changeRequest)
        }
        if !unknown.isEmpty {
            return self.error(
                to: request,
                code: STUNErrorCode.unknownAttribute,
                reason: "Unknown Attribute",
                unknown: unknown,
                policy: policy
            )
        }
        var response = STUNMessage(
            type: .bindingSuccess,
            cookie: request.cookie,
            transactionID: request.transactionID
        )
        if request.isClassic {
            // RFC 3489 clients know MAPPED-ADDRESS and SOURCE-ADDRESS. Nothing else: the oldest
            // parsers do not skip padding, so an unpadded SOFTWARE would derail them.
            response.attributes.append(.mappedAddress(source))
            if let local { response.attributes.append(.sourceAddress(local)) }
        } else {
            response.attributes.append(.xorMappedAddress(source))
            if let local { response.attributes.append(.responseOrigin(local)) }
            if let software = policy.software { response.attributes.append(.software(software)) }
            if request.hasFingerprint { response.attributes.append(.fingerprint) }
        }
        guard let out = try? response.encode() else { return STUNResponse(outcome: .dropped(.notRequest), bytes: []) }
        return STUNResponse(outcome: .binding(classic: request.isClassic), bytes: out)
    }

    private static func error(
        to request: STUNMessage,
        code: Int,
        reason: String,
        unknown: [UInt16] = [],
        policy: STUNResponderPolicy
    ) -> STUNResponse {
        var response = STUNMessage(
            type: STUNMessageType(method: request.type.method, class: .errorResponse),
            cookie: request.cookie,
            transactionID: request.transactionID,
            attributes: [.errorCode(STUNErrorCode(code: code, reason: reason))]
        )
        if !unknown.isEmpty { response.attributes.append(.unknownAttributes(unknown)) }
        if !request.isClassic {
            if let software = policy.software { response.attributes.append(.software(software)) }
            if request.hasFingerprint { response.attributes.append(.fingerprint) }
        }
        guard let out = try? response.encode() else { return STUNResponse(outcome: .dropped(.notRequest), bytes: []) }
        return STUNResponse(outcome: .error(code: code), bytes: out)
    }
}
