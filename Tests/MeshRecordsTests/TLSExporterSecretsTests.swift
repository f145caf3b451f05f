import MeshRecords
import NIOCore
import Testing

/// The key-log lines a link's record layer takes its exporter secret from.
@Suite struct TLSExporterSecretsTests {
    static let random = String(repeating: "ab", count: 32)
    static let secret = String(repeating: "0f", count: 32)

    func line(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

    @Test func keepsExporterSecretsByClientRandomUntilTaken() {
        let secrets = TLSExporterSecrets()
        let log = secrets.callback
        log(self.line("CLIENT_TRAFFIC_SECRET_0 \(Self.random) \(Self.secret)\n"))
        log(self.line("EXPORTER_SECRET \(Self.random) \(Self.secret)\n"))
        log(self.line("EXPORTER_SECRET \(Self.random.prefix(62)) \(Self.secret)\n"))  // a short random
        log(self.line("EXPORTER_SECRET \(Self.random) zz\n"))  // not hex
        log(self.line("EXPORTER_SECRET \(Self.random) \(String(repeating: "01", count: 40))\n"))  // 40 bytes
        #expect(secrets.count == 1)
        let random = [UInt8](repeating: 0xAB, count: 32)
        #expect(secrets.take(clientRandom: random) == [UInt8](repeating: 0x0F, count: 32))
        #expect(secrets.take(clientRandom: random) == nil)
        #expect(secrets.count == 0)
    }

    @Test func aClientRandomSeenTwiceGivesNoSecretAndOldEntriesGo() {
        let secrets = TLSExporterSecrets(capacity: 2)
        let log = secrets.callback
        log(self.line("EXPORTER_SECRET \(Self.random) \(Self.secret)\n"))
        log(self.line("EXPORTER_SECRET \(Self.random) \(String(repeating: "1e", count: 48))\n"))
        #expect(secrets.take(clientRandom: [UInt8](repeating: 0xAB, count: 32)) == nil)
        for r in ["01", "02", "03"] {
            log(self.line("EXPORTER_SECRET \(String(repeating: r, count: 32)) \(Self.secret)\n"))
        }
        #expect(secrets.count == 2)
        #expect(secrets.take(clientRandom: [UInt8](repeating: 1, count: 32)) == nil)
        #expect(secrets.take(clientRandom: [UInt8](repeating: 3, count: 32)) != nil)
    }
}
