//! `envelope diagnose`: load the probes, measure one window, report.
use std::{
    io::IsTerminal as _,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use super::step::{Focus, WindowStep};
use crate::host::system::host_name;
use crate::report::{CudaProbesReport, DiagnoseReport, JSON_SCHEMA_VERSION, WorkloadReport};

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
    /// Which CUDA calls the uprobes count (the flag, else `[gpu] cuda_probes`).
    pub cuda_probes: crate::model::gpu::CudaProbes,
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

/// At most ten names, then how many more.
fn listed(names: &[String]) -> String {
    if names.is_empty() {
        return "none".to_string();
    }
    let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
    match names.len().saturating_sub(shown.len()) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

pub async fn run(options: &DiagnoseOptions) -> anyhow::Result<DiagnoseReport> {
    let started_at = SystemTime::now();
    let mut step = WindowStep::start(
        options.nvml_library.clone(),
        options.gpu_interval,
        options.top,
    )?;
    step.set_cuda_probes(options.cuda_probes);
    step.start_engines(&options.config).await;
    let interrupted = wait_for_window(options.duration, || step.every_second()).await?;
    let probes = step.probe_statuses();
    let (libraries, problem) = step.cuda_libraries();
    let cuda_probes = CudaProbesReport {
        mode: options.cuda_probes,
        libraries,
        problem,
    };
    let preflight = step.preflight.clone();
    let focus = Focus {
        workload: options.workload.clone(),
        pid: options.pid,
    };
    let mut window = step.finish(&options.config, &focus).await?;
    if window.workloads.is_empty() {
        if let Some(name) = &options.workload {
            anyhow::bail!(
                "no workload named {name:?} ran during the window; workloads seen: {}",
                listed(&window.workloads_seen)
            );
        }
        if let Some(pid) = options.pid {
            match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                // Alive, but it did nothing the probes measure: no bottleneck, and that said.
                Ok(comm) => {
                    window.node.summary = format!(
                        "none - process {pid} ({}) did nothing envelope measures during the window",
                        comm.trim()
                    );
                }
                Err(_) => anyhow::bail!(
                    "no process {pid} ran during the window (and none has that pid now); check the pid, e.g. with `pgrep -a NAME`"
                ),
            }
        }
    }
    let mut gpu = window.gpu;
    gpu.processes.truncate(options.top);
    if let Some(reason) = &gpu.reason {
        tracing::info!("no GPU section: {reason}");
    }
    let workloads = window
        .workloads
        .into_iter()
        .take(options.top)
        .map(|judged| WorkloadReport {
            time: judged.window.time.shares(),
            name: judged.window.name,
            pids: judged.window.pids,
            verdict: judged.verdict,
        })
        .collect();

    Ok(DiagnoseReport {
        schema_version: JSON_SCHEMA_VERSION,
        envelope_version: env!("CARGO_PKG_VERSION"),
        host: host_name().unwrap_or_default(),
        kernel: preflight.kernel_release,
        started_at: humantime::format_rfc3339_seconds(started_at).to_string(),
        duration_s: (window.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        interrupted,
        probes,
        warnings: preflight.warnings,
        window: window.summary,
        gpu,
        verdict: window.node,
        workloads,
        budgets: window.budgets,
        engines: window.engines,
        cuda_probes,
    })
}
