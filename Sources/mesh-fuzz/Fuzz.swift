// libFuzzer target for the mesh's parsers. `MESH_FUZZ_TARGET` picks what is fuzzed:
// - `dns`: the DNS decoder and the responder's answer path (DNS/Fuzzing.swift);
// - `api`: the control plane's parsers: bodies, manifests, selectors, config files (Control/Fuzzing.swift);
// - `stun`: the STUN codec, stream framer and Binding responder (Relay/STUN/Fuzzing.swift);
// - `relay`: the relay session messages (Relay/Session/Fuzzing.swift);
// - `http`: the proxy's HTTP/1.1 parser, requests and responses, at once and byte by byte
//   (MeshAgent/DataPlane/HTTP/Fuzzing.swift);
// - `http-desync`: one pooled upstream connection fed a backend's bytes in reads, requests sent only when
//   the connection would go back to its pool: no byte read before a request reaches its response
//   (MeshAgent/DataPlane/HTTP/DesyncFuzzing.swift);
// - `mux`: the yamux frame codec (whole and in pieces), the stream-open header and reply, datagram
//   framing (MeshWire/Fuzzing.swift);
// - `records`: the link record layer: headers and records off the wire, seal and open round trips, a flipped
//   byte refused (MeshRecords/RecordFuzzing.swift);
// - `mqtt`: the MQTT 3.1.1 codec (round trips) and KubeEdge's twin payload decoders (NodeAgent/MQTT/MQTTFuzz.swift).
//
// Built by `scripts/fuzz TARGET` with `-sanitize=fuzzer,address -DFUZZING`: libFuzzer's driver runs.
// In a plain `swift build` this is a small replayer: it feeds the files named on the command line
// (e.g. a crash artifact) through the same checks.
@_spi(Fuzzing) import Control
@_spi(Fuzzing) import DNS
@_spi(Fuzzing) import MeshAgent
@_spi(Fuzzing) import MeshRecords
@_spi(Fuzzing) import MeshWire
import NodeAgent
@_spi(Fuzzing) import Relay

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The target, read once (DNS unless `api`, `stun`, `http` or `mux`).
let fuzzTarget: String = getenv("MESH_FUZZ_TARGET").map { String(cString: $0) } ?? "dns"

func fuzzOne(_ bytes: UnsafeRawBufferPointer) {
    switch fuzzTarget {
    case "api": APIFuzzing.fuzzOne(bytes)
    case "stun": STUNFuzzing.fuzzOne(bytes)
    case "relay": RelaySessionFuzzing.fuzzOne(bytes)
    case "http": HTTPFuzzing.fuzzOne(bytes)
    case "mux": MuxFuzzing.fuzzOne(bytes)
    case "records": LinkRecordFuzzing.fuzzOne(bytes)
    case "http-desync": HTTPDesyncFuzzing.fuzzOne(bytes)
    case "mqtt": MQTTFuzz.check(Array(bytes))
    default: DNSFuzzing.fuzzOne(bytes)
    }
}

#if FUZZING
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    fuzzOne(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

// libFuzzer's own driver entry (LLVM >= 11). Its arguments are three pointers and it returns an int,
// which the Swift and C calling conventions pass alike on the platforms this runs on.
@_silgen_name("LLVMFuzzerRunDriver")
func llvmFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

// Debug builds of SwiftPM executables on Linux link `main` to `<module>_main` (testable executables),
// which hides libFuzzer's `main`: provide that symbol and start libFuzzer's driver from it.
@_cdecl("mesh_fuzz_main")
public func meshFuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var vector = argv
    return llvmFuzzerRunDriver(&count, &vector) { data, size in fuzzTestOneInput(data, size) }
}
#else
@main
enum FuzzReplay {
    static func main() {
        var count = 0
        for path in CommandLine.arguments.dropFirst() {
            guard let f = fopen(path, "rb") else {
                print("mesh-fuzz: cannot open \(path)")
                exit(2)
            }
            var bytes: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = fread(&buf, 1, buf.count, f)
                if n <= 0 { break }
                bytes.append(contentsOf: buf[0..<n])
            }
            fclose(f)
            bytes.withUnsafeBytes { fuzzOne($0) }
            count += 1
        }
        print("mesh-fuzz: replayed \(count) input(s) without a failure")
    }
}
#endif
