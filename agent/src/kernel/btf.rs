//! The running kernel's types (BTF, `/sys/kernel/btf/vmlinux`): which probes can run as BTF
//! raw tracepoints, and the struct member offsets they read.
//!
//! A BTF raw tracepoint (`tp_btf`) gets the kernel's own arguments and reads struct members
//! through them. Rust eBPF has no CO-RE, so the offsets are looked up here, by name, and
//! written into the programs' read-only data. A probe is a BTF probe only when its tracepoint's
//! prototype starts with the arguments it reads and every member it reads is where a plain load
//! can reach it (byte-aligned, the expected size); otherwise it stays a classic tracepoint,
//! and [`BtfProbes::unusable`] says why.
use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use agent_common::btf::BtfOffsets;
use btfparse::{Offset, Readable, TypeInformation, TypeVariant};

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// One struct member a BTF probe reads.
struct MemberSpec {
    /// The field of [`BtfOffsets`] it fills, also how probes name it.
    name: &'static str,
    struct_name: &'static str,
    /// Dotted path inside the struct (`bi_iter.bi_sector`); anonymous members are found.
    path: &'static str,
    /// Bytes the probe loads: a different size means a different type, so a different meaning.
    size: usize,
    set: fn(&mut BtfOffsets, u16),
}

macro_rules! member {
    ($field:ident, $struct_name:literal, $path:literal, $size:literal) => {
        MemberSpec {
            name: stringify!($field),
            struct_name: $struct_name,
            path: $path,
            size: $size,
            set: |offsets: &mut BtfOffsets, value: u16| offsets.$field = value,
        }
    };
}

const MEMBERS: &[MemberSpec] = &[
    member!(bio_sector, "bio", "bi_iter.bi_sector", 8),
    member!(bio_size, "bio", "bi_iter.bi_size", 4),
    member!(bio_next, "bio", "bi_next", 8),
    member!(bio_private, "bio", "bi_private", 8),
    member!(bio_end_io, "bio", "bi_end_io", 8),
    member!(iomap_dio_size, "iomap_dio", "size", 8),
    member!(request_queue, "request", "q", 8),
    member!(request_sector, "request", "__sector", 8),
    member!(request_cmd_flags, "request", "cmd_flags", 4),
    member!(request_bio, "request", "bio", 8),
    member!(queue_disk, "request_queue", "disk", 8),
    member!(disk_major, "gendisk", "major", 4),
    member!(disk_first_minor, "gendisk", "first_minor", 4),
    member!(sock_family, "sock", "__sk_common.skc_family", 2),
    member!(sock_dport, "sock", "__sk_common.skc_dport", 2),
    member!(sock_daddr, "sock", "__sk_common.skc_daddr", 4),
    member!(sock_v6_daddr, "sock", "__sk_common.skc_v6_daddr", 16),
    member!(sock_num, "sock", "__sk_common.skc_num", 2),
    member!(sock_protocol, "sock", "sk_protocol", 2),
    member!(tcp_srtt_us, "tcp_sock", "srtt_us", 4),
    member!(tcp_rtt_min, "tcp_sock", "rtt_min", 24),
    member!(task_pid, "task_struct", "pid", 4),
    member!(task_tgid, "task_struct", "tgid", 4),
    member!(task_exit_state, "task_struct", "exit_state", 4),
];

/// Members no probe requires: where the kernel BTF lacks one its offset is 0 (no member of
/// these is at the start of its struct), and the probe reading it does without (the block
/// probes then tell a direct I/O's next bio from a new I/O by where it starts alone).
const OPTIONAL_MEMBERS: &[&str] = &["bio_end_io", "iomap_dio_size"];

/// Whether the kernel BTF gave every optional member the direct I/O check reads.
pub fn has_iomap_dio_members(offsets: &BtfOffsets) -> bool {
    offsets.bio_end_io != 0 && offsets.iomap_dio_size != 0
}

/// A probe that has a BTF raw tracepoint program.
pub struct BtfProbeSpec {
    /// The tracepoint's name (the classic one is `category:name`, the raw one `name`).
    pub tracepoint: &'static str,
    /// The arguments the program reads, first to last, as BTF names them (`const` dropped):
    /// the prototype must start with these.
    args: &'static [&'static str],
    /// [`BtfOffsets`] fields the program reads.
    members: &'static [&'static str],
}

/// The BTF program of a tracepoint in the eBPF object (`#[btf_tracepoint]` functions are
/// named `<tracepoint>_btf`). `block_rq_complete` has a second one for kernels without
/// `bpf_loop` (before 5.17), `<tracepoint>_btf_inline`: it follows a request's first 32 bios
/// only, where the first goes on through up to 1,024 more.
pub fn program_name(tracepoint: &str, has_bpf_loop: bool) -> String {
    if tracepoint == "block_rq_complete" && !has_bpf_loop {
        format!("{tracepoint}_btf_inline")
    } else {
        format!("{tracepoint}_btf")
    }
}

/// Whether the kernel has the `bpf_loop` helper (Linux 5.17), asked by loading a two-instruction
/// program that calls it.
pub fn kernel_has_bpf_loop() -> bool {
    aya::sys::is_helper_supported(
        aya::programs::ProgramType::TracePoint,
        aya::sys::BpfHelper::BPF_FUNC_loop,
    )
    .unwrap_or(false)
}

const REQUEST: &[&str] = &[
    "request_queue",
    "queue_disk",
    "disk_major",
    "disk_first_minor",
    "request_sector",
];
const REMOTE_END: &[&str] = &["sock_family", "sock_daddr", "sock_v6_daddr", "sock_dport"];
/// The socket probes time requests: they read both ends of the connection.
const SOCKET_IO: &[&str] = &[
    "sock_protocol",
    "sock_family",
    "sock_daddr",
    "sock_v6_daddr",
    "sock_dport",
    "sock_num",
    "tcp_rtt_min",
];

pub const BTF_PROBES: &[BtfProbeSpec] = &[
    BtfProbeSpec {
        tracepoint: "block_bio_queue",
        args: &["bio *"],
        members: &["bio_private", "bio_size", "bio_sector"],
    },
    BtfProbeSpec {
        tracepoint: "block_split",
        args: &["bio *", "unsigned int"],
        members: &["bio_private"],
    },
    BtfProbeSpec {
        tracepoint: "block_rq_issue",
        args: &["request *"],
        members: REQUEST,
    },
    BtfProbeSpec {
        tracepoint: "block_rq_complete",
        args: &["request *", "blk_status_t", "unsigned int"],
        members: &[
            "request_queue",
            "queue_disk",
            "disk_major",
            "disk_first_minor",
            "request_sector",
            "request_cmd_flags",
            "request_bio",
            "bio_next",
            "bio_size",
            "bio_private",
        ],
    },
    BtfProbeSpec {
        tracepoint: "tcp_probe",
        args: &["sock *"],
        members: &[
            "sock_family",
            "sock_daddr",
            "sock_v6_daddr",
            "sock_dport",
            "tcp_srtt_us",
        ],
    },
    BtfProbeSpec {
        tracepoint: "tcp_retransmit_skb",
        args: &["sock *"],
        members: REMOTE_END,
    },
    BtfProbeSpec {
        tracepoint: "inet_sock_set_state",
        args: &["sock *", "int", "int"],
        members: &[
            "sock_protocol",
            "sock_family",
            "sock_daddr",
            "sock_v6_daddr",
            "sock_dport",
        ],
    },
    BtfProbeSpec {
        tracepoint: "sock_send_length",
        args: &["sock *", "int", "int"],
        members: SOCKET_IO,
    },
    BtfProbeSpec {
        tracepoint: "sock_recv_length",
        args: &["sock *", "int", "int"],
        members: SOCKET_IO,
    },
    BtfProbeSpec {
        tracepoint: "sched_switch",
        args: &["bool", "task_struct *", "task_struct *", "unsigned int"],
        members: &["task_pid", "task_exit_state"],
    },
    BtfProbeSpec {
        tracepoint: "sched_wakeup",
        args: &["task_struct *"],
        members: &["task_pid"],
    },
    BtfProbeSpec {
        tracepoint: "sched_wakeup_new",
        args: &["task_struct *"],
        members: &["task_pid"],
    },
    BtfProbeSpec {
        tracepoint: "sched_process_exit",
        args: &[],
        members: &[],
    },
    BtfProbeSpec {
        tracepoint: "sched_process_fork",
        args: &["task_struct *", "task_struct *"],
        members: &["task_pid", "task_tgid"],
    },
];

/// The block probes follow each application I/O by its bio pointer from queue to
/// completion, which only the BTF programs can: these are all BTF or all classic.
pub const BLOCK_PROBES: [&str; 4] = [
    "block_bio_queue",
    "block_split",
    "block_rq_issue",
    "block_rq_complete",
];

/// Where one block probe cannot be BTF, none is (see [`BLOCK_PROBES`]): the others are
/// marked unusable with the reason.
pub fn keep_block_probes_together(unusable: &mut HashMap<&'static str, String>) {
    let first_classic = BLOCK_PROBES
        .iter()
        .find_map(|name| Some((*name, unusable.get(name)?.clone())));
    if let Some((classic, why)) = first_classic {
        for name in BLOCK_PROBES {
            unusable.entry(name).or_insert_with(|| {
                format!(
                    "{classic} is a classic tracepoint ({why}) and the block probes go together"
                )
            });
        }
    }
}

/// What the running kernel's BTF allows.
#[derive(Debug)]
pub struct BtfProbes {
    pub offsets: BtfOffsets,
    /// Tracepoint name -> why its BTF program cannot be used. Probes not listed can.
    pub unusable: HashMap<&'static str, String>,
}

impl BtfProbes {
    /// Every BTF probe unusable for the same reason (no BTF, or switched off).
    pub fn none(reason: &str) -> Self {
        Self {
            offsets: BtfOffsets::LINUX_6_18,
            unusable: BTF_PROBES
                .iter()
                .map(|probe| (probe.tracepoint, reason.to_string()))
                .collect(),
        }
    }

    pub fn usable(&self, tracepoint: &str) -> Result<(), &str> {
        match self.unusable.get(tracepoint) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

impl BtfProbes {
    /// The wire form the `btf-offsets` helper prints: the offsets in field order, and the
    /// unusable probes with their reasons.
    pub fn to_json(&self) -> String {
        let offsets: &[u8] = bytes_of(&self.offsets);
        let offsets: Vec<u16> = offsets
            .chunks_exact(2)
            .map(|pair| u16::from_ne_bytes([pair[0], pair[1]]))
            .collect();
        let unusable: BTreeMap<&str, &str> = self
            .unusable
            .iter()
            .map(|(name, why)| (*name, why.as_str()))
            .collect();
        serde_json::json!({"offsets": offsets, "unusable": unusable}).to_string()
    }

    /// Reads [`to_json`](Self::to_json)'s output back; None when it is not that.
    pub fn from_json(text: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Wire {
            offsets: Vec<u16>,
            unusable: BTreeMap<String, String>,
        }
        let wire: Wire = serde_json::from_str(text).ok()?;
        let mut offsets = BtfOffsets::LINUX_6_18;
        let target = bytes_of_mut(&mut offsets);
        if wire.offsets.len() * 2 != target.len() {
            return None;
        }
        for (pair, value) in target.chunks_exact_mut(2).zip(&wire.offsets) {
            pair.copy_from_slice(&value.to_ne_bytes());
        }
        let mut unusable = HashMap::new();
        for (name, why) in wire.unusable {
            let spec = BTF_PROBES.iter().find(|probe| probe.tracepoint == name)?;
            unusable.insert(spec.tracepoint, why);
        }
        Some(Self { offsets, unusable })
    }
}

fn bytes_of(offsets: &BtfOffsets) -> &[u8] {
    // SAFETY: BtfOffsets is repr(C) and made of u16s only: every byte is initialised.
    unsafe {
        std::slice::from_raw_parts(
            (offsets as *const BtfOffsets).cast::<u8>(),
            std::mem::size_of::<BtfOffsets>(),
        )
    }
}

fn bytes_of_mut(offsets: &mut BtfOffsets) -> &mut [u8] {
    // SAFETY: as above, and any bit pattern is a valid u16.
    unsafe {
        std::slice::from_raw_parts_mut(
            (offsets as *mut BtfOffsets).cast::<u8>(),
            std::mem::size_of::<BtfOffsets>(),
        )
    }
}

/// Whether [`inspect_kernel`] may run this executable as `envelope btf-offsets`.
static CHILD_PROCESS: AtomicBool = AtomicBool::new(false);

/// Called by the `envelope` binary: this executable answers `btf-offsets`. Libraries and
/// tests that load the probes (another executable) parse in process.
pub fn parse_in_child_process() {
    CHILD_PROCESS.store(true, Ordering::Relaxed);
}

/// [`inspect`] for the running agent. Parsing the kernel's BTF takes about 60 MB for a
/// moment (every type and name of a 6 MB file); in a child process that memory is gone when
/// it exits instead of staying in the agent's peak and, through the allocator, its resident
/// set. Falls back to parsing here when the child cannot run.
pub fn inspect_kernel(path: &Path) -> BtfProbes {
    if CHILD_PROCESS.load(Ordering::Relaxed) {
        let output = std::env::current_exe().and_then(|exe| {
            std::process::Command::new(exe)
                .arg("btf-offsets")
                .arg("--path")
                .arg(path)
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::inherit())
                .output()
        });
        match output {
            Ok(output) if output.status.success() => {
                if let Some(probes) = BtfProbes::from_json(&String::from_utf8_lossy(&output.stdout))
                {
                    return probes;
                }
                tracing::debug!("the btf-offsets child printed something else; parsing here");
            }
            Ok(output) => tracing::debug!(
                "the btf-offsets child failed ({}); parsing here",
                output.status
            ),
            Err(error) => {
                tracing::debug!("cannot run the btf-offsets child ({error}); parsing here")
            }
        }
    }
    inspect(path)
}

/// The whole BTF file in memory: btfparse reads through this.
struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).ok();
        let source = start
            .and_then(|start| Some(start..start.checked_add(buffer.len())?))
            .and_then(|range| self.0.get(range));
        match source {
            Some(source) => {
                buffer.copy_from_slice(source);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

/// Reads the kernel's BTF and decides, probe by probe. A kernel without BTF (or a file that
/// does not parse) leaves every probe on its classic tracepoint.
pub fn inspect(path: &Path) -> BtfProbes {
    let data = match std::fs::read(path) {
        Ok(data) => data,
        Err(error) => {
            return BtfProbes::none(&format!(
                "no kernel BTF ({}: {error}); the kernel needs CONFIG_DEBUG_INFO_BTF",
                path.display()
            ));
        }
    };
    match TypeInformation::new(&Bytes(data)) {
        Ok(types) => decide(&types),
        Err(error) => BtfProbes::none(&format!(
            "the kernel BTF in {} does not parse: {error:?}",
            path.display()
        )),
    }
}

fn decide(types: &TypeInformation) -> BtfProbes {
    let mut offsets = BtfOffsets::LINUX_6_18;
    let mut members: HashMap<&'static str, Result<(), String>> = HashMap::new();
    for member in MEMBERS {
        let found = member_offset(types, member);
        match &found {
            Ok(offset) => (member.set)(&mut offsets, *offset),
            Err(_) if OPTIONAL_MEMBERS.contains(&member.name) => (member.set)(&mut offsets, 0),
            Err(_) => {}
        }
        members.insert(member.name, found.map(|_| ()));
    }
    let mut unusable = HashMap::new();
    for probe in BTF_PROBES {
        let verdict = check_prototype(types, probe).and_then(|()| {
            probe
                .members
                .iter()
                .try_for_each(|name| match members.get(name) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(problem)) => Err(problem.clone()),
                    None => Err(format!("{name} is not a known member")),
                })
        });
        if let Err(problem) = verdict {
            unusable.insert(probe.tracepoint, problem);
        }
    }
    BtfProbes { offsets, unusable }
}

fn member_offset(types: &TypeInformation, member: &MemberSpec) -> Result<u16, String> {
    let describe = || format!("struct {} member {}", member.struct_name, member.path);
    let id = types
        .id_of(member.struct_name)
        .ok_or_else(|| format!("the kernel BTF has no struct {}", member.struct_name))?;
    let (member_type, offset) = types
        .offset_of(id, member.path)
        .map_err(|error| format!("{} is not in the kernel BTF ({error:?})", describe()))?;
    let Offset::ByteOffset(offset) = offset else {
        return Err(format!("{} is a bit field here", describe()));
    };
    let size = types
        .size_of(member_type)
        .map_err(|error| format!("{} has no size ({error:?})", describe()))?;
    if size != member.size {
        return Err(format!(
            "{} is {size} bytes here, the probe reads {}",
            describe(),
            member.size
        ));
    }
    u16::try_from(offset).map_err(|_| format!("{} is at offset {offset}, past 64 KiB", describe()))
}

/// The name of a type as the specs write it: `bio *`, `unsigned int`, `blk_status_t`.
fn type_name(types: &TypeInformation, id: u32) -> String {
    match types.from_id(id) {
        Some(TypeVariant::Ptr(pointer)) => format!("{} *", type_name(types, *pointer.tid())),
        Some(TypeVariant::Const(inner)) => type_name(types, *inner.tid()),
        Some(TypeVariant::Volatile(inner)) => type_name(types, *inner.tid()),
        _ => types.name_of(id).unwrap_or_else(|| "?".to_string()),
    }
}

/// The tracepoint's prototype (`btf_trace_<name>`: a pointer to a function whose first
/// argument is the probe's private data) must start with the arguments the program reads.
fn check_prototype(types: &TypeInformation, probe: &BtfProbeSpec) -> Result<(), String> {
    let typedef = format!("btf_trace_{}", probe.tracepoint);
    let no_raw = || format!("the kernel has no raw tracepoint {}", probe.tracepoint);
    let Some(TypeVariant::Typedef(pointer)) =
        types.id_of(&typedef).and_then(|id| types.from_id(id))
    else {
        return Err(no_raw());
    };
    let prototype = types.pointee_tid(*pointer.tid()).map_err(|_| no_raw())?;
    let Some(TypeVariant::FuncProto(function)) = types.from_id(prototype) else {
        return Err(no_raw());
    };
    let actual: Vec<String> = function
        .parameter_list()
        .iter()
        .skip(1)
        .map(|parameter| type_name(types, parameter.tid()))
        .collect();
    let matches = probe.args.len() <= actual.len()
        && probe
            .args
            .iter()
            .zip(&actual)
            .all(|(want, have)| want == have);
    if matches {
        Ok(())
    } else {
        Err(format!(
            "{}'s arguments are ({}) here, the probe reads ({})",
            probe.tracepoint,
            actual.join(", "),
            probe.args.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_process_wire_form_reads_back_the_same() {
        let mut probes = BtfProbes::none("no BTF here");
        probes.offsets.sock_protocol = 4242;
        probes.unusable.remove("tcp_probe");
        let back = BtfProbes::from_json(&probes.to_json()).expect("reads back");
        assert_eq!(back.offsets, probes.offsets);
        assert_eq!(back.unusable, probes.unusable);
        assert!(BtfProbes::from_json("{\"offsets\": [1, 2], \"unusable\": {}}").is_none());
        assert!(BtfProbes::from_json("running 0 tests").is_none());
    }

    #[test]
    fn every_member_a_probe_names_exists_and_none_it_requires_is_optional() {
        for probe in BTF_PROBES {
            for name in probe.members {
                assert!(
                    MEMBERS.iter().any(|member| member.name == *name),
                    "{}: {name}",
                    probe.tracepoint
                );
                assert!(
                    !OPTIONAL_MEMBERS.contains(name),
                    "{}: {name}",
                    probe.tracepoint
                );
            }
        }
        for name in OPTIONAL_MEMBERS {
            assert!(MEMBERS.iter().any(|member| member.name == *name), "{name}");
        }
        let mut offsets = BtfOffsets::LINUX_6_18;
        assert!(has_iomap_dio_members(&offsets));
        offsets.iomap_dio_size = 0;
        assert!(!has_iomap_dio_members(&offsets));
    }

    #[test]
    fn one_classic_block_probe_keeps_all_four_classic_and_names_it() {
        let mut unusable = HashMap::new();
        unusable.insert("block_split", "kept classic by the caller".to_string());
        unusable.insert("tcp_probe", "something else".to_string());
        keep_block_probes_together(&mut unusable);
        for name in BLOCK_PROBES {
            let why = unusable.get(name).expect("block probe classic");
            assert!(why.contains("kept classic by the caller"), "{name}: {why}");
        }
        assert_eq!(unusable["block_split"], "kept classic by the caller");
        assert!(unusable["block_rq_complete"].starts_with("block_split is a classic tracepoint"));
        assert_eq!(unusable.len(), 5, "{unusable:?}");
        // None classic: nothing changes.
        let mut none = HashMap::new();
        keep_block_probes_together(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn a_kernel_without_btf_keeps_every_classic_tracepoint_and_says_why() {
        let probes = inspect(Path::new("/nonexistent/vmlinux"));
        assert_eq!(probes.unusable.len(), BTF_PROBES.len());
        let reason = probes.usable("block_rq_complete").unwrap_err();
        assert!(reason.contains("CONFIG_DEBUG_INFO_BTF"), "{reason}");
    }

    #[test]
    fn garbage_in_place_of_btf_is_refused_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, b"\x9f\xeb\x01\x00garbage").unwrap();
        let probes = inspect(&path);
        assert_eq!(probes.unusable.len(), BTF_PROBES.len());
        assert!(
            probes
                .usable("tcp_probe")
                .unwrap_err()
                .contains("does not parse")
        );
    }

    /// The compiled-in defaults are this kernel's layout (Linux 6.18, x86-64), and every probe
    /// is usable here. Skipped where the machine is not the kernel the defaults describe.
    #[test]
    fn defaults_match_the_running_kernel_when_it_is_6_18() {
        let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
            return;
        };
        if !release.starts_with("6.18") || !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: not a 6.18 kernel with BTF ({})", release.trim());
            return;
        }
        let probes = inspect(Path::new(VMLINUX_BTF));
        assert!(probes.unusable.is_empty(), "{:?}", probes.unusable);
        assert_eq!(probes.offsets, BtfOffsets::LINUX_6_18);
    }
}
