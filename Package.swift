// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "lifeboat",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "lifeboat", targets: ["lifeboat"]),
        .library(name: "LifeboatRepository", targets: ["LifeboatRepository"]),
        .library(name: "LifeboatFS", targets: ["LifeboatFS"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
    ],
    targets: [
        // C libraries from Debian, through pkg-config. Nothing but a module map and a shim header.
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CVirt", pkgConfig: "libvirt", providers: [.apt(["libvirt-dev"])]),

        .target(
            name: "LifeboatRepository",
            dependencies: [
                "CZstd",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .target(
            name: "LifeboatFS",
            dependencies: [
                "LifeboatRepository", "CFuse",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .executableTarget(
            name: "lifeboat",
            dependencies: [
                "LifeboatRepository", "LifeboatFS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .target(
            name: "LifeboatTestSupport",
            dependencies: ["LifeboatRepository"],
            path: "Tests/LifeboatTestSupport"
        ),
        .testTarget(
            name: "LifeboatRepositoryTests",
            dependencies: ["LifeboatRepository", "LifeboatTestSupport"]
        ),
        .testTarget(
            name: "LifeboatFSTests",
            dependencies: ["LifeboatFS", "LifeboatRepository", "LifeboatTestSupport"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
