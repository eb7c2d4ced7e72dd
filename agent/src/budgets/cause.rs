//! Why a budget breached: its recent windows, remembered with where the workload's time went
//! and its verdict, so a breach event can say "ttft_p95_ms 612 > 400 in 5 of the last 6
//! windows; in those windows llm lost 58% of its active time waiting on the GPU; model - llm
//! (pid 42) ... GPU 0 at 99% utilization". Pure: the daemon feeds it each window.
use std::collections::VecDeque;

use serde::Serialize;

use crate::{
    analysis::attribution::{Rules, TimeBreakdown, TimeShares, Verdict},
    model::vocabulary::{Bottleneck, Bound, BudgetMetric},
};

/// One window of one budget.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowCause {
    /// None: nothing to measure.
    pub good: Option<bool>,
    pub observed: Option<f64>,
    /// The budget's workload (or, for "*", the node's held-back workload) in the window.
    pub time: TimeBreakdown,
    /// The window's length.
    pub window_ns: u64,
    pub bottleneck: Bottleneck,
    /// The verdict's one line.
    pub summary: String,
}

impl WindowCause {
    pub fn of(
        good: Option<bool>,
        observed: Option<f64>,
        window_ns: u64,
        judged: Option<(&TimeBreakdown, &Verdict)>,
    ) -> Self {
        Self {
            good,
            observed,
            window_ns,
            time: judged.map(|(time, _)| *time).unwrap_or_default(),
            bottleneck: judged.map_or(Bottleneck::None, |(_, v)| v.bottleneck),
            summary: judged.map(|(_, v)| v.summary.clone()).unwrap_or_default(),
        }
    }
}

/// A budget's last windows, newest last.
#[derive(Clone, Debug, Default)]
pub struct RecentWindows {
    windows: VecDeque<WindowCause>,
}

/// The bad windows behind a breach, explained: what a breach event carries (webhook JSON
/// `event.cause`, `ENVELOPE_CAUSE`, the log line, OTLP attributes `envelope.breach.cause*`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreachCause {
    /// Bad windows among the last `windows` evaluated.
    pub bad_windows: u32,
    pub windows: u32,
    /// Where the workload's active time went in those bad windows, summed.
    pub time: TimeShares,
    /// The class that took most of it (`none` when no class took a fifth), and its share.
    pub bottleneck: Bottleneck,
    pub share: f64,
    /// The latest bad window's verdict.
    pub verdict: String,
    /// All of it as one sentence.
    pub summary: String,
}

impl RecentWindows {
    /// Keeps the last `capacity` windows.
    pub fn push(&mut self, window: WindowCause, capacity: usize) {
        self.windows.push_back(window);
        while self.windows.len() > capacity.max(1) {
            self.windows.pop_front();
        }
    }

    /// The bad windows among the remembered ones, explained; None without a bad one.
    pub fn explain(
        &self,
        workload: &str,
        metric: BudgetMetric,
        bound: Bound,
        threshold: f64,
    ) -> Option<BreachCause> {
        let evaluated: Vec<&WindowCause> =
            self.windows.iter().filter(|w| w.good.is_some()).collect();
        let bad: Vec<&WindowCause> = evaluated
            .iter()
            .copied()
            .filter(|w| w.good == Some(false))
            .collect();
        let latest = bad.last()?;
        let mut time = TimeBreakdown::default();
        let mut window_ns = 0;
        for window in &bad {
            time.add(&window.time);
            window_ns += window.window_ns;
        }
        // Active thread time per second of window, as the verdict's idle rule reads it.
        let active = time.active_ns() as f64 / window_ns.max(1) as f64;
        let idle = active < Rules::default().min_active;
        let shares = time.active_shares();
        let classes = [
            (Bottleneck::Model, shares.gpu, "waiting on the GPU"),
            (Bottleneck::Storage, shares.storage, "blocked on storage"),
            (
                Bottleneck::Network,
                shares.network,
                "waiting on the network",
            ),
            (
                Bottleneck::Cpu,
                shares.on_cpu + shares.waiting_for_cpu,
                "running or waiting for a CPU",
            ),
        ];
        let (bottleneck, share, doing) = classes
            .iter()
            .copied()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, share, _)| *share >= 0.2 && !idle)
            .unwrap_or((Bottleneck::None, 0.0, ""));
        let relation = match bound {
            Bound::Ceiling => ">",
            Bound::Floor => "<",
        };
        let observed = latest
            .observed
            .map_or_else(|| "no data".to_string(), |v| format!("{v}"));
        let mut summary = format!(
            "{metric} {observed} {relation} {threshold} in {} of the last {} windows",
            bad.len(),
            evaluated.len()
        );
        if time.active_ns() == 0 {
            summary.push_str(&format!("; {workload} did not run in them"));
        } else if idle {
            summary.push_str(&format!(
                "; in those windows {workload} was mostly idle on this node (active {:.0}% of \
                 the time): what held its requests back is not here (its clients, an \
                 upstream, or work it waits for elsewhere)",
                active * 100.0
            ));
        } else if bottleneck == Bottleneck::None {
            summary.push_str(&format!(
                "; in those windows no class took a fifth of {workload}'s active time"
            ));
        } else {
            summary.push_str(&format!(
                "; in those windows {workload} lost {:.0}% of its active time {doing}",
                share * 100.0
            ));
        }
        if !latest.summary.is_empty() {
            summary.push_str(&format!("; latest: {}", latest.summary));
        }
        Some(BreachCause {
            bad_windows: bad.len() as u32,
            windows: evaluated.len() as u32,
            time: shares,
            bottleneck,
            share: (share * 1000.0).round() / 1000.0,
            verdict: latest.summary.clone(),
            summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(bottleneck: Bottleneck, summary: &str) -> Verdict {
        Verdict {
            bottleneck,
            confidence: 0.9,
            workload: Some("llm".into()),
            pid: Some(42),
            summary: summary.into(),
            evidence: vec![],
            share: 0.5,
            note: None,
        }
    }

    fn window(good: bool, observed: f64, gpu_ms: u64, cpu_ms: u64) -> WindowCause {
        let time = TimeBreakdown {
            gpu_ns: gpu_ms * 1_000_000,
            on_cpu_ns: cpu_ms * 1_000_000,
            other_sleep_ns: 5_000_000_000,
            ..Default::default()
        };
        let bottleneck = if gpu_ms > cpu_ms {
            Bottleneck::Model
        } else {
            Bottleneck::Cpu
        };
        WindowCause::of(
            Some(good),
            Some(observed),
            1_000_000_000,
            Some((
                &time,
                &verdict(bottleneck, &format!("{bottleneck} - llm (pid 42)")),
            )),
        )
    }

    #[test]
    fn the_bad_windows_say_where_the_time_went() {
        let mut recent = RecentWindows::default();
        recent.push(window(true, 300.0, 100, 900), 6);
        for observed in [612.0, 640.0, 700.0, 580.0, 612.0] {
            recent.push(window(false, observed, 580, 420), 6);
        }
        let cause = recent
            .explain("llm", BudgetMetric::TtftP95Ms, Bound::Ceiling, 400.0)
            .unwrap();
        assert_eq!((cause.bad_windows, cause.windows), (5, 6));
        assert_eq!(cause.bottleneck, Bottleneck::Model);
        assert_eq!(cause.share, 0.58, "the good window's CPU time is not in it");
        assert_eq!(
            cause.summary,
            "ttft_p95_ms 612 > 400 in 5 of the last 6 windows; in those windows llm lost 58% \
             of its active time waiting on the GPU; latest: model - llm (pid 42)"
        );
    }

    #[test]
    fn only_the_last_windows_count_and_good_ones_explain_nothing() {
        let mut recent = RecentWindows::default();
        recent.push(window(false, 9.0, 900, 100), 3);
        for _ in 0..3 {
            recent.push(window(true, 1.0, 900, 100), 3);
        }
        assert_eq!(
            recent.explain("llm", BudgetMetric::RequestsPerS, Bound::Floor, 5.0),
            None,
            "the bad window fell out of the last 3"
        );
        recent.push(WindowCause::of(None, None, 1_000_000_000, None), 3);
        recent.push(window(false, 2.0, 100, 900), 3);
        let cause = recent
            .explain("llm", BudgetMetric::RequestsPerS, Bound::Floor, 5.0)
            .unwrap();
        assert_eq!(
            (cause.bad_windows, cause.windows),
            (1, 2),
            "no-data windows are not evaluated"
        );
        assert_eq!(cause.bottleneck, Bottleneck::Cpu);
        assert!(
            cause
                .summary
                .starts_with("requests_per_s 2 < 5 in 1 of the last 2 windows"),
            "{}",
            cause.summary
        );
    }

    #[test]
    fn a_mostly_idle_workload_is_not_said_to_lose_its_time_to_a_class() {
        let mut recent = RecentWindows::default();
        // 30 ms of CPU in a 1 s window: the verdict's idle rule (active < 25%).
        recent.push(window(false, 9.0, 0, 30), 3);
        let cause = recent
            .explain("llm", BudgetMetric::TtftP95Ms, Bound::Ceiling, 5.0)
            .unwrap();
        assert_eq!(cause.bottleneck, Bottleneck::None);
        assert!(
            cause
                .summary
                .contains("llm was mostly idle on this node (active 3% of the time)"),
            "{}",
            cause.summary
        );
    }
}
