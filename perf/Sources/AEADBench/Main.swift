import ArgumentParser
import CBoringAEAD
import Crypto
import NIOSSL

/// Seals and opens `count` records of `size` bytes (a TLS 1.3 style nonce, 5 bytes of additional data),
/// checking each one, through one of the AEAD interfaces a user-space record layer for peer links could
/// use. perf/aead/profile runs it under callgrind at two counts and reports instructions per record.
@main
struct AEADBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aead-bench",
        abstract: "Seal and open small records through swift-crypto or BoringSSL's EVP_AEAD (perf/aead/profile)."
    )

    enum API: String, ExpressibleByArgument, CaseIterable {
        /// swift-crypto's `AES.GCM` (a key schedule and `Data` values per call).
        case cryptoGCM = "crypto-gcm"
        /// swift-crypto's `ChaChaPoly`.
        case cryptoChaCha = "crypto-chacha"
        /// BoringSSL's `EVP_AEAD_CTX` (AES-128-GCM), set up once and reused, writing into buffers of ours.
        case boringGCM = "boringssl-gcm"
        /// BoringSSL's `EVP_AEAD_CTX` (ChaCha20-Poly1305).
        case boringChaCha = "boringssl-chacha"
    }

    @Option(help: "crypto-gcm | crypto-chacha | boringssl-gcm | boringssl-chacha") var api: API
    @Option(help: "Records to seal and open.") var count = 1000
    @Option(help: "Plaintext bytes per record.") var size = 100

    func run() throws {
        _ = NIOSSLContext.self  // NIOSSL is what links CNIOBoringSSL's definitions in
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
        case .boringGCM, .boringChaCha:
            let gcm = self.api == .boringGCM
            let key = [UInt8](repeating: 0x33, count: gcm ? 16 : 32)
            guard
                let ctx = CNIOBoringSSL_EVP_AEAD_CTX_new(
                    gcm ? CNIOBoringSSL_EVP_aead_aes_128_gcm() : CNIOBoringSSL_EVP_aead_chacha20_poly1305(),
                    key,
                    key.count,
                    16
                )
            else { throw ValidationError("EVP_AEAD_CTX_new failed") }
            defer { CNIOBoringSSL_EVP_AEAD_CTX_free(ctx) }
            var sealed = [UInt8](repeating: 0, count: self.size + 16)
            var plain = [UInt8](repeating: 0, count: self.size + 16)
            for i in 0..<self.count {
                Self.number(&nonce, i)
                var sealedLength = 0
                var plainLength = 0
                guard
                    CNIOBoringSSL_EVP_AEAD_CTX_seal(
                        ctx,
                        &sealed,
                        &sealedLength,
                        sealed.count,
                        nonce,
                        12,
                        message,
                        message.count,
                        ad,
                        ad.count
                    ) == 1,
                    CNIOBoringSSL_EVP_AEAD_CTX_open(
                        ctx,
                        &plain,
                        &plainLength,
                        plain.count,
                        nonce,
                        12,
                        sealed,
                        sealedLength,
                        ad,
                        ad.count
                    ) == 1
                else { throw ValidationError("record \(i) did not seal and open") }
                opened += plainLength
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
