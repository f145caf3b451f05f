import ArgumentParser
import Crypto
import MeshRecords
import NIOCore

/// Seals and opens `count` records of `size` bytes (a TLS 1.3 style nonce, 5 bytes of additional data),
/// checking each one, through one of the AEAD interfaces a user-space record layer for peer links could
/// use. perf/aead/profile runs it under callgrind at two counts and reports instructions per record.
@main
struct AEADBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aead-bench",
        abstract: "Seal and open records through swift-crypto or the link record layer (perf/aead/profile)."
    )

    enum API: String, ExpressibleByArgument, CaseIterable {
        /// swift-crypto's `AES.GCM` (a key schedule and `Data` values per call).
        case cryptoGCM = "crypto-gcm"
        /// swift-crypto's `ChaChaPoly`.
        case cryptoChaCha = "crypto-chacha"
        /// The link record layer (`MeshRecords.LinkRecordCipher`): TLS 1.3 records over BoringSSL's `EVP_AEAD_CTX`
        /// (AES-128-GCM), set up once per key, sealing into and opening from `ByteBuffer`s.
        case linkRecords = "link-records"
    }

    @Option(help: "crypto-gcm | crypto-chacha | link-records") var api: API
    @Option(help: "Records to seal and open.") var count = 1000
    @Option(help: "Plaintext bytes per record.") var size = 100

    func run() throws {
        let message = [UInt8](repeating: 0x5a, count: self.size)
        let ad: [UInt8] = [0x17, 0x03, 0x03, 0x00, 0x74]
        var nonce = [UInt8](repeating: 0x01, count: 12)
        var opened = 0
        switch self.api {
        case .cryptoGCM:
            let key = SymmetricKey(size: .bits128)
            for i in 0..<self.count {
                Self.number(&nonce, i)
                let box = try AES.GCM.seal(
                    message,
                    using: key,
                    nonce: try AES.GCM.Nonce(data: nonce),
                    authenticating: ad
                )
                opened += try AES.GCM.open(box, using: key, authenticating: ad).count
            }
        case .cryptoChaCha:
            let key = SymmetricKey(size: .bits256)
            for i in 0..<self.count {
                Self.number(&nonce, i)
                let box = try ChaChaPoly.seal(
                    message,
                    using: key,
                    nonce: try ChaChaPoly.Nonce(data: nonce),
                    authenticating: ad
                )
                opened += try ChaChaPoly.open(box, using: key, authenticating: ad).count
            }
        case .linkRecords:
            let secret = [UInt8](repeating: 0x33, count: 32)
            let sealer = LinkRecordCipher(secret: secret, hash: .sha256)
            let opener = LinkRecordCipher(secret: secret, hash: .sha256)
            let content = ByteBuffer(bytes: message)
            var wire = ByteBuffer()
            var plain = ByteBuffer()
            for i in 0..<self.count {
                wire.clear()
                plain.clear()
                sealer.seal(content, into: &wire)
                let type = try wire.withUnsafeReadableBytes { record in
                    try opener.open(record, into: &plain)
                }
                guard type == 23 else { throw ValidationError("record \(i) opened as type \(type)") }
                opened += plain.readableBytes
            }
        }
        guard opened == self.count * self.size else { throw ValidationError("opened \(opened) bytes") }
        print("aead-bench \(self.api.rawValue): \(self.count) records of \(self.size) bytes sealed and opened")
    }

    /// The record number in the nonce's last 8 bytes (TLS 1.3: the IV XOR the sequence number).
    private static func number(_ nonce: inout [UInt8], _ i: Int) {
        for b in 0..<8 { nonce[11 - b] = 0x01 ^ UInt8(truncatingIfNeeded: i >> (8 * b)) }
    }
}
