// libFuzzer target for the control plane's parsers (see Control/Fuzzing.swift).
//
// Built by `scripts/fuzz api` with `-sanitize=fuzzer,address -DFUZZING`. In a plain `swift build`
// this is a small replayer: it feeds the files named on the command line through the same checks.
@_spi(Fuzzing) import Control

#if canImport(Glibc)
import Glibc
#endif

#if FUZZING
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTestOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    APIFuzzing.fuzzOne(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func llvmFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<CInt>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

// Debug builds link an executable's `main` as `<module>_main`: start libFuzzer's driver from it.
@_cdecl("api_fuzz_main")
public func apiFuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var vector = argv
    return llvmFuzzerRunDriver(&count, &vector) { data, size in fuzzTestOneInput(data, size) }
}
#else
@main
enum APIFuzzReplay {
    static func main() {
        var count = 0
        for path in CommandLine.arguments.dropFirst() {
            guard let f = fopen(path, "rb") else {
                print("api-fuzz: cannot open \(path)")
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
            bytes.withUnsafeBytes { APIFuzzing.fuzzOne($0) }
            count += 1
        }
        print("api-fuzz: replayed \(count) input(s) without a failure")
    }
}
#endif
