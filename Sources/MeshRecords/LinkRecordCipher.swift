import CBoringAEAD
import NIOCore

/// Why a link record was refused. Any of them ends the link: a record layer does not resynchronise.
public enum LinkRecordError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The outer content type is not application data (23).
    case notApplicationData(UInt8)
    /// The record's legacy version is not 0x0303.
    case badVersion(UInt16)
    /// The record's length is over 2^14 + 256 (RFC 8446 5.2) or too short to hold a tag and a content type.
    case badLength(Int)
    /// The record did not authenticate (altered, replayed, reordered, or sealed with another key).
    case authenticationFailed(record: UInt64)
    /// The inner plaintext was all padding.
    case noContentType
    /// An inner content type a link never sends after its handshake (handshake messages, change cipher spec, ...).
    case unexpectedContentType(UInt8)
    /// An alert other than close_notify, or a malformed one.
    case alert(level: UInt8, description: UInt8)
    /// A record's content over 2^14 bytes.
    case contentTooLong(Int)

    public var description: String {
        switch self {
        case .notApplicationData(let t): return "link record of outer type \(t), not application data (23)"
        case .badVersion(let v): return "link record of version 0x\(String(v, radix: 16)), not 0x0303"
        case .badLength(let n): return "link record of \(n) bytes (17...\(LinkRecordCipher.maxCiphertext) allowed)"
        case .authenticationFailed(let n): return "link record \(n) did not authenticate"
        case .noContentType: return "link record with no content type (all padding)"
        case .unexpectedContentType(let t): return "link record of inner type \(t) after the handshake"
        case .alert(let level, let d): return "link alert level \(level) description \(d)"
        case .contentTooLong(let n): return "link record content of \(n) bytes, over 16384"
        }
    }
}

/// One direction of a link's record layer: TLS 1.3 record protection (RFC 8446 5.2-5.3) with AES-128-GCM, its
/// key and IV derived from the direction's traffic secret as TLS 1.3 derives them, the nonce the IV XOR the
/// record number, the 5-byte record header as additional data, and the content type inside the sealed
/// plaintext. After `recordsPerKey` records both ends move to the next secret ("traffic upd", RFC 8446 7.2),
/// counting records rather than signalling it, which a byte stream in order allows.
///
/// The AEAD is BoringSSL's `EVP_AEAD_CTX`, set up once per key (CBoringAEAD): 2,722 instructions per 100-byte
/// record sealed and opened, against 21,085 through swift-crypto's `AES.GCM`, which sets up the key and
/// builds `Data` values on every call (perf/aead/profile).
public final class LinkRecordCipher {
    public static let headerLength = 5
    public static let tagLength = 16
    /// The largest content of one record (2^14).
    public static let maxContent = 16_384
    /// The largest record body (ciphertext and tag) accepted (RFC 8446: 2^14 + 256).
    public static let maxCiphertext = 16_384 + 256
    /// Records per key before the next secret: well below the 2^24.5 full records RFC 8446 5.5 allows AES-GCM.
    public static let defaultRecordsPerKey: UInt64 = 1 << 23

    public enum ContentType: UInt8, Sendable {
        case alert = 21
        case handshake = 22
        case applicationData = 23
    }

    /// The AEAD's key schedule (~580 bytes); nil after ``releaseKey()`` until the next record needs it.
    private var context: OpaquePointer?
    /// The AES key the context is set up from, and the IV and the current record's nonce (their first 12
    /// bytes): inline, not three arrays on the heap.
    private var key: SIMD16<UInt8>
    private var iv: SIMD16<UInt8>
    private var nonce: SIMD16<UInt8>
    private var secret: [UInt8]
    private let hash: TLS13KeySchedule.Hash
    private let recordsPerKey: UInt64
    /// The record number under the current key.
    public private(set) var sequence: UInt64 = 0
    /// How many times the key moved on.
    public private(set) var keyUpdates = 0
    /// Records sealed or opened in all.
    public private(set) var records: UInt64 = 0

    public init(
        secret: [UInt8],
        hash: TLS13KeySchedule.Hash,
        recordsPerKey: UInt64 = LinkRecordCipher.defaultRecordsPerKey
    ) {
        precondition(recordsPerKey > 0)
        self.secret = secret
        self.hash = hash
        self.recordsPerKey = recordsPerKey
        (self.key, self.iv) = Self.keys(secret, hash)
        self.nonce = self.iv
    }

    deinit {
        self.releaseKey()
    }

    /// The AES key and the IV of a traffic secret (RFC 8446 7.3).
    private static func keys(
        _ secret: [UInt8],
        _ hash: TLS13KeySchedule.Hash
    ) -> (key: SIMD16<UInt8>, iv: SIMD16<UInt8>) {
        let key = TLS13KeySchedule.expandLabel(hash, secret: secret, label: "key", context: [], length: 16)
        let iv = TLS13KeySchedule.expandLabel(hash, secret: secret, label: "iv", context: [], length: 12)
        var k = SIMD16<UInt8>()
        var v = SIMD16<UInt8>()
        for i in 0..<16 { k[i] = key[i] }
        for i in 0..<12 { v[i] = iv[i] }
        return (k, v)
    }

    /// The AEAD context of the current key, set up now if it was released.
    private func keyContext() -> OpaquePointer {
        if let context = self.context { return context }
        let made = withUnsafeBytes(of: self.key) { key in
            CNIOBoringSSL_EVP_AEAD_CTX_new(
                CNIOBoringSSL_EVP_aead_aes_128_gcm(),
                key.baseAddress!.assumingMemoryBound(to: UInt8.self),
                16,
                16
            )
        }
        guard let context = made else {
            preconditionFailure("BoringSSL could not set up an AES-128-GCM key")
        }
        self.context = context
        return context
    }

    /// Frees the AEAD's key schedule, which the next record sets up again from the key (a few hundred
    /// nanoseconds): a connection idle most of its life (an HTTP watch) keeps 16 bytes of key per direction
    /// instead of ~580 bytes of schedule. The records are the same either way.
    public func releaseKey() {
        guard let context = self.context else { return }
        CNIOBoringSSL_EVP_AEAD_CTX_free(context)
        self.context = nil
    }

    /// The nonce of the current record: the IV XOR the record number (big-endian, in the last 8 bytes).
    private func setNonce() {
        let n = self.sequence
        for i in 0..<8 {
            self.nonce[11 - i] = self.iv[11 - i] ^ UInt8(truncatingIfNeeded: n >> (8 * UInt64(i)))
        }
    }

    private func advance() {
        self.records += 1
        self.sequence += 1
        guard self.sequence == self.recordsPerKey else { return }
        self.secret = TLS13KeySchedule.expandLabel(
            self.hash,
            secret: self.secret,
            label: "traffic upd",
            context: [],
            length: self.hash.length
        )
        self.releaseKey()  // the next record sets up the new key
        (self.key, self.iv) = Self.keys(self.secret, self.hash)
        self.nonce = self.iv
        self.sequence = 0
        self.keyUpdates += 1
    }

    /// Seals `content` (at most `maxContent` bytes) as one record of inner type `type`, written at `out`'s
    /// writer index: the header, the sealed content, then the sealed type and the tag.
    public func seal(_ content: UnsafeRawBufferPointer, type: ContentType, into out: inout ByteBuffer) {
        precondition(content.count <= Self.maxContent, "a record holds at most \(Self.maxContent) bytes")
        let length = content.count + 1 + Self.tagLength
        var header: (UInt8, UInt8, UInt8, UInt8, UInt8) = (23, 3, 3, UInt8(length >> 8), UInt8(length & 0xFF))
        var inner = type.rawValue
        self.setNonce()
        let context = self.keyContext()
        withUnsafeBytes(of: &header) { ad in
            out.writeBytes(ad)
            out.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { dest in
                let base = dest.baseAddress!.assumingMemoryBound(to: UInt8.self)
                var tagLength = 0
                let ok = withUnsafeBytes(of: self.nonce) { nonce in
                    withUnsafeBytes(of: &inner) { extra in
                        CNIOBoringSSL_EVP_AEAD_CTX_seal_scatter(
                            context,
                            base,
                            base + content.count,
                            &tagLength,
                            1 + Self.tagLength,
                            nonce.baseAddress!.assumingMemoryBound(to: UInt8.self),
                            12,
                            content.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? UnsafePointer(base),
                            content.count,
                            extra.baseAddress!.assumingMemoryBound(to: UInt8.self),
                            1,
                            ad.baseAddress!.assumingMemoryBound(to: UInt8.self),
                            Self.headerLength
                        )
                    }
                }
                precondition(ok == 1 && tagLength == 1 + Self.tagLength, "BoringSSL failed to seal a record")
                return length
            }
        }
        self.advance()
    }

    /// Seals `content` as records of at most `maxContent` bytes each (one record when it is empty).
    public func seal(_ content: ByteBuffer, type: ContentType = .applicationData, into out: inout ByteBuffer) {
        content.withUnsafeReadableBytes { bytes in
            var start = 0
            repeat {
                let end = min(bytes.count, start + Self.maxContent)
                self.seal(UnsafeRawBufferPointer(rebasing: bytes[start..<end]), type: type, into: &out)
                start = end
            } while start < bytes.count
        }
    }

    /// The length of the record (header and body) that starts `bytes` once its header is there, nil before;
    /// throws as soon as the header is wrong (its first byte alone can be).
    public static func expectedLength(in bytes: UnsafeRawBufferPointer) throws(LinkRecordError) -> Int? {
        guard bytes.count >= 1 else { return nil }
        guard bytes[0] == ContentType.applicationData.rawValue else { throw .notApplicationData(bytes[0]) }
        guard bytes.count >= Self.headerLength else { return nil }
        let version = UInt16(bytes[1]) << 8 | UInt16(bytes[2])
        guard version == 0x0303 else { throw .badVersion(version) }
        let length = Int(bytes[3]) << 8 | Int(bytes[4])
        guard length >= 1 + Self.tagLength, length <= Self.maxCiphertext else { throw .badLength(length) }
        return Self.headerLength + length
    }

    /// The length of the whole record (header and body) at the start of `bytes` when it is all there, nil when
    /// more bytes are needed; throws as soon as the header is wrong.
    public static func recordLength(in bytes: UnsafeRawBufferPointer) throws(LinkRecordError) -> Int? {
        guard let length = try Self.expectedLength(in: bytes), bytes.count >= length else { return nil }
        return length
    }

    /// Opens the record at the start of `bytes` when it is all there, appending its content to `out`: its
    /// length (to consume) and inner content type; nil when more bytes are needed.
    public func openFirst(
        _ bytes: UnsafeRawBufferPointer,
        into out: inout ByteBuffer
    ) throws(LinkRecordError) -> (length: Int, type: UInt8)? {
        guard let length = try Self.recordLength(in: bytes) else { return nil }
        return (length, try self.open(UnsafeRawBufferPointer(rebasing: bytes[0..<length]), into: &out))
    }

    /// Opens one whole record (`record`: header and body, as `recordLength` measured it), appending its content
    /// to `out`, and returns its inner content type. On a failure `out` is as it was.
    public func open(_ record: UnsafeRawBufferPointer, into out: inout ByteBuffer) throws(LinkRecordError) -> UInt8 {
        let body = record.count - Self.headerLength
        self.setNonce()
        let context = self.keyContext()
        let start = out.writerIndex
        let opened = out.writeWithUnsafeMutableBytes(minimumWritableBytes: body) { dest in
            var length = 0
            let ok = withUnsafeBytes(of: self.nonce) { nonce in
                CNIOBoringSSL_EVP_AEAD_CTX_open(
                    context,
                    dest.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    &length,
                    dest.count,
                    nonce.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    12,
                    record.baseAddress!.assumingMemoryBound(to: UInt8.self) + Self.headerLength,
                    body,
                    record.baseAddress!.assumingMemoryBound(to: UInt8.self),
                    Self.headerLength
                )
            }
            return ok == 1 ? length : 0
        }
        // A body holds at least a tag and a content type (`recordLength`), so a record that opened is never empty.
        guard opened > 0 else {
            throw .authenticationFailed(record: self.records)
        }
        // The content type is the last byte that is not zero (the rest is padding).
        var end = out.writerIndex
        while end > start, out.getInteger(at: end - 1, as: UInt8.self) == 0 { end -= 1 }
        guard end > start else {
            out.moveWriterIndex(to: start)
            throw .noContentType
        }
        let type = out.getInteger(at: end - 1, as: UInt8.self)!
        out.moveWriterIndex(to: end - 1)
        guard end - 1 - start <= Self.maxContent else {
            out.moveWriterIndex(to: start)
            throw .contentTooLong(end - 1 - start)
        }
        self.advance()
        return type
    }
}
