import NIOCore
import NIOHTTP1

/// Entry point for the libFuzzer target `http-desync` (Sources/mesh-fuzz): one pooled upstream connection
/// as the proxy uses it, without a socket. Not part of the module's API.
@_spi(Fuzzing)
public enum HTTPDesyncFuzzing {
    /// The input is a backend's byte stream: after two bytes (the first picks the lengths of the reads,
    /// the second the methods of the requests), segments separated by 0xFF, each what the backend writes
    /// while one request is in flight, read in pieces. A request is sent at the end of a segment, and
    /// only when the exchange before it would give the connection back to its pool
    /// (`HTTPExchange.upstreamReturnsToPool`: its response ended exactly at the end of what was read, both
    /// keep-alive); the parser's one-response-per-request rule (`HTTPParser.nextResponsePart`) frames the
    /// reads. Traps when:
    /// - a part is delivered while no request is waiting for one, or after the final end of a response;
    /// - any byte of a response comes from a read made before its request was sent (a byte meant for
    ///   someone else: what desyncs clients);
    /// - a connection is pooled while bytes are left or the parser is paused.
    public static func fuzzOne(_ input: UnsafeRawBufferPointer) {
        if let violation = Self.check(Array(input)).violation { fatalError(violation) }
    }

    /// The check of `fuzzOne`: the violation found, if any, and how many requests the connection carried.
    static func check(_ bytes: [UInt8]) -> (violation: String?, requests: Int) {
        guard bytes.count >= 2 else { return (nil, 0) }
        let cut = Int(bytes[0] % 61) + 1
        let methods: [HTTPMethod] = [.GET, .HEAD, .POST, .GET]
        var parser = HTTPParser(kind: .response)
        var buffer = ByteBuffer()
        // Bytes read so far, and how many of them had been read when the request in flight was sent.
        var read = 0
        var sentAt = 0
        var request = 0
        func send() {
            parser.expectResponse(to: methods[(Int(bytes[1]) >> (2 * (request % 4))) & 3])
            sentAt = read
            request += 1
        }
        send()
        var exchange = Exchange()
        for segment in bytes[2...].split(separator: 0xFF, omittingEmptySubsequences: false) {
            if exchange.ended {
                // The one before ended cleanly, and nothing came behind it: the connection is reused.
                exchange = Exchange()
                send()
            }
            var offset = segment.startIndex
            while offset < segment.endIndex {
                let end = min(offset + cut + (offset % 7), segment.endIndex)
                buffer.writeBytes(segment[offset..<end])
                read += end - offset
                offset = end
                while true {
                    let consumedBefore = read - buffer.readableBytes
                    let part: HTTPPart?
                    do {
                        part = try parser.nextResponsePart(&buffer, held: 0)
                    } catch {
                        return (nil, request)  // the connection closes: nobody gets anything more from it
                    }
                    guard let part else { break }
                    guard consumedBefore >= sentAt else {
                        return ("request \(request) got bytes read before it was sent", request)
                    }
                    guard !exchange.ended else {
                        return ("a part after the end of response \(request)", request)
                    }
                    exchange.take(part)
                    if exchange.ended {
                        // Closed, not pooled, unless it ended cleanly.
                        guard exchange.reusable, parser.endedAtBoundary else { return (nil, request) }
                        guard buffer.readableBytes == 0, !parser.isPaused else {
                            return ("pooled with \(buffer.readableBytes) bytes left or paused", request)
                        }
                    }
                }
            }
        }
        return (nil, request)
    }

    /// What the proxy's exchange tracks of one response here: its final head's keep-alive, its end.
    struct Exchange {
        var final = false
        var ended = false
        var reusable = true

        mutating func take(_ part: HTTPPart) {
            switch part {
            case .head(let head):
                self.final = head.status >= 200 || head.status == 101
                if head.status == 101 || !head.isKeepAlive { self.reusable = false }
            case .end:
                if self.final { self.ended = true }
            case .body:
                break
            }
        }
    }
}
