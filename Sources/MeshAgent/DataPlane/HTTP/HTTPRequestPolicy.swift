import NIOCore
import NIOHTTP1

/// What the proxy accepts of a request head and how it goes upstream: pure rules over the parsed head,
/// tested without a socket. The parser already refused what two servers could frame differently
/// (`HTTPParser`); these are the rules on top, where the proxy and the backend must agree on who is asked,
/// by whom, and for what:
///
/// - Host (RFC 9112 3.2): an HTTP/1.1 request needs exactly one Host field, with one non-empty authority as
///   its value (no list, no userinfo, no bytes outside the authority's); otherwise 400. An HTTP/1.0 request
///   without one gets `fallbackHost` (the address it was sent to).
/// - An absolute-form target (RFC 9112 3.2.2) goes up in origin form, and its authority replaces Host; a
///   target with userinfo (`http://user@host/`) is 400.
/// - Upgrades: only to a protocol the route allows (WebSocket by default); another upgrade request goes up
///   as a plain request without its Upgrade field, and the client connection closes after its response
///   (what the client sent behind it may not be HTTP).
/// - HTTP/1.0 with Transfer-Encoding (RFC 9112 6.1): forwarded, then the client connection closes.
/// - Forwarding claims: see `HTTPConfiguration.trustedForwardingHops` (with several X-Forwarded-For lines,
///   the trusted addresses are taken from the last one).
enum HTTPRequestPolicy {
    struct Settings {
        var trustedHops = 0
        var addForwardedFor = true
        /// Upgrade protocols allowed (lowercase).
        var upgradeProtocols: Set<String> = ["websocket"]
        var requestBufferSize = 64 * 1024

        init() {}

        init(_ configuration: HTTPConfiguration, upgradeProtocols: Set<String>? = nil) {
            self.trustedHops = configuration.trustedForwardingHops
            self.addForwardedFor = configuration.addForwardedFor
            self.upgradeProtocols = upgradeProtocols ?? configuration.upgradeProtocols
            self.requestBufferSize = configuration.requestBufferSize
        }
    }

    /// How an accepted request goes upstream.
    struct Plan {
        /// The head's edits (the request id and the client's address are the caller's).
        var edits = HTTPWire.RequestEdits()
        /// The client connection may carry another request after this one.
        var keepAlive: Bool
        /// An upgrade the route allows.
        var isUpgrade = false
        /// The body is read whole before a backend is picked (it is small, or may be: chunked).
        var bufferBody = false
    }

    enum Decision {
        case forward(Plan)
        case reject(HTTPResponseStatus, String)
    }

    /// The rules above applied to `head`. `clientAddress`: the client's IP as text (for X-Forwarded-For);
    /// `fallbackHost`: the Host for an HTTP/1.0 request without one; `upgradeProtocols`: asked for only when
    /// the request is an upgrade (a look-up of the route).
    static func admit(
        _ head: HTTPHead,
        settings: Settings,
        clientAddress: String?,
        fallbackHost: @autoclosure () -> String,
        upgradeProtocols: () -> Set<String>? = { nil }
    ) -> Decision {
        var plan = Plan(keepAlive: head.isKeepAlive)
        let refusal = Self.admit(
            head,
            settings: settings,
            clientAddress: clientAddress,
            fallbackHost: fallbackHost(),
            upgradeProtocols: upgradeProtocols,
            into: &plan
        )
        if let refusal { return .reject(.badRequest, refusal) }
        return .forward(plan)
    }

    /// `admit`, building the plan in place (`plan`: `Plan(keepAlive: head.isKeepAlive)`; no copy of it per
    /// request); the reason of a refusal (400), or nil.
    static func admit(
        _ head: HTTPHead,
        settings: Settings,
        clientAddress: String?,
        fallbackHost: @autoclosure () -> String,
        upgradeProtocols: () -> Set<String>?,
        into plan: inout Plan
    ) -> String? {
        if head.hasHopByHop { plan.edits.hopByHop = HTTPWire.HopByHop(head) }
        if let error = Self.target(head, into: &plan.edits) { return error }
        if head.isUpgradeRequest {
            plan.keepAlive = false
            if Self.upgradeAllowed(head, upgradeProtocols() ?? settings.upgradeProtocols) {
                plan.isUpgrade = true
                plan.edits.upgrade = head.upgradeField
            }
        }
        if head.version.minor == 0 {
            if head.hasTransferEncoding { plan.keepAlive = false }
            if head.hostCount == 0 && plan.edits.host == nil { plan.edits.hostText = fallbackHost() }
        }
        if let clientAddress, settings.addForwardedFor {
            plan.edits.forwardedFor = clientAddress
            if let first = head.forwardedForField {
                plan.edits.dropForwardedFor = true
                if settings.trustedHops > 0 {
                    // The nearest proxy appended to the last line.
                    let last =
                        head.fields.indices.last(where: { $0 >= first && head.field($0, is: "x-forwarded-for") })
                        ?? first
                    plan.edits.priorForwardedFor = Self.lastElements(
                        head,
                        head.fields[last].value,
                        settings.trustedHops
                    )
                }
            }
        }
        if head.hasForwardedClaims && settings.trustedHops == 0 { plan.edits.dropForwardingClaims = true }
        switch head.body {
        case .none: break
        case .length(let length): plan.bufferBody = !plan.isUpgrade && length <= settings.requestBufferSize
        case .chunked: plan.bufferBody = !plan.isUpgrade && settings.requestBufferSize > 0
        case .untilClose: break
        }
        return nil
    }

    /// The Host and target rules; an error's reason, or nil when the request may go up.
    static func target(_ head: HTTPHead, into edits: inout HTTPWire.RequestEdits) -> String? {
        if head.hostCount > 1 { return "more than one host header" }
        return head.bytes.withUnsafeReadableBytes { raw -> String? in
            let target = head.target
            if let authority = Self.absoluteAuthority(raw, target) {
                // http://authority/path?query: the authority is the Host, the rest the target.
                if HTTPBytes.find(UInt8(ascii: "@"), in: raw, from: authority.lowerBound).map({
                    $0 < authority.upperBound
                })
                    ?? false
                {
                    return "userinfo in the request target"
                }
                guard Self.isAuthority(raw, authority) else { return "invalid authority in the request target" }
                edits.host = authority
                edits.target = authority.upperBound..<target.upperBound
                return nil
            }
            let origin = raw[target.lowerBound] == UInt8(ascii: "/")
            let asterisk = target.count == 1 && raw[target.lowerBound] == UInt8(ascii: "*")
            guard origin || asterisk else { return "invalid request target" }
            guard let host = head.hostField else {
                return head.version.minor == 0 ? nil : "missing host header"
            }
            let value = head.fields[host].value
            if value.isEmpty { return "empty host header" }
            if !Self.isAuthority(raw, value) { return "invalid host header" }
            return nil
        }
    }

    /// The authority of an absolute-form target (`scheme://authority[/path][?query]`), or nil for another form.
    static func absoluteAuthority(_ raw: UnsafeRawBufferPointer, _ target: Range<Int>) -> Range<Int>? {
        guard let first = target.first, raw[first] != UInt8(ascii: "/"), raw[first] != UInt8(ascii: "*") else {
            return nil
        }
        var i = first
        while i < target.upperBound, raw[i] != UInt8(ascii: ":") {
            let c = asciiLower(raw[i])
            let schemeByte =
                (c >= UInt8(ascii: "a") && c <= UInt8(ascii: "z"))
                || (i > first
                    && (c &- UInt8(ascii: "0") < 10 || c == UInt8(ascii: "+") || c == UInt8(ascii: "-")
                        || c == UInt8(ascii: ".")))
            guard schemeByte else { return nil }
            i += 1
        }
        guard i > first, i + 2 < target.upperBound, raw[i + 1] == UInt8(ascii: "/"), raw[i + 2] == UInt8(ascii: "/")
        else { return nil }
        let start = i + 3
        var end = start
        while end < target.upperBound, raw[end] != UInt8(ascii: "/"), raw[end] != UInt8(ascii: "?"),
            raw[end] != UInt8(ascii: "#")
        {
            end += 1
        }
        return start..<end
    }

    /// One non-empty authority (`host[:port]`, an IP literal in brackets): unreserved, sub-delims other than
    /// the comma (a list), `%`, `:`, `[`, `]`.
    static func isAuthority(_ raw: UnsafeRawBufferPointer, _ range: Range<Int>) -> Bool {
        guard !range.isEmpty else { return false }
        for i in range {
            let c = raw[i]
            switch c {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"):
                continue
            case UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "%"),
                UInt8(ascii: "!"), UInt8(ascii: "$"), UInt8(ascii: "&"), UInt8(ascii: "'"), UInt8(ascii: "("),
                UInt8(ascii: ")"), UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: ";"), UInt8(ascii: "="),
                UInt8(ascii: ":"), UInt8(ascii: "["), UInt8(ascii: "]"):
                continue
            default:
                return false
            }
        }
        return true
    }

    /// Every protocol the Upgrade field names (`websocket`, `h2c`, `foo/2`: the name before a `/`) is allowed.
    static func upgradeAllowed(_ head: HTTPHead, _ allowed: Set<String>) -> Bool {
        guard let index = head.upgradeField, !allowed.isEmpty else { return false }
        var all = true
        var any = false
        head.bytes.withUnsafeReadableBytes { raw in
            HTTPParser.forEachListElement(raw, head.fields[index].value) { token in
                any = true
                let slash = HTTPBytes.find(UInt8(ascii: "/"), in: raw, from: token.lowerBound)
                let name = token.lowerBound..<min(slash ?? token.upperBound, token.upperBound)
                if !allowed.contains(where: { HTTPBytes.equalsIgnoringCase(raw, name, $0) }) { all = false }
            }
        }
        return any && all
    }

    /// The last `count` elements of a comma-separated list (a range of `head`'s bytes, without the comma
    /// before it), or the whole list when it has no more.
    static func lastElements(_ head: HTTPHead, _ list: Range<Int>, _ count: Int) -> Range<Int> {
        head.bytes.withUnsafeReadableBytes { raw in
            var seen = 0
            var i = list.upperBound
            while i > list.lowerBound {
                i -= 1
                if raw[i] == UInt8(ascii: ",") {
                    seen += 1
                    if seen == count {
                        var start = i + 1
                        while start < list.upperBound, HTTPBytes.isBlank(raw[start]) { start += 1 }
                        return start..<list.upperBound
                    }
                }
            }
            return list
        }
    }
}
