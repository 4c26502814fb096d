import AsyncHTTPClient
import Crypto
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import LifeboatBase
import NIOCore
import NIOHTTP1

/// `s3://BUCKET/PREFIX`: where an object-storage repository lives.
public struct S3Location: Sendable, Equatable, CustomStringConvertible {
    public let bucket: String
    /// Empty, or ends with `/`.
    public let prefix: String

    /// True when `text` names an S3 repository rather than a folder.
    public static func isS3(_ text: String) -> Bool { text.hasPrefix("s3://") }

    public init(parsing text: String) throws {
        guard text.hasPrefix("s3://") else {
            throw LifeboatError(.invalidArgument, "\(text) is not an s3:// address: write s3://BUCKET/PREFIX")
        }
        let rest = text.dropFirst(5)
        let bucket = String(rest.prefix { $0 != "/" })
        guard !bucket.isEmpty, bucket.allSatisfy({ $0.isLowercase || $0.isNumber || $0 == "-" || $0 == "." }) else {
            throw LifeboatError(.invalidArgument, "\(text) has no valid bucket name: write s3://BUCKET/PREFIX (lower-case letters, digits, - and .)")
        }
        var prefix = String(rest.dropFirst(bucket.count)).trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        if !prefix.isEmpty { prefix += "/" }
        self.bucket = bucket
        self.prefix = prefix
    }

    public var description: String { "s3://\(bucket)/\(prefix)" }
}

extension S3Settings {
    /// The options that give a lifeboat helper process (a mount, the finaliser) these settings;
    /// keys from the environment reach it through its environment.
    public var commandLineArguments: [String] {
        ["--s3-endpoint", endpoint, "--s3-region", region, "--s3-addressing", pathStyle ? "path" : "virtual"]
            + (credentialsFile.map { ["--s3-credentials", $0] } ?? [])
    }
}

/// How to reach the object store: endpoint, region, addressing and credentials.
public struct S3Settings: Sendable {
    public var endpoint: String
    public var region: String
    public var pathStyle: Bool
    public var accessKey: String
    public var secretKey: String
    /// How long one request is retried (5xx, SlowDown, no connection) before it fails.
    public var retrySeconds: Double
    /// The credentials file the keys came from (nil: the environment), for helper processes.
    public var credentialsFile: String?

    public init(endpoint: String, region: String, pathStyle: Bool, accessKey: String, secretKey: String, retrySeconds: Double = 30) {
        self.endpoint = endpoint.hasSuffix("/") ? String(endpoint.dropLast()) : endpoint
        self.region = region
        self.pathStyle = pathStyle
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.retrySeconds = retrySeconds
    }

    /// Settings from options and the environment. Credentials come from `credentialsFile` (an
    /// AWS credentials file: `aws_access_key_id = …`, `aws_secret_access_key = …`) or from
    /// `$AWS_ACCESS_KEY_ID` and `$AWS_SECRET_ACCESS_KEY`, never from arguments.
    public static func resolve(endpoint: String?, region: String?, addressing: String?, credentialsFile: String?,
                               environment: [String: String] = ProcessInfo.processInfo.environment) throws -> S3Settings {
        guard let endpoint = endpoint ?? environment["LIFEBOAT_S3_ENDPOINT"] else {
            throw LifeboatError(.invalidArgument, "no S3 endpoint: pass --s3-endpoint URL or set $LIFEBOAT_S3_ENDPOINT")
        }
        guard let url = URL(string: endpoint), ["http", "https"].contains(url.scheme ?? ""), url.host != nil else {
            throw LifeboatError(.invalidArgument, "S3 endpoint \(endpoint) is not an http:// or https:// address: fix --s3-endpoint")
        }
        var access = environment["AWS_ACCESS_KEY_ID"]
        var secret = environment["AWS_SECRET_ACCESS_KEY"]
        if let credentialsFile {
            guard let text = try? String(contentsOfFile: credentialsFile, encoding: .utf8) else {
                throw LifeboatError(.notFound, "cannot read S3 credentials file \(credentialsFile): check the path and its permissions")
            }
            access = nil
            secret = nil
            for line in text.split(whereSeparator: \.isNewline) {
                let parts = line.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
                guard parts.count == 2 else { continue }
                if parts[0].lowercased() == "aws_access_key_id", access == nil { access = parts[1] }
                if parts[0].lowercased() == "aws_secret_access_key", secret == nil { secret = parts[1] }
            }
            guard access != nil, secret != nil else {
                throw LifeboatError(.invalidArgument, "S3 credentials file \(credentialsFile) has no aws_access_key_id and aws_secret_access_key lines")
            }
        }
        guard let access, let secret, !access.isEmpty, !secret.isEmpty else {
            throw LifeboatError(.authentication, "no S3 credentials: set $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY or pass --s3-credentials FILE")
        }
        let style = addressing ?? environment["LIFEBOAT_S3_ADDRESSING"] ?? "path"
        guard style == "path" || style == "virtual" else {
            throw LifeboatError(.invalidArgument, "--s3-addressing must be path or virtual, not \(style)")
        }
        let retry = environment["LIFEBOAT_S3_RETRY_SECONDS"].flatMap(Double.init) ?? 30
        var settings = S3Settings(endpoint: endpoint, region: region ?? environment["AWS_REGION"] ?? environment["AWS_DEFAULT_REGION"] ?? "us-east-1",
                                  pathStyle: style == "path", accessKey: access, secretKey: secret, retrySeconds: retry)
        settings.credentialsFile = credentialsFile
        return settings
    }
}

/// Requests sent, for `sync --json`, benchmarks and tests.
public struct S3Counts: Sendable, Codable, Equatable {
    public var puts = 0
    public var gets = 0
    public var lists = 0
    public var deletes = 0
    public var heads = 0
    public var bytesSent = 0
    public var bytesReceived = 0
    public var retries = 0

    public init() {}

    /// What was counted since `earlier` (the same client's counts then).
    public func since(_ earlier: S3Counts) -> S3Counts {
        var delta = self
        (delta.puts, delta.gets, delta.lists, delta.deletes, delta.heads) = (puts - earlier.puts, gets - earlier.gets, lists - earlier.lists,
                                                                           deletes - earlier.deletes, heads - earlier.heads)
        (delta.bytesSent, delta.bytesReceived, delta.retries) = (bytesSent - earlier.bytesSent, bytesReceived - earlier.bytesReceived,
                                                                 retries - earlier.retries)
        return delta
    }

    public mutating func add(_ other: S3Counts) {
        (puts, gets, lists, deletes, heads) = (puts + other.puts, gets + other.gets, lists + other.lists, deletes + other.deletes, heads + other.heads)
        (bytesSent, bytesReceived, retries) = (bytesSent + other.bytesSent, bytesReceived + other.bytesReceived, retries + other.retries)
    }
}

/// One object of a listing.
public struct S3Object: Sendable, Equatable {
    public let key: String
    public let size: Int
    public var lastModified: Date? = nil
}

/// One version of an object (or a delete marker) in a versioned bucket.
public struct S3Version: Sendable, Equatable {
    public let key: String
    public let version: String
}

/// A small, blocking S3 client over async-http-client (calls wait on the event loop's answer,
/// so it suits the worker threads repository code runs on). Every request is signed with
/// Signature V4 and retried with back-off on 5xx answers, SlowDown and lost connections.
public final class S3Client: Sendable {
    public let settings: S3Settings
    public let bucket: String
    private let signer: SignatureV4
    private let counts = Locked(S3Counts())

    /// One HTTP client for the process: connections are pooled and reused.
    private static let http: HTTPClient = {
        var configuration = HTTPClient.Configuration(timeout: .init(connect: .seconds(5), read: .seconds(120)))
        configuration.decompression = .disabled
        configuration.httpVersion = .http1Only
        return HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }()

    /// Seconds added to this host's clock when signing: only tests set it
    /// ($LIFEBOAT_S3_CLOCK_OFFSET), to see what a host with a wrong clock is told.
    private static let clockOffset = ProcessInfo.processInfo.environment["LIFEBOAT_S3_CLOCK_OFFSET"].flatMap(Double.init) ?? 0

    public init(settings: S3Settings, bucket: String) {
        self.settings = settings
        self.bucket = bucket
        self.signer = SignatureV4(accessKey: settings.accessKey, secretKey: settings.secretKey, region: settings.region)
    }

    public var requestCounts: S3Counts { counts.withLock { $0 } }

    // MARK: Objects

    /// Bodies larger than this go up in parts (multipart upload): one PUT is limited to 5 GiB, and
    /// a part that fails is sent again alone. 100 MiB: packs (64 MiB) go in one PUT each.
    static let multipartThreshold = ProcessInfo.processInfo.environment["LIFEBOAT_S3_MULTIPART_THRESHOLD"].flatMap(Int.init) ?? (100 << 20)
    /// 16 MiB parts (S3's smallest is 5 MiB, but for the last).
    static let partSize = max(5 << 20, ProcessInfo.processInfo.environment["LIFEBOAT_S3_PART_SIZE"].flatMap(Int.init) ?? (16 << 20))

    /// Writes an object. With `retainUntil`, in Object Lock compliance mode until then.
    public func put(_ key: String, _ body: [UInt8], retainUntil: Date? = nil) throws {
        if body.count > Self.multipartThreshold { return try putInParts(key, body, retainUntil: retainUntil) }
        var headers: [(String, String)] = [("content-type", "application/octet-stream")]
        if let retainUntil {
            headers.append(("content-md5", Data(Insecure.MD5.hash(data: body)).base64EncodedString()))
            headers.append(("x-amz-object-lock-mode", "COMPLIANCE"))
            headers.append(("x-amz-object-lock-retain-until-date", Self.iso8601(retainUntil)))
        }
        _ = try send("PUT", key: key, headers: headers, body: body, what: "write")
        counts.withLock { $0.puts += 1; $0.bytesSent += body.count }
    }

    /// A multipart upload: started, sent part by part (each retried on its own), completed; aborted
    /// when it fails, so no parts are left to pay for.
    private func putInParts(_ key: String, _ body: [UInt8], retainUntil: Date?) throws {
        var headers: [(String, String)] = [("content-type", "application/octet-stream")]
        if let retainUntil {
            headers.append(("x-amz-object-lock-mode", "COMPLIANCE"))
            headers.append(("x-amz-object-lock-retain-until-date", Self.iso8601(retainUntil)))
        }
        guard let started = try send("POST", key: key, query: [("uploads", "")], headers: headers, what: "write"),
              let upload = Self.xmlValue(started.body, "UploadId") else {
            throw LifeboatError(.io, "the S3 endpoint did not start a multipart upload of \(describe(key))")
        }
        counts.withLock { $0.puts += 1 }
        do {
            var parts: [String] = []
            var offset = 0
            while offset < body.count {
                let part = Array(body[offset..<min(offset + Self.partSize, body.count)])
                let md5 = retainUntil == nil ? [] : [("content-md5", Data(Insecure.MD5.hash(data: part)).base64EncodedString())]
                let query = [("partNumber", "\(parts.count + 1)"), ("uploadId", upload)]
                guard let answer = try send("PUT", key: key, query: query, headers: md5, body: part, what: "write"),
                      let etag = answer.headers["etag"].first else {
                    throw LifeboatError(.io, "the S3 endpoint gave no ETag for part \(parts.count + 1) of \(describe(key))")
                }
                counts.withLock { $0.puts += 1; $0.bytesSent += part.count }
                parts.append(etag)
                offset += part.count
            }
            let list = parts.enumerated().map { "<Part><PartNumber>\($0.offset + 1)</PartNumber><ETag>\($0.element)</ETag></Part>" }.joined()
            let done = try send("POST", key: key, query: [("uploadId", upload)],
                                body: Array("<CompleteMultipartUpload>\(list)</CompleteMultipartUpload>".utf8), what: "write")
            counts.withLock { $0.puts += 1 }
            // An error can come with status 200 once the parts are being joined.
            if let done, let code = Self.xmlValue(done.body, "Code") {
                throw LifeboatError(.io, "the S3 endpoint could not complete the upload of \(describe(key)) (\(code))")
            }
        } catch {
            _ = try? send("DELETE", key: key, query: [("uploadId", upload)], what: "abort the upload of")
            throw error
        }
    }

    /// The text of the first element named `name` in an XML answer.
    private static func xmlValue(_ body: [UInt8], _ name: String) -> String? {
        guard !body.isEmpty, let document = try? XMLDocument(data: Data(body)) else { return nil }
        return (try? document.nodes(forXPath: "//*[local-name()='\(name)']").first?.stringValue) ?? nil
    }

    /// An object's bytes, or those of `range`; nil when there is no such object.
    public func get(_ key: String, range: Range<Int>? = nil) throws -> [UInt8]? {
        var headers: [(String, String)] = []
        if let range { headers.append(("range", "bytes=\(range.lowerBound)-\(range.upperBound - 1)")) }
        let response = try send("GET", key: key, headers: headers, what: "read", missingIsNil: true)
        counts.withLock { $0.gets += 1; $0.bytesReceived += response?.body.count ?? 0 }
        guard let response else { return nil }
        if let range, response.body.count != range.count {
            throw LifeboatError(.damaged, "\(describe(key)) is shorter than lifeboat wrote it (asked for bytes \(range.lowerBound)-\(range.upperBound - 1), got \(response.body.count)): it was changed behind lifeboat's back")
        }
        return response.body
    }

    /// True when the object exists.
    public func exists(_ key: String) throws -> Bool {
        let response = try send("HEAD", key: key, what: "look up", missingIsNil: true)
        counts.withLock { $0.heads += 1 }
        return response != nil
    }

    /// Deletes an object, or one version of it. In a versioned bucket (Object Lock needs one) a
    /// delete without a version only hides the object behind a delete marker; the store refuses
    /// to delete a version while it is locked.
    public func delete(_ key: String, version: String? = nil) throws {
        _ = try send("DELETE", key: key, query: version.map { [("versionId", $0)] } ?? [], what: "delete")
        counts.withLock { $0.deletes += 1 }
    }

    /// The version ids of an object, newest first (ListObjectVersions).
    public func versions(of key: String) throws -> [String] {
        try versions(prefix: key).filter { $0.key == key }.map(\.version)
    }

    /// Every version and delete marker of the objects whose key starts with `prefix`.
    public func versions(prefix: String) throws -> [S3Version] {
        var found: [S3Version] = []
        var marker: (String, String)? = nil
        repeat {
            var query = [("versions", ""), ("prefix", prefix)]
            if let marker { query += [("key-marker", marker.0), ("version-id-marker", marker.1)] }
            guard let response = try send("GET", key: nil, query: query, what: "list") else { break }
            counts.withLock { $0.lists += 1 }
            let document = try XMLDocument(data: Data(response.body))
            for node in (try? document.nodes(forXPath: "//*[local-name()='Version' or local-name()='DeleteMarker']")) ?? [] {
                guard let element = node as? XMLElement, let key = element.elements(forName: "Key").first?.stringValue,
                      let version = element.elements(forName: "VersionId").first?.stringValue else { continue }
                found.append(S3Version(key: key, version: version))
            }
            let truncated = (try? document.nodes(forXPath: "//*[local-name()='IsTruncated']").first?.stringValue) == "true"
            let nextKey = (try? document.nodes(forXPath: "//*[local-name()='NextKeyMarker']").first?.stringValue) ?? nil
            let nextVersion = (try? document.nodes(forXPath: "//*[local-name()='NextVersionIdMarker']").first?.stringValue) ?? nil
            marker = truncated ? nextKey.map { ($0, nextVersion ?? "") } : nil
        } while marker != nil
        return found
    }

    /// Deletes every version of the object (and its delete markers), so it is gone for good.
    /// - Throws: `.authentication` (AccessDenied) for a version still under Object Lock; versions
    ///   deleted before it stay deleted.
    public func deleteAllVersions(_ key: String) throws {
        let versions = try versions(of: key)
        if versions.isEmpty { return try delete(key) }
        for version in versions { try delete(key, version: version) }
    }

    /// Every object whose key starts with `prefix` (ListObjectsV2, 1,000 keys a request).
    public func list(prefix: String) throws -> [S3Object] {
        var objects: [S3Object] = []
        var token: String? = nil
        repeat {
            var query = [("list-type", "2"), ("prefix", prefix)]
            if let token { query.append(("continuation-token", token)) }
            let response = try send("GET", key: nil, query: query, what: "list")
            counts.withLock { $0.lists += 1 }
            guard let response else { break }
            let document = try XMLDocument(data: Data(response.body))
            for node in (try? document.nodes(forXPath: "//*[local-name()='Contents']")) ?? [] {
                guard let element = node as? XMLElement,
                      let key = element.elements(forName: "Key").first?.stringValue else { continue }
                let modified = element.elements(forName: "LastModified").first?.stringValue.flatMap(Self.parseDate)
                objects.append(S3Object(key: key, size: Int(element.elements(forName: "Size").first?.stringValue ?? "") ?? 0, lastModified: modified))
            }
            let truncated = (try? document.nodes(forXPath: "//*[local-name()='IsTruncated']").first?.stringValue) == "true"
            token = truncated ? (try? document.nodes(forXPath: "//*[local-name()='NextContinuationToken']").first?.stringValue) ?? nil : nil
        } while token != nil
        return objects
    }

    /// Creates the bucket; with `objectLock`, with Object Lock enabled (versioning comes with it).
    public func createBucket(objectLock: Bool) throws {
        let body = Array("<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>\(settings.region)</LocationConstraint></CreateBucketConfiguration>".utf8)
        let headers = objectLock ? [("x-amz-bucket-object-lock-enabled", "true")] : []
        _ = try send("PUT", key: nil, headers: headers, body: settings.region == "us-east-1" ? [] : body, what: "create")
    }

    // MARK: Requests

    private struct Answer {
        let status: Int
        let body: [UInt8]
        var headers = HTTPHeaders()
    }

    private func url(for key: String?, query: [(String, String)]) -> (url: String, host: String, path: String) {
        let endpoint = URL(string: settings.endpoint)!
        var host = endpoint.host!
        if host.contains(":") && !host.hasPrefix("[") { host = "[" + host + "]" }   // IPv6
        if let port = endpoint.port { host += ":\(port)" }
        var path = settings.pathStyle ? "/" + bucket : ""
        if let key { path += "/" + SignatureV4.encodePath(key) } else if !settings.pathStyle || path.isEmpty { path += "/" }
        if !settings.pathStyle { host = bucket + "." + host }
        let queryText = query.isEmpty ? "" : "?" + SignatureV4.canonicalQuery(query)
        return ("\(endpoint.scheme!)://\(host)\(path)\(queryText)", host, path)
    }

    func describe(_ key: String?) -> String {
        key.map { "s3://\(bucket)/\($0)" } ?? "bucket \(bucket) at \(settings.endpoint)"
    }

    /// Sends one request, retried with back-off while the store is busy or unreachable.
    /// - Returns: nil for 404 NoSuchKey when `missingIsNil`.
    private func send(_ method: String, key: String?, query: [(String, String)] = [], headers: [(String, String)] = [],
                      body: [UInt8] = [], what: String, missingIsNil: Bool = false) throws -> Answer? {
        let (url, host, path) = url(for: key, query: query)
        let payloadHash = SignatureV4.payloadHash(body)
        let started = Date()
        var delay = 0.2
        var attempt = 0
        while true {
            attempt += 1
            var request: HTTPClient.Request
            do {
                var all = headers
                all.append(("host", host))
                all += signer.sign(method: method, path: path, query: query, headers: all, payloadHash: payloadHash,
                                   date: Date().addingTimeInterval(Self.clockOffset))
                request = try HTTPClient.Request(url: url, method: HTTPMethod(rawValue: method),
                                                 headers: HTTPHeaders(all), body: body.isEmpty && method != "PUT" ? nil : .bytes(body))
            } catch {
                throw LifeboatError(.invalidArgument, "cannot make a request to \(url): \(error)")
            }
            let retryable: String
            do {
                // No overall deadline: a large body on a slow link takes its time; a connection
                // that stops moving fails on the read timeout.
                let response = try Self.http.execute(request: request).wait()
                let status = Int(response.status.code)
                let bytes = response.body.map { Array($0.readableBytesView) } ?? []
                if (200..<300).contains(status) { return Answer(status: status, body: bytes, headers: response.headers) }
                let code = Self.errorCode(bytes) ?? (method == "HEAD" && status == 404 ? "NoSuchKey" : "HTTP \(status)")
                if status == 404 && code == "NoSuchKey" && missingIsNil { return nil }
                if status >= 500 || code == "SlowDown" {
                    retryable = "answered \(status) \(code)"
                } else {
                    throw failure(status: status, code: code, key: key, what: what)
                }
            } catch let error as LifeboatError {
                throw error
            } catch {
                retryable = "cannot be reached (\(Self.describe(error)))"
            }
            if attempt >= 3 && Date().timeIntervalSince(started) + delay > settings.retrySeconds {
                throw LifeboatError(.io, "the S3 endpoint \(settings.endpoint) \(retryable) for \(Int(Date().timeIntervalSince(started).rounded())) s while lifeboat tried to \(what) \(describe(key)) (\(attempt) attempts): check that it is up, then run the command again")
            }
            counts.withLock { $0.retries += 1 }
            Thread.sleep(forTimeInterval: delay * Double.random(in: 0.8...1.2))
            delay = min(delay * 2, 5)
        }
    }

    private func failure(status: Int, code: String, key: String?, what: String) -> LifeboatError {
        switch code {
        case "InvalidAccessKeyId", "SignatureDoesNotMatch":
            return LifeboatError(.authentication, "the S3 endpoint \(settings.endpoint) refused the credentials (\(code)): check $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY or --s3-credentials")
        case "RequestTimeTooSkewed":
            return LifeboatError(.invalidState, "this host's clock is too far from the S3 endpoint's (RequestTimeTooSkewed; here it is \(Self.iso8601(Date()))): set the clock right (NTP), then run the command again")
        case "NoSuchBucket":
            return LifeboatError(.notFound, "bucket \(bucket) does not exist at \(settings.endpoint): create it (with Object Lock for --object-lock) or check the s3:// address")
        case "AccessDenied":
            return LifeboatError(.authentication, "the S3 endpoint refused to \(what) \(describe(key)) (AccessDenied): the credentials lack that permission, or the object is locked")
        case "QuotaExceeded", "EntityTooLarge":
            return LifeboatError(.noSpace, "the S3 endpoint refused to \(what) \(describe(key)) (\(code)): the bucket or account is full; free space or raise its quota")
        case "InvalidRequest" where what == "write":
            return LifeboatError(.invalidArgument, "the S3 endpoint refused to \(what) \(describe(key)) (InvalidRequest): for --object-lock the bucket must have Object Lock enabled")
        default:
            return LifeboatError(status == 404 ? .notFound : .io, "the S3 endpoint refused to \(what) \(describe(key)) (\(status) \(code))")
        }
    }

    private static func errorCode(_ body: [UInt8]) -> String? {
        guard !body.isEmpty, let document = try? XMLDocument(data: Data(body)) else { return nil }
        return (try? document.nodes(forXPath: "//*[local-name()='Code']").first?.stringValue) ?? nil
    }

    private static func describe(_ error: any Error) -> String {
        let text = "\(error)"
        if text.contains("connectTimeout") { return "connection timed out" }
        if text.contains("Connection refused") || text.contains("connectionRefused") { return "connection refused" }
        if text.contains("remoteConnectionClosed") || text.contains("Connection reset") { return "connection closed" }
        if text.contains("readTimeout") || text.contains("deadlineExceeded") { return "no answer in time" }
        return text.count > 120 ? String(text.prefix(120)) + "…" : text
    }

    static func parseDate(_ text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.date(from: text)
    }

    package static func iso8601(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.string(from: date)
    }
}
