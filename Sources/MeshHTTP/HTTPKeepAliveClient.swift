import NIOCore
import NIOHTTP1
import Synchronization

/// One kept-alive connection for small requests repeated forever (a node's heartbeats), and for one
/// long stream beside them (its watch): requests go one at a time over the same connection, so a TLS
/// handshake is paid once per connection, not once per request. The connection opens on first use and
/// again after it fails or the server closes it; a request that fails on a connection reused from an
/// earlier one is retried once on a fresh connection (the server may have closed it while idle).
///
/// While a stream is read (``stream(_:_:headers:consume:)``), a request sent goes on the same connection
/// behind it. A MeshHTTP server ends a pushed body (a watch) when its client sends the next request on a
/// kept-alive connection, and answers the request after it; the watcher resumes from its last version. A
/// server that ends the stream's connection instead (`Connection: close` in its head) gets the request on a
/// new connection.
public final class HTTPKeepAliveClient: Sendable {
    private let target: Mutex<HTTPClient>
    private let current = Mutex<Worker?>(nil)

    public init(_ base: HTTPClient) {
        self.target = Mutex(base)
    }

    /// The client its connections are made with (its endpoint moves with ``move(to:)``).
    public var base: HTTPClient { self.target.withLock { $0 } }

    public var endpoint: HTTPEndpoint { self.base.endpoint }

    /// Another replica of the same server: the kept connection closes (once a stream under way on it is given
    /// back) and the next request opens one to `endpoint`. Everyone sharing this client moves with it.
    public func move(to endpoint: HTTPEndpoint) {
        let changed = self.target.withLock { base -> Bool in
            defer { base.endpoint = endpoint }
            return base.endpoint != endpoint
        }
        if changed { self.close() }
    }

    /// Sends one request over the kept connection and reads the whole response.
    public func send(
        _ method: HTTPMethod,
        _ path: String,
        headers: HTTPHeaders = [:],
        body: ByteBuffer? = nil
    ) async throws -> HTTPClientResponse {
        let head = self.base.head(
            method,
            path,
            headers,
            bodyLength: body?.readableBytes ?? (method == .GET ? nil : 0),
            keepAlive: true
        )
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await self.worker().submit(head, body)
            } catch let failure as Failure {
                if failure.reused && attempt == 1 { continue }
                throw failure.error
            }
        }
    }

    /// Sends one request over the kept connection and hands the response head and its body chunks to
    /// `consume` as they arrive. A request sent meanwhile goes behind it (see the type's description); the
    /// connection stays for the next request when the body was read to its end and the server keeps it. One
    /// stream at a time: a second one waits until the first ends.
    public func stream<T: Sendable>(
        _ method: HTTPMethod,
        _ path: String,
        headers: HTTPHeaders = [:],
        consume: (HTTPResponseHead, inout ResponseBodyStream) async throws -> T
    ) async throws -> T {
        let head = self.base.head(method, path, headers, bodyLength: nil, keepAlive: true)
        var attempt = 0
        while true {
            attempt += 1
            let lease: StreamLease
            do {
                lease = try await self.worker().submitStream(head)
            } catch let failure as Failure {
                if failure.reused && attempt == 1 { continue }
                throw failure.error
            }
            var body = ResponseBodyStream(iterator: lease.handoff.iterator)
            do {
                let result = try await consume(lease.head, &body)
                lease.giveBack(body)
                return result
            } catch {
                lease.giveBack(body)
                throw error
            }
        }
    }

    deinit {
        self.close()
    }

    /// Closes the kept connection (a later `send` opens another).
    public func close() {
        let w = self.current.withLock { w -> Worker? in
            defer { w = nil }
            return w
        }
        w?.stop()
    }

    private func worker() -> Worker {
        let base = self.base
        let generation = base.tls?.provider().generation ?? 0
        let (worker, replaced) = self.current.withLock { w -> (Worker, Worker?) in
            if let existing = w, existing.isOpen, existing.generation == generation { return (existing, nil) }
            // A new TLS context (a renewed client certificate): the next request goes over a new connection.
            let fresh = Worker(client: base, generation: generation)
            defer { w = fresh }
            return (fresh, w)
        }
        replaced?.stop()
        return worker
    }

    /// Why a request failed, and whether it went over a connection that had served one before.
    struct Failure: Error {
        var error: any Error
        var reused: Bool
    }

    /// A connection's responses, handed from the worker to a stream's reader and back. One holder at a time: the
    /// worker until it resumes the reader with it, the reader until it gives it back (`StreamLease.giveBack`).
    final class Handoff: @unchecked Sendable {
        var iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator
        /// The stream's body was read to its end: the next response can be read.
        var ended = false

        init(_ iterator: NIOAsyncChannelInboundStream<HTTPClientResponsePart>.AsyncIterator) {
            self.iterator = iterator
        }
    }

    /// A stream's response head and its body, lent to the stream's reader until it gives them back.
    struct StreamLease: Sendable {
        var head: HTTPResponseHead
        let handoff: Handoff
        let events: AsyncStream<Worker.Event>.Continuation

        func giveBack(_ body: ResponseBodyStream) {
            self.handoff.iterator = body.iterator
            self.handoff.ended = body.ended
            self.events.yield(.returned(self.handoff))
        }
    }

    struct Job: Sendable {
        enum Answer: Sendable {
            case whole(CheckedContinuation<HTTPClientResponse, any Error>)
            case stream(CheckedContinuation<StreamLease, any Error>)
        }
        var head: HTTPRequestHead
        var body: ByteBuffer?
        var answer: Answer

        func fail(_ error: any Error) {
            switch self.answer {
            case .whole(let c): c.resume(throwing: error)
            case .stream(let c): c.resume(throwing: error)
            }
        }

        var isStream: Bool {
            if case .stream = self.answer { return true }
            return false
        }
    }

    /// A request written and not yet answered, with its time limit.
    struct InFlight {
        var job: Job
        var timer: Scheduled<Void>
        var timedOut: Flag
    }

    /// Owns one connection on its own task; takes jobs in order until the connection ends.
    final class Worker: Sendable {
        enum Event: Sendable {
            case job(Job)
            /// A stream's reader gave its body back.
            case returned(Handoff)
            /// No more jobs: the connection closes once a stream under way is given back.
            case stop
        }

        let events: AsyncStream<Event>.Continuation
        /// The generation of the TLS context its connection was made with.
        let generation: UInt64
        private let open = Atomic<Bool>(true)

        init(client: HTTPClient, generation: UInt64) {
            self.generation = generation
            let (stream, continuation) = AsyncStream.makeStream(of: Event.self)
            self.events = continuation
            Task {
                await self.run(client: client, events: stream)
                self.open.store(false, ordering: .releasing)
                continuation.finish()
                // Jobs queued behind a failed exchange never reached the server: retry them.
                for await event in stream {
                    if case .job(let job) = event { job.fail(Self.closed) }
                }
            }
        }

        static var closed: Failure { Failure(error: HTTPClientError("the connection closed"), reused: true) }

        var isOpen: Bool { self.open.load(ordering: .acquiring) }

        func submit(_ head: HTTPRequestHead, _ body: ByteBuffer?) async throws -> HTTPClientResponse {
            try await withCheckedThrowingContinuation { c in
                if case .terminated = self.events.yield(.job(Job(head: head, body: body, answer: .whole(c)))) {
                    c.resume(throwing: Self.closed)
                }
            }
        }

        func submitStream(_ head: HTTPRequestHead) async throws -> StreamLease {
            try await withCheckedThrowingContinuation { c in
                if case .terminated = self.events.yield(.job(Job(head: head, body: nil, answer: .stream(c)))) {
                    c.resume(throwing: Self.closed)
                }
            }
        }

        func stop() {
            self.open.store(false, ordering: .releasing)
            self.events.yield(.stop)
        }

        private func run(client: HTTPClient, events: AsyncStream<Event>) async {
            var incoming = events.makeAsyncIterator()
            // Connect when the first job arrives.
            var first: Job?
            while first == nil {
                switch await incoming.next() {
                case .job(let job): first = job
                case .returned: continue
                case .stop, nil: return
                }
            }
            let connection: HTTPClient.Connection
            let recorder: TLSErrorRecorder
            do {
                (connection, recorder) = try await client.connect()
            } catch {
                self.open.store(false, ordering: .releasing)
                first?.fail(Failure(error: error, reused: false))
                return
            }
            let channel = connection.channel
            let endpoint = client.endpoint
            let limit = client.maxResponseBytes
            let timeout = client.requestTimeout
            var queue = [first!]
            var pipelined: InFlight?
            var served = 0
            var stopping = false

            func send(
                _ job: Job,
                _ outbound: NIOAsyncChannelOutboundWriter<HTTPClientRequestPart>
            ) async throws
                -> InFlight
            {
                let timedOut = Flag()
                let timer = channel.eventLoop.scheduleTask(in: timeout) {
                    timedOut.set()
                    channel.close(promise: nil)
                }
                var parts: [HTTPClientRequestPart] = [.head(job.head)]
                if let b = job.body { parts.append(.body(.byteBuffer(b))) }
                parts.append(.end(nil))
                try await outbound.write(contentsOf: parts)
                return InFlight(job: job, timer: timer, timedOut: timedOut)
            }
            /// Why a request failed, in words.
            func reason(_ error: any Error, _ timedOut: Bool) -> any Error {
                if let tls = recorder.reason { return HTTPClientError("request to \(endpoint) failed: \(tls)") }
                if timedOut {
                    return HTTPClientError("\(endpoint) did not answer within \(timeout.nanoseconds / 1_000_000_000)s")
                }
                if error is HTTPClientError { return error }
                return HTTPClientError("request to \(endpoint) failed: \(HTTPClient.describe(error))")
            }
            /// An answer that could not be read: retried on a fresh connection when this one had served before and
            /// did not time out.
            func readFailure(_ error: any Error, _ timedOut: Flag) -> Failure {
                Failure(error: reason(error, timedOut.isSet), reused: served > 0 && !timedOut.isSet)
            }
            /// The connection ends: what is queued never reached the server (retried); a request written behind a
            /// stream may have (not retried, as a timeout is not: the server may be slow, not gone).
            func failTheRest(_ error: any Error) {
                self.open.store(false, ordering: .releasing)
                var unsent = queue[...]
                if let p = pipelined {  // the first in the queue
                    p.timer.cancel()
                    p.job.fail(Failure(error: error, reused: false))
                    pipelined = nil
                    unsent = unsent.dropFirst()
                }
                for job in unsent { job.fail(Self.closed) }
                queue = []
            }

            do {
                try await connection.executeThenClose { inbound, outbound in
                    var responses = inbound.makeAsyncIterator()
                    while true {
                        if queue.isEmpty {
                            if stopping { return }
                            switch await incoming.next() {
                            case .job(let job): queue.append(job)
                            case .returned: continue
                            case .stop, nil: return
                            }
                            continue
                        }
                        let job = queue.removeFirst()
                        var current: InFlight
                        do {
                            // A request written behind a stream is the first in the queue.
                            if let p = pipelined {
                                current = p
                                pipelined = nil
                            } else {
                                current = try await send(job, outbound)
                            }
                        } catch {
                            job.fail(Failure(error: reason(error, false), reused: served > 0))
                            failTheRest(Self.closed.error)
                            return
                        }
                        defer { current.timer.cancel() }
                        switch job.answer {
                        case .whole(let answer):
                            let response: HTTPClientResponse
                            do {
                                response = try await HTTPClient.readResponse(
                                    &responses,
                                    endpoint: endpoint,
                                    limit: limit
                                )
                            } catch {
                                job.fail(readFailure(error, current.timedOut))
                                failTheRest(Self.closed.error)
                                return
                            }
                            served += 1
                            answer.resume(returning: response)
                            if Self.closes(response.headers) {
                                failTheRest(Self.closed.error)
                                return
                            }
                        case .stream(let answer):
                            let head: HTTPResponseHead
                            do {
                                head = try await HTTPClient.readHead(&responses, endpoint: endpoint)
                            } catch {
                                job.fail(readFailure(error, current.timedOut))
                                failTheRest(Self.closed.error)
                                return
                            }
                            current.timer.cancel()  // a stream has no time limit once its head is in
                            served += 1
                            let keeps = !Self.closes(head.headers)
                            // A server that ends the stream's connection: the requests that come meanwhile go to a
                            // new one.
                            if !keeps { self.open.store(false, ordering: .releasing) }
                            let handoff = Handoff(responses)
                            answer.resume(returning: StreamLease(head: head, handoff: handoff, events: self.events))
                            // Until the reader gives the body back, a request that comes is written behind it (the
                            // server ends the body for it); further ones wait their turn.
                            var back: Handoff?
                            while back == nil {
                                switch await incoming.next() {
                                case .returned(let h): back = h
                                case .stop: stopping = true
                                case nil:  // cannot happen while this runs (the events end after it)
                                    failTheRest(Self.closed.error)
                                    return
                                case .job(let next):
                                    if keeps, pipelined == nil, queue.isEmpty, !next.isStream {
                                        do {
                                            pipelined = try await send(next, outbound)
                                        } catch {
                                            next.fail(Failure(error: reason(error, false), reused: true))
                                            continue
                                        }
                                    } else if !keeps {
                                        next.fail(Self.closed)
                                        continue
                                    }
                                    queue.append(next)
                                }
                            }
                            responses = back!.iterator
                            guard back!.ended, keeps else {
                                failTheRest(HTTPClientError("the connection closed before the stream on it ended"))
                                return
                            }
                        }
                    }
                }
            } catch {
                failTheRest(Self.closed.error)
            }
        }

        /// The answer says the server closes the connection after it.
        static func closes(_ headers: HTTPHeaders) -> Bool {
            headers[canonicalForm: "connection"].contains { $0.lowercased() == "close" }
        }

    }
}
