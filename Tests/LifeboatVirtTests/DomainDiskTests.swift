import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import LifeboatVirt
import Testing

@Suite("Disk XML read and written with an XML parser")
struct DomainDiskTests {
    @Test("a block copy's destination names its image and raw backing file, escaped; a domain's disk sources are found by target")
    func qcow2OverRaw() throws {
        let image = "/hot/it's <web> & co/vda.top.qcow2", backing = "/hot/it's <web> & co/vda.raw"
        let xml = DomainDisk.qcow2OverRawXML(image: image, backing: backing)
        let document = try XMLDocument(xmlString: xml)
        #expect(try document.nodes(forXPath: "/disk/source/@file").first?.stringValue == image)
        #expect(try document.nodes(forXPath: "/disk/driver/@type").first?.stringValue == "qcow2")
        #expect(try document.nodes(forXPath: "/disk/backingStore/source/@file").first?.stringValue == backing)
        #expect(try document.nodes(forXPath: "/disk/backingStore/format/@type").first?.stringValue == "raw")
        let domain = """
            <domain><devices>
              <disk type='file' device='disk'><driver type='qcow2'/><source file='/a/vda.qcow2'/><target dev='vda'/></disk>
              <disk type='file' device='disk'><driver type='raw'/><source file="\(backing.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;"))"/><target dev='vdb'/></disk>
            </devices></domain>
            """
        #expect(DomainDisk.source(of: "vda", inDomainXML: domain) == "/a/vda.qcow2")
        #expect(DomainDisk.source(of: "vdb", inDomainXML: domain) == backing)
        #expect(DomainDisk.source(of: "vdc", inDomainXML: domain) == nil)
    }
}
