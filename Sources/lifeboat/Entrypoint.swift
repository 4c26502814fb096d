import ArgumentParser
import Foundation
import LifeboatBase
import LifeboatRepository

@main
struct Entrypoint {
    static func main() async {
        do {
            var command = try Lifeboat.parseAsRoot()
            if var service = command as? any AsyncParsableCommand {
                try await service.run()
            } else {
                try command.run()
            }
        } catch let error as LifeboatError {
            Terminal.clearProgressLine()
            FileHandle.standardError.write(Data("lifeboat: \(error.message)\n".utf8))
            Foundation.exit(error.code == .damaged ? 3 : 1)
        } catch {
            Lifeboat.exit(withError: error)
        }
    }
}

struct Lifeboat: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lifeboat",
        abstract: "Disaster recovery for Linux/KVM: deduplicated recovery points in a cold repository.",
        subcommands: [
            Init.self, Protect.self, Configure.self, Machines.self, Unprotect.self, Backup.self, BackupGuardCommand.self, Points.self,
            Restore.self, Verify.self, Sync.self, Prune.self, GC.self, Compact.self, Mount.self, Unmount.self, Browse.self, Unbrowse.self,
            Replicate.self, TestFailover.self, StopTest.self, Status.self, Drills.self,
            Failover.self, Resume.self, Finalise.self, ChangePoint.self, CancelFailover.self, Commit.self, Failback.self, History.self,
            PlanCommand.self, Plans.self, Reports.self, ReportCommand.self,
            ConsoleCommand.self, UserCommand.self, Users.self,
        ]
    )
}
