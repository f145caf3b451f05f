import MeshNIO
import NIOCore

/// One name looked up the way a client's query would be answered, and where the answer came from:
/// what `meshctl dns` shows.
public struct DNSExplanation: Sendable, Hashable, Codable {
    public enum Source: String, Sendable, Hashable, Codable {
        /// The mesh zone (services, endpoints and their reverse names), answered authoritatively.
        case zone
        /// The forwarder's cache: asked upstream before, within its TTL.
        case cache
        /// Asked upstream now.
        case upstream
        /// Answered by the agent without the zone or an upstream: a refusal, a search-list expansion of a
        /// mesh name, or SERVFAIL when every upstream failed.
        case agent
    }

    public var name: String
    public var type: String
    public var rcode: String
    /// The answer section in presentation form (`name TTL IN TYPE data`).
    public var answers: [String]
    public var source: Source
    /// The upstream resolver that gave the answer (`cache` and `upstream`), when known.
    public var upstream: String?
    /// Seconds the cached answer has left (`cache`).
    public var ttlLeft: Int?
    /// Why, in words.
    public var detail: String
}

/// What went wrong explaining a name.
public enum DNSExplainError: Error, CustomStringConvertible {
    case badName(String)
    case unknownType(String)
    case notServing

    public var description: String {
        switch self {
        case .badName(let why): return "not a DNS name: \(why)"
        case .unknownType(let t):
            return "unknown record type \(t) (A, AAAA, CNAME, PTR, SRV, TXT, MX, NS, SOA, ANY or a number)"
        case .notServing: return "the DNS server is not running"
        }
    }
}

extension DNSType {
    /// `A`, `aaaa`, `SRV`... or a decimal type number.
    public init?(text: String) {
        let known: [DNSType] = [.a, .aaaa, .cname, .ptr, .srv, .txt, .mx, .ns, .soa, .any]
        if let t = known.first(where: { $0.description == text.uppercased() }) {
            self = t
        } else if let n = UInt16(text) {
            self = DNSType(n)
        } else {
            return nil
        }
    }
}

extension DNSRecord {
    /// `name TTL IN TYPE data`, as dig prints it.
    public var presentation: String {
        let data: String
        switch self.data {
        case .a(let ip), .aaaa(let ip): data = ip.description
        case .ns(let n), .cname(let n), .ptr(let n): data = n.description
        case .mx(let preference, let exchange): data = "\(preference) \(exchange)"
        case .soa(let soa):
            data =
                "\(soa.mname) \(soa.rname) \(soa.serial) \(soa.refresh) \(soa.retry) \(soa.expire) \(soa.minimum)"
        case .txt(let strings):
            data = strings.map { "\"" + String(decoding: $0, as: UTF8.self) + "\"" }.joined(separator: " ")
        case .srv(let priority, let weight, let port, let target): data = "\(priority) \(weight) \(port) \(target)"
        case .opaque(let bytes): data = "\\# \(bytes.count) " + bytes.map { hex2($0) }.joined()
        }
        return "\(self.name) \(self.ttl) \(self.rclass == 1 ? "IN" : "CLASS\(self.rclass)") \(self.type) \(data)"
    }
}

private func hex2(_ b: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(b >> 4)], digits[Int(b & 0x0F)]])
}

extension DNSServer {
    /// Answers `name`/`type` exactly as a query over TCP would be answered (the zone, then the forwarder
    /// with its cache), and says where the answer came from.
    public func explain(name: String, type: DNSType) async throws -> DNSExplanation {
        guard let (policy, forwarder) = self.serving.withLock({ $0 }) else { throw DNSExplainError.notServing }
        let qname: DNSName
        do {
            qname = try DNSName(name)
        } catch {
            throw DNSExplainError.badName("\(error)")
        }
        let query = DNSMessage(
            header: DNSHeader(id: 1, recursionDesired: true),
            questions: [DNSQuestion(name: qname, type: type)],
            edns: DNSEDNS(udpPayloadSize: 1232)
        )
        let bytes = try query.encode()
        let scratch = AnswerScratch()
        let disposition = bytes.withUnsafeBytes {
            Answerer.answer($0, zone: self.zones.zone, overTCP: true, policy: policy, scratch: scratch)
        }
        func explanation(
            _ response: [UInt8],
            _ source: DNSExplanation.Source,
            _ detail: String
        ) throws
            -> DNSExplanation
        {
            let m = try DNSMessage.decode(response)
            return DNSExplanation(
                name: qname.description,
                type: type.description,
                rcode: m.rcode.description,
                answers: m.answers.map(\.presentation),
                source: source,
                upstream: nil,
                ttlLeft: nil,
                detail: detail
            )
        }
        switch disposition {
        case .drop:
            throw DNSExplainError.badName("the query was not answerable")
        case .reply:
            let authoritative = scratch.response.count > 2 && scratch.response[2] & 0x04 != 0
            if authoritative { return try explanation(scratch.response, .zone, "the mesh zone (authoritative)") }
            let why: String
            switch scratch.rcode {
            case .refused where !policy.forwarding:
                why = "refused: this agent forwards no names outside the mesh zone"
            case .refused: why = "refused (zone transfers and classes other than IN are not served)"
            case .nxDomain: why = "a search-list expansion of a mesh name, which cannot exist"
            default: why = "answered by the agent (\(scratch.rcode))"
            }
            return try explanation(scratch.response, .agent, why)
        case .forward(let request):
            guard let forwarder else { throw DNSExplainError.notServing }
            let (result, source) = try await forwarder.resolveExplained(request.upstreamQuestion).get()
            let out = Answerer.composeForwarded(request, result: result, overTCP: true, policy: policy)
            let via = request.cname.map { _ in " (an ExternalName service: its CNAME, then its target)" } ?? ""
            switch source {
            case .cache(let left, let upstream):
                var e = try explanation(out, .cache, "the forwarder's cache, \(left) s left\(via)")
                e.ttlLeft = left
                e.upstream = upstream.map(hostPort)
                return e
            case .upstream(let upstream):
                let from = upstream.map { "upstream \(hostPort($0))" } ?? "upstream (an answer that is not cached)"
                var e = try explanation(out, .upstream, from + via)
                e.upstream = upstream.map(hostPort)
                return e
            case .failed:
                return try explanation(out, .agent, "every upstream resolver failed or timed out (SERVFAIL)\(via)")
            }
        }
    }
}
