import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif

/// The small libvirt documents lifeboat writes and reads besides domains and disks: a pull-mode
/// backup, a checkpoint, a DHCP host entry, a network's address. Built and parsed as XML, so
/// names and paths never change a document's structure.
public enum LibvirtXML {
    /// A pull-mode `<domainbackup>` served on the Unix socket `socket`, each disk with its scratch
    /// file, incremental from checkpoint `base` when given.
    public static func pullBackup(socket: String, disks: [(target: String, scratch: String)], incrementalFrom base: String?) -> String {
        var children: [XMLElement] = []
        if let base { children.append(XMLElement(name: "incremental", stringValue: base)) }
        children.append(DomainDisk.element("server", ["transport": "unix", "socket": socket]))
        children.append(DomainDisk.element("disks", [:], disks.map { disk in
            DomainDisk.element("disk", ["name": disk.target, "backup": "yes", "type": "file"], [
                DomainDisk.element("scratch", ["file": disk.scratch]),
            ])
        }))
        return DomainDisk.element("domainbackup", ["mode": "pull"], children).xmlString
    }

    /// A `<domaincheckpoint>` named `name` with a dirty bitmap on each of `targets`.
    public static func checkpoint(name: String, description: String, targets: [String]) -> String {
        DomainDisk.element("domaincheckpoint", [:], [
            XMLElement(name: "name", stringValue: name),
            XMLElement(name: "description", stringValue: description),
            DomainDisk.element("disks", [:], targets.map { DomainDisk.element("disk", ["name": $0, "checkpoint": "bitmap"]) }),
        ]).xmlString
    }

    /// A network's DHCP `<host>` entry (an address reserved for a MAC; without `ip`, for removal).
    public static func dhcpHost(mac: String, ip: String?, name: String) -> String {
        let element = DomainDisk.element("host", ["mac": mac])
        if let ip { element.addAttribute(XMLNode.attribute(withName: "ip", stringValue: ip) as! XMLNode) }
        element.addAttribute(XMLNode.attribute(withName: "name", stringValue: name) as! XMLNode)
        return element.xmlString
    }

    /// The first `<ip>` of a network's XML: its address and prefix (or netmask).
    public static func networkAddress(_ xml: String) -> (address: String, prefix: Int?, netmask: String?)? {
        guard let document = try? XMLDocument(xmlString: xml),
              let ip = (try? document.nodes(forXPath: "/network/ip"))?.first as? XMLElement,
              let address = ip.attribute(forName: "address")?.stringValue else { return nil }
        return (address, ip.attribute(forName: "prefix")?.stringValue.flatMap { Int($0) }, ip.attribute(forName: "netmask")?.stringValue)
    }
}
