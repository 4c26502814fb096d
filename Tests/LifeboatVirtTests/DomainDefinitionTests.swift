import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import LifeboatVirt
import Testing

@Suite("A recovery VM built from its source domain's definition")
struct DomainDefinitionTests {
    static func source(loader: String) -> String {
        """
        <domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>web1</name><uuid>0b9c3a52-0000-4000-8000-000000000001</uuid><memory unit='KiB'>2097152</memory>
        <vcpu placement='static'>2</vcpu><cputune><vcpupin vcpu='0' cpuset='3'/></cputune>
        <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><loader readonly='yes' type='pflash'>\(loader)</loader>
        <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
        <cpu mode='host-passthrough' check='none'><topology sockets='1' cores='2' threads='1'/></cpu>
        <seclabel type='dynamic' model='apparmor'/>
        <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
          <disk type='block' device='disk'><driver name='qemu' type='raw' io='native' cache='none'/><source dev='/dev/vg/web1'/><target dev='sda' bus='scsi'/><boot order='1'/></disk>
          <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/images/data.qcow2'/><target dev='sdb' bus='sata'/></disk>
          <disk type='file' device='cdrom'><source file='/isos/setup.iso'/><target dev='sdc' bus='sata'/></disk>
          <interface type='bridge'><mac address='52:54:00:aa:00:01'/><source bridge='br-prod'/><target dev='vnet3'/><model type='e1000e'/></interface>
          <interface type='network'><mac address='52:54:00:aa:00:02'/><source network='backend'/><model type='virtio'/></interface>
          <hostdev mode='subsystem' type='pci'><source><address domain='0' bus='3' slot='0' function='0'/></source></hostdev>
          <channel type='unix'><source mode='bind' path='/run/agent.sock'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
          <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
          <serial type='pty'/><graphics type='spice' listen='0.0.0.0'/><video><model type='qxl'/></video>
          <input type='evdev'><source dev='/dev/input/event0'/></input><input type='tablet' bus='usb'/>
          <memory model='nvdimm'><source><path>/etc/shadow</path></source><target><size unit='KiB'>1024</size></target></memory>
        </devices>
        <qemu:commandline><qemu:arg value='-netdev'/><qemu:arg value='user,id=escape'/></qemu:commandline></domain>
        """
    }

    @Test("hardware read from the XML: firmware, machine, CPU, memory, disks with bus and boot order, NICs, agent, TPM")
    func hardware() throws {
        let hardware = try DomainDefinition(xml: Self.source(loader: "/usr/share/OVMF/OVMF_CODE_4M.fd")).hardware
        #expect(hardware.firmware == "uefi" && hardware.machine == "pc-q35-7.2" && hardware.cpu == "host-passthrough")
        #expect(hardware.vcpus == 2 && hardware.memoryMiB == 2048)
        #expect(hardware.disks.map(\.target) == ["sda", "sdb"] && hardware.disks.map(\.bus) == ["scsi", "sata"])
        #expect(hardware.disks.first?.bootOrder == 1)
        #expect(hardware.nics.map(\.mac) == ["52:54:00:aa:00:01", "52:54:00:aa:00:02"] && hardware.nics.map(\.model) == ["e1000e", "virtio"])
        #expect(hardware.agent && hardware.tpm == "tpm-crb 2.0" && hardware.video == "qxl")
    }

    @Test("the recovery VM keeps the hardware, points disks at the overlays and NICs at chosen networks, drops host-only parts and names them")
    func recoveryXML() throws {
        let loader = "/usr/share/OVMF/OVMF_CODE_4M.fd"   // Debian's ovmf (scripts/setup installs it)
        let definition = try DomainDefinition(xml: Self.source(loader: loader))
        let recovery = DomainDefinition.Recovery(
            name: "lifeboat-test-web1", title: "drill", description: "a <drill> & more", type: "qemu", vcpus: 2, memoryMiB: 2048,
            disks: ["sda": (file: "/hot/sda.qcow2", backing: "/mnt/web1/p/sda.raw"), "sdb": (file: "/hot/sdb.qcow2", backing: "/mnt/web1/p/sdb.raw")],
            network: { _, source in source == "backend" ? ("lb-backend", nil) : ("lifeboat-test", nil) },
            consoleLog: "/hot/console.log", nvram: "/hot/web1_VARS.fd")
        let (xml, dropped) = try definition.recoveryXML(recovery)
        let document = try XMLDocument(xmlString: xml)
        func values(_ path: String) -> [String] { ((try? document.nodes(forXPath: path)) ?? []).compactMap(\.stringValue) }
        #expect(values("/domain/@type") == ["qemu"] && values("/domain/name") == ["lifeboat-test-web1"] && values("/domain/uuid").isEmpty)
        #expect(values("/domain/os/type/@machine") == ["pc-q35-7.2"] && values("/domain/os/loader") == [loader])
        #expect(values("/domain/os/nvram") == ["/hot/web1_VARS.fd"])
        #expect(values("/domain/devices/disk[@device='disk']/source/@file") == ["/hot/sda.qcow2", "/hot/sdb.qcow2"])
        #expect(values("/domain/devices/disk[@device='disk']/target/@bus") == ["scsi", "sata"])
        #expect(values("/domain/devices/disk[@device='disk']/boot/@order") == ["1"])
        #expect(values("/domain/devices/disk[@device='disk']/backingStore/source/@file") == ["/mnt/web1/p/sda.raw", "/mnt/web1/p/sdb.raw"])
        #expect(values("/domain/devices/disk[@device='cdrom']/source/@file").isEmpty)
        #expect(values("/domain/devices/interface/mac/@address") == ["52:54:00:aa:00:01", "52:54:00:aa:00:02"])
        #expect(values("/domain/devices/interface/source/@network") == ["lifeboat-test", "lb-backend"])
        #expect(values("/domain/devices/interface/target").isEmpty && values("/domain/devices/interface/model/@type") == ["e1000e", "virtio"])
        #expect(values("/domain/devices/hostdev").isEmpty && values("/domain/devices/emulator").isEmpty && values("/domain/seclabel").isEmpty)
        #expect(values("/domain/cputune").isEmpty && values("/domain/cpu/@mode").isEmpty && values("/domain/cpu/topology/@cores") == ["2"])
        #expect(values("/domain/devices/channel/target/@name") == ["org.qemu.guest_agent.0"] && values("/domain/devices/channel/source").isEmpty)
        #expect(values("/domain/devices/tpm/@model") == ["tpm-crb"])
        #expect(values("/domain/devices/serial/source/@path") == ["/hot/console.log"])
        #expect(values("/domain/devices/graphics/@listen") == ["127.0.0.1"] && values("/domain/description") == ["a <drill> & more"])
        #expect(dropped.contains { $0.contains("hostdev") } && dropped.contains { $0.contains("cdrom sdc") } && dropped.contains { $0.contains("host-passthrough") })
        // Nothing that reaches the host stays: QEMU pass-through, host files as memory, host input.
        #expect(!xml.contains("commandline") && !xml.contains("escape") && !xml.contains("/etc/shadow") && !xml.contains("evdev"), "\(xml)")
        #expect(values("/domain/devices/input/@type") == ["tablet"])
        #expect(dropped.contains { $0.contains("qemu:commandline") } && dropped.contains { $0.contains("memory nvdimm") })
        // Firmware only from the system's firmware folders.
        #expect(throws: (any Error).self) { _ = try DomainDefinition(xml: Self.source(loader: "/tmp/evil.fd")).recoveryXML(recovery) }
    }

    @Test("backup, checkpoint, DHCP host and network address documents are XML: quotes, ampersands and brackets stay text")
    func smallDocuments() throws {
        func values(_ xml: String, _ path: String) throws -> [String] {
            try XMLDocument(xmlString: xml).nodes(forXPath: path).compactMap(\.stringValue)
        }
        let backup = LibvirtXML.pullBackup(socket: "/run/it's <x>&y/nbd.sock", disks: [("sda", "/hot/a'b/sda.scratch")], incrementalFrom: "cp-1")
        #expect(try values(backup, "/domainbackup/server/@socket") == ["/run/it's <x>&y/nbd.sock"])
        #expect(try values(backup, "/domainbackup/incremental") == ["cp-1"] && values(backup, "/domainbackup/disks/disk/scratch/@file") == ["/hot/a'b/sda.scratch"])
        let checkpoint = LibvirtXML.checkpoint(name: "lifeboat-1", description: "point of <web> & 'db'", targets: ["vda", "sdb"])
        #expect(try values(checkpoint, "/domaincheckpoint/description") == ["point of <web> & 'db'"])
        #expect(try values(checkpoint, "/domaincheckpoint/disks/disk/@name") == ["vda", "sdb"])
        let host = LibvirtXML.dhcpHost(mac: "52:54:00:00:00:01", ip: nil, name: "web-1")
        #expect(try values(host, "/host/@ip").isEmpty && values(host, "/host/@name") == ["web-1"])
        let network = LibvirtXML.networkAddress("<network><name>n</name><ip address=\"10.1.2.1\" netmask='255.255.255.0'/></network>")
        #expect(network?.address == "10.1.2.1" && network?.netmask == "255.255.255.0" && network?.prefix == nil)
    }

    @Test("a recovery host without the source's UEFI firmware: one line saying to install it")
    func missingFirmware() throws {
        let definition = try DomainDefinition(xml: Self.source(loader: "/usr/share/OVMF/OVMF_MISSING_4M.fd"))
        let recovery = DomainDefinition.Recovery(name: "x", title: "", description: "", type: "qemu", vcpus: nil, memoryMiB: nil,
                                                 disks: [:], network: { _, _ in ("n", nil) }, consoleLog: "/c", nvram: nil)
        #expect(throws: (any Error).self) { _ = try definition.recoveryXML(recovery) }
        do { _ = try definition.recoveryXML(recovery) } catch {
            #expect("\(error)".contains("no UEFI firmware /usr/share/OVMF/OVMF_MISSING_4M.fd") && "\(error)".contains("apt install ovmf"))
            #expect(!"\(error)".contains("\n"))
        }
    }
}
