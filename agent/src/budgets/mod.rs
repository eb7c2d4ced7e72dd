//! Performance budgets ("inference envelopes"): per-window good/bad, multi-window burn rates
//! and a breach state machine with hysteresis. Pure: windows of observations in, states and
//! transition events out; the daemon feeds it and persists [`BudgetState`].
//!
//! Burn rates follow the SRE definition: bad events over all events in each window, one event
//! per evaluation window that had data. A window without data adds no event (unless the
//! budget says `on_no_data = "breach"`, when it adds a bad one), and a burn window holding no
//! event burns at 0. Every window is evaluated, with or without data, so a firing breach
//! resolves once no alerting pair holds for `leave_after` evaluations, also when its workload
//! went idle or exited.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub mod actions;
pub mod cause;
pub mod store;

use crate::{
    analysis::{
        attribution::{DeviceEvidence, TimeBreakdown, WorkloadWindow},
        engines::EngineSummary,
    },
    config::{Budget, LoadedConfig, Pricing},
};
pub use crate::{
    config::{BudgetPolicy, BurnRateWindow, DEFAULT_BURN_RATE_WINDOWS},
    model::vocabulary::{
        Bottleneck, Bound, BreachStatus, BudgetMetric, NoDataPolicy, ObjectiveBasis,
    },
};

/// A window's observation for one budget: observed vs threshold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Window end, seconds since the Unix epoch.
    pub at_s: u64,
    pub observed: f64,
    pub threshold: f64,
    /// True when the observation is within the budget.
    pub good: bool,
    /// Budgets that count requests: the window's requests within the bound and beyond it.
    #[serde(default)]
    pub requests: Option<(u64, u64)>,
}

pub fn observe(at_s: u64, observed: f64, threshold: f64, bound: Bound) -> Observation {
    let good = match bound {
        Bound::Ceiling => observed <= threshold,
        Bound::Floor => observed >= threshold,
    };
    Observation {
        at_s,
        observed,
        threshold,
        good,
        requests: None,
    }
}

/// What a budget remembers between windows (and across restarts, serialised).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetState {
    /// Good/bad per window, oldest first, bounded by the longest burn-rate window.
    pub history: VecDeque<(u64, bool)>,
    pub firing_since_s: Option<u64>,
    pub consecutive_alerting: u32,
    pub consecutive_quiet: u32,
    /// Breaches fired so far (a counter for metrics).
    pub breaches: u64,
    /// Windows evaluated so far, good and bad (counters for fleet-side burn-rate rules).
    #[serde(default)]
    pub good_windows: u64,
    #[serde(default)]
    pub bad_windows: u64,
    /// End of the last window that had data (None: none yet). Older state files lack it.
    #[serde(default)]
    pub last_data_s: Option<u64>,
    /// Evaluations in a row without data.
    #[serde(default)]
    pub consecutive_no_data: u32,
    /// The long silence was logged (once per silence).
    #[serde(default)]
    pub silence_reported: bool,
    /// Bad windows so far by the class that held the workload back in each (`model`,
    /// `storage`, `network`, `cpu`, `none`): which cause burned the error budget.
    #[serde(default)]
    pub bad_windows_by_cause: std::collections::BTreeMap<Bottleneck, u64>,
    /// Budgets that count requests: (window end, requests within the bound, beyond it),
    /// bounded like `history`.
    #[serde(default)]
    pub request_history: VecDeque<(u64, u64, u64)>,
}

/// The burn rate over the last `span_s` seconds counting requests: the share of requests
/// beyond the bound over the error budget. None without a request in the span.
pub fn request_burn_rate(
    history: &VecDeque<(u64, u64, u64)>,
    now_s: u64,
    span_s: u64,
    objective: f64,
) -> Option<f64> {
    let (good, bad) = history
        .iter()
        .filter(|(at, _, _)| at.saturating_add(span_s) > now_s && *at <= now_s)
        .fold((0u64, 0u64), |(good, bad), (_, g, b)| (good + g, bad + b));
    let error_budget = (1.0 - objective).max(1e-9);
    (good + bad > 0).then(|| bad as f64 / (good + bad) as f64 / error_budget)
}

/// A state change, explained.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreachEvent {
    pub budget: String,
    pub status: BreachStatus,
    /// Stable for the life of one breach: the budget's name and when it started firing.
    pub breach_id: String,
    /// None when the window had no data (the workload was idle or gone).
    pub observed: Option<f64>,
    pub threshold: f64,
    /// Burn rate per configured window pair: (long window s, long burn, short burn).
    pub burn_rates: Vec<(u64, f64, f64)>,
    /// Why it fired or resolved, in words.
    pub reason: String,
    /// The bad windows behind it and where the workload's time went in them (filled by the
    /// daemon, which remembers the recent windows).
    pub cause: Option<cause::BreachCause>,
    /// Where the budget's figure came from, when it has two sources ("engine, vllm").
    pub source: Option<String>,
    /// An envelope's breach: the stage that overspent its allocation the most in the window
    /// that fired it.
    pub stage: Option<StageResult>,
}

/// "1h", "5m", "3days": a burn window as the configuration writes it.
pub fn window_label(seconds: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(seconds)).to_string()
}

/// The burn rate over the last `span_s` seconds ending at `now_s`: the share of bad windows
/// divided by the error budget. None without any window in the span.
pub fn burn_rate(
    history: &VecDeque<(u64, bool)>,
    now_s: u64,
    span_s: u64,
    objective: f64,
) -> Option<f64> {
    let (bad, total) = history
        .iter()
        .filter(|(at, _)| at.saturating_add(span_s) > now_s && *at <= now_s)
        .fold((0u64, 0u64), |(bad, total), (_, good)| {
            (bad + u64::from(!good), total + 1)
        });
    let error_budget = (1.0 - objective).max(1e-9);
    (total > 0).then(|| bad as f64 / total as f64 / error_budget)
}

impl BudgetState {
    /// Adds a window's observation and returns the transition it causes, if any.
    pub fn record(
        &mut self,
        name: &str,
        observation: &Observation,
        policy: &BudgetPolicy,
    ) -> Option<BreachEvent> {
        self.record_window(
            name,
            observation.at_s,
            observation.threshold,
            Some(observation),
            policy,
        )
    }

    /// Evaluates one window ending at `now`, with its observation or without data, and
    /// returns the transition it causes, if any.
    pub fn record_window(
        &mut self,
        name: &str,
        now: u64,
        threshold: f64,
        observation: Option<&Observation>,
        policy: &BudgetPolicy,
    ) -> Option<BreachEvent> {
        let mut event_good = match (observation, policy.on_no_data) {
            (Some(observation), _) => Some(observation.good),
            (None, NoDataPolicy::Ignore) => None,
            (None, NoDataPolicy::Breach) => Some(false),
        };
        let counts_requests = policy.basis == ObjectiveBasis::Requests;
        if counts_requests {
            // The events are the window's requests: a window without any adds none.
            match observation.and_then(|o| o.requests) {
                Some((good, bad)) if good + bad > 0 => {
                    self.request_history.push_back((now, good, bad));
                }
                _ if observation.is_some() => event_good = None,
                _ => {}
            }
        }
        if let Some(good) = event_good {
            self.history.push_back((now, good));
            if good {
                self.good_windows += 1;
            } else {
                self.bad_windows += 1;
            }
        }
        if observation.is_some() {
            self.last_data_s = Some(now);
            self.consecutive_no_data = 0;
            self.silence_reported = false;
        } else {
            self.consecutive_no_data += 1;
        }
        let keep_s = policy
            .burn_rate_windows
            .iter()
            .map(|w| w.long_s)
            .max()
            .unwrap_or(0);
        while self
            .history
            .front()
            .is_some_and(|(at, _)| at.saturating_add(keep_s) < now)
        {
            self.history.pop_front();
        }
        while self
            .request_history
            .front()
            .is_some_and(|(at, _, _)| at.saturating_add(keep_s) < now)
        {
            self.request_history.pop_front();
        }
        let rate = |span_s: u64| {
            if counts_requests {
                request_burn_rate(&self.request_history, now, span_s, policy.objective)
            } else {
                burn_rate(&self.history, now, span_s, policy.objective)
            }
            .unwrap_or(0.0)
        };
        let burn_rates: Vec<(u64, f64, f64)> = policy
            .burn_rate_windows
            .iter()
            .map(|w| {
                let long = rate(w.long_s);
                let short = rate(w.short_s);
                (
                    w.long_s,
                    (long * 1000.0).round() / 1000.0,
                    (short * 1000.0).round() / 1000.0,
                )
            })
            .collect();
        let alerting_pair = policy
            .burn_rate_windows
            .iter()
            .zip(&burn_rates)
            .find(|(w, (_, long, short))| *long >= w.factor && *short >= w.factor);
        // A window without an event is no new evidence of a breach: it cannot bring a breach
        // closer to firing (old bad events still in the short window would otherwise fire it
        // while the workload is idle), but a quiet one counts toward resolving.
        match (alerting_pair.is_some(), event_good.is_some()) {
            (true, true) => {
                self.consecutive_alerting += 1;
                self.consecutive_quiet = 0;
            }
            (true, false) => {}
            (false, _) => {
                self.consecutive_quiet += 1;
                self.consecutive_alerting = 0;
            }
        }
        let event = |status, since: u64, reason: String| BreachEvent {
            budget: name.to_string(),
            status,
            breach_id: format!("{name}@{since}"),
            observed: observation.map(|o| o.observed),
            threshold,
            burn_rates: burn_rates.clone(),
            reason,
            cause: None,
            source: None,
            stage: None,
        };
        match self.firing_since_s {
            None if self.consecutive_alerting >= policy.enter_after => {
                self.firing_since_s = Some(now);
                self.breaches += 1;
                let reason = alerting_pair.map_or_else(String::new, |(w, (_, long, short))| {
                    format!(
                        "burn rate {long} over {} and {short} over {} reached {}",
                        window_label(w.long_s),
                        window_label(w.short_s),
                        w.factor
                    )
                });
                let reason = if observation.is_none() && policy.on_no_data == NoDataPolicy::Breach {
                    format!("{reason} (no data counts as bad: on_no_data = \"breach\")")
                } else {
                    reason
                };
                Some(event(BreachStatus::Firing, now, reason))
            }
            Some(since) if self.consecutive_quiet >= policy.leave_after => {
                self.firing_since_s = None;
                let reason = if self.consecutive_no_data >= self.consecutive_quiet {
                    match self.last_data_s {
                        Some(last) => {
                            format!("no data for {}", window_label(now.saturating_sub(last)))
                        }
                        None => "no data".to_string(),
                    }
                } else {
                    let pairs: Vec<String> = policy
                        .burn_rate_windows
                        .iter()
                        .map(|w| format!("{}/{}", window_label(w.long_s), window_label(w.short_s)))
                        .collect();
                    format!("burn rates below their factors in {}", pairs.join(", "))
                };
                Some(event(BreachStatus::Resolved, since, reason))
            }
            _ => None,
        }
    }

    /// True once, when the budget has had no data for longer than its longest burn window
    /// after having had some (the daemon logs it).
    pub fn silence_to_report(&mut self, now: u64, policy: &BudgetPolicy) -> Option<u64> {
        let longest = policy.burn_rate_windows.iter().map(|w| w.long_s).max()?;
        let silent_s = now.checked_sub(self.last_data_s?)?;
        if self.consecutive_no_data == 0 || silent_s <= longest || self.silence_reported {
            return None;
        }
        self.silence_reported = true;
        Some(silent_s)
    }

    pub fn status(&self) -> BreachStatus {
        if self.firing_since_s.is_some() {
            BreachStatus::Firing
        } else {
            BreachStatus::Resolved
        }
    }
}

/// One budget evaluated on one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BudgetResult {
    pub name: String,
    pub workload: String,
    pub metric: BudgetMetric,
    pub bound: Bound,
    pub threshold: f64,
    /// None when the window had nothing to measure (e.g. the workload did no I/O).
    pub observed: Option<f64>,
    /// None without an observation.
    pub good: Option<bool>,
    /// True when the window had nothing to measure (`observed` and `good` are null).
    pub no_data: bool,
    /// Where the figure came from, for metrics with more than one source ("engine, vllm",
    /// "kernel, port 8000"); null otherwise.
    pub source: Option<String>,
    /// Budgets that count requests (`objective_basis = "requests"`): the window's requests
    /// within the bound and beyond it; null otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_within: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_beyond: Option<u64>,
    /// An envelope's stages: each one's allocation and what it measured (empty for a plain
    /// budget).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageResult>,
}

/// One stage of an envelope in one window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageResult {
    pub stage: String,
    pub allocation: f64,
    /// None when the window had nothing to measure for it.
    pub observed: Option<f64>,
}

impl BudgetResult {
    /// The stage that overspent its allocation by the most (in the bound's unit); None when
    /// every measured stage kept within its own.
    pub fn overspent_stage(&self) -> Option<&StageResult> {
        self.stages
            .iter()
            .filter_map(|s| s.observed.map(|o| (s, o - s.allocation)))
            .filter(|(_, over)| *over > 0.0)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(stage, _)| stage)
    }
}

/// What an envelope stage measured: its workload's own figure for the bound's metric, or the
/// entry workload's requests to its upstream (response P95).
fn measure_stage(
    budget: &Budget,
    stage: &crate::config::StageAllocation,
    windows: &[WorkloadWindow],
    pricing: &Pricing,
) -> Option<f64> {
    if let Some(workload) = &stage.workload {
        let as_budget = Budget {
            workload: workload.clone(),
            stages: Vec::new(),
            ..budget.clone()
        };
        return measure(&as_budget, windows, pricing);
    }
    let peer = stage.peer.as_ref()?;
    windows
        .iter()
        .filter(|w| w.name == budget.workload)
        .flat_map(|w| w.upstreams.iter())
        .filter(|u| &u.endpoint == peer)
        .filter_map(|u| u.p95_ms)
        .reduce(f64::max)
}

/// Three decimals, or six significant digits for small figures (a cost per request of
/// 0.000123 must not read 0).
fn round_observation(value: f64) -> f64 {
    if value.abs() >= 1.0 || value == 0.0 {
        return (value * 1000.0).round() / 1000.0;
    }
    let scale = 10f64.powi(5 - value.abs().log10().floor() as i32);
    (value * scale).round() / scale
}

/// What one budget's metric measured in a window for its workload (or the node, `"*"`);
/// None when the window had nothing to measure (e.g. the workload did no I/O).
pub fn measure(budget: &Budget, windows: &[WorkloadWindow], pricing: &Pricing) -> Option<f64> {
    let chosen: Vec<&WorkloadWindow> = windows
        .iter()
        .filter(|w| budget.workload == "*" || w.name == budget.workload)
        .collect();
    // The workload did not run in this window (idle or gone): nothing to measure.
    if chosen.is_empty() {
        return None;
    }
    let max_of = |values: Vec<f64>| {
        values.into_iter().fold(None, |max: Option<f64>, v| {
            Some(max.map_or(v, |m| m.max(v)))
        })
    };
    let storage = |pick: fn(&DeviceEvidence) -> Option<f64>| {
        max_of(
            chosen
                .iter()
                .flat_map(|w| w.devices.iter())
                .filter(|d| budget.device.as_ref().is_none_or(|name| &d.device == name))
                .filter_map(pick)
                .collect(),
        )
    };
    let peers = || {
        chosen
            .iter()
            .flat_map(|w| w.peers.iter())
            .filter(|p| budget.peer.as_ref().is_none_or(|name| &p.peer == name))
    };
    let window_s = chosen
        .first()
        .map_or(1.0, |w| w.window_ns as f64 / 1e9)
        .max(1e-9);
    // The engine's figure (the workload's, or the node's worst for "*").
    let engine = |pick: fn(&EngineSummary) -> Option<f64>| {
        let values: Vec<f64> = chosen
            .iter()
            .filter_map(|w| w.engine.as_ref())
            .filter_map(pick)
            .collect();
        values.into_iter().reduce(f64::max)
    };
    // The kernel's view of the port the workload serves most requests on.
    let served = || {
        chosen
            .iter()
            .flat_map(|w| w.served.first())
            .max_by_key(|s| s.requests)
    };
    let request_rate = || {
        let engines: Vec<f64> = chosen
            .iter()
            .filter_map(|w| w.engine.as_ref().and_then(|e| e.rate_per_s))
            .collect();
        if engines.is_empty() {
            let served: Vec<f64> = chosen
                .iter()
                .flat_map(|w| w.served.iter())
                .map(|s| s.rate_per_s)
                .collect();
            (!served.is_empty()).then(|| served.iter().sum())
        } else {
            Some(engines.iter().sum())
        }
    };
    let cost_rate = || {
        let gpus = chosen.iter().map(|w| w.gpus.len()).sum::<usize>() as f64;
        let cores = chosen
            .iter()
            .map(|w| w.time.on_cpu_ns as f64 / 1e9)
            .sum::<f64>()
            / window_s;
        cost_per_hour(
            gpus,
            cores,
            pricing.gpu_hour.unwrap_or(0.0),
            pricing.cpu_core_hour.unwrap_or(0.0),
        )
    };
    let lost_share = |pick: fn(&crate::analysis::attribution::TimeShares) -> f64| {
        let mut total = TimeBreakdown::default();
        for w in &chosen {
            total.add(&w.time);
        }
        (total.active_ns() > 0).then(|| pick(&total.active_shares()))
    };
    match budget.metric {
        BudgetMetric::StorageP95Ms => storage(|d| d.p95_ms),
        BudgetMetric::NetworkRttP95Ms => max_of(peers().filter_map(|p| p.rtt_p95_ms).collect()),
        // No peer (or not the named one) in the window: no traffic to count retransmits of.
        BudgetMetric::Retransmits => {
            let mut peers = peers().peekable();
            peers.peek()?;
            Some(peers.map(|p| p.retransmits as f64).sum())
        }
        BudgetMetric::GpuUtilization => max_of(
            chosen
                .iter()
                .flat_map(|w| w.gpus.iter())
                .filter_map(|g| g.utilization)
                .collect(),
        ),
        BudgetMetric::GpuThrottled => {
            let gpus: Vec<_> = chosen.iter().flat_map(|w| w.gpus.iter()).collect();
            (!gpus.is_empty()).then(|| {
                f64::from(u8::from(
                    gpus.iter()
                        .any(|g| g.throttle_reasons.iter().any(|r| r != "idle")),
                ))
            })
        }
        BudgetMetric::CostPerHour => Some(cost_rate()),
        BudgetMetric::LostShareStorage => lost_share(|s| s.storage),
        BudgetMetric::LostShareNetwork => lost_share(|s| s.network),
        BudgetMetric::LostShareModel => lost_share(|s| s.gpu),
        BudgetMetric::LostShareCpu => lost_share(|s| s.on_cpu + s.waiting_for_cpu),
        BudgetMetric::RequestP95Ms => {
            engine(|e| e.e2e_p95_ms).or_else(|| served().and_then(|s| s.p95_ms))
        }
        BudgetMetric::TtftP95Ms => {
            engine(|e| e.ttft_p95_ms).or_else(|| served().and_then(|s| s.first_byte_p95_ms))
        }
        BudgetMetric::TpotP95Ms => engine(|e| e.tpot_p95_ms),
        BudgetMetric::QueueP95Ms => engine(|e| e.queue_p95_ms),
        BudgetMetric::RequestsPerS => request_rate(),
        BudgetMetric::CacheHitRate => engine(|e| e.prefix_cache_hit_rate),
        BudgetMetric::CostPerRequest => {
            let rate = request_rate().filter(|r| *r > 0.0)?;
            Some(cost_rate() / 3600.0 / rate)
        }
        BudgetMetric::CostPer1kTokens => {
            let rate = engine(|e| e.tokens_per_s).filter(|r| *r > 0.0)?;
            Some(cost_rate() / 3600.0 / rate * 1000.0)
        }
        BudgetMetric::GpuMemoryBytes => max_of(
            chosen
                .iter()
                .flat_map(|w| w.gpus.iter())
                .filter_map(|g| g.memory_bytes.map(|b| b as f64))
                .collect(),
        ),
        BudgetMetric::ConnectP95Ms => max_of(peers().filter_map(|p| p.connect_p95_ms).collect()),
        BudgetMetric::RetransmitsPerS => {
            let mut peers = peers().peekable();
            peers.peek()?;
            Some(peers.map(|p| p.retransmits as f64).sum::<f64>() / window_s)
        }
    }
}

/// A budget that counts requests: the window's requests within its bound and beyond it,
/// read from the engine's histogram when it has one, else from the kernel's histogram of the
/// port the workload serves most requests on. None without requests.
pub fn request_events(budget: &Budget, windows: &[WorkloadWindow]) -> Option<(u64, u64)> {
    let chosen: Vec<&WorkloadWindow> = windows
        .iter()
        .filter(|w| budget.workload == "*" || w.name == budget.workload)
        .collect();
    let bound_s = budget.threshold / 1e3;
    let ttft = budget.metric == BudgetMetric::TtftP95Ms;
    let from_engine = chosen
        .iter()
        .filter_map(|w| w.engine.as_ref())
        .find_map(|e| {
            let buckets = if ttft {
                &e.ttft_buckets
            } else {
                &e.e2e_buckets
            };
            let total = buckets.last()?.1;
            let within = crate::analysis::engines::count_at_most(buckets, bound_s)?;
            let within = within.floor().min(total);
            Some((within as u64, (total - within).round() as u64))
        });
    if from_engine.is_some() {
        return from_engine;
    }
    let served = chosen
        .iter()
        .flat_map(|w| w.served.first())
        .max_by_key(|s| s.requests)?;
    let histogram = if ttft {
        &served.first_byte
    } else {
        &served.latency
    };
    let counts = histogram.rebucket_ns(&[budget.threshold * 1e6]);
    let (within, beyond) = (counts[0], counts[1]);
    (within + beyond > 0).then_some((within, beyond))
}

/// Where a budget's figure came from, when it has more than one source: the engine's own
/// metrics, or the kernel's timing of the sockets.
pub fn source(budget: &Budget, windows: &[WorkloadWindow]) -> Option<String> {
    let chosen = windows
        .iter()
        .filter(|w| budget.workload == "*" || w.name == budget.workload);
    let has_engine = |pick: fn(&EngineSummary) -> Option<f64>| {
        chosen
            .clone()
            .any(|w| w.engine.as_ref().and_then(pick).is_some())
    };
    let kernel = || {
        chosen
            .clone()
            .flat_map(|w| w.served.first())
            .max_by_key(|s| s.requests)
            .map(|s| format!("kernel, {}", s.endpoint))
    };
    let engine_name = || {
        chosen
            .clone()
            .find_map(|w| w.engine.as_ref().and_then(|e| e.engine))
            .map_or_else(
                || "engine".to_string(),
                |kind| format!("engine, {}", kind.as_str()),
            )
    };
    let from = |pick: fn(&EngineSummary) -> Option<f64>| {
        if has_engine(pick) {
            Some(engine_name())
        } else {
            kernel()
        }
    };
    match budget.metric {
        BudgetMetric::RequestP95Ms => from(|e| e.e2e_p95_ms),
        BudgetMetric::TtftP95Ms => from(|e| e.ttft_p95_ms),
        BudgetMetric::RequestsPerS | BudgetMetric::CostPerRequest => from(|e| e.rate_per_s),
        metric if metric.engine_only() => Some(engine_name()),
        _ => None,
    }
}

/// Evaluates every configured budget on one window, in configuration order.
pub fn evaluate_window(
    config: &LoadedConfig,
    windows: &[WorkloadWindow],
    at_s: u64,
) -> Vec<BudgetResult> {
    config
        .budgets
        .iter()
        .map(|budget| {
            let observed = measure(budget, windows, &config.pricing);
            let requests = (budget.objective_basis == ObjectiveBasis::Requests)
                .then(|| request_events(budget, windows))
                .flatten();
            BudgetResult {
                requests_within: requests.map(|(within, _)| within),
                requests_beyond: requests.map(|(_, beyond)| beyond),
                name: budget.name.clone(),
                workload: budget.workload.clone(),
                metric: budget.metric,
                bound: budget.bound,
                threshold: budget.threshold,
                observed: observed.map(round_observation),
                source: observed.and_then(|_| source(budget, windows)),
                stages: budget
                    .stages
                    .iter()
                    .map(|stage| StageResult {
                        stage: stage.name.clone(),
                        allocation: stage.allocation,
                        observed: measure_stage(budget, stage, windows, &config.pricing)
                            .map(round_observation),
                    })
                    .collect(),
                good: observed.map(|v| observe(at_s, v, budget.threshold, budget.bound).good),
                no_data: observed.is_none(),
            }
        })
        .collect()
}

/// Cost rate of a workload: GPUs it holds and CPU cores it keeps busy, at the given prices.
pub fn cost_per_hour(
    gpus_in_use: f64,
    cpu_cores_busy: f64,
    price_per_gpu_hour: f64,
    price_per_cpu_core_hour: f64,
) -> f64 {
    gpus_in_use * price_per_gpu_hour + cpu_cores_busy * price_per_cpu_core_hour
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burning_on_requests_spends_the_budget_by_the_requests_beyond_the_bound() {
        let mut by_windows = BudgetState::default();
        let mut by_requests = BudgetState::default();
        let windows_policy = policy();
        let requests_policy = BudgetPolicy {
            basis: ObjectiveBasis::Requests,
            ..policy()
        };
        let mut fired = (0, 0);
        for i in 0..6u64 {
            // The P95 is over the bound every window, but only 3 requests in 100 are: 3% of
            // requests against a 10% error budget is a burn rate of 0.3.
            let mut observation = observe(i * 10, 1200.0, 1000.0, Bound::Ceiling);
            observation.requests = Some((97, 3));
            if by_windows
                .record("w", &observation, &windows_policy)
                .is_some()
            {
                fired.0 += 1;
            }
            if by_requests
                .record("r", &observation, &requests_policy)
                .is_some()
            {
                fired.1 += 1;
            }
        }
        assert_eq!(
            fired,
            (1, 0),
            "every window is bad; 3% of requests is within budget"
        );
        let burn = request_burn_rate(&by_requests.request_history, 50, 600, 0.9).unwrap();
        assert!(
            (burn - 0.3).abs() < 1e-9,
            "18 of 600 requests over a 10% budget: {burn}"
        );
        // A window that is good by its P95 but with 40 of 100 requests beyond burns at 4.
        let mut observation = observe(60, 900.0, 1000.0, Bound::Ceiling);
        observation.requests = Some((60, 40));
        by_requests.record("r", &observation, &requests_policy);
        let burn = request_burn_rate(&by_requests.request_history, 60, 10, 0.9).unwrap();
        assert!((burn - 4.0).abs() < 1e-9, "{burn}");
    }

    /// Windows of 10 s; burn-rate windows scaled down for a test: 10 min / 1 min at factor 10.
    fn policy() -> BudgetPolicy {
        BudgetPolicy {
            objective: 0.9,
            burn_rate_windows: vec![BurnRateWindow {
                long_s: 600,
                short_s: 60,
                factor: 5.0,
            }],
            enter_after: 2,
            leave_after: 3,
            on_no_data: NoDataPolicy::Ignore,
            basis: ObjectiveBasis::Windows,
        }
    }

    fn run(state: &mut BudgetState, start_s: u64, goods: &[bool]) -> Vec<(u64, BreachStatus)> {
        goods
            .iter()
            .enumerate()
            .filter_map(|(i, good)| {
                let at = start_s + 10 * i as u64;
                let observation = observe(at, if *good { 5.0 } else { 50.0 }, 10.0, Bound::Ceiling);
                state
                    .record("storage-p95", &observation, &policy())
                    .map(|e| (at, e.status))
            })
            .collect()
    }

    #[test]
    fn thresholds_have_a_direction() {
        assert!(observe(0, 10.0, 10.0, Bound::Ceiling).good);
        assert!(!observe(0, 10.1, 10.0, Bound::Ceiling).good);
        assert!(observe(0, 0.3, 0.2, Bound::Floor).good);
        assert!(!observe(0, 0.1, 0.2, Bound::Floor).good);
    }

    #[test]
    fn burn_rate_is_bad_share_over_error_budget() {
        let history: VecDeque<(u64, bool)> = (0..10).map(|i| (i * 10, i % 5 != 0)).collect();
        // 2 bad of 10 = 0.2; error budget 0.1 -> burn 2.
        assert!((burn_rate(&history, 90, 100, 0.9).unwrap() - 2.0).abs() < 1e-9);
        // Last 30 s: windows at 70, 80, 90, all good.
        assert_eq!(burn_rate(&history, 90, 30, 0.9), Some(0.0));
        assert_eq!(burn_rate(&VecDeque::new(), 90, 30, 0.9), None);
    }

    #[test]
    fn a_sustained_breach_fires_once_and_resolves_once() {
        let mut state = BudgetState::default();
        // 6 good windows, then 8 bad ones, then 10 good ones.
        let mut goods = vec![true; 6];
        goods.extend([false; 8]);
        goods.extend([true; 10]);
        let events = run(&mut state, 1_000, &goods);
        // Bad windows start at 1060. The long window (everything since 1000) reaches half bad,
        // burn 5, at the 6th bad window (1110); 2 alerting windows fire it at 1120. After the
        // bad run (last at 1130) the long window falls under half bad at 1160 (8 of 17);
        // 3 quiet windows resolve it at 1180.
        assert_eq!(
            events,
            vec![
                (1_120, BreachStatus::Firing),
                (1_180, BreachStatus::Resolved)
            ]
        );
        assert_eq!(state.breaches, 1);
        assert_eq!(state.status(), BreachStatus::Resolved);
    }

    #[test]
    fn a_single_bad_window_does_not_flap() {
        let mut state = BudgetState::default();
        let mut goods = vec![true; 20];
        goods[10] = false;
        goods[13] = false;
        assert!(run(&mut state, 0, &goods).is_empty());
    }

    #[test]
    fn the_breach_id_is_stable_for_the_breach() {
        let mut state = BudgetState::default();
        let policy = policy();
        let mut ids = Vec::new();
        for i in 0..15u64 {
            let good = !(3..8).contains(&i);
            let observation = observe(i * 10, if good { 1.0 } else { 99.0 }, 10.0, Bound::Ceiling);
            if let Some(event) = state.record("b", &observation, &policy) {
                ids.push((event.status, event.breach_id, event.observed));
            }
        }
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_eq!(
            ids[0].1, ids[1].1,
            "firing and resolved share the breach id"
        );
        assert_eq!(ids[0].1, "b@60");
        assert_eq!(ids[0].2, Some(99.0));
    }

    #[test]
    fn history_stays_bounded_by_the_longest_window() {
        let mut state = BudgetState::default();
        run(&mut state, 0, &vec![true; 500]);
        assert!(state.history.len() <= 61, "{}", state.history.len());
    }

    #[test]
    fn state_survives_serialisation() {
        let mut state = BudgetState::default();
        run(&mut state, 0, &[true, false, false, false]);
        let text = serde_json::to_string(&state).unwrap();
        let restored: BudgetState = serde_json::from_str(&text).unwrap();
        assert_eq!(restored, state);
        assert_eq!(restored.status(), BreachStatus::Firing);
    }

    #[test]
    fn budgets_are_measured_on_the_right_workload() {
        use crate::analysis::attribution::{
            DeviceEvidence, GpuEvidence, PeerEvidence, TimeBreakdown, WorkloadWindow,
        };
        let config = crate::config::parse_config(
            "t.toml",
            r#"
[[workload]]
name = "trainer"
process = ["python"]
[pricing]
gpu_hour = 2.0
cpu_core_hour = 0.5
[[budget]]
name = "p95"
workload = "trainer"
metric = "storage_p95_ms"
max = 10.0
[[budget]]
name = "busy gpus"
workload = "trainer"
metric = "gpu_utilization"
min = 0.6
[[budget]]
name = "cost"
workload = "trainer"
metric = "cost_per_hour"
max = 3.0
[[budget]]
name = "rtt"
workload = "*"
metric = "network_rtt_p95_ms"
max = 50.0
[[budget]]
name = "stalls"
workload = "*"
metric = "lost_share_storage"
max = 0.3
"#,
        )
        .unwrap();
        let trainer = WorkloadWindow {
            name: "trainer".into(),
            pids: vec![1],
            window_ns: 10_000_000_000,
            time: TimeBreakdown {
                on_cpu_ns: 20_000_000_000,
                storage_ns: 5_000_000_000,
                ..Default::default()
            },
            gpus: vec![GpuEvidence {
                index: 0,
                name: "H100".into(),
                utilization: Some(0.4),
                throttle_reasons: vec![],
                memory_bytes: None,
            }],
            devices: vec![DeviceEvidence {
                device: "vda".into(),
                bytes: 1,
                p95_ms: Some(84.0),
                queue_share: None,
            }],
            peers: vec![],
            ..Default::default()
        };
        let other = WorkloadWindow {
            name: "web".into(),
            window_ns: 10_000_000_000,
            peers: vec![PeerEvidence {
                peer: "10.0.0.7:443".into(),
                rtt_p95_ms: Some(20.0),
                retransmits: 0,
                connect_p95_ms: None,
            }],
            ..WorkloadWindow::default()
        };
        let results = evaluate_window(&config, &[trainer, other], 100);
        let by_name = |name: &str| results.iter().find(|r| r.name == name).unwrap();
        assert_eq!(
            (by_name("p95").observed, by_name("p95").good),
            (Some(84.0), Some(false))
        );
        assert_eq!(
            (by_name("busy gpus").observed, by_name("busy gpus").good),
            (Some(0.4), Some(false))
        );
        // One GPU at 2.0 plus 2 busy cores at 0.5.
        assert_eq!(
            (by_name("cost").observed, by_name("cost").good),
            (Some(3.0), Some(true))
        );
        assert_eq!(
            (by_name("rtt").observed, by_name("rtt").good),
            (Some(20.0), Some(true))
        );
        // Node: 5 s storage of 25 s active.
        assert_eq!(
            (by_name("stalls").observed, by_name("stalls").good),
            (Some(0.2), Some(true))
        );
    }

    #[test]
    fn cost_adds_gpus_and_cores() {
        assert_eq!(cost_per_hour(2.0, 1.5, 3.0, 0.04), 6.06);
        assert_eq!(cost_per_hour(0.0, 0.0, 3.0, 0.04), 0.0);
    }

    #[test]
    fn default_windows_follow_the_sre_workbook() {
        let policy = BudgetPolicy::default();
        assert_eq!(
            policy.burn_rate_windows[0],
            BurnRateWindow {
                long_s: 3_600,
                short_s: 300,
                factor: 14.4
            }
        );
        assert_eq!(policy.burn_rate_windows[2].long_s, 3 * 24 * 3_600);
    }

    /// `windows`: Some(good) for a window with data, None for one without; 10 s apart.
    fn run_windows(
        state: &mut BudgetState,
        policy: &BudgetPolicy,
        windows: &[Option<bool>],
    ) -> Vec<(u64, BreachStatus, String)> {
        windows
            .iter()
            .enumerate()
            .filter_map(|(i, window)| {
                let at = 10 * i as u64;
                let observation = window
                    .map(|good| observe(at, if good { 5.0 } else { 50.0 }, 10.0, Bound::Ceiling));
                state
                    .record_window("storage-p95", at, 10.0, observation.as_ref(), policy)
                    .map(|e| (at, e.status, e.reason))
            })
            .collect()
    }

    #[test]
    fn a_breach_resolves_when_its_workload_goes_quiet() {
        let mut state = BudgetState::default();
        // Six bad windows (0..50 s), then nothing to measure for two minutes.
        let mut windows = vec![Some(false); 6];
        windows.extend([None; 12]);
        let events = run_windows(&mut state, &policy(), &windows);
        // Fires at the second alerting window (10 s). After the last data (50 s) the short
        // window (60 s) holds no event from 110 s on: quiet at 110, 120, 130, resolved at 130.
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!((events[0].0, events[0].1), (10, BreachStatus::Firing));
        assert_eq!(
            events[0].2,
            "burn rate 10 over 10m and 10 over 1m reached 5"
        );
        assert_eq!(
            events[1],
            (
                130,
                BreachStatus::Resolved,
                "no data for 1m 20s".to_string()
            )
        );
        assert_eq!(state.status(), BreachStatus::Resolved);
        // Windows without data are not events: six bad, nothing else.
        assert_eq!((state.good_windows, state.bad_windows), (0, 6));
        assert_eq!(state.last_data_s, Some(50));
    }

    #[test]
    fn a_breach_that_recovers_with_data_says_so() {
        let mut state = BudgetState::default();
        let mut windows = vec![Some(false); 6];
        windows.extend([Some(true); 60]);
        let events = run_windows(&mut state, &policy(), &windows);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[1].1, BreachStatus::Resolved);
        assert_eq!(events[1].2, "burn rates below their factors in 10m/1m");
    }

    #[test]
    fn silence_from_the_start_never_fires_unless_it_is_a_breach() {
        let idle = vec![None; 30];
        let mut state = BudgetState::default();
        assert!(run_windows(&mut state, &policy(), &idle).is_empty());
        assert_eq!((state.good_windows, state.bad_windows), (0, 0));
        assert_eq!(
            state.silence_to_report(290, &policy()),
            None,
            "never had data"
        );

        let strict = BudgetPolicy {
            on_no_data: NoDataPolicy::Breach,
            ..policy()
        };
        let mut state = BudgetState::default();
        let events = run_windows(&mut state, &strict, &idle);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!((events[0].0, events[0].1), (10, BreachStatus::Firing));
        assert!(
            events[0]
                .2
                .ends_with("(no data counts as bad: on_no_data = \"breach\")")
        );
        assert_eq!(state.bad_windows, 30);
    }

    #[test]
    fn a_long_silence_is_reported_once() {
        let mut state = BudgetState::default();
        let policy = policy();
        let mut windows = vec![Some(true); 3];
        windows.extend([None; 70]);
        let mut reported = Vec::new();
        for (i, window) in windows.iter().enumerate() {
            let at = 10 * i as u64;
            let observation =
                window.map(|good| observe(at, if good { 5.0 } else { 50.0 }, 10.0, Bound::Ceiling));
            state.record_window("b", at, 10.0, observation.as_ref(), &policy);
            if let Some(silent_s) = state.silence_to_report(at, &policy) {
                reported.push((at, silent_s));
            }
        }
        // Last data at 20 s; the longest burn window is 600 s: reported at 630 s, once.
        assert_eq!(reported, vec![(630, 610)]);
    }

    #[test]
    fn an_older_state_file_still_loads() {
        let old = r#"{"history":[[10,false],[20,true]],"firing_since_s":10,"consecutive_alerting":0,"consecutive_quiet":1,"breaches":3}"#;
        let state: BudgetState = serde_json::from_str(old).unwrap();
        assert_eq!(state.status(), BreachStatus::Firing);
        assert_eq!(state.last_data_s, None);
        assert_eq!(state.consecutive_no_data, 0);
    }

    #[test]
    fn idle_windows_do_not_bring_a_breach_closer_to_firing() {
        // One bad window, then the workload goes quiet: the short window still holds the bad
        // event for a while, but windows without data are no new evidence.
        let mut state = BudgetState::default();
        let mut windows = vec![Some(false)];
        windows.extend([None; 20]);
        assert!(run_windows(&mut state, &policy(), &windows).is_empty());
        assert_eq!(state.status(), BreachStatus::Resolved);
        // A clock that stepped back (NTP) after the last data does not panic.
        let mut state = BudgetState::default();
        run_windows(&mut state, &policy(), &[Some(false); 6]);
        assert!(state.firing_since_s.is_some());
        for at in [40, 30, 20, 10, 0] {
            state.record_window("b", at, 10.0, None, &policy());
        }
        assert_eq!(state.silence_to_report(0, &policy()), None);
    }
}

#[cfg(test)]
mod request_budget_tests {
    use super::*;
    use crate::analysis::attribution::{GpuEvidence, PeerEvidence, RequestEvidence};
    use crate::model::engine::EngineKind;

    const CONFIG: &str = r#"
[pricing]
gpu_hour = 3.6
cpu_core_hour = 0.36

[[workload]]
name = "llm"
process = ["vllm"]
metrics_url = "http://127.0.0.1:8000/metrics"

[[workload]]
name = "api"
process = ["uvicorn"]
"#;

    fn budgets(metrics: &[(&str, &str, &str)]) -> LoadedConfig {
        let mut text = CONFIG.to_string();
        for (i, (workload, metric, bound)) in metrics.iter().enumerate() {
            text.push_str(&format!(
                "[[budget]]\nname = \"b{i}\"\nworkload = \"{workload}\"\nmetric = \"{metric}\"\n{bound}\n"
            ));
        }
        crate::config::parse_config("t.toml", &text).unwrap()
    }

    /// llm: an engine answering 4 requests/s (P95 1.5 s, TTFT 400 ms) with 1,000 tokens/s,
    /// one GPU (72 GB held), 1 core busy over 10 s; api: no engine, 20 requests/s served on
    /// port 8000 (P95 80 ms), a peer with 3 retransmits and connects at 12 ms.
    fn windows() -> Vec<WorkloadWindow> {
        let llm = WorkloadWindow {
            name: "llm".into(),
            window_ns: 10_000_000_000,
            time: TimeBreakdown {
                on_cpu_ns: 10_000_000_000,
                ..Default::default()
            },
            gpus: vec![GpuEvidence {
                index: 0,
                name: "H100".into(),
                utilization: Some(0.9),
                throttle_reasons: vec![],
                memory_bytes: Some(72_000_000_000),
            }],
            served: vec![RequestEvidence {
                endpoint: "port 8000".into(),
                requests: 40,
                rate_per_s: 4.0,
                p95_ms: Some(1490.0),
                ..Default::default()
            }],
            engine: Some(EngineSummary {
                workload: "llm".into(),
                engine: Some(EngineKind::Vllm),
                rate_per_s: Some(4.0),
                e2e_p95_ms: Some(1500.0),
                ttft_p95_ms: Some(400.0),
                tpot_p95_ms: Some(30.0),
                queue_p95_ms: Some(5.0),
                prefix_cache_hit_rate: Some(0.65),
                tokens_per_s: Some(1000.0),
                ..Default::default()
            }),
            ..Default::default()
        };
        let api = WorkloadWindow {
            name: "api".into(),
            window_ns: 10_000_000_000,
            served: vec![RequestEvidence {
                endpoint: "port 8000".into(),
                requests: 200,
                rate_per_s: 20.0,
                p95_ms: Some(80.0),
                first_byte_p95_ms: Some(10.0),
                ..Default::default()
            }],
            peers: vec![PeerEvidence {
                peer: "10.0.0.7:6333".into(),
                rtt_p95_ms: Some(0.2),
                retransmits: 3,
                connect_p95_ms: Some(12.0),
            }],
            ..Default::default()
        };
        vec![llm, api]
    }

    #[test]
    fn request_budgets_read_the_engine_first_and_the_kernel_otherwise_and_say_which() {
        let config = budgets(&[
            ("llm", "request_p95_ms", "max = 1000.0"),
            ("api", "request_p95_ms", "max = 100.0"),
            ("llm", "ttft_p95_ms", "max = 500.0"),
            ("api", "ttft_p95_ms", "max = 5.0"),
            ("llm", "tpot_p95_ms", "max = 50.0"),
            ("llm", "queue_p95_ms", "max = 1.0"),
            ("llm", "requests_per_s", "min = 5.0"),
            ("api", "requests_per_s", "min = 5.0"),
            ("llm", "cache_hit_rate", "min = 0.7"),
            ("llm", "cost_per_request", "max = 0.0005"),
            ("llm", "cost_per_1k_tokens", "max = 0.01"),
            ("llm", "gpu_memory_bytes", "max = 80e9"),
            ("api", "connect_p95_ms", "max = 10.0"),
            ("api", "retransmits_per_s", "max = 1.0"),
        ]);
        let results = evaluate_window(&config, &windows(), 100);
        let seen: Vec<(Option<f64>, Option<bool>, Option<&str>)> = results
            .iter()
            .map(|r| (r.observed, r.good, r.source.as_deref()))
            .collect();
        // Cost: 1 GPU x 3.6/h + 1 core x 0.36/h = 3.96/h = 0.0011/s; at 4 requests/s that is
        // 0.000275 per request; at 1,000 tokens/s, 0.0011 per 1,000 tokens.
        assert_eq!(
            seen,
            vec![
                (Some(1500.0), Some(false), Some("engine, vllm")),
                (Some(80.0), Some(true), Some("kernel, port 8000")),
                (Some(400.0), Some(true), Some("engine, vllm")),
                (Some(10.0), Some(false), Some("kernel, port 8000")),
                (Some(30.0), Some(true), Some("engine, vllm")),
                (Some(5.0), Some(false), Some("engine, vllm")),
                (Some(4.0), Some(false), Some("engine, vllm")),
                (Some(20.0), Some(true), Some("kernel, port 8000")),
                (Some(0.65), Some(false), Some("engine, vllm")),
                (Some(0.000275), Some(true), Some("engine, vllm")),
                (Some(0.0011), Some(true), Some("engine, vllm")),
                (Some(72e9), Some(true), None),
                (Some(12.0), Some(false), None),
                (Some(0.3), Some(true), None),
            ]
        );
    }

    #[test]
    fn engine_only_budgets_need_a_metrics_url_and_cost_budgets_need_prices() {
        for (text, hint) in [
            (
                "[[budget]]\nname = \"x\"\nworkload = \"api\"\nmetric = \"tpot_p95_ms\"\nmax = 50.0\n",
                "tpot_p95_ms comes from the serving engine's own metrics: give workload \"api\" a metrics_url",
            ),
            (
                "[[budget]]\nname = \"x\"\nworkload = \"api\"\nmetric = \"cache_hit_rate\"\nmin = 0.5\n",
                "give workload \"api\" a metrics_url",
            ),
        ] {
            let error = crate::config::parse_config("t.toml", &format!("{CONFIG}{text}"))
                .unwrap_err()
                .to_string();
            assert!(error.contains(hint), "{error}");
        }
        let no_prices = CONFIG.replace("gpu_hour = 3.6\ncpu_core_hour = 0.36\n", "");
        let error = crate::config::parse_config(
            "t.toml",
            &format!("{no_prices}[[budget]]\nname = \"x\"\nworkload = \"llm\"\nmetric = \"cost_per_request\"\nmax = 0.01\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("cost_per_request needs [pricing]"),
            "{error}"
        );
    }

    #[test]
    fn an_envelope_measures_its_stages_and_names_the_one_that_overspent_most() {
        let config = crate::config::parse_config(
            "t.toml",
            r#"
[[workload]]
name = "api"
process = ["uvicorn"]

[[workload]]
name = "llm"
process = ["vllm"]
metrics_url = "http://127.0.0.1:8000/metrics"

[[envelope]]
name = "assistant"
entry = "api"
request_p95_ms = 1000.0

[[envelope.stage]]
name = "retrieval"
peer = "10.0.0.7:6333"
request_p95_ms = 100.0

[[envelope.stage]]
name = "generation"
workload = "llm"
request_p95_ms = 800.0
"#,
        )
        .unwrap();
        let mut windows = windows();
        // The entry waited 250 ms P95 on its vector database; generation took 1500 ms.
        windows[1].upstreams = vec![RequestEvidence {
            endpoint: "10.0.0.7:6333".into(),
            requests: 20,
            p95_ms: Some(250.0),
            ..Default::default()
        }];
        let results = evaluate_window(&config, &windows, 100);
        let envelope = &results[0];
        assert_eq!(envelope.name, "assistant: request_p95_ms");
        assert_eq!(
            (envelope.observed, envelope.good),
            (Some(80.0), Some(true)),
            "measured at the entry (the kernel's P95 on its port)"
        );
        let stages: Vec<(&str, f64, Option<f64>)> = envelope
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), s.allocation, s.observed))
            .collect();
        assert_eq!(
            stages,
            [
                ("retrieval", 100.0, Some(250.0)),
                ("generation", 800.0, Some(1500.0))
            ]
        );
        let worst = envelope.overspent_stage().unwrap();
        assert_eq!(worst.stage, "generation", "700 ms over beats 150 ms over");
        let mut within = envelope.clone();
        within.stages[1].observed = Some(700.0);
        within.stages[0].observed = None;
        assert_eq!(within.overspent_stage(), None);
    }

    #[test]
    fn an_objective_on_requests_counts_the_requests_within_the_bound() {
        let config = budgets(&[
            (
                "llm",
                "request_p95_ms",
                "max = 1000.0\nobjective_basis = \"requests\"",
            ),
            (
                "api",
                "request_p95_ms",
                "max = 50.0\nobjective_basis = \"requests\"",
            ),
            ("llm", "ttft_p95_ms", "max = 400.0"),
        ]);
        let mut windows = windows();
        // The engine's window: 4 <= 0.5 s, 6 in (0.5, 1], 8 in (1, 2.5], 2 above.
        windows[0].engine.as_mut().unwrap().e2e_buckets =
            vec![(0.5, 4.0), (1.0, 10.0), (2.5, 18.0), (f64::INFINITY, 20.0)];
        // The kernel's: 150 requests at 20 ms, 50 at 80 ms on port 8000.
        windows[1].served[0].latency = crate::model::Histogram::from_samples_ns(
            std::iter::repeat_n(20_000_000, 150).chain(std::iter::repeat_n(80_000_000, 50)),
        );
        let results = evaluate_window(&config, &windows, 100);
        let counted: Vec<(Option<u64>, Option<u64>)> = results
            .iter()
            .map(|r| (r.requests_within, r.requests_beyond))
            .collect();
        assert_eq!(
            counted,
            [(Some(10), Some(10)), (Some(150), Some(50)), (None, None)],
            "only budgets that count requests count them"
        );
        let error = crate::config::parse_config(
            "t.toml",
            &format!("{CONFIG}[[budget]]\nname = \"x\"\nworkload = \"llm\"\nmetric = \"cache_hit_rate\"\nmin = 0.5\nobjective_basis = \"requests\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains(
                "objective_basis = \"requests\" needs a metric read from a histogram of requests"
            ),
            "{error}"
        );
    }

    #[test]
    fn a_window_without_requests_has_no_cost_per_request() {
        let config = budgets(&[("api", "cost_per_request", "max = 1.0")]);
        let mut idle = windows();
        idle[1].served.clear();
        let results = evaluate_window(&config, &idle, 100);
        assert_eq!((results[0].observed, results[0].no_data), (None, true));
    }
}
