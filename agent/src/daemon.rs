//! `envelope run`: the daemon. Every window it reads the probes and the GPUs, attributes
//! each workload's lost time, evaluates the budgets (firing and resolving breaches, running
//! their actions) and exports metrics and breach events over OTLP.
//!
//! Signals: SIGTERM/SIGINT measure the partial last window, export it, save the budget state
//! and exit 0. SIGHUP reloads the configuration; an invalid one is refused, loudly, and the
//! running one kept.
use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    actions::{self, ActionOutcome, RateLimiter},
    aggregation::{KernelSnapshot, gpu::GpuSummary, window::summarize_window},
    attribution::{self, Rules, Verdict, WorkloadWindow, decide, roll_up},
    budgets::{self, BreachEvent, BreachStatus, BudgetResult, BudgetState, observe},
    config::LoadedConfig,
    config_archive,
    exporters::{
        metrics::{BudgetView, Limits, MetricsState},
        otlp::{LogEvent, OtlpExporter, OtlpSettings, metrics_request},
    },
    pipeline::{GpuSampler, load_probes, refresh_tracking},
    sources::{probes::KernelProbes, system::LiveSystem},
};

/// File under the state directory holding every budget's state between runs.
pub const BUDGET_STATE_FILE: &str = "budget-state.json";

#[derive(Debug)]
pub struct RunOptions {
    /// None: no workloads or budgets, node-level measurement and export only.
    pub config_path: Option<PathBuf>,
    /// Overrides `[agent] state_dir`.
    pub state_dir: Option<PathBuf>,
    /// Overrides `[agent] window`.
    pub window: Option<Duration>,
    /// Overrides `[agent] nvml_lib`.
    pub nvml_library: Option<PathBuf>,
}

fn unix_ns(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn load_config(path: Option<&Path>) -> anyhow::Result<LoadedConfig> {
    match path {
        Some(path) => Ok(crate::config::load(path)?),
        None => Ok(LoadedConfig::default()),
    }
}

/// Reads the saved budget states; a missing file is a first start, a damaged one is logged
/// and replaced (the agent must start either way).
pub fn load_budget_states(state_dir: &Path) -> BTreeMap<String, BudgetState> {
    let path = state_dir.join(BUDGET_STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(
                "ignoring the damaged budget state {} ({error}); budgets start afresh",
                path.display()
            );
            BTreeMap::new()
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(error) => {
            tracing::warn!(
                "cannot read the budget state {} ({error}); budgets start afresh",
                path.display()
            );
            BTreeMap::new()
        }
    }
}

/// Writes the budget states atomically (temp file, then rename).
pub fn save_budget_states(
    state_dir: &Path,
    states: &BTreeMap<String, BudgetState>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = state_dir.join(BUDGET_STATE_FILE);
    let temporary = state_dir.join(format!("{BUDGET_STATE_FILE}.tmp"));
    std::fs::write(&temporary, serde_json::to_vec_pretty(states)?)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, &path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// The breach event as one line for the log, and as an OTLP log event.
pub fn explain(
    event: &BreachEvent,
    result: &BudgetResult,
    verdict: Option<&Verdict>,
    window_labels: &[String],
    at: SystemTime,
) -> (String, LogEvent) {
    let status = match event.status {
        BreachStatus::Firing => "firing",
        BreachStatus::Ok => "resolved",
    };
    let relation = match (result.bound, event.status) {
        (budgets::Bound::Ceiling, BreachStatus::Firing) => "above its ceiling",
        (budgets::Bound::Floor, BreachStatus::Firing) => "below its floor",
        (_, BreachStatus::Ok) => "within its bound",
    };
    let burn: Vec<String> = event
        .burn_rates
        .iter()
        .zip(window_labels)
        .map(|((_, long, short), label)| format!("{long} over {label} (short window {short})"))
        .collect();
    let verdict_text = verdict.map_or_else(
        || "no verdict".to_string(),
        |v| {
            let offender = v
                .evidence
                .first()
                .map_or(String::new(), |e| format!("; {e}"));
            format!("{}{offender}", v.summary)
        },
    );
    let line = format!(
        "budget {:?} {status} for workload {:?}: {} = {} {relation} {} ; burn rate {}; verdict: {verdict_text}; breach id {}",
        event.budget,
        result.workload,
        result.metric,
        event.observed,
        event.threshold,
        burn.join(", "),
        event.breach_id,
    );
    let mut attributes = vec![
        ("envelope.budget".to_string(), event.budget.clone()),
        ("envelope.workload".to_string(), result.workload.clone()),
        ("envelope.budget.metric".to_string(), result.metric.clone()),
        ("envelope.breach.id".to_string(), event.breach_id.clone()),
        ("envelope.breach.status".to_string(), status.to_string()),
        (
            "envelope.budget.observed".to_string(),
            event.observed.to_string(),
        ),
        (
            "envelope.budget.threshold".to_string(),
            event.threshold.to_string(),
        ),
    ];
    for ((_, long, _), label) in event.burn_rates.iter().zip(window_labels) {
        attributes.push((format!("envelope.burn_rate.{label}"), long.to_string()));
    }
    if let Some(verdict) = verdict {
        attributes.push((
            "envelope.bottleneck".to_string(),
            verdict.bottleneck.name().to_string(),
        ));
        if let Some(offender) = verdict.evidence.first() {
            attributes.push(("envelope.top_offender".to_string(), offender.clone()));
        }
    }
    let firing = event.status == BreachStatus::Firing;
    let log_event = LogEvent {
        time_unix_ns: unix_ns(at),
        event_name: "envelope.budget.breach",
        severity_number: if firing { 13 } else { 9 },
        severity_text: if firing { "WARN" } else { "INFO" },
        body: line.clone(),
        attributes,
    };
    (line, log_event)
}

/// What the daemon carries from one window to the next.
struct Daemon {
    config_path: Option<PathBuf>,
    config: LoadedConfig,
    state_dir: PathBuf,
    probes: KernelProbes,
    gpu: GpuSampler,
    gpu_pids: Arc<Mutex<HashSet<u32>>>,
    tracked: HashSet<u32>,
    previous: KernelSnapshot,
    window_started: Instant,
    budget_states: BTreeMap<String, BudgetState>,
    rate_limiter: RateLimiter,
    metrics: MetricsState,
    exporter: Option<OtlpExporter>,
    start_unix_ns: u64,
    last_export: Option<Instant>,
    pending_events: Vec<LogEvent>,
    said_no_gpu: bool,
    last_node_verdict: Option<(String, String)>,
}

/// Budget thresholds on latency metrics, in seconds, for the histograms' bounds.
fn latency_thresholds_s(config: &LoadedConfig) -> Vec<f64> {
    config
        .budgets
        .iter()
        .filter(|b| b.metric.ends_with("_ms") && b.metric.contains("p"))
        .filter_map(|b| b.max.or(b.min))
        // Through whole nanoseconds, so 0.1 ms becomes exactly the bound 0.0001, not 1.0000000000000001e-4.
        .map(|ms| (ms * 1e6).round() / 1e9)
        .collect()
}

fn limits(config: &LoadedConfig) -> Limits {
    Limits {
        workloads: config.agent.max_workloads,
        peers: config.agent.max_peers,
        devices: config.agent.max_devices,
        gpu_processes: config.agent.max_gpu_processes,
    }
}

fn window_label(seconds: u64) -> String {
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

impl Daemon {
    fn window_labels(&self) -> Vec<String> {
        self.config
            .policy
            .burn_rate_windows
            .iter()
            .map(|w| window_label(w.long_s))
            .collect()
    }

    /// One window: measure, attribute, evaluate, act, export.
    async fn run_window(&mut self, last: bool) {
        let now_snapshot = match self.probes.snapshot() {
            Ok(snapshot) => snapshot,
            Err(error) => {
                tracing::warn!("skipping a window: cannot read the probes' maps: {error:#}");
                return;
            }
        };
        let elapsed = self.window_started.elapsed();
        self.window_started = Instant::now();
        let delta = now_snapshot.since(&self.previous);
        let gpu = self.gpu.take_window().await;
        if let Some(reason) = &gpu.reason
            && !self.said_no_gpu
            && !last
        {
            tracing::info!("no GPU metrics: {reason}");
            self.said_no_gpu = true;
        }
        let window = summarize_window(&delta, elapsed, &LiveSystem, 10);
        let workloads = attribution::workload_windows(
            &delta,
            &window,
            &gpu,
            &LiveSystem,
            elapsed.as_nanos() as u64,
            &self.config.workloads,
        );
        let rules = Rules::default();
        let judged: Vec<(WorkloadWindow, Verdict)> = workloads
            .iter()
            .map(|w| (w.clone(), decide(w, &rules)))
            .collect();
        let node = roll_up(&judged.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>());
        let node_key = (
            node.bottleneck.name().to_string(),
            node.workload.clone().unwrap_or_default(),
        );
        if self.last_node_verdict.as_ref() != Some(&node_key) {
            tracing::info!("node verdict: {}", node.summary);
            self.last_node_verdict = Some(node_key);
        }
        let at = SystemTime::now();
        let at_s = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let results = budgets::evaluate_window(&self.config, &workloads, at_s);
        let labels = self.window_labels();
        let mut views = Vec::new();
        for (index, result) in results.iter().enumerate() {
            let budget = &self.config.budgets[index];
            let state = self.budget_states.entry(result.name.clone()).or_default();
            let mut policy = self.config.policy.clone();
            policy.objective = budget.objective;
            let transition = result.observed.and_then(|observed| {
                state.record(
                    &result.name,
                    &observe(at_s, observed, result.threshold, result.bound),
                    &policy,
                )
            });
            let burn_rates: Vec<(String, f64)> = policy
                .burn_rate_windows
                .iter()
                .zip(&labels)
                .map(|(w, label)| {
                    let rate = budgets::burn_rate(&state.history, at_s, w.long_s, budget.objective)
                        .unwrap_or(0.0);
                    (label.clone(), (rate * 1000.0).round() / 1000.0)
                })
                .collect();
            views.push(BudgetView {
                name: result.name.clone(),
                workload: result.workload.clone(),
                metric: result.metric.clone(),
                threshold: result.threshold,
                observed: result.observed,
                status: state.status(),
                burn_rates,
                breaches: state.breaches,
                objective: budget.objective,
                good_windows: state.good_windows,
                bad_windows: state.bad_windows,
            });
            if let Some(event) = transition {
                let verdict = if result.workload == "*" {
                    Some(&node)
                } else {
                    judged
                        .iter()
                        .find(|(w, _)| w.name == result.workload)
                        .map(|(_, v)| v)
                };
                let (line, log_event) = explain(&event, result, verdict, &labels, at);
                match event.status {
                    BreachStatus::Firing => tracing::warn!("{line}"),
                    BreachStatus::Ok => tracing::info!("{line}"),
                }
                self.pending_events.push(log_event);
                self.act(index, &event, &result.workload);
            }
        }
        if let Err(error) = save_budget_states(&self.state_dir, &self.budget_states) {
            tracing::warn!(
                "budget state not saved (a restart would start budgets afresh): {error:#}"
            );
        }
        self.metrics.add_window(&judged, &gpu);
        self.export(&now_snapshot, &gpu, &views, last).await;
        self.previous = now_snapshot;
    }

    /// Keeps the kernel's set of tracked processes current (every second, so a process that
    /// starts mid-window is counted from then on).
    fn refresh_tracking(&mut self) {
        let gpu_pids = self.gpu_pids.lock().map(|p| p.clone()).unwrap_or_default();
        refresh_tracking(&mut self.probes, &mut self.tracked, &gpu_pids);
    }

    /// Runs the budget's actions for a transition, rate limited, each on its own thread; the
    /// outcome is logged when it is known, never waited for here.
    fn act(&mut self, budget_index: usize, event: &BreachEvent, workload: &str) {
        let Some(actions) = self.config.actions.get(budget_index) else {
            return;
        };
        if actions.is_empty() {
            return;
        }
        let status = match event.status {
            BreachStatus::Firing => "firing",
            BreachStatus::Ok => "resolved",
        };
        // Per budget and direction, so a resolution is never swallowed by its own firing.
        if !self
            .rate_limiter
            .allow(&format!("{}/{status}", event.budget), Instant::now())
        {
            tracing::info!(
                "budget {:?}: actions skipped, the last ran less than {} ago ([alerting] action_min_interval)",
                event.budget,
                humantime::format_duration(self.config.action_min_interval)
            );
            return;
        }
        for action in actions {
            let handle = actions::spawn(action.clone(), event.clone(), workload.to_string());
            let described = match action {
                actions::Action::Command { argv, .. } => format!("command {argv:?}"),
                actions::Action::Webhook { url, .. } => format!("webhook {url}"),
            };
            let budget = event.budget.clone();
            tokio::task::spawn_blocking(move || match handle.join() {
                Ok(ActionOutcome::Done { code, output })
                    if code == 0 || (200..300).contains(&code) =>
                {
                    tracing::info!(
                        "budget {budget:?}: {described} done ({code}) {}",
                        output.trim()
                    );
                }
                Ok(outcome) => tracing::warn!("budget {budget:?}: {described}: {outcome:?}"),
                Err(_) => tracing::warn!("budget {budget:?}: {described} crashed"),
            });
        }
    }

    async fn export(
        &mut self,
        kernel: &KernelSnapshot,
        gpu: &GpuSummary,
        views: &[BudgetView],
        last: bool,
    ) {
        let Some(exporter) = self.exporter.as_mut() else {
            return;
        };
        let due = last
            || match (exporter.settings().interval, self.last_export) {
                (Some(interval), Some(previous)) => {
                    previous.elapsed() + Duration::from_millis(100) >= interval
                }
                _ => true,
            };
        let events = std::mem::take(&mut self.pending_events);
        if !events.is_empty() || exporter.queued_events() > 0 {
            exporter.export_events(events).await;
        }
        if !due {
            return;
        }
        let series = self.metrics.series(kernel, &LiveSystem, gpu, views);
        let request = metrics_request(
            exporter.settings(),
            &series,
            self.start_unix_ns,
            unix_ns(SystemTime::now()),
        );
        exporter.export_metrics(&request).await;
        self.last_export = Some(Instant::now());
    }

    /// SIGHUP: a valid configuration replaces the running one (and is archived); an invalid
    /// one is refused and the running one kept.
    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            tracing::warn!("SIGHUP: no --config was given, nothing to reload");
            return;
        };
        match crate::config::load(&path) {
            Ok(config) => {
                if config.agent.window != self.config.agent.window
                    || config.export != self.config.export
                    || config.agent.state_dir != self.config.agent.state_dir
                {
                    tracing::warn!(
                        "SIGHUP: [agent] window/state_dir and [export] changes take effect at the next restart"
                    );
                }
                config_archive::archive_loaded(&self.state_dir, &path);
                let names: HashSet<&str> = config.budgets.iter().map(|b| b.name.as_str()).collect();
                self.budget_states
                    .retain(|name, _| names.contains(name.as_str()));
                self.rate_limiter = RateLimiter::new(config.action_min_interval);
                tracing::info!(
                    "SIGHUP: reloaded {} ({} budgets)",
                    path.display(),
                    config.budgets.len()
                );
                let (window, export) = (self.config.agent.window, self.config.export.clone());
                self.config = config;
                self.config.agent.window = window;
                self.config.export = export;
            }
            Err(error) => tracing::error!(
                "SIGHUP: refused the new configuration, still running the previous one: {error} (check it with `envelope check --config {}`)",
                path.display()
            ),
        }
    }
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let mut config = load_config(options.config_path.as_deref())?;
    if let Some(window) = options.window {
        config.agent.window = window;
    }
    if let Some(library) = options.nvml_library {
        config.agent.nvml_lib = Some(library);
    }
    let state_dir = options
        .state_dir
        .clone()
        .unwrap_or_else(|| config.agent.state_dir.clone());
    if let Some(path) = &options.config_path {
        config_archive::archive_loaded(&state_dir, path);
    }
    let settings = OtlpSettings::resolve(&config.export, |key| std::env::var(key).ok())?;
    let exporter = if settings.enabled {
        tracing::info!(
            "exporting OTLP ({:?}) to {} every {}",
            settings.protocol,
            settings.metrics_url,
            humantime::format_duration(
                settings
                    .interval
                    .unwrap_or(config.agent.window)
                    .max(config.agent.window)
            )
        );
        Some(OtlpExporter::new(settings)?)
    } else {
        tracing::info!("[export] enabled = false: measuring and evaluating only");
        None
    };

    let (_preflight, mut probes) = load_probes()?;
    let start_unix_ns = unix_ns(SystemTime::now());
    let gpu_pids = Arc::new(Mutex::new(HashSet::new()));
    let gpu = GpuSampler::start(
        config.agent.nvml_lib.clone(),
        config.agent.gpu_interval,
        gpu_pids.clone(),
    );
    let mut tracked = HashSet::new();
    refresh_tracking(&mut probes, &mut tracked, &HashSet::new());
    let previous = probes.snapshot().context("reading the probes' maps")?;
    let budget_states = load_budget_states(&state_dir);
    let window = config.agent.window;
    let mut daemon = Daemon {
        config_path: options.config_path,
        rate_limiter: RateLimiter::new(config.action_min_interval),
        metrics: MetricsState::new(limits(&config), &latency_thresholds_s(&config)),
        config,
        state_dir,
        probes,
        gpu,
        gpu_pids,
        tracked,
        previous,
        window_started: Instant::now(),
        budget_states,
        exporter,
        start_unix_ns,
        last_export: None,
        pending_events: Vec::new(),
        said_no_gpu: false,
        last_node_verdict: None,
    };
    tracing::info!(
        "envelope {} running: window {}, {} budgets, state in {}",
        env!("CARGO_PKG_VERSION"),
        humantime::format_duration(window),
        daemon.config.budgets.len(),
        daemon.state_dir.display()
    );

    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + window, window);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tracking = tokio::time::interval(Duration::from_secs(1));
    tracking.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticks.tick() => daemon.run_window(false).await,
            _ = tracking.tick() => daemon.refresh_tracking(),
            _ = hangup.recv() => daemon.reload(),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("stopping: measuring the last partial window and flushing the export");
    daemon.run_window(true).await;
    let Daemon { gpu, .. } = daemon;
    gpu.finish().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Bottleneck;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("envelope-daemon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn budget_state_round_trips_and_a_damaged_file_starts_afresh() {
        let dir = scratch("state");
        assert!(load_budget_states(&dir).is_empty());
        let mut states = BTreeMap::new();
        states.insert(
            "p95".to_string(),
            BudgetState {
                history: [(10, false), (20, true)].into(),
                firing_since_s: Some(10),
                breaches: 3,
                bad_windows: 1,
                good_windows: 1,
                ..BudgetState::default()
            },
        );
        save_budget_states(&dir, &states).unwrap();
        assert_eq!(load_budget_states(&dir), states);
        std::fs::write(dir.join(BUDGET_STATE_FILE), b"{ not json").unwrap();
        assert!(load_budget_states(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_breach_event_explains_itself() {
        let event = BreachEvent {
            budget: "loader p95".into(),
            status: BreachStatus::Firing,
            breach_id: "loader p95@1800".into(),
            observed: 84.0,
            threshold: 10.0,
            burn_rates: vec![(3600, 20.0, 30.0)],
        };
        let result = BudgetResult {
            name: "loader p95".into(),
            workload: "loader".into(),
            metric: "storage_p95_ms".into(),
            bound: budgets::Bound::Ceiling,
            threshold: 10.0,
            observed: Some(84.0),
            good: Some(false),
        };
        let verdict = Verdict {
            bottleneck: Bottleneck::Storage,
            confidence: 0.9,
            workload: Some("loader".into()),
            pid: Some(42),
            summary: "storage - loader (pid 42) spent 70% blocked on nvme0n1".into(),
            evidence: vec!["nvme0n1: P95 84 ms".into()],
            share: 0.7,
        };
        let at = UNIX_EPOCH + Duration::from_secs(1800);
        let (line, log) = explain(&event, &result, Some(&verdict), &["1h".into()], at);
        assert_eq!(
            line,
            "budget \"loader p95\" firing for workload \"loader\": storage_p95_ms = 84 above its ceiling 10 ; burn rate 20 over 1h (short window 30); verdict: storage - loader (pid 42) spent 70% blocked on nvme0n1; nvme0n1: P95 84 ms; breach id loader p95@1800"
        );
        assert_eq!(log.severity_number, 13);
        assert_eq!(log.time_unix_ns, 1_800_000_000_000);
        let attribute = |key: &str| {
            log.attributes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(attribute("envelope.breach.status"), Some("firing"));
        assert_eq!(attribute("envelope.burn_rate.1h"), Some("20"));
        assert_eq!(attribute("envelope.bottleneck"), Some("storage"));
        assert_eq!(
            attribute("envelope.top_offender"),
            Some("nvme0n1: P95 84 ms")
        );
    }
}
