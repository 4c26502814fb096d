import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif

/// One disk of a libvirt domain, as its XML describes it.
public struct DomainDisk: Sendable, Equatable {
    /// Guest device name (vda, sdb …): the disk's name in Lifeboat.
    public var target: String
    /// file or block
    public var type: String
    /// The image file or block device.
    public var source: String
    /// qcow2, raw … (the driver's type)
    public var format: String

    public init(target: String, type: String, source: String, format: String) {
        self.target = target
        self.type = type
        self.source = source
        self.format = format
    }

    /// Only qcow2 images can hold the persistent dirty bitmaps of checkpoints.
    public var canHoldBitmaps: Bool { format == "qcow2" }

    /// The disks (device='disk', file or block, with a source) of a domain XML, in order.
    /// CD-ROMs, floppies, network disks and empty drives are left out.
    /// - Throws: `LibvirtError` when the XML does not parse.
    public static func disks(inDomainXML xml: String) throws -> [DomainDisk] {
        let document: XMLDocument
        do { document = try XMLDocument(xmlString: xml) } catch {
            throw LibvirtError(code: -1, domain: -1, message: "the domain XML does not parse: \(error)")
        }
        let nodes = (try? document.nodes(forXPath: "/domain/devices/disk")) ?? []
        return nodes.compactMap { node -> DomainDisk? in
            guard let disk = node as? XMLElement, disk.attribute(forName: "device")?.stringValue ?? "disk" == "disk" else { return nil }
            let type = disk.attribute(forName: "type")?.stringValue ?? "file"
            guard type == "file" || type == "block",
                  let source = disk.elements(forName: "source").first,
                  let path = source.attribute(forName: type == "file" ? "file" : "dev")?.stringValue,
                  let target = disk.elements(forName: "target").first?.attribute(forName: "dev")?.stringValue else { return nil }
            let format = disk.elements(forName: "driver").first?.attribute(forName: "type")?.stringValue ?? "raw"
            return DomainDisk(target: target, type: type, source: path, format: format)
        }
    }

    /// The image the disk with guest device `target` is on, in a domain XML.
    public static func source(of target: String, inDomainXML xml: String) -> String? {
        (try? disks(inDomainXML: xml))?.first { $0.target == target }?.source
    }

    /// The `<disk>` of a qcow2 image over a raw backing file, with the chain spelled out (libvirt
    /// 9.0 wants it for a raw backing file): a block copy's destination.
    public static func qcow2OverRawXML(image: String, backing: String) -> String {
        element("disk", ["type": "file"], [
            element("driver", ["type": "qcow2"]),
            element("source", ["file": image]),
            element("backingStore", ["type": "file"], [
                element("format", ["type": "raw"]), element("source", ["file": backing]), element("backingStore"),
            ]),
        ]).xmlString
    }

    /// An element with its attributes (escaped by FoundationXML) and children.
    static func element(_ name: String, _ attributes: KeyValuePairs<String, String> = [:], _ children: [XMLElement] = []) -> XMLElement {
        let element = XMLElement(name: name)
        for (key, value) in attributes {
            element.addAttribute(XMLNode.attribute(withName: key, stringValue: value) as! XMLNode)
        }
        children.forEach(element.addChild)
        return element
    }
}
