//! `envelope run`: the daemon. Every window the shared step (`app::step`) measures, judges
//! and evaluates; the daemon adds what only a service does: scheduling, budget state across
//! windows and restarts, breach events and actions, and the OTLP export.
//!
//! Signals: SIGTERM/SIGINT measure the partial last window, export it, save the budget state
//! and exit 0. SIGHUP reloads the configuration; an invalid one is refused, loudly, and the
//! running one kept.
use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use super::step::{Focus, Window, WindowStep};
pub use crate::budgets::store::{BUDGET_STATE_FILE, load_budget_states, save_budget_states};
use crate::{
    budgets::{
        self, BreachEvent, BudgetState,
        actions::{self, ActionOutcome, RateLimiter},
        cause::{RecentWindows, WindowCause},
        observe,
    },
    config::{AgentSettings, Budget, LoadedConfig, archive},
    export::{
        events::explain,
        metrics::{BudgetView, Limits, MetricsState},
        otlp::{LogEvent, OtlpExporter, OtlpSettings, metrics_request, unix_ns},
        prometheus,
    },
    host::system::{LiveSystem, host_name},
    model::vocabulary::{BreachStatus, NoDataPolicy},
};

#[derive(Debug, Default)]
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

/// Everything `run` builds before it loads the probes. `envelope check` builds exactly this
/// too, so a configuration `check` accepts is one `run` starts with.
pub struct Prepared {
    pub config: LoadedConfig,
    /// `[agent]` as the file says, before the command line's overrides (a reload compares
    /// the new file with this).
    pub file_agent: AgentSettings,
    pub state_dir: PathBuf,
    /// None when `[export] enabled = false`.
    pub exporter: Option<OtlpExporter>,
}

/// Reads and checks the configuration, applies the command line over it, and builds the
/// exporter (settings from `[export]`, then OTEL_* variables; CA file read). Needs a tokio
/// runtime (gRPC channels are built on it; they connect lazily).
pub fn prepare(options: &RunOptions) -> anyhow::Result<Prepared> {
    let mut config = match &options.config_path {
        Some(path) => crate::config::load(path)?,
        None => LoadedConfig::default(),
    };
    let file_agent = config.agent.clone();
    if let Some(window) = options.window {
        config.agent.window = crate::config::check_window(window)
            .map_err(|problem| anyhow::anyhow!("--window: {problem}"))?;
    }
    if let Some(library) = &options.nvml_library {
        config.agent.nvml_lib = Some(library.clone());
    }
    if let Some(state_dir) = &options.state_dir {
        config.agent.state_dir = state_dir.clone();
    }
    let settings = OtlpSettings::resolve(&config.export, |key| std::env::var(key).ok())?;
    let exporter = if settings.enabled {
        Some(OtlpExporter::new(settings)?)
    } else {
        None
    };
    Ok(Prepared {
        file_agent,
        state_dir: config.agent.state_dir.clone(),
        config,
        exporter,
    })
}

/// What the daemon carries from one window to the next.
struct Daemon {
    config_path: Option<PathBuf>,
    config: LoadedConfig,
    /// `[agent]` and `[export]` as the file said at start: what a reload compares against.
    started_with: (AgentSettings, crate::config::ExportConfig),
    state_dir: PathBuf,
    step: WindowStep,
    /// Actions still running (their outcome is logged when they end); awaited at shutdown.
    actions_in_flight: Vec<tokio::task::JoinHandle<()>>,
    budget_states: BTreeMap<String, BudgetState>,
    /// The Prometheus scrape endpoint's exposition, when `[export] prometheus` is on.
    prometheus: Option<prometheus::Exposition>,
    /// Each budget's last windows with where its workload's time went: what a breach event
    /// explains itself with (in memory: after a restart, from the windows since).
    recent: BTreeMap<String, RecentWindows>,
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
        .filter(|b| b.metric.is_latency())
        // Through whole nanoseconds, so 0.1 ms becomes exactly the bound 0.0001, not 1.0000000000000001e-4.
        .map(|b| (b.threshold * 1e6).round() / 1e9)
        .collect()
}

/// How many windows a breach's cause looks back on: those of the shortest burn window's short
/// half (the one that must also burn for a breach to fire), 3 to 60.
fn recent_capacity(policy: &crate::config::BudgetPolicy, window: Duration) -> usize {
    let short_s = policy
        .burn_rate_windows
        .iter()
        .map(|w| w.short_s)
        .min()
        .unwrap_or(300);
    let windows = short_s as f64 / window.as_secs_f64().max(0.001);
    (windows.round() as usize).clamp(3, 60)
}

fn limits(config: &LoadedConfig) -> Limits {
    Limits {
        workloads: config.agent.max_workloads,
        peers: config.agent.max_peers,
        devices: config.agent.max_devices,
        gpu_processes: config.agent.max_gpu_processes,
    }
}

impl Daemon {
    fn window_labels(&self) -> Vec<String> {
        self.config
            .alerting
            .burn_rate_windows
            .iter()
            .map(|w| budgets::window_label(w.long_s))
            .collect()
    }

    /// One window: measure, attribute, evaluate, act, export.
    async fn run_window(&mut self, last: bool) {
        let window = match self.step.next_window(&self.config, &Focus::default()).await {
            Ok(window) => window,
            Err(error) => {
                tracing::warn!("skipping a window: {error:#}");
                return;
            }
        };
        if let Some(reason) = &window.gpu.reason
            && !self.said_no_gpu
            && !last
        {
            tracing::info!("no GPU metrics: {reason}");
            self.said_no_gpu = true;
        }
        let node = &window.node;
        let node_key = (
            node.bottleneck.name().to_string(),
            node.workload.clone().unwrap_or_default(),
        );
        if self.last_node_verdict.as_ref() != Some(&node_key) {
            tracing::info!("node verdict: {}", node.summary);
            self.last_node_verdict = Some(node_key);
        }
        let (views, transitions) = self.evaluate_budgets(&window);
        for (budget_index, event) in transitions {
            let budget = self.config.budgets[budget_index].clone();
            self.act(&budget, &event);
        }
        if let Err(error) = save_budget_states(&self.state_dir, &self.budget_states) {
            tracing::warn!(
                "budget state not saved (a restart would start budgets afresh): {error:#}"
            );
        }
        self.metrics.add_window(&window.workloads, &window.gpu);
        self.metrics.add_engines(&window.engines);
        self.export(&window, &views, last).await;
    }

    /// Records each budget's window in its state; returns what to export and the transitions
    /// (budget index, event), already logged and queued as events.
    fn evaluate_budgets(
        &mut self,
        window: &Window,
    ) -> (Vec<BudgetView>, Vec<(usize, BreachEvent)>) {
        let at_s = window.at_unix_s();
        let labels = self.window_labels();
        let mut views = Vec::new();
        let mut transitions = Vec::new();
        for (index, (budget, result)) in self.config.budgets.iter().zip(&window.budgets).enumerate()
        {
            let policy = self.config.policy(budget);
            let state = self.budget_states.entry(budget.name.clone()).or_default();
            // Every window is evaluated, with data or without (a window without data adds no
            // event unless on_no_data = "breach"), so a breach resolves when its workload idles.
            let observation = result.observed.map(|observed| {
                let mut observation = observe(at_s, observed, budget.threshold, budget.bound);
                observation.requests = result.requests_within.zip(result.requests_beyond);
                observation
            });
            let mut transition = state.record_window(
                &budget.name,
                at_s,
                budget.threshold,
                observation.as_ref(),
                &policy,
            );
            // Where the workload's time went this window, for the cause of a breach.
            let judged = if budget.workload == "*" {
                window
                    .workloads
                    .iter()
                    .find(|j| Some(&j.window.name) == window.node.workload.as_ref())
                    .map(|j| (&j.window.time, &window.node))
            } else {
                window
                    .workloads
                    .iter()
                    .find(|j| j.window.name == budget.workload)
                    .map(|j| (&j.window.time, &j.verdict))
            };
            let cause = WindowCause::of(
                result.good,
                result.observed,
                window.elapsed.as_nanos() as u64,
                judged,
            );
            if result.good == Some(false) {
                *state
                    .bad_windows_by_cause
                    .entry(cause.bottleneck)
                    .or_default() += 1;
            }
            let recent = self.recent.entry(budget.name.clone()).or_default();
            recent.push(cause, recent_capacity(&policy, self.config.agent.window));
            if let Some(event) = transition.as_mut() {
                event.cause = recent.explain(
                    &budget.workload,
                    budget.metric,
                    budget.bound,
                    budget.threshold,
                );
                event.source = result.source.clone();
                if event.status == BreachStatus::Firing {
                    event.stage = result.overspent_stage().cloned();
                }
            }
            if let Some(silent_s) = state.silence_to_report(at_s, &policy) {
                tracing::info!(
                    "budget {:?}: no data for {} (longer than its longest burn window): its workload {:?} is idle or gone; windows without data {} (on_no_data = {:?})",
                    budget.name,
                    budgets::window_label(silent_s),
                    budget.workload,
                    match budget.on_no_data {
                        NoDataPolicy::Ignore => "add no event",
                        NoDataPolicy::Breach => "count as bad",
                    },
                    budget.on_no_data.name(),
                );
            }
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
                name: budget.name.clone(),
                workload: budget.workload.clone(),
                metric: budget.metric,
                threshold: budget.threshold,
                observed: result.observed,
                no_data: result.no_data,
                status: state.status(),
                burn_rates,
                breaches: state.breaches,
                objective: budget.objective,
                good_windows: state.good_windows,
                bad_windows: state.bad_windows,
                bad_windows_by_cause: state.bad_windows_by_cause.clone(),
            });
            if let Some(event) = transition {
                let verdict = if budget.workload == "*" {
                    Some(&window.node)
                } else {
                    window
                        .workloads
                        .iter()
                        .find(|judged| judged.window.name == budget.workload)
                        .map(|judged| &judged.verdict)
                };
                let (line, log_event) = explain(&event, result, verdict, &labels, window.at);
                match event.status {
                    BreachStatus::Firing => tracing::warn!("{line}"),
                    BreachStatus::Resolved => tracing::info!("{line}"),
                }
                self.pending_events.push(log_event);
                transitions.push((index, event));
            }
        }
        (views, transitions)
    }

    /// Runs the budget's actions for a transition, rate limited; the outcome is logged when
    /// it is known, never waited for here.
    fn act(&mut self, budget: &Budget, event: &BreachEvent) {
        if budget.actions.is_empty() {
            return;
        }
        // Per budget and direction, so a resolution is never swallowed by its own firing.
        if !self.rate_limiter.allow(
            &format!("{}/{}", event.budget, event.status),
            Instant::now(),
        ) {
            tracing::info!(
                "budget {:?}: actions skipped, the last ran less than {} ago ([alerting] action_min_interval)",
                event.budget,
                humantime::format_duration(self.config.alerting.action_min_interval)
            );
            return;
        }
        self.actions_in_flight.retain(|task| !task.is_finished());
        for action in &budget.actions {
            let handle = actions::spawn(action.clone(), event.clone(), budget.workload.clone());
            let described = action.to_string();
            let name = event.budget.clone();
            let task = tokio::spawn(async move {
                match handle.await {
                    Ok(ActionOutcome::Done { code, output })
                        if code == 0 || (200..300).contains(&code) =>
                    {
                        tracing::info!(
                            "budget {name:?}: {described} done ({code}) {}",
                            output.trim()
                        );
                    }
                    Ok(outcome) => tracing::warn!("budget {name:?}: {described}: {outcome:?}"),
                    Err(_) => tracing::warn!("budget {name:?}: {described} crashed"),
                }
            });
            self.actions_in_flight.push(task);
        }
    }

    async fn export(&mut self, window: &Window, views: &[BudgetView], last: bool) {
        let otlp_due = self.exporter.as_ref().is_some_and(|exporter| {
            last || match (exporter.settings().interval, self.last_export) {
                (Some(interval), Some(previous)) => {
                    previous.elapsed() + Duration::from_millis(100) >= interval
                }
                _ => true,
            }
        });
        // Built once for both the scrape endpoint (every window) and OTLP (when due).
        let series = (self.prometheus.is_some() || otlp_due).then(|| {
            self.metrics
                .series(self.step.latest_snapshot(), &LiveSystem, &window.gpu, views)
        });
        if let (Some(exposition), Some(series)) = (&self.prometheus, &series) {
            *exposition.write().await =
                prometheus::render(series, &host_name().unwrap_or_default());
        }
        let Some(exporter) = self.exporter.as_mut() else {
            return;
        };
        let events = std::mem::take(&mut self.pending_events);
        if !events.is_empty() || exporter.queued_events() > 0 {
            exporter.export_events(events).await;
        }
        let Some(series) = series.filter(|_| otlp_due) else {
            return;
        };
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
                let (agent, export) = &self.started_with;
                let mut deferred = Vec::new();
                for (key, changed) in [
                    ("[agent] window", config.agent.window != agent.window),
                    (
                        "[agent] gpu_interval",
                        config.agent.gpu_interval != agent.gpu_interval,
                    ),
                    ("[agent] nvml_lib", config.agent.nvml_lib != agent.nvml_lib),
                    (
                        "[agent] state_dir",
                        config.agent.state_dir != agent.state_dir,
                    ),
                    (
                        "[agent] max_*",
                        (
                            config.agent.max_workloads,
                            config.agent.max_peers,
                            config.agent.max_devices,
                            config.agent.max_gpu_processes,
                        ) != (
                            agent.max_workloads,
                            agent.max_peers,
                            agent.max_devices,
                            agent.max_gpu_processes,
                        ),
                    ),
                    ("[export]", &config.export != export),
                    (
                        "latency budget thresholds (histogram bounds)",
                        latency_thresholds_s(&config) != latency_thresholds_s(&self.config),
                    ),
                ] {
                    if changed {
                        deferred.push(key);
                    }
                }
                if !deferred.is_empty() {
                    tracing::warn!(
                        "SIGHUP: {} changed; that takes effect at the next restart (the rest is applied now)",
                        deferred.join(", ")
                    );
                }
                archive::archive_loaded(&self.state_dir, &path);
                let names: HashSet<&str> = config.budgets.iter().map(|b| b.name.as_str()).collect();
                self.budget_states
                    .retain(|name, _| names.contains(name.as_str()));
                // Keeps when each budget last acted: a reload must not let actions run again.
                self.rate_limiter
                    .set_min_interval(config.alerting.action_min_interval);
                tracing::info!(
                    "SIGHUP: reloaded {} ({} budgets)",
                    path.display(),
                    config.budgets.len()
                );
                if config.gpu.cuda_probes != self.config.gpu.cuda_probes {
                    tracing::info!(
                        "SIGHUP: CUDA probes {} (were {})",
                        config.gpu.cuda_probes.name(),
                        self.config.gpu.cuda_probes.name()
                    );
                }
                self.step.set_cuda_probes(config.gpu.cuda_probes);
                let (agent, export) = (self.config.agent.clone(), self.config.export.clone());
                self.config = config;
                // What only a restart changes stays as it was started (command line included).
                self.config.agent = agent;
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
    let Prepared {
        config,
        file_agent,
        state_dir,
        exporter,
    } = prepare(&options)?;
    if let Some(path) = &options.config_path {
        archive::archive_loaded(&state_dir, path);
    }
    match &exporter {
        Some(exporter) => {
            let settings = exporter.settings();
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
        }
        None => tracing::info!("[export] enabled = false: measuring and evaluating only"),
    }
    let prometheus = match config.export.prometheus_listen {
        None => None,
        Some(address) => {
            let exposition = prometheus::Exposition::default();
            prometheus::serve(address, exposition.clone())
                .await
                .with_context(|| {
                    format!(
                        "cannot listen for Prometheus scrapes on {address}; set [export] prometheus_listen to a free address:port, or prometheus = false"
                    )
                })?;
            tracing::info!("serving Prometheus scrapes on http://{address}/metrics");
            Some(exposition)
        }
    };

    let mut step = WindowStep::start(config.agent.nvml_lib.clone(), config.agent.gpu_interval, 10)?;
    step.set_cuda_probes(config.gpu.cuda_probes);
    step.start_engines(&config).await;
    let start_unix_ns = unix_ns(SystemTime::now());
    let budget_states = load_budget_states(&state_dir);
    let window = config.agent.window;
    let mut daemon = Daemon {
        config_path: options.config_path,
        rate_limiter: RateLimiter::new(config.alerting.action_min_interval),
        started_with: (file_agent, config.export.clone()),
        actions_in_flight: Vec::new(),
        metrics: MetricsState::new(limits(&config), &latency_thresholds_s(&config)),
        config,
        state_dir,
        step,
        budget_states,
        recent: BTreeMap::new(),
        prometheus,
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
            _ = tracking.tick() => daemon.step.every_second(),
            _ = hangup.recv() => daemon.reload(),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("stopping: measuring the last partial window and flushing the export");
    daemon.run_window(true).await;
    // Actions the last windows started finish: those running are bounded by their own
    // timeout; those still waiting for a turn past that are given up, and said so.
    let running = std::mem::take(&mut daemon.actions_in_flight);
    if !running.is_empty() {
        let limit = daemon
            .config
            .budgets
            .iter()
            .flat_map(|b| &b.actions)
            .map(|a| match a {
                crate::config::Action::Command { timeout, .. }
                | crate::config::Action::Webhook { timeout, .. } => *timeout,
            })
            .max()
            .unwrap_or_default()
            + Duration::from_secs(1);
        let deadline = tokio::time::Instant::now() + limit;
        let mut abandoned = 0;
        for task in running {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abandoned += 1;
            }
        }
        if abandoned > 0 {
            tracing::warn!(
                "stopping without {abandoned} action(s) that were still waiting for a turn or \
                 running after {}",
                humantime::format_duration(limit)
            );
        }
    }
    daemon.step.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Whether `path` names a configuration `run` would start with (used by `envelope check`).
pub fn check(path: &Path) -> anyhow::Result<Prepared> {
    prepare(&RunOptions {
        config_path: Some(path.to_path_buf()),
        ..RunOptions::default()
    })
}
