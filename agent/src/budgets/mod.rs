//! Performance budgets ("inference envelopes"): per-window good/bad, multi-window burn rates
//! and a breach state machine with hysteresis. Pure: windows of observations in, states and
//! transition events out; the daemon feeds it and persists [`BudgetState`].
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

pub mod actions;
pub mod store;

use crate::{
    analysis::attribution::{DeviceEvidence, TimeBreakdown, WorkloadWindow},
    config::{Budget, LoadedConfig, Pricing},
};
pub use crate::{
    config::{BudgetPolicy, BurnRateWindow, DEFAULT_BURN_RATE_WINDOWS},
    model::vocabulary::{Bound, BreachStatus, BudgetMetric},
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
}

/// A state change, explained.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreachEvent {
    pub budget: String,
    pub status: BreachStatus,
    /// Stable for the life of one breach: the budget's name and when it started firing.
    pub breach_id: String,
    pub observed: f64,
    pub threshold: f64,
    /// Burn rate per configured window pair: (long window s, long burn, short burn).
    pub burn_rates: Vec<(u64, f64, f64)>,
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
        .filter(|(at, _)| *at + span_s > now_s && *at <= now_s)
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
        let now = observation.at_s;
        self.history.push_back((now, observation.good));
        if observation.good {
            self.good_windows += 1;
        } else {
            self.bad_windows += 1;
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
            .is_some_and(|(at, _)| *at + keep_s < now)
        {
            self.history.pop_front();
        }
        let burn_rates: Vec<(u64, f64, f64)> = policy
            .burn_rate_windows
            .iter()
            .map(|w| {
                let long = burn_rate(&self.history, now, w.long_s, policy.objective).unwrap_or(0.0);
                let short =
                    burn_rate(&self.history, now, w.short_s, policy.objective).unwrap_or(0.0);
                (
                    w.long_s,
                    (long * 1000.0).round() / 1000.0,
                    (short * 1000.0).round() / 1000.0,
                )
            })
            .collect();
        let alerting = policy
            .burn_rate_windows
            .iter()
            .zip(&burn_rates)
            .any(|(w, (_, long, short))| *long >= w.factor && *short >= w.factor);
        if alerting {
            self.consecutive_alerting += 1;
            self.consecutive_quiet = 0;
        } else {
            self.consecutive_quiet += 1;
            self.consecutive_alerting = 0;
        }
        let event = |status, since: u64| BreachEvent {
            budget: name.to_string(),
            status,
            breach_id: format!("{name}@{since}"),
            observed: observation.observed,
            threshold: observation.threshold,
            burn_rates: burn_rates.clone(),
        };
        match self.firing_since_s {
            None if self.consecutive_alerting >= policy.enter_after => {
                self.firing_since_s = Some(now);
                self.breaches += 1;
                Some(event(BreachStatus::Firing, now))
            }
            Some(since) if self.consecutive_quiet >= policy.leave_after => {
                self.firing_since_s = None;
                Some(event(BreachStatus::Resolved, since))
            }
            _ => None,
        }
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
}

/// What one budget's metric measured in a window for its workload (or the node, `"*"`);
/// None when the window had nothing to measure (e.g. the workload did no I/O).
pub fn measure(budget: &Budget, windows: &[WorkloadWindow], pricing: &Pricing) -> Option<f64> {
    let chosen: Vec<&WorkloadWindow> = windows
        .iter()
        .filter(|w| budget.workload == "*" || w.name == budget.workload)
        .collect();
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
        BudgetMetric::Retransmits => Some(peers().map(|p| p.retransmits as f64).sum()),
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
        BudgetMetric::CostPerHour => {
            let gpus = chosen.iter().map(|w| w.gpus.len()).sum::<usize>() as f64;
            let cores = chosen
                .iter()
                .map(|w| w.time.on_cpu_ns as f64 / 1e9)
                .sum::<f64>()
                / window_s;
            Some(cost_per_hour(
                gpus,
                cores,
                pricing.gpu_hour.unwrap_or(0.0),
                pricing.cpu_core_hour.unwrap_or(0.0),
            ))
        }
        BudgetMetric::LostShareStorage => lost_share(|s| s.storage),
        BudgetMetric::LostShareNetwork => lost_share(|s| s.network),
        BudgetMetric::LostShareModel => lost_share(|s| s.gpu),
        BudgetMetric::LostShareCpu => lost_share(|s| s.on_cpu + s.waiting_for_cpu),
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
            BudgetResult {
                name: budget.name.clone(),
                workload: budget.workload.clone(),
                metric: budget.metric,
                bound: budget.bound,
                threshold: budget.threshold,
                observed: observed.map(|v| (v * 1000.0).round() / 1000.0),
                good: observed.map(|v| observe(at_s, v, budget.threshold, budget.bound).good),
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
        assert_eq!(ids[0].2, 99.0);
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
            }],
            devices: vec![DeviceEvidence {
                device: "vda".into(),
                bytes: 1,
                p95_ms: Some(84.0),
                queue_share: None,
            }],
            peers: vec![],
        };
        let other = WorkloadWindow {
            name: "web".into(),
            window_ns: 10_000_000_000,
            peers: vec![PeerEvidence {
                peer: "10.0.0.7:443".into(),
                rtt_p95_ms: Some(20.0),
                retransmits: 0,
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
}
