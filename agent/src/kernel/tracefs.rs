//! tracefs: finding (or mounting) it, and reading tracepoint field offsets from its format
//! files, so the probes work on kernels whose tracepoint layouts differ from ours.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use agent_common::tracepoint::TracepointOffsets;

/// Where tracefs normally lives, then the legacy location under debugfs.
const TRACEFS_CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({0}). This \
         kernel has no BTF (/sys/kernel/btf/vmlinux), so the probes are classic tracepoints, \
         described in tracefs. Mount it yourself: `mount -t tracefs tracefs \
         /sys/kernel/tracing` (needs CAP_SYS_ADMIN), then start envelope again; for the \
         systemd service, add RequiresMountsFor=/sys/kernel/tracing and CAP_DAC_READ_SEARCH \
         with `systemctl edit envelope` (README: \"The service's privileges\")"
    )]
    MountFailed(nix::Error),
    #[error(
        "tracefs is mounted at {path} but this process cannot read it ({cause}). This kernel \
         has no BTF (/sys/kernel/btf/vmlinux), so the probes are classic tracepoints, whose ids \
         and formats are in tracefs, which is root-only: besides CAP_BPF and CAP_PERFMON \
         envelope needs CAP_DAC_READ_SEARCH here. Run it as root, or add the capability \
         (`systemctl edit envelope`: AmbientCapabilities=CAP_DAC_READ_SEARCH and \
         CapabilityBoundingSet=CAP_DAC_READ_SEARCH)"
    )]
    NotReadable {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// How tracefs was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TracefsStatus {
    AlreadyMounted(PathBuf),
    MountedByUs(PathBuf),
}

impl TracefsStatus {
    pub fn root(&self) -> &Path {
        match self {
            TracefsStatus::AlreadyMounted(path) | TracefsStatus::MountedByUs(path) => path,
        }
    }
}

/// Finds tracefs, mounting it at /sys/kernel/tracing when it is missing (a fresh machine
/// often has it unmounted; aya needs it to resolve tracepoint ids).
pub fn find_or_mount() -> Result<TracefsStatus, TracefsError> {
    for root in TRACEFS_CANDIDATES.iter().map(Path::new) {
        match fs::metadata(root.join("events")) {
            Ok(metadata) if metadata.is_dir() => {
                return Ok(TracefsStatus::AlreadyMounted(root.to_path_buf()));
            }
            // Mounted (an empty mount point is world-readable) but root-only: mounting it again
            // would not help, and would fail with a misleading EPERM.
            Err(cause)
                if cause.kind() == std::io::ErrorKind::PermissionDenied
                    && is_tracefs_mount(root) =>
            {
                return Err(TracefsError::NotReadable {
                    path: root.to_path_buf(),
                    cause,
                });
            }
            _ => {}
        }
    }
    let target = Path::new(TRACEFS_CANDIDATES[0]);
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(TracefsError::MountFailed)?;
    Ok(TracefsStatus::MountedByUs(target.to_path_buf()))
}

/// Whether /proc/self/mountinfo (world-readable) lists a tracefs mounted at `path`.
fn is_tracefs_mount(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|mounts| mounted_tracefs(&mounts, path))
}

/// Whether a mountinfo text has a tracefs at `path`. Lines read
/// `36 25 0:12 / /sys/kernel/tracing rw,nosuid - tracefs tracefs rw`.
pub fn mounted_tracefs(mountinfo: &str, path: &Path) -> bool {
    mountinfo.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let mount_point = fields.nth(4);
        let filesystem = fields.skip_while(|field| *field != "-").nth(1);
        mount_point.map(Path::new) == Some(path) && filesystem == Some("tracefs")
    })
}

/// One field of a tracepoint record, from a line of its format file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub name: String,
    pub offset: u16,
    pub size: u16,
}

/// Parses a tracepoint format file into its fields, keyed by name. Lines look like
/// `\tfield:unsigned int dev;\toffset:8;\tsize:4;\tsigned:0;`; array fields (`char rwbs[10]`)
/// are keyed without the brackets.
pub fn parse_format(text: &str) -> HashMap<String, FormatField> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut declaration = None;
        let mut offset = None;
        let mut size = None;
        for part in line.split(';').map(str::trim) {
            if let Some(value) = part.strip_prefix("field:") {
                declaration = Some(value);
            } else if let Some(value) = part.strip_prefix("offset:") {
                offset = value.trim().parse::<u16>().ok();
            } else if let Some(value) = part.strip_prefix("size:") {
                size = value.trim().parse::<u16>().ok();
            }
        }
        let (Some(declaration), Some(offset), Some(size)) = (declaration, offset, size) else {
            continue;
        };
        // The name is the last word of the declaration, minus any array suffix.
        let Some(last_word) = declaration.split_whitespace().last() else {
            continue;
        };
        let name = last_word
            .split('[')
            .next()
            .unwrap_or(last_word)
            .trim_start_matches('*');
        if name.is_empty() {
            continue;
        }
        fields.insert(
            name.to_string(),
            FormatField {
                name: name.to_string(),
                offset,
                size,
            },
        );
    }
    fields
}

/// A field a probe reads: name, minimum size in bytes, and where its offset goes.
pub type FieldSpec = (&'static str, u16, fn(&mut TracepointOffsets, u16));

/// Per tracepoint: usable, or why not.
pub type Availability = Vec<(&'static TracepointSpec, Result<(), TracepointProblem>)>;

/// A tracepoint the probes use, and the fields each needs with their expected size.
pub struct TracepointSpec {
    pub category: &'static str,
    pub name: &'static str,
    /// What the user loses when this tracepoint cannot be used.
    pub feeds: &'static str,
    /// (field name, minimum size in bytes, setter into the offsets struct)
    pub fields: &'static [FieldSpec],
}

impl TracepointSpec {
    pub fn qualified_name(&self) -> String {
        format!("{}:{}", self.category, self.name)
    }
}

macro_rules! field {
    ($name:literal, $size:literal, $member:ident) => {
        (
            $name,
            $size,
            |offsets: &mut TracepointOffsets, value: u16| offsets.$member = value,
        )
    };
}

/// Every tracepoint envelope reads. `sock_recv_length` shares `sock_send_length`'s layout
/// and offsets.
pub const TRACEPOINTS: &[TracepointSpec] = &[
    TracepointSpec {
        category: "block",
        name: "block_bio_queue",
        feeds: "queued-to-complete storage latency and I/O per process",
        fields: &[
            field!("dev", 4, bio_queue_dev),
            field!("sector", 8, bio_queue_sector),
            field!("rwbs", 8, bio_queue_rwbs),
        ],
    },
    TracepointSpec {
        category: "block",
        name: "block_split",
        feeds: "queued-to-complete latency of the second part of split requests",
        fields: &[
            field!("dev", 4, split_dev),
            field!("sector", 8, split_sector),
            field!("new_sector", 8, split_new_sector),
        ],
    },
    TracepointSpec {
        category: "block",
        name: "block_rq_issue",
        feeds: "device-only storage latency",
        fields: &[
            field!("dev", 4, rq_issue_dev),
            field!("sector", 8, rq_issue_sector),
            field!("rwbs", 8, rq_issue_rwbs),
        ],
    },
    TracepointSpec {
        category: "block",
        name: "block_rq_complete",
        feeds: "every storage metric",
        fields: &[
            field!("dev", 4, rq_complete_dev),
            field!("sector", 8, rq_complete_sector),
            field!("nr_sector", 4, rq_complete_nr_sector),
            field!("error", 4, rq_complete_error),
            field!("rwbs", 8, rq_complete_rwbs),
        ],
    },
    TracepointSpec {
        category: "tcp",
        name: "tcp_probe",
        feeds: "TCP round-trip time",
        fields: &[
            field!("daddr", 28, tcp_probe_daddr),
            field!("dport", 2, tcp_probe_dport),
            field!("family", 2, tcp_probe_family),
            field!("srtt", 4, tcp_probe_srtt),
            field!("skaddr", 8, tcp_probe_skaddr),
        ],
    },
    TracepointSpec {
        category: "tcp",
        name: "tcp_retransmit_skb",
        feeds: "TCP retransmit counts",
        fields: &[
            field!("skaddr", 8, retransmit_skaddr),
            field!("dport", 2, retransmit_dport),
            field!("family", 2, retransmit_family),
            field!("daddr", 4, retransmit_daddr),
            field!("daddr_v6", 16, retransmit_daddr_v6),
        ],
    },
    TracepointSpec {
        category: "sock",
        name: "inet_sock_set_state",
        feeds: "TCP connect latency and failures",
        fields: &[
            field!("skaddr", 8, set_state_skaddr),
            field!("oldstate", 4, set_state_oldstate),
            field!("newstate", 4, set_state_newstate),
            field!("dport", 2, set_state_dport),
            field!("family", 2, set_state_family),
            field!("protocol", 2, set_state_protocol),
            field!("daddr", 4, set_state_daddr),
            field!("daddr_v6", 16, set_state_daddr_v6),
        ],
    },
    TracepointSpec {
        category: "sock",
        name: "sock_send_length",
        feeds: "the owning process of server-side sockets",
        fields: &[
            field!("sk", 8, sock_length_sk),
            field!("protocol", 2, sock_length_protocol),
        ],
    },
    TracepointSpec {
        category: "sock",
        name: "sock_recv_length",
        feeds: "the owning process of server-side sockets",
        fields: &[
            field!("sk", 8, sock_length_sk),
            field!("protocol", 2, sock_length_protocol),
        ],
    },
    TracepointSpec {
        category: "sched",
        name: "sched_switch",
        feeds: "the time breakdown per workload (attribution)",
        fields: &[
            field!("prev_pid", 4, switch_prev_pid),
            field!("prev_state", 8, switch_prev_state),
            field!("next_pid", 4, switch_next_pid),
        ],
    },
    TracepointSpec {
        category: "sched",
        name: "sched_wakeup",
        feeds: "the split between sleeping and waiting for a CPU",
        fields: &[field!("pid", 4, wakeup_pid)],
    },
    TracepointSpec {
        category: "sched",
        name: "sched_wakeup_new",
        feeds: "the split between sleeping and waiting for a CPU of new threads",
        fields: &[field!("pid", 4, wakeup_pid)],
    },
    TracepointSpec {
        category: "sched",
        name: "sched_process_exit",
        feeds: "the last interval of exiting threads",
        fields: &[],
    },
    TracepointSpec {
        category: "sched",
        name: "sched_process_fork",
        feeds: "tracking of processes started by tracked ones",
        fields: &[field!("child_pid", 4, fork_child_pid)],
    },
];

/// Why a tracepoint cannot be used on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TracepointProblem {
    Missing,
    /// tracefs is not mounted or not readable by this process (no CAP_DAC_READ_SEARCH).
    NoTracefs,
    FieldMissing(&'static str),
    FieldTooSmall {
        field: &'static str,
        size: u16,
        needed: u16,
    },
}

impl std::fmt::Display for TracepointProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TracepointProblem::Missing => write!(f, "this kernel has no such tracepoint"),
            TracepointProblem::NoTracefs => write!(
                f,
                "its classic tracepoint needs tracefs, which this process cannot read (root, \
                 or CAP_DAC_READ_SEARCH, opens it)"
            ),
            TracepointProblem::FieldMissing(field) => {
                write!(f, "its format has no field `{field}` on this kernel")
            }
            TracepointProblem::FieldTooSmall {
                field,
                size,
                needed,
            } => write!(
                f,
                "its field `{field}` is {size} bytes on this kernel, {needed} expected"
            ),
        }
    }
}

/// Applies one tracepoint's format file to `offsets`.
pub fn apply_format(
    spec: &TracepointSpec,
    format: &HashMap<String, FormatField>,
    offsets: &mut TracepointOffsets,
) -> Result<(), TracepointProblem> {
    // Check every field before writing any, so a bad tracepoint leaves the offsets untouched.
    for (field, needed, _) in spec.fields {
        let found = format
            .get(*field)
            .ok_or(TracepointProblem::FieldMissing(field))?;
        if found.size < *needed {
            return Err(TracepointProblem::FieldTooSmall {
                field,
                size: found.size,
                needed: *needed,
            });
        }
    }
    for (field, _, set) in spec.fields {
        set(offsets, format[*field].offset);
    }
    Ok(())
}

/// Reads every tracepoint's format from tracefs. Returns the offsets for the programs and,
/// per tracepoint, whether it is usable.
pub fn read_offsets(tracefs_root: Option<&Path>) -> (TracepointOffsets, Availability) {
    let mut offsets = TracepointOffsets::LINUX_6_18;
    let readable = tracefs_root.filter(|root| fs::read_dir(root.join("events")).is_ok());
    let availability = TRACEPOINTS
        .iter()
        .map(|spec| {
            let Some(root) = readable else {
                return (spec, Err(TracepointProblem::NoTracefs));
            };
            let path = root
                .join("events")
                .join(spec.category)
                .join(spec.name)
                .join("format");
            let result = match fs::read_to_string(&path) {
                Ok(text) => apply_format(spec, &parse_format(&text), &mut offsets),
                Err(_) => Err(TracepointProblem::Missing),
            };
            (spec, result)
        })
        .collect();
    (offsets, availability)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK_RQ_COMPLETE: &str = "name: block_rq_complete
ID: 1290
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
\tfield:__data_loc char[] cmd;\toffset:44;\tsize:4;\tsigned:0;

print fmt: \"%d,%d %s (%s) %llu + %u [%d]\", ...
";

    #[test]
    fn parses_scalar_array_and_data_loc_fields() {
        let fields = parse_format(BLOCK_RQ_COMPLETE);
        assert_eq!(
            fields["dev"],
            FormatField {
                name: "dev".into(),
                offset: 8,
                size: 4
            }
        );
        assert_eq!(fields["sector"].offset, 16);
        assert_eq!(
            fields["rwbs"],
            FormatField {
                name: "rwbs".into(),
                offset: 34,
                size: 10
            }
        );
        assert_eq!(fields["cmd"].offset, 44);
        assert_eq!(fields["common_pid"].offset, 4);
        assert_eq!(fields.len(), 11);
    }

    #[test]
    fn parses_pointer_fields() {
        let fields =
            parse_format("\tfield:const void * skaddr;\toffset:128;\tsize:8;\tsigned:0;\n");
        assert_eq!(fields["skaddr"].offset, 128);
    }

    #[test]
    fn moved_fields_change_the_offsets() {
        // A kernel where `error` moved and `rwbs` is further down.
        let shifted = BLOCK_RQ_COMPLETE
            .replace("int error;\toffset:28", "int error;\toffset:40")
            .replace("rwbs[10];\toffset:34", "rwbs[10];\toffset:48");
        let spec = TRACEPOINTS
            .iter()
            .find(|s| s.name == "block_rq_complete")
            .unwrap();
        let mut offsets = TracepointOffsets::LINUX_6_18;
        apply_format(spec, &parse_format(&shifted), &mut offsets).unwrap();
        assert_eq!(offsets.rq_complete_error, 40);
        assert_eq!(offsets.rq_complete_rwbs, 48);
        assert_eq!(offsets.rq_complete_dev, 8);
    }

    #[test]
    fn missing_field_disables_the_tracepoint_and_leaves_offsets_alone() {
        let without_error = BLOCK_RQ_COMPLETE.replace("field:int error;", "field:int errno;");
        let spec = TRACEPOINTS
            .iter()
            .find(|s| s.name == "block_rq_complete")
            .unwrap();
        let mut offsets = TracepointOffsets::LINUX_6_18;
        offsets.rq_complete_dev = 99;
        assert_eq!(
            apply_format(spec, &parse_format(&without_error), &mut offsets),
            Err(TracepointProblem::FieldMissing("error"))
        );
        assert_eq!(offsets.rq_complete_dev, 99);
    }

    #[test]
    fn too_small_field_is_refused() {
        let narrow =
            BLOCK_RQ_COMPLETE.replace("sector;\toffset:16;\tsize:8", "sector;\toffset:16;\tsize:4");
        let spec = TRACEPOINTS
            .iter()
            .find(|s| s.name == "block_rq_complete")
            .unwrap();
        let mut offsets = TracepointOffsets::LINUX_6_18;
        assert_eq!(
            apply_format(spec, &parse_format(&narrow), &mut offsets),
            Err(TracepointProblem::FieldTooSmall {
                field: "sector",
                size: 4,
                needed: 8
            })
        );
    }

    #[test]
    fn tracefs_mounts_are_found_in_mountinfo() {
        let mountinfo = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n\
                         36 22 0:12 / /sys/kernel/tracing rw,relatime shared:5 - tracefs tracefs rw\n";
        assert!(mounted_tracefs(mountinfo, Path::new("/sys/kernel/tracing")));
        assert!(!mounted_tracefs(mountinfo, Path::new("/sys")));
        assert!(!mounted_tracefs("", Path::new("/sys/kernel/tracing")));
    }

    #[test]
    fn without_tracefs_every_classic_tracepoint_says_why() {
        for root in [None, Some(Path::new("/nonexistent-tracefs"))] {
            let (offsets, availability) = read_offsets(root);
            assert_eq!(offsets, TracepointOffsets::LINUX_6_18);
            assert_eq!(availability.len(), TRACEPOINTS.len());
            assert!(
                availability
                    .iter()
                    .all(|(_, r)| *r == Err(TracepointProblem::NoTracefs))
            );
        }
        // A readable tracefs without the tracepoint: the kernel lacks it.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("events")).unwrap();
        let (_, availability) = read_offsets(Some(root.path()));
        assert!(
            availability
                .iter()
                .all(|(_, r)| *r == Err(TracepointProblem::Missing))
        );
    }
}
