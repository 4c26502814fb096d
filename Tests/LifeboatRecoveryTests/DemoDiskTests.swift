import Foundation
import LifeboatTestSupport
import Testing

extension RecoveryVMTests {
@Suite("The demo disk")
struct DemoDiskTests {
    @Test("boots under libvirt from its own MBR (boot dev='hd'), prints its marker and keeps a boot log")
    func bootsUnderLibvirt() throws {
        let scratch = Scratch()
        chmod(scratch.path, 0o755)
        let disk = scratch.file("demo.raw")
        try DemoDisk.make(disk, marker: "boot test")
        let console = scratch.file("console.log")
        let name = "lbtest-boot-\(getpid())"
        let xml = """
        <domain type='qemu'>
          <name>\(name)</name>
          <memory unit='MiB'>256</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
          <devices>
            <disk type='file' device='disk'>
              <driver name='qemu' type='raw'/>
              <source file='\(disk)'/>
              <target dev='vda' bus='virtio'/>
            </disk>
            <serial type='file'><source path='\(console)'/><target port='0'/></serial>
          </devices>
        </domain>
        """
        FileManager.default.createFile(atPath: scratch.file("domain.xml"), contents: Data(xml.utf8))
        try sh(["virsh", "-c", "qemu:///system", "create", scratch.file("domain.xml")])
        defer { _ = try? sh(["virsh", "-c", "qemu:///system", "destroy", name]) }
        var log = ""
        for _ in 0..<120 where !log.contains("LIFEBOAT-READY") {
            Thread.sleep(forTimeInterval: 0.5)
            log = (try? String(contentsOfFile: console, encoding: .isoLatin1)) ?? ""
        }
        #expect(log.contains("LIFEBOAT-MARKER: boot test"))
        #expect(log.contains("LIFEBOAT-READY"))
        _ = try? sh(["virsh", "-c", "qemu:///system", "destroy", name])
        let bootLog = try sh(["debugfs", "-R", "cat /boot.log", "\(disk)?offset=\(DemoDisk.dataOffset)"])
        #expect(bootLog.contains("boot "), "the guest appended to /boot.log on its data partition")
    }
}
}
