//! The configuration file (TOML), read once and checked into typed settings.
//!
//! `file` is the schema as written; `check` turns it into [`LoadedConfig`], refusing anything
//! `run` could not run, with the offending value's line and column and what to write
//! instead. `envelope check`, `envelope run`, `envelope diagnose` and a SIGHUP reload all go
//! through [`load`], so they accept exactly the same files.
//!
//! ```toml
//! [[workload]]
//! name = "trainer"
//! # A process belongs to the first workload with a rule that matches it.
//! process = ["python*", "torchrun"]       # globs on the process name
//! executable = ["/opt/trainer/bin/*"]     # globs on the executable's path
//! cgroup_prefix = ["/system.slice/trainer.service"]
//! systemd_unit = ["trainer.service"]
//! container_id = ["3f4e5d6c7b8a"]         # prefixes of container ids
//! ```
pub mod archive;
mod check;
mod file;
mod workloads;

use std::{
    fs::File,
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

pub use check::{MAX_WINDOW, MIN_WINDOW, check_header, check_window};
pub use workloads::{ProcessFacts, WorkloadRules};

use crate::model::{
    engine::EngineChoice,
    vocabulary::{Bound, BudgetMetric, NoDataPolicy, ObjectiveBasis},
};

/// Largest configuration file read (a real one is a few KiB; this keeps `/dev/zero` or a
/// runaway generator from filling memory).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A checked configuration: everything `run` needs, typed.
#[derive(Debug, Default)]
pub struct LoadedConfig {
    pub workloads: WorkloadRules,
    /// Serving engines' metrics endpoints, one per workload that names one.
    pub engines: Vec<EngineEndpointConfig>,
    /// In file order.
    pub budgets: Vec<Budget>,
    pub pricing: Pricing,
    pub alerting: Alerting,
    pub agent: AgentSettings,
    pub gpu: GpuSettings,
    pub export: ExportConfig,
}

/// `[gpu]`: how GPU work is seen beyond NVML.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSettings {
    /// Which CUDA calls the uprobes count (off by default).
    pub cuda_probes: crate::model::gpu::CudaProbes,
}

impl LoadedConfig {
    /// How a budget is evaluated: the shared alerting policy with its own objective.
    pub fn policy(&self, budget: &Budget) -> BudgetPolicy {
        BudgetPolicy {
            objective: budget.objective,
            burn_rate_windows: self.alerting.burn_rate_windows.clone(),
            enter_after: self.alerting.enter_after,
            leave_after: self.alerting.leave_after,
            on_no_data: budget.on_no_data,
            basis: budget.objective_basis,
        }
    }
}

/// A workload's serving-engine endpoint (`metrics_url`).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineEndpointConfig {
    pub workload: String,
    pub url: String,
    pub engine: EngineChoice,
}

/// One budget: a metric of a workload (or "*", the node), a ceiling or a floor, an objective,
/// and what to do when its breach fires or resolves.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub name: String,
    /// A configured workload's name, or "*" for the whole node.
    pub workload: String,
    /// Informational: the stage of the workload this budget guards (e.g. "retrieval").
    pub stage: Option<String>,
    pub metric: BudgetMetric,
    pub bound: Bound,
    /// In the metric's unit; finite and within its range.
    pub threshold: f64,
    /// Target share of good windows (or requests), strictly between 0 and 1.
    pub objective: f64,
    /// Whether the objective counts windows or requests.
    pub objective_basis: ObjectiveBasis,
    /// Storage metrics: this device only (default: the device the workload used most).
    pub device: Option<String>,
    /// Network metrics: this peer only, "addr:port" (default: the workload's slowest peer).
    pub peer: Option<String>,
    /// A window without data: no event (default) or a bad one.
    pub on_no_data: NoDataPolicy,
    pub actions: Vec<Action>,
    /// An envelope's end-to-end bound: the stages its allocation is split between (empty
    /// for a plain budget).
    pub stages: Vec<StageAllocation>,
}

/// One stage's share of an envelope bound.
#[derive(Clone, Debug, PartialEq)]
pub struct StageAllocation {
    pub name: String,
    /// The stage is this workload's own figure...
    pub workload: Option<String>,
    /// ... or the entry workload's requests to this upstream ("addr:port").
    pub peer: Option<String>,
    /// In the bound's unit.
    pub allocation: f64,
}

/// One action: run a command (argv, no shell) or POST the breach to a webhook.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    Webhook {
        url: String,
        timeout: Duration,
        /// Sent with the POST, e.g. ("authorization", "Bearer ...").
        headers: Vec<(String, String)>,
        /// Whether a link-local or cloud-metadata address may be the target.
        allow_link_local: bool,
    },
}

/// A URL as logs may show it: user and password, and the query, replaced by `***` (tokens
/// often live there).
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if !parsed.username().is_empty() || parsed.password().is_some() {
                let _ = parsed.set_username("***");
                let _ = parsed.set_password(None);
            }
            if parsed.query().is_some() {
                parsed.set_query(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(an unparsable URL)".to_string(),
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Command { argv, .. } => write!(f, "command {argv:?}"),
            Action::Webhook { url, .. } => write!(f, "webhook {}", redacted_url(url)),
        }
    }
}

/// Prices that turn GPU and CPU use into a cost rate (any currency, per hour).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pricing {
    pub gpu_hour: Option<f64>,
    pub cpu_core_hour: Option<f64>,
}

/// Burn-rate windows, hysteresis and the action rate limit, shared by every budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Alerting {
    pub burn_rate_windows: Vec<BurnRateWindow>,
    /// Consecutive alerting evaluations before a breach fires (>= 1).
    pub enter_after: u32,
    /// Consecutive quiet evaluations before a firing breach resolves (>= 1).
    pub leave_after: u32,
    /// Least time between two actions of one budget in one direction.
    pub action_min_interval: Duration,
    /// Webhooks must be https://.
    pub https_only: bool,
}

impl Default for Alerting {
    fn default() -> Self {
        Self {
            burn_rate_windows: DEFAULT_BURN_RATE_WINDOWS.to_vec(),
            enter_after: 2,
            leave_after: 3,
            action_min_interval: Duration::from_secs(300),
            https_only: false,
        }
    }
}

/// One burn-rate alert pair (Google SRE workbook): it holds when the burn rate over both the
/// long and the short window reaches `factor`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BurnRateWindow {
    pub long_s: u64,
    pub short_s: u64,
    pub factor: f64,
}

/// The workbook's defaults for a 30-day objective: page at 14.4 over 1 h and 5 min, page at 6
/// over 6 h and 30 min, ticket at 1 over 3 days and 6 h.
pub const DEFAULT_BURN_RATE_WINDOWS: [BurnRateWindow; 3] = [
    BurnRateWindow {
        long_s: 3_600,
        short_s: 300,
        factor: 14.4,
    },
    BurnRateWindow {
        long_s: 21_600,
        short_s: 1_800,
        factor: 6.0,
    },
    BurnRateWindow {
        long_s: 259_200,
        short_s: 21_600,
        factor: 1.0,
    },
];

/// How one budget is evaluated.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetPolicy {
    /// Target ratio of good windows, e.g. 0.99. The error budget is `1 - objective`.
    pub objective: f64,
    pub burn_rate_windows: Vec<BurnRateWindow>,
    /// Consecutive alerting windows before the breach fires.
    pub enter_after: u32,
    /// Consecutive quiet windows before a firing breach resolves.
    pub leave_after: u32,
    /// What a window without data counts as.
    pub on_no_data: NoDataPolicy,
    /// Windows or requests.
    pub basis: ObjectiveBasis,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        let alerting = Alerting::default();
        Self {
            objective: 0.99,
            burn_rate_windows: alerting.burn_rate_windows,
            enter_after: alerting.enter_after,
            leave_after: alerting.leave_after,
            on_no_data: NoDataPolicy::Ignore,
            basis: ObjectiveBasis::Windows,
        }
    }
}

/// `[agent]`: how `run` and `diagnose` measure.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    /// One evaluation window: attribution and budgets run once per window.
    pub window: Duration,
    /// How often the GPUs are read within a window.
    pub gpu_interval: Duration,
    /// One scrape of a serving engine's metrics endpoint, connect to last byte.
    pub engine_timeout: Duration,
    /// NVML library to load instead of the driver's libnvidia-ml.so.1.
    pub nvml_lib: Option<PathBuf>,
    /// Budget state and the configuration archive live here.
    pub state_dir: PathBuf,
    /// Cardinality limits: series beyond them are exported under "other".
    pub max_workloads: usize,
    pub max_peers: usize,
    pub max_devices: usize,
    pub max_gpu_processes: usize,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            gpu_interval: Duration::from_secs(2),
            engine_timeout: Duration::from_secs(2),
            nvml_lib: None,
            state_dir: archive::DEFAULT_STATE_DIR.into(),
            max_workloads: 50,
            max_peers: 50,
            max_devices: 32,
            max_gpu_processes: 50,
        }
    }
}

/// `[export]`, checked: where and how metrics and breach events go (OTLP). Unset fields fall
/// back to the standard OTEL_EXPORTER_OTLP_* environment variables, then to the defaults
/// (see `export::otlp::OtlpSettings::resolve`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExportConfig {
    /// false: measure, evaluate and log, but send nothing.
    pub enabled: Option<bool>,
    /// "grpc" (default) or "http/protobuf".
    pub protocol: Option<String>,
    /// Base endpoint, e.g. "http://collector:4317" (gRPC) or "http://collector:4318" (HTTP;
    /// /v1/metrics and /v1/logs are appended).
    pub endpoint: Option<String>,
    /// Full URLs per signal, used as they are.
    pub metrics_endpoint: Option<String>,
    pub logs_endpoint: Option<String>,
    pub headers: std::collections::BTreeMap<String, String>,
    /// How often metrics are sent (rounded up to whole windows; default: every window).
    pub interval: Option<Duration>,
    /// Per export request.
    pub timeout: Option<Duration>,
    /// PEM file of the CA that signed the collector's certificate (https endpoints).
    pub ca_file: Option<String>,
    /// Where the Prometheus scrape endpoint listens; None: off.
    pub prometheus_listen: Option<std::net::SocketAddr>,
}

/// Where `[export] prometheus = true` listens unless `prometheus_listen` says otherwise:
/// this node only (the OpenTelemetry Prometheus exporter's port).
pub const DEFAULT_PROMETHEUS_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (the OS error is in `problem`, once).
    #[error("cannot read the configuration {path}: {problem}")]
    Read { path: String, problem: String },
    /// A value is wrong: where, what, and what to write instead.
    #[error("{path}:{line}:{column}: {message}")]
    At {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// The OS error without Rust's "(os error N)" suffix, which says nothing more to a user.
fn os_problem(error: &std::io::Error) -> String {
    let text = error.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Reads a configuration: a regular file of at most [`MAX_CONFIG_BYTES`], never blocking
/// (a FIFO or a device is refused at once, not read).
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let shown = path.display().to_string();
    let refuse = |problem: String| ConfigError::Read {
        path: shown.clone(),
        problem,
    };
    // O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever.
    let mut file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| refuse(os_problem(&error)))?;
    let metadata = file
        .metadata()
        .map_err(|error| refuse(os_problem(&error)))?;
    let kind = metadata.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(refuse(format!(
            "it is {what}; give the path of a TOML file"
        )));
    }
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(refuse(format!(
            "it is {} bytes; a configuration is at most {MAX_CONFIG_BYTES} bytes (1 MiB)",
            metadata.len()
        )));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    (&mut file)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| refuse(os_problem(&error)))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(refuse(format!(
            "it grew past {MAX_CONFIG_BYTES} bytes (1 MiB) while being read"
        )));
    }
    String::from_utf8(bytes).map_err(|error| {
        refuse(format!(
            "it is not UTF-8 text (invalid byte at offset {})",
            error.utf8_error().valid_up_to()
        ))
    })
}

/// Reads, parses and checks a configuration file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text = read_text(path)?;
    parse_config(&path.display().to_string(), &text)
}

/// Parses and checks a whole configuration; `path` only names it in errors.
pub fn parse_config(path: &str, text: &str) -> Result<LoadedConfig, ConfigError> {
    check::check(path, text)
}

/// Parses a configuration text for its workload rules only.
pub fn parse(path: &str, text: &str) -> Result<WorkloadRules, ConfigError> {
    parse_config(path, text).map(|config| config.workloads)
}

#[cfg(test)]
mod tests;
