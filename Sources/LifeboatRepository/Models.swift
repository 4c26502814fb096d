import Foundation
import LifeboatBase

/// repo/config.json: what a reader needs to interpret everything else.
public struct RepositoryConfig: Codable, Sendable {
    public var format: Int = 1
    public var id: String
    public var chunkSize: Int
    /// Chunks are compressed (and encrypted) in independent frames of this size (see ChunkCodec).
    public var frameSize: Int
    public var compression: Compression
    public var encryption: KeyWrapping?

    public struct Compression: Codable, Sendable {
        public var algorithm: String = "zstd"
        public var level: Int
        /// zstd parameter overrides for new chunks (readers do not need them).
        public var hashLog: Int?
        public var chainLog: Int?
        public var minMatch: Int?
    }

    public var isEncrypted: Bool { encryption != nil }

    /// True when `other` was made with the same key material (the same wrapped key, or both unencrypted).
    func hasSameKeys(as other: RepositoryConfig) -> Bool {
        let encoder = JSONEncoder.lifeboat
        return (try? encoder.encode(encryption)) == (try? encoder.encode(other.encryption))
    }
}

/// One disk of a machine: a raw image file or a block device.
public struct MachineDisk: Codable, Sendable, Equatable {
    /// Short name, used for the index file and the restored file (`NAME.raw`).
    public var name: String
    public var path: String
    /// The image's format: raw or qcow2 (nil: raw, as machines protected before formats were kept).
    /// A qcow2 image is read through qemu-nbd, never as bytes.
    public var format: String?

    public init(name: String, path: String, format: String? = nil) {
        self.name = name
        self.path = path
        self.format = format
    }

    /// True when the file's bytes are the guest's bytes.
    public var isRaw: Bool { format == nil || format == "raw" }
}

/// A protected machine and its recovery-server settings (used by failover; stored and shown now).
public struct Machine: Codable, Sendable, Equatable {
    public var name: String
    public var disks: [MachineDisk]
    public var vcpus: Int
    public var memoryMiB: Int
    public var macs: [String]
    public var ip: String?
    public var gateway: String?
    public var testIP: String?
    /// Recovery point objective in seconds: a point older than this breaks compliance.
    public var rpoSeconds: Int?
    public var description: String?
    public var created: Date
    /// Domain type for its recovery VM: kvm, qemu or auto (nil: the host's setting).
    public var virtType: String?
    /// Regular expression on the serial console that says the machine has booted (nil: a login prompt).
    public var bootPattern: String?
    /// The recovery VM of a disk-file machine: firmware (bios, uefi), machine type (pc, q35 …) and
    /// disk bus (virtio, sata, scsi); nil: bios, pc, virtio. A domain machine's come from its definition.
    public var firmware: String?
    public var machineType: String?
    public var diskBus: String?
    /// Production network: a libvirt network name (nil: one made from the production template).
    public var network: String?
    /// Production host bridge, instead of a libvirt network.
    public var bridge: String?
    /// The libvirt domain this machine is (protect --domain): points come from libvirt's backup
    /// API while it runs, and its disks are read from its XML at every point.
    public var domain: String?
    /// The libvirt URI of that domain (nil: the host's default).
    public var connectURI: String?
    /// The replication service takes a point this often (nil: half the RPO).
    public var everySeconds: Int?
    /// Retention the replication service applies after each point (nil: keep every point).
    public var retention: RetentionPolicy?
    /// Chunk size of this machine's points (nil: the repository's). Fixed for the machine's life:
    /// its points reference each other's chunks.
    public var chunkSize: Int?
    /// MiB per second a point may read of this machine's disks (nil: no limit): a full point of a
    /// running domain then leaves the guest (and QEMU, which serves the export) room.
    public var bandwidth: Int?

    /// How often the replication service takes a point: the setting, else half the RPO, else hourly.
    public var interval: Int { everySeconds ?? rpoSeconds.map { max(1, $0 / 2) } ?? 3600 }

    public init(name: String, disks: [MachineDisk], vcpus: Int = 1, memoryMiB: Int = 512, macs: [String] = [],
                ip: String? = nil, gateway: String? = nil, testIP: String? = nil, rpoSeconds: Int? = nil,
                description: String? = nil, created: Date = Date()) {
        self.name = name
        self.disks = disks
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.macs = macs
        self.ip = ip
        self.gateway = gateway
        self.testIP = testIP
        self.rpoSeconds = rpoSeconds
        self.description = description
        self.created = created
    }

    /// Machine names become directory names: letters, digits, '-' and '_', starting with a letter or digit.
    public static func validate(name: String) throws {
        let allowed = name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2d || c == 0x5f
        }
        guard !name.isEmpty, name.count <= 64, allowed, let first = name.utf8.first, first != 0x2d, first != 0x5f else {
            throw LifeboatError(.invalidArgument,
                "invalid machine name '\(name)': use 1-64 letters, digits, '-' or '_', starting with a letter or digit")
        }
    }
}

/// One disk as captured in a recovery point.
public struct PointDisk: Codable, Sendable, Equatable {
    public var name: String
    /// Where it was read from.
    public var path: String
    public var size: Int
    /// Bytes holding data (not holes) in this point.
    public var dataBytes: Int
    /// Bytes of chunks this point added to the repository (before compression).
    public var newBytes: Int
    /// Bytes those new chunks take in the repository.
    public var storedBytes: Int
    /// Set when the size differs from the previous point's.
    public var previousSize: Int?
}

/// An immutable image of all disks of one machine at one time.
public struct RecoveryPoint: Codable, Sendable, Equatable {
    public var id: String
    public var machine: String
    public var time: Date
    /// `consistent` when no disk changed while it was read; `changed-during-backup` otherwise
    /// (the image is then like a crash of a running machine, possibly torn across the read).
    public var consistency: String
    public var parent: String?
    public var chunkSize: Int
    public var disks: [PointDisk]
    public var bytesRead: Int
    public var seconds: Double
    /// full or incremental (points of libvirt domains; nil for disk files, always read whole).
    public var readMode: String?
    /// Why the point was read the way it was; disks that appeared or went.
    public var note: String?
    /// The libvirt checkpoint taken at this point's instant: the next incremental reads what changed since.
    public var checkpoint: String?
    /// The UUID of the libvirt domain it was taken from.
    public var domainUUID: String?
    /// That domain's hardware (its definition is kept beside, in domain.xml): what its recovery VM is built as.
    public var hardware: MachineHardware?

    public var newBytes: Int { disks.reduce(0) { $0 + $1.newBytes } }
    public var storedBytes: Int { disks.reduce(0) { $0 + $1.storedBytes } }
    public var size: Int { disks.reduce(0) { $0 + $1.size } }
}

/// Times in manifests: ISO 8601 UTC with milliseconds (`2026-11-21T23:57:15.123Z`).
public enum Timestamp {
    public static func format(_ date: Date) -> String {
        formatter.withLock { $0.string(from: date) }
    }

    /// Our own form (`2026-11-21T23:57:15.123Z`, or without the milliseconds) is read directly:
    /// status reads every point's time, and making an ISO8601DateFormatter costs more than the
    /// rest of the read. Anything else goes through the formatter.
    public static func parse(_ text: String) -> Date? {
        if let date = parseUTC(text) { return date }
        return formatter.withLock { formatter in
            defer { formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds] }
            if let date = formatter.date(from: text) { return date }
            formatter.formatOptions = [.withInternetDateTime]
            return formatter.date(from: text)
        }
    }

    private static let formatter: Locked<ISO8601DateFormatter> = {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return Locked(formatter)
    }()

    /// YYYY-MM-DDTHH:MM:SS[.mmm]Z; nil for any other form. The instant is made as the formatter
    /// makes it (whole milliseconds / 1000 from the reference date), so times compare equal.
    static func parseUTC(_ text: String) -> Date? {
        let bytes = Array(text.utf8)
        guard bytes.count == 20 || bytes.count == 24, bytes.last == UInt8(ascii: "Z"),
              bytes[4] == UInt8(ascii: "-"), bytes[7] == UInt8(ascii: "-"), bytes[10] == UInt8(ascii: "T"),
              bytes[13] == UInt8(ascii: ":"), bytes[16] == UInt8(ascii: ":") else { return nil }
        func number(_ from: Int, _ count: Int) -> Int? {
            var value = 0
            for byte in bytes[from..<from + count] {
                guard byte >= 48 && byte <= 57 else { return nil }
                value = value * 10 + Int(byte - 48)
            }
            return value
        }
        guard let year = number(0, 4), let month = number(5, 2), let day = number(8, 2),
              let hour = number(11, 2), let minute = number(14, 2), let second = number(17, 2),
              (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 60 else { return nil }
        var millis = 0
        if bytes.count == 24 {
            guard bytes[19] == UInt8(ascii: "."), let value = number(20, 3) else { return nil }
            millis = value
        }
        // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yearOfEra = y - era * 400
        let dayOfYear = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let dayOfEra = yearOfEra * 365 + yearOfEra / 4 - yearOfEra / 100 + dayOfYear
        let days = era * 146_097 + dayOfEra - 719_468
        let totalMillis = ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis
        return Date(timeIntervalSinceReferenceDate: Double(totalMillis) / 1000 - Date.timeIntervalBetween1970AndReferenceDate)
    }
}

extension JSONEncoder {
    public static var lifeboat: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .custom { date, encoder in
            var container = encoder.singleValueContainer()
            try container.encode(Timestamp.format(date))
        }
        return encoder
    }
}

extension JSONDecoder {
    public static var lifeboat: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .custom { decoder in
            let text = try decoder.singleValueContainer().decode(String.self)
            guard let date = Timestamp.parse(text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "not an ISO 8601 time: \(text)"))
            }
            return date
        }
        return decoder
    }
}
