// swift-tools-version:6.1
// Benchmarks: one nested package, kept out of the main package so that `swift test` never builds them.
// It depends on the root package's library products (MeshAgent, MeshClient, ...), so it always measures
// the working tree. Run the benchmarks through `perf/run` (see README.md beside this file), which builds
// in release mode. SwiftPM caches the root package's manifest here until this file changes: after a change of
// ../Package.swift that matters to these builds (e.g. CNetlink, a C target since the libnl dlopen), edit or touch it.
import PackageDescription

let swiftSettings: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "mesh-perf",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "edge-mesh", path: ".."),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
    ],
    targets: [
        // What the benchmarks share (process figures from /proc).
        .target(name: "PerfSupport", path: "Sources/PerfSupport", swiftSettings: swiftSettings),
        // What a record costs to seal and open (perf/aead/profile): swift-crypto against the link record layer
        // (MeshRecords.LinkRecordCipher, on BoringSSL's EVP_AEAD).
        .executableTarget(
            name: "aead-bench",
            dependencies: [
                .product(name: "MeshRecords", package: "edge-mesh"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Sources/AEADBench",
            swiftSettings: swiftSettings
        ),
        // Data-plane benchmarks: our proxy (the MeshAgent library's DataPlane with one route), test
        // backends, the open-loop load generator, a bulk-transfer client and the quiet check.
        .executableTarget(
            name: "mesh-proxy-bench",
            dependencies: [
                .product(name: "MeshAgent", package: "edge-mesh"),
                .product(name: "MeshCore", package: "edge-mesh"),
                .product(name: "MeshHTTP", package: "edge-mesh"),
                .product(name: "MeshIdentity", package: "edge-mesh"),
                .product(name: "MeshRecords", package: "edge-mesh"),
                .product(name: "MeshWire", package: "edge-mesh"),
                .product(name: "Relay", package: "edge-mesh"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Sources/ProxyBench",
            swiftSettings: swiftSettings
        ),
        // Watch fan-out of the control plane (perf/control-watch).
        .executableTarget(
            name: "control-watch-bench",
            dependencies: [
                .product(name: "MeshClient", package: "edge-mesh"),
                .product(name: "MeshCore", package: "edge-mesh"),
                .product(name: "MeshHTTP", package: "edge-mesh"),
                .product(name: "MeshIdentity", package: "edge-mesh"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                "PerfSupport",
            ],
            path: "Sources/ControlWatch",
            swiftSettings: swiftSettings
        ),
        // Node heartbeats against the control plane (perf/node-heartbeat).
        .executableTarget(
            name: "node-heartbeat-bench",
            dependencies: [
                .product(name: "MeshClient", package: "edge-mesh"),
                .product(name: "MeshCore", package: "edge-mesh"),
                .product(name: "MeshHTTP", package: "edge-mesh"),
                .product(name: "MeshIdentity", package: "edge-mesh"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                "PerfSupport",
            ],
            path: "Sources/NodeHeartbeat",
            swiftSettings: swiftSettings
        ),
        // N simulated agents against mesh-control replicas over etcd (perf/scale).
        .executableTarget(
            name: "scale-bench",
            dependencies: [
                .product(name: "MeshClient", package: "edge-mesh"),
                .product(name: "MeshCore", package: "edge-mesh"),
                .product(name: "MeshHTTP", package: "edge-mesh"),
                .product(name: "MeshIdentity", package: "edge-mesh"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                "PerfSupport",
            ],
            path: "Sources/ScaleBench",
            swiftSettings: swiftSettings
        ),
    ]
)
