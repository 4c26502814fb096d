import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatRepository
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

    var path: String {
        repo ?? ProcessInfo.processInfo.environment["LIFEBOAT_REPO"] ?? "/var/lib/lifeboat/repo"
    }

    func open() throws -> Repository {
        try openKeepingPassword().repository
    }

    /// Opens the repository and keeps the password it took (nil when unencrypted), for a
    /// daemon that must open it again: the user is asked once.
    func openKeepingPassword() throws -> (repository: Repository, password: String?) {
        var given: String? = nil
        let repository = try Repository.open(at: path) {
            given = try password(confirm: false)
            return given
        }
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
