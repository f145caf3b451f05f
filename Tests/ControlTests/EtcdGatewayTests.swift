import Foundation
import Testing

@testable import Control

/// The etcd v3 JSON gateway's messages, as etcd 3.4 writes and reads them: snake_case names, 64-bit numbers as
/// strings, bytes as base64. Each message names its keys itself (no key strategy).
@Suite struct EtcdGatewayTests {
    /// What `EtcdClient` sends, as a JSON object (the encoder's member order is not fixed).
    func sent(_ value: some Encodable) throws -> NSDictionary {
        let data = try EtcdClient.encoder.encode(value)
        return try #require(try JSONSerialization.jsonObject(with: data) as? NSDictionary)
    }

    func json(_ text: String) throws -> NSDictionary {
        try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? NSDictionary)
    }

    @Test("answers of a real etcd 3.4 gateway: a range, a transaction, watch lines")
    func decodesTheGatewaysAnswers() throws {
        let decoder = EtcdClient.decoder()
        let range = try decoder.decode(
            RangeResponse.self,
            from: Data(
                #"{"header":{"cluster_id":"7801232528081817440","member_id":"13458989633860879742","revision":"2","raft_term":"2"},"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1","value":"Yg=="}],"count":"1"}"#
                    .utf8
            )
        )
        #expect(range.header?.revision?.value == 2)
        let kv = try #require(range.kvs?.first)
        #expect(kv.key.string == "a" && kv.value?.string == "b")
        #expect(kv.createRevision?.value == 2 && kv.mod == 2 && kv.version?.value == 1)
        let txn = try decoder.decode(
            TxnResponse.self,
            from: Data(
                #"{"header":{"revision":"2"},"succeeded":true,"responses":[{"response_range":{"header":{"revision":"2"},"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1","value":"Yg=="}],"count":"1"}}]}"#
                    .utf8
            )
        )
        #expect(txn.succeeded == true)
        #expect(txn.responses?.first?.responseRange?.kvs?.first?.mod == 2)
        let change = try decoder.decode(
            WatchLine.self,
            from: Data(
                #"{"result":{"header":{"revision":"4"},"events":[{"kv":{"key":"YQ==","create_revision":"2","mod_revision":"3","version":"2","value":"Yw=="},"prev_kv":{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1","value":"Yg=="}},{"type":"DELETE","kv":{"key":"YQ==","mod_revision":"4"}}]}}"#
                    .utf8
            )
        )
        let events = try #require(change.result?.events)
        #expect(events.count == 2)
        #expect(events[0].type == nil && events[0].kv.mod == 3 && events[0].prevKv?.value?.string == "b")
        #expect(events[1].type == "DELETE" && events[1].kv.mod == 4)
        let compacted = try decoder.decode(
            WatchLine.self,
            from: Data(
                #"{"result":{"header":{"revision":"9"},"canceled":true,"compact_revision":"5","cancel_reason":"mvcc: required revision has been compacted"}}"#
                    .utf8
            )
        )
        #expect(compacted.result?.canceled == true && compacted.result?.compactRevision?.value == 5)
        #expect(compacted.result?.cancelReason?.contains("compacted") == true)
    }

    @Test("requests in the gateway's names")
    func encodesRequestsInTheGatewaysNames() throws {
        #expect(
            try self.sent(
                WatchRequest(
                    createRequest: WatchCreateRequest(
                        key: EtcdBytes("a"),
                        rangeEnd: EtcdBytes("b"),
                        startRevision: EtcdInt(7),
                        progressNotify: true,
                        prevKv: true
                    )
                )
            )
                == self.json(
                    #"{"create_request":{"key":"YQ==","range_end":"Yg==","start_revision":"7","progress_notify":true,"prev_kv":true}}"#
                )
        )
        var txn = TxnRequest()
        txn.compare = [Compare.modified(Array("a".utf8), at: 2)]
        txn.success = [RequestOp.put(Array("a".utf8), Array("c".utf8)), RequestOp.delete(Array("x".utf8), end: [0])]
        txn.failure = [RequestOp.range(Array("a".utf8))]
        #expect(
            try self.sent(txn)
                == self.json(
                    #"{"compare":[{"result":"EQUAL","target":"MOD","key":"YQ==","mod_revision":"2"}],"success":[{"request_put":{"key":"YQ==","value":"Yw=="}},{"request_delete_range":{"key":"eA==","range_end":"AA=="}}],"failure":[{"request_range":{"key":"YQ=="}}]}"#
                )
        )
        #expect(
            try self.sent(RangeRequest(key: EtcdBytes([0]), limit: EtcdInt(1), keysOnly: true, countOnly: true))
                == self.json(#"{"key":"AA==","limit":"1","keys_only":true,"count_only":true}"#)
        )
    }
}
