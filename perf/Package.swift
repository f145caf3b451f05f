// swift-tools-version:6.1
// Benchmarks, kept out of the main package so `swift test` never builds them. Run them through
// the scripts beside this file (perf/control-watch, ...), which build in release mode.
import PackageDescription

let package = Package(
    name: "mesh-perf",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "edge-mesh", path: ".."),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
    ],
    targets: [
        .executableTarget(
            name: "control-watch-bench",
            dependencies: [
                .product(name: "MeshClient", package: "edge-mesh"),
                .product(name: "MeshCore", package: "edge-mesh"),
                .product(name: "MeshHTTP", package: "edge-mesh"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Sources/ControlWatch",
            swiftSettings: [.swiftLanguageMode(.v6)]
        )
    ]
)
