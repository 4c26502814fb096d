import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import LifeboatTestSupport
import LifeboatVirt
import Testing

@Suite("Templates")
struct TemplateTests {
    let templates = Templates(directory: packageRoot + "/templates")

    func domain(disks: [DomainParameters.Disk], graphics: Bool = true, description: String = "d") -> DomainParameters {
        DomainParameters(name: "lifeboat-test-web", type: "qemu", vcpus: 2, memoryMiB: 768, title: "t", description: description,
                         disks: disks, interfaces: [.init(network: "lifeboat-test", mac: "52:54:00:00:00:01")],
                         consoleLog: "/hot/web/console.log", graphics: graphics)
    }

    @Test("every template renders to well-formed XML with the values in place")
    func rendersAll() throws {
        let xml = try templates.render(Templates.domain, domain(disks: [
            .init(target: "vda", file: "/hot/web/vda.qcow2", backingFile: "/run/lifeboat/m/web/1/web.raw"),
            .init(target: "vdb", file: "/hot/web/vdb.qcow2"),
        ]))
        let document = try XMLDocument(xmlString: xml)
        #expect(try document.nodes(forXPath: "/domain/@type").first?.stringValue == "qemu")
        #expect(try document.nodes(forXPath: "/domain/vcpu").first?.stringValue == "2")
        #expect(try document.nodes(forXPath: "/domain/devices/disk").count == 2)
        #expect(try document.nodes(forXPath: "/domain/devices/disk[1]/backingStore/source/@file").first?.stringValue == "/run/lifeboat/m/web/1/web.raw")
        #expect(try document.nodes(forXPath: "/domain/devices/disk[1]/backingStore/source/seclabel/@relabel").first?.stringValue == "no")
        #expect(try document.nodes(forXPath: "/domain/devices/disk[2]/backingStore").isEmpty, "a disk without backing file has none")
        #expect(try document.nodes(forXPath: "/domain/devices/interface/source/@network").first?.stringValue == "lifeboat-test")
        #expect(try document.nodes(forXPath: "/domain/devices/serial/source/@path").first?.stringValue == "/hot/web/console.log")
        #expect(try document.nodes(forXPath: "/domain/devices/graphics/@listen").first?.stringValue == "127.0.0.1")
        #expect(try document.nodes(forXPath: "/domain/cpu").isEmpty, "no host-model CPU under qemu")

        let network = NetworkParameters(name: "lifeboat-test", address: "192.168.50.1", netmask: "255.255.255.0",
                                        dhcpStart: "192.168.50.192", dhcpEnd: "192.168.50.254",
                                        hosts: [.init(mac: "52:54:00:00:00:01", ip: "192.168.50.10", name: "web")])
        for name in [Templates.testNetwork, Templates.productionNetwork] {
            let document = try XMLDocument(xmlString: try templates.render(name, network))
            #expect(try document.nodes(forXPath: "/network/ip/dhcp/host/@ip").first?.stringValue == "192.168.50.10")
        }
        let test = try XMLDocument(xmlString: try templates.render(Templates.testNetwork, network))
        #expect(try test.nodes(forXPath: "/network/forward").isEmpty, "the test network is isolated: no forward element")
    }

    @Test("values are XML-escaped: text from the user cannot change the document")
    func escapes() throws {
        let xml = try templates.render(Templates.domain, domain(disks: [], description: "</description><devices>&'\""))
        let document = try XMLDocument(xmlString: xml)
        #expect(try document.nodes(forXPath: "/domain/description").first?.stringValue == "</description><devices>&'\"")
    }

    @Test("a broken template is reported with its file and line")
    func brokenTemplate() throws {
        let scratch = Scratch()
        try "<domain>\n  <name>{{name}}</name>\n  {{#disks}}\n</domain>\n".write(toFile: scratch.file(Templates.domain), atomically: true, encoding: .utf8)
        #expect {
            try Templates(directory: scratch.path).render(Templates.domain, domain(disks: []))
        } throws: { error in
            let text = "\(error)"
            return text.contains(scratch.file(Templates.domain)) && text.contains("line ")
        }
        #expect(throws: TemplateError.self) { try Templates.locate(explicit: scratch.file("nothing-here")) }
    }
}
