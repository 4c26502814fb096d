import Crypto
import Foundation
import LifeboatBase
import LifeboatRecovery
import LifeboatRepository
import SwiftASN1
import X509

/// The console's TLS certificate and key (PEM files) and the certificate's SHA-256 fingerprint,
/// which a person compares with what the browser shows for a self-signed one.
public struct ConsoleCertificate: Sendable {
    public var certificate: String
    public var key: String
    public var fingerprint: String
    /// True when lifeboat made it (now or on an earlier start).
    public var selfSigned: Bool
    /// True when it was made by this start.
    public var created: Bool

    /// The files given with --tls-cert and --tls-key, checked.
    static func given(certificate: String, key: String) throws -> ConsoleCertificate {
        guard let pem = FileSystem.contents(certificate).map({ String(decoding: $0, as: UTF8.self) }) else {
            throw LifeboatError(.notFound, "cannot read the TLS certificate \(certificate): check --tls-cert")
        }
        guard FileSystem.contents(key) != nil else {
            throw LifeboatError(.notFound, "cannot read the TLS key \(key): check --tls-key (it must be readable by root)")
        }
        let parsed: Certificate
        do { parsed = try Certificate(pemEncoded: pem) } catch {
            throw LifeboatError(.invalidArgument, "\(certificate) is not a PEM certificate (\(error)): give the server certificate with --tls-cert")
        }
        return ConsoleCertificate(certificate: certificate, key: key, fingerprint: try fingerprint(parsed), selfSigned: false, created: false)
    }

    /// `cert.pem` and `key.pem` in `directory`, made on first use: an ECDSA P-256 key and a
    /// certificate for `host`, the host's name and localhost, valid for ten years.
    static func selfSigned(in directory: String, host: String) throws -> ConsoleCertificate {
        let certificatePath = directory + "/cert.pem", keyPath = directory + "/key.pem"
        if FileSystem.exists(certificatePath), FileSystem.exists(keyPath) {
            var existing = try given(certificate: certificatePath, key: keyPath)
            existing.selfSigned = true
            return existing
        }
        try FileSystem.makeDirectories(FileSystem.parent(of: directory))
        try FileSystem.makeDirectory(directory, mode: 0o700)
        let key = P256.Signing.PrivateKey()
        let privateKey = Certificate.PrivateKey(key)
        let name = try DistinguishedName {
            OrganizationName("Lifeboat")
            CommonName(host)
        }
        var names: [GeneralName] = [.dnsName("localhost")]
        let hostName = ProcessInfo.processInfo.hostName
        if !hostName.isEmpty { names.append(.dnsName(hostName)) }
        if let address = IPv4(host) {
            let value = address.value
            names.append(.ipAddress(ASN1OctetString(contentBytes: [UInt8(value >> 24), UInt8((value >> 16) & 0xff),
                                                                   UInt8((value >> 8) & 0xff), UInt8(value & 0xff)])))
        } else if host != "localhost" {
            names.append(.dnsName(host))
        }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: privateKey.publicKey,
            notValidBefore: now.addingTimeInterval(-3600), notValidAfter: now.addingTimeInterval(10 * 365 * 86_400),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth])
                SubjectAlternativeNames(names)
            },
            issuerPrivateKey: privateKey)
        try FileSystem.writeAtomically(Array(try privateKey.serializeAsPEM().pemString.utf8), to: keyPath)
        try FileSystem.writeAtomically(Array(try certificate.serializeAsPEM().pemString.utf8), to: certificatePath)
        return ConsoleCertificate(certificate: certificatePath, key: keyPath, fingerprint: try fingerprint(certificate),
                                  selfSigned: true, created: true)
    }

    /// SHA-256 of the DER certificate, as AB:CD:… (the form browsers show).
    static func fingerprint(_ certificate: Certificate) throws -> String {
        var serializer = DER.Serializer()
        try serializer.serialize(certificate)
        return SHA256.hash(data: serializer.serializedBytes).map { String(format: "%02X", $0) }.joined(separator: ":")
    }
}
