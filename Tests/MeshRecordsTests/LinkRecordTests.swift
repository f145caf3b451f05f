import MeshTestSupport
import NIOCore
import NIOEmbedded
import Testing

@testable import MeshRecords

private func buffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }

/// The key schedule and the record codec, byte for byte. Vectors: RFC 8448 section 3 for HKDF-Expand-Label;
/// the rest computed independently with Python's `cryptography` (OpenSSL's HKDF and AES-GCM), as in
/// Sources/MeshRecords/README.md "Test vectors".
@Suite struct LinkRecordTests {
    /// A direction's traffic secret of the record vectors: bytes 100...131.
    static let secret = Array(UInt8(100)...UInt8(131))
    static let hello = Array("hello link".utf8)

    @Test func expandLabelMatchesRFC8448() {
        // RFC 8448 3, "{server} derive write traffic keys for handshake data".
        let prk = hex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
        #expect(
            TLS13KeySchedule.expandLabel(.sha256, secret: prk, label: "key", context: [], length: 16)
                == hex("3fce516009c21727d0f2e4e86ee403bc")
        )
        #expect(
            TLS13KeySchedule.expandLabel(.sha256, secret: prk, label: "iv", context: [], length: 12)
                == hex("5d313eb2671276ee13000b30")
        )
    }

    @Test func exporterAndDirectionSecrets() throws {
        let secrets = try #require(LinkRecordSecrets(exporterSecret: Array(0...31)))
        #expect(secrets.hash == .sha256)
        #expect(secrets.dialerToAcceptor == hex("6c9b1b50d01fd38c05377a14164d89df006a7c8827cff509e2479743dc75fdc2"))
        #expect(secrets.acceptorToDialer == hex("3f82ec354fa27113c080200387f95b2724fe4992e265dd4d97bff9004645acbc"))
        #expect(secrets.directions(dialer: true).send == secrets.directions(dialer: false).receive)
        #expect(secrets.directions(dialer: false).send == secrets.directions(dialer: true).receive)
        let sha384 = try #require(LinkRecordSecrets(exporterSecret: Array(0...47)))
        #expect(sha384.hash == .sha384)
        #expect(
            sha384.dialerToAcceptor
                == hex(
                    "244269e30d380363f6a3d6bbe52e072ed92f0bb7cf5939a451e2faa1f215f2c8f37235f27ab0682a25cc7e984156069e"
                )
        )
        #expect(LinkRecordSecrets(exporterSecret: Array(0...30)) == nil)
        #expect(LinkRecordSecrets(exporterSecret: []) == nil)
    }

    @Test func sealsTLS13RecordsByteForByte() {
        let cipher = LinkRecordCipher(secret: Self.secret, hash: .sha256)
        var out = ByteBuffer()
        cipher.seal(buffer(Self.hello), into: &out)
        #expect(Array(out.readableBytesView) == hex("170303001bf8c128d5055b00c43e5c45f66802541135fca02d2728863575555e"))
        out.clear()
        cipher.seal(buffer(Self.hello), into: &out)
        #expect(Array(out.readableBytesView) == hex("170303001b058388fbcc3bb6ade389e1af4d578caf673b2873d41de1cf34ebc2"))
        #expect(cipher.sequence == 2 && cipher.records == 2 && cipher.keyUpdates == 0)
    }

    @Test func movesToTheNextSecretAfterRecordsPerKey() {
        let cipher = LinkRecordCipher(secret: Self.secret, hash: .sha256, recordsPerKey: 2)
        var out = ByteBuffer()
        for _ in 0..<3 { cipher.seal(buffer(Self.hello), into: &out) }
        #expect(cipher.keyUpdates == 1 && cipher.sequence == 1)
        // The third record, under "traffic upd" of the secret, record number 0 again.
        #expect(
            Array(out.readableBytesView.suffix(32))
                == hex("170303001b25b47eb255a9fa05ef0cc7805e411f7d04285fb1c0748d9fde500b")
        )
        let reader = LinkRecordCipher(secret: Self.secret, hash: .sha256, recordsPerKey: 2)
        var plain = ByteBuffer()
        for _ in 0..<3 {
            #expect(throws: Never.self) { try Self.openOne(reader, &out, into: &plain) }
        }
        #expect(String(buffer: plain) == "hello link" + "hello link" + "hello link")
    }

    @Test func aKeyReleasedBetweenRecordsChangesNoByte() {
        // Across a key update (every 2 records): the same records whether the schedule is kept or set up again.
        let kept = LinkRecordCipher(secret: Self.secret, hash: .sha256, recordsPerKey: 2)
        let released = LinkRecordCipher(secret: Self.secret, hash: .sha256, recordsPerKey: 2)
        var a = ByteBuffer()
        var b = ByteBuffer()
        for i in 0..<5 {
            let content = buffer(Self.hello + [UInt8(i)])
            kept.seal(content, into: &a)
            released.seal(content, into: &b)
            released.releaseKey()
            if i == 2 { released.releaseKey() }  // twice is nothing
        }
        #expect(Array(a.readableBytesView) == Array(b.readableBytesView))
        #expect(released.keyUpdates == 2)
        let reader = LinkRecordCipher(secret: Self.secret, hash: .sha256, recordsPerKey: 2)
        var plain = ByteBuffer()
        for _ in 0..<5 {
            #expect(throws: Never.self) { try Self.openOne(reader, &b, into: &plain) }
            reader.releaseKey()
        }
        #expect(plain.readableBytes == 5 * (Self.hello.count + 1))
    }

    @Test func sealsAnAlertAndSplitsLargeContent() {
        let cipher = LinkRecordCipher(secret: Self.secret, hash: .sha256)
        var out = ByteBuffer()
        cipher.seal(buffer([1, 0]), type: .alert, into: &out)
        #expect(Array(out.readableBytesView) == hex("170303001391a45193e40aa6f4bdf65d6c47cfd8a5712196"))
        out.clear()
        let big = (0..<40_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        cipher.seal(buffer(big), into: &out)
        #expect(cipher.records == 1 + 3)  // 16384 + 16384 + 7232
        #expect(out.readableBytes == 40_000 + 3 * 22)
        let reader = LinkRecordCipher(secret: Self.secret, hash: .sha256)
        var plain = ByteBuffer()
        var alert = ByteBuffer()
        var first = buffer(hex("170303001391a45193e40aa6f4bdf65d6c47cfd8a5712196"))
        #expect(throws: Never.self) { try Self.openOne(reader, &first, into: &alert) }
        for _ in 0..<3 {
            #expect(throws: Never.self) { try Self.openOne(reader, &out, into: &plain) }
        }
        #expect(Array(plain.readableBytesView) == big)
    }

    @Test func opensPaddingAndRefusesWhatDoesNotAuthenticate() throws {
        // Inner plaintext "hi", type 23, four bytes of zero padding.
        var padded = buffer(hex("1703030017f8cd53b96a7b6cc7c2e504ba8d1708a884d90028be31e1"))
        var plain = ByteBuffer()
        let type = try Self.openOne(LinkRecordCipher(secret: Self.secret, hash: .sha256), &padded, into: &plain)
        #expect(type == 23 && String(buffer: plain) == "hi")

        // All padding: no content type.
        var zeros = buffer(hex("170303001390a4441082db32ca8e0629279d82b3506ee5b3"))
        #expect(throws: LinkRecordError.noContentType) {
            try Self.openOne(LinkRecordCipher(secret: Self.secret, hash: .sha256), &zeros, into: &plain)
        }

        let record0 = hex("170303001bf8c128d5055b00c43e5c45f66802541135fca02d2728863575555e")
        let record1 = hex("170303001b058388fbcc3bb6ade389e1af4d578caf673b2873d41de1cf34ebc2")
        // Every single bit flipped, header included, is refused (the header is the additional data).
        for i in 0..<record0.count {
            for bit in 0..<8 {
                var flipped = record0
                flipped[i] ^= UInt8(1 << bit)
                var b = buffer(flipped)
                var out = ByteBuffer()
                #expect(throws: (any Error).self) {
                    try Self.openOne(LinkRecordCipher(secret: Self.secret, hash: .sha256), &b, into: &out)
                }
                #expect(out.readableBytes == 0)
            }
        }
        // Replayed and reordered records do not open: the record number is in the nonce.
        let reader = LinkRecordCipher(secret: Self.secret, hash: .sha256)
        var b0 = buffer(record0)
        _ = try Self.openOne(reader, &b0, into: &plain)
        var again = buffer(record0)
        #expect(throws: LinkRecordError.authenticationFailed(record: 1)) {
            try Self.openOne(reader, &again, into: &plain)
        }
        var reordered = buffer(record1)
        #expect(throws: LinkRecordError.authenticationFailed(record: 0)) {
            try Self.openOne(LinkRecordCipher(secret: Self.secret, hash: .sha256), &reordered, into: &plain)
        }
        // Another secret.
        var b1 = buffer(record0)
        #expect(throws: LinkRecordError.authenticationFailed(record: 0)) {
            try Self.openOne(LinkRecordCipher(secret: Array(0...31), hash: .sha256), &b1, into: &plain)
        }
    }

    @Test func headersOutOfBoundsAreRefusedBeforeTheBodyArrives() throws {
        func length(_ bytes: [UInt8]) throws -> Int? {
            try bytes.withUnsafeBytes { try LinkRecordCipher.recordLength(in: $0) }
        }
        #expect(throws: LinkRecordError.notApplicationData(22)) { try length([22]) }
        #expect(throws: LinkRecordError.badVersion(0x0301)) { try length([23, 3, 1, 0, 20]) }
        #expect(throws: LinkRecordError.badLength(16)) { try length([23, 3, 3, 0, 16]) }
        #expect(throws: LinkRecordError.badLength(16_641)) { try length([23, 3, 3, 0x41, 0x01]) }
        #expect(try length([]) == nil)
        #expect(try length([23, 3, 3, 0]) == nil)
        #expect(try length([23, 3, 3, 0, 17] + Array(repeating: 0, count: 16)) == nil)
        #expect(try length([23, 3, 3, 0, 17] + Array(repeating: 0, count: 17)) == 22)
        #expect(try length([23, 3, 3, 0x41, 0x00]) == nil)  // 16640: the largest, waiting for its body
    }

    /// Opens the record at the front of `bytes` into `plain`, consuming it.
    @discardableResult
    static func openOne(
        _ cipher: LinkRecordCipher,
        _ bytes: inout ByteBuffer,
        into plain: inout ByteBuffer
    ) throws(LinkRecordError) -> UInt8 {
        let result: Result<UInt8, LinkRecordError> = bytes.readWithUnsafeReadableBytes { all in
            do throws(LinkRecordError) {
                guard let (n, type) = try cipher.openFirst(all, into: &plain) else {
                    return (0, .failure(.badLength(-1)))
                }
                return (n, .success(type))
            } catch {
                return (0, .failure(error))
            }
        }
        return try result.get()
    }
}

/// `SealedRecordHandler` on EmbeddedChannels: two ends of a link joined by hand.
@Suite struct SealedRecordHandlerTests {
    let secrets = LinkRecordSecrets(exporterSecret: Array(0...31))!

    /// A dialer's and an acceptor's channel, each with its handler; started unless `started` is false.
    func pair(
        started: Bool = true,
        keepsKeys: Bool = true
    ) throws -> (
        dialer: EmbeddedChannel, acceptor: EmbeddedChannel, acceptorHandler: SealedRecordHandler
    ) {
        let d = EmbeddedChannel()
        let a = EmbeddedChannel()
        let dh = SealedRecordHandler(secrets: self.secrets, dialer: true, keepsKeys: keepsKeys)
        let ah = SealedRecordHandler(secrets: self.secrets, dialer: false, keepsKeys: keepsKeys)
        try d.pipeline.syncOperations.addHandler(dh)
        try a.pipeline.syncOperations.addHandler(ah)
        if started {
            dh.start(context: try d.pipeline.syncOperations.context(handler: dh))
            ah.start(context: try a.pipeline.syncOperations.context(handler: ah))
        }
        // Active, as a link's channel is: a closed channel is then told apart from one never opened.
        try d.connect(to: SocketAddress(ipAddress: "198.18.0.1", port: 7900)).wait()
        try a.connect(to: SocketAddress(ipAddress: "198.18.0.2", port: 7900)).wait()
        return (d, a, ah)
    }

    /// Moves what `from` wrote to `to`, `chunk` bytes per read.
    func carry(_ from: EmbeddedChannel, _ to: EmbeddedChannel, chunk: Int = .max) throws -> Int {
        var moved = 0
        while var out = try from.readOutbound(as: ByteBuffer.self) {
            moved += out.readableBytes
            while out.readableBytes > 0 {
                let piece = out.readSlice(length: min(chunk, out.readableBytes))!
                try to.writeInbound(piece)
            }
        }
        return moved
    }

    func drain(_ channel: EmbeddedChannel) throws -> [UInt8] {
        var got: [UInt8] = []
        while let b = try channel.readInbound(as: ByteBuffer.self) { got += Array(b.readableBytesView) }
        return got
    }

    /// Both ways, with the key schedules kept (a link) and set up for each read and flush (HTTP).
    @Test(arguments: [true, false]) func bothWaysFedByteByByte(keepsKeys: Bool) throws {
        let (d, a, _) = try self.pair(keepsKeys: keepsKeys)
        let request = Array("GET / HTTP/1.1\r\n\r\n".utf8)
        let written = d.writeAndFlush(ByteBuffer(bytes: request))
        let wire = try self.carry(d, a, chunk: 1)
        #expect(wire == request.count + 22)
        #expect(try self.drain(a) == request)
        try written.wait()
        let reply = (0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        a.write(ByteBuffer(bytes: Array(reply[..<100])), promise: nil)
        a.write(ByteBuffer(bytes: Array(reply[100...])), promise: nil)
        a.flush()
        _ = try self.carry(a, d, chunk: 1000)
        #expect(try self.drain(d) == reply)
    }

    @Test func aTamperedRecordEndsTheLinkWithItsReason() throws {
        let (d, a, _) = try self.pair()
        d.writeAndFlush(ByteBuffer(bytes: Array("one".utf8)), promise: nil)
        d.writeAndFlush(ByteBuffer(bytes: Array("two".utf8)), promise: nil)
        var first = try #require(try d.readOutbound(as: ByteBuffer.self))
        var second = try #require(try d.readOutbound(as: ByteBuffer.self))
        try a.writeInbound(first.readSlice(length: first.readableBytes)!)
        var bytes = Array(second.readableBytesView)
        bytes[bytes.count - 1] ^= 0x80
        second = ByteBuffer(bytes: bytes)
        #expect(throws: LinkRecordError.authenticationFailed(record: 1)) { try a.writeInbound(second) }
        #expect(try self.drain(a) == Array("one".utf8))
        #expect(!a.isActive)
    }

    @Test func garbageIsRefusedAtTheHeader() throws {
        let (_, a, _) = try self.pair()
        #expect(throws: LinkRecordError.notApplicationData(0x47)) {
            try a.writeInbound(ByteBuffer(bytes: Array("GET / HTTP/1.1\r\n".utf8)))
        }
        #expect(!a.isActive)
    }

    @Test func closeSendsCloseNotifyAndThePeerClosesAfterWhatCameBefore() throws {
        let (d, a, _) = try self.pair()
        d.write(ByteBuffer(bytes: Array("last words".utf8)), promise: nil)
        let closed = d.close()
        try closed.wait()
        #expect(try self.carry(d, a) == 10 + 22 + 2 + 22)
        #expect(try self.drain(a) == Array("last words".utf8))
        #expect(!a.isActive)
    }

    @Test func recordsBeforeStartWait() throws {
        let (d, a, ah) = try self.pair(started: false)
        d.writeAndFlush(ByteBuffer(bytes: Array("early".utf8)), promise: nil)
        _ = try self.carry(d, a, chunk: 3)
        #expect(try self.drain(a) == [])
        ah.start(context: try a.pipeline.syncOperations.context(handler: ah))
        #expect(try self.drain(a) == Array("early".utf8))
    }

    @Test func anAlertOtherThanCloseNotifyAndAHandshakeRecordEndTheLink() throws {
        for (type, content, error) in [
            (LinkRecordCipher.ContentType.alert, [2, 40] as [UInt8], LinkRecordError.alert(level: 2, description: 40)),
            (.handshake, [24, 0, 0, 1, 0], .unexpectedContentType(22)),
        ] {
            let (_, a, _) = try self.pair()
            let forger = LinkRecordCipher(secret: self.secrets.dialerToAcceptor, hash: .sha256)
            var out = ByteBuffer()
            content.withUnsafeBytes { forger.seal($0, type: type, into: &out) }
            #expect(throws: error) { try a.writeInbound(out) }
            #expect(!a.isActive)
        }
    }
}
