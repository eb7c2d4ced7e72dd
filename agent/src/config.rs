//! The configuration file (TOML). Today it names workloads; budgets join it later.
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
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "workload")]
    pub workloads: Vec<WorkloadConfig>,
    #[serde(default, rename = "budget")]
    pub budgets: Vec<BudgetConfig>,
    #[serde(default)]
    pub pricing: PricingConfig,
    #[serde(default)]
    pub alerting: AlertingConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub export: ExportConfig,
}

/// How the daemon (`envelope run`) measures.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// One evaluation window: attribution and budgets run once per window.
    pub window: String,
    /// How often the GPUs are read within a window.
    pub gpu_interval: String,
    /// NVML library to load instead of the driver's libnvidia-ml.so.1.
    pub nvml_lib: Option<String>,
    /// Budget state and the configuration archive live here.
    pub state_dir: String,
    /// Cardinality limits: series beyond them are exported under "other".
    pub max_workloads: usize,
    pub max_peers: usize,
    pub max_devices: usize,
    pub max_gpu_processes: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            window: "10s".into(),
            gpu_interval: "2s".into(),
            nvml_lib: None,
            state_dir: crate::config_archive::DEFAULT_STATE_DIR.into(),
            max_workloads: 50,
            max_peers: 50,
            max_devices: 32,
            max_gpu_processes: 50,
        }
    }
}

/// Where and how metrics and breach events go (OTLP). Unset fields fall back to the standard
/// OTEL_EXPORTER_OTLP_* environment variables, then to the defaults.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// false: measure, evaluate and log, but send nothing.
    pub enabled: Option<bool>,
    /// "grpc" (default) or "http/protobuf".
    pub protocol: Option<String>,
    /// Base endpoint, e.g. "http://collector:4317" (gRPC) or "http://collector:4318" (HTTP;
    /// /v1/metrics and /v1/logs are appended).
    pub endpoint: Option<String>,
    /// Full URLs per signal, used as they are (e.g. VictoriaMetrics'
    /// "http://vm:8428/opentelemetry/v1/metrics").
    pub metrics_endpoint: Option<String>,
    pub logs_endpoint: Option<String>,
    pub headers: std::collections::BTreeMap<String, String>,
    /// How often metrics are sent (rounded up to whole windows; default: every window).
    pub interval: Option<String>,
    /// Per export request.
    pub timeout: Option<String>,
    /// PEM file of the CA that signed the collector's certificate (https endpoints).
    pub ca_file: Option<String>,
}

/// Prices that turn GPU and CPU use into a cost rate (any currency, per hour).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    pub gpu_hour: Option<f64>,
    pub cpu_core_hour: Option<f64>,
}

/// Burn-rate windows and hysteresis shared by every budget.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertingConfig {
    #[serde(default = "default_windows")]
    pub windows: Vec<BurnWindowConfig>,
    #[serde(default = "default_enter_after")]
    pub enter_after: u32,
    #[serde(default = "default_leave_after")]
    pub leave_after: u32,
    /// Least time between two actions of one budget.
    #[serde(default = "default_action_min_interval")]
    pub action_min_interval: String,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            windows: default_windows(),
            enter_after: default_enter_after(),
            leave_after: default_leave_after(),
            action_min_interval: default_action_min_interval(),
        }
    }
}

fn default_action_min_interval() -> String {
    "5m".to_string()
}

fn default_enter_after() -> u32 {
    crate::budgets::BudgetPolicy::default().enter_after
}

fn default_leave_after() -> u32 {
    crate::budgets::BudgetPolicy::default().leave_after
}

fn default_windows() -> Vec<BurnWindowConfig> {
    crate::budgets::DEFAULT_BURN_RATE_WINDOWS
        .iter()
        .map(|w| BurnWindowConfig {
            long: humantime::format_duration(std::time::Duration::from_secs(w.long_s)).to_string(),
            short: humantime::format_duration(std::time::Duration::from_secs(w.short_s))
                .to_string(),
            factor: w.factor,
        })
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurnWindowConfig {
    pub long: String,
    pub short: String,
    pub factor: f64,
}

/// One budget: a metric of a workload (or "*", the node), a ceiling or a floor, an objective.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub name: String,
    pub workload: String,
    /// Informational: the stage of the workload this budget guards (e.g. "retrieval").
    pub stage: Option<String>,
    pub metric: String,
    pub max: Option<f64>,
    pub min: Option<f64>,
    #[serde(default = "default_objective")]
    pub objective: f64,
    /// Storage metrics: this device only (default: the device the workload used most).
    pub device: Option<String>,
    /// Network metrics: this peer only, "addr:port" (default: the workload's slowest peer).
    pub peer: Option<String>,
    /// What to do when the budget's breach fires or resolves.
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
}

/// One action: `command` (argv, no shell) or `webhook` (a URL to POST the breach to).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    pub command: Option<Vec<String>>,
    pub webhook: Option<String>,
    #[serde(default = "default_action_timeout")]
    pub timeout: String,
}

fn default_action_timeout() -> String {
    "10s".to_string()
}

fn default_objective() -> f64 {
    0.99
}

/// The metrics a budget can bound, with what they mean (for `envelope check` hints).
pub const BUDGET_METRICS: [(&str, &str); 10] = [
    (
        "storage_p95_ms",
        "queued-to-complete latency P95 on the workload's device",
    ),
    (
        "network_rtt_p95_ms",
        "RTT P95 to the workload's slowest peer",
    ),
    (
        "retransmits",
        "retransmitted packets per window to the workload's peers",
    ),
    (
        "gpu_utilization",
        "utilization of the workload's busiest GPU, 0..1 (max: saturation, min: idle GPUs)",
    ),
    (
        "gpu_throttled",
        "1 when a GPU of the workload was throttled (other than idle), else 0",
    ),
    (
        "cost_per_hour",
        "GPUs held and CPU cores kept busy, at [pricing]",
    ),
    (
        "lost_share_storage",
        "share of the workload's active time blocked on storage, 0..1",
    ),
    (
        "lost_share_network",
        "share of the workload's active time waiting on the network, 0..1",
    ),
    (
        "lost_share_model",
        "share of the workload's active time waiting on the GPU, 0..1",
    ),
    (
        "lost_share_cpu",
        "share of the workload's active time running or waiting for a CPU, 0..1",
    ),
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(default)]
    pub process: Vec<String>,
    #[serde(default)]
    pub executable: Vec<String>,
    #[serde(default)]
    pub cgroup_prefix: Vec<String>,
    #[serde(default)]
    pub systemd_unit: Vec<String>,
    #[serde(default)]
    pub container_id: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: workload {workload:?}: bad glob {pattern:?}: {message}")]
    Glob {
        path: String,
        workload: String,
        pattern: String,
        message: String,
    },
    #[error(
        "{path}: workload {workload:?} has no match rule (process, executable, cgroup_prefix, systemd_unit or container_id)"
    )]
    NoRule { path: String, workload: String },
    #[error("{path}: two workloads are named {name:?}; names must be unique")]
    Duplicate { path: String, name: String },
    #[error("{path}: [{section}]: {problem}")]
    Section {
        path: String,
        section: &'static str,
        problem: String,
    },
    #[error("{path}:{line}: budget {budget:?}: {problem}")]
    Budget {
        path: String,
        line: usize,
        budget: String,
        problem: String,
    },
}

/// What a matcher knows about a process.
#[derive(Clone, Debug, Default)]
pub struct ProcessFacts<'a> {
    pub name: &'a str,
    pub executable: Option<&'a str>,
    pub cgroup: Option<&'a str>,
}

/// Compiled match rules of one workload.
#[derive(Debug)]
struct WorkloadMatcher {
    name: String,
    process: GlobSet,
    executable: GlobSet,
    cgroup_prefix: Vec<String>,
    systemd_unit: Vec<String>,
    container_id: Vec<String>,
}

/// Every configured workload, in file order.
#[derive(Debug, Default)]
pub struct WorkloadRules {
    matchers: Vec<WorkloadMatcher>,
}

impl WorkloadRules {
    /// The first configured workload whose rules match the process.
    pub fn workload_of(&self, process: &ProcessFacts<'_>) -> Option<&str> {
        self.matchers
            .iter()
            .find(|m| m.matches(process))
            .map(|m| m.name.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }
}

impl WorkloadMatcher {
    fn matches(&self, process: &ProcessFacts<'_>) -> bool {
        if self.process.is_match(process.name) {
            return true;
        }
        if process
            .executable
            .is_some_and(|exe| self.executable.is_match(exe))
        {
            return true;
        }
        let Some(cgroup) = process.cgroup else {
            return false;
        };
        self.cgroup_prefix
            .iter()
            .any(|prefix| cgroup.starts_with(prefix.as_str()))
            || cgroup
                .split('/')
                .any(|segment| self.systemd_unit.iter().any(|unit| unit == segment))
            || crate::attribution::container_id(cgroup).is_some_and(|id| {
                self.container_id
                    .iter()
                    .any(|prefix| id.starts_with(prefix.as_str()))
            })
    }
}

fn glob_set(path: &str, workload: &str, patterns: &[String]) -> Result<GlobSet, ConfigError> {
    let mut builder = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern).map_err(|error| ConfigError::Glob {
            path: path.to_string(),
            workload: workload.to_string(),
            pattern: pattern.clone(),
            message: error.kind().to_string(),
        })?;
        builder.add(glob);
    }
    builder.build().map_err(|error| ConfigError::Glob {
        path: path.to_string(),
        workload: workload.to_string(),
        pattern: patterns.join(", "),
        message: error.to_string(),
    })
}

/// 1-based line and column of a byte offset.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |tail| tail.chars().count())
        + 1;
    (line, column)
}

/// A validated configuration: compiled workload rules, budgets and their policy.
#[derive(Debug, Default)]
pub struct LoadedConfig {
    pub workloads: WorkloadRules,
    pub budgets: Vec<BudgetConfig>,
    pub pricing: PricingConfig,
    pub policy: crate::budgets::BudgetPolicy,
    /// Validated actions per budget, in budget order.
    pub actions: Vec<Vec<crate::actions::Action>>,
    pub action_min_interval: std::time::Duration,
    pub agent: AgentSettings,
    pub export: ExportConfig,
}

/// `[agent]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentSettings {
    pub window: std::time::Duration,
    pub gpu_interval: std::time::Duration,
    pub nvml_lib: Option<std::path::PathBuf>,
    pub state_dir: std::path::PathBuf,
    pub max_workloads: usize,
    pub max_peers: usize,
    pub max_devices: usize,
    pub max_gpu_processes: usize,
}

impl Default for AgentSettings {
    fn default() -> Self {
        validate_agent("", &AgentConfig::default()).expect("the defaults are valid")
    }
}

fn validate_agent(path: &str, agent: &AgentConfig) -> Result<AgentSettings, ConfigError> {
    let problem = |problem: String| ConfigError::Section {
        path: path.to_string(),
        section: "agent",
        problem,
    };
    let duration = |field: &str, value: &str| {
        humantime::parse_duration(value).map_err(|error| {
            problem(format!(
                "{field} {value:?} is not a duration ({error}); use e.g. 10s"
            ))
        })
    };
    let window = duration("window", &agent.window)?;
    if window < std::time::Duration::from_millis(500) {
        return Err(problem(format!(
            "window {:?} is too short; use 500ms or more (10s is the default)",
            agent.window
        )));
    }
    let gpu_interval = duration("gpu_interval", &agent.gpu_interval)?;
    if gpu_interval.is_zero() {
        return Err(problem("gpu_interval must be above zero, e.g. 2s".into()));
    }
    for (field, value) in [
        ("max_workloads", agent.max_workloads),
        ("max_peers", agent.max_peers),
        ("max_devices", agent.max_devices),
        ("max_gpu_processes", agent.max_gpu_processes),
    ] {
        if value == 0 {
            return Err(problem(format!("{field} must be at least 1")));
        }
    }
    Ok(AgentSettings {
        window,
        gpu_interval,
        nvml_lib: agent.nvml_lib.as_ref().map(Into::into),
        state_dir: agent.state_dir.clone().into(),
        max_workloads: agent.max_workloads,
        max_peers: agent.max_peers,
        max_devices: agent.max_devices,
        max_gpu_processes: agent.max_gpu_processes,
    })
}

fn validate_export(path: &str, export: &ExportConfig) -> Result<(), ConfigError> {
    let problem = |problem: String| ConfigError::Section {
        path: path.to_string(),
        section: "export",
        problem,
    };
    if let Some(protocol) = &export.protocol
        && !["grpc", "http/protobuf"].contains(&protocol.as_str())
    {
        return Err(problem(format!(
            "protocol {protocol:?} is not supported; use \"grpc\" or \"http/protobuf\""
        )));
    }
    for (field, value) in [
        ("endpoint", &export.endpoint),
        ("metrics_endpoint", &export.metrics_endpoint),
        ("logs_endpoint", &export.logs_endpoint),
    ] {
        if let Some(url) = value
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(problem(format!(
                "{field} {url:?} needs a scheme: http://host:port or https://host:port"
            )));
        }
    }
    for (field, value) in [("interval", &export.interval), ("timeout", &export.timeout)] {
        if let Some(value) = value {
            humantime::parse_duration(value).map_err(|error| {
                problem(format!(
                    "{field} {value:?} is not a duration ({error}); use e.g. 10s"
                ))
            })?;
        }
    }
    Ok(())
}

/// Parses and validates a whole configuration; `path` only names it in errors.
pub fn parse_config(path: &str, text: &str) -> Result<LoadedConfig, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|error| {
        let (line, column) = error
            .span()
            .map_or((1, 1), |span| line_and_column(text, span.start));
        ConfigError::Parse {
            path: path.to_string(),
            line,
            column,
            message: error.message().trim().replace('\n', "; "),
        }
    })?;
    let budget_line = |name: &str| {
        text.find(&format!("\"{name}\""))
            .map_or(1, |offset| line_and_column(text, offset).0)
    };
    let workload_names: Vec<&str> = config.workloads.iter().map(|w| w.name.as_str()).collect();
    let mut windows = Vec::new();
    for window in &config.alerting.windows {
        let parse = |field: &str, value: &str| {
            humantime::parse_duration(value).map_err(|error| ConfigError::Budget {
                path: path.to_string(),
                line: 1,
                budget: "[alerting]".to_string(),
                problem: format!(
                    "window {field} {value:?} is not a duration ({error}); use e.g. 1h, 5m"
                ),
            })
        };
        windows.push(crate::budgets::BurnRateWindow {
            long_s: parse("long", &window.long)?.as_secs(),
            short_s: parse("short", &window.short)?.as_secs(),
            factor: window.factor,
        });
    }
    let mut seen: Vec<&str> = Vec::new();
    let mut actions = Vec::new();
    for budget in &config.budgets {
        let problem = |problem: String| ConfigError::Budget {
            path: path.to_string(),
            line: budget_line(&budget.name),
            budget: budget.name.clone(),
            problem,
        };
        if seen.contains(&budget.name.as_str()) {
            return Err(problem(
                "another budget has this name; names must be unique".into(),
            ));
        }
        seen.push(&budget.name);
        if !BUDGET_METRICS
            .iter()
            .any(|(metric, _)| *metric == budget.metric)
        {
            let known: Vec<&str> = BUDGET_METRICS.iter().map(|(m, _)| *m).collect();
            return Err(problem(format!(
                "unknown metric {:?}; one of: {}",
                budget.metric,
                known.join(", ")
            )));
        }
        if budget.max.is_some() == budget.min.is_some() {
            return Err(problem(
                "give exactly one of max (a ceiling) or min (a floor)".into(),
            ));
        }
        if !(budget.objective > 0.0 && budget.objective < 1.0) {
            return Err(problem(format!(
                "objective {} must be between 0 and 1, e.g. 0.99",
                budget.objective
            )));
        }
        if budget.workload != "*" && !workload_names.contains(&budget.workload.as_str()) {
            return Err(problem(format!(
                "workload {:?} is not defined; add a [[workload]] with that name, or use \"*\" for the node",
                budget.workload
            )));
        }
        if budget.metric == "cost_per_hour"
            && config.pricing.gpu_hour.is_none()
            && config.pricing.cpu_core_hour.is_none()
        {
            return Err(problem(
                "cost_per_hour needs [pricing] gpu_hour and/or cpu_core_hour".into(),
            ));
        }
        let mut budget_actions = Vec::new();
        for action in &budget.actions {
            let timeout = humantime::parse_duration(&action.timeout).map_err(|error| {
                problem(format!(
                    "action timeout {:?} is not a duration ({error}); use e.g. 10s",
                    action.timeout
                ))
            })?;
            budget_actions.push(match (&action.command, &action.webhook) {
                (Some(argv), None) if !argv.is_empty() => crate::actions::Action::Command { argv: argv.clone(), timeout },
                (None, Some(url)) if url.starts_with("http://") || url.starts_with("https://") => {
                    crate::actions::Action::Webhook { url: url.clone(), timeout }
                }
                (None, Some(url)) => {
                    return Err(problem(format!("webhook {url:?} must start with http:// or https://")));
                }
                _ => {
                    return Err(problem(
                        "an action needs exactly one of command = [\"/path/to/program\", \"arg\"] or webhook = \"http://...\""
                            .into(),
                    ));
                }
            });
        }
        actions.push(budget_actions);
    }
    let action_min_interval = humantime::parse_duration(&config.alerting.action_min_interval)
        .map_err(|error| ConfigError::Budget {
            path: path.to_string(),
            line: 1,
            budget: "[alerting]".to_string(),
            problem: format!(
                "action_min_interval {:?} is not a duration ({error}); use e.g. 5m",
                config.alerting.action_min_interval
            ),
        })?;
    let workloads = compile_workloads(path, config.workloads)?;
    let agent = validate_agent(path, &config.agent)?;
    validate_export(path, &config.export)?;
    Ok(LoadedConfig {
        agent,
        export: config.export,
        workloads,
        budgets: config.budgets,
        pricing: config.pricing,
        policy: crate::budgets::BudgetPolicy {
            objective: 0.99,
            burn_rate_windows: windows,
            enter_after: config.alerting.enter_after,
            leave_after: config.alerting.leave_after,
        },
        actions,
        action_min_interval,
    })
}

/// Parses a configuration text for its workload rules only.
pub fn parse(path: &str, text: &str) -> Result<WorkloadRules, ConfigError> {
    parse_config(path, text).map(|config| config.workloads)
}

fn compile_workloads(
    path: &str,
    workloads: Vec<WorkloadConfig>,
) -> Result<WorkloadRules, ConfigError> {
    let config = Config {
        workloads,
        ..Config::default()
    };
    let path = path.to_string();
    let path = path.as_str();
    let mut matchers: Vec<WorkloadMatcher> = Vec::new();
    for workload in config.workloads {
        if matchers.iter().any(|m| m.name == workload.name) {
            return Err(ConfigError::Duplicate {
                path: path.to_string(),
                name: workload.name,
            });
        }
        let has_rule = !(workload.process.is_empty()
            && workload.executable.is_empty()
            && workload.cgroup_prefix.is_empty()
            && workload.systemd_unit.is_empty()
            && workload.container_id.is_empty());
        if !has_rule {
            return Err(ConfigError::NoRule {
                path: path.to_string(),
                workload: workload.name,
            });
        }
        matchers.push(WorkloadMatcher {
            process: glob_set(path, &workload.name, &workload.process)?,
            executable: glob_set(path, &workload.name, &workload.executable)?,
            cgroup_prefix: workload.cgroup_prefix,
            systemd_unit: workload.systemd_unit,
            container_id: workload.container_id,
            name: workload.name,
        });
    }
    Ok(WorkloadRules { matchers })
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_config(&shown, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[workload]]
name = "trainer"
process = ["python*", "torchrun"]

[[workload]]
name = "loader"
executable = ["/opt/loader/bin/*"]
cgroup_prefix = ["/system.slice/etl"]

[[workload]]
name = "inference"
systemd_unit = ["triton.service"]
container_id = ["3f4e5d6c"]
"#;

    fn facts<'a>(
        name: &'a str,
        executable: Option<&'a str>,
        cgroup: Option<&'a str>,
    ) -> ProcessFacts<'a> {
        ProcessFacts {
            name,
            executable,
            cgroup,
        }
    }

    #[test]
    fn agent_and_export_sections_are_validated_with_hints() {
        let ok = parse_config(
            "t.toml",
            "[agent]\nwindow = \"2s\"\nmax_peers = 5\n[export]\nprotocol = \"http/protobuf\"\nendpoint = \"http://vm:8428\"\n",
        )
        .unwrap();
        assert_eq!(ok.agent.window, std::time::Duration::from_secs(2));
        assert_eq!(ok.agent.max_peers, 5);
        assert_eq!(ok.agent.max_workloads, 50);
        assert_eq!(ok.export.protocol.as_deref(), Some("http/protobuf"));
        for (text, hint) in [
            (
                "[agent]\nwindow = \"soon\"\n",
                "[agent]: window \"soon\" is not a duration",
            ),
            ("[agent]\nwindow = \"10ms\"\n", "too short"),
            ("[agent]\nmax_peers = 0\n", "max_peers must be at least 1"),
            (
                "[export]\nprotocol = \"udp\"\n",
                "use \"grpc\" or \"http/protobuf\"",
            ),
            (
                "[export]\nendpoint = \"collector:4317\"\n",
                "needs a scheme",
            ),
            (
                "[export]\ntimeout = \"x\"\n",
                "timeout \"x\" is not a duration",
            ),
            (
                "[export]\nendpont = \"http://x\"\n",
                "unknown field `endpont`",
            ),
        ] {
            let error = parse_config("t.toml", text).unwrap_err().to_string();
            assert!(error.contains(hint), "{error:?} should contain {hint:?}");
        }
    }

    #[test]
    fn each_rule_kind_matches() {
        let rules = parse("envelope.toml", EXAMPLE).unwrap();
        assert_eq!(
            rules.workload_of(&facts("python3", None, None)),
            Some("trainer")
        );
        assert_eq!(
            rules.workload_of(&facts("torchrun", None, None)),
            Some("trainer")
        );
        assert_eq!(
            rules.workload_of(&facts("x", Some("/opt/loader/bin/etl"), None)),
            Some("loader")
        );
        assert_eq!(
            rules.workload_of(&facts("x", None, Some("/system.slice/etl-7.scope"))),
            Some("loader")
        );
        assert_eq!(
            rules.workload_of(&facts("x", None, Some("/system.slice/triton.service"))),
            Some("inference")
        );
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
        assert_eq!(
            rules.workload_of(&facts("x", None, Some(&format!("/kubepods/pod1/{id}")))),
            Some("inference")
        );
        assert_eq!(
            rules.workload_of(&facts("bash", Some("/usr/bin/bash"), Some("/user.slice"))),
            None
        );
    }

    #[test]
    fn the_first_matching_workload_wins() {
        let rules = parse("t.toml", "[[workload]]\nname = \"a\"\nprocess = [\"p*\"]\n[[workload]]\nname = \"b\"\nprocess = [\"python\"]\n").unwrap();
        assert_eq!(rules.workload_of(&facts("python", None, None)), Some("a"));
    }

    #[test]
    fn errors_say_where_and_what() {
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nprocess = [\"p\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(error, "e.toml:4:1: invalid array; expected `]`");
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nproces = [\"p\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("e.toml:3:1: unknown field `proces`"),
            "{error}"
        );
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no match rule"), "{error}");
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nprocess = [\"[\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("bad glob"), "{error}");
        let error = parse("e.toml", "[[workload]]\nname = \"a\"\nprocess=[\"x\"]\n[[workload]]\nname = \"a\"\nprocess=[\"y\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("two workloads are named \"a\""), "{error}");
        let error = load(Path::new("/nonexistent/envelope.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("cannot read the configuration /nonexistent/envelope.toml"),
            "{error}"
        );
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../../systemd/envelope.toml");
        let config = parse_config("systemd/envelope.toml", text).unwrap();
        assert_eq!(config.budgets.len(), 6);
        assert_eq!(config.policy.burn_rate_windows[0].long_s, 3_600);
        assert_eq!(config.policy.burn_rate_windows[2].long_s, 3 * 86_400);
        assert_eq!(config.pricing.gpu_hour, Some(2.5));
        assert_eq!(
            config.workloads.workload_of(&facts("torchrun", None, None)),
            Some("trainer")
        );
        assert_eq!(config.actions.iter().map(Vec::len).sum::<usize>(), 2);
        assert_eq!(
            config.action_min_interval,
            std::time::Duration::from_secs(300)
        );
    }

    #[test]
    fn bad_budgets_say_what_to_fix() {
        let base = "[[workload]]\nname = \"w\"\nprocess = [\"p\"]\n";
        let check = |budget: &str| {
            parse_config("b.toml", &format!("{base}{budget}"))
                .unwrap_err()
                .to_string()
        };
        let error = check(
            "[[budget]]\nname = \"x\"\nworkload = \"w\"\nmetric = \"storage_p96_ms\"\nmax = 1.0\n",
        );
        assert!(
            error.starts_with(
                "b.toml:5: budget \"x\": unknown metric \"storage_p96_ms\"; one of: storage_p95_ms"
            ),
            "{error}"
        );
        let error = check("[[budget]]\nname = \"x\"\nworkload = \"w\"\nmetric = \"retransmits\"\n");
        assert!(
            error.ends_with("give exactly one of max (a ceiling) or min (a floor)"),
            "{error}"
        );
        let error = check(
            "[[budget]]\nname = \"x\"\nworkload = \"nope\"\nmetric = \"retransmits\"\nmax = 1.0\n",
        );
        assert!(
            error.contains("workload \"nope\" is not defined"),
            "{error}"
        );
        let error = check(
            "[[budget]]\nname = \"x\"\nworkload = \"*\"\nmetric = \"retransmits\"\nmax = 1.0\nobjective = 1.5\n",
        );
        assert!(
            error.contains("objective 1.5 must be between 0 and 1"),
            "{error}"
        );
        let error = check(
            "[[budget]]\nname = \"x\"\nworkload = \"*\"\nmetric = \"cost_per_hour\"\nmax = 1.0\n",
        );
        assert!(error.contains("needs [pricing]"), "{error}");
        let error = check(concat!(
            "[[budget]]\nname = \"x\"\nworkload = \"*\"\nmetric = \"retransmits\"\nmax = 1.0\n",
            "actions = [{ webhook = \"ftp://x\" }]\n"
        ));
        assert!(
            error.contains("must start with http:// or https://"),
            "{error}"
        );
        let error = check(concat!(
            "[[budget]]\nname = \"x\"\nworkload = \"*\"\nmetric = \"retransmits\"\nmax = 1.0\n",
            "actions = [{ command = [] }]\n"
        ));
        assert!(error.contains("an action needs exactly one of"), "{error}");
        let error =
            check("[alerting]\nwindows = [{ long = \"soon\", short = \"5m\", factor = 1.0 }]\n");
        assert!(
            error.contains("window long \"soon\" is not a duration"),
            "{error}"
        );
    }

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_and_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_and_column("ab\ncd", 4), (2, 2));
    }
}
