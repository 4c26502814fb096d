import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The one error type callers of Lifeboat's library see.
///
/// `message` is a complete sentence for a person: it names the thing that is wrong and,
/// where there is one, what to do about it. `cause` keeps the lower-level error
/// (an `Errno`, a `ZstdError`, a crypto error) for logs and tests.
public struct LifeboatError: Error, Sendable, CustomStringConvertible, Equatable {
    public enum Code: String, Sendable {
        case invalidArgument
        case notFound
        case alreadyExists
        case invalidState
        case busy
        case damaged
        case authentication
        case io
        case noSpace
        case unsupported
    }

    public var code: Code
    public var message: String
    public var cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String { message }

    public static func == (lhs: LifeboatError, rhs: LifeboatError) -> Bool {
        lhs.code == rhs.code && lhs.message == rhs.message
    }

    /// Wraps a failed system call on `path` into a sentence that names the path.
    package static func io(_ error: any Error, _ what: String, _ path: String) -> LifeboatError {
        if let error = error as? LifeboatError { return error }
        guard let errno = error as? Errno else {
            return LifeboatError(.io, "\(what) \(path): \(error)")
        }
        let code: Code
        switch errno {
        case .noSpace: code = .noSpace
        case .noSuchFileOrDirectory: code = .notFound
        default: code = .io
        }
        return LifeboatError(code, "\(what) \(path): \(errno.lifeboatText)", cause: errno)
    }
}

extension Errno {
    /// strerror text without the "Errno N:" prefix swift-system adds.
    package var lifeboatText: String {
        String(cString: strerror(rawValue)).lowercased()
    }
}

