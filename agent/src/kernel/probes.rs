//! Loads the embedded eBPF object, attaches each probe on its own (a probe that cannot attach
//! is reported and the rest keep working), and reads the maps into a [`KernelSnapshot`].
use std::{collections::HashMap, fs, hash::Hash, path::Path};

use agent_common::{
    BTF_OFFSETS_GLOBAL, IOMAP_DIO_BIO_END_IO_GLOBAL, TRACEPOINT_OFFSETS_GLOBAL,
    cuda::{CudaCallCounters, CudaCallKey},
    histogram::LatencyHistogram,
    map_names,
    network::{PeerCounters, PeerKey},
    requests::{LISTENING_PORTS_FILLED, RequestCounters, RequestKey, request_timing},
    sched::{ProcessTime, ThreadState, TrackedProcess},
    storage::{
        LatencyStage, ProcessIoKey, ProcessIoStats, StorageCounters, StorageDeviceKey,
        StorageDeviceStats, StorageLatencyKey,
    },
};
use anyhow::Context as _;
use aya::{
    Btf, Ebpf, EbpfLoader, Pod,
    maps::{HashMap as BpfHashMap, MapData, PerCpuHashMap},
    programs::{BtfTracePoint, TracePoint, tp_btf::BtfTracePointLink, trace_point::TracePointLink},
};
use serde::Serialize;

use super::{
    btf::{self, BtfProbes},
    cuda::{CudaAttacher, CudaLibraryStatus},
    probe_log::{self, ProbeLog},
    symbols,
    tracefs::{self, TracepointProblem},
    verifier::refused,
};
use crate::model::{
    Histogram, KernelSnapshot,
    gpu::CudaProbes,
    snapshot::{Counters, merge_per_cpu},
};

/// The probes, built by agent/build.rs (or `cargo xtask build-ebpf`).
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/envelope-probes"));

/// How a probe is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// A BTF raw tracepoint (`tp_btf`): the kernel's own arguments, no trace record filled
    /// first, and a recursion guard of its own, so another probe running on the same CPU
    /// does not make it skip events.
    Btf,
    /// A classic tracepoint: where the kernel has no BTF, or the BTF lacks what the probe
    /// reads, or `ENVELOPE_PROBES=tracepoint`.
    Tracepoint,
}

/// Whether one probe is running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeStatus {
    /// "category:name" of the tracepoint.
    pub tracepoint: String,
    /// What it measures, for messages when it is missing.
    pub feeds: &'static str,
    pub attached: bool,
    /// How it is attached (meaningful when attached).
    pub kind: ProbeKind,
    /// Events the kernel skipped for this probe since it was attached: it was already running
    /// on that CPU (the program's `recursion_misses`). Each one is an I/O, a packet or a
    /// context switch nothing was recorded for.
    pub missed_events: u64,
    /// Times the program ran since it was attached, while the kernel's BPF statistics are on
    /// (`sysctl kernel.bpf_stats_enabled=1`, which costs two clock reads per run); None when
    /// they are off.
    pub runs: Option<u64>,
    /// Why it is not attached (None when attached).
    pub problem: Option<String>,
    /// Why it runs as a classic tracepoint rather than a BTF one (None when BTF).
    pub btf_problem: Option<String>,
    /// The program in the eBPF object, to read its statistics.
    #[serde(skip)]
    pub(crate) program: Option<String>,
}

/// Which probes may run as BTF raw tracepoints.
#[derive(Clone, Debug, Default)]
pub struct ProbeOptions {
    /// Every probe on its classic tracepoint (`ENVELOPE_PROBES=tracepoint`): to compare the
    /// two, or to work around a kernel whose BTF misleads.
    pub all_classic: bool,
    /// These tracepoints (by name, `tcp_probe`) on their classic tracepoint.
    pub classic: Vec<String>,
    /// Load the block completion program made for kernels without `bpf_loop` (before 5.17)
    /// even where the kernel has it (`ENVELOPE_NO_BPF_LOOP=1`).
    pub without_bpf_loop: bool,
}

impl ProbeOptions {
    /// `ENVELOPE_PROBES=tracepoint` keeps every probe classic;
    /// `ENVELOPE_PROBES=tracepoint:tcp_probe,sched_switch` keeps the ones named.
    pub fn from_environment() -> Self {
        let value = std::env::var("ENVELOPE_PROBES").unwrap_or_default();
        let without_bpf_loop =
            std::env::var_os("ENVELOPE_NO_BPF_LOOP").is_some_and(|value| value == "1");
        match value.split_once(':') {
            Some(("tracepoint", names)) => Self {
                all_classic: false,
                classic: names
                    .split(',')
                    .map(|name| name.trim().to_string())
                    .collect(),
                without_bpf_loop,
            },
            _ => Self {
                all_classic: value == "tracepoint",
                classic: Vec::new(),
                without_bpf_loop,
            },
        }
    }
}

/// An attached program, whichever kind.
enum ProbeLink {
    Tracepoint(TracePointLink),
    Btf(BtfTracePointLink),
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeLoadError {
    #[error(
        "this envelope binary was built without its eBPF probes (AYA_BUILD_SKIP was set). \
         Rebuild it with `cargo xtask build-ebpf` and `cargo build --release`"
    )]
    NotBuiltIn,
    #[error(
        "the kernel refused to load envelope's probes: {0}. Run envelope as root, or give it \
         CAP_BPF and CAP_PERFMON (kernel 5.8+), e.g. `sudo setcap cap_bpf,cap_perfmon+ep $(command -v envelope)`"
    )]
    PermissionDenied(String),
    #[error("loading envelope's eBPF object failed: {0}")]
    Load(String),
    #[error(
        "no probe could attach, so there is nothing to measure:\n{0}\n\
         Check that tracefs is mounted and that the kernel has the block and tcp tracepoints"
    )]
    NothingAttached(String),
}

/// The loaded probes. Dropping this detaches them.
pub struct KernelProbes {
    /// Owned here rather than by their programs so they can be detached all at once (see
    /// `Drop`); declared before `ebpf` so they go first.
    links: Vec<ProbeLink>,
    /// The probes' rare diagnostic events, when the log shows them.
    probe_log: Option<ProbeLog>,
    /// The opt-in CUDA uprobes' attachments (before `ebpf`: dropped first).
    cuda: CudaAttacher,
    ebpf: Ebpf,
    statuses: Vec<ProbeStatus>,
    requests_timed: bool,
    /// What `LISTENING_PORTS` holds.
    listening_ports: std::collections::BTreeSet<u16>,
}

/// Requests are timed by the BTF socket probes (they read both ends of the connection from
/// `struct sock`); the classic ones only name sockets' owners.
fn requests_timed(statuses: &[ProbeStatus]) -> bool {
    ["sock:sock_send_length", "sock:sock_recv_length"]
        .iter()
        .all(|name| {
            statuses.iter().any(|status| {
                status.tracepoint == *name && status.attached && status.kind == ProbeKind::Btf
            })
        })
}

/// Whole block devices on this machine (requests are issued to disks, not partitions).
fn block_device_count() -> u32 {
    fs::read_dir("/sys/block").map_or(0, |entries| entries.count() as u32)
}

/// Possible CPUs: per-CPU maps hold one copy of each value per possible CPU.
fn nr_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1, |count| count as u32)
}

/// Memory allowed for each per-peer histogram map (RTT, connect latency). LRU maps are
/// preallocated: every entry costs 4 KiB on every CPU, so big machines track fewer peers.
const PEER_HISTOGRAM_BUDGET_BYTES: u64 = 32 << 20;

/// Entries for a per-peer histogram map: 512 peers, fewer where that would exceed the
/// budget (64 on a 128-CPU node), never fewer than 16.
pub fn peer_histogram_entries(cpus: u32) -> u32 {
    let per_entry = std::mem::size_of::<LatencyHistogram>() as u64 * u64::from(cpus.max(1));
    (PEER_HISTOGRAM_BUDGET_BYTES / per_entry).clamp(16, 512) as u32
}

fn is_permission_error(text: &str) -> bool {
    text.contains("EPERM") || text.contains("Operation not permitted") || text.contains("EACCES")
}

/// The address of `iomap_dio_bio_end_io`, by which the block probes know a file system's
/// direct I/O and ask it how many bytes it has queued (a read spanning two extents of its
/// file is then one I/O); 0 where the kernel BTF or kallsyms lacks what that needs, and a
/// direct I/O's next bio is then told by where it starts.
fn iomap_dio_bio_end_io(btf_probes: &BtfProbes) -> u64 {
    const WITHOUT: &str = "a direct read spanning two extents of its file is timed and charged from the second \
         extent on";
    if !btf::has_iomap_dio_members(&btf_probes.offsets) {
        tracing::debug!("the kernel BTF has no bio.bi_end_io or iomap_dio.size: {WITHOUT}");
        return 0;
    }
    let symbol = "iomap_dio_bio_end_io";
    symbols::text_symbol_address(Path::new(symbols::KALLSYMS), symbol).unwrap_or_else(|| {
        tracing::debug!(
            "{symbol} is not in {} (or hidden): {WITHOUT}",
            symbols::KALLSYMS
        );
        0
    })
}

impl KernelProbes {
    /// Loads and attaches every probe this kernel supports, as BTF raw tracepoints where it
    /// can (`ENVELOPE_PROBES=tracepoint` keeps them all classic).
    /// `tracefs_root` is None where tracefs cannot be read: BTF probes do not need it.
    pub fn load(tracefs_root: Option<&Path>) -> Result<Self, ProbeLoadError> {
        Self::load_with(tracefs_root, &ProbeOptions::from_environment())
    }

    /// [`load`](Self::load) with the choice of probe kinds made by the caller.
    pub fn load_with(
        tracefs_root: Option<&Path>,
        options: &ProbeOptions,
    ) -> Result<Self, ProbeLoadError> {
        if PROBES_OBJECT.is_empty() {
            return Err(ProbeLoadError::NotBuiltIn);
        }
        let (mut offsets, availability) = tracefs::read_offsets(tracefs_root);
        // ENVELOPE_TRACEPOINT_READS=helper reads every field through bpf_probe_read_kernel, as
        // on kernels whose tracepoint layouts differ from the one the probes were compiled for.
        if std::env::var_os("ENVELOPE_TRACEPOINT_READS").is_some_and(|value| value == "helper") {
            offsets.force_helper_reads = 1;
        }
        // aya's loader parses the kernel's BTF when it is created (for CO-RE, which these
        // programs do not use: offsets come from the format files and the BTF read below).
        // Dropped at once, before the parse the BTF programs need, so the two are never in
        // memory together.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        let (mut btf_probes, kernel_btf) = read_kernel_btf(options.all_classic);
        for name in &options.classic {
            if let Some(spec) = btf::BTF_PROBES.iter().find(|spec| spec.tracepoint == name) {
                btf_probes
                    .unusable
                    .insert(spec.tracepoint, "kept classic by the caller".to_string());
            }
        }
        // One value per device and direction (5); at least room for 16 disks. The map is not
        // preallocated, so unused room costs nothing.
        let storage_keys = (block_device_count().max(16) * 5).min(65_536);
        let peer_histograms = peer_histogram_entries(nr_cpus());
        let iomap_dio_bio_end_io = iomap_dio_bio_end_io(&btf_probes);
        let log_level = probe_log::level();
        if log_level == 0 {
            loader.map_max_entries(probe_log::RING_BUFFER, probe_log::UNUSED_RING_BUFFER_BYTES);
        }
        let mut ebpf = loader
            .override_global(TRACEPOINT_OFFSETS_GLOBAL, &offsets, true)
            .override_global(BTF_OFFSETS_GLOBAL, &btf_probes.offsets, true)
            .override_global(IOMAP_DIO_BIO_END_IO_GLOBAL, &iomap_dio_bio_end_io, true)
            .override_global(probe_log::LEVEL_GLOBAL, &log_level, true)
            .map_max_entries(map_names::STORAGE_DEVICES, storage_keys)
            .map_max_entries(map_names::PEER_RTT, peer_histograms)
            .map_max_entries(map_names::PEER_CONNECT_LATENCY, peer_histograms)
            .map_max_entries(map_names::REQUEST_LATENCY, peer_histograms)
            .map_max_entries(map_names::REQUEST_FIRST_BYTE, peer_histograms)
            .load(PROBES_OBJECT)
            .map_err(|error| {
                let text = format!("{error:#}");
                let detail = format!("{text} ({:?})", std::error::Error::source(&error));
                if is_permission_error(&detail) {
                    ProbeLoadError::PermissionDenied(text)
                } else {
                    ProbeLoadError::Load(text)
                }
            })?;

        let has_bpf_loop = !options.without_bpf_loop && btf::kernel_has_bpf_loop();
        // The block probes are attached first, as a group: if one BTF program is refused,
        // all four stay classic (see btf::BLOCK_PROBES). The completion's bpf_loop program
        // has a fallback of its own first: the one that follows 32 bios inline.
        let mut block_links = HashMap::new();
        if let Ok(kernel_btf) = &kernel_btf
            && btf::BLOCK_PROBES
                .iter()
                .all(|name| btf_probes.usable(name).is_ok())
        {
            for name in btf::BLOCK_PROBES {
                let program = btf::program_name(name, has_bpf_loop);
                let mut attached = attach_btf(&mut ebpf, &program, name, kernel_btf)
                    .map(|link| (link, program.clone()));
                let inline = btf::program_name(name, false);
                if let Err(why) = &attached
                    && inline != program
                {
                    tracing::info!(
                        "{program} was refused ({why}); a block request's I/Os are followed \
                         through its first 32 bios only"
                    );
                    attached =
                        attach_btf(&mut ebpf, &inline, name, kernel_btf).map(|link| (link, inline));
                } else if inline == program && name == "block_rq_complete" {
                    let why = if options.without_bpf_loop {
                        "ENVELOPE_NO_BPF_LOOP=1"
                    } else {
                        "this kernel has no bpf_loop, Linux 5.17"
                    };
                    tracing::info!(
                        "a block request's I/Os are followed through its first 32 bios only \
                         ({why})"
                    );
                }
                match attached {
                    Ok(link) => {
                        block_links.insert(name, link);
                    }
                    Err(problem) => {
                        btf_probes.unusable.insert(name, problem);
                        block_links.clear();
                        break;
                    }
                }
            }
        }
        btf::keep_block_probes_together(&mut btf_probes.unusable);

        // ENVELOPE_SYSCALL_PROBE=sys_enter takes the pre-5.15 path on any kernel (to compare
        // the two, or to work around a kernel whose saved registers are not what we expect).
        let force_sys_enter =
            std::env::var_os("ENVELOPE_SYSCALL_PROBE").is_some_and(|value| value == "sys_enter");
        let mut statuses = Vec::new();
        let mut links = Vec::new();
        for (spec, usable) in availability {
            let tracepoint = spec.qualified_name();
            // The BTF raw tracepoint first: it needs no tracefs and loses no events to other
            // probes. Where it cannot run, the classic tracepoint, and the reason is kept.
            let btf_problem = match (&kernel_btf, btf_probes.usable(spec.name)) {
                _ if spec.name == "sched_switch" && force_sys_enter => {
                    Some("ENVELOPE_SYSCALL_PROBE=sys_enter".to_string())
                }
                (Ok(kernel_btf), Ok(())) => {
                    let attached = match block_links.remove(spec.name) {
                        Some(attached) => Ok(attached),
                        None => {
                            let program = btf::program_name(spec.name, has_bpf_loop);
                            attach_btf(&mut ebpf, &program, spec.name, kernel_btf)
                                .map(|link| (link, program))
                        }
                    };
                    match attached {
                        Ok((link, program)) => {
                            links.push(ProbeLink::Btf(link));
                            statuses.push(ProbeStatus {
                                tracepoint,
                                feeds: spec.feeds,
                                attached: true,
                                kind: ProbeKind::Btf,
                                missed_events: 0,
                                runs: None,
                                problem: None,
                                btf_problem: None,
                                program: Some(program),
                            });
                            continue;
                        }
                        Err(problem) => Some(problem),
                    }
                }
                (Err(problem), _) => Some(problem.clone()),
                (_, Err(problem)) => Some(problem.to_string()),
            };
            let tracepoint_usable = usable.is_ok();
            let result = usable
                .map_err(|problem: TracepointProblem| match (&problem, &btf_problem) {
                    // Without tracefs the BTF problem is the one to fix.
                    (TracepointProblem::NoTracefs, Some(why_not_btf)) => format!(
                        "its BTF raw tracepoint could not be used ({why_not_btf}), and {problem}"
                    ),
                    _ => problem.to_string(),
                })
                .and_then(|()| {
                    if spec.name == "sched_switch" && force_sys_enter {
                        return Err("ENVELOPE_SYSCALL_PROBE=sys_enter".to_string());
                    }
                    attach(&mut ebpf, spec.name, spec.category, spec.name)
                });
            let mut program = spec.name.to_string();
            // sched_switch reads the system call a thread sleeps in from its saved registers
            // (bpf_task_pt_regs, Linux 5.15+). Where the verifier refuses that, the fallback
            // notes every system call in raw_syscalls:sys_enter, which costs far more.
            let result = match result {
                Err(refused) if spec.name == "sched_switch" && tracepoint_usable => {
                    tracing::info!(
                        "sched_switch cannot read system calls from registers here ({refused}); \
                         falling back to raw_syscalls:sys_enter"
                    );
                    program = "sched_switch_by_map".to_string();
                    let fallback =
                        attach(&mut ebpf, "sched_switch_by_map", "sched", "sched_switch");
                    if fallback.is_ok() {
                        let syscalls = attach(&mut ebpf, "sys_enter", "raw_syscalls", "sys_enter");
                        let (attached, problem) = match syscalls {
                            Ok(link) => {
                                links.push(ProbeLink::Tracepoint(link));
                                (true, None)
                            }
                            Err(problem) => (false, Some(problem)),
                        };
                        statuses.push(ProbeStatus {
                            tracepoint: "raw_syscalls:sys_enter".to_string(),
                            feeds: "which system call a thread sleeps in (network or GPU waits)",
                            attached,
                            kind: ProbeKind::Tracepoint,
                            missed_events: 0,
                            runs: None,
                            problem,
                            btf_problem: Some("only the classic sched_switch needs it".into()),
                            program: Some("sys_enter".to_string()),
                        });
                    }
                    fallback
                }
                other => other,
            };
            let (attached, problem) = match result {
                Ok(link) => {
                    links.push(ProbeLink::Tracepoint(link));
                    (true, None)
                }
                Err(problem) => (false, Some(problem)),
            };
            statuses.push(ProbeStatus {
                tracepoint,
                feeds: spec.feeds,
                attached,
                kind: ProbeKind::Tracepoint,
                missed_events: 0,
                runs: None,
                problem,
                btf_problem,
                program: attached.then_some(program),
            });
        }
        if statuses.iter().all(|status| !status.attached) {
            let reasons: Vec<String> = statuses
                .iter()
                .map(|s| {
                    format!(
                        "  {}: {}",
                        s.tracepoint,
                        s.problem.as_deref().unwrap_or("?")
                    )
                })
                .collect();
            let joined = reasons.join("\n");
            if is_permission_error(&joined) {
                return Err(ProbeLoadError::PermissionDenied(joined));
            }
            return Err(ProbeLoadError::NothingAttached(joined));
        }
        tracing::debug!("{} probes attached", links.len());
        let requests_timed = requests_timed(&statuses);
        if requests_timed {
            let mut switch: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
                ebpf.map_mut(map_names::REQUEST_TIMING)
                    .ok_or_else(|| ProbeLoadError::Load("no REQUEST_TIMING map".into()))?,
            )
            .map_err(|error| ProbeLoadError::Load(error.to_string()))?;
            // The probes find the user buffer by x86-64 system call numbers and registers.
            let first_bytes = if cfg!(target_arch = "x86_64") {
                request_timing::FIRST_BYTES_READABLE
            } else {
                0
            };
            switch
                .set(0, request_timing::TIMED | first_bytes, 0)
                .map_err(|error| ProbeLoadError::Load(error.to_string()))?;
        }
        drop(kernel_btf);
        release_freed_memory();
        let probe_log = ProbeLog::open(&mut ebpf, log_level);
        Ok(Self {
            links,
            probe_log,
            cuda: CudaAttacher::default(),
            ebpf,
            statuses,
            requests_timed,
            listening_ports: Default::default(),
        })
    }

    /// Hands the probes' diagnostic events written since the last call to the agent's log.
    pub fn forward_probe_log(&mut self) {
        if let Some(log) = &mut self.probe_log {
            log.forward();
        }
    }

    /// Attaches the CUDA uprobes to the libraries the live processes `alive` map, or
    /// detaches them (see [`CudaAttacher::refresh`]). Call it every second.
    pub fn refresh_cuda(&mut self, alive: &std::collections::HashSet<u32>, mode: CudaProbes) {
        self.cuda.refresh(&mut self.ebpf, alive, mode);
    }

    /// The CUDA libraries found so far, attached or not.
    pub fn cuda_libraries(&self) -> Vec<CudaLibraryStatus> {
        self.cuda.libraries()
    }

    /// Why the CUDA probes cannot run here, when they cannot.
    pub fn cuda_refused(&self) -> Option<String> {
        self.cuda.refused().map(str::to_string)
    }

    /// Removes the CUDA counts of processes that are gone, once a window has read them:
    /// their series end instead of being exported until the map evicts them.
    pub fn forget_exited_cuda_processes(&mut self) {
        let gone = |tgid: u32| !Path::new(&format!("/proc/{tgid}")).exists();
        if let Some(map) = self.ebpf.map_mut(map_names::CUDA_CALLS)
            && let Ok(mut map) = BpfHashMap::<_, CudaCallKey, CudaCallCounters>::try_from(map)
        {
            let keys: Vec<CudaCallKey> = map.keys().flatten().filter(|k| gone(k.tgid)).collect();
            for key in keys {
                let _ = map.remove(&key);
            }
        }
        if let Some(map) = self.ebpf.map_mut(map_names::CUDA_BLOCKING_LATENCY)
            && let Ok(mut map) = BpfHashMap::<_, u32, LatencyHistogram>::try_from(map)
        {
            let keys: Vec<u32> = map.keys().flatten().filter(|tgid| gone(*tgid)).collect();
            for key in keys {
                let _ = map.remove(&key);
            }
        }
    }

    /// Whether requests are timed: both socket probes run as BTF programs.
    pub fn requests_timed(&self) -> bool {
        self.requests_timed
    }

    /// Every probe, with the events it missed so far (read from the kernel now).
    pub fn statuses(&self) -> Vec<ProbeStatus> {
        let mut statuses = self.statuses.clone();
        for status in &mut statuses {
            if let Some(info) = status.program.as_deref().and_then(|p| self.program_info(p)) {
                status.missed_events = info.recursion_misses;
                status.runs = (info.run_time_ns > 0 || info.run_cnt > 0).then_some(info.run_cnt);
            }
        }
        statuses
    }

    /// The kernel's statistics of one program, for `recursion_misses` (times the kernel
    /// skipped it because it was already running on that CPU) and the run count. aya 0.14's
    /// `ProgramInfo` does not expose the first, so this asks the kernel directly
    /// (`BPF_OBJ_GET_INFO_BY_FD`).
    fn program_info(&self, program: &str) -> Option<aya_obj::generated::bpf_prog_info> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let program = self.ebpf.program(program)?;
        let fd = program.fd().ok()?;
        // SAFETY: a plain-old-data struct of integers; zero is "no buffers" for the kernel.
        let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
        #[repr(C)]
        struct InfoByFd {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = InfoByFd {
            bpf_fd: fd.as_fd().as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: &raw mut info as u64,
        };
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        // SAFETY: `attr` is the command's layout and points at `info`, both live for the call;
        // the kernel writes at most `info_len` bytes.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &raw mut attr,
                std::mem::size_of::<InfoByFd>() as libc::c_uint,
            )
        };
        (result == 0).then_some(info)
    }

    /// Reads every map once. Cost: one map walk per map, no per-event work.
    pub fn snapshot(&self) -> anyhow::Result<KernelSnapshot> {
        let (storage_latency, storage_counters) = self.read_storage_devices()?;
        Ok(KernelSnapshot {
            storage_latency,
            storage_counters,
            process_io: self
                .read_counters::<ProcessIoKey, ProcessIoStats>(map_names::PROCESS_IO)?,
            peer_rtt: self.read_histograms::<PeerKey>(map_names::PEER_RTT)?,
            peer_connect_latency: self
                .read_histograms::<PeerKey>(map_names::PEER_CONNECT_LATENCY)?,
            peer_counters: self.read_counters::<PeerKey, PeerCounters>(map_names::PEER_COUNTERS)?,
            request_latency: self.read_histograms::<RequestKey>(map_names::REQUEST_LATENCY)?,
            request_first_byte: self
                .read_histograms::<RequestKey>(map_names::REQUEST_FIRST_BYTE)?,
            request_counters: self
                .read_counters::<RequestKey, RequestCounters>(map_names::REQUEST_COUNTERS)?,
            process_time: self.read_process_time()?,
            cuda_calls: self.read_plain::<CudaCallKey, CudaCallCounters>(map_names::CUDA_CALLS)?,
            cuda_blocking_latency: self
                .read_plain::<u32, LatencyHistogram>(map_names::CUDA_BLOCKING_LATENCY)?
                .into_iter()
                .map(|(tgid, histogram)| {
                    (tgid, Histogram::from_per_cpu(std::iter::once(&histogram)))
                })
                .collect(),
            missed_events: self
                .statuses()
                .into_iter()
                .filter(|status| status.attached)
                .map(|status| (status.tracepoint, status.missed_events))
                .collect(),
        })
    }

    /// Starts (or updates) accounting `tgid`'s time, with `agent_common::sched::tracked` flags.
    pub fn track_process(&mut self, tgid: u32, flags: u32) -> anyhow::Result<()> {
        let mut map: BpfHashMap<_, u32, TrackedProcess> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(map_names::TRACKED_PROCESSES)
                .context("no TRACKED_PROCESSES map")?,
        )?;
        // The probes stamp the activity times in place: keep them when only the flags change.
        let record = match map.get(&tgid, 0) {
            Ok(known) if known.flags == flags => return Ok(()),
            Ok(known) => TrackedProcess { flags, ..known },
            Err(_) => TrackedProcess::new(flags),
        };
        map.insert(tgid, record, 0)
            .with_context(|| format!("tracking process {tgid}"))?;
        Ok(())
    }

    /// Replaces the set of local ports TCP sockets listen on (see
    /// `agent_common::requests::role_from_ports`).
    pub fn set_listening_ports(
        &mut self,
        ports: &std::collections::BTreeSet<u16>,
    ) -> anyhow::Result<()> {
        if *ports == self.listening_ports {
            return Ok(());
        }
        let mut map: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(map_names::LISTENING_PORTS)
                .context("no LISTENING_PORTS map")?,
        )?;
        for gone in self.listening_ports.difference(ports) {
            let _ = map.remove(gone);
        }
        for port in ports.difference(&self.listening_ports) {
            // A full map (8191 listening ports) keeps the ones it has.
            let _ = map.insert(port, 1, 0);
        }
        map.insert(LISTENING_PORTS_FILLED, 1, 0)
            .context("marking the listening ports filled")?;
        self.listening_ports = ports.clone();
        Ok(())
    }

    /// The processes the probes track now: those userspace named and the children of
    /// tracked processes, added by the fork probe.
    pub fn tracked_in_kernel(&self) -> anyhow::Result<std::collections::BTreeSet<u32>> {
        let map: BpfHashMap<_, u32, TrackedProcess> = BpfHashMap::try_from(
            self.ebpf
                .map(map_names::TRACKED_PROCESSES)
                .context("no TRACKED_PROCESSES map")?,
        )?;
        Ok(map.keys().flatten().collect())
    }

    /// Stops accounting processes that are gone.
    pub fn untrack_processes(&mut self, gone: &[u32]) -> anyhow::Result<()> {
        let mut map: BpfHashMap<_, u32, TrackedProcess> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(map_names::TRACKED_PROCESSES)
                .context("no TRACKED_PROCESSES map")?,
        )?;
        for tgid in gone {
            let _ = map.remove(tgid);
        }
        Ok(())
    }

    /// Closed intervals per process plus each thread's interval still open now, so a thread
    /// blocked for the whole window still counts.
    fn read_process_time(&self) -> anyhow::Result<HashMap<u32, ProcessTime>> {
        let mut times = self.read_counters::<u32, ProcessTime>(map_names::TIME_BY_PROCESS)?;
        let now = monotonic_now_ns();
        let states: BpfHashMap<_, u32, ThreadState> = BpfHashMap::try_from(
            self.ebpf
                .map(map_names::THREAD_STATES)
                .context("no THREAD_STATES map")?,
        )?;
        for (_, state) in states.iter().flatten() {
            let index = state.activity as usize;
            if index < agent_common::sched::activity::COUNT && now > state.since_ns {
                times.entry(state.tgid).or_default().ns[index] += now - state.since_ns;
            }
        }
        Ok(times)
    }

    /// A map that is not per CPU (its values are added to atomically), read whole.
    fn read_plain<K: Pod + Eq + Hash, V: Pod>(&self, name: &str) -> anyhow::Result<HashMap<K, V>> {
        let map = self.ebpf.map(name).with_context(|| {
            format!("the eBPF object has no map {name}; rebuild it with `cargo xtask build-ebpf`")
        })?;
        let map: BpfHashMap<_, K, V> = BpfHashMap::try_from(map)
            .with_context(|| format!("map {name} has an unexpected type"))?;
        // An entry evicted between listing keys and reading it is skipped, not fatal.
        Ok(map.iter().flatten().collect())
    }

    fn per_cpu_map<K: Pod, V: Pod>(
        &self,
        name: &str,
    ) -> anyhow::Result<PerCpuHashMap<&MapData, K, V>> {
        let map = self.ebpf.map(name).with_context(|| {
            format!("the eBPF object has no map {name}; rebuild it with `cargo xtask build-ebpf`")
        })?;
        PerCpuHashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }

    /// Splits `STORAGE_DEVICES` (one value per device and direction in the kernel, so a
    /// completion is one lookup) into a histogram per stage and the counters.
    #[allow(clippy::type_complexity)]
    fn read_storage_devices(
        &self,
    ) -> anyhow::Result<(
        HashMap<StorageLatencyKey, Histogram>,
        HashMap<StorageDeviceKey, StorageCounters>,
    )> {
        let map =
            self.per_cpu_map::<StorageDeviceKey, StorageDeviceStats>(map_names::STORAGE_DEVICES)?;
        let mut latency = HashMap::new();
        let mut counters = HashMap::new();
        for (key, per_cpu) in map.iter().flatten() {
            let stages = [
                (
                    LatencyStage::QueuedToComplete,
                    Histogram::from_per_cpu(per_cpu.iter().map(|cpu| &cpu.queued_to_complete)),
                ),
                (
                    LatencyStage::IssuedToComplete,
                    Histogram::from_per_cpu(per_cpu.iter().map(|cpu| &cpu.issued_to_complete)),
                ),
            ];
            for (stage, histogram) in stages {
                if histogram.count() > 0 {
                    latency.insert(
                        StorageLatencyKey::new(key.dev, key.operation, stage),
                        histogram,
                    );
                }
            }
            let per_cpu_counters: Vec<StorageCounters> =
                per_cpu.iter().map(|cpu| cpu.counters).collect();
            if let Some(total) = merge_per_cpu(&per_cpu_counters) {
                counters.insert(key, total);
            }
        }
        Ok((latency, counters))
    }

    fn read_histograms<K: Pod + Eq + Hash>(
        &self,
        name: &str,
    ) -> anyhow::Result<HashMap<K, Histogram>> {
        let map = self.per_cpu_map::<K, LatencyHistogram>(name)?;
        let mut out = HashMap::new();
        // An entry evicted between listing keys and reading it is skipped, not fatal.
        for (key, per_cpu) in map.iter().flatten() {
            out.insert(key, Histogram::from_per_cpu(per_cpu.iter()));
        }
        Ok(out)
    }

    fn read_counters<K: Pod + Eq + Hash, V: Pod + Counters>(
        &self,
        name: &str,
    ) -> anyhow::Result<HashMap<K, V>> {
        let map = self.per_cpu_map::<K, V>(name)?;
        let mut out = HashMap::new();
        for (key, per_cpu) in map.iter().flatten() {
            if let Some(total) = merge_per_cpu(&per_cpu) {
                out.insert(key, total);
            }
        }
        Ok(out)
    }
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Detaching a tracepoint program waits for an RCU grace period (the kernel's
/// `tracepoint_synchronize_unregister`), about 75 ms on an idle VM: one after another, the 14
/// probes took a second at every exit. Dropped on threads of their own, the waits overlap.
impl Drop for KernelProbes {
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        let links = std::mem::take(&mut self.links);
        let count = links.len();
        std::thread::scope(|scope| {
            for link in links {
                if std::thread::Builder::new()
                    .name("envelope-detach".into())
                    .spawn_scoped(scope, move || match link {
                        ProbeLink::Tracepoint(link) => drop(link),
                        ProbeLink::Btf(link) => drop(link),
                    })
                    .is_err()
                {
                    // No thread to spare: the link was dropped with the failed closure.
                }
            }
        });
        tracing::debug!("{count} probes detached in {:?}", started.elapsed());
    }
}

/// Hands memory freed after loading (the kernel BTF's types, the object's copies) back to
/// the system: glibc keeps freed heap for reuse otherwise, and the agent's resident set would
/// stay at its start-up peak for its whole life.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The kernel's BTF, read twice at once: btfparse finds the member offsets (aya 0.14 keeps
/// its own BTF lookups private; in a child process, see [`btf::inspect_kernel`]), aya needs
/// its own parse to load `tp_btf` programs (on a thread here). `ENVELOPE_PROBES=tracepoint`
/// skips both and keeps every classic tracepoint.
fn read_kernel_btf(all_classic: bool) -> (BtfProbes, Result<Btf, String>) {
    if all_classic {
        let reason = "ENVELOPE_PROBES=tracepoint";
        return (BtfProbes::none(reason), Err(reason.to_string()));
    }
    let path = Path::new(btf::VMLINUX_BTF);
    std::thread::scope(|scope| {
        let for_aya = scope.spawn(|| {
            Btf::from_sys_fs().map_err(|error| format!("aya cannot read the kernel BTF: {error}"))
        });
        let probes = btf::inspect_kernel(path);
        let kernel_btf = for_aya
            .join()
            .unwrap_or_else(|_| Err("reading the kernel BTF panicked".to_string()));
        (probes, kernel_btf)
    })
}

fn attach_btf(
    ebpf: &mut Ebpf,
    program_name: &str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<BtfTracePointLink, String> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(program_name)
        .ok_or_else(|| format!("the eBPF object has no program {program_name}"))?
        .try_into()
        .map_err(|error| format!("{error}"))?;
    program
        .load(tracepoint, btf)
        .map_err(|error| refused("the verifier refused the BTF program", program_name, &error))?;
    let link = program
        .attach()
        .map_err(|error| format!("attaching the BTF program failed: {error:#}"))?;
    program
        .take_link(link)
        .map_err(|error| format!("attaching the BTF program failed: {error:#}"))
}

fn attach(
    ebpf: &mut Ebpf,
    program_name: &str,
    category: &str,
    tracepoint: &str,
) -> Result<TracePointLink, String> {
    let program: &mut TracePoint = ebpf
        .program_mut(program_name)
        .ok_or_else(|| format!("the eBPF object has no program {program_name}"))?
        .try_into()
        .map_err(|error| format!("{error}"))?;
    program
        .load()
        .map_err(|error| refused("the verifier refused it", program_name, &error))?;
    let link = program
        .attach(category, tracepoint)
        .map_err(|error| format!("attaching failed: {error:#}"))?;
    program
        .take_link(link)
        .map_err(|error| format!("attaching failed: {error:#}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_maps_shrink_on_big_machines_to_stay_within_budget() {
        assert_eq!(super::peer_histogram_entries(2), 512);
        assert_eq!(super::peer_histogram_entries(128), 63);
        assert_eq!(super::peer_histogram_entries(4096), 16);
        for cpus in [1, 2, 8, 64, 128, 256] {
            let entries = u64::from(super::peer_histogram_entries(cpus));
            assert!(entries * 4112 * u64::from(cpus) <= 32 << 20 || entries == 16);
        }
    }
}
