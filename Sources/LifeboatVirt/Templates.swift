import Foundation
import Mustache

/// A template that could not be read, parsed or rendered.
public struct TemplateError: Error, Sendable, CustomStringConvertible {
    public var file: String
    public var line: Int?
    public var message: String

    public var description: String {
        "template \(file)" + (line.map { " line \($0)" } ?? "") + ": \(message)"
    }
}

/// The XML templates for recovery VMs and their networks: `domain.xml.mustache`,
/// `test-network.xml.mustache` and `production-network.xml.mustache` in one folder.
///
/// `{{name}}` is escaped for XML (`<`, `>`, `&`, quotes), so values from the user cannot
/// change the document's structure.
public struct Templates: Sendable {
    public static let domain = "domain.xml.mustache"
    public static let testNetwork = "test-network.xml.mustache"
    public static let productionNetwork = "production-network.xml.mustache"

    /// The folder the templates are read from.
    public let directory: String

    public init(directory: String) {
        self.directory = directory
    }

    /// Finds the templates: `explicit` (from `--templates`) or `$LIFEBOAT_TEMPLATES` when given,
    /// else /etc/lifeboat/templates, else `templates/` beside or above the executable
    /// (the source tree, when run from `.build/release`), else /usr/share/lifeboat/templates.
    /// - Throws: `TemplateError` naming the folders that were searched.
    public static func locate(explicit: String? = nil, executable: String? = nil) throws -> Templates {
        let fileManager = FileManager.default
        if let given = explicit ?? ProcessInfo.processInfo.environment["LIFEBOAT_TEMPLATES"], !given.isEmpty {
            guard fileManager.fileExists(atPath: given + "/" + domain) else {
                throw TemplateError(file: given, line: nil,
                                    message: "no \(domain) there: copy the templates/ folder of lifeboat and edit the copies")
            }
            return Templates(directory: given)
        }
        var candidates = ["/etc/lifeboat/templates"]
        let exe = executable ?? (try? fileManager.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var folder = (exe as NSString).deletingLastPathComponent
        for _ in 0..<5 where folder.count > 1 {
            candidates.append(folder + "/templates")
            candidates.append(folder + "/share/lifeboat/templates")
            folder = (folder as NSString).deletingLastPathComponent
        }
        candidates.append("/usr/share/lifeboat/templates")
        for candidate in candidates where fileManager.fileExists(atPath: candidate + "/" + domain) {
            return Templates(directory: candidate)
        }
        throw TemplateError(file: "templates/", line: nil,
                            message: "not found in \(candidates.joined(separator: ", ")): give --templates DIR or set LIFEBOAT_TEMPLATES")
    }

    /// Renders template `name` with `parameters` (a struct; its property names are the tags).
    /// - Throws: `TemplateError` with the file and line of a syntax error.
    public func render(_ name: String, _ parameters: Any) throws -> String {
        let path = directory + "/" + name
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw TemplateError(file: path, line: nil, message: "cannot be read: check that it exists and is readable")
        }
        let template: MustacheTemplate
        do {
            template = try MustacheTemplate(string: text)
        } catch let error as MustacheTemplate.ParserError {
            throw TemplateError(file: path, line: error.context.lineNumber,
                                message: "\(Self.explain(error.error)) at column \(error.context.columnNumber): \(error.context.line.trimmingCharacters(in: .whitespaces))")
        } catch {
            throw TemplateError(file: path, line: nil, message: "\(error)")
        }
        return template.render(parameters)
    }

    static func explain(_ error: any Error) -> String {
        guard let error = error as? MustacheTemplate.Error else { return "\(error)" }
        switch error {
        case .sectionCloseNameIncorrect: return "a section is closed with the wrong name"
        case .unfinishedName: return "a tag is not closed with }}"
        case .expectedSectionEnd: return "a section is never closed"
        case .invalidSetDelimiter: return "a set-delimiter tag is malformed"
        default: return "\(error)"
        }
    }
}

/// What the domain template is filled from.
public struct DomainParameters: Sendable {
    public struct Disk: Sendable {
        /// Guest device name: vda, vdb, … (sda … for sata/scsi).
        public var target: String
        public var bus: String
        /// The image QEMU writes to (a qcow2 overlay or a finalised hot disk).
        public var file: String
        public var format: String
        /// The read-only image under it (the recovery point's disk served by FUSE), if any.
        public var backingFile: String?
        public var backingFormat: String?

        public init(target: String, bus: String = "virtio", file: String, format: String = "qcow2",
                    backingFile: String? = nil, backingFormat: String? = "raw") {
            self.target = target
            self.bus = bus
            self.file = file
            self.format = format
            self.backingFile = backingFile
            self.backingFormat = backingFile == nil ? nil : backingFormat
        }
    }

    public struct Interface: Sendable {
        /// A libvirt network, or nil with `bridge` set.
        public var network: String?
        /// A host bridge, when not a libvirt network.
        public var bridge: String?
        public var mac: String
        public var model: String

        public init(network: String? = nil, bridge: String? = nil, mac: String, model: String = "virtio") {
            self.network = network
            self.bridge = bridge
            self.mac = mac
            self.model = model
        }
    }

    public var name: String
    /// kvm or qemu.
    public var type: String
    public var vcpus: Int
    public var memoryMiB: Int
    public var title: String
    public var description: String
    public var disks: [Disk]
    public var interfaces: [Interface]
    /// The serial console is written to this file.
    public var consoleLog: String
    /// A VNC console on 127.0.0.1 (for screenshots and people).
    public var graphics: Bool
    /// True under kvm (the template then asks for a `host-model` CPU). Set from `type`.
    public var kvm: Bool
    /// QEMU machine type (pc, q35 …).
    public var machine: String = "pc"
    /// UEFI firmware (OVMF, secure boot off) instead of BIOS.
    public var uefi: Bool = false
    /// A virtio-scsi controller for disks on the scsi bus. Set from the disks.
    public var scsi: Bool

    public init(name: String, type: String, vcpus: Int, memoryMiB: Int, title: String, description: String,
                disks: [Disk], interfaces: [Interface], consoleLog: String, graphics: Bool = true) {
        self.name = name
        self.type = type
        self.kvm = type == "kvm"
        self.vcpus = vcpus
        self.memoryMiB = memoryMiB
        self.title = title
        self.description = description
        self.disks = disks
        self.scsi = disks.contains { $0.bus == "scsi" }
        self.interfaces = interfaces
        self.consoleLog = consoleLog
        self.graphics = graphics
    }
}

/// What the network templates are filled from.
public struct NetworkParameters: Sendable {
    public struct Host: Sendable {
        public var mac: String
        public var ip: String
        public var name: String

        public init(mac: String, ip: String, name: String) {
            self.mac = mac
            self.ip = ip
            self.name = name
        }
    }

    public var name: String
    /// The host's address on the network's bridge (the guests' gateway).
    public var address: String
    public var netmask: String
    public var dhcpStart: String
    public var dhcpEnd: String
    public var hosts: [Host]
    /// Production only: a host bridge to attach to instead of a libvirt bridge.
    public var bridge: String?

    public init(name: String, address: String, netmask: String, dhcpStart: String, dhcpEnd: String,
                hosts: [Host] = [], bridge: String? = nil) {
        self.name = name
        self.address = address
        self.netmask = netmask
        self.dhcpStart = dhcpStart
        self.dhcpEnd = dhcpEnd
        self.hosts = hosts
        self.bridge = bridge
    }
}
