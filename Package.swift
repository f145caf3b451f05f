// swift-tools-version:6.1
// The mesh: one package, one folder per module (see DESIGN.md and each module's README.md).
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
    // No unsafe flags on library targets, so that the library products stay usable as a dependency. The
    // release build of mesh-agent passes `-function-sections` on the command line instead (for every module,
    // dependencies too: Sources/mesh-agent/link/README.md).
]

/// mesh-agent's release link on Linux (Sources/mesh-agent/link/README.md): lld, with the functions that
/// start-up and an idle agent run first (`startup.order`, `sections.ld`), relative relocations packed
/// (DT_RELR, glibc >= 2.36) and no symbol table exported to the dynamic linker. Optional: libstdc++ linked
/// statically when `scripts/static-libstdc++` has put a link to the compiler's own `libstdc++.a` in
/// `.build/static-libstdc++` (perf/run does); that folder is searched first by `-lstdc++`, and when it is
/// missing the linker ignores it and takes the shared library.
/// The executable stays position-independent (ASLR): `-no-pie` was measured at ~0.2 MB less and not adopted.
/// Together they keep the idle agent's resident set small: most of it is pages of this binary.
let agentLink = Context.packageDirectory + "/Sources/mesh-agent/link"
let agentLinkerSettings: [LinkerSetting] = [
    .unsafeFlags(
        [
            "-L\(Context.packageDirectory)/.build/static-libstdc++",
            "-use-ld=lld",
            "-Xlinker", "--symbol-ordering-file=\(agentLink)/startup.order",
            "-Xlinker", "--no-warn-symbol-ordering",
            "-Xlinker", "-T", "-Xlinker", "\(agentLink)/sections.ld",
            "-Xlinker", "-z", "-Xlinker", "pack-relative-relocs",
            "-Xlinker", "--no-export-dynamic",
        ],
        .when(platforms: [.linux], configuration: .release)
    )
]

let nio: [Target.Dependency] = [
    .product(name: "NIOCore", package: "swift-nio"),
    .product(name: "NIOPosix", package: "swift-nio"),
]

// Linux only: the data plane runs on epoll and splice, the mesh interface on netlink. The macOS line is
// a deployment target for the manifest's sake, not a claim that it builds there.
let package = Package(
    name: "edge-mesh",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "mesh-control", targets: ["mesh-control"]),
        .executable(name: "mesh-agent", targets: ["mesh-agent"]),
        .executable(name: "meshctl", targets: ["meshctl"]),
        .executable(name: "mesh-relay", targets: ["mesh-relay"]),
        .executable(name: "dns-bench-server", targets: ["dns-bench-server"]),
        .executable(name: "thermostat-mapper", targets: ["thermostat-mapper"]),
        // Libraries, for embedding and for the benchmarks in perf/ (a nested package).
        .library(name: "MeshCore", targets: ["MeshCore"]),
        .library(name: "MeshHTTP", targets: ["MeshHTTP"]),
        .library(name: "MeshIdentity", targets: ["MeshIdentity"]),
        .library(name: "MeshRecords", targets: ["MeshRecords"]),
        .library(name: "MeshClient", targets: ["MeshClient"]),
        .library(name: "Control", targets: ["Control"]),
        .library(name: "DNS", targets: ["DNS"]),
        .library(name: "Relay", targets: ["Relay"]),
        .library(name: "MeshWire", targets: ["MeshWire"]),
        .library(name: "MeshAgent", targets: ["MeshAgent"]),
        .library(name: "NodeAgent", targets: ["NodeAgent"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.0"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.3.0"),
    ],
    targets: [
        // System libraries (pkg-config; scripts/bootstrap installs the -dev packages) and C shims.
        .systemLibrary(
            name: "CSQLite",
            pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]
        ),
        .systemLibrary(name: "CYAML", pkgConfig: "yaml-0.1", providers: [.apt(["libyaml-dev"])]),
        // Headers only (no library): Linux calls Glibc does not export to Swift (epoll, eventfd, accept4, thread names).
        .systemLibrary(name: "CLinux"),
        // Headers only: BoringSSL's AEAD calls, as NIOSSL links them in (the mesh record layer, MeshRecords).
        .systemLibrary(name: "CBoringAEAD"),
        // libnl-3 / libnl-route-3 for the mesh interface, loaded with dlopen on first use (not linked: an
        // agent in loopback mode maps none of it). Building needs no libnl headers: the shim declares what it
        // calls, and LibnlABITests checks that against libnl's headers (found with pkg-config). At run time
        // the mesh interface needs libnl-route-3-200.
        .target(name: "CNetlink"),

        // Shared vocabulary: model, names, config, wire types of the control API.
        .target(
            name: "MeshCore",
            dependencies: [
                "CYAML",
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // The mesh record layer after a TLS 1.3 handshake (links, and control-plane HTTP connections): keys
        // from the handshake's exporter secret, TLS 1.3 records sealed with BoringSSL's AEAD, the NIO handler.
        .target(
            name: "MeshRecords",
            dependencies: [
                "CBoringAEAD",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Identity: keys, certificates, the CA's signing, URI-SAN identities, TLS configurations from files.
        .target(
            name: "MeshIdentity",
            dependencies: [
                "MeshCore", "MeshRecords",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // A thin, owning wrapper over libsqlite3: connections, statements, transactions, migrations.
        .target(
            name: "MeshSQLite",
            dependencies: ["CSQLite"],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // HTTP/1.1 server and client over SwiftNIO: routing, limits, streaming, Prometheus, health.
        .target(
            name: "MeshHTTP",
            dependencies: nio + [
                "MeshCore", "MeshNIO", "MeshRecords", "CLinux",
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Typed client of the control API: CRUD, list + watch with resume.
        .target(
            name: "MeshClient",
            dependencies: [
                "MeshCore", "MeshHTTP", "MeshIdentity", .product(name: "Logging", package: "swift-log"),
                .product(name: "X509", package: "swift-certificates"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Control plane: store (SQLite; etcd later), watch hub, VIP allocation, REST + watch API.
        .target(
            name: "Control",
            dependencies: nio + [
                "MeshCore", "MeshSQLite", "MeshHTTP", "MeshIdentity",
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // DNS: RFC 1035 codec (pure), service zone, UDP+TCP responder, upstream forwarder.
        .target(
            name: "MeshNIO",
            dependencies: ["CLinux", .product(name: "NIOCore", package: "swift-nio")],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "DNS",
            dependencies: nio + [
                "MeshCore", "MeshNIO", "CLinux",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Pure wire codecs, no I/O (NIOCore's ByteBuffer at most): yamux frames, the stream-open header,
        // datagrams in a stream; fuzzers and codec tests link no daemon.
        .target(
            name: "MeshWire",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Reaching a peer: STUN binding server, the stream multiplexer (relay circuits, punching, TLS later).
        .target(
            name: "Relay",
            dependencies: nio + [
                "MeshCore", "MeshHTTP", "MeshNIO", "MeshWire", "MeshClient", "MeshIdentity", "MeshRecords", "CLinux",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: [
                "README.md", "Mux/README.md", "Link/README.md", "Punch/README.md",
                "LinkLoop/README.md",
            ],
            swiftSettings: swiftSettings
        ),
        // Node agent: node registration and heartbeat (workloads, twins, mapper API, outbox later).
        .target(
            name: "NodeAgent",
            dependencies: nio + [
                "MeshCore", "MeshClient", "MeshHTTP", "MeshNIO", "MeshSQLite",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),
        // Mesh agent: service table, mesh interface, L4/L7 proxy, load balancing, admin API.
        .target(
            name: "MeshAgent",
            dependencies: nio + [
                "MeshCore", "MeshSQLite", "MeshHTTP", "MeshClient", "MeshIdentity", "DNS", "CNetlink", "CLinux",
                "MeshWire", "MeshNIO", "Relay",
                "NodeAgent",
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md", "DataPlane/README.md", "DataPlane/HTTPLoop/README.md", "Interface/README.md"],
            swiftSettings: swiftSettings
        ),
        // meshctl's logic: resource names, manifests, printers (table/json/yaml), the all-in-one.
        .target(
            name: "MeshCtl",
            dependencies: [
                "MeshCore", "MeshClient", "Control", "MeshAgent", "MeshIdentity", "MeshHTTP", "Relay",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            exclude: ["README.md"],
            swiftSettings: swiftSettings
        ),

        // Thin executables.
        .executableTarget(
            name: "mesh-control",
            dependencies: [
                "Control", "MeshCore", "MeshHTTP",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "mesh-agent",
            dependencies: [
                "MeshAgent", "MeshCore", "MeshHTTP", "MeshNIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            exclude: ["link"],
            swiftSettings: swiftSettings,
            linkerSettings: agentLinkerSettings
        ),
        .executableTarget(
            name: "mesh-relay",
            dependencies: [
                "Relay", "MeshCore", "MeshHTTP", "MeshNIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "meshctl",
            dependencies: [
                "MeshCtl", "MeshCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings
        ),
        // examples/edge: a simulated thermostat speaking KubeEdge's twin topics (the `meshctl up` demo's mapper).
        .executableTarget(
            name: "thermostat-mapper",
            dependencies: [
                "NodeAgent",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "examples/edge/thermostat-mapper",
            swiftSettings: swiftSettings
        ),
        // A standalone DNS responder over generated names, for perf/dns and manual checks.
        .executableTarget(
            name: "dns-bench-server",
            dependencies: nio + [
                "DNS", "MeshCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // libFuzzer target for the DNS codec and answer path, the control plane's parsers and the
        // STUN codec and responder (scripts/fuzz dns|api|stun); a replayer in a plain build.
        .executableTarget(
            name: "mesh-fuzz",
            dependencies: ["DNS", "Control", "Relay", "MeshAgent", "MeshWire", "MeshRecords", "NodeAgent"],
            swiftSettings: swiftSettings
        ),

        // Tests mirror the modules; MeshTestSupport holds what several test targets share.
        .target(
            name: "MeshTestSupport",
            dependencies: [
                "Control", "MeshClient", "MeshCore", "MeshHTTP", "MeshIdentity", "MeshNIO", "MeshRecords",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            path: "Tests/MeshTestSupport",
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshCoreTests",
            dependencies: ["MeshCore", "MeshTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshIdentityTests",
            dependencies: [
                "MeshIdentity", "MeshCore", "MeshTestSupport",
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshNIOTests",
            dependencies: [
                "MeshNIO", "MeshTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshSQLiteTests",
            dependencies: ["MeshSQLite", "MeshTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshRecordsTests",
            dependencies: nio + [
                "MeshRecords", "MeshTestSupport", .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshHTTPTests",
            dependencies: nio + [
                "MeshHTTP", "MeshTestSupport", .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                // ConnectionBuffersTests: a TLS server with certificates of a throwaway CA.
                "MeshIdentity", .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ControlTests",
            dependencies: nio + [
                "Control", "MeshClient", "MeshCore", "MeshSQLite", "MeshHTTP", "MeshTestSupport", "MeshIdentity",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "X509", package: "swift-certificates"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "DNSTests",
            dependencies: nio + [
                "DNS", "MeshCore", "MeshTestSupport",
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshWireTests",
            dependencies: [
                "MeshWire",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "RelayTests",
            dependencies: nio + [
                "Relay", "MeshCore", "MeshHTTP", "MeshTestSupport", "MeshWire", "MeshClient", "MeshIdentity",
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshAgentTests",
            dependencies: nio + [
                "MeshAgent", "MeshClient", "Control", "MeshCore", "MeshIdentity", "MeshTestSupport", "MeshWire",
                "Relay", "MeshNIO", "NodeAgent",
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "NodeAgentTests",
            dependencies: [
                "NodeAgent", "MeshAgent", "MeshClient", "Control", "MeshCore", "MeshHTTP", "MeshIdentity",
                "MeshTestSupport",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshClientTests",
            dependencies: [
                "MeshClient", "MeshCore", "MeshTestSupport", .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "MeshCtlTests",
            dependencies: [
                "MeshCtl", "MeshCore", "MeshTestSupport", "MeshClient", "MeshHTTP",
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "EndToEndTests",
            dependencies: [
                "MeshCore", "MeshClient", "MeshTestSupport", "MeshIdentity", "MeshHTTP",
                .product(name: "X509", package: "swift-certificates"),
            ],
            swiftSettings: swiftSettings
        ),
    ]
)
