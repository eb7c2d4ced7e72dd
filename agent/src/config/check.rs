//! From the file's schema to typed settings: every value checked once, against what `run`
//! can run, and refused with its own line and column and a hint.
use std::{
    collections::{BTreeMap, HashSet},
    ops::Range,
    path::Path,
    time::Duration,
};

use toml::Spanned;

use super::{
    Action, AgentSettings, Alerting, Budget, BurnRateWindow, ConfigError, EngineEndpointConfig,
    ExportConfig, GpuSettings, LoadedConfig, Pricing, StageAllocation,
    file::{self, Text},
    workloads::{WorkloadMatcher, WorkloadRules, glob_set},
};
use crate::model::{
    engine::{EngineChoice, EngineKind, GenericNames},
    gpu::CudaProbes,
    vocabulary::{Bound, BudgetMetric, NoDataPolicy, ObjectiveBasis},
};

/// `[agent] window` and `--window`: shorter windows cost more than they tell (each one reads
/// every map); longer ones make alerts slow.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);
pub const MAX_WINDOW: Duration = Duration::from_secs(3_600);
/// Longest burn-rate window: the SRE workbook's longest is 3 days; a quarter is plenty.
const MAX_BURN_WINDOW: Duration = Duration::from_secs(90 * 86_400);
const MAX_ACTION_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_EXPORT_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
const MAX_HYSTERESIS: i64 = 10_000;
const MAX_CARDINALITY: i64 = 100_000;
const MAX_BURN_WINDOWS: usize = 10;
/// The least a duration that must be above zero can be.
const ABOVE_ZERO: Duration = Duration::from_nanos(1);

/// The rule for `[agent] window` and `--window`, in one place.
pub fn check_window(window: Duration) -> Result<Duration, String> {
    if window < MIN_WINDOW {
        return Err(format!(
            "window {} is too short; use 500ms or more (10s is the default)",
            humantime::format_duration(window)
        ));
    }
    if window > MAX_WINDOW {
        return Err(format!(
            "window {} is too long; use at most 1h (10s is the default)",
            humantime::format_duration(window)
        ));
    }
    Ok(window)
}

/// Names the file in errors and turns byte offsets into lines and columns.
pub(super) struct Checker<'a> {
    path: &'a str,
    text: &'a str,
    /// Byte offset of each line's start, for a binary search instead of a scan per error.
    line_starts: Vec<usize>,
}

type Checked<T> = Result<T, ConfigError>;

impl<'a> Checker<'a> {
    pub(super) fn new(path: &'a str, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(at, _)| at + 1))
            .collect();
        Self {
            path,
            text,
            line_starts,
        }
    }

    /// 1-based line and column of a byte offset.
    pub(super) fn line_and_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(0, |before| before.chars().count())
            + 1;
        (line, column)
    }

    fn at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.line_and_column(span.start);
        ConfigError::At {
            path: self.path.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    /// A duration in humantime syntax ("10s", "1m30s", "500ms") within `[min, max]`.
    fn duration(
        &self,
        context: &str,
        field: &str,
        value: &Text,
        min: Duration,
        max: Duration,
        example: &str,
    ) -> Checked<Duration> {
        let text = value.get_ref();
        let duration = humantime::parse_duration(text).map_err(|error| {
            self.at(
                value.span(),
                format!(
                    "{context}{field} {text:?} is not a duration ({error}); use e.g. {example}"
                ),
            )
        })?;
        if duration < min || duration > max {
            let shown = |d: Duration| humantime::format_duration(d).to_string();
            let bound = if min <= ABOVE_ZERO {
                format!("above zero and at most {}", shown(max))
            } else {
                format!("between {} and {}", shown(min), shown(max))
            };
            return Err(self.at(
                value.span(),
                format!("{context}{field} {text:?} is out of range; use a duration {bound}, e.g. {example}"),
            ));
        }
        Ok(duration)
    }

    fn count(
        &self,
        context: &str,
        field: &str,
        value: &Spanned<i64>,
        min: i64,
        max: i64,
    ) -> Checked<i64> {
        let number = *value.get_ref();
        if number < min || number > max {
            return Err(self.at(
                value.span(),
                format!("{context}{field} must be between {min} and {max} (it is {number})"),
            ));
        }
        Ok(number)
    }

    fn url(&self, context: &str, field: &str, value: &Text) -> Checked<String> {
        let text = value.get_ref();
        let hint = "http://host:port or https://host:port";
        let url = url::Url::parse(text).map_err(|error| {
            let problem = if error == url::ParseError::RelativeUrlWithoutBase {
                "needs a scheme".to_string()
            } else {
                format!("is not a URL ({error})")
            };
            self.at(
                value.span(),
                format!("{context}{field} {text:?} {problem}: {hint}"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.at(
                value.span(),
                format!(
                    "{context}{field} {text:?} needs a scheme: {hint} (it has {}:)",
                    url.scheme()
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(self.at(
                value.span(),
                format!("{context}{field} {text:?} has no host: {hint}"),
            ));
        }
        Ok(text.clone())
    }
}

/// A threshold or price: a finite number in `[min, max]`.
fn finite_in(value: f64, min: f64, max: f64) -> bool {
    value.is_finite() && value >= min && value <= max
}

pub(super) fn check(path: &str, text: &str) -> Checked<LoadedConfig> {
    let checker = Checker::new(path, text);
    let file: file::File = toml::from_str(text).map_err(|error| {
        let span = error.span().unwrap_or(0..0);
        checker.at(span, error.message().trim().replace('\n', "; "))
    })?;
    let workloads = check_workloads(&checker, &file.workloads)?;
    let engines = file
        .workloads
        .iter()
        .map(|workload| check_engine(&checker, workload))
        .filter_map(Result::transpose)
        .collect::<Checked<Vec<_>>>()?;
    let pricing = check_pricing(&checker, &file.pricing)?;
    let alerting = check_alerting(&checker, &file.alerting)?;
    let agent = check_agent(&checker, &file.agent)?;
    let gpu = check_gpu(&checker, &file.gpu)?;
    let export = check_export(&checker, &file.export)?;
    let names: HashSet<&str> = file
        .workloads
        .iter()
        .map(|w| w.name.get_ref().as_str())
        .collect();
    let with_engine: HashSet<&str> = engines.iter().map(|e| e.workload.as_str()).collect();
    let mut budget_names = HashSet::new();
    let mut budgets = Vec::with_capacity(file.budgets.len());
    for entry in &file.budgets {
        let budget = check_budget(
            &checker,
            entry,
            &names,
            &with_engine,
            &pricing,
            alerting.https_only,
        )?;
        if !budget_names.insert(budget.name.clone()) {
            return Err(checker.at(
                entry.name.span(),
                format!(
                    "budget {:?}: another budget has this name; names must be unique",
                    budget.name
                ),
            ));
        }
        budgets.push(budget);
    }
    for entry in &file.envelopes {
        for budget in check_envelope(
            &checker,
            entry,
            &names,
            &with_engine,
            &pricing,
            alerting.https_only,
        )? {
            if !budget_names.insert(budget.name.clone()) {
                return Err(checker.at(
                    entry.name.span(),
                    format!(
                        "envelope {:?}: another envelope or budget is named {:?}",
                        entry.name.get_ref(),
                        budget.name
                    ),
                ));
            }
            budgets.push(budget);
        }
    }
    Ok(LoadedConfig {
        workloads,
        engines,
        budgets,
        pricing,
        alerting,
        agent,
        gpu,
        export,
    })
}

fn check_workloads(
    checker: &Checker<'_>,
    entries: &[file::WorkloadEntry],
) -> Checked<WorkloadRules> {
    let mut seen = HashSet::with_capacity(entries.len());
    let mut matchers = Vec::with_capacity(entries.len());
    for workload in entries {
        let name = workload.name.get_ref();
        let context = format!("workload {name:?}: ");
        if name.trim().is_empty() || name == "*" || name.len() > 200 {
            return Err(checker.at(
                workload.name.span(),
                "a workload's name is 1 to 200 characters, not \"*\" (which means the whole node in budgets)",
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(checker.at(
                workload.name.span(),
                format!("two workloads are named {name:?}; names must be unique"),
            ));
        }
        let strings = |values: &[Text]| {
            values
                .iter()
                .map(|v| v.get_ref().clone())
                .collect::<Vec<_>>()
        };
        let has_rule = !(workload.process.is_empty()
            && workload.executable.is_empty()
            && workload.cgroup_prefix.is_empty()
            && workload.systemd_unit.is_empty()
            && workload.container_id.is_empty());
        if !has_rule {
            return Err(checker.at(
                workload.name.span(),
                format!("{context}workload {name:?} has no match rule (process, executable, cgroup_prefix, systemd_unit or container_id)"),
            ));
        }
        for rules in [
            &workload.cgroup_prefix,
            &workload.systemd_unit,
            &workload.container_id,
        ] {
            if let Some(empty) = rules.iter().find(|rule| rule.get_ref().is_empty()) {
                return Err(checker.at(
                    empty.span(),
                    format!("{context}an empty rule would match every process; remove it"),
                ));
            }
        }
        let globs = |values: &[Text]| {
            glob_set(values.iter().map(|v| v.get_ref().as_str())).map_err(|(pattern, message)| {
                let span = values
                    .iter()
                    .find(|v| *v.get_ref() == pattern)
                    .map_or(workload.name.span(), Spanned::span);
                checker.at(span, format!("{context}bad glob {pattern:?}: {message}"))
            })
        };
        matchers.push(WorkloadMatcher {
            name: name.clone(),
            process: globs(&workload.process)?,
            executable: globs(&workload.executable)?,
            cgroup_prefix: strings(&workload.cgroup_prefix),
            systemd_unit: strings(&workload.systemd_unit),
            container_id: strings(&workload.container_id),
        });
    }
    Ok(WorkloadRules { matchers })
}

/// A workload's `metrics_url` and engine; None without one.
fn check_engine(
    checker: &Checker<'_>,
    workload: &file::WorkloadEntry,
) -> Checked<Option<EngineEndpointConfig>> {
    let context = format!("workload {:?}: ", workload.name.get_ref());
    let names = [
        ("request_histogram", &workload.request_histogram),
        ("ttft_histogram", &workload.ttft_histogram),
        ("tpot_histogram", &workload.tpot_histogram),
        ("queue_histogram", &workload.queue_histogram),
        ("prompt_tokens_counter", &workload.prompt_tokens_counter),
        (
            "generation_tokens_counter",
            &workload.generation_tokens_counter,
        ),
    ];
    let Some(url) = &workload.metrics_url else {
        if let Some((field, Some(value))) = names
            .iter()
            .map(|(field, value)| (field, value.as_ref()))
            .chain(
                [("engine", workload.engine.as_ref())]
                    .iter()
                    .map(|(f, v)| (f, *v)),
            )
            .find(|(_, value)| value.is_some())
        {
            return Err(checker.at(
                value.span(),
                format!("{context}{field} needs metrics_url, the engine's Prometheus endpoint (e.g. \"http://127.0.0.1:8000/metrics\")"),
            ));
        }
        return Ok(None);
    };
    let url = checker.url(&context, "metrics_url", url)?;
    let known = "vllm, sglang, tgi, triton, llamacpp or generic";
    let engine = match &workload.engine {
        None => None,
        Some(value) => Some(EngineKind::parse(value.get_ref()).ok_or_else(|| {
            checker.at(
                value.span(),
                format!("{context}engine {:?} is not one envelope reads; use {known}, or leave it out to recognise the engine from its metric names", value.get_ref()),
            )
        })?),
    };
    let mut given = GenericNames::default();
    for (field, value) in names {
        let Some(value) = value else { continue };
        if engine != Some(EngineKind::Generic) {
            return Err(checker.at(
                value.span(),
                format!("{context}{field} names a metric of an engine envelope does not know; set engine = \"generic\" with it"),
            ));
        }
        let name = value.get_ref();
        let valid = name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
        });
        if name.is_empty() || !valid {
            return Err(checker.at(
                value.span(),
                format!("{context}{field} {name:?} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*); give the histogram's name without _bucket"),
            ));
        }
        let slot = match field {
            "request_histogram" => &mut given.request_histogram,
            "ttft_histogram" => &mut given.ttft_histogram,
            "tpot_histogram" => &mut given.tpot_histogram,
            "queue_histogram" => &mut given.queue_histogram,
            "prompt_tokens_counter" => &mut given.prompt_tokens_counter,
            _ => &mut given.generation_tokens_counter,
        };
        *slot = Some(name.clone());
    }
    let engine = match engine {
        None => EngineChoice::Recognise,
        Some(EngineKind::Generic) => {
            if given.request_histogram.is_none() && given.ttft_histogram.is_none() {
                return Err(checker.at(
                    workload.engine.as_ref().map_or(workload.name.span(), Spanned::span),
                    format!("{context}engine = \"generic\" needs the names of its histograms: request_histogram or ttft_histogram at least"),
                ));
            }
            EngineChoice::Generic(given)
        }
        Some(kind) => EngineChoice::Named(kind),
    };
    Ok(Some(EngineEndpointConfig {
        workload: workload.name.get_ref().clone(),
        url,
        engine,
    }))
}

fn check_pricing(checker: &Checker<'_>, pricing: &file::PricingEntry) -> Checked<Pricing> {
    let price = |field: &str, value: &Option<Spanned<f64>>| -> Checked<Option<f64>> {
        let Some(value) = value else { return Ok(None) };
        let number = *value.get_ref();
        if !finite_in(number, 0.0, 1e9) {
            return Err(checker.at(
                value.span(),
                format!("[pricing]: {field} {number} must be a finite price of 0 or more per hour, e.g. 2.5"),
            ));
        }
        Ok(Some(number))
    };
    Ok(Pricing {
        gpu_hour: price("gpu_hour", &pricing.gpu_hour)?,
        cpu_core_hour: price("cpu_core_hour", &pricing.cpu_core_hour)?,
    })
}

fn check_alerting(checker: &Checker<'_>, alerting: &file::AlertingEntry) -> Checked<Alerting> {
    let defaults = Alerting::default();
    let context = "[alerting]: ";
    let burn_rate_windows = match &alerting.windows {
        None => defaults.burn_rate_windows,
        Some(windows) => {
            if windows.get_ref().is_empty() || windows.get_ref().len() > MAX_BURN_WINDOWS {
                return Err(checker.at(
                    windows.span(),
                    format!("{context}windows needs 1 to {MAX_BURN_WINDOWS} pairs, e.g. [{{ long = \"1h\", short = \"5m\", factor = 14.4 }}]; leave it out for the defaults"),
                ));
            }
            let mut checked = Vec::new();
            for window in windows.get_ref() {
                let span = |field: &str, value: &Text| -> Checked<u64> {
                    let duration = checker.duration(
                        context,
                        &format!("window {field}"),
                        value,
                        Duration::from_secs(1),
                        MAX_BURN_WINDOW,
                        "1h, 5m",
                    )?;
                    if duration.subsec_nanos() != 0 {
                        return Err(checker.at(value.span(), format!("{context}window {field} {:?} must be whole seconds (burn rates are kept per second)", value.get_ref())));
                    }
                    Ok(duration.as_secs())
                };
                let long_s = span("long", &window.long)?;
                let short_s = span("short", &window.short)?;
                if short_s >= long_s {
                    return Err(checker.at(
                        window.short.span(),
                        format!("{context}window short {:?} must be shorter than its long window {:?} (e.g. long = \"1h\", short = \"5m\")", window.short.get_ref(), window.long.get_ref()),
                    ));
                }
                let factor = *window.factor.get_ref();
                if !finite_in(factor, f64::MIN_POSITIVE, 1e6) {
                    return Err(checker.at(
                        window.factor.span(),
                        format!("{context}window factor {factor} must be a finite number above 0 (14.4 pages on 2% of a 30-day budget in 1h)"),
                    ));
                }
                checked.push(BurnRateWindow {
                    long_s,
                    short_s,
                    factor,
                });
            }
            checked
        }
    };
    let hysteresis = |field: &str, value: &Option<Spanned<i64>>, default: u32| -> Checked<u32> {
        match value {
            None => Ok(default),
            Some(value) => checker
                .count(context, field, value, 1, MAX_HYSTERESIS)
                .map(|n| n as u32),
        }
    };
    let action_min_interval = match &alerting.action_min_interval {
        None => defaults.action_min_interval,
        Some(value) => checker.duration(
            context,
            "action_min_interval",
            value,
            Duration::ZERO,
            Duration::from_secs(7 * 86_400),
            "5m",
        )?,
    };
    Ok(Alerting {
        https_only: alerting.https_only.unwrap_or(false),
        burn_rate_windows,
        enter_after: hysteresis("enter_after", &alerting.enter_after, defaults.enter_after)?,
        leave_after: hysteresis("leave_after", &alerting.leave_after, defaults.leave_after)?,
        action_min_interval,
    })
}

fn check_agent(checker: &Checker<'_>, agent: &file::AgentEntry) -> Checked<AgentSettings> {
    let defaults = AgentSettings::default();
    let context = "[agent]: ";
    let window = match &agent.window {
        None => defaults.window,
        Some(value) => {
            let window = checker.duration(
                context,
                "window",
                value,
                Duration::ZERO,
                Duration::MAX,
                "10s",
            )?;
            check_window(window)
                .map_err(|problem| checker.at(value.span(), format!("{context}{problem}")))?
        }
    };
    let gpu_interval = match &agent.gpu_interval {
        None => defaults.gpu_interval,
        Some(value) => checker.duration(
            context,
            "gpu_interval",
            value,
            Duration::from_millis(100),
            MAX_WINDOW,
            "2s",
        )?,
    };
    let engine_timeout = match &agent.engine_timeout {
        None => defaults.engine_timeout,
        Some(value) => checker.duration(
            context,
            "engine_timeout",
            value,
            Duration::from_millis(100),
            Duration::from_secs(30),
            "2s",
        )?,
    };
    let path = |field: &str, value: &Option<Text>| -> Checked<Option<std::path::PathBuf>> {
        let Some(value) = value else { return Ok(None) };
        if value.get_ref().trim().is_empty() || value.get_ref().contains('\0') {
            return Err(checker.at(value.span(), format!("{context}{field} must be a path")));
        }
        Ok(Some(value.get_ref().into()))
    };
    let limit = |field: &str, value: &Option<Spanned<i64>>, default: usize| -> Checked<usize> {
        let Some(value) = value else {
            return Ok(default);
        };
        let number = *value.get_ref();
        if number < 1 {
            return Err(checker.at(value.span(), format!("{context}{field} must be at least 1")));
        }
        checker
            .count(context, field, value, 1, MAX_CARDINALITY)
            .map(|n| n as usize)
    };
    Ok(AgentSettings {
        window,
        gpu_interval,
        engine_timeout,
        nvml_lib: path("nvml_lib", &agent.nvml_lib)?,
        state_dir: path("state_dir", &agent.state_dir)?.unwrap_or(defaults.state_dir),
        max_workloads: limit(
            "max_workloads",
            &agent.max_workloads,
            defaults.max_workloads,
        )?,
        max_peers: limit("max_peers", &agent.max_peers, defaults.max_peers)?,
        max_devices: limit("max_devices", &agent.max_devices, defaults.max_devices)?,
        max_gpu_processes: limit(
            "max_gpu_processes",
            &agent.max_gpu_processes,
            defaults.max_gpu_processes,
        )?,
    })
}

fn check_gpu(checker: &Checker<'_>, gpu: &file::GpuEntry) -> Checked<GpuSettings> {
    let cuda_probes = match &gpu.cuda_probes {
        None => CudaProbes::default(),
        Some(value) => CudaProbes::parse(value.get_ref()).ok_or_else(|| {
            checker.at(
                value.span(),
                format!(
                    "[gpu]: cuda_probes {:?} is not a mode; use \"off\", \"sync\" (CUDA \
                     synchronisations, copies and allocations) or \"sync+launch\" (kernel \
                     launches too)",
                    value.get_ref()
                ),
            )
        })?,
    };
    Ok(GpuSettings { cuda_probes })
}

/// An HTTP header name is a token (RFC 9110 5.6.2); a value is visible ASCII, spaces and
/// tabs: a CR or LF would let a value inject further headers.
fn header_problem(name: &str, value: &str) -> Option<String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Some(format!(
            "header name {name:?} is not a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
        ));
    }
    if value
        .chars()
        .any(|c| c != '\t' && (c.is_control() || !c.is_ascii()))
    {
        return Some(format!(
            "header {name:?} has a control or non-ASCII character in its value (a CR or LF would inject headers); remove it"
        ));
    }
    None
}

/// The same rule for headers from OTEL_EXPORTER_OTLP_HEADERS.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    header_problem(name, value).map_or(Ok(()), Err)
}

fn check_export(checker: &Checker<'_>, export: &file::ExportEntry) -> Checked<ExportConfig> {
    let context = "[export]: ";
    if let Some(protocol) = &export.protocol
        && !["grpc", "http/protobuf"].contains(&protocol.get_ref().as_str())
    {
        return Err(checker.at(
            protocol.span(),
            format!(
                "{context}protocol {:?} is not supported; use \"grpc\" or \"http/protobuf\"",
                protocol.get_ref()
            ),
        ));
    }
    let url = |field: &str, value: &Option<Text>| {
        value
            .as_ref()
            .map(|v| checker.url(context, field, v))
            .transpose()
    };
    let mut headers = BTreeMap::new();
    for (name, value) in &export.headers {
        if let Some(problem) = header_problem(name, value.get_ref()) {
            return Err(checker.at(value.span(), format!("{context}{problem}")));
        }
        headers.insert(name.clone(), value.get_ref().clone());
    }
    let ca_file = match &export.ca_file {
        None => None,
        Some(value) => {
            let path = value.get_ref();
            if let Err(error) = std::fs::File::open(Path::new(path)).and_then(|file| {
                if file.metadata()?.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("it is not a regular file"))
                }
            }) {
                return Err(checker.at(
                    value.span(),
                    format!("{context}ca_file {path:?} cannot be read ({}); give the PEM file of the CA that signed the collector's certificate", super::os_problem(&error)),
                ));
            }
            Some(path.clone())
        }
    };
    Ok(ExportConfig {
        enabled: export.enabled,
        protocol: export.protocol.as_ref().map(|p| p.get_ref().clone()),
        endpoint: url("endpoint", &export.endpoint)?,
        metrics_endpoint: url("metrics_endpoint", &export.metrics_endpoint)?,
        logs_endpoint: url("logs_endpoint", &export.logs_endpoint)?,
        headers,
        interval: export
            .interval
            .as_ref()
            .map(|v| checker.duration(context, "interval", v, ABOVE_ZERO, MAX_INTERVAL, "30s"))
            .transpose()?,
        timeout: export
            .timeout
            .as_ref()
            .map(|v| checker.duration(context, "timeout", v, ABOVE_ZERO, MAX_EXPORT_TIMEOUT, "10s"))
            .transpose()?,
        ca_file,
        prometheus_listen: check_prometheus(checker, export)?,
    })
}

/// `prometheus = true` (and where it listens): off by default, this node only unless the
/// address says otherwise.
fn check_prometheus(
    checker: &Checker<'_>,
    export: &file::ExportEntry,
) -> Checked<Option<std::net::SocketAddr>> {
    let context = "[export]: ";
    let on = export.prometheus.unwrap_or(false);
    match &export.prometheus_listen {
        Some(listen) if !on => Err(checker.at(
            listen.span(),
            format!("{context}prometheus_listen needs prometheus = true"),
        )),
        Some(listen) => listen.get_ref().parse().map(Some).map_err(|_| {
            checker.at(
                listen.span(),
                format!(
                    "{context}prometheus_listen {:?} must be address:port, e.g. \"{}\" (this node only) or \"0.0.0.0:9464\" (every interface)",
                    listen.get_ref(),
                    super::DEFAULT_PROMETHEUS_LISTEN
                ),
            )
        }),
        None if on => Ok(super::DEFAULT_PROMETHEUS_LISTEN.parse().ok()),
        None => Ok(None),
    }
}

/// A peer as the report writes it (canonical text, IPv4-mapped IPv6 as IPv4), so a
/// configured one matches; None when it is not address:port.
fn canonical_peer(text: &str) -> Option<String> {
    let address = text.parse::<std::net::SocketAddr>().ok()?;
    let ip = match address.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    Some(std::net::SocketAddr::new(ip, address.port()).to_string())
}

/// An envelope, as the budgets it becomes: one per end-to-end bound (`request_p95_ms`,
/// `cost_per_request`) on its entry workload, each with its stages' allocations, which must
/// fit in it.
fn check_envelope(
    checker: &Checker<'_>,
    entry: &file::EnvelopeEntry,
    workloads: &HashSet<&str>,
    with_engine: &HashSet<&str>,
    pricing: &Pricing,
    https_only: bool,
) -> Checked<Vec<Budget>> {
    let name = entry.name.get_ref();
    let context = format!("envelope {name:?}: ");
    let bounds = [
        (BudgetMetric::RequestP95Ms, &entry.request_p95_ms),
        (BudgetMetric::CostPerRequest, &entry.cost_per_request),
    ];
    if bounds.iter().all(|(_, bound)| bound.is_none()) {
        return Err(checker.at(
            entry.name.span(),
            format!("{context}give its end-to-end bounds: request_p95_ms and/or cost_per_request"),
        ));
    }
    let mut stage_names = HashSet::new();
    for stage in &entry.stages {
        let stage_name = stage.name.get_ref();
        let here = format!("{context}stage {stage_name:?}: ");
        if stage_name.trim().is_empty() || !stage_names.insert(stage_name.as_str()) {
            return Err(checker.at(
                stage.name.span(),
                format!("{here}stage names must be unique and not empty"),
            ));
        }
        match (&stage.workload, &stage.peer) {
            (Some(workload), None) => {
                if !workloads.contains(workload.get_ref().as_str()) {
                    return Err(checker.at(
                        workload.span(),
                        format!(
                            "{here}workload {:?} is not defined; add a [[workload]] with that name",
                            workload.get_ref()
                        ),
                    ));
                }
            }
            (None, Some(peer)) => {
                if canonical_peer(peer.get_ref()).is_none() {
                    return Err(checker.at(peer.span(), format!("{here}peer {:?} must be address:port, the upstream the entry workload calls, e.g. \"10.0.0.7:6333\"", peer.get_ref())));
                }
                if let Some(cost) = &stage.cost_per_request {
                    return Err(checker.at(cost.span(), format!("{here}an upstream's cost is not measured on this node; give cost_per_request to workload stages")));
                }
            }
            _ => {
                return Err(checker.at(
                    stage.name.span(),
                    format!("{here}give exactly one of workload (a stage on this node) or peer (an upstream of {:?})", entry.entry.get_ref()),
                ));
            }
        }
        for (metric, allocation) in [
            (BudgetMetric::RequestP95Ms, &stage.request_p95_ms),
            (BudgetMetric::CostPerRequest, &stage.cost_per_request),
        ] {
            let Some(allocation) = allocation else {
                continue;
            };
            let (low, high, range) = metric.valid_range();
            if !finite_in(*allocation.get_ref(), low, high) {
                return Err(checker.at(
                    allocation.span(),
                    format!(
                        "{here}{metric} {} is outside what it can be; use a finite number {range}",
                        allocation.get_ref()
                    ),
                ));
            }
            if bounds
                .iter()
                .any(|(m, bound)| *m == metric && bound.is_none())
            {
                return Err(checker.at(allocation.span(), format!("{here}{metric} is allocated, but the envelope has no end-to-end {metric} to split")));
            }
        }
    }
    let mut budgets = Vec::new();
    for (metric, bound) in bounds {
        let Some(bound) = bound else { continue };
        let synthesised = file::BudgetEntry {
            name: toml::Spanned::new(entry.name.span(), format!("{name}: {metric}")),
            workload: entry.entry.clone(),
            stage: None,
            metric: toml::Spanned::new(bound.span(), metric.name().to_string()),
            max: Some(bound.clone()),
            min: None,
            objective: entry.objective.clone(),
            objective_basis: entry.objective_basis.clone(),
            device: None,
            peer: None,
            on_no_data: entry.on_no_data.clone(),
            actions: entry.actions.clone(),
        };
        let mut budget = check_budget(
            checker,
            &synthesised,
            workloads,
            with_engine,
            pricing,
            https_only,
        )
        .map_err(|error| match error {
            // Say it is about the envelope, not a budget the user never wrote.
            ConfigError::At {
                path,
                line,
                column,
                message,
            } => ConfigError::At {
                path,
                line,
                column,
                message: message.replace(&format!("budget \"{name}: {metric}\": "), &context),
            },
            other => other,
        })?;
        let mut parts = Vec::new();
        for stage in &entry.stages {
            let allocation = match metric {
                BudgetMetric::RequestP95Ms => &stage.request_p95_ms,
                _ => &stage.cost_per_request,
            };
            let Some(allocation) = allocation else {
                continue;
            };
            parts.push(format!("{} {}", stage.name.get_ref(), allocation.get_ref()));
            budget.stages.push(StageAllocation {
                name: stage.name.get_ref().clone(),
                workload: stage.workload.as_ref().map(|w| w.get_ref().clone()),
                peer: stage
                    .peer
                    .as_ref()
                    .and_then(|p| canonical_peer(p.get_ref())),
                allocation: *allocation.get_ref(),
            });
        }
        let allocated: f64 = budget.stages.iter().map(|s| s.allocation).sum();
        if allocated > budget.threshold * (1.0 + 1e-9) {
            return Err(checker.at(
                bound.span(),
                format!(
                    "{context}the stages' {metric} allocations sum to {allocated} ({}), {} more than the end-to-end bound {}; lower a stage's allocation or raise the bound",
                    parts.join(" + "),
                    ((allocated - budget.threshold) * 1e6).round() / 1e6,
                    budget.threshold,
                ),
            ));
        }
        budgets.push(budget);
    }
    Ok(budgets)
}

fn check_budget(
    checker: &Checker<'_>,
    entry: &file::BudgetEntry,
    workloads: &HashSet<&str>,
    with_engine: &HashSet<&str>,
    pricing: &Pricing,
    https_only: bool,
) -> Checked<Budget> {
    let name = entry.name.get_ref().clone();
    if name.trim().is_empty() || name.len() > 200 {
        return Err(checker.at(entry.name.span(), "a budget's name is 1 to 200 characters"));
    }
    let context = format!("budget {name:?}: ");
    let metric: BudgetMetric = entry.metric.get_ref().parse().map_err(|problem: String| {
        checker.at(entry.metric.span(), format!("{context}{problem}"))
    })?;
    let (bound, value) = match (&entry.max, &entry.min) {
        (Some(max), None) => (Bound::Ceiling, max),
        (None, Some(min)) => (Bound::Floor, min),
        (Some(_), Some(second)) => {
            return Err(checker.at(
                second.span(),
                format!("{context}give exactly one of max (a ceiling) or min (a floor)"),
            ));
        }
        (None, None) => {
            return Err(checker.at(
                entry.name.span(),
                format!("{context}give exactly one of max (a ceiling) or min (a floor)"),
            ));
        }
    };
    if !metric.allowed_bounds().contains(&bound) {
        let allowed: Vec<&str> = metric.allowed_bounds().iter().map(|b| b.key()).collect();
        return Err(checker.at(
            value.span(),
            format!("{context}{metric} takes only {}", allowed.join(" or ")),
        ));
    }
    let threshold = *value.get_ref();
    let (low, high, range) = metric.valid_range();
    if !finite_in(threshold, low, high) {
        return Err(checker.at(
            value.span(),
            format!("{context}{} {threshold} is outside what {metric} can be; use a finite number {range}", bound.key()),
        ));
    }
    let objective = match &entry.objective {
        None => 0.99,
        Some(objective) => {
            let number = *objective.get_ref();
            if !(number.is_finite() && number > 0.0 && number < 1.0) {
                return Err(checker.at(
                    objective.span(),
                    format!("{context}objective {number} must be between 0 and 1, e.g. 0.99"),
                ));
            }
            number
        }
    };
    let workload = entry.workload.get_ref().clone();
    if workload != "*" && !workloads.contains(workload.as_str()) {
        return Err(checker.at(
            entry.workload.span(),
            format!("{context}workload {workload:?} is not defined; add a [[workload]] with that name, or use \"*\" for the node"),
        ));
    }
    if matches!(
        metric,
        BudgetMetric::CostPerHour | BudgetMetric::CostPerRequest | BudgetMetric::CostPer1kTokens
    ) && pricing.gpu_hour.is_none()
        && pricing.cpu_core_hour.is_none()
    {
        return Err(checker.at(
            entry.metric.span(),
            format!("{context}{metric} needs [pricing] gpu_hour and/or cpu_core_hour"),
        ));
    }
    if metric.engine_only() && workload != "*" && !with_engine.contains(workload.as_str()) {
        return Err(checker.at(
            entry.metric.span(),
            format!("{context}{metric} comes from the serving engine's own metrics: give workload {workload:?} a metrics_url"),
        ));
    }
    if let Some(device) = &entry.device
        && metric != BudgetMetric::StorageP95Ms
    {
        return Err(checker.at(
            device.span(),
            format!("{context}device applies to storage_p95_ms only"),
        ));
    }
    if let Some(peer) = &entry.peer {
        if !matches!(
            metric,
            BudgetMetric::NetworkRttP95Ms | BudgetMetric::Retransmits
        ) {
            return Err(checker.at(
                peer.span(),
                format!("{context}peer applies to network_rtt_p95_ms and retransmits only"),
            ));
        }
        if peer.get_ref().parse::<std::net::SocketAddr>().is_err() {
            return Err(checker.at(peer.span(), format!("{context}peer {:?} must be address:port, e.g. \"10.0.0.7:6333\" or \"[2001:db8::1]:443\"", peer.get_ref())));
        }
    }
    let peer = entry
        .peer
        .as_ref()
        .and_then(|p| canonical_peer(p.get_ref()));
    let on_no_data = match &entry.on_no_data {
        None => NoDataPolicy::Ignore,
        Some(value) => match value.get_ref().as_str() {
            "ignore" => NoDataPolicy::Ignore,
            "breach" => NoDataPolicy::Breach,
            other => {
                return Err(checker.at(
                    value.span(),
                    format!("{context}on_no_data {other:?} is not a policy; use \"ignore\" (a window without data adds no event, the default) or \"breach\" (it counts as bad)"),
                ));
            }
        },
    };
    let objective_basis = match &entry.objective_basis {
        None => ObjectiveBasis::Windows,
        Some(value) => match value.get_ref().as_str() {
            "windows" => ObjectiveBasis::Windows,
            "requests" if metric.counts_requests() => ObjectiveBasis::Requests,
            "requests" => {
                return Err(checker.at(
                    value.span(),
                    format!("{context}objective_basis = \"requests\" needs a metric read from a histogram of requests (request_p95_ms or ttft_p95_ms), not {metric}"),
                ));
            }
            other => {
                return Err(checker.at(
                    value.span(),
                    format!("{context}objective_basis {other:?} is not one; use \"windows\" (the share of windows within the bound, the default) or \"requests\" (the share of requests)"),
                ));
            }
        },
    };
    let mut actions = Vec::with_capacity(entry.actions.len());
    for action in &entry.actions {
        actions.push(check_action(checker, &context, action, https_only)?);
    }
    Ok(Budget {
        name,
        workload,
        stage: entry.stage.as_ref().map(|s| s.get_ref().clone()),
        metric,
        bound,
        threshold,
        objective,
        objective_basis,
        device: entry.device.as_ref().map(|d| d.get_ref().clone()),
        peer,
        on_no_data,
        actions,
        stages: Vec::new(),
    })
}

fn check_action(
    checker: &Checker<'_>,
    context: &str,
    action: &Spanned<file::ActionEntry>,
    https_only: bool,
) -> Checked<Action> {
    let entry = action.get_ref();
    if entry.command.is_some() && (!entry.headers.is_empty() || entry.allow_link_local.is_some()) {
        return Err(checker.at(
            action.span(),
            format!("{context}headers and allow_link_local apply to webhooks only"),
        ));
    }
    let timeout = match &entry.timeout {
        None => Duration::from_secs(10),
        Some(value) => checker.duration(
            context,
            "action timeout",
            value,
            ABOVE_ZERO,
            MAX_ACTION_TIMEOUT,
            "10s",
        )?,
    };
    match (&entry.command, &entry.webhook) {
        (Some(argv), None) if !argv.get_ref().is_empty() => {
            let Some(program) = argv.get_ref().first().filter(|p| !p.trim().is_empty()) else {
                return Err(checker.at(argv.span(), format!("{context}an action's command needs a program: command = [\"/path/to/program\", \"arg\"]")));
            };
            if argv.get_ref().iter().any(|arg| arg.contains('\0')) {
                return Err(checker.at(argv.span(), format!("{context}a command argument contains a NUL byte")));
            }
            if !program.contains('/') && which_in_path(program).is_none() {
                return Err(checker.at(argv.span(), format!("{context}command {program:?} is not on PATH; give its absolute path")));
            }
            Ok(Action::Command { argv: argv.get_ref().clone(), timeout })
        }
        (None, Some(url)) => {
            let text = url.get_ref();
            if !(text.starts_with("http://") || text.starts_with("https://")) {
                return Err(checker.at(url.span(), format!("{context}webhook {text:?} must start with http:// or https://")));
            }
            if https_only && !text.starts_with("https://") {
                return Err(checker.at(
                    url.span(),
                    format!(
                        "{context}webhook {:?} is not https:// and [alerting] https_only = true",
                        super::redacted_url(text)
                    ),
                ));
            }
            let url = checker.url(context, "webhook", url)?;
            let mut headers = Vec::with_capacity(entry.headers.len());
            for (name, value) in &entry.headers {
                if let Some(problem) = header_problem(name, value.get_ref()) {
                    return Err(checker.at(value.span(), format!("{context}webhook {problem}")));
                }
                headers.push((name.to_ascii_lowercase(), value.get_ref().clone()));
            }
            Ok(Action::Webhook {
                url,
                timeout,
                headers,
                allow_link_local: entry.allow_link_local.unwrap_or(false),
            })
        }
        _ => Err(checker.at(
            action.span(),
            format!("{context}an action needs exactly one of command = [\"/path/to/program\", \"arg\"] or webhook = \"http://...\""),
        )),
    }
}

/// The program as `Command` would find it on PATH.
fn which_in_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
