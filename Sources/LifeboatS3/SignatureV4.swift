import Crypto
import Foundation

/// AWS Signature Version 4 for S3 requests, written from the published algorithm
/// (docs.aws.amazon.com "Signature Version 4 signing process"): a canonical request, a string to
/// sign under a date/region/service scope, and a signing key derived by a chain of HMAC-SHA-256.
package struct SignatureV4: Sendable {
    package let accessKey: String
    package let secretKey: String
    package let region: String
    package var service = "s3"

    package init(accessKey: String, secretKey: String, region: String) {
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.region = region
    }

    /// The headers to add to a request: `x-amz-date`, `x-amz-content-sha256` and `authorization`.
    /// - Parameters:
    ///   - path: the request path as sent (already percent-encoded, see `encodePath`).
    ///   - query: the query parameters, not encoded.
    ///   - headers: every other header to sign (names in any case), `host` among them.
    ///   - payloadHash: hex SHA-256 of the body.
    package func sign(method: String, path: String, query: [(String, String)], headers: [(String, String)],
                      payloadHash: String, date: Date) -> [(String, String)] {
        let (amzDate, day) = Self.timestamps(date)
        var all = headers.map { ($0.0.lowercased(), Self.trim($0.1)) }
        all.append(("x-amz-date", amzDate))
        all.append(("x-amz-content-sha256", payloadHash))
        all.sort { $0.0 < $1.0 }
        let signedHeaders = all.map(\.0).joined(separator: ";")
        let canonical = [
            method,
            path,
            Self.canonicalQuery(query),
            all.map { "\($0.0):\($0.1)\n" }.joined(),
            signedHeaders,
            payloadHash,
        ].joined(separator: "\n")
        let scope = "\(day)/\(region)/\(service)/aws4_request"
        let stringToSign = "AWS4-HMAC-SHA256\n\(amzDate)\n\(scope)\n\(Self.hex(SHA256.hash(data: Data(canonical.utf8))))"
        var key = SymmetricKey(data: Data(("AWS4" + secretKey).utf8))
        for part in [day, region, service, "aws4_request"] {
            key = SymmetricKey(data: Data(HMAC<SHA256>.authenticationCode(for: Data(part.utf8), using: key)))
        }
        let signature = Self.hex(HMAC<SHA256>.authenticationCode(for: Data(stringToSign.utf8), using: key))
        let authorization = "AWS4-HMAC-SHA256 Credential=\(accessKey)/\(scope), SignedHeaders=\(signedHeaders), Signature=\(signature)"
        return [("x-amz-date", amzDate), ("x-amz-content-sha256", payloadHash), ("authorization", authorization)]
    }

    package static func canonicalQuery(_ query: [(String, String)]) -> String {
        let encoded: [(String, String)] = query.map { (encode($0.0, slash: true), encode($0.1, slash: true)) }
        let sorted = encoded.sorted { (a: (String, String), b: (String, String)) -> Bool in a.0 == b.0 ? a.1 < b.1 : a.0 < b.0 }
        return sorted.map { $0.0 + "=" + $0.1 }.joined(separator: "&")
    }

    /// A key's path, each segment percent-encoded once (S3 does not encode twice).
    package static func encodePath(_ path: String) -> String { encode(path, slash: false) }

    /// RFC 3986 encoding: everything but unreserved characters, and `/` too when `slash`.
    package static func encode(_ text: String, slash: Bool) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            case UInt8(ascii: "/") where !slash:
                out.append("/")
            default:
                out += "%" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            }
        }
        return out
    }

    package static func hex<D: Sequence>(_ digest: D) -> String where D.Element == UInt8 {
        digest.map { String($0, radix: 16).leftPadded(to: 2) }.joined()
    }

    package static func payloadHash<B: DataProtocol>(_ body: B) -> String { hex(SHA256.hash(data: body)) }

    /// `20130524T000000Z` and `20130524` in UTC.
    static func timestamps(_ date: Date) -> (String, String) {
        var tm = tm()
        var seconds = time_t(date.timeIntervalSince1970)
        gmtime_r(&seconds, &tm)
        let day = String(format: "%04d%02d%02d", Int(tm.tm_year) + 1900, Int(tm.tm_mon) + 1, Int(tm.tm_mday))
        return (day + String(format: "T%02d%02d%02dZ", Int(tm.tm_hour), Int(tm.tm_min), Int(tm.tm_sec)), day)
    }

    private static func trim(_ value: String) -> String {
        value.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " ")
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
