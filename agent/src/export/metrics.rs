//! What the daemon exports: every metric's name, unit and attributes, built from the kernel's
//! cumulative maps, the last GPU reading, the attribution and the budgets.
//!
//! Pure: data in, [`Series`] out; `otlp` turns them into protocol messages. Counters and
//! histograms are cumulative since the agent started (the kernel maps already are), so a
//! collector outage loses nothing: the next export carries the totals.
//!
//! Memory stays bounded: each label family (workload, device, peer, GPU process) admits its
//! first `max_*` values for the life of the agent; the rest are exported under "other" (the
//! same first-come rule as the OpenTelemetry SDK's cardinality limit, so a series never
//! jumps between a name and "other" and counters stay monotonic).
use std::collections::{BTreeMap, HashMap, HashSet};

use agent_common::storage::{IoOperation, LatencyStage};

use agent_common::{
    network::peer_address,
    requests::{RequestKey, role},
    storage::split_dev,
};

use crate::{
    analysis::{
        attribution::{Judged, Verdict},
        engines::EngineSummary,
        gpu::GpuSummary,
    },
    model::{
        Histogram, KernelSnapshot,
        process::SystemNames,
        vocabulary::{Bottleneck, BreachStatus, BudgetMetric},
    },
};

/// The label value that collects everything past a cardinality limit.
pub const OTHER: &str = "other";

/// Default latency bucket bounds in seconds (budget thresholds are added to them).
pub const DEFAULT_LATENCY_BOUNDS_S: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Gauge(f64),
    /// Cumulative and monotonic since `start`.
    Counter(f64),
    Histogram(ExportHistogram),
}

/// An explicit-bounds histogram, cumulative.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportHistogram {
    pub bounds: Vec<f64>,
    /// One more than `bounds`: the last one counts values above the last bound.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

/// One time series: a metric and one set of attribute values.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub metric: &'static Metric,
    pub attributes: Vec<(&'static str, String)>,
    pub value: Value,
}

/// A metric's identity, as exported.
#[derive(Debug, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
}

macro_rules! metrics {
    ($($id:ident = $name:literal, $unit:literal, $description:literal;)*) => {
        $(pub static $id: Metric = Metric { name: $name, unit: $unit, description: $description };)*
        /// Every metric the agent exports (README.md lists them; a test checks it).
        pub static ALL_METRICS: &[&Metric] = &[$(&$id),*];
    };
}

metrics! {
    STORAGE_LATENCY = "envelope.storage.latency", "s",
        "Block I/O latency per device and direction; stage total = queued to complete (what the application sees), device = issued to complete";
    DISK_OPERATIONS = "system.disk.operations", "{operation}", "Completed block I/O requests";
    DISK_IO = "system.disk.io", "By", "Bytes moved by completed block I/O requests";
    STORAGE_ERRORS = "envelope.storage.errors", "{error}", "Block I/O requests completed with an error";
    NETWORK_RTT = "envelope.network.rtt", "s", "TCP smoothed round-trip time samples per remote endpoint";
    NETWORK_CONNECT_DURATION = "envelope.network.connect.duration", "s", "TCP connect latency (SYN sent to established) per remote endpoint";
    NETWORK_RETRANSMITS = "envelope.network.retransmits", "{segment}", "TCP segments retransmitted to a remote endpoint";
    NETWORK_CONNECT_FAILURES = "envelope.network.connect.failures", "{connection}", "TCP connects that never got established";
    REQUEST_DURATION = "envelope.request.duration", "s", "Requests served (envelope.request.role = server, by local server.port) and made (client, by upstream server.address and server.port): first request byte to last response byte, timed in the kernel from the sockets' sends and receives";
    REQUEST_FIRST_BYTE = "envelope.request.first_byte", "s", "Request start to the first response byte (the first token of a streamed answer), same keys as envelope.request.duration";
    REQUEST_UNTIMED = "envelope.request.untimed", "{request}", "Requests that ended without a response (the connection closed first, or a one-way stream)";
    ENGINE_REQUESTS = "envelope.engine.requests", "{request}", "Requests a serving engine finished, from its own /metrics (envelope.workload, envelope.engine)";
    ENGINE_TOKENS = "envelope.engine.tokens", "{token}", "Tokens a serving engine processed, by gen_ai.token.type (input = prompt, output = generated)";
    ENGINE_LATENCY = "envelope.engine.latency", "s", "A serving engine's latency quantile over the latest window (envelope.engine.phase e2e, ttft, tpot, queue; envelope.quantile 0.5, 0.95, 0.99; or mean), computed from its own histograms";
    ENGINE_PREFIX_CACHE_HIT_RATIO = "envelope.engine.prefix_cache.hit_ratio", "1", "A serving engine's prefix-cache hits over lookups in the latest window";
    ENGINE_KV_CACHE_USAGE = "envelope.engine.kv_cache.usage", "1", "A serving engine's KV cache in use at the latest window's end";
    ENGINE_ACTIVE_REQUESTS = "envelope.engine.requests.active", "{request}", "Requests in a serving engine at the latest window's end, by envelope.engine.request.state (running, waiting)";
    ENGINE_STALE = "envelope.engine.stale", "", "1 when the engine's endpoint gave no figures in the latest window (slow, down, oversized or not an engine's), else 0";
    WORKLOAD_TIME_LOST = "envelope.workload.time_lost", "s", "Time a workload's threads spent blocked on each bottleneck class (model = waiting on the GPU, cpu = runnable but not running)";
    WORKLOAD_BOTTLENECK = "envelope.workload.bottleneck", "", "1 for the bottleneck class of the workload's latest window, 0 for the others";
    WORKLOAD_BOTTLENECK_SHARE = "envelope.workload.bottleneck.share", "1", "Share of the workload's active time lost to its bottleneck in the latest window";
    GPU_UTILIZATION = "hw.gpu.utilization", "1", "GPU (SM) utilization, 0..1";
    GPU_MEMORY_UTILIZATION = "hw.gpu.memory.utilization", "1", "GPU memory controller utilization, 0..1";
    GPU_MEMORY_USAGE = "hw.gpu.memory.usage", "By", "GPU memory in use";
    GPU_MEMORY_LIMIT = "hw.gpu.memory.limit", "By", "GPU memory in total";
    GPU_POWER = "hw.power", "W", "GPU power draw";
    GPU_ENERGY = "hw.energy", "J", "GPU energy consumed since the driver loaded";
    GPU_TEMPERATURE = "hw.temperature", "Cel", "GPU temperature";
    GPU_ERRORS = "hw.errors", "{error}", "GPU errors by error.type: ecc_corrected, ecc_uncorrected (driver totals), xid (seen by this agent)";
    GPU_CLOCK = "envelope.gpu.clock", "Hz", "GPU clocks (envelope.gpu.clock.domain = sm or memory)";
    GPU_THROTTLED = "envelope.gpu.throttled", "", "1 while a clock-throttle reason is active (envelope.gpu.throttle.reason)";
    GPU_PCIE_THROUGHPUT = "envelope.gpu.pcie.throughput", "By/s", "PCIe throughput per direction (transmit, receive)";
    GPU_PROCESS_MEMORY = "envelope.gpu.process.memory.usage", "By", "GPU memory held by a process";
    GPU_PROCESS_UTILIZATION = "envelope.gpu.process.utilization", "1", "SM utilization of a process, 0..1";
    CUDA_CALL_TIME = "envelope.cuda.call.time", "s", "Time a process's threads spent in CUDA calls, by envelope.cuda.call (sync, copy, copy_async, alloc, launch) and, for copies, envelope.cuda.copy.direction (h2d, d2h, d2d, other); from the opt-in CUDA uprobes";
    CUDA_CALLS = "envelope.cuda.calls", "{call}", "CUDA calls a process completed, same keys as envelope.cuda.call.time (launch = kernel launches, with cuda_probes = sync+launch)";
    CUDA_IO = "envelope.cuda.io", "By", "Bytes a process's CUDA calls copied (per direction) or allocated, calls that succeeded";
    CUDA_FAILURES = "envelope.cuda.failures", "{call}", "CUDA calls that returned an error (allocations that failed, mostly)";
    CUDA_BLOCKING_DURATION = "envelope.cuda.blocking.duration", "s", "Duration of a process's blocking CUDA calls (synchronisations and synchronous copies)";
    PROBE_MISSED_EVENTS = "envelope.probe.missed_events", "{event}", "Events a probe skipped because another run of it was in progress on that CPU (the kernel's recursion_misses): I/Os, packets or context switches nothing was recorded for";
    BUDGET_STATE = "envelope.budget.state", "", "1 while the budget's breach is firing, 0 when it is within its envelope";
    BUDGET_NO_DATA = "envelope.budget.no_data", "", "1 when the budget's latest window had nothing to measure (its workload idle or gone), else 0";
    BUDGET_OBSERVED = "envelope.budget.observed", "", "The budget's metric in the latest window, in the metric's own unit (see envelope.budget.metric)";
    BUDGET_THRESHOLD = "envelope.budget.threshold", "", "The budget's bound, in the metric's own unit";
    BUDGET_BURN_RATE = "envelope.budget.burn_rate", "1", "Error-budget burn rate over a window (envelope.burn_window), 1 = spending exactly the budget";
    BUDGET_BREACHES = "envelope.budget.breaches", "{breach}", "Breaches that fired";
    BUDGET_OBJECTIVE = "envelope.budget.objective", "", "The budget's objective: the share of windows that must be good, e.g. 0.99";
    BUDGET_WINDOWS = "envelope.budget.windows", "{window}", "Windows evaluated, by envelope.budget.outcome (good, bad): the input of burn-rate alert rules";
    BUDGET_BAD_WINDOWS = "envelope.budget.bad_windows", "{window}", "Bad windows by envelope.bottleneck, the class that held the workload back in each (model, storage, network, cpu, none): which cause burned the error budget";
}

/// Admits the first `limit` values of a label for good; later ones become "other".
#[derive(Debug)]
pub struct CardinalityLimit {
    admitted: HashSet<String>,
    limit: usize,
}

impl CardinalityLimit {
    pub fn new(limit: usize) -> Self {
        Self {
            admitted: HashSet::new(),
            limit,
        }
    }

    pub fn admit(&mut self, value: &str) -> String {
        if self.admitted.contains(value) {
            return value.to_string();
        }
        if self.admitted.len() < self.limit {
            self.admitted.insert(value.to_string());
            return value.to_string();
        }
        OTHER.to_string()
    }
}

/// The limits from `[agent]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub workloads: usize,
    pub peers: usize,
    pub devices: usize,
    pub gpu_processes: usize,
}

/// A budget as exported.
#[derive(Clone, Debug)]
pub struct BudgetView {
    pub name: String,
    pub workload: String,
    pub metric: BudgetMetric,
    pub threshold: f64,
    pub observed: Option<f64>,
    /// The latest window had nothing to measure.
    pub no_data: bool,
    pub status: BreachStatus,
    /// (window label e.g. "1h", burn rate).
    pub burn_rates: Vec<(String, f64)>,
    pub breaches: u64,
    pub objective: f64,
    pub good_windows: u64,
    pub bad_windows: u64,
    /// Bad windows by the class that held the workload back in each.
    pub bad_windows_by_cause: BTreeMap<Bottleneck, u64>,
}

/// What lives between exports: userspace totals and the admitted label values.
#[derive(Debug)]
pub struct MetricsState {
    latency_bounds_s: Vec<f64>,
    /// The same bounds in ns, as the kernel's histograms count.
    latency_bounds_ns: Vec<f64>,
    workloads: CardinalityLimit,
    peers: CardinalityLimit,
    devices: CardinalityLimit,
    gpu_processes: CardinalityLimit,
    /// (pid, executable name) labels of the processes the CUDA probes count.
    cuda_labels: HashMap<u32, (String, String)>,
    /// Seconds lost per (workload, bottleneck class), since start.
    time_lost_s: BTreeMap<(String, &'static str), f64>,
    /// XID errors seen per GPU uuid, since start.
    xid_errors: BTreeMap<String, u64>,
    /// Latest verdict per workload.
    verdicts: BTreeMap<String, Verdict>,
    /// Per engine endpoint (workload): requests and tokens since start, and its latest window.
    engines: BTreeMap<String, EngineTotals>,
}

/// A serving engine's counts since the agent started (the sum of its windows' increases, so
/// an engine restart does not reset them), and its latest window.
#[derive(Debug, Default)]
struct EngineTotals {
    requests: f64,
    input_tokens: f64,
    output_tokens: f64,
    latest: EngineSummary,
}

/// The classes time is lost to (every class but none).
const TIME_LOST_CLASSES: [Bottleneck; 4] = [
    Bottleneck::Model,
    Bottleneck::Storage,
    Bottleneck::Network,
    Bottleneck::Cpu,
];

impl MetricsState {
    /// `extra_bounds_s`: budget thresholds on latency metrics, so a dashboard can count the
    /// samples above a budget exactly.
    pub fn new(limits: Limits, extra_bounds_s: &[f64]) -> Self {
        let mut bounds: Vec<f64> = DEFAULT_LATENCY_BOUNDS_S
            .iter()
            .chain(extra_bounds_s)
            .copied()
            .filter(|b| b.is_finite() && *b > 0.0)
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup_by(|a, b| (*a - *b).abs() <= 1e-12);
        Self {
            latency_bounds_ns: bounds.iter().map(|b| b * 1e9).collect(),
            latency_bounds_s: bounds,
            workloads: CardinalityLimit::new(limits.workloads),
            peers: CardinalityLimit::new(limits.peers),
            devices: CardinalityLimit::new(limits.devices),
            gpu_processes: CardinalityLimit::new(limits.gpu_processes),
            cuda_labels: HashMap::new(),
            time_lost_s: BTreeMap::new(),
            xid_errors: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            engines: BTreeMap::new(),
        }
    }

    /// Adds one window of the serving engines' own figures.
    pub fn add_engines(&mut self, engines: &[EngineSummary]) {
        for engine in engines {
            let name = self.workloads.admit(&engine.workload);
            let totals = self.engines.entry(name).or_default();
            totals.requests += engine.requests.unwrap_or(0) as f64;
            totals.input_tokens += engine.prompt_tokens.unwrap_or(0) as f64;
            totals.output_tokens += engine.generation_tokens.unwrap_or(0) as f64;
            totals.latest = engine.clone();
        }
    }

    pub fn latency_bounds_s(&self) -> &[f64] {
        &self.latency_bounds_s
    }

    /// Adds one window's attribution and GPU events to the totals.
    pub fn add_window(&mut self, workloads: &[Judged], gpu: &GpuSummary) {
        for Judged { window, verdict } in workloads {
            let name = self.workloads.admit(&window.name);
            let time = &window.time;
            for (class, ns) in [
                (Bottleneck::Model, time.gpu_ns),
                (Bottleneck::Storage, time.storage_ns),
                (Bottleneck::Network, time.network_ns),
                (Bottleneck::Cpu, time.waiting_for_cpu_ns),
            ] {
                *self
                    .time_lost_s
                    .entry((name.clone(), class.name()))
                    .or_default() += ns as f64 / 1e9;
            }
            // Under "other" several workloads share a series: keep the one losing most.
            let keep = self
                .verdicts
                .get(&name)
                .is_none_or(|kept| name != OTHER || verdict.share >= kept.share);
            if keep {
                self.verdicts.insert(name, verdict.clone());
            }
        }
        for device in &gpu.devices {
            *self.xid_errors.entry(device.uuid.clone()).or_default() +=
                device.xid_errors.len() as u64;
        }
    }

    fn histogram(&self, histogram: &Histogram) -> Value {
        let counts = histogram.rebucket_ns(&self.latency_bounds_ns);
        Value::Histogram(ExportHistogram {
            bounds: self.latency_bounds_s.clone(),
            // The buckets' total, not the kernel's separate counter: OTLP wants them equal.
            count: counts.iter().sum(),
            counts,
            sum: histogram.sum_ns() as f64 / 1e9,
        })
    }

    /// Every series, from the cumulative kernel snapshot, the latest GPU reading and budgets.
    pub fn series(
        &mut self,
        kernel: &KernelSnapshot,
        names: &dyn SystemNames,
        gpu: &GpuSummary,
        budgets: &[BudgetView],
    ) -> Vec<Series> {
        let mut out = Vec::new();
        self.storage_series(kernel, names, &mut out);
        self.network_series(kernel, &mut out);
        self.request_series(kernel, &mut out);
        self.attribution_series(&mut out);
        self.gpu_series(gpu, &mut out);
        self.cuda_series(kernel, names, &mut out);
        self.engine_series(&mut out);
        budget_series(budgets, &mut out);
        probe_series(kernel, &mut out);
        out
    }

    fn storage_series(
        &mut self,
        kernel: &KernelSnapshot,
        names: &dyn SystemNames,
        out: &mut Vec<Series>,
    ) {
        let mut device_label = |dev: u32| {
            let (major, minor) = split_dev(dev);
            let name = names
                .block_device_name(major, minor)
                .unwrap_or_else(|| format!("{major}:{minor}"));
            self.devices.admit(&name)
        };
        let mut latency: BTreeMap<(String, &'static str, &'static str), Histogram> =
            BTreeMap::new();
        for (key, histogram) in &kernel.storage_latency {
            let stage = match LatencyStage::from_u8(key.stage) {
                LatencyStage::QueuedToComplete => "total",
                LatencyStage::IssuedToComplete => "device",
            };
            let operation = IoOperation::from_u8(key.operation).name();
            latency
                .entry((device_label(key.dev), operation, stage))
                .or_default()
                .add(histogram);
        }
        let mut counters: BTreeMap<(String, &'static str), [u64; 3]> = BTreeMap::new();
        for (key, value) in &kernel.storage_counters {
            let operation = IoOperation::from_u8(key.operation).name();
            let total = counters
                .entry((device_label(key.dev), operation))
                .or_default();
            total[0] += value.completed_requests;
            total[1] += value.completed_bytes;
            total[2] += value.errors;
        }
        for ((device, operation, stage), histogram) in latency {
            out.push(Series {
                metric: &STORAGE_LATENCY,
                attributes: vec![
                    ("system.device", device),
                    ("disk.io.direction", operation.to_string()),
                    ("envelope.storage.stage", stage.to_string()),
                ],
                value: self.histogram(&histogram),
            });
        }
        for ((device, operation), [requests, bytes, errors]) in counters {
            let attributes = vec![
                ("system.device", device),
                ("disk.io.direction", operation.to_string()),
            ];
            for (metric, value) in [
                (&DISK_OPERATIONS, requests),
                (&DISK_IO, bytes),
                (&STORAGE_ERRORS, errors),
            ] {
                out.push(Series {
                    metric,
                    attributes: attributes.clone(),
                    value: Value::Counter(value as f64),
                });
            }
        }
    }

    fn network_series(&mut self, kernel: &KernelSnapshot, out: &mut Vec<Series>) {
        // Peers merge across the processes that talk to them; the kernel keys them by both.
        let mut peer_label = |family: u16, address: &[u8; 16], port: u16| {
            let address =
                peer_address(family, address).map_or_else(|| "?".into(), |a| a.to_string());
            let label = format!("{address}|{port}");
            let admitted = self.peers.admit(&label);
            if admitted == OTHER {
                (OTHER.to_string(), OTHER.to_string())
            } else {
                (address, port.to_string())
            }
        };
        let mut rtt: BTreeMap<(String, String), Histogram> = BTreeMap::new();
        let mut connect: BTreeMap<(String, String), Histogram> = BTreeMap::new();
        let mut counters: BTreeMap<(String, String), [u64; 2]> = BTreeMap::new();
        for (key, histogram) in &kernel.peer_rtt {
            rtt.entry(peer_label(key.family, &key.address, key.port))
                .or_default()
                .add(histogram);
        }
        for (key, histogram) in &kernel.peer_connect_latency {
            connect
                .entry(peer_label(key.family, &key.address, key.port))
                .or_default()
                .add(histogram);
        }
        for (key, value) in &kernel.peer_counters {
            let total = counters
                .entry(peer_label(key.family, &key.address, key.port))
                .or_default();
            total[0] += value.retransmits;
            total[1] += value.connects_failed;
        }
        let attributes = |(address, port): (String, String)| {
            vec![
                ("network.peer.address", address),
                ("network.peer.port", port),
            ]
        };
        for (peer, histogram) in rtt {
            out.push(Series {
                metric: &NETWORK_RTT,
                attributes: attributes(peer),
                value: self.histogram(&histogram),
            });
        }
        for (peer, histogram) in connect {
            out.push(Series {
                metric: &NETWORK_CONNECT_DURATION,
                attributes: attributes(peer),
                value: self.histogram(&histogram),
            });
        }
        for (peer, [retransmits, failed]) in counters {
            out.push(Series {
                metric: &NETWORK_RETRANSMITS,
                attributes: attributes(peer.clone()),
                value: Value::Counter(retransmits as f64),
            });
            out.push(Series {
                metric: &NETWORK_CONNECT_FAILURES,
                attributes: attributes(peer),
                value: Value::Counter(failed as f64),
            });
        }
    }

    /// Requests per server port and per upstream, merged across the processes (pids come
    /// and go; the endpoint is what a dashboard follows). Endpoints share the peers' limit.
    fn request_series(&mut self, kernel: &KernelSnapshot, out: &mut Vec<Series>) {
        type Endpoint = (&'static str, String, String);
        let mut endpoint = |key: &RequestKey| -> Endpoint {
            if key.role == u32::from(role::SERVER) {
                let port = self.peers.admit(&format!("server|{}", key.port));
                let port = if port == OTHER {
                    OTHER.to_string()
                } else {
                    key.port.to_string()
                };
                ("server", String::new(), port)
            } else {
                let address = peer_address(key.family, &key.address)
                    .map_or_else(|| "?".into(), |a| a.to_string());
                if self.peers.admit(&format!("{address}|{}", key.port)) == OTHER {
                    ("client", OTHER.to_string(), OTHER.to_string())
                } else {
                    ("client", address, key.port.to_string())
                }
            }
        };
        let mut latency: BTreeMap<Endpoint, Histogram> = BTreeMap::new();
        let mut first_byte: BTreeMap<Endpoint, Histogram> = BTreeMap::new();
        let mut untimed: BTreeMap<Endpoint, u64> = BTreeMap::new();
        for (key, histogram) in &kernel.request_latency {
            latency.entry(endpoint(key)).or_default().add(histogram);
        }
        for (key, histogram) in &kernel.request_first_byte {
            first_byte.entry(endpoint(key)).or_default().add(histogram);
        }
        for (key, counters) in &kernel.request_counters {
            *untimed.entry(endpoint(key)).or_default() += counters.untimed;
        }
        let attributes = |(role, address, port): Endpoint| {
            let mut attributes = vec![("envelope.request.role", role.to_string())];
            if !address.is_empty() {
                attributes.push(("server.address", address));
            }
            attributes.push(("server.port", port));
            attributes
        };
        for (metric, histograms) in [
            (&REQUEST_DURATION, latency),
            (&REQUEST_FIRST_BYTE, first_byte),
        ] {
            for (key, histogram) in histograms {
                out.push(Series {
                    metric,
                    attributes: attributes(key),
                    value: self.histogram(&histogram),
                });
            }
        }
        for (key, count) in untimed {
            out.push(Series {
                metric: &REQUEST_UNTIMED,
                attributes: attributes(key),
                value: Value::Counter(count as f64),
            });
        }
    }

    fn attribution_series(&self, out: &mut Vec<Series>) {
        for ((workload, class), seconds) in &self.time_lost_s {
            out.push(Series {
                metric: &WORKLOAD_TIME_LOST,
                attributes: vec![
                    ("envelope.workload", workload.clone()),
                    ("envelope.bottleneck", class.to_string()),
                ],
                value: Value::Counter(*seconds),
            });
        }
        for (workload, verdict) in &self.verdicts {
            for class in TIME_LOST_CLASSES.iter().chain([Bottleneck::None].iter()) {
                out.push(Series {
                    metric: &WORKLOAD_BOTTLENECK,
                    attributes: vec![
                        ("envelope.workload", workload.clone()),
                        ("envelope.bottleneck", class.name().to_string()),
                    ],
                    value: Value::Gauge(f64::from(u8::from(verdict.bottleneck == *class))),
                });
            }
            out.push(Series {
                metric: &WORKLOAD_BOTTLENECK_SHARE,
                attributes: vec![("envelope.workload", workload.clone())],
                value: Value::Gauge(if verdict.bottleneck == Bottleneck::None {
                    0.0
                } else {
                    verdict.share
                }),
            });
        }
    }

    fn engine_series(&self, out: &mut Vec<Series>) {
        for (workload, totals) in &self.engines {
            let engine = &totals.latest;
            let mut attributes = vec![("envelope.workload", workload.clone())];
            if let Some(kind) = engine.engine {
                attributes.push(("envelope.engine", kind.as_str().to_string()));
            }
            let with = |extra: &[(&'static str, &str)]| {
                let mut all = attributes.clone();
                all.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
                all
            };
            out.push(Series {
                metric: &ENGINE_STALE,
                attributes: attributes.clone(),
                value: Value::Gauge(f64::from(u8::from(engine.stale.is_some()))),
            });
            if engine.engine.is_none() {
                continue; // never answered: nothing else to say
            }
            out.push(Series {
                metric: &ENGINE_REQUESTS,
                attributes: attributes.clone(),
                value: Value::Counter(totals.requests),
            });
            for (kind, tokens) in [
                ("input", totals.input_tokens),
                ("output", totals.output_tokens),
            ] {
                out.push(Series {
                    metric: &ENGINE_TOKENS,
                    attributes: with(&[("gen_ai.token.type", kind)]),
                    value: Value::Counter(tokens),
                });
            }
            // Quantiles and means of the latest window, in seconds; absent ones are not sent.
            let latencies = [
                ("e2e", "0.5", engine.e2e_p50_ms),
                ("e2e", "0.95", engine.e2e_p95_ms),
                ("e2e", "0.99", engine.e2e_p99_ms),
                ("e2e", "mean", engine.e2e_mean_ms),
                ("ttft", "0.5", engine.ttft_p50_ms),
                ("ttft", "0.95", engine.ttft_p95_ms),
                ("ttft", "0.99", engine.ttft_p99_ms),
                ("tpot", "0.95", engine.tpot_p95_ms),
                ("tpot", "mean", engine.tpot_mean_ms),
                ("queue", "0.95", engine.queue_p95_ms),
                ("queue", "mean", engine.queue_mean_ms),
            ];
            for (phase, quantile, ms) in latencies {
                if let Some(ms) = ms {
                    out.push(Series {
                        metric: &ENGINE_LATENCY,
                        attributes: with(&[
                            ("envelope.engine.phase", phase),
                            ("envelope.quantile", quantile),
                        ]),
                        value: Value::Gauge(ms / 1e3),
                    });
                }
            }
            for (metric, value) in [
                (&ENGINE_PREFIX_CACHE_HIT_RATIO, engine.prefix_cache_hit_rate),
                (&ENGINE_KV_CACHE_USAGE, engine.kv_cache_usage),
            ] {
                if let Some(value) = value {
                    out.push(Series {
                        metric,
                        attributes: attributes.clone(),
                        value: Value::Gauge(value),
                    });
                }
            }
            for (state, value) in [("running", engine.running), ("waiting", engine.waiting)] {
                if let Some(value) = value {
                    out.push(Series {
                        metric: &ENGINE_ACTIVE_REQUESTS,
                        attributes: with(&[("envelope.engine.request.state", state)]),
                        value: Value::Gauge(value),
                    });
                }
            }
        }
    }

    fn gpu_series(&mut self, gpu: &GpuSummary, out: &mut Vec<Series>) {
        for device in &gpu.devices {
            let id = || {
                vec![
                    ("hw.id", device.uuid.clone()),
                    ("hw.name", device.name.clone()),
                    ("hw.gpu.index", device.index.to_string()),
                ]
            };
            let with = |key: &'static str, value: &str| {
                let mut attributes = id();
                attributes.push((key, value.to_string()));
                attributes
            };
            let mut gauge = |metric: &'static Metric, attributes, value: Option<f64>| {
                if let Some(value) = value {
                    out.push(Series {
                        metric,
                        attributes,
                        value: Value::Gauge(value),
                    });
                }
            };
            gauge(&GPU_UTILIZATION, id(), device.utilization);
            gauge(&GPU_MEMORY_UTILIZATION, id(), device.memory_utilization);
            gauge(
                &GPU_MEMORY_USAGE,
                id(),
                device.memory_used_bytes.map(|b| b as f64),
            );
            gauge(
                &GPU_MEMORY_LIMIT,
                id(),
                device.memory_total_bytes.map(|b| b as f64),
            );
            gauge(&GPU_POWER, id(), device.power_w);
            gauge(&GPU_TEMPERATURE, id(), device.temperature_c.map(f64::from));
            gauge(
                &GPU_CLOCK,
                with("envelope.gpu.clock.domain", "sm"),
                device.sm_clock_mhz.map(|mhz| f64::from(mhz) * 1e6),
            );
            gauge(
                &GPU_CLOCK,
                with("envelope.gpu.clock.domain", "memory"),
                device.memory_clock_mhz.map(|mhz| f64::from(mhz) * 1e6),
            );
            gauge(
                &GPU_PCIE_THROUGHPUT,
                with("network.io.direction", "transmit"),
                device.pcie_tx_bytes_per_s,
            );
            gauge(
                &GPU_PCIE_THROUGHPUT,
                with("network.io.direction", "receive"),
                device.pcie_rx_bytes_per_s,
            );
            for reason in &device.throttle_reasons {
                gauge(
                    &GPU_THROTTLED,
                    with("envelope.gpu.throttle.reason", reason),
                    Some(1.0),
                );
            }
            let mut counter = |metric: &'static Metric, attributes, value: Option<f64>| {
                if let Some(value) = value {
                    out.push(Series {
                        metric,
                        attributes,
                        value: Value::Counter(value),
                    });
                }
            };
            counter(&GPU_ENERGY, id(), device.energy_j);
            counter(
                &GPU_ERRORS,
                with("error.type", "ecc_corrected"),
                device.ecc_corrected_errors.map(|n| n as f64),
            );
            counter(
                &GPU_ERRORS,
                with("error.type", "ecc_uncorrected"),
                device.ecc_uncorrected_errors.map(|n| n as f64),
            );
            counter(
                &GPU_ERRORS,
                with("error.type", "xid"),
                self.xid_errors.get(&device.uuid).map(|n| *n as f64),
            );
        }
        let mut processes: HashMap<(String, String, u32), (f64, f64)> = HashMap::new();
        for process in &gpu.processes {
            // Rows only the CUDA probes saw have no GPU figures (their calls export below).
            let Some(gpu_index) = process.gpu_index else {
                continue;
            };
            let label = self
                .gpu_processes
                .admit(&format!("{}|{}", process.pid, process.name));
            let (pid, name) = if label == OTHER {
                (OTHER.to_string(), OTHER.to_string())
            } else {
                (process.pid.to_string(), process.name.clone())
            };
            let total = processes.entry((pid, name, gpu_index)).or_default();
            total.0 += process.memory_bytes.unwrap_or(0) as f64;
            total.1 += process.sm_utilization.unwrap_or(0.0);
        }
        let mut processes: Vec<_> = processes.into_iter().collect();
        processes.sort_by(|a, b| a.0.cmp(&b.0));
        for ((pid, name, gpu_index), (memory, utilization)) in processes {
            let attributes = vec![
                ("process.pid", pid),
                ("process.executable.name", name),
                ("hw.gpu.index", gpu_index.to_string()),
            ];
            out.push(Series {
                metric: &GPU_PROCESS_MEMORY,
                attributes: attributes.clone(),
                value: Value::Gauge(memory),
            });
            out.push(Series {
                metric: &GPU_PROCESS_UTILIZATION,
                attributes,
                value: Value::Gauge(utilization),
            });
        }
    }
}

impl MetricsState {
    /// The CUDA uprobes' totals per process (admitted like GPU processes) and kind of call.
    fn cuda_series(
        &mut self,
        kernel: &KernelSnapshot,
        names: &dyn SystemNames,
        out: &mut Vec<Series>,
    ) {
        use agent_common::cuda::{FUNCTIONS, call, direction};
        type Totals = (f64, f64, f64, f64);
        let mut totals: BTreeMap<(String, String, &'static str, &'static str), Totals> =
            BTreeMap::new();
        // A process keeps its labels for as long as the kernel counts it: named once, so it
        // neither flips to "exited" nor takes a second admission slot when it exits.
        let counted: HashSet<u32> = kernel.cuda_calls.keys().map(|key| key.tgid).collect();
        self.cuda_labels.retain(|tgid, _| counted.contains(tgid));
        let labels = &mut self.cuda_labels;
        let gpu_processes = &mut self.gpu_processes;
        // In key order, so the first processes admitted are the same from export to export.
        let mut calls: Vec<_> = kernel.cuda_calls.iter().collect();
        calls.sort_unstable_by_key(|(key, _)| **key);
        for (key, counters) in calls {
            let Some(function) = FUNCTIONS.get(key.function as usize) else {
                continue;
            };
            let (pid, name) = labels
                .entry(key.tgid)
                .or_insert_with(|| {
                    let name = names.process(key.tgid, "").name;
                    let name = if name.is_empty() {
                        "exited".to_string()
                    } else {
                        name
                    };
                    if gpu_processes.admit(&format!("{}|{name}", key.tgid)) == OTHER {
                        (OTHER.to_string(), OTHER.to_string())
                    } else {
                        (key.tgid.to_string(), name)
                    }
                })
                .clone();
            let kind = match function.call {
                call::SYNC => "sync",
                call::COPY => "copy",
                call::COPY_ASYNC => "copy_async",
                call::ALLOC => "alloc",
                _ => "launch",
            };
            let towards = match (function.call, key.direction) {
                (call::COPY | call::COPY_ASYNC, direction::HOST_TO_DEVICE) => "h2d",
                (call::COPY | call::COPY_ASYNC, direction::DEVICE_TO_HOST) => "d2h",
                (call::COPY | call::COPY_ASYNC, direction::DEVICE_TO_DEVICE) => "d2d",
                (call::COPY | call::COPY_ASYNC, _) => "other",
                _ => "",
            };
            let total = totals.entry((pid, name, kind, towards)).or_default();
            total.0 += counters.ns as f64 / 1e9;
            total.1 += counters.calls as f64;
            total.2 += counters.bytes as f64;
            total.3 += counters.failures as f64;
        }
        for ((pid, name, kind, towards), (seconds, calls, bytes, failures)) in totals {
            let mut attributes = vec![
                ("process.pid", pid),
                ("process.executable.name", name),
                ("envelope.cuda.call", kind.to_string()),
            ];
            if !towards.is_empty() {
                attributes.push(("envelope.cuda.copy.direction", towards.to_string()));
            }
            for (metric, value) in [
                (&CUDA_CALL_TIME, seconds),
                (&CUDA_CALLS, calls),
                (&CUDA_IO, bytes),
                (&CUDA_FAILURES, failures),
            ] {
                out.push(Series {
                    metric,
                    attributes: attributes.clone(),
                    value: Value::Counter(value),
                });
            }
        }
        let mut histograms: BTreeMap<(String, String), Histogram> = BTreeMap::new();
        for (tgid, histogram) in &kernel.cuda_blocking_latency {
            if let Some(label) = labels.get(tgid) {
                histograms.entry(label.clone()).or_default().add(histogram);
            }
        }
        for ((pid, name), histogram) in histograms {
            out.push(Series {
                metric: &CUDA_BLOCKING_DURATION,
                attributes: vec![("process.pid", pid), ("process.executable.name", name)],
                value: self.histogram(&histogram),
            });
        }
    }
}

/// One counter per attached probe, zero included: a dashboard can alert on any increase.
fn probe_series(kernel: &KernelSnapshot, out: &mut Vec<Series>) {
    for (probe, missed) in &kernel.missed_events {
        out.push(Series {
            metric: &PROBE_MISSED_EVENTS,
            attributes: vec![("envelope.probe", probe.clone())],
            value: Value::Counter(*missed as f64),
        });
    }
}

fn budget_series(budgets: &[BudgetView], out: &mut Vec<Series>) {
    for budget in budgets {
        let attributes = vec![
            ("envelope.budget", budget.name.clone()),
            ("envelope.workload", budget.workload.clone()),
            ("envelope.budget.metric", budget.metric.name().to_string()),
        ];
        out.push(Series {
            metric: &BUDGET_STATE,
            attributes: attributes.clone(),
            value: Value::Gauge(f64::from(u8::from(budget.status == BreachStatus::Firing))),
        });
        out.push(Series {
            metric: &BUDGET_NO_DATA,
            attributes: attributes.clone(),
            value: Value::Gauge(f64::from(u8::from(budget.no_data))),
        });
        out.push(Series {
            metric: &BUDGET_THRESHOLD,
            attributes: attributes.clone(),
            value: Value::Gauge(budget.threshold),
        });
        if let Some(observed) = budget.observed {
            out.push(Series {
                metric: &BUDGET_OBSERVED,
                attributes: attributes.clone(),
                value: Value::Gauge(observed),
            });
        }
        for (window, rate) in &budget.burn_rates {
            let mut attributes = attributes.clone();
            attributes.push(("envelope.burn_window", window.clone()));
            out.push(Series {
                metric: &BUDGET_BURN_RATE,
                attributes,
                value: Value::Gauge(*rate),
            });
        }
        out.push(Series {
            metric: &BUDGET_OBJECTIVE,
            attributes: attributes.clone(),
            value: Value::Gauge(budget.objective),
        });
        for (outcome, windows) in [("good", budget.good_windows), ("bad", budget.bad_windows)] {
            let mut attributes = attributes.clone();
            attributes.push(("envelope.budget.outcome", outcome.to_string()));
            out.push(Series {
                metric: &BUDGET_WINDOWS,
                attributes,
                value: Value::Counter(windows as f64),
            });
        }
        for (cause, windows) in &budget.bad_windows_by_cause {
            let mut attributes = attributes.clone();
            attributes.push(("envelope.bottleneck", cause.name().to_string()));
            out.push(Series {
                metric: &BUDGET_BAD_WINDOWS,
                attributes,
                value: Value::Counter(*windows as f64),
            });
        }
        out.push(Series {
            metric: &BUDGET_BREACHES,
            attributes,
            value: Value::Counter(budget.breaches as f64),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::attribution::{TimeBreakdown, WorkloadWindow},
        model::process::{ProcessIdentity, ProcessKind},
    };
    use agent_common::{
        network::{PeerCounters, PeerKey},
        storage::{StorageCounters, StorageDeviceKey, StorageLatencyKey},
    };

    struct Names;
    impl SystemNames for Names {
        fn block_device_name(&self, major: u32, minor: u32) -> Option<String> {
            Some(format!("disk{major}-{minor}"))
        }
        fn process(&self, _tgid: u32, comm: &str) -> ProcessIdentity {
            ProcessIdentity {
                name: comm.to_string(),
                kind: ProcessKind::Process,
                cgroup: None,
                executable: None,
            }
        }
    }

    fn limits(n: usize) -> Limits {
        Limits {
            workloads: n,
            peers: n,
            devices: n,
            gpu_processes: n,
        }
    }

    fn find<'a>(series: &'a [Series], name: &str, attribute: (&str, &str)) -> Vec<&'a Series> {
        series
            .iter()
            .filter(|s| {
                s.metric.name == name
                    && s.attributes
                        .iter()
                        .any(|(k, v)| *k == attribute.0 && v == attribute.1)
            })
            .collect()
    }

    #[test]
    fn cuda_totals_export_per_process_kind_and_direction() {
        use agent_common::cuda::{CudaCallCounters, CudaCallKey, FUNCTIONS, direction};
        let key = |tgid: u32, symbol: &str, to: u8| CudaCallKey {
            tgid,
            function: FUNCTIONS.iter().position(|f| f.symbol == symbol).unwrap() as u8,
            direction: to,
            _padding: [0; 2],
        };
        let mut kernel = KernelSnapshot::default();
        let sync = CudaCallCounters {
            calls: 100,
            ns: 2_000_000_000,
            bytes: 0,
            failures: 0,
        };
        kernel
            .cuda_calls
            .insert(key(7, "cudaStreamSynchronize", direction::OTHER), sync);
        kernel
            .cuda_calls
            .insert(key(7, "cuStreamSynchronize", direction::OTHER), sync);
        kernel.cuda_calls.insert(
            key(7, "cudaMemcpy", direction::HOST_TO_DEVICE),
            CudaCallCounters {
                calls: 10,
                ns: 100_000_000,
                bytes: 1 << 30,
                failures: 0,
            },
        );
        kernel
            .cuda_calls
            .insert(key(8, "cudaDeviceSynchronize", direction::OTHER), sync);
        let blocking = Histogram::from_samples_ns(std::iter::repeat_n(20_000_000, 100));
        kernel.cuda_blocking_latency.insert(7, blocking);
        let mut state = MetricsState::new(limits(1), &[]);
        let series = state.series(&kernel, &Names, &GpuSummary::default(), &[]);
        let of = |metric: &str, pid: &str, kind: &str| -> Vec<f64> {
            find(&series, metric, ("process.pid", pid))
                .into_iter()
                .filter(|s| {
                    s.attributes
                        .iter()
                        .any(|(k, v)| *k == "envelope.cuda.call" && v == kind)
                })
                .map(|s| match &s.value {
                    Value::Counter(value) => *value,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        // Runtime and driver synchronisations of one process add up in one series.
        assert_eq!(of("envelope.cuda.call.time", "7", "sync"), vec![4.0]);
        assert_eq!(of("envelope.cuda.calls", "7", "sync"), vec![200.0]);
        assert_eq!(
            of("envelope.cuda.io", "7", "copy"),
            vec![(1u64 << 30) as f64]
        );
        let copy = find(&series, "envelope.cuda.io", ("envelope.cuda.call", "copy"));
        assert!(
            copy[0]
                .attributes
                .contains(&("envelope.cuda.copy.direction", "h2d".to_string()))
        );
        // Past the GPU-process limit: "other".
        assert_eq!(of("envelope.cuda.call.time", "other", "sync"), vec![2.0]);
        let histogram = find(
            &series,
            "envelope.cuda.blocking.duration",
            ("process.pid", "7"),
        );
        match &histogram[0].value {
            Value::Histogram(h) => assert_eq!(h.count, 100),
            other => panic!("{other:?}"),
        }
    }

    fn peer(last_octet: u8, port: u16, tgid: u32) -> PeerKey {
        let mut address = [0u8; 16];
        address[..4].copy_from_slice(&[10, 0, 0, last_octet]);
        PeerKey {
            address,
            family: 2,
            port,
            tgid,
        }
    }

    #[test]
    fn storage_histograms_use_the_budget_thresholds_as_bounds() {
        let mut kernel = KernelSnapshot::default();
        let dev = (8 << 20) | 16;
        kernel.storage_latency.insert(
            StorageLatencyKey::new(dev, IoOperation::Read as u8, LatencyStage::QueuedToComplete),
            Histogram::from_samples_ns(
                std::iter::repeat_n(3_000_000, 90).chain(std::iter::repeat_n(9_000_000, 10)),
            ),
        );
        kernel.storage_counters.insert(
            StorageDeviceKey {
                dev,
                operation: IoOperation::Read as u8,
                _padding: [0; 3],
            },
            StorageCounters {
                completed_requests: 100,
                completed_bytes: 409_600,
                errors: 1,
                untimed_completions: 0,
            },
        );
        // A budget at 7 ms: a bound there separates the 3 ms and 9 ms samples exactly.
        let mut state = MetricsState::new(limits(8), &[0.007]);
        let series = state.series(&kernel, &Names, &GpuSummary::default(), &[]);
        let latency = find(
            &series,
            "envelope.storage.latency",
            ("system.device", "disk8-16"),
        );
        assert_eq!(latency.len(), 1);
        let Value::Histogram(histogram) = &latency[0].value else {
            panic!("not a histogram")
        };
        let at = |bound: f64| {
            histogram
                .bounds
                .iter()
                .position(|b| (*b - bound).abs() < 1e-12)
                .expect("bound present")
        };
        let up_to_5ms: u64 = histogram.counts[..=at(0.005)].iter().sum();
        assert_eq!(up_to_5ms, 90);
        assert_eq!(histogram.counts[at(0.007)], 0);
        assert_eq!(histogram.counts[at(0.01)], 10);
        assert_eq!(histogram.count, 100);
        assert!((histogram.sum - 0.36).abs() < 1e-9, "{}", histogram.sum);
        let operations = find(
            &series,
            "system.disk.operations",
            ("disk.io.direction", "read"),
        );
        assert_eq!(operations[0].value, Value::Counter(100.0));
        let bytes = find(&series, "system.disk.io", ("system.device", "disk8-16"));
        assert_eq!(bytes[0].value, Value::Counter(409_600.0));
    }

    #[test]
    fn peers_past_the_limit_go_to_other_and_stay_there() {
        let mut kernel = KernelSnapshot::default();
        for (octet, tgid) in [(1, 100), (1, 101), (2, 100), (3, 100)] {
            kernel.peer_counters.insert(
                peer(octet, 443, tgid),
                PeerCounters {
                    retransmits: u64::from(octet),
                    ..PeerCounters::default()
                },
            );
        }
        let mut state = MetricsState::new(limits(1), &[]);
        let series = state.series(&kernel, &Names, &GpuSummary::default(), &[]);
        let retransmits: Vec<_> = series
            .iter()
            .filter(|s| s.metric.name == "envelope.network.retransmits")
            .collect();
        // One admitted peer (whichever the map yielded first) plus "other": never more.
        assert_eq!(retransmits.len(), 2, "{retransmits:?}");
        let total: f64 = retransmits
            .iter()
            .map(|s| match s.value {
                Value::Counter(v) => v,
                _ => 0.0,
            })
            .sum();
        assert_eq!(total, 1.0 + 1.0 + 2.0 + 3.0);
        assert!(retransmits.iter().any(|s| {
            s.attributes
                .contains(&("network.peer.address", OTHER.into()))
        }));
        // A second export keeps the same admitted peer.
        let again = state.series(&kernel, &Names, &GpuSummary::default(), &[]);
        let first: Vec<_> = again
            .iter()
            .filter(|s| s.metric.name == "envelope.network.retransmits")
            .cloned()
            .collect();
        assert_eq!(
            first.iter().map(|s| &s.attributes).collect::<Vec<_>>(),
            retransmits
                .iter()
                .map(|s| &s.attributes)
                .collect::<Vec<_>>()
        );
    }

    fn workload(name: &str, storage_ms: u64, bottleneck: Bottleneck) -> Judged {
        Judged {
            window: WorkloadWindow {
                name: name.into(),
                window_ns: 1_000_000_000,
                time: TimeBreakdown {
                    storage_ns: storage_ms * 1_000_000,
                    ..TimeBreakdown::default()
                },
                ..WorkloadWindow::default()
            },
            verdict: Verdict {
                bottleneck,
                share: 0.5,
                note: None,
                confidence: 1.0,
                workload: Some(name.into()),
                pid: None,
                summary: String::new(),
                evidence: Vec::new(),
            },
        }
    }

    #[test]
    fn time_lost_accumulates_across_windows_and_the_verdict_is_one_hot() {
        let mut state = MetricsState::new(limits(1), &[]);
        state.add_window(
            &[
                workload("loader", 400, Bottleneck::Storage),
                workload("extra", 100, Bottleneck::None),
            ],
            &GpuSummary::default(),
        );
        state.add_window(
            &[workload("loader", 300, Bottleneck::Storage)],
            &GpuSummary::default(),
        );
        let series = state.series(
            &KernelSnapshot::default(),
            &Names,
            &GpuSummary::default(),
            &[],
        );
        let lost: Vec<_> = find(
            &series,
            "envelope.workload.time_lost",
            ("envelope.bottleneck", "storage"),
        );
        let by_workload: BTreeMap<String, f64> = lost
            .iter()
            .map(|s| {
                let Value::Counter(v) = s.value else { panic!() };
                (s.attributes[0].1.clone(), (v * 1000.0).round() / 1000.0)
            })
            .collect();
        assert_eq!(
            by_workload,
            BTreeMap::from([("loader".into(), 0.7), (OTHER.into(), 0.1)])
        );
        let hot: Vec<_> = find(
            &series,
            "envelope.workload.bottleneck",
            ("envelope.workload", "loader"),
        )
        .into_iter()
        .filter(|s| s.value == Value::Gauge(1.0))
        .collect();
        assert_eq!(hot.len(), 1);
        assert!(
            hot[0]
                .attributes
                .contains(&("envelope.bottleneck", "storage".into()))
        );
    }

    #[test]
    fn budgets_export_state_threshold_observed_burn_rate_and_breaches() {
        let mut state = MetricsState::new(limits(4), &[]);
        let view = BudgetView {
            name: "storage p95".into(),
            workload: "loader".into(),
            metric: BudgetMetric::StorageP95Ms,
            threshold: 10.0,
            observed: Some(84.0),
            no_data: false,
            status: BreachStatus::Firing,
            burn_rates: vec![("1h".into(), 20.0), ("5m".into(), 30.0)],
            breaches: 2,
            objective: 0.99,
            good_windows: 7,
            bad_windows: 3,
            bad_windows_by_cause: [(Bottleneck::Model, 2), (Bottleneck::Storage, 1)].into(),
        };
        let series = state.series(
            &KernelSnapshot::default(),
            &Names,
            &GpuSummary::default(),
            &[view],
        );
        let value = |name: &str| {
            series
                .iter()
                .filter(|s| s.metric.name == name)
                .map(|s| s.value.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(value("envelope.budget.state"), vec![Value::Gauge(1.0)]);
        assert_eq!(value("envelope.budget.threshold"), vec![Value::Gauge(10.0)]);
        assert_eq!(value("envelope.budget.observed"), vec![Value::Gauge(84.0)]);
        assert_eq!(
            value("envelope.budget.burn_rate"),
            vec![Value::Gauge(20.0), Value::Gauge(30.0)]
        );
        assert_eq!(value("envelope.budget.breaches"), vec![Value::Counter(2.0)]);
        assert_eq!(value("envelope.budget.objective"), vec![Value::Gauge(0.99)]);
        assert_eq!(
            value("envelope.budget.windows"),
            vec![Value::Counter(7.0), Value::Counter(3.0)]
        );
        let causes: Vec<(String, Value)> = series
            .iter()
            .filter(|s| s.metric.name == "envelope.budget.bad_windows")
            .map(|s| {
                let cause = s
                    .attributes
                    .iter()
                    .find(|(k, _)| *k == "envelope.bottleneck");
                (
                    cause.map(|(_, v)| v.clone()).unwrap_or_default(),
                    s.value.clone(),
                )
            })
            .collect();
        assert_eq!(
            causes,
            vec![
                ("model".to_string(), Value::Counter(2.0)),
                ("storage".to_string(), Value::Counter(1.0))
            ]
        );
    }

    #[test]
    fn engine_figures_export_as_totals_that_survive_restarts_and_latest_window_gauges() {
        use crate::model::engine::EngineKind;
        let mut state = MetricsState::new(limits(4), &[]);
        let window = |requests, ttft_p95_ms, restarted| EngineSummary {
            workload: "llm".into(),
            engine: Some(EngineKind::Vllm),
            requests: Some(requests),
            prompt_tokens: Some(1000),
            generation_tokens: Some(4000),
            ttft_p95_ms,
            prefix_cache_hit_rate: Some(0.6),
            running: Some(3.0),
            restarted,
            ..EngineSummary::default()
        };
        state.add_engines(&[window(100, Some(250.0), false)]);
        // The engine restarted: its window counts from zero, the exported total goes on.
        state.add_engines(&[window(40, None, true)]);
        let series = state.series(
            &KernelSnapshot::default(),
            &Names,
            &GpuSummary::default(),
            &[],
        );
        let values = |name: &str| -> Vec<(Vec<String>, Value)> {
            series
                .iter()
                .filter(|s| s.metric.name == name)
                .map(|s| {
                    let attributes = s
                        .attributes
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    (attributes, s.value.clone())
                })
                .collect()
        };
        let base = [
            "envelope.workload=llm".to_string(),
            "envelope.engine=vllm".to_string(),
        ];
        assert_eq!(
            values("envelope.engine.requests"),
            [(base.to_vec(), Value::Counter(140.0))]
        );
        let tokens: Vec<Value> = values("envelope.engine.tokens")
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(tokens, [Value::Counter(2000.0), Value::Counter(8000.0)]);
        assert!(
            values("envelope.engine.latency").is_empty(),
            "the latest window had no TTFT: nothing stale is sent"
        );
        assert_eq!(
            values("envelope.engine.prefix_cache.hit_ratio")[0].1,
            Value::Gauge(0.6)
        );
        let mut running = base.to_vec();
        running.push("envelope.engine.request.state=running".into());
        assert_eq!(
            values("envelope.engine.requests.active"),
            [(running, Value::Gauge(3.0))]
        );
        assert_eq!(values("envelope.engine.stale")[0].1, Value::Gauge(0.0));
        state.add_engines(&[window(10, Some(250.0), false)]);
        let series = state.series(
            &KernelSnapshot::default(),
            &Names,
            &GpuSummary::default(),
            &[],
        );
        let ttft: Vec<&Series> = series
            .iter()
            .filter(|s| s.metric.name == "envelope.engine.latency")
            .collect();
        assert_eq!(ttft.len(), 1);
        assert_eq!(ttft[0].value, Value::Gauge(0.25), "in seconds");
        assert!(
            ttft[0]
                .attributes
                .contains(&("envelope.engine.phase", "ttft".into()))
        );
        assert!(
            ttft[0]
                .attributes
                .contains(&("envelope.quantile", "0.95".into()))
        );
    }

    #[test]
    fn the_readme_lists_every_metric_with_its_unit() {
        let readme = include_str!("../../../README.md");
        for metric in ALL_METRICS {
            let row = format!("| `{}` |", metric.name);
            let line = readme
                .lines()
                .find(|line| line.starts_with(&row))
                .unwrap_or_else(|| panic!("README.md has no row for {}", metric.name));
            let unit = if metric.unit.is_empty() {
                "| – |".to_string()
            } else {
                format!("| `{}` |", metric.unit)
            };
            assert!(
                line.contains(&unit),
                "README.md gives {} another unit than {}",
                metric.name,
                metric.unit
            );
        }
    }

    #[test]
    fn every_metric_name_is_unique_and_dotted() {
        let mut names: Vec<&str> = ALL_METRICS.iter().map(|m| m.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count);
        assert!(names.iter().all(|n| n.contains('.') && !n.contains(' ')));
    }
}
