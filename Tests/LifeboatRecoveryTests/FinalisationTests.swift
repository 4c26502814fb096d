import LifeboatRecovery
import Testing

@Suite("Finalisation of a disk as a pure state machine")
struct FinalisationTests {
    typealias F = DiskFinalisation

    @Test("each observation gives its phase and actions")
    func table() {
        let cases: [(F.Image, F.Job?, Bool, F.Phase, [F.Action])] = [
            (.overlay, nil, false, .seeding, []),
            (.overlay, .running, false, .seeding, []),
            (.overlay, nil, true, .copyingWrites(nil), [.createTop, .blockCopy]),
            (.overlay, .running, true, .copyingWrites(.running), []),
            (.overlay, .ready, true, .copyingWrites(.ready), [.pivot, .adoptTop]),
            (.top, nil, true, .merging(nil), [.adoptTop, .commit]),
            (.top, .running, true, .merging(.running), [.adoptTop]),
            (.top, .ready, true, .merging(.ready), [.adoptTop, .pivot, .adoptFinal]),
            (.final, nil, true, .hot, [.adoptFinal]),
        ]
        for (image, job, seeded, phase, actions) in cases {
            var machine = F()
            #expect(machine.observe(guestOn: image, job: job, seeded: seeded) == actions, "\(image) \(String(describing: job)) \(seeded)")
            #expect(machine.phase == phase)
        }
        #expect(F.Phase.copyingWrites(.ready).step == "pivoting" && F.Phase.merging(nil).step == "merging"
                && F.Phase.copyingWrites(.running).step == "copying writes")
        #expect(F.topImage("/hot/web1/disks/vda.raw") == "/hot/web1/disks/vda.top.qcow2")
    }

    /// A disk and its domain as the caller sees them, moved by the actions (a pivot refused once).
    struct SimulatedDisk {
        var guestOn: F.Image = .overlay
        var job: F.Job?
        var seeded = false
        var topExists = false
        var recordedOn: F.Image = .overlay
        var refusePivots = 1
        var log: [F.Action] = []

        /// Performs actions in order, stopping after a refused pivot, as Recovery.advance does.
        mutating func perform(_ actions: [F.Action]) {
            for action in actions {
                log.append(action)
                switch action {
                case .adoptTop: recordedOn = .top
                case .adoptFinal: recordedOn = .final; topExists = false
                case .createTop: topExists = true
                case .blockCopy: job = .running
                case .commit: job = .running
                case .pivot:
                    if refusePivots > 0 { refusePivots -= 1; return }
                    guestOn = guestOn == .overlay ? .top : .final
                    job = nil
                }
            }
        }
    }

    @Test("from the backup to hot, with the seeding, jobs catching up, a refused pivot and a crash at every step")
    func wholeRun() {
        var disk = SimulatedDisk()
        var machine = F()
        var phases: [F.Phase] = []
        var steps = 0
        while machine.phase != .hot && steps < 50 {
            steps += 1
            if steps == 3 { disk.seeded = true }               // the repository finished writing final
            if disk.job == .running && steps % 2 == 0 { disk.job = .ready }   // the job caught up
            // A finaliser that crashed starts with a new machine: the same observation gives the same actions.
            var restarted = F()
            let actions = machine.observe(guestOn: disk.guestOn, job: disk.job, seeded: disk.seeded)
            #expect(restarted.observe(guestOn: disk.guestOn, job: disk.job, seeded: disk.seeded) == actions)
            if phases.last != machine.phase { phases.append(machine.phase) }
            disk.perform(actions)
        }
        #expect(machine.phase == .hot && disk.guestOn == .final && disk.recordedOn == .final && !disk.topExists, "\(disk)")
        #expect(phases.first == .seeding && phases.contains(.copyingWrites(nil)) && phases.contains(.merging(nil)), "\(phases)")
        #expect(disk.log.filter { $0 == .pivot }.count == 3, "two pivots and one refused: \(disk.log)")
        #expect(disk.log.firstIndex(of: .createTop)! < disk.log.firstIndex(of: .blockCopy)!)
        #expect(disk.log.firstIndex(of: .commit)! > disk.log.firstIndex(of: .adoptTop)!)
    }
}
