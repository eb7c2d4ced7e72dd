//! The product's vocabulary as types: each word has one spelling, used by the terminal and
//! JSON reports, the log, OTLP metrics and events, the webhook body and the action
//! environment. Adding a budget metric means adding a variant here (with its unit, range and
//! bounds) and how to measure it in `budgets::measure`; the compiler finds the rest.
use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// What holds a workload back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bottleneck {
    Model,
    Storage,
    Network,
    Cpu,
    None,
}

impl Bottleneck {
    pub const ALL: [Bottleneck; 5] = [
        Bottleneck::Model,
        Bottleneck::Storage,
        Bottleneck::Network,
        Bottleneck::Cpu,
        Bottleneck::None,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bottleneck::Model => "model",
            Bottleneck::Storage => "storage",
            Bottleneck::Network => "network",
            Bottleneck::Cpu => "cpu",
            Bottleneck::None => "none",
        }
    }
}

impl fmt::Display for Bottleneck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a value must stay below (ceiling, `max`) or above (floor, `min`) its threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Ceiling,
    Floor,
}

impl Bound {
    /// The configuration key that sets it.
    pub fn key(self) -> &'static str {
        match self {
            Bound::Ceiling => "max",
            Bound::Floor => "min",
        }
    }
}

/// A budget's breach: firing, or not (resolved, which is also where every budget starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreachStatus {
    /// Also read from older state files and webhooks that wrote "ok".
    #[serde(alias = "ok")]
    Resolved,
    Firing,
}

impl BreachStatus {
    pub fn name(self) -> &'static str {
        match self {
            BreachStatus::Resolved => "resolved",
            BreachStatus::Firing => "firing",
        }
    }
}

impl fmt::Display for BreachStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a window without data means for a budget (`on_no_data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoDataPolicy {
    /// No event: an idle workload neither spends nor earns error budget (the default).
    #[default]
    Ignore,
    /// A bad event: silence is itself a breach (e.g. a service that must keep serving).
    Breach,
}

impl NoDataPolicy {
    pub fn name(self) -> &'static str {
        match self {
            NoDataPolicy::Ignore => "ignore",
            NoDataPolicy::Breach => "breach",
        }
    }
}

/// What a budget's objective counts: windows within the bound (the default), or requests
/// within it (`objective_basis = "requests"`: "99% of requests under 1.5 s").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveBasis {
    #[default]
    Windows,
    Requests,
}

impl ObjectiveBasis {
    pub fn name(self) -> &'static str {
        match self {
            ObjectiveBasis::Windows => "windows",
            ObjectiveBasis::Requests => "requests",
        }
    }
}

/// The unit a budget metric is measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricUnit {
    Milliseconds,
    /// A count per window.
    Count,
    /// A fraction, 0..1.
    Ratio,
    /// 0 or 1.
    Flag,
    /// [pricing] currency per hour.
    CostPerHour,
    /// [pricing] currency (per request, per 1,000 tokens).
    Cost,
    PerSecond,
    Bytes,
}

/// The metrics a budget can bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMetric {
    StorageP95Ms,
    NetworkRttP95Ms,
    Retransmits,
    GpuUtilization,
    GpuThrottled,
    CostPerHour,
    LostShareStorage,
    LostShareNetwork,
    LostShareModel,
    LostShareCpu,
    RequestP95Ms,
    TtftP95Ms,
    TpotP95Ms,
    QueueP95Ms,
    RequestsPerS,
    CacheHitRate,
    CostPerRequest,
    #[serde(rename = "cost_per_1k_tokens")]
    CostPer1kTokens,
    GpuMemoryBytes,
    ConnectP95Ms,
    RetransmitsPerS,
}

impl BudgetMetric {
    pub const ALL: [BudgetMetric; 21] = [
        BudgetMetric::StorageP95Ms,
        BudgetMetric::NetworkRttP95Ms,
        BudgetMetric::Retransmits,
        BudgetMetric::GpuUtilization,
        BudgetMetric::GpuThrottled,
        BudgetMetric::CostPerHour,
        BudgetMetric::LostShareStorage,
        BudgetMetric::LostShareNetwork,
        BudgetMetric::LostShareModel,
        BudgetMetric::LostShareCpu,
        BudgetMetric::RequestP95Ms,
        BudgetMetric::TtftP95Ms,
        BudgetMetric::TpotP95Ms,
        BudgetMetric::QueueP95Ms,
        BudgetMetric::RequestsPerS,
        BudgetMetric::CacheHitRate,
        BudgetMetric::CostPerRequest,
        BudgetMetric::CostPer1kTokens,
        BudgetMetric::GpuMemoryBytes,
        BudgetMetric::ConnectP95Ms,
        BudgetMetric::RetransmitsPerS,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BudgetMetric::StorageP95Ms => "storage_p95_ms",
            BudgetMetric::NetworkRttP95Ms => "network_rtt_p95_ms",
            BudgetMetric::Retransmits => "retransmits",
            BudgetMetric::GpuUtilization => "gpu_utilization",
            BudgetMetric::GpuThrottled => "gpu_throttled",
            BudgetMetric::CostPerHour => "cost_per_hour",
            BudgetMetric::LostShareStorage => "lost_share_storage",
            BudgetMetric::LostShareNetwork => "lost_share_network",
            BudgetMetric::LostShareModel => "lost_share_model",
            BudgetMetric::LostShareCpu => "lost_share_cpu",
            BudgetMetric::RequestP95Ms => "request_p95_ms",
            BudgetMetric::TtftP95Ms => "ttft_p95_ms",
            BudgetMetric::TpotP95Ms => "tpot_p95_ms",
            BudgetMetric::QueueP95Ms => "queue_p95_ms",
            BudgetMetric::RequestsPerS => "requests_per_s",
            BudgetMetric::CacheHitRate => "cache_hit_rate",
            BudgetMetric::CostPerRequest => "cost_per_request",
            BudgetMetric::CostPer1kTokens => "cost_per_1k_tokens",
            BudgetMetric::GpuMemoryBytes => "gpu_memory_bytes",
            BudgetMetric::ConnectP95Ms => "connect_p95_ms",
            BudgetMetric::RetransmitsPerS => "retransmits_per_s",
        }
    }

    /// What it means, for `envelope check` hints and the README.
    pub fn description(self) -> &'static str {
        match self {
            BudgetMetric::StorageP95Ms => "queued-to-complete latency P95 on the workload's device",
            BudgetMetric::NetworkRttP95Ms => "RTT P95 to the workload's slowest peer",
            BudgetMetric::Retransmits => "retransmitted packets per window to the workload's peers",
            BudgetMetric::GpuUtilization => {
                "utilization of the workload's busiest GPU, 0..1 (max: saturation, min: idle GPUs)"
            }
            BudgetMetric::GpuThrottled => {
                "1 when a GPU of the workload was throttled (other than idle), else 0"
            }
            BudgetMetric::CostPerHour => "GPUs held and CPU cores kept busy, at [pricing]",
            BudgetMetric::LostShareStorage => {
                "share of the workload's active time blocked on storage, 0..1"
            }
            BudgetMetric::LostShareNetwork => {
                "share of the workload's active time waiting on the network, 0..1"
            }
            BudgetMetric::LostShareModel => {
                "share of the workload's active time waiting on the GPU, 0..1"
            }
            BudgetMetric::LostShareCpu => {
                "share of the workload's active time running or waiting for a CPU, 0..1"
            }
            BudgetMetric::RequestP95Ms => {
                "end-to-end request P95: the engine's when it has a metrics_url, else the kernel's \
                 timing of the port the workload serves most requests on"
            }
            BudgetMetric::TtftP95Ms => {
                "time to first token P95: the engine's, else the kernel's time to the first \
                 response byte"
            }
            BudgetMetric::TpotP95Ms => "time per output token P95 (the engine's)",
            BudgetMetric::QueueP95Ms => "time queued in the engine P95",
            BudgetMetric::RequestsPerS => {
                "requests finished per second: the engine's, else the kernel's on its ports"
            }
            BudgetMetric::CacheHitRate => "the engine's prefix-cache hit rate, 0..1",
            BudgetMetric::CostPerRequest => "cost_per_hour over requests per hour, at [pricing]",
            BudgetMetric::CostPer1kTokens => {
                "cost_per_hour over the engine's prompt and generated tokens per hour, x1000"
            }
            BudgetMetric::GpuMemoryBytes => "GPU memory the workload holds on its fullest GPU",
            BudgetMetric::ConnectP95Ms => "TCP connect P95 to the workload's slowest peer",
            BudgetMetric::RetransmitsPerS => "retransmitted packets per second to its peers",
        }
    }

    pub fn unit(self) -> MetricUnit {
        match self {
            BudgetMetric::StorageP95Ms
            | BudgetMetric::NetworkRttP95Ms
            | BudgetMetric::RequestP95Ms
            | BudgetMetric::TtftP95Ms
            | BudgetMetric::TpotP95Ms
            | BudgetMetric::QueueP95Ms
            | BudgetMetric::ConnectP95Ms => MetricUnit::Milliseconds,
            BudgetMetric::Retransmits => MetricUnit::Count,
            BudgetMetric::RequestsPerS | BudgetMetric::RetransmitsPerS => MetricUnit::PerSecond,
            BudgetMetric::GpuMemoryBytes => MetricUnit::Bytes,
            BudgetMetric::GpuThrottled => MetricUnit::Flag,
            BudgetMetric::CostPerHour => MetricUnit::CostPerHour,
            BudgetMetric::CostPerRequest | BudgetMetric::CostPer1kTokens => MetricUnit::Cost,
            BudgetMetric::CacheHitRate
            | BudgetMetric::GpuUtilization
            | BudgetMetric::LostShareStorage
            | BudgetMetric::LostShareNetwork
            | BudgetMetric::LostShareModel
            | BudgetMetric::LostShareCpu => MetricUnit::Ratio,
        }
    }

    /// Metrics read from a histogram of requests, whose objective can count requests.
    pub fn counts_requests(self) -> bool {
        matches!(self, BudgetMetric::RequestP95Ms | BudgetMetric::TtftP95Ms)
    }

    /// Figures only a serving engine's own metrics give (the workload needs a metrics_url).
    pub fn engine_only(self) -> bool {
        matches!(
            self,
            BudgetMetric::TpotP95Ms
                | BudgetMetric::QueueP95Ms
                | BudgetMetric::CacheHitRate
                | BudgetMetric::CostPer1kTokens
        )
    }

    /// Latency metrics: their thresholds become bounds of the exported histograms.
    pub fn is_latency(self) -> bool {
        self.unit() == MetricUnit::Milliseconds
    }

    /// The thresholds that make sense (inclusive), as a range and as words for errors.
    pub fn valid_range(self) -> (f64, f64, &'static str) {
        match self.unit() {
            MetricUnit::Milliseconds => (0.0, 3_600_000.0, "0 to 3600000 ms (one hour)"),
            MetricUnit::Count => (0.0, 1e12, "0 or more"),
            MetricUnit::Ratio => (0.0, 1.0, "between 0 and 1 (a fraction: 0.9 is 90%)"),
            MetricUnit::Flag => (0.0, 1.0, "0 or 1"),
            MetricUnit::CostPerHour => (0.0, 1e12, "0 or more, in [pricing]'s currency per hour"),
            MetricUnit::Cost => (0.0, 1e12, "0 or more, in [pricing]'s currency"),
            MetricUnit::PerSecond => (0.0, 1e12, "0 or more, per second"),
            MetricUnit::Bytes => (0.0, 1e18, "0 or more bytes"),
        }
    }

    /// Which bounds a budget on this metric may set.
    pub fn allowed_bounds(self) -> &'static [Bound] {
        match self {
            // "At most throttled" is the only sensible question about a 0/1 flag.
            BudgetMetric::GpuThrottled => &[Bound::Ceiling],
            _ => &[Bound::Ceiling, Bound::Floor],
        }
    }
}

impl fmt::Display for BudgetMetric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BudgetMetric {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        BudgetMetric::ALL
            .into_iter()
            .find(|metric| metric.name() == text)
            .ok_or_else(|| {
                let known: Vec<&str> = BudgetMetric::ALL.iter().map(|m| m.name()).collect();
                format!("unknown metric {text:?}; one of: {}", known.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_has_one_spelling_in_serde_and_display() {
        for metric in BudgetMetric::ALL {
            assert_eq!(
                serde_json::to_value(metric).unwrap(),
                serde_json::Value::from(metric.name())
            );
            assert_eq!(metric.name().parse::<BudgetMetric>(), Ok(metric));
        }
        for bottleneck in Bottleneck::ALL {
            assert_eq!(
                serde_json::to_value(bottleneck).unwrap(),
                serde_json::Value::from(bottleneck.name())
            );
        }
        for status in [BreachStatus::Firing, BreachStatus::Resolved] {
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::Value::from(status.name())
            );
        }
        let old: BreachStatus = serde_json::from_str("\"ok\"").unwrap();
        assert_eq!(old, BreachStatus::Resolved);
    }

    #[test]
    fn an_unknown_metric_lists_the_known_ones() {
        let error = "storage_p96_ms".parse::<BudgetMetric>().unwrap_err();
        assert!(
            error.starts_with("unknown metric \"storage_p96_ms\"; one of: storage_p95_ms"),
            "{error}"
        );
    }
}
