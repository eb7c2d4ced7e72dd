//! The window step `diagnose` and `run` share: load the probes, keep the tracked processes
//! current, read the GPUs on their own thread, and at each window's end turn the probes' and
//! GPUs' counts into judged workloads and evaluated budgets. The daemon adds scheduling,
//! budget state, export and actions; `diagnose` adds the report.
use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::sched::tracked;
use anyhow::Context as _;

use crate::{
    analysis::{
        attribution::{self, Judged, Verdict},
        cuda::cuda_by_process,
        engines::EngineSummary,
        gpu::{GpuSummary, add_cuda, summarize_gpu},
        window::{WindowSummary, summarize_window},
    },
    app::engines::EngineReaders,
    budgets::{self, BudgetResult},
    config::LoadedConfig,
    host::{
        gpu::{NvmlSource, load_nvml},
        system::{LiveSystem, listening_tcp_ports, user_processes},
    },
    kernel::{
        cuda::CudaLibraryStatus,
        preflight::{self, PreflightReport},
        probes::{KernelProbes, ProbeKind, ProbeStatus},
    },
    model::{
        KernelSnapshot,
        gpu::{CudaProbes, GpuSample},
    },
};

/// What one window measured and what it means.
#[derive(Debug)]
pub struct Window {
    /// When the window ended.
    pub at: SystemTime,
    pub elapsed: Duration,
    pub summary: WindowSummary,
    pub gpu: GpuSummary,
    /// Workloads judged, those losing most first (only the focused one, when focused).
    pub workloads: Vec<Judged>,
    /// Every workload the window saw, most active first, before any focus.
    pub workloads_seen: Vec<String>,
    /// The node's verdict: the workload held back most.
    pub node: Verdict,
    /// Every budget evaluated on this window, in configuration order.
    pub budgets: Vec<BudgetResult>,
    /// The configured serving engines' own figures for the window.
    pub engines: Vec<EngineSummary>,
}

impl Window {
    pub fn at_unix_s(&self) -> u64 {
        self.at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }
}

/// Which workloads a window is about: all of them, or only the one named or holding a pid.
#[derive(Clone, Debug, Default)]
pub struct Focus {
    pub workload: Option<String>,
    pub pid: Option<u32>,
}

/// The probes, the GPU reader and the last snapshot, carried from one window to the next.
pub struct WindowStep {
    pub preflight: PreflightReport,
    probes: KernelProbes,
    gpu: GpuSampler,
    engines: EngineReaders,
    gpu_pids: Arc<Mutex<HashSet<u32>>>,
    tracked: HashSet<u32>,
    /// Which CUDA calls the uprobes count (`[gpu] cuda_probes`).
    cuda_probes: CudaProbes,
    previous: KernelSnapshot,
    started: Instant,
    /// Longest lists (processes, peers) kept in a window summary.
    top: usize,
}

impl WindowStep {
    /// Loads the probes, starts the GPU reader and the first window.
    pub fn start(
        nvml_library: Option<PathBuf>,
        gpu_interval: Duration,
        top: usize,
    ) -> anyhow::Result<Self> {
        let (preflight, mut probes) = load_probes()?;
        let gpu_pids = Arc::new(Mutex::new(HashSet::new()));
        let gpu = GpuSampler::start(nvml_library, gpu_interval, gpu_pids.clone());
        let mut tracked = HashSet::new();
        refresh_tracking(&mut probes, &mut tracked, &HashSet::new());
        let previous = probes.snapshot().context("reading the probes' maps")?;
        Ok(Self {
            preflight,
            probes,
            gpu,
            engines: EngineReaders::default(),
            gpu_pids,
            tracked,
            cuda_probes: CudaProbes::Off,
            previous,
            started: Instant::now(),
            top,
        })
    }

    /// Scrapes the configured serving engines once, so the first window has a start (waits
    /// up to `[agent] engine_timeout`).
    pub async fn start_engines(&mut self, config: &LoadedConfig) {
        self.engines
            .configure(&config.engines, config.agent.engine_timeout);
        self.engines.start().await;
    }

    /// Cumulative counts since the probes loaded, as of the last window's end.
    pub fn latest_snapshot(&self) -> &KernelSnapshot {
        &self.previous
    }

    /// Every probe, with the events it has missed so far.
    pub fn probe_statuses(&self) -> Vec<ProbeStatus> {
        self.probes.statuses()
    }

    /// Turns the CUDA uprobes on or off (they attach and detach at the next
    /// [`every_second`](Self::every_second)).
    pub fn set_cuda_probes(&mut self, mode: CudaProbes) {
        self.cuda_probes = mode;
    }

    /// The CUDA libraries found so far (attached or not), and why the probes cannot run
    /// here when they cannot.
    pub fn cuda_libraries(&self) -> (Vec<CudaLibraryStatus>, Option<String>) {
        (self.probes.cuda_libraries(), self.probes.cuda_refused())
    }

    /// Keeps the kernel's set of tracked processes current, so a process that starts
    /// mid-window is counted from then on, attaches the CUDA probes to libraries new
    /// processes map, and forwards the probes' diagnostic events to the log. Call it every
    /// second.
    pub fn every_second(&mut self) {
        let gpu_pids = self.gpu_pids.lock().map(|p| p.clone()).unwrap_or_default();
        refresh_tracking(&mut self.probes, &mut self.tracked, &gpu_pids);
        self.probes.refresh_cuda(&self.tracked, self.cuda_probes);
        self.probes.forward_probe_log();
    }

    /// Ends the window that is running, starts the next, and says what the ended one means.
    pub async fn next_window(
        &mut self,
        config: &LoadedConfig,
        focus: &Focus,
    ) -> anyhow::Result<Window> {
        let cumulative = self.probes.snapshot().context("reading the probes' maps")?;
        let ended = self.end_window();
        self.engines
            .configure(&config.engines, config.agent.engine_timeout);
        let (gpu, engines) = tokio::join!(self.gpu.take_window(), self.engines.window());
        Ok(self.measured(cumulative, ended, (gpu, engines), config, focus))
    }

    /// Ends the last window and stops the GPU reader.
    pub async fn finish(mut self, config: &LoadedConfig, focus: &Focus) -> anyhow::Result<Window> {
        let cumulative = self.probes.snapshot().context("reading the probes' maps")?;
        let ended = self.end_window();
        self.engines
            .configure(&config.engines, config.agent.engine_timeout);
        let gpu = std::mem::replace(&mut self.gpu, GpuSampler::stopped()).finish();
        let (gpu, engines) = tokio::join!(gpu, self.engines.window());
        Ok(self.measured(cumulative, ended, (gpu, engines), config, focus))
    }

    /// Stops the GPU reader without measuring another window.
    pub async fn stop(self) {
        self.gpu.finish().await;
    }

    /// The window's length and end, taken with its snapshot (not after the GPU reader
    /// answers, which may take a while); the next window starts now.
    fn end_window(&mut self) -> (Duration, SystemTime) {
        let elapsed = self.started.elapsed();
        self.started = Instant::now();
        (elapsed, SystemTime::now())
    }

    fn measured(
        &mut self,
        cumulative: KernelSnapshot,
        (elapsed, at): (Duration, SystemTime),
        (mut gpu, engines): (GpuSummary, Vec<EngineSummary>),
        config: &LoadedConfig,
        focus: &Focus,
    ) -> Window {
        let delta = cumulative.since(&self.previous);
        let cuda = cuda_by_process(&delta, self.cuda_probes == CudaProbes::SyncAndLaunch);
        add_cuda(&mut gpu, &cuda, &LiveSystem);
        let mut summary = summarize_window(&delta, elapsed, &LiveSystem, self.top);
        summary.requests.timed = self.probes.requests_timed();
        let mut workloads = attribution::workload_windows(
            &delta,
            &summary,
            &gpu,
            &LiveSystem,
            elapsed.as_nanos() as u64,
            &config.workloads,
        );
        attribution::name_request_workloads(&mut summary.requests, &workloads);
        for workload in &mut workloads {
            workload.engine = engines
                .iter()
                .find(|e| e.workload == workload.name)
                .cloned();
        }
        let mut seen: Vec<(u64, String)> = workloads
            .iter()
            .map(|w| (w.time.active_ns(), w.name.clone()))
            .collect();
        seen.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let workloads_seen = seen.into_iter().map(|(_, name)| name).collect();
        if let Some(name) = &focus.workload {
            workloads.retain(|workload| &workload.name == name);
        }
        if let Some(pid) = focus.pid {
            workloads.retain(|workload| workload.pids.contains(&pid));
        }
        let at_s = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let budgets = budgets::evaluate_window(config, &workloads, at_s);
        let (node, workloads) = attribution::judge(workloads);
        // Kept as the next window's start, and lent to the cumulative export
        // (`latest_snapshot`): no copy of the maps per window.
        self.previous = cumulative;
        if self.cuda_probes != CudaProbes::Off || !self.previous.cuda_calls.is_empty() {
            self.probes.forget_exited_cuda_processes();
        }
        Window {
            at,
            elapsed,
            summary,
            gpu,
            workloads,
            workloads_seen,
            node,
            budgets,
            engines,
        }
    }
}

/// Preflight, then the probes; a probe that could not attach is reported once, not fatal.
fn load_probes() -> anyhow::Result<(PreflightReport, KernelProbes)> {
    let preflight = preflight::run()?;
    for warning in &preflight.warnings {
        tracing::warn!("{warning}");
    }
    let probes = KernelProbes::load(preflight.tracefs.as_deref())?;
    for probe in probes.statuses().iter().filter(|p| !p.attached) {
        tracing::warn!(
            "probe {} is off, so there will be no {}: {}",
            probe.tracepoint,
            probe.feeds,
            probe.problem.as_deref().unwrap_or("unknown reason")
        );
    }
    // Classic tracepoints work, but skip events while another probe runs on the same CPU
    // (the missed events are reported): say once why BTF was not used, one line per reason.
    let mut classic: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    let statuses = probes.statuses();
    for probe in statuses.iter().filter(|p| p.attached) {
        if let (ProbeKind::Tracepoint, Some(why)) = (probe.kind, &probe.btf_problem) {
            classic.entry(why).or_default().push(&probe.tracepoint);
        }
    }
    for (why, tracepoints) in classic {
        tracing::info!("classic tracepoints for {}: {why}", tracepoints.join(", "));
    }
    Ok((preflight, probes))
}

/// Keeps the kernel's tracked set equal to the live user processes (the agent left out),
/// with the GPU flag on those that have a GPU context.
fn refresh_tracking(
    probes: &mut KernelProbes,
    tracked_now: &mut HashSet<u32>,
    gpu_pids: &HashSet<u32>,
) {
    let me = std::process::id();
    let alive: HashSet<u32> = user_processes()
        .into_iter()
        .filter(|&pid| pid != me)
        .collect();
    for &pid in &alive {
        let flags = tracked::TRACKED
            | if gpu_pids.contains(&pid) {
                tracked::GPU_USER
            } else {
                0
            };
        if let Err(error) = probes.track_process(pid, flags) {
            tracing::debug!("cannot track process {pid}: {error:#}");
        }
    }
    let gone: Vec<u32> = tracked_now.difference(&alive).copied().collect();
    let _ = probes.untrack_processes(&gone);
    if probes.requests_timed() {
        let pids: Vec<u32> = alive.iter().copied().collect();
        if let Err(error) = probes.set_listening_ports(&listening_tcp_ports(&pids)) {
            tracing::debug!("cannot update the listening ports: {error:#}");
        }
    }
    *tracked_now = alive;
}

/// Reads the GPUs on a thread of its own (NVML calls block) until told to stop; one reading
/// at the start and one at the end, and one per interval between.
pub struct GpuSampler {
    commands: mpsc::Sender<GpuCommand>,
    thread: Option<JoinHandle<()>>,
}

enum GpuCommand {
    /// Summarise the window so far and start the next one.
    Window(tokio::sync::oneshot::Sender<GpuSummary>),
    /// Summarise and stop.
    Stop(tokio::sync::oneshot::Sender<GpuSummary>),
}

impl GpuSampler {
    pub fn start(
        library: Option<PathBuf>,
        interval: Duration,
        gpu_pids: Arc<Mutex<HashSet<u32>>>,
    ) -> Self {
        let (commands, received) = mpsc::channel::<GpuCommand>();
        let thread = std::thread::spawn(move || {
            let unavailable = |reason: String| {
                // Answer every request with the reason until told to stop.
                for command in received.iter() {
                    let (stop, reply) = match command {
                        GpuCommand::Window(reply) => (false, reply),
                        GpuCommand::Stop(reply) => (true, reply),
                    };
                    let _ = reply.send(GpuSummary::unavailable(reason.clone()));
                    if stop {
                        return;
                    }
                }
            };
            let nvml = match load_nvml(library.as_deref()) {
                Ok(nvml) => nvml,
                Err(reason) => return unavailable(reason.to_string()),
            };
            let mut source = match NvmlSource::new(&nvml) {
                Ok(source) => source,
                Err(reason) => return unavailable(reason.to_string()),
            };
            let mut samples: Vec<GpuSample> = Vec::new();
            loop {
                let sample = source.sample(Instant::now());
                // The processes with a GPU context now (a pid reused by another process must
                // not keep the flag).
                if let Ok(mut pids) = gpu_pids.lock() {
                    *pids = sample.processes.iter().map(|p| p.pid).collect();
                }
                samples.push(sample);
                let (reply, stop) = match received.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Ok(GpuCommand::Window(reply)) => (Some(reply), false),
                    Ok(GpuCommand::Stop(reply)) => (Some(reply), true),
                    Err(mpsc::RecvTimeoutError::Disconnected) => (None, true),
                };
                // One reading at the window's end, which also starts the next window.
                let last = source.sample(Instant::now());
                samples.push(last.clone());
                let summary = summarize_gpu(&samples, source.driver_version(), &LiveSystem);
                if let Some(reply) = reply {
                    let _ = reply.send(summary);
                }
                if stop {
                    return;
                }
                samples = vec![last];
            }
        });
        Self {
            commands,
            thread: Some(thread),
        }
    }

    async fn request(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<GpuSummary>) -> GpuCommand,
    ) -> GpuSummary {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.commands.send(command(reply)).is_err() {
            return GpuSummary::unavailable("the GPU reader stopped".to_string());
        }
        answer
            .await
            .unwrap_or_else(|_| GpuSummary::unavailable("the GPU reader crashed".to_string()))
    }

    /// The GPUs over the window since the last call (or the start).
    pub async fn take_window(&self) -> GpuSummary {
        self.request(GpuCommand::Window).await
    }

    /// The last window, then the reader stops.
    /// A sampler with no thread, standing in for one that has finished.
    fn stopped() -> Self {
        let (commands, _) = mpsc::channel();
        Self {
            commands,
            thread: None,
        }
    }

    pub async fn finish(mut self) -> GpuSummary {
        let summary = self.request(GpuCommand::Stop).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        summary
    }
}
