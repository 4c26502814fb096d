import Foundation
import LifeboatBase
import LifeboatRepository
import Yams

/// A recovery plan: machines in ordered groups, drilled or failed over together (see docs/PLANS.md).
/// Written by a person as YAML, kept in version control, stored in the repository by `plan apply`.
public struct Plan: Codable, Sendable {
    public enum OnFailure: String, Codable, Sendable { case stop, `continue` }

    public struct Group: Codable, Sendable {
        public var machines: [String]
        /// Regular expression for the boot line (else each machine's own).
        public var waitFor: String?
        /// Shell command run per machine once it booted (LIFEBOAT_VM_IP and friends set).
        public var check: String?
        /// Shell command run once after every machine of the group passed its check.
        public var after: String?
        /// What a person must do after this group in a failover; the run pauses until `plan continue`.
        public var manual: String?
    }

    public var name: String
    public var onFailure: OnFailure
    public var groups: [Group]
    /// Seconds between scheduled drills (by the replication service); nil: never scheduled.
    public var drillEverySeconds: Int?
    /// Reports kept per plan; older ones are deleted after each run.
    public var keepReports: Int
    /// Seconds allowed per machine for its boot line and check.
    public var timeoutSeconds: Int
    /// The folder the plan file was applied from: check and after scripts run there.
    public var directory: String
    /// The YAML as the person wrote it.
    public var source: String
    public var applied: Date

    public var machines: [String] { groups.flatMap(\.machines) }
}

extension Plan {
    public static let defaultKeepReports = 10
    public static let defaultTimeout = 300

    /// Reads and checks a plan file: its form here, its machines against `repository`.
    /// - Throws: `.invalidArgument` naming the file, the line and what is wrong.
    public static func load(file: String, repository: Repository) throws -> Plan {
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
            throw LifeboatError(.notFound, "cannot read plan file \(file): check the path and its permissions")
        }
        let directory = ((file.hasPrefix("/") ? file : FileManager.default.currentDirectoryPath + "/" + file) as NSString)
            .deletingLastPathComponent
        return try parse(text, file: file, directory: directory, repository: repository)
    }

    /// Parses and checks plan YAML. `file` is only used in messages.
    static func parse(_ text: String, file: String, directory: String, repository: Repository) throws -> Plan {
        func fail(_ node: Node?, _ message: String) -> LifeboatError {
            LifeboatError(.invalidArgument, "\(file)" + (node?.mark.map { " line \($0.line)" } ?? "") + ": \(message)")
        }
        let root: Node?
        do { root = try Yams.compose(yaml: text) } catch let error as YamlError {
            throw LifeboatError(.invalidArgument, "\(file): not valid YAML: " + (error.description.split(separator: "\n").first.map(String.init) ?? "?"))
        }
        guard let root, let top = root.mapping else { throw fail(root, "a plan is a mapping with name, groups and on-failure") }

        func string(_ node: Node, _ what: String) throws -> String {
            guard let scalar = node.scalar, !scalar.string.isEmpty else { throw fail(node, "\(what) must be a non-empty text") }
            return scalar.string
        }
        var name: String?
        var onFailure = OnFailure.stop
        var groups: [Group] = []
        var drillEvery: Int?
        var keep = defaultKeepReports
        var timeout = defaultTimeout
        var seen: [String: (group: Int, node: Node)] = [:]
        var groupsNode: Node?
        for (keyNode, value) in top {
            let key = keyNode.string ?? ""
            switch key {
            case "name":
                name = try string(value, "name")
                do { try Machine.validate(name: name!) } catch let error as LifeboatError {
                    throw fail(value, "plan name: \(error.message)")
                }
            case "on-failure":
                guard let text = value.string, let choice = OnFailure(rawValue: text) else { throw fail(value, "on-failure is stop or continue") }
                onFailure = choice
            case "drill-every":
                do { drillEvery = Int(try DurationText.parse(try string(value, "drill-every"))) } catch let error as LifeboatError {
                    throw fail(value, "drill-every: \(error.message)")
                }
            case "keep-reports":
                guard let number = value.int, number >= 1 else { throw fail(value, "keep-reports is a whole number of at least 1") }
                keep = number
            case "timeout":
                do { timeout = Int(try DurationText.parse(try string(value, "timeout"))) } catch let error as LifeboatError {
                    throw fail(value, "timeout: \(error.message)")
                }
            case "groups":
                groupsNode = value
                guard let list = value.sequence else { throw fail(value, "groups is a list of groups, each with machines") }
                for (index, groupNode) in list.enumerated() {
                    guard let fields = groupNode.mapping else { throw fail(groupNode, "group \(index + 1) must be a mapping with machines") }
                    var group = Group(machines: [])
                    var machinesNode: Node?
                    for (fieldNode, field) in fields {
                        switch fieldNode.string ?? "" {
                        case "machines":
                            machinesNode = field
                            guard let names = field.sequence else { throw fail(field, "machines of group \(index + 1) is a list, like [db1, db2]") }
                            for machineNode in names {
                                let machine = try string(machineNode, "a machine name")
                                if let earlier = seen[machine] {
                                    throw fail(machineNode, "machine \(machine) is in group \(earlier.group + 1) (line \(earlier.node.mark?.line ?? 0)) and in group \(index + 1): a machine belongs to one group")
                                }
                                guard (try? repository.machine(machine)) != nil else {
                                    throw fail(machineNode, "unknown machine \(machine): protect it first, or fix the name (see lifeboat machines)")
                                }
                                seen[machine] = (index, machineNode)
                                group.machines.append(machine)
                            }
                        case "wait-for":
                            let pattern = try string(field, "wait-for")
                            guard (try? NSRegularExpression(pattern: pattern)) != nil else { throw fail(field, "wait-for '\(pattern)' is not a regular expression") }
                            group.waitFor = pattern
                        case "check": group.check = try string(field, "check")
                        case "after": group.after = try string(field, "after")
                        case "manual": group.manual = try string(field, "manual")
                        case let other: throw fail(fieldNode, "unknown group field '\(other)': use machines, wait-for, check, after, manual")
                        }
                    }
                    guard !group.machines.isEmpty else { throw fail(machinesNode ?? groupNode, "group \(index + 1) is empty: list its machines") }
                    groups.append(group)
                }
            case let other:
                throw fail(keyNode, "unknown field '\(other)': use name, on-failure, groups, drill-every, keep-reports, timeout")
            }
        }
        guard let name else { throw fail(root, "the plan has no name: add 'name: NAME'") }
        guard !groups.isEmpty else { throw fail(groupsNode ?? root, "the plan has no groups: add 'groups:' with at least one group of machines") }

        // Every machine boots on one network with its production IP: no two may share one.
        var owners: [UInt32: String] = [:]
        for machine in groups.flatMap(\.machines) {
            guard let text = try repository.machine(machine).ip, let ip = try? Interface4.parse(text, what: "ip") else { continue }
            if let other = owners[ip.address.value] {
                throw fail(seen[machine]?.node, "IP clash: \(machine) and \(other) both have \(ip.address): give one of them another with lifeboat configure \(machine) --ip")
            }
            owners[ip.address.value] = machine
        }
        return Plan(name: name, onFailure: onFailure, groups: groups, drillEverySeconds: drillEvery, keepReports: keep,
                    timeoutSeconds: timeout, directory: directory, source: text, applied: Date())
    }
}

/// Where plans live: one JSON file per plan in the repository's plans folder.
extension Recovery {
    var plansDirectory: String { repository.root + "/plans" }

    func planPath(_ name: String) -> String { plansDirectory + "/\(name).json" }

    /// Stores a checked plan (replacing one of the same name).
    public func applyPlan(_ plan: Plan) throws {
        try FileSystem.makeDirectories(plansDirectory)
        try repository.writeManifest(Array(try JSONEncoder.lifeboat.encode(plan)), "plans/\(plan.name).json")
    }

    public func plan(_ name: String) throws -> Plan {
        try Machine.validate(name: name)
        guard let stored = FileSystem.contents(planPath(name)) else {
            throw LifeboatError(.notFound, "no plan named \(name) in \(repository.root): see lifeboat plans, or store it with lifeboat plan apply FILE")
        }
        let data = try repository.openManifest(stored, name: "plans/\(name).json")
        do { return try JSONDecoder.lifeboat.decode(Plan.self, from: Data(data)) } catch {
            throw LifeboatError(.damaged, "plan \(planPath(name)) cannot be read (\(error)): apply the plan file again")
        }
    }

    public func plans() -> [Plan] {
        ((try? FileSystem.list(plansDirectory)) ?? []).filter { $0.hasSuffix(".json") }.sorted()
            .compactMap { try? plan(String($0.dropLast(5))) }
    }

    /// Forgets a plan; refuses while one of its runs is under way (its reports stay).
    public func removePlan(_ name: String) throws {
        _ = try plan(name)
        if let run = activeRun(name) {
            throw LifeboatError(.invalidState, "plan \(name) has a \(run.kind.rawValue) \(run.id) \(run.result.rawValue): end it first (\(run.nextStep))")
        }
        FileSystem.remove(planPath(name))
    }
}
