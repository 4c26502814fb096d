// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "lifeboat",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "lifeboat", targets: ["lifeboat"]),
        .library(name: "LifeboatBase", targets: ["LifeboatBase"]),
        .library(name: "LifeboatS3", targets: ["LifeboatS3"]),
        .library(name: "LifeboatRepository", targets: ["LifeboatRepository"]),
        .library(name: "LifeboatFS", targets: ["LifeboatFS"]),
        .library(name: "LifeboatVirt", targets: ["LifeboatVirt"]),
        .library(name: "LifeboatRecovery", targets: ["LifeboatRecovery"]),
        .library(name: "LifeboatReplication", targets: ["LifeboatReplication"]),
        .library(name: "LifeboatService", targets: ["LifeboatService"]),
        .library(name: "LifeboatConsole", targets: ["LifeboatConsole"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/hummingbird-project/swift-mustache", from: "2.1.1"),
        .package(url: "https://github.com/swiftlang/swift-subprocess", from: "1.0.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/hummingbird-project/hummingbird-auth", from: "2.5.0"),
        .package(url: "https://github.com/apple/swift-certificates", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-asn1", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
    ],
    targets: [
        // C libraries from Debian, through pkg-config. Nothing but a module map and a shim header.
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CVirt", pkgConfig: "libvirt", providers: [.apt(["libvirt-dev"])]),
        .systemLibrary(name: "CNbd", pkgConfig: "libnbd", providers: [.apt(["libnbd-dev"])]),

        .target(
            name: "LifeboatBase",
            dependencies: [
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Subprocess", package: "swift-subprocess"),
            ]
        ),
        .target(
            name: "LifeboatS3",
            dependencies: [
                "LifeboatBase",
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .target(
            name: "LifeboatRepository",
            dependencies: [
                "LifeboatBase", "LifeboatS3", "CZstd",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Subprocess", package: "swift-subprocess"),
            ]
        ),
        .target(
            name: "LifeboatFS",
            dependencies: [
                "LifeboatBase", "LifeboatRepository", "CFuse",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "LifeboatVirt",
            dependencies: ["LifeboatBase", "CVirt", .product(name: "Mustache", package: "swift-mustache")]
        ),
        .target(name: "LifeboatNBD", dependencies: ["LifeboatBase", "CNbd"]),
        .target(
            name: "LifeboatReplication",
            dependencies: [
                "LifeboatBase", "LifeboatRepository", "LifeboatFS", "LifeboatVirt", "LifeboatNBD",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "LifeboatRecovery",
            dependencies: [
                "LifeboatBase", "LifeboatRepository", "LifeboatFS", "LifeboatVirt", "LifeboatReplication", "LifeboatNBD",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Yams", package: "Yams"),
                .product(name: "Mustache", package: "swift-mustache"),
            ]
        ),
        .target(
            name: "LifeboatService",
            dependencies: [
                "LifeboatBase", "LifeboatRecovery", "LifeboatReplication", "LifeboatRepository",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Hummingbird", package: "hummingbird"),
            ]
        ),
        .target(
            name: "LifeboatConsole",
            dependencies: [
                "LifeboatBase", "LifeboatRecovery", "LifeboatReplication", "LifeboatRepository",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "HummingbirdAuth", package: "hummingbird-auth"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "Mustache", package: "swift-mustache"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "lifeboat",
            dependencies: [
                "LifeboatBase", "LifeboatS3", "LifeboatRepository", "LifeboatFS", "LifeboatVirt", "LifeboatRecovery", "LifeboatReplication", "LifeboatService",
                "LifeboatConsole",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "LifeboatTestSupport",
            dependencies: ["LifeboatBase", "LifeboatRepository"],
            path: "Tests/LifeboatTestSupport"
        ),
        .testTarget(
            name: "LifeboatRepositoryTests",
            dependencies: ["LifeboatBase", "LifeboatRepository", "LifeboatS3", "LifeboatTestSupport", .product(name: "Crypto", package: "swift-crypto")]
        ),
        .testTarget(
            name: "LifeboatFSTests",
            dependencies: ["LifeboatBase", "LifeboatFS", "LifeboatRepository", "LifeboatTestSupport", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .testTarget(
            name: "LifeboatVirtTests",
            dependencies: ["LifeboatBase", "LifeboatVirt", "LifeboatTestSupport"]
        ),
        .testTarget(
            name: "LifeboatRecoveryTests",
            dependencies: ["LifeboatBase", "LifeboatRecovery", "LifeboatVirt", "LifeboatFS", "LifeboatRepository", "LifeboatConsole", "LifeboatTestSupport"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
