//! The configuration file's schema as TOML spells it. Every value a user can get wrong is
//! `Spanned`, so the checks in `config::check` can name its line and column; nothing here is
//! interpreted (durations, URLs and numbers are checked there, once).
use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type Text = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadEntry>,
    #[serde(default, rename = "budget")]
    pub budgets: Vec<BudgetEntry>,
    #[serde(default, rename = "envelope")]
    pub envelopes: Vec<EnvelopeEntry>,
    #[serde(default)]
    pub pricing: PricingEntry,
    #[serde(default)]
    pub alerting: AlertingEntry,
    #[serde(default)]
    pub agent: AgentEntry,
    #[serde(default)]
    pub gpu: GpuEntry,
    #[serde(default)]
    pub export: ExportEntry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuEntry {
    /// The opt-in CUDA uprobes: "off", "sync" or "sync+launch".
    pub cuda_probes: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadEntry {
    pub name: Text,
    #[serde(default)]
    pub process: Vec<Text>,
    #[serde(default)]
    pub executable: Vec<Text>,
    #[serde(default)]
    pub cgroup_prefix: Vec<Text>,
    #[serde(default)]
    pub systemd_unit: Vec<Text>,
    #[serde(default)]
    pub container_id: Vec<Text>,
    /// The serving engine's Prometheus endpoint, and which engine it is (recognised from
    /// the names when unset; "generic" with the names below).
    pub metrics_url: Option<Text>,
    pub engine: Option<Text>,
    pub request_histogram: Option<Text>,
    pub ttft_histogram: Option<Text>,
    pub tpot_histogram: Option<Text>,
    pub queue_histogram: Option<Text>,
    pub prompt_tokens_counter: Option<Text>,
    pub generation_tokens_counter: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetEntry {
    pub name: Text,
    pub workload: Text,
    pub stage: Option<Text>,
    pub metric: Text,
    pub max: Option<Spanned<f64>>,
    pub min: Option<Spanned<f64>>,
    pub objective: Option<Spanned<f64>>,
    pub objective_basis: Option<Text>,
    pub device: Option<Text>,
    pub peer: Option<Text>,
    pub on_no_data: Option<Text>,
    #[serde(default)]
    pub actions: Vec<Spanned<ActionEntry>>,
}

/// An inference envelope: end-to-end bounds measured at its entry workload, and the stages
/// (workloads, or upstreams of the entry) each bound's allocation is split between.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeEntry {
    pub name: Text,
    pub entry: Text,
    pub request_p95_ms: Option<Spanned<f64>>,
    pub cost_per_request: Option<Spanned<f64>>,
    pub objective: Option<Spanned<f64>>,
    pub objective_basis: Option<Text>,
    pub on_no_data: Option<Text>,
    #[serde(default)]
    pub actions: Vec<Spanned<ActionEntry>>,
    #[serde(default, rename = "stage")]
    pub stages: Vec<StageEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageEntry {
    pub name: Text,
    pub workload: Option<Text>,
    pub peer: Option<Text>,
    pub request_p95_ms: Option<Spanned<f64>>,
    pub cost_per_request: Option<Spanned<f64>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionEntry {
    pub command: Option<Spanned<Vec<String>>>,
    pub webhook: Option<Text>,
    pub timeout: Option<Text>,
    /// Webhooks: headers sent with the POST (tokens belong here, not in the URL).
    #[serde(default)]
    pub headers: BTreeMap<String, Text>,
    /// Webhooks: allow a link-local or cloud-metadata address (refused by default).
    pub allow_link_local: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingEntry {
    pub gpu_hour: Option<Spanned<f64>>,
    pub cpu_core_hour: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertingEntry {
    pub windows: Option<Spanned<Vec<BurnWindowEntry>>>,
    pub enter_after: Option<Spanned<i64>>,
    pub leave_after: Option<Spanned<i64>>,
    pub action_min_interval: Option<Text>,
    /// Refuse webhooks that are not https://.
    pub https_only: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurnWindowEntry {
    pub long: Text,
    pub short: Text,
    pub factor: Spanned<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    pub window: Option<Text>,
    pub gpu_interval: Option<Text>,
    pub engine_timeout: Option<Text>,
    pub nvml_lib: Option<Text>,
    pub state_dir: Option<Text>,
    pub max_workloads: Option<Spanned<i64>>,
    pub max_peers: Option<Spanned<i64>>,
    pub max_devices: Option<Spanned<i64>>,
    pub max_gpu_processes: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportEntry {
    pub enabled: Option<bool>,
    pub protocol: Option<Text>,
    pub endpoint: Option<Text>,
    pub metrics_endpoint: Option<Text>,
    pub logs_endpoint: Option<Text>,
    #[serde(default)]
    pub headers: BTreeMap<String, Text>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub ca_file: Option<Text>,
    /// A Prometheus scrape endpoint on the agent (off by default).
    pub prometheus: Option<bool>,
    pub prometheus_listen: Option<Text>,
}
