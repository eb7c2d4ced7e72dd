//! Attribution: which of model, storage, network or CPU holds a workload back, and why.
//!
//! A pure function over plain data: where each workload's time went (from the scheduler
//! probes) plus the evidence gathered for it (its GPUs, the devices it read and wrote, the
//! peers it talked to). No I/O here; the rules are unit-tested on synthetic windows and
//! written out in README.md ("How it decides a bottleneck").
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use agent_common::{comm_to_string, network::peer_address, storage::split_dev};

use super::{
    cuda::CudaActivity,
    gpu::GpuSummary,
    window::{RequestFigures, RequestsSummary, WindowSummary},
};
pub use crate::model::vocabulary::Bottleneck;
use crate::{
    config::{ProcessFacts, WorkloadRules},
    model::units::format_ms,
    model::{
        Histogram, KernelSnapshot,
        process::{ProcessKind, SystemNames, container_id},
    },
};

/// Where a workload's threads spent the window, in thread-nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TimeBreakdown {
    pub on_cpu_ns: u64,
    pub waiting_for_cpu_ns: u64,
    pub storage_ns: u64,
    pub network_ns: u64,
    pub gpu_ns: u64,
    pub other_sleep_ns: u64,
}

/// The same, as fractions of the workload's accounted time (they sum to 1, or are all 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeShares {
    pub on_cpu: f64,
    pub waiting_for_cpu: f64,
    pub storage: f64,
    pub network: f64,
    pub gpu: f64,
    pub other_sleep: f64,
}

impl TimeBreakdown {
    pub fn total_ns(&self) -> u64 {
        self.on_cpu_ns
            + self.waiting_for_cpu_ns
            + self.storage_ns
            + self.network_ns
            + self.gpu_ns
            + self.other_sleep_ns
    }

    pub fn add(&mut self, other: &TimeBreakdown) {
        self.on_cpu_ns += other.on_cpu_ns;
        self.waiting_for_cpu_ns += other.waiting_for_cpu_ns;
        self.storage_ns += other.storage_ns;
        self.network_ns += other.network_ns;
        self.gpu_ns += other.gpu_ns;
        self.other_sleep_ns += other.other_sleep_ns;
    }

    /// Time not spent in other sleep: running, waiting for a CPU, or blocked on a resource.
    pub fn active_ns(&self) -> u64 {
        self.total_ns() - self.other_sleep_ns
    }

    /// Shares of the active time (other sleep left out): what a workload that does something
    /// spends its effort on, undiluted by the idle threads of its pools.
    pub fn active_shares(&self) -> TimeShares {
        let active = TimeBreakdown {
            other_sleep_ns: 0,
            ..*self
        };
        active.shares()
    }

    pub fn shares(&self) -> TimeShares {
        let total = self.total_ns();
        if total == 0 {
            return TimeShares::default();
        }
        let share = |ns: u64| ns as f64 / total as f64;
        TimeShares {
            on_cpu: share(self.on_cpu_ns),
            waiting_for_cpu: share(self.waiting_for_cpu_ns),
            storage: share(self.storage_ns),
            network: share(self.network_ns),
            gpu: share(self.gpu_ns),
            other_sleep: share(self.other_sleep_ns),
        }
    }
}

/// A GPU the workload has a context on.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuEvidence {
    pub index: u32,
    pub name: String,
    /// 0..1; None when the GPU does not report it.
    pub utilization: Option<f64>,
    pub throttle_reasons: Vec<String>,
    /// GPU memory the workload's processes held on it (the most seen in the window, summed
    /// over its processes); None when the driver does not say.
    pub memory_bytes: Option<u64>,
}

/// A block device the workload queued I/O to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeviceEvidence {
    pub device: String,
    pub bytes: u64,
    /// Queued-to-complete P95 on the device in the window.
    pub p95_ms: Option<f64>,
    /// Share of the device's mean wait spent queued before the device (0..1).
    pub queue_share: Option<f64>,
}

/// A remote TCP endpoint the workload talked to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeerEvidence {
    pub peer: String,
    pub rtt_p95_ms: Option<f64>,
    pub retransmits: u64,
    /// Connects the workload made to it (SYN_SENT -> ESTABLISHED), P95.
    pub connect_p95_ms: Option<f64>,
}

/// Requests the workload served on one port, or made to one upstream.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestEvidence {
    /// "port 8000" for served requests, "addr:port" for an upstream.
    pub endpoint: String,
    pub requests: u64,
    pub rate_per_s: f64,
    pub p95_ms: Option<f64>,
    pub first_byte_p95_ms: Option<f64>,
    /// Upstreams only: the smoothed round-trip time to it (P95), and the path's round trip
    /// (its connections' lowest RTT, no delayed ACKs in it): the network's part of a response.
    pub rtt_p95_ms: Option<f64>,
    pub path_rtt_ms: Option<f64>,
    /// Served requests: the window's latency and first-byte histograms (what a budget that
    /// counts requests reads: how many were within its bound).
    #[serde(skip)]
    pub latency: Histogram,
    #[serde(skip)]
    pub first_byte: Histogram,
}

impl RequestEvidence {
    fn of(
        endpoint: String,
        figures: &RequestFigures,
        rtt_p95_ms: Option<f64>,
        path_rtt_ms: Option<f64>,
    ) -> Self {
        Self {
            endpoint,
            requests: figures.requests,
            rate_per_s: figures.rate_per_s,
            p95_ms: figures.p95_ms,
            first_byte_p95_ms: figures.first_byte_p95_ms,
            rtt_p95_ms,
            path_rtt_ms,
            ..Self::default()
        }
    }
}

/// Everything known about one workload in one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkloadWindow {
    pub name: String,
    pub pids: Vec<u32>,
    /// Length of the window.
    pub window_ns: u64,
    pub time: TimeBreakdown,
    /// Busiest first.
    pub gpus: Vec<GpuEvidence>,
    /// Most bytes first.
    pub devices: Vec<DeviceEvidence>,
    /// Slowest first.
    pub peers: Vec<PeerEvidence>,
    /// Requests it served, most first.
    pub served: Vec<RequestEvidence>,
    /// Requests it made, slowest upstream (response P95) first.
    pub upstreams: Vec<RequestEvidence>,
    /// Its serving engine's own figures, when it has a `metrics_url` (filled by the window
    /// step once the engines are scraped).
    pub engine: Option<super::engines::EngineSummary>,
    /// Its processes' CUDA calls, when the CUDA probes are on and saw them call.
    pub cuda: Option<CudaActivity>,
}

/// A blocking host-to-device copy share of the GPU wait at least this large makes the
/// verdict name the input pipeline rather than the model's compute.
const INPUT_PIPELINE_SHARE_OF_GPU_WAIT: f64 = 0.5;

/// One sentence on a workload's CUDA calls: where its GPU waits went, by function.
fn cuda_evidence(cuda: &CudaActivity) -> String {
    let mut parts = Vec::new();
    if cuda.sync_calls > 0 {
        let top = cuda
            .functions
            .iter()
            .find(|f| f.function.contains("Synchronize"))
            .map_or(String::new(), |f| {
                format!(", {} {:.2} s over {} calls", f.function, f.seconds, f.calls)
            });
        parts.push(format!("{:.2} s in CUDA synchronisation{top}", cuda.sync_s));
    }
    for (bytes, seconds, towards) in [
        (cuda.h2d_bytes, cuda.h2d_s, "to the GPU"),
        (cuda.d2h_bytes, cuda.d2h_s, "from the GPU"),
        (cuda.d2d_bytes, cuda.d2d_s, "between GPU buffers"),
        (cuda.peer_bytes, cuda.peer_s, "between GPUs"),
    ] {
        if bytes > 0 {
            let rate = (seconds > 0.0).then(|| {
                format!(
                    " ({:.2} s blocked, {}/s)",
                    seconds,
                    crate::model::units::format_bytes(bytes as f64 / seconds)
                )
            });
            parts.push(format!(
                "{} copied {towards}{}",
                crate::model::units::format_bytes(bytes as f64),
                rate.unwrap_or_default()
            ));
        }
    }
    if let Some(p95) = cuda.blocking_p95_ms {
        parts.push(format!("blocking calls P95 {p95:.1} ms"));
    }
    if cuda.failures > 0 {
        parts.push(format!("{} calls failed", cuda.failures));
    }
    if let Some(launches) = cuda.launches {
        parts.push(format!("{launches} kernel launches"));
    }
    format!("CUDA: {}", parts.join("; "))
}

/// Thresholds of the rules; the defaults are what README.md documents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rules {
    /// A class must take at least this share of a workload's time to be its bottleneck.
    pub min_share: f64,
    /// A GPU this busy (0..1) is saturated: the model is the limit.
    pub gpu_saturated: f64,
    /// Running plus waiting for a CPU must reach this share for a CPU verdict.
    pub min_cpu_share: f64,
    /// A workload active for less than this share of the window (in thread time) is idle.
    pub min_active: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            min_share: 0.20,
            gpu_saturated: 0.90,
            min_cpu_share: 0.50,
            min_active: 0.25,
        }
    }
}

/// A workload's verdict and the numbers behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub bottleneck: Bottleneck,
    /// 0..1: how clearly the winning class beat the others.
    pub confidence: f64,
    pub workload: Option<String>,
    /// The workload's main process (lowest pid), for the one-line summary.
    pub pid: Option<u32>,
    /// The one line `diagnose` starts with, after "Bottleneck: ".
    pub summary: String,
    /// The numbers that decided it, one sentence each.
    pub evidence: Vec<String>,
    /// The share of time lost to the bottleneck class (for roll-up and sorting).
    pub share: f64,
    /// Why a workload is judged `none`, in a few words for its row in the report (e.g. "too
    /// little activity to judge"); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |ms| format!("{ms:.1} ms"))
}

/// (class, score) candidates, by the rules in README.md.
fn candidates(window: &WorkloadWindow, rules: &Rules) -> Vec<(Bottleneck, f64)> {
    let shares = window.time.active_shares();
    let cpu = shares.on_cpu + shares.waiting_for_cpu;
    let mut candidates = vec![
        (Bottleneck::Storage, shares.storage),
        (Bottleneck::Network, shares.network),
        (Bottleneck::Model, shares.gpu),
        (
            Bottleneck::Cpu,
            if cpu >= rules.min_cpu_share { cpu } else { 0.0 },
        ),
    ];
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    candidates
}

/// The workload a process belongs to when no configuration names it: its container, else
/// its systemd service, else its program name (so the workers of one program group together).
pub fn automatic_workload_name(cgroup: Option<&str>, program: &str) -> String {
    if let Some(cgroup) = cgroup {
        if let Some(id) = container_id(cgroup) {
            return format!("container:{}", &id[..12]);
        }
        if let Some(unit) = cgroup
            .rsplit('/')
            .find(|segment| segment.ends_with(".service"))
        {
            return unit.to_string();
        }
    }
    program.to_string()
}

/// Groups the window's processes into workloads and gathers each one's evidence: its time
/// breakdown, the GPUs it has contexts on, the devices it queued I/O to, the peers it talked
/// to. Processes with no accounted time are left out.
pub fn workload_windows(
    delta: &KernelSnapshot,
    window: &WindowSummary,
    gpu: &GpuSummary,
    names: &dyn SystemNames,
    window_ns: u64,
    rules: &WorkloadRules,
) -> Vec<WorkloadWindow> {
    let mut workloads: BTreeMap<String, WorkloadWindow> = BTreeMap::new();
    let mut workload_of: HashMap<u32, String> = HashMap::new();
    for (&tgid, time) in &delta.process_time {
        let breakdown = TimeBreakdown {
            on_cpu_ns: time.ns[0],
            waiting_for_cpu_ns: time.ns[1],
            storage_ns: time.ns[2],
            network_ns: time.ns[3],
            gpu_ns: time.ns[4],
            other_sleep_ns: time.ns[5],
        };
        if breakdown.total_ns() == 0 {
            continue;
        }
        let identity = names.process(tgid, &comm_to_string(&time.comm));
        if identity.kind != ProcessKind::Process || identity.name.is_empty() {
            continue;
        }
        let facts = ProcessFacts {
            name: &identity.name,
            executable: identity.executable.as_deref(),
            cgroup: identity.cgroup.as_deref(),
        };
        let name = match rules.workload_of(&facts) {
            Some(configured) => configured.to_string(),
            None => automatic_workload_name(identity.cgroup.as_deref(), &identity.name),
        };
        let workload = workloads
            .entry(name.clone())
            .or_insert_with(|| WorkloadWindow {
                name: name.clone(),
                window_ns,
                ..WorkloadWindow::default()
            });
        workload.pids.push(tgid);
        workload.time.add(&breakdown);
        workload_of.insert(tgid, name);
    }

    // Devices: bytes each workload queued, with the device's window figures.
    let mut device_bytes: BTreeMap<(String, u32), u64> = BTreeMap::new();
    for (key, stats) in &delta.process_io {
        if let Some(name) = workload_of.get(&key.tgid) {
            *device_bytes.entry((name.clone(), key.dev)).or_default() += stats.completed_bytes;
        }
    }
    for ((name, dev), bytes) in device_bytes {
        let (major, minor) = split_dev(dev);
        let summary = window
            .storage
            .devices
            .iter()
            .find(|d| (d.major, d.minor) == (major, minor));
        let device = DeviceEvidence {
            device: summary.map_or_else(|| format!("{major}:{minor}"), |d| d.device.clone()),
            bytes,
            p95_ms: summary.and_then(|d| d.p95_ms),
            queue_share: summary.and_then(|d| d.queue_share),
        };
        if let Some(workload) = workloads.get_mut(&name) {
            workload.devices.push(device);
        }
    }

    // Peers: RTT and retransmits of this workload's own sockets.
    let mut peers: BTreeMap<(String, String), (Histogram, u64, Histogram)> = BTreeMap::new();
    for (key, histogram) in &delta.peer_rtt {
        if let (Some(name), Some(ip)) = (
            workload_of.get(&key.tgid),
            peer_address(key.family, &key.address),
        ) {
            let peer = std::net::SocketAddr::new(ip, key.port).to_string();
            peers
                .entry((name.clone(), peer))
                .or_default()
                .0
                .add(histogram);
        }
    }
    for (key, histogram) in &delta.peer_connect_latency {
        if let (Some(name), Some(ip)) = (
            workload_of.get(&key.tgid),
            peer_address(key.family, &key.address),
        ) {
            let peer = std::net::SocketAddr::new(ip, key.port).to_string();
            peers
                .entry((name.clone(), peer))
                .or_default()
                .2
                .add(histogram);
        }
    }
    for (key, counters) in &delta.peer_counters {
        if let (Some(name), Some(ip)) = (
            workload_of.get(&key.tgid),
            peer_address(key.family, &key.address),
        ) {
            let peer = std::net::SocketAddr::new(ip, key.port).to_string();
            peers.entry((name.clone(), peer)).or_default().1 += counters.retransmits;
        }
    }
    for ((name, peer), (rtt, retransmits, connect)) in peers {
        if let Some(workload) = workloads.get_mut(&name) {
            workload.peers.push(PeerEvidence {
                peer,
                rtt_p95_ms: rtt.quantile_ms(0.95),
                retransmits,
                connect_p95_ms: connect.quantile_ms(0.95),
            });
        }
    }

    // Requests served and made by its processes (the window's rows, already bounded).
    for server in &window.requests.servers {
        if let Some(workload) = workload_of
            .get(&server.pid)
            .and_then(|n| workloads.get_mut(n))
        {
            let mut served =
                RequestEvidence::of(format!("port {}", server.port), &server.figures, None, None);
            let key = agent_common::requests::request_key(
                agent_common::requests::role::SERVER,
                server.pid,
                server.port,
                0,
                [0; 16],
                0,
            );
            if let Some(latency) = delta.request_latency.get(&key) {
                served.latency = latency.clone();
            }
            if let Some(first_byte) = delta.request_first_byte.get(&key) {
                served.first_byte = first_byte.clone();
            }
            workload.served.push(served);
        }
    }
    for client in &window.requests.clients {
        if let Some(workload) = workload_of
            .get(&client.pid)
            .and_then(|n| workloads.get_mut(n))
        {
            workload.upstreams.push(RequestEvidence::of(
                client.peer.clone(),
                &client.figures,
                client.rtt_p95_ms,
                client.path_rtt_ms,
            ));
        }
    }

    // GPUs the workload's processes have contexts on.
    for workload in workloads.values_mut() {
        workload
            .served
            .sort_by_key(|served| std::cmp::Reverse(served.requests));
        workload.upstreams.sort_by(|a, b| {
            b.p95_ms
                .unwrap_or(-1.0)
                .total_cmp(&a.p95_ms.unwrap_or(-1.0))
        });
        let indices: BTreeSet<u32> = gpu
            .processes
            .iter()
            .filter(|process| workload.pids.contains(&process.pid))
            .filter_map(|process| process.gpu_index)
            .collect();
        workload.gpus = gpu
            .devices
            .iter()
            .filter(|device| indices.contains(&device.index))
            .map(|device| GpuEvidence {
                index: device.index,
                name: device.name.clone(),
                utilization: device.utilization,
                memory_bytes: gpu
                    .processes
                    .iter()
                    .filter(|p| p.gpu_index == Some(device.index) && workload.pids.contains(&p.pid))
                    .map(|p| p.memory_bytes)
                    .sum(),
                throttle_reasons: device
                    .throttle_reasons
                    .iter()
                    .map(|r| r.to_string())
                    .collect(),
            })
            .collect();
        workload.gpus.sort_by(|a, b| {
            b.utilization
                .unwrap_or(0.0)
                .total_cmp(&a.utilization.unwrap_or(0.0))
        });
        for process in &gpu.processes {
            if let Some(cuda) = &process.cuda
                && workload.pids.contains(&process.pid)
            {
                workload.cuda.get_or_insert_default().add(cuda);
            }
        }
        workload
            .devices
            .sort_by_key(|device| std::cmp::Reverse(device.bytes));
        workload.peers.sort_by(|a, b| {
            b.rtt_p95_ms
                .unwrap_or(-1.0)
                .total_cmp(&a.rtt_p95_ms.unwrap_or(-1.0))
        });
        workload.pids.sort_unstable();
    }
    workloads.into_values().collect()
}

/// Decides one workload's bottleneck.
pub fn decide(window: &WorkloadWindow, rules: &Rules) -> Verdict {
    let shares = window.time.shares();
    // A workload of several processes says so: its lowest pid alone read as the one process
    // the evidence is about (two programs of one name, the copier's copying was credited to
    // the other's pid).
    let pid = window.pids.iter().min().copied();
    let who = match (pid, window.pids.len()) {
        (Some(pid), 1) => format!("{} (pid {pid})", window.name),
        (Some(pid), count) => format!("{} (pid {pid} and {} more)", window.name, count - 1),
        (None, _) => window.name.clone(),
    };
    let mut evidence = vec![format!(
        "time: {} on CPU, {} waiting for a CPU, {} blocked on storage, {} on the network, {} waiting on the GPU, {} other sleep",
        percent(shares.on_cpu),
        percent(shares.waiting_for_cpu),
        percent(shares.storage),
        percent(shares.network),
        percent(shares.gpu),
        percent(shares.other_sleep)
    )];
    for served in window.served.iter().take(2) {
        evidence.push(format!(
            "serves {} requests ({:.1}/s) on {}: P95 {}, first byte P95 {}",
            served.requests,
            served.rate_per_s,
            served.endpoint,
            ms(served.p95_ms),
            ms(served.first_byte_p95_ms)
        ));
    }
    if let Some(cuda) = &window.cuda {
        evidence.push(cuda_evidence(cuda));
    }
    let verdict = |bottleneck, confidence: f64, summary: String, evidence, share| Verdict {
        bottleneck,
        confidence: (confidence.clamp(0.0, 1.0) * 100.0).round() / 100.0,
        workload: Some(window.name.clone()),
        pid,
        summary,
        evidence,
        share,
        note: None,
    };

    // Rule 1: a saturated GPU makes the model the limit, whatever the threads do meanwhile
    // (CUDA often spins on a CPU while it waits for the GPU).
    if let Some(gpu) = window
        .gpus
        .iter()
        .filter(|gpu| gpu.utilization.is_some_and(|u| u >= rules.gpu_saturated))
        .max_by(|a, b| {
            a.utilization
                .unwrap_or(0.0)
                .total_cmp(&b.utilization.unwrap_or(0.0))
        })
    {
        let utilization = gpu.utilization.unwrap_or(0.0);
        let throttled: Vec<&str> = gpu
            .throttle_reasons
            .iter()
            .map(String::as_str)
            .filter(|r| *r != "idle")
            .collect();
        let throttle_text = if throttled.is_empty() {
            String::new()
        } else {
            format!(", throttled: {}", throttled.join(", "))
        };
        evidence.push(format!(
            "GPU {} ({}) {} utilized{throttle_text}",
            gpu.index,
            gpu.name,
            percent(utilization)
        ));
        let confidence =
            0.5 + 0.5 * (utilization - rules.gpu_saturated) / (1.0 - rules.gpu_saturated).max(1e-9);
        let summary = format!(
            "model - {who} keeps GPU {} ({}) {} busy{throttle_text}",
            gpu.index,
            gpu.name,
            percent(utilization)
        );
        return verdict(
            Bottleneck::Model,
            confidence,
            summary,
            evidence,
            utilization.max(shares.gpu),
        );
    }

    // Rule 2: otherwise the class that took the largest share of the time, if it is large
    // enough; confidence grows with its margin over the runner-up and with its size.
    let active = window.time.active_shares();
    let active_fraction = window.time.active_ns() as f64 / window.window_ns.max(1) as f64;
    evidence.push(format!(
        "active {:.1} thread-seconds in a {:.1} s window; the shares below leave other sleep out",
        window.time.active_ns() as f64 / 1e9,
        window.window_ns as f64 / 1e9
    ));
    let ranked = candidates(window, rules);
    let (winner, score) = ranked[0];
    let runner_up = ranked[1].1;
    if active_fraction < rules.min_active {
        return Verdict {
            note: Some("too little activity to judge".to_string()),
            ..verdict(
                Bottleneck::None,
                1.0 - active_fraction / rules.min_active,
                format!(
                    "none - {who} is mostly idle (active {} of the window)",
                    percent(active_fraction)
                ),
                evidence,
                0.0,
            )
        };
    }
    if score < rules.min_share {
        // The nearer the busiest class came to the threshold, the less sure "none" is.
        let confidence = 1.0 - score / rules.min_share;
        return Verdict {
            note: Some("not held back".to_string()),
            ..verdict(
                Bottleneck::None,
                confidence,
                format!(
                    "none - {who} is not held back ({} of its time was other sleep)",
                    percent(shares.other_sleep)
                ),
                evidence,
                0.0,
            )
        };
    }
    let confidence = (score - runner_up) / score * (score / 0.5).min(1.0);
    let summary = match winner {
        Bottleneck::Storage => {
            let device = window.devices.first();
            if let Some(device) = device {
                evidence.push(format!(
                    "{}: P95 {} queued-to-complete, {} of the wait queued before the device, {} read or written",
                    device.device,
                    ms(device.p95_ms),
                    device.queue_share.map_or("n/a".to_string(), percent),
                    crate::model::units::format_bytes(device.bytes as f64)
                ));
            }
            format!(
                "storage - {who} spent {} of its active time blocked on {}{}",
                percent(score),
                device.map_or("storage", |d| d.device.as_str()),
                device.map_or(String::new(), |d| format!(", P95 {}", ms(d.p95_ms)))
            )
        }
        Bottleneck::Network if !window.upstreams.is_empty() => {
            // Waits for responses: the slowest upstream, and whether its time is the
            // network's (round trips) or its own.
            let upstream = &window.upstreams[0];
            let judgement = upstream_judgement(upstream);
            evidence.push(format!(
                "upstream {} answers {} requests in P95 {} (first byte {}) over a path with a round trip of {} (smoothed RTT P95 {}): {judgement}",
                upstream.endpoint,
                upstream.requests,
                ms(upstream.p95_ms),
                ms(upstream.first_byte_p95_ms),
                format_ms(upstream.path_rtt_ms),
                format_ms(upstream.rtt_p95_ms),
            ));
            if let Some(peer) = window.peers.first() {
                evidence.push(format!(
                    "{}: RTT P95 {}, {} retransmits",
                    peer.peer,
                    ms(peer.rtt_p95_ms),
                    peer.retransmits
                ));
            }
            format!(
                "network - {who} spent {} of its active time waiting on responses; upstream {} answers in P95 {} over a {} network ({judgement})",
                percent(score),
                upstream.endpoint,
                ms(upstream.p95_ms),
                format_ms(upstream.path_rtt_ms.or(upstream.rtt_p95_ms)),
            )
        }
        Bottleneck::Network => {
            let peer = window.peers.first();
            if let Some(peer) = peer {
                evidence.push(format!(
                    "{}: RTT P95 {}, {} retransmits",
                    peer.peer,
                    ms(peer.rtt_p95_ms),
                    peer.retransmits
                ));
            }
            format!(
                "network - {who} spent {} of its active time waiting on the network{}",
                percent(score),
                peer.map_or(String::new(), |p| format!(
                    ", slowest peer {} RTT P95 {}",
                    p.peer,
                    ms(p.rtt_p95_ms)
                ))
            )
        }
        Bottleneck::Model => {
            let gpu = window.gpus.first();
            if let Some(gpu) = gpu {
                evidence.push(format!(
                    "GPU {} ({}) {} utilized",
                    gpu.index,
                    gpu.name,
                    gpu.utilization.map_or("n/a".to_string(), percent)
                ));
            }
            // Waits dominated by blocking copies to the GPU are the input pipeline's: the
            // model is fed too slowly, it is not computing too slowly.
            let gpu_wait_s = window.time.gpu_ns as f64 / 1e9;
            let active_s = window.time.active_ns() as f64 / 1e9;
            match &window.cuda {
                Some(cuda)
                    if cuda.h2d_s > 0.0
                        && cuda.h2d_s >= INPUT_PIPELINE_SHARE_OF_GPU_WAIT * gpu_wait_s =>
                {
                    format!(
                        "model - {who}: input pipeline: {} of active time copying to {} at {}/s",
                        percent(cuda.h2d_s / active_s.max(1e-9)),
                        gpu.map_or("the GPU".to_string(), |g| format!("GPU {}", g.index)),
                        crate::model::units::format_bytes(cuda.h2d_bytes as f64 / cuda.h2d_s)
                    )
                }
                Some(cuda) if cuda.blocking_s() > 0.0 => format!(
                    "model - {who} spent {} of its time waiting on the GPU, most in {}",
                    percent(score),
                    cuda.functions
                        .iter()
                        .find(|f| f.blocks())
                        .map_or("CUDA synchronisation", |f| f.function)
                ),
                _ => format!(
                    "model - {who} spent {} of its time waiting on the GPU",
                    percent(score)
                ),
            }
        }
        Bottleneck::Cpu => format!(
            "cpu - {who} was running {} and waiting for a CPU {} of its active time",
            percent(active.on_cpu),
            percent(active.waiting_for_cpu)
        ),
        Bottleneck::None => unreachable!("None is never a candidate"),
    };
    verdict(winner, confidence, summary, evidence, score)
}

/// Whether an upstream's response time is its own work or the network's round trips. The
/// path's round trip is the measure where known: the smoothed RTT of request/response traffic
/// carries the upstream's delayed ACKs (up to 40 ms of its think time), which would make a
/// slow upstream look like a slow network.
fn upstream_judgement(upstream: &RequestEvidence) -> &'static str {
    match (
        upstream.p95_ms,
        upstream.path_rtt_ms.or(upstream.rtt_p95_ms),
    ) {
        // Round trips explain a response when they are a good part of it; a request/response
        // over a fresh window needs a few of them (slow start), hence the factor.
        (Some(response), Some(rtt)) if response > 4.0 * rtt + 1.0 => "a slow upstream",
        (Some(_), Some(_)) => "round trips are most of it: a slow network",
        (Some(_), None) => "no RTT sample for it",
        (None, _) => "no response timed yet",
    }
}

/// Puts each request row's workload name on it, from the judged workloads' processes.
pub fn name_request_workloads(requests: &mut RequestsSummary, workloads: &[WorkloadWindow]) {
    let workload_of = |pid: u32| {
        workloads
            .iter()
            .find(|workload| workload.pids.contains(&pid))
            .map(|workload| workload.name.clone())
    };
    for server in &mut requests.servers {
        server.workload = workload_of(server.pid);
    }
    for client in &mut requests.clients {
        client.workload = workload_of(client.pid);
    }
}

/// A workload with its verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Judged {
    pub window: WorkloadWindow,
    pub verdict: Verdict,
}

/// Every workload judged by the default rules, those losing most first, and the node's
/// roll-up. The one judging step `diagnose` and `run` share.
pub fn judge(workloads: Vec<WorkloadWindow>) -> (Verdict, Vec<Judged>) {
    let rules = Rules::default();
    let mut judged: Vec<Judged> = workloads
        .into_iter()
        .map(|window| Judged {
            verdict: decide(&window, &rules),
            window,
        })
        .collect();
    let node = roll_up(&judged.iter().map(|j| j.verdict.clone()).collect::<Vec<_>>());
    judged.sort_by(|a, b| {
        b.verdict.share.total_cmp(&a.verdict.share).then(
            b.window
                .time
                .shares()
                .on_cpu
                .total_cmp(&a.window.time.shares().on_cpu),
        )
    });
    (node, judged)
}

/// The node's verdict: the workload losing the largest share of its time to a bottleneck;
/// "none" when no workload has one.
pub fn roll_up(verdicts: &[Verdict]) -> Verdict {
    let worst = verdicts
        .iter()
        .filter(|v| v.bottleneck != Bottleneck::None)
        .max_by(|a, b| {
            a.share
                .total_cmp(&b.share)
                .then(a.confidence.total_cmp(&b.confidence))
        });
    match worst {
        Some(verdict) => verdict.clone(),
        None => Verdict {
            bottleneck: Bottleneck::None,
            confidence: verdicts.iter().map(|v| v.confidence).fold(1.0, f64::min),
            workload: None,
            pid: None,
            summary: format!(
                "none - no workload is held back ({} measured)",
                match verdicts.len() {
                    1 => "1 workload".to_string(),
                    n => format!("{n} workloads"),
                }
            ),
            evidence: Vec::new(),
            share: 0.0,
            note: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn window(time: TimeBreakdown) -> WorkloadWindow {
        WorkloadWindow {
            name: "trainer".into(),
            pids: vec![4121, 4130],
            window_ns: 10 * SECOND,
            time,
            ..WorkloadWindow::default()
        }
    }

    #[test]
    fn waits_on_a_slow_upstream_name_it_and_say_the_network_is_not_the_cause() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: SECOND,
            network_ns: 8 * SECOND,
            other_sleep_ns: SECOND,
            ..Default::default()
        });
        let upstream = |p95_ms, rtt_p95_ms| RequestEvidence {
            endpoint: "10.0.0.7:6333".into(),
            requests: 25,
            rate_per_s: 2.5,
            p95_ms: Some(p95_ms),
            first_byte_p95_ms: Some(p95_ms - 0.1),
            rtt_p95_ms: Some(40.0),
            path_rtt_ms: Some(rtt_p95_ms),
            ..Default::default()
        };
        w.upstreams = vec![upstream(300.0, 0.2)];
        w.served = vec![RequestEvidence {
            endpoint: "port 8000".into(),
            requests: 25,
            rate_per_s: 2.5,
            p95_ms: Some(320.0),
            first_byte_p95_ms: Some(5.0),
            rtt_p95_ms: None,
            path_rtt_ms: None,
            ..Default::default()
        }];
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Network);
        assert_eq!(
            verdict.summary,
            "network - trainer (pid 4121 and 1 more) spent 89% of its active time waiting on responses; upstream 10.0.0.7:6333 answers in P95 300.0 ms over a 200 us network (a slow upstream)"
        );
        assert!(
            verdict.evidence.contains(
                &"serves 25 requests (2.5/s) on port 8000: P95 320.0 ms, first byte P95 5.0 ms"
                    .to_string()
            )
        );
        // The smoothed RTT (40 ms here, delayed ACKs) does not decide: the path's does. The
        // same response time over a 100 ms path is the network's round trips.
        w.upstreams = vec![upstream(300.0, 100.0)];
        let verdict = decide(&w, &Rules::default());
        assert!(
            verdict
                .summary
                .ends_with("(round trips are most of it: a slow network)"),
            "{}",
            verdict.summary
        );
    }

    #[test]
    fn processes_group_by_container_then_service_then_program() {
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
        assert_eq!(
            automatic_workload_name(Some(&format!("/system.slice/docker-{id}.scope")), "python3"),
            "container:3f4e5d6c7b8a"
        );
        assert_eq!(
            automatic_workload_name(Some(&format!("/kubepods/burstable/pod1/{id}")), "python3"),
            "container:3f4e5d6c7b8a"
        );
        assert_eq!(
            automatic_workload_name(Some("/system.slice/triton.service"), "tritonserver"),
            "triton.service"
        );
        assert_eq!(
            automatic_workload_name(Some("/user.slice/user-1000.slice/session-3.scope"), "fio"),
            "fio"
        );
        assert_eq!(automatic_workload_name(None, "fio"), "fio");
    }

    #[test]
    fn shares_sum_to_one() {
        let time = TimeBreakdown {
            on_cpu_ns: 2 * SECOND,
            waiting_for_cpu_ns: SECOND,
            storage_ns: 3 * SECOND,
            network_ns: SECOND,
            gpu_ns: SECOND,
            other_sleep_ns: 2 * SECOND,
        };
        let shares = time.shares();
        let sum = shares.on_cpu
            + shares.waiting_for_cpu
            + shares.storage
            + shares.network
            + shares.gpu
            + shares.other_sleep;
        assert!((sum - 1.0).abs() < 1e-12);
        assert_eq!(shares.storage, 0.3);
        assert_eq!(TimeBreakdown::default().shares(), TimeShares::default());
    }

    #[test]
    fn heavy_direct_io_is_storage_and_names_the_device() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: SECOND,
            storage_ns: 63 * SECOND / 10,
            other_sleep_ns: 27 * SECOND / 10,
            ..Default::default()
        });
        w.devices = vec![DeviceEvidence {
            device: "vda".into(),
            bytes: 1 << 30,
            p95_ms: Some(84.0),
            queue_share: Some(0.4),
        }];
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Storage);
        assert_eq!(
            verdict.summary,
            "storage - trainer (pid 4121 and 1 more) spent 86% of its active time blocked on vda, P95 84.0 ms"
        );
        assert!(
            verdict
                .evidence
                .iter()
                .any(|e| e.starts_with("vda: P95 84.0 ms"))
        );
        // Runner-up is other sleep's rivals: 0.1 on CPU -> cpu not a candidate (below 50%).
        assert_eq!(verdict.confidence, 1.0);
        assert_eq!(verdict.share, 6.3 / 7.3);
    }

    #[test]
    fn waiting_on_a_delayed_peer_is_network_and_names_the_peer() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: SECOND,
            network_ns: 7 * SECOND,
            storage_ns: SECOND,
            other_sleep_ns: SECOND,
            ..Default::default()
        });
        w.peers = vec![PeerEvidence {
            peer: "10.251.1.2:5201".into(),
            rtt_p95_ms: Some(120.0),
            retransmits: 3,
            connect_p95_ms: None,
        }];
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Network);
        assert!(
            verdict
                .summary
                .contains("slowest peer 10.251.1.2:5201 RTT P95 120.0 ms"),
            "{}",
            verdict.summary
        );
        // Margin (0.7 - 0.1) / 0.7, size capped at 1.
        assert_eq!(verdict.confidence, 0.86);
    }

    #[test]
    fn a_saturated_gpu_is_model_even_when_the_cpu_spins() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: 10 * SECOND,
            ..Default::default()
        });
        w.gpus = vec![GpuEvidence {
            index: 0,
            name: "H100".into(),
            utilization: Some(0.97),
            throttle_reasons: vec!["idle".into(), "sw_power_cap".into()],
            memory_bytes: None,
        }];
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Model);
        assert_eq!(
            verdict.summary,
            "model - trainer (pid 4121 and 1 more) keeps GPU 0 (H100) 97% busy, throttled: sw_power_cap"
        );
        assert_eq!(verdict.confidence, 0.85);
    }

    fn cuda(h2d_s: f64, sync_s: f64) -> CudaActivity {
        CudaActivity {
            sync_s,
            sync_calls: 400,
            h2d_bytes: (h2d_s * 9e9) as u64,
            h2d_s,
            functions: vec![crate::analysis::cuda::CudaFunctionSummary {
                function: "cudaStreamSynchronize",
                calls: 400,
                seconds: sync_s,
                bytes: 0,
                failures: 0,
            }],
            ..CudaActivity::default()
        }
    }

    #[test]
    fn gpu_waits_dominated_by_copies_to_the_gpu_name_the_input_pipeline() {
        let time = TimeBreakdown {
            on_cpu_ns: 2 * SECOND,
            gpu_ns: 6 * SECOND,
            other_sleep_ns: 2 * SECOND,
            ..Default::default()
        };
        let mut w = window(time);
        w.gpus = vec![GpuEvidence {
            index: 0,
            name: "H100".into(),
            utilization: Some(0.4),
            ..GpuEvidence::default()
        }];
        // 3.3 of 6 s of GPU wait copying to the GPU: the input pipeline.
        w.cuda = Some(cuda(3.3, 2.7));
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Model);
        assert_eq!(
            verdict.summary,
            "model - trainer (pid 4121 and 1 more): input pipeline: 41% of active time copying to GPU 0 at 8.4 GiB/s"
        );
        assert!(
            verdict.evidence.iter().any(|line| line
                == "CUDA: 2.70 s in CUDA synchronisation, cudaStreamSynchronize 2.70 s over 400 calls; 27.7 GiB copied to the GPU (3.30 s blocked, 8.4 GiB/s)"),
            "{:?}",
            verdict.evidence
        );
        // Mostly synchronisation: the model's own compute, the call named.
        w.cuda = Some(cuda(1.0, 5.0));
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Model);
        assert_eq!(
            verdict.summary,
            "model - trainer (pid 4121 and 1 more) spent 75% of its time waiting on the GPU, most in cudaStreamSynchronize"
        );
    }

    #[test]
    fn a_spinner_is_cpu() {
        let w = window(TimeBreakdown {
            on_cpu_ns: 6 * SECOND,
            waiting_for_cpu_ns: 3 * SECOND,
            other_sleep_ns: SECOND,
            ..Default::default()
        });
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Cpu);
        assert_eq!(
            verdict.summary,
            "cpu - trainer (pid 4121 and 1 more) was running 67% and waiting for a CPU 33% of its active time"
        );
    }

    #[test]
    fn a_workload_is_named_with_its_pid_or_its_lowest_and_how_many_more() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: 6 * SECOND,
            waiting_for_cpu_ns: 3 * SECOND,
            other_sleep_ns: SECOND,
            ..Default::default()
        });
        for (pids, who) in [
            (vec![4121], "trainer (pid 4121)"),
            (vec![4130, 4121], "trainer (pid 4121 and 1 more)"),
            (
                vec![4121, 4130, 5000, 6000],
                "trainer (pid 4121 and 3 more)",
            ),
            (vec![], "trainer"),
        ] {
            w.pids = pids;
            let verdict = decide(&w, &Rules::default());
            assert_eq!(
                verdict.summary,
                format!("cpu - {who} was running 67% and waiting for a CPU 33% of its active time")
            );
            assert_eq!(verdict.pid, w.pids.iter().min().copied());
        }
    }

    #[test]
    fn an_idle_workload_is_none() {
        let w = window(TimeBreakdown {
            on_cpu_ns: SECOND / 10,
            storage_ns: SECOND / 10,
            other_sleep_ns: 98 * SECOND / 10,
            ..Default::default()
        });
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::None);
        // Active 2% of the window against a 25% threshold.
        assert_eq!(verdict.confidence, 0.92);
        assert!(verdict.summary.starts_with(
            "none - trainer (pid 4121 and 1 more) is mostly idle (active 2% of the window)"
        ));
    }

    #[test]
    fn busy_but_unsaturated_gpu_with_little_waiting_is_not_model() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: SECOND,
            other_sleep_ns: 9 * SECOND,
            ..Default::default()
        });
        w.gpus = vec![GpuEvidence {
            index: 0,
            name: "T4".into(),
            utilization: Some(0.5),
            throttle_reasons: vec![],
            memory_bytes: None,
        }];
        assert_eq!(decide(&w, &Rules::default()).bottleneck, Bottleneck::None);
    }

    #[test]
    fn the_node_takes_the_workload_losing_most() {
        let storage = Verdict {
            bottleneck: Bottleneck::Storage,
            confidence: 0.9,
            workload: Some("a".into()),
            pid: Some(1),
            summary: "s".into(),
            evidence: vec![],
            share: 0.4,
            note: None,
        };
        let network = Verdict {
            bottleneck: Bottleneck::Network,
            confidence: 0.5,
            workload: Some("b".into()),
            pid: Some(2),
            summary: "n".into(),
            evidence: vec![],
            share: 0.7,
            note: None,
        };
        let idle = Verdict {
            bottleneck: Bottleneck::None,
            confidence: 0.8,
            workload: Some("c".into()),
            pid: Some(3),
            summary: "i".into(),
            evidence: vec![],
            share: 0.0,
            note: None,
        };
        assert_eq!(
            roll_up(&[storage.clone(), network.clone(), idle.clone()]),
            network
        );
        let node = roll_up(std::slice::from_ref(&idle));
        assert_eq!(node.bottleneck, Bottleneck::None);
        assert_eq!(node.confidence, 0.8);
        assert_eq!(node.workload, None);
    }

    #[test]
    fn the_roll_up_counts_workloads_in_words() {
        let idle = decide(
            &WorkloadWindow {
                name: "w".into(),
                window_ns: 1_000_000_000,
                time: TimeBreakdown {
                    other_sleep_ns: 1_000_000_000,
                    ..TimeBreakdown::default()
                },
                ..WorkloadWindow::default()
            },
            &Rules::default(),
        );
        assert_eq!(
            roll_up(std::slice::from_ref(&idle)).summary,
            "none - no workload is held back (1 workload measured)"
        );
        assert_eq!(
            roll_up(&[idle.clone(), idle]).summary,
            "none - no workload is held back (2 workloads measured)"
        );
        assert_eq!(
            roll_up(&[]).summary,
            "none - no workload is held back (0 workloads measured)"
        );
    }
}
