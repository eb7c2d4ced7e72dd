//! The stages wired together, shared by `diagnose` (one window) and `run` (every window):
//! probe loading, process tracking, the GPU reader thread, per-workload verdicts.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use agent_common::sched::tracked;

use crate::{
    aggregation::gpu::{GpuSummary, summarize_gpu},
    attribution::{Rules, Verdict, WorkloadWindow, decide, roll_up},
    preflight::{self, PreflightReport},
    report::WorkloadReport,
    sources::{
        gpu::{GpuSample, NvmlSource, load_nvml},
        probes::KernelProbes,
        system::{LiveSystem, user_processes},
    },
};

/// Preflight, then the probes; a probe that could not attach is reported once, not fatal.
pub fn load_probes() -> anyhow::Result<(PreflightReport, KernelProbes)> {
    let preflight = preflight::run()?;
    for warning in &preflight.warnings {
        tracing::warn!("{warning}");
    }
    let probes = KernelProbes::load(Path::new(&preflight.tracefs))?;
    for probe in probes.statuses().iter().filter(|p| !p.attached) {
        tracing::warn!(
            "probe {} is off, so there will be no {}: {}",
            probe.tracepoint,
            probe.feeds,
            probe.problem.as_deref().unwrap_or("unknown reason")
        );
    }
    Ok((preflight, probes))
}

/// Keeps the kernel's tracked set equal to the live user processes (the agent left out),
/// with the GPU flag on those that have a GPU context.
pub fn refresh_tracking(
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
                if let Ok(mut pids) = gpu_pids.lock() {
                    pids.extend(sample.processes.iter().map(|p| p.pid));
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
    pub async fn finish(mut self) -> GpuSummary {
        let summary = self.request(GpuCommand::Stop).await;
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        summary
    }
}

/// Verdicts per workload (those losing most first, `top` of them) and the node's roll-up.
pub fn judge(workloads: Vec<WorkloadWindow>, top: usize) -> (Verdict, Vec<WorkloadReport>) {
    let rules = Rules::default();
    let mut judged: Vec<WorkloadReport> = workloads
        .iter()
        .map(|workload| WorkloadReport {
            name: workload.name.clone(),
            pids: workload.pids.clone(),
            verdict: decide(workload, &rules),
            time: workload.time.shares(),
        })
        .collect();
    let node = roll_up(&judged.iter().map(|w| w.verdict.clone()).collect::<Vec<_>>());
    judged.sort_by(|a, b| {
        b.verdict
            .share
            .total_cmp(&a.verdict.share)
            .then(b.time.on_cpu.total_cmp(&a.time.on_cpu))
    });
    judged.truncate(top);
    (node, judged)
}
