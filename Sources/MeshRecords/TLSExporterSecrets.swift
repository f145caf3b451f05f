import NIOCore
import NIOSSL
import Synchronization

/// The exporter secrets (RFC 8446 7.1) of TLS 1.3 handshakes by client random, as BoringSSL logs them through
/// NIOSSL's key-log callback (`EXPORTER_SECRET <client random> <secret>`; every other line is ignored): how a
/// link learns the secret its record layer derives its keys from (MeshRecords). A link takes its entry when
/// its handshake completes; the entries of handshakes that never complete (a refused certificate) go oldest
/// first past `capacity`. A client random seen in two handshakes yields no secret to either. Secrets are kept
/// in memory only, never written anywhere.
public final class TLSExporterSecrets: Sendable {
    private struct State {
        var byRandom: [[UInt8]: [UInt8]] = [:]
        var order: [[UInt8]] = []
    }

    private let state = Mutex(State())
    public let capacity: Int

    public init(capacity: Int = 1024) {
        self.capacity = capacity
    }

    /// The key-log callback to set on a `TLSConfiguration`.
    public var callback: NIOSSLKeyLogCallback {
        { [self] line in self.record(line) }
    }

    /// Entries waiting to be taken.
    public var count: Int { self.state.withLock { $0.byRandom.count } }

    func record(_ line: ByteBuffer) {
        let text = String(buffer: line)
        let fields = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
        guard fields.count == 3, fields[0] == "EXPORTER_SECRET",
            let random = Self.bytes(hex: fields[1]), random.count == 32,
            let secret = Self.bytes(hex: fields[2]), secret.count == 32 || secret.count == 48
        else { return }
        self.state.withLock { s in
            // Two handshakes with one client random (a ClientHello replayed by someone on the path) must not
            // hand either link the other's secret: the entry becomes empty, and both links fail to take one.
            let earlier = s.byRandom.updateValue(secret, forKey: random)
            if earlier == nil {
                s.order.append(random)
            } else if earlier != secret {
                s.byRandom[random] = []
            }
            while s.byRandom.count > self.capacity, !s.order.isEmpty {
                s.byRandom.removeValue(forKey: s.order.removeFirst())
            }
        }
    }

    /// The exporter secret of the handshake whose ClientHello carried `clientRandom`, removed as it is taken.
    public func take(clientRandom: [UInt8]) -> [UInt8]? {
        self.state.withLock { s in
            guard let secret = s.byRandom.removeValue(forKey: clientRandom) else { return nil }
            if let i = s.order.firstIndex(of: clientRandom) { s.order.remove(at: i) }
            return secret.isEmpty ? nil : secret
        }
    }

    static func bytes(hex: Substring) -> [UInt8]? {
        guard hex.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(hex.count / 2)
        var high: UInt8?
        for c in hex.utf8 {
            let v: UInt8
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): v = c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): v = c - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): v = c - UInt8(ascii: "A") + 10
            default: return nil
            }
            if let h = high {
                out.append(h << 4 | v)
                high = nil
            } else {
                high = v
            }
        }
        return out
    }
}
