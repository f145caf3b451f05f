import NIOCore
import NIOHTTP1
import Synchronization

/// One kept-alive connection for small requests repeated forever (a node's heartbeats): requests
/// go one at a time over the same connection, so a TLS handshake is paid once per connection, not
/// once per request. The connection opens on first use and again after it fails or the server
/// closes it; a request that fails on a connection reused from an earlier one is retried once on
/// a fresh connection (the server may have closed it while idle).
public final class HTTPKeepAliveClient: Sendable {
    public let base: HTTPClient
    private let current = Mutex<Worker?>(nil)

    public init(_ base: HTTPClient) {
        self.base = base
    }

    public var endpoint: HTTPEndpoint { self.base.endpoint }

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
        let generation = self.base.tls?.provider().generation ?? 0
        let (worker, replaced) = self.current.withLock { w -> (Worker, Worker?) in
            if let existing = w, existing.isOpen, existing.generation == generation { return (existing, nil) }
            // A new TLS context (a renewed client certificate): the next request goes over a new connection.
            let fresh = Worker(client: self.base, generation: generation)
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

    struct Job: Sendable {
        var head: HTTPRequestHead
        var body: ByteBuffer?
        var answer: CheckedContinuation<HTTPClientResponse, any Error>
    }

    /// Owns one connection on its own task; takes jobs in order until the connection ends.
    final class Worker: Sendable {
        let jobs: AsyncStream<Job>.Continuation
        /// The generation of the TLS context its connection was made with.
        let generation: UInt64
        private let open = Atomic<Bool>(true)
        private let task: Mutex<Task<Void, Never>?>

        init(client: HTTPClient, generation: UInt64) {
            self.generation = generation
            let (stream, continuation) = AsyncStream.makeStream(of: Job.self)
            self.jobs = continuation
            self.task = Mutex(nil)
            let task = Task {
                await self.run(client: client, jobs: stream)
                self.open.store(false, ordering: .releasing)
                continuation.finish()
                // Jobs queued behind a failed exchange never reached the server: retry them.
                for await job in stream {
                    job.answer.resume(
                        throwing: Failure(error: HTTPClientError("the connection closed"), reused: true)
                    )
                }
            }
            self.task.withLock { $0 = task }
        }

        var isOpen: Bool { self.open.load(ordering: .acquiring) }

        func submit(_ head: HTTPRequestHead, _ body: ByteBuffer?) async throws -> HTTPClientResponse {
            try await withCheckedThrowingContinuation { c in
                if case .terminated = self.jobs.yield(Job(head: head, body: body, answer: c)) {
                    c.resume(throwing: Failure(error: HTTPClientError("the connection closed"), reused: true))
                }
            }
        }

        func stop() {
            self.open.store(false, ordering: .releasing)
            self.jobs.finish()
        }

        private func run(client: HTTPClient, jobs: AsyncStream<Job>) async {
            var iterator = jobs.makeAsyncIterator()
            // Connect when the first job arrives.
            guard let first = await iterator.next() else { return }
            let connection: HTTPClient.Connection
            let recorder: TLSErrorRecorder
            do {
                (connection, recorder) = try await client.connect()
            } catch {
                self.open.store(false, ordering: .releasing)
                first.answer.resume(throwing: Failure(error: error, reused: false))
                return
            }
            let channel = connection.channel
            let endpoint = client.endpoint
            let limit = client.maxResponseBytes
            let timeout = client.requestTimeout
            var job: Job? = first
            var served = 0
            do {
                try await connection.executeThenClose { inbound, outbound in
                    var responses = inbound.makeAsyncIterator()
                    while let current = job {
                        let timedOut = Flag()
                        let timer = channel.eventLoop.scheduleTask(in: timeout) {
                            timedOut.set()
                            channel.close(promise: nil)
                        }
                        defer { timer.cancel() }
                        let response: HTTPClientResponse
                        do {
                            var parts: [HTTPClientRequestPart] = [.head(current.head)]
                            if let b = current.body { parts.append(.body(.byteBuffer(b))) }
                            parts.append(.end(nil))
                            try await outbound.write(contentsOf: parts)
                            response = try await HTTPClient.readResponse(&responses, endpoint: endpoint, limit: limit)
                        } catch {
                            let reason: any Error
                            if let tls = recorder.reason {
                                reason = HTTPClientError("request to \(endpoint) failed: \(tls)")
                            } else if timedOut.isSet {
                                reason = HTTPClientError(
                                    "\(endpoint) did not answer within \(timeout.nanoseconds / 1_000_000_000)s"
                                )
                            } else if error is HTTPClientError {
                                reason = error
                            } else {
                                reason = HTTPClientError("request to \(endpoint) failed: \(HTTPClient.describe(error))")
                            }
                            // A timeout is not retried: the server may be slow, not gone.
                            self.open.store(false, ordering: .releasing)
                            current.answer.resume(
                                throwing: Failure(error: reason, reused: served > 0 && !timedOut.isSet)
                            )
                            job = nil
                            return
                        }
                        served += 1
                        let closing = response.headers[canonicalForm: "connection"].contains {
                            $0.lowercased() == "close"
                        }
                        if closing { self.open.store(false, ordering: .releasing) }
                        current.answer.resume(returning: response)
                        job = closing ? nil : await iterator.next()
                    }
                }
            } catch {
                self.open.store(false, ordering: .releasing)
                job?.answer.resume(throwing: Failure(error: error, reused: served > 0))
            }
        }
    }
}
