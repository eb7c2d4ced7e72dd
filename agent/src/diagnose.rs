//! `envelope diagnose`: load the probes, measure one window, report.
use std::{
    collections::HashSet,
    io::IsTerminal as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use agent_common::sched::tracked;

use crate::{
    aggregation::{
        gpu::{GpuSummary, summarize_gpu},
        window::summarize_window,
    },
    attribution::{self, Rules, Verdict, WorkloadWindow, decide, roll_up},
    preflight,
    report::{DiagnoseReport, JSON_SCHEMA_VERSION, WorkloadReport},
    sources::{
        gpu::{GpuSample, NvmlSource, load_nvml},
        probes::KernelProbes,
        system::{LiveSystem, user_processes},
    },
};

#[derive(Debug)]
pub struct DiagnoseOptions {
    pub duration: Duration,
    /// How many processes and peers to list.
    pub top: usize,
    /// NVML library to load instead of the driver's libnvidia-ml.so.1.
    pub nvml_library: Option<PathBuf>,
    /// How often GPUs are read during the window.
    pub gpu_interval: Duration,
    /// The configuration: named workloads (empty: automatic grouping only) and budgets.
    pub config: crate::config::LoadedConfig,
    /// Narrow the verdict to the workload of this name, or to the one holding this process.
    pub workload: Option<String>,
    pub pid: Option<u32>,
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
    *tracked_now = alive;
}

/// Reads the GPUs on a thread of its own (NVML calls block) until told to stop; one reading
/// at the start and one at the end, and one per interval between.
struct GpuSampler {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<GpuSummary>,
}

impl GpuSampler {
    fn start(
        library: Option<PathBuf>,
        interval: Duration,
        gpu_pids: Arc<Mutex<HashSet<u32>>>,
    ) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let nvml = match load_nvml(library.as_deref()) {
                Ok(nvml) => nvml,
                Err(reason) => return GpuSummary::unavailable(reason.to_string()),
            };
            let mut source = match NvmlSource::new(&nvml) {
                Ok(source) => source,
                Err(reason) => return GpuSummary::unavailable(reason.to_string()),
            };
            let mut samples: Vec<GpuSample> = Vec::new();
            loop {
                let sample = source.sample(Instant::now());
                if let Ok(mut pids) = gpu_pids.lock() {
                    pids.extend(sample.processes.iter().map(|p| p.pid));
                }
                samples.push(sample);
                match stopped.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    // Stopped (or the caller is gone): one last reading, then summarise.
                    _ => break,
                }
            }
            samples.push(source.sample(Instant::now()));
            summarize_gpu(&samples, source.driver_version(), &LiveSystem)
        });
        Self { stop, thread }
    }

    fn finish(self) -> GpuSummary {
        let _ = self.stop.send(());
        self.thread
            .join()
            .unwrap_or_else(|_| GpuSummary::unavailable("the GPU reader crashed".to_string()))
    }
}

/// Waits for `duration`, or less if the user interrupts (Ctrl-C, SIGTERM): what was measured
/// until then is still reported. Shows progress on a terminal only.
async fn wait_for_window(
    duration: Duration,
    mut every_second: impl FnMut(),
) -> anyhow::Result<bool> {
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(duration.as_millis() as u64);
        bar.set_style(
            ProgressStyle::with_template("measuring {bar:30} {msg} (Ctrl-C reports early)")
                .context("progress bar template")?,
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let interrupted = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break false,
            _ = tokio::signal::ctrl_c() => break true,
            _ = terminate.recv() => break true,
            _ = second.tick() => every_second(),
            _ = tick.tick() => {
                let elapsed = started.elapsed().min(duration);
                progress.set_position(elapsed.as_millis() as u64);
                progress.set_message(format!("{:.0}/{:.0} s", elapsed.as_secs_f64(), duration.as_secs_f64()));
            }
        }
    };
    progress.finish_and_clear();
    Ok(interrupted)
}

/// Verdicts per workload (those losing most first, `top` of them) and the node's roll-up.
fn judge(workloads: Vec<WorkloadWindow>, top: usize) -> (Verdict, Vec<WorkloadReport>) {
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

pub async fn run(options: &DiagnoseOptions) -> anyhow::Result<DiagnoseReport> {
    let preflight = preflight::run()?;
    for warning in &preflight.warnings {
        tracing::warn!("{warning}");
    }
    let mut probes = KernelProbes::load(Path::new(&preflight.tracefs))?;
    for probe in probes.statuses().iter().filter(|p| !p.attached) {
        tracing::warn!(
            "probe {} is off, so there will be no {}: {}",
            probe.tracepoint,
            probe.feeds,
            probe.problem.as_deref().unwrap_or("unknown reason")
        );
    }

    let started_at = SystemTime::now();
    let gpu_pids = Arc::new(Mutex::new(HashSet::new()));
    let gpu = GpuSampler::start(
        options.nvml_library.clone(),
        options.gpu_interval,
        gpu_pids.clone(),
    );
    let mut tracked_now = HashSet::new();
    refresh_tracking(&mut probes, &mut tracked_now, &HashSet::new());
    let before = probes.snapshot().context("reading the probes' maps")?;
    let started = Instant::now();
    let interrupted = wait_for_window(options.duration, || {
        let gpu_pids = gpu_pids.lock().map(|pids| pids.clone()).unwrap_or_default();
        refresh_tracking(&mut probes, &mut tracked_now, &gpu_pids);
    })
    .await?;
    let after = probes.snapshot().context("reading the probes' maps")?;
    let elapsed = started.elapsed();
    let delta = after.since(&before);
    let window = summarize_window(&delta, elapsed, &LiveSystem, options.top);
    let mut gpu = tokio::task::spawn_blocking(move || gpu.finish())
        .await
        .context("GPU reader")?;
    let mut workloads = attribution::workload_windows(
        &delta,
        &window,
        &gpu,
        &LiveSystem,
        elapsed.as_nanos() as u64,
        &options.config.workloads,
    );
    gpu.processes.truncate(options.top);
    if let Some(name) = &options.workload {
        workloads.retain(|workload| &workload.name == name);
    }
    if let Some(pid) = options.pid {
        workloads.retain(|workload| workload.pids.contains(&pid));
    }
    let window_end_s = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let budgets = crate::budgets::evaluate_window(&options.config, &workloads, window_end_s);
    let (verdict, workloads) = judge(workloads, options.top);
    if let Some(reason) = &gpu.reason {
        tracing::info!("no GPU section: {reason}");
    }

    Ok(DiagnoseReport {
        schema_version: JSON_SCHEMA_VERSION,
        envelope_version: env!("CARGO_PKG_VERSION"),
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_default(),
        kernel: preflight.kernel_release.clone(),
        started_at: humantime::format_rfc3339_seconds(started_at).to_string(),
        duration_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        interrupted,
        probes: probes.statuses().to_vec(),
        warnings: preflight.warnings,
        window,
        gpu,
        verdict,
        workloads,
        budgets,
    })
}
