//! Names for what the kernel reports as numbers: block devices (dev_t) and processes (tgid),
//! read from /sys and /proc. Behind a trait so aggregation stays pure and testable.
use std::fs;

pub use crate::model::process::{ProcessIdentity, ProcessKind, SystemNames};

/// Reads the live system.
pub struct LiveSystem;

/// Task flag of kernel threads (include/linux/sched.h), field 9 of /proc/PID/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

impl SystemNames for LiveSystem {
    fn block_device_name(&self, major: u32, minor: u32) -> Option<String> {
        let uevent = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).ok()?;
        uevent
            .lines()
            .find_map(|line| line.strip_prefix("DEVNAME="))
            .map(str::to_string)
    }

    fn process(&self, tgid: u32, comm_at_event: &str) -> ProcessIdentity {
        if tgid == 0 {
            return ProcessIdentity {
                name: "kernel (no submitting process)".to_string(),
                kind: ProcessKind::Unattributed,
                cgroup: None,
                executable: None,
            };
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{tgid}/stat")) else {
            return ProcessIdentity {
                name: comm_at_event.to_string(),
                kind: kind_from_comm(comm_at_event),
                cgroup: None,
                executable: None,
            };
        };
        let (name, flags) = parse_stat(&stat).unwrap_or((comm_at_event.to_string(), 0));
        let kind = if flags & PF_KTHREAD != 0 {
            ProcessKind::KernelThread
        } else {
            ProcessKind::Process
        };
        let cgroup = fs::read_to_string(format!("/proc/{tgid}/cgroup"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("0::"))
                    .map(str::to_string)
            });
        let executable = fs::read_link(format!("/proc/{tgid}/exe"))
            .ok()
            .map(|path| path.display().to_string());
        ProcessIdentity {
            name,
            kind,
            cgroup,
            executable,
        }
    }
}

/// The node's name (`/proc/sys/kernel/hostname`), as reports and exports name the host.
pub fn host_name() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
}

/// Every user process (thread group) alive now; kernel threads are left out.
pub fn user_processes() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_some_and(|(_, flags)| flags & PF_KTHREAD == 0)
        })
        .collect()
}

/// The local ports of TCP sockets listening in any network namespace of `pids` (and the
/// agent's own): one read of `net/tcp` and `net/tcp6` per namespace, through the first
/// process found in it. The probes tell accepted connections (servers) from connected ones
/// by them when they did not see the connection open.
pub fn listening_tcp_ports(pids: &[u32]) -> std::collections::BTreeSet<u16> {
    let mut namespaces = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    let me = std::iter::once("self".to_string());
    for process in me.chain(pids.iter().map(u32::to_string)) {
        let Ok(namespace) = fs::read_link(format!("/proc/{process}/ns/net")) else {
            continue;
        };
        if !namespaces.insert(namespace) {
            continue;
        }
        for table in ["tcp", "tcp6"] {
            if let Ok(text) = fs::read_to_string(format!("/proc/{process}/net/{table}")) {
                ports.extend(parse_listening_ports(&text));
            }
        }
    }
    ports
}

/// Local ports of the sockets in LISTEN state (`st` 0A) of a `/proc/net/tcp` table.
pub fn parse_listening_ports(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if state != "0A" {
            return None;
        }
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

/// (comm, flags) from /proc/PID/stat. The comm is in parentheses and may itself contain
/// spaces and parentheses, so split at the last ')'.
pub fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // After ')': state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9)
    let flags = stat
        .get(close + 1..)?
        .split_whitespace()
        .nth(6)?
        .parse()
        .ok()?;
    Some((comm, flags))
}

/// For a process that has exited: kernel threads have recognisable names.
fn kind_from_comm(comm: &str) -> ProcessKind {
    const KERNEL_THREAD_PREFIXES: [&str; 6] = [
        "kworker/",
        "jbd2/",
        "kswapd",
        "ksoftirqd/",
        "flush-",
        "writeback",
    ];
    if KERNEL_THREAD_PREFIXES
        .iter()
        .any(|prefix| comm.starts_with(prefix))
    {
        ProcessKind::KernelThread
    } else {
        ProcessKind::Process
    }
}

#[cfg(test)]
mod listening_tests {
    #[test]
    fn listening_ports_are_read_from_the_tcp_tables() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 00000000000000000000000000000000:18BD 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        let ports: Vec<u16> = super::parse_listening_ports(table).collect();
        assert_eq!(ports, vec![8080, 6333]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm_parses() {
        let stat = "4121 (my (odd) app) S 1 4121 4121 0 -1 4194560 1234 0 0 0 5 3 0 0 20 0 1 0";
        assert_eq!(
            parse_stat(stat),
            Some(("my (odd) app".to_string(), 4194560))
        );
    }

    #[test]
    fn kernel_thread_flag_is_read() {
        let stat = "57 (kworker/u4:2-events_unbound) I 2 0 0 0 -1 69238880 0 0 0 0 0 0";
        let (name, flags) = parse_stat(stat).unwrap();
        assert_eq!(name, "kworker/u4:2-events_unbound");
        assert_ne!(flags & PF_KTHREAD, 0);
    }

    #[test]
    fn live_system_knows_itself_and_the_kernel() {
        let me = LiveSystem.process(std::process::id(), "ignored");
        assert_eq!(me.kind, ProcessKind::Process);
        assert!(!me.name.is_empty());
        assert_eq!(LiveSystem.process(0, "").kind, ProcessKind::Unattributed);
        if let Ok(stat) = std::fs::read_to_string("/proc/2/stat") {
            // pid 2 is kthreadd wherever /proc shows the host's pid namespace.
            if stat.contains("(kthreadd)") {
                assert_eq!(LiveSystem.process(2, "").kind, ProcessKind::KernelThread);
            }
        }
    }

    #[test]
    fn exited_processes_are_named_from_the_event() {
        let gone = LiveSystem.process(u32::MAX - 1, "jbd2/vda-8");
        assert_eq!(gone.kind, ProcessKind::KernelThread);
        assert_eq!(gone.name, "jbd2/vda-8");
        let gone = LiveSystem.process(u32::MAX - 1, "python3");
        assert_eq!(gone.kind, ProcessKind::Process);
    }

    #[test]
    fn user_processes_include_this_one_and_no_kernel_thread() {
        let processes = user_processes();
        assert!(processes.contains(&std::process::id()));
        assert!(
            processes
                .iter()
                .all(|&pid| LiveSystem.process(pid, "").kind != ProcessKind::KernelThread)
        );
    }
}
