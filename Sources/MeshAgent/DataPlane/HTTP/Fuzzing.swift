import NIOCore
import NIOHTTP1

/// Entry point for the libFuzzer target (Sources/mesh-fuzz, MESH_FUZZ_TARGET=http). Not part of the module's API.
@_spi(Fuzzing)
public enum HTTPFuzzing {
    /// Small limits, so that the fuzzer reaches them (and the lines around them) with small inputs.
    static let limits = HTTPParser.Limits(headBytes: 160, fieldBytes: 64)

    /// Feeds one input to `HTTPParser` as requests and as responses, all at once and byte by byte, then
    /// ends the input, and traps (so the fuzzer reports it) when an invariant breaks:
    /// - both feedings deliver the same parts (heads by their bytes, bodies concatenated, ends with their
    ///   trailers), both fail or neither does (with the same error, except where a feeding that sees less
    ///   fails earlier: a size limit reached by an incomplete line, a chunk-size line that cannot start
    ///   one), both pause with the same bytes left;
    /// - every head, body and trailer section is bytes of the input, in order;
    /// - a head's fields are token names and trimmed values within its bytes, and `fieldBytes` is their sum;
    /// - nothing is delivered after an error or after the end.
    public static func fuzzOne(_ input: UnsafeRawBufferPointer) {
        let bytes = Array(input)
        // The request a response answers (HEAD and CONNECT change its framing), picked by the input.
        let method: HTTPMethod = [.GET, .HEAD, .CONNECT][bytes.count % 3]
        for kind in [HTTPParser.Kind.request, .response] {
            let whole = Self.run(bytes, kind: kind, method: method, step: max(bytes.count, 1))
            let single = Self.run(bytes, kind: kind, method: method, step: 1)
            guard whole.parts == single.parts else { fatalError("\(kind): parts differ by how bytes arrive") }
            guard whole.paused == single.paused, whole.left == single.left else {
                fatalError("\(kind): pause or bytes left differ by how bytes arrive")
            }
            switch (whole.error, single.error) {
            case (nil, nil): break
            case (let a?, let b?):
                guard a == b || b.isTooLarge || (a == .invalidLineEnding && b == .invalidChunkSize) else {
                    fatalError("\(kind): errors differ: \(a) at once, \(b) byte by byte")
                }
            default:
                fatalError("\(kind): \(String(describing: whole.error)) at once, \(String(describing: single.error))")
            }
            Self.checkInOrder(whole.parts, of: bytes)
        }
    }

    /// A part as compared: a head by its bytes and what was parsed out of them.
    enum Part: Equatable {
        case head(bytes: [UInt8], fields: [[Int]], body: HTTPHead.Body, status: Int, keepAlive: Bool)
        case body([UInt8])
        case end([UInt8]?)
    }

    struct Outcome {
        var parts: [Part] = []
        var error: HTTPParseError?
        var paused = false
        var left: [UInt8] = []
        /// Body bytes since the last head or end (bodies are compared concatenated).
        var body: [UInt8] = []

        mutating func flushBody() {
            guard !self.body.isEmpty else { return }
            self.parts.append(.body(self.body))
            self.body = []
        }
    }

    static func run(_ bytes: [UInt8], kind: HTTPParser.Kind, method: HTTPMethod, step: Int) -> Outcome {
        var parser = HTTPParser(kind: kind, limits: Self.limits)
        parser.expectResponse(to: method)
        var outcome = Outcome()
        var finished = false
        let emit = { (part: HTTPPart) in
            if finished { fatalError("\(kind): a part after an error or the end") }
            switch part {
            case .head(let head):
                Self.check(head)
                outcome.flushBody()
                outcome.parts.append(
                    .head(
                        bytes: Array(buffer: head.bytes),
                        fields: head.fields.map {
                            [$0.name.lowerBound, $0.name.upperBound, $0.value.lowerBound, $0.value.upperBound]
                        },
                        body: head.body,
                        status: head.status,
                        keepAlive: head.isKeepAlive
                    )
                )
            case .body(let body):
                if body.readableBytes == 0 { fatalError("\(kind): an empty body part") }
                outcome.body.append(contentsOf: body.readableBytesView)
            case .end(let trailers):
                outcome.flushBody()
                outcome.parts.append(.end(trailers.map { Array(buffer: $0) }))
            }
        }
        var buffer = ByteBuffer()
        var offset = 0
        do {
            repeat {
                let end = min(offset + step, bytes.count)
                buffer.writeBytes(bytes[offset..<end])
                offset = end
                try parser.parse(&buffer, emit)
            } while offset < bytes.count
            outcome.paused = parser.isPaused
            outcome.left = Array(buffer: buffer)
            if !parser.isPaused { try parser.finish(&buffer, emit) }
        } catch let error as HTTPParseError {
            outcome.error = error
        } catch {
            fatalError("\(kind): not an HTTPParseError: \(error)")
        }
        outcome.flushBody()
        finished = true
        // Nothing more after an error or the end, whatever comes.
        var more = ByteBuffer(string: "GET / HTTP/1.1\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
        if !outcome.paused { try? parser.parse(&more, emit) }
        return outcome
    }

    /// What a head says about its own bytes.
    static func check(_ head: HTTPHead) {
        head.bytes.withUnsafeReadableBytes { raw in
            guard raw.count >= 4, raw[raw.count - 4] == 0x0d, raw[raw.count - 3] == 0x0a, raw[raw.count - 2] == 0x0d,
                raw[raw.count - 1] == 0x0a
            else { fatalError("a head not ending with a blank line") }
            var sum = 0
            var previous = 0
            for field in head.fields {
                guard field.name.lowerBound >= previous, field.value.upperBound <= raw.count - 4,
                    field.value.lowerBound > field.name.upperBound,
                    !field.name.isEmpty, field.name.allSatisfy({ HTTPBytes.isToken(raw[$0]) }),
                    raw[field.name.upperBound] == HTTPBytes.colon,
                    field.value.allSatisfy({ HTTPBytes.isFieldByte(raw[$0]) }),
                    field.value.isEmpty
                        || (!HTTPBytes.isBlank(raw[field.value.lowerBound])
                            && !HTTPBytes.isBlank(raw[field.value.upperBound - 1]))
                else { fatalError("a field out of its head's bytes or not trimmed") }
                previous = field.value.upperBound
                sum += field.name.count + field.value.count + 4
            }
            guard sum == head.fieldBytes else { fatalError("fieldBytes \(head.fieldBytes), fields \(sum)") }
            guard head.target.upperBound <= raw.count else { fatalError("a target out of its head") }
        }
    }

    /// Every head and trailer section is a run of bytes of the input, and every message's body a subsequence
    /// of them (chunk data without its framing), in order: the earliest match of each after the previous one.
    static func checkInOrder(_ parts: [Part], of input: [UInt8]) {
        var position = 0
        func subsequence(_ bytes: [UInt8]) {
            for byte in bytes {
                while position < input.count, input[position] != byte { position += 1 }
                guard position < input.count else { fatalError("body bytes are not from the input in order") }
                position += 1
            }
        }
        func find(_ bytes: [UInt8]) {
            guard !bytes.isEmpty else { return }
            var start = position
            while start + bytes.count <= input.count {
                if input[start..<start + bytes.count].elementsEqual(bytes) {
                    position = start + bytes.count
                    return
                }
                start += 1
            }
            fatalError("a part's bytes are not from the input in order")
        }
        for part in parts {
            switch part {
            case .head(let bytes, _, _, _, _): find(bytes)
            case .body(let bytes): subsequence(bytes)
            case .end(let trailers): find(trailers ?? [])
            }
        }
    }
}
