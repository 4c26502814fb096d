/// Finalisation of one disk of a failed-over VM, as a pure state machine: no I/O, no libvirt.
///
/// A disk goes: the guest writes to its qcow2 **overlay** over the point's FUSE disk while the
/// repository **seeds** the standalone raw **final** file in hot storage; then a **top** qcow2
/// image is made over the final file and a shallow block copy moves the overlay's writes onto it;
/// at the pivot the guest runs on top-over-final; an active block commit merges top into final;
/// at the second pivot the guest runs on the final file alone (hot).
///
/// The caller (`Recovery.advance`) reads what libvirt shows of the disk (which image the guest
/// is on, the block job and whether it is ready), feeds it to `observe`, and performs the actions
/// that come out, in order, stopping at the first that does not go through (a pivot libvirt
/// refuses for now). Every phase is derived again from libvirt at every step, so a finaliser that
/// was killed anywhere, a libvirtd restart or a host reboot continues where it was: the same
/// observation gives the same actions.
public struct DiskFinalisation: Sendable, Equatable {
    /// The image the guest's disk is on, as the live domain XML says.
    public enum Image: Sendable, Equatable {
        /// Its overlay over the backup (or anything that is neither top nor final).
        case overlay
        case top
        case final
    }

    /// The disk's block job, as libvirt reports it.
    public enum Job: Sendable, Equatable {
        case running
        /// Caught up: a pivot would switch the guest over.
        case ready
    }

    public enum Phase: Sendable, Equatable {
        /// The final file is being written from the repository; the guest runs from the backup.
        case seeding
        /// The final file holds the point; the guest's writes are being copied onto top over it.
        case copyingWrites(Job?)
        /// The guest runs on top over the final file; its writes are being merged into final.
        case merging(Job?)
        /// The guest runs on the final file alone: the backup is no longer needed.
        case hot

        /// The finaliser's step as `status` shows it.
        public var step: String {
            switch self {
            case .seeding: return "seeding"
            case .copyingWrites(.ready), .merging(.ready): return "pivoting"
            case .copyingWrites: return "copying writes"
            case .merging: return "merging"
            case .hot: return "hot"
            }
        }
    }

    /// What the caller does, in order.
    public enum Action: Sendable, Equatable {
        /// Record the disk as on top over final; remove the image it was on before, if another.
        case adoptTop
        /// Record the disk as on final alone; remove top.
        case adoptFinal
        /// Make the top qcow2 image over the final file (anew: a half-made one from a crash goes).
        case createTop
        /// Shallow block copy of the guest's image onto top (reusing it), its writes only.
        case blockCopy
        /// Pivot the ready block job; the next actions only when the pivot went through.
        case pivot
        /// Active block commit of top into final.
        case commit
    }

    public private(set) var phase: Phase = .seeding

    public init() {}

    /// Takes what libvirt shows of the disk; returns the actions that move it on.
    /// - Parameters:
    ///   - guestOn: the image the guest's disk is on.
    ///   - job: the disk's block job, nil when none runs.
    ///   - seeded: the final file holds the point.
    public mutating func observe(guestOn: Image, job: Job?, seeded: Bool) -> [Action] {
        switch guestOn {
        case .final:
            phase = .hot
            return [.adoptFinal]
        case .top:
            phase = .merging(job)
            switch job {
            case .ready: return [.adoptTop, .pivot, .adoptFinal]
            case .running: return [.adoptTop]
            case nil: return [.adoptTop, .commit]
            }
        case .overlay:
            guard seeded else {
                phase = .seeding
                return []
            }
            phase = .copyingWrites(job)
            switch job {
            case .ready: return [.pivot, .adoptTop]
            case .running: return []
            case nil: return [.createTop, .blockCopy]
            }
        }
    }

    /// The top image made over `final` (web1.raw -> web1.top.qcow2).
    public static func topImage(_ final: String) -> String {
        (final.hasSuffix(".raw") ? String(final.dropLast(4)) : final) + ".top.qcow2"
    }
}
