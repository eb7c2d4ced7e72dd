//! `envelope diagnose`: load the probes, measure one window, report.
use std::{
    io::IsTerminal as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use crate::{
    aggregation::{
        gpu::{GpuSummary, summarize_gpu},
        window::summarize_window,
    },
    preflight,
    report::{DiagnoseReport, JSON_SCHEMA_VERSION},
    sources::{
        gpu::{GpuSample, NvmlSource, load_nvml},
        probes::KernelProbes,
        system::LiveSystem,
    },
};

#[derive(Clone, Debug)]
pub struct DiagnoseOptions {
    pub duration: Duration,
    /// How many processes and peers to list.
    pub top: usize,
    /// NVML library to load instead of the driver's libnvidia-ml.so.1.
    pub nvml_library: Option<PathBuf>,
    /// How often GPUs are read during the window.
    pub gpu_interval: Duration,
}

/// Reads the GPUs on a thread of its own (NVML calls block) until told to stop; one reading
/// at the start and one at the end, and one per interval between.
struct GpuSampler {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<GpuSummary>,
}

impl GpuSampler {
    fn start(library: Option<PathBuf>, interval: Duration) -> Self {
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
                samples.push(source.sample(Instant::now()));
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
async fn wait_for_window(duration: Duration) -> anyhow::Result<bool> {
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
    let interrupted = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break false,
            _ = tokio::signal::ctrl_c() => break true,
            _ = terminate.recv() => break true,
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

pub async fn run(options: &DiagnoseOptions) -> anyhow::Result<DiagnoseReport> {
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

    let started_at = SystemTime::now();
    let gpu = GpuSampler::start(options.nvml_library.clone(), options.gpu_interval);
    let before = probes.snapshot().context("reading the probes' maps")?;
    let started = Instant::now();
    let interrupted = wait_for_window(options.duration).await?;
    let after = probes.snapshot().context("reading the probes' maps")?;
    let elapsed = started.elapsed();
    let mut gpu = tokio::task::spawn_blocking(move || gpu.finish())
        .await
        .context("GPU reader")?;
    gpu.processes.truncate(options.top);
    if let Some(reason) = &gpu.reason {
        tracing::info!("no GPU section: {reason}");
    }

    let window = summarize_window(&after.since(&before), elapsed, &LiveSystem, options.top);
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
    })
}
