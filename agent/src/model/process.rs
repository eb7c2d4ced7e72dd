//! Who a process is: what the kernel reports as numbers (tgid, comm) named from /proc by
//! the host layer, behind a trait so the analysis stays pure and testable.
use serde::Serialize;

/// What kind of submitter a process id stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessKind {
    /// A user process (alive or gone by the time of the report).
    Process,
    /// A kernel thread (writeback, journalling, kworkers): charged to the kernel.
    KernelThread,
    /// No process context: queued from an interrupt, or only the issue was seen.
    Unattributed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessIdentity {
    pub name: String,
    pub kind: ProcessKind,
    /// cgroup v2 path, when the process is still alive to ask.
    pub cgroup: Option<String>,
    /// Path of the executable, when the process is alive and not a kernel thread.
    pub executable: Option<String>,
}

pub trait SystemNames {
    /// "vda", "nvme0n1p2"; None when the device is unknown to /sys.
    fn block_device_name(&self, major: u32, minor: u32) -> Option<String>;
    /// Who `tgid` is. `comm_at_event` is the command name the kernel saw, used when the
    /// process has exited since.
    fn process(&self, tgid: u32, comm_at_event: &str) -> ProcessIdentity;
}

pub use agent_common::comm_to_string;

/// The container id in a cgroup path, if any: docker-<id>.scope, cri-containerd-<id>.scope,
/// crio-<id>.scope, or a bare 64-hex segment (Kubernetes pods).
pub fn container_id(cgroup: &str) -> Option<&str> {
    cgroup.rsplit('/').find_map(|segment| {
        let id = segment.trim_end_matches(".scope");
        let id = id.rsplit('-').next().unwrap_or(id);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}
