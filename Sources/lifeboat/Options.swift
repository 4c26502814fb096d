import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatRepository
import LifeboatS3
#if canImport(Glibc)
import Glibc
#endif

/// Where the repository is and how to unlock it; shared by every command that opens one.
struct RepositoryOptions: ParsableArguments {
    @Option(help: "Repository folder (default: $LIFEBOAT_REPO, else /var/lib/lifeboat/repo).")
    var repo: String?

    @Option(help: "File whose first line is the repository password (else $LIFEBOAT_PASSWORD, else a prompt).")
    var passwordFile: String?

    /// The password is the first line of stdin (lifeboat's own daemons get it this way).
    @Flag(help: .hidden) var passwordStdin = false

    @OptionGroup var s3: S3Options

    var path: String {
        repo ?? ProcessInfo.processInfo.environment["LIFEBOAT_REPO"] ?? "/var/lib/lifeboat/repo"
    }

    /// The bucket when the repository is an s3:// address, else nil.
    var remote: ObjectRepository? {
        get throws { S3Location.isS3(path) ? try s3.repository(path) : nil }
    }

    func open() throws -> Repository {
        try openKeepingPassword().repository
    }

    /// Opens the repository and keeps the password it took (nil when unencrypted), for a
    /// daemon that must open it again: the user is asked once.
    func openKeepingPassword() throws -> (repository: Repository, password: String?) {
        var given: String? = nil
        let ask = {
            given = try password(confirm: false)
            return given
        }
        let repository = try remote.map { try Repository.open(remote: $0, password: ask) } ?? Repository.open(at: path, password: ask)
        // A password given for a bucket whose config says "not encrypted": its config.json may have
        // been replaced by whoever holds the bucket, to make readers take forged manifests.
        if let remote = repository.remote, !repository.config.isEncrypted,
           passwordFile != nil || passwordStdin || ProcessInfo.processInfo.environment["LIFEBOAT_PASSWORD"] != nil {
            throw LifeboatError(.damaged, "\(remote.description) says it is not encrypted, yet a password was given: its config.json may have been replaced; check the bucket (unset $LIFEBOAT_PASSWORD if it really is unencrypted)")
        }
        // What is wrong with the bucket's manifests is said on every command that reads them.
        for problem in repository.remote?.problems ?? [] { FileHandle.standardError.write(Data("warning: \(problem)\n".utf8)) }
        return (repository, given)
    }

    /// The password from the file, the environment or a terminal prompt; nil when none can be had.
    func password(confirm: Bool) throws -> String? {
        if passwordStdin { return readLine(strippingNewline: true) ?? "" }
        if let passwordFile {
            guard let text = try? String(contentsOfFile: passwordFile, encoding: .utf8) else {
                throw LifeboatError(.notFound, "cannot read password file \(passwordFile): check the path and its permissions")
            }
            return String(text.split(separator: "\n", omittingEmptySubsequences: false).first ?? "")
        }
        if let env = ProcessInfo.processInfo.environment["LIFEBOAT_PASSWORD"] { return env }
        guard isatty(0) != 0 else { return nil }
        let first = String(cString: getpass("Repository password: "))
        if confirm {
            let second = String(cString: getpass("Repeat password: "))
            guard first == second else { throw LifeboatError(.invalidArgument, "the passwords do not match: try again") }
        }
        return first
    }
}

/// How to reach a repository in object storage (`--repo s3://BUCKET/PREFIX`).
struct S3Options: ParsableArguments {
    @Option(name: .customLong("s3-endpoint"), help: "S3 endpoint URL (default: $LIFEBOAT_S3_ENDPOINT).")
    var endpoint: String?
    @Option(name: .customLong("s3-region"), help: "S3 region (default: $AWS_REGION, else us-east-1).")
    var region: String?
    @Option(name: .customLong("s3-addressing"), help: "path (http://HOST/BUCKET/KEY, the default) or virtual (http://BUCKET.HOST/KEY).")
    var addressing: String?
    @Option(name: .customLong("s3-credentials"), help: "AWS credentials file (else $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY).")
    var credentials: String?
    @Option(name: .customLong("cache-dir"), help: "Local folder for an S3 repository's indexes, manifests and chunks (default: /var/cache/lifeboat/s3/…).")
    var cacheDir: String?
    @Option(name: .customLong("s3-cache-size"), help: "Bytes the chunks kept in that folder may take (default: half its free space, at most 64 GiB).")
    var cacheSize: Int?

    func repository(_ address: String) throws -> ObjectRepository {
        let settings = try S3Settings.resolve(endpoint: endpoint, region: region, addressing: addressing, credentialsFile: credentials)
        if let cacheSize, cacheSize < 16 << 20 {
            throw LifeboatError(.invalidArgument, "--s3-cache-size \(cacheSize) is too small: give at least 16 MiB (16777216)")
        }
        return try ObjectRepository(location: try S3Location(parsing: address), settings: settings, cacheRoot: cacheDir, cacheSize: cacheSize)
    }
}

/// `--json` for listing commands.
struct OutputOptions: ParsableArguments {
    @Flag(help: "Print JSON instead of a table.")
    var json = false
}

enum JSON {
    static func print<T: Encodable>(_ value: T) throws {
        Swift.print(String(decoding: try JSONEncoder.lifeboat.encode(value), as: UTF8.self))
    }
}
