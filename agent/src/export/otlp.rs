//! OTLP export: metrics and breach events to a collector or database, over gRPC (default) or
//! HTTP/protobuf.
//!
//! Why the protocol types (opentelemetry-proto) and not the SDK's meter: the kernel already
//! aggregates latency into histograms, and the SDK can only build a histogram by recording
//! every sample again (its data points cannot be constructed from outside). Sending the
//! kernel's buckets as they are keeps userspace work per export proportional to the number of
//! series, not to the number of I/Os or packets.
//!
//! A collector that is down or slow costs a bounded number of retries per export and one log
//! line per outage. Metrics are cumulative, so the next export after an outage carries
//! everything; breach events wait in a bounded queue and go out when it is back.
use std::{collections::VecDeque, time::Duration};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
        metrics::v1::{ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    metrics::v1::{
        AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};
use prost::Message as _;

use super::metrics::{Series, Value};
use crate::config::ExportConfig;

/// Breach events kept while the collector is unreachable; older ones are dropped first (and
/// counted in the log) beyond this.
pub const MAX_QUEUED_EVENTS: usize = 1000;
/// Tries per export before giving up until the next export.
const ATTEMPTS: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Everything the exporter needs, resolved from `[export]`, then OTEL_* variables, then defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpSettings {
    pub enabled: bool,
    pub protocol: Protocol,
    pub metrics_url: String,
    pub logs_url: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    /// None: every window.
    pub interval: Option<Duration>,
    pub ca_file: Option<String>,
    pub resource: Vec<(String, String)>,
}

fn millis(value: Option<String>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_millis)
}

/// Parses "k1=v1,k2=v2" (OTEL_EXPORTER_OTLP_HEADERS, OTEL_RESOURCE_ATTRIBUTES), with the
/// values percent-decoded as the specification asks.
pub fn parse_pairs(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            let key = key.trim();
            (!key.is_empty()).then(|| (key.to_string(), percent_decode(value.trim())))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

impl OtlpSettings {
    /// `env` looks up a variable (std::env::var in the agent, a map in tests).
    pub fn resolve(
        config: &ExportConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let protocol_name = config
            .protocol
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_else(|| "grpc".to_string());
        let protocol = match protocol_name.as_str() {
            "grpc" => Protocol::Grpc,
            "http/protobuf" => Protocol::HttpProtobuf,
            other => anyhow::bail!(
                "OTLP protocol {other:?} is not supported; use \"grpc\" or \"http/protobuf\" ([export] protocol or OTEL_EXPORTER_OTLP_PROTOCOL)"
            ),
        };
        let base = config
            .endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_else(|| match protocol {
                Protocol::Grpc => "http://localhost:4317".to_string(),
                Protocol::HttpProtobuf => "http://localhost:4318".to_string(),
            });
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            anyhow::bail!(
                "OTLP endpoint {base:?} needs a scheme: http://host:port or https://host:port"
            );
        }
        // gRPC takes the base for both signals; HTTP appends the signal's path to the base.
        let signal_url = |signal: &str| match protocol {
            Protocol::Grpc => base.clone(),
            Protocol::HttpProtobuf => format!("{}/v1/{signal}", base.trim_end_matches('/')),
        };
        let metrics_url = config
            .metrics_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
            .unwrap_or_else(|| signal_url("metrics"));
        let logs_url = config
            .logs_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"))
            .unwrap_or_else(|| signal_url("logs"));
        let mut headers = env("OTEL_EXPORTER_OTLP_HEADERS")
            .map(|text| parse_pairs(&text))
            .unwrap_or_default();
        for (key, value) in &config.headers {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
            headers.push((key.to_ascii_lowercase(), value.clone()));
        }
        for (key, value) in &headers {
            crate::config::check_header(key, value)
                .map_err(|problem| anyhow::anyhow!("OTEL_EXPORTER_OTLP_HEADERS: {problem}"))?;
        }
        let timeout = config
            .timeout
            .or_else(|| millis(env("OTEL_EXPORTER_OTLP_TIMEOUT")))
            .filter(|timeout| !timeout.is_zero())
            .unwrap_or(Duration::from_secs(10));
        let interval = config
            .interval
            .or_else(|| millis(env("OTEL_METRIC_EXPORT_INTERVAL")))
            .filter(|interval| !interval.is_zero());
        let mut resource = vec![
            (
                "service.name".to_string(),
                env("OTEL_SERVICE_NAME").unwrap_or_else(|| "envelope".to_string()),
            ),
            (
                "service.version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ];
        if let Some(host) = env("ENVELOPE_HOST_NAME").or_else(crate::host::system::host_name) {
            resource.push(("host.name".to_string(), host));
        }
        if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
            resource.push(("host.id".to_string(), id.trim().to_string()));
        }
        if let Some(node) = env("K8S_NODE_NAME").or_else(|| env("NODE_NAME")) {
            resource.push(("k8s.node.name".to_string(), node));
        }
        for (key, value) in env("OTEL_RESOURCE_ATTRIBUTES")
            .map(|text| parse_pairs(&text))
            .unwrap_or_default()
        {
            resource.retain(|(k, _)| *k != key);
            resource.push((key, value));
        }
        Ok(Self {
            enabled: config.enabled.unwrap_or(true),
            protocol,
            metrics_url,
            logs_url,
            headers,
            timeout,
            interval,
            ca_file: config
                .ca_file
                .clone()
                .or_else(|| env("OTEL_EXPORTER_OTLP_CERTIFICATE")),
            resource,
        })
    }
}

/// OTLP timestamps: nanoseconds since the Unix epoch (0 for a clock before it).
pub fn unix_ns(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

fn resource(settings: &OtlpSettings) -> Resource {
    Resource {
        attributes: settings
            .resource
            .iter()
            .map(|(k, v)| string_attribute(k, v))
            .collect(),
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "envelope".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    }
}

/// One export request: series grouped into metrics in first-seen order.
pub fn metrics_request(
    settings: &OtlpSettings,
    series: &[Series],
    start_unix_ns: u64,
    now_unix_ns: u64,
) -> ExportMetricsServiceRequest {
    let mut metrics: Vec<Metric> = Vec::new();
    for one in series {
        let attributes: Vec<KeyValue> = one
            .attributes
            .iter()
            .map(|(k, v)| string_attribute(k, v))
            .collect();
        let number = |value: f64| NumberDataPoint {
            attributes: attributes.clone(),
            start_time_unix_nano: start_unix_ns,
            time_unix_nano: now_unix_ns,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..Default::default()
        };
        let index = match metrics.iter().position(|m| m.name == one.metric.name) {
            Some(index) => index,
            None => {
                metrics.push(Metric {
                    name: one.metric.name.to_string(),
                    description: one.metric.description.to_string(),
                    unit: one.metric.unit.to_string(),
                    data: Some(match one.value {
                        Value::Gauge(_) => Data::Gauge(Gauge::default()),
                        Value::Counter(_) => Data::Sum(Sum {
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            is_monotonic: true,
                            ..Default::default()
                        }),
                        Value::Histogram(_) => Data::Histogram(Histogram {
                            aggregation_temporality: AggregationTemporality::Cumulative as i32,
                            ..Default::default()
                        }),
                    }),
                    ..Default::default()
                });
                metrics.len() - 1
            }
        };
        match (&mut metrics[index].data, &one.value) {
            (Some(Data::Gauge(gauge)), Value::Gauge(value)) => {
                gauge.data_points.push(number(*value));
            }
            (Some(Data::Sum(sum)), Value::Counter(value)) => sum.data_points.push(number(*value)),
            (Some(Data::Histogram(histogram)), Value::Histogram(value)) => {
                histogram.data_points.push(HistogramDataPoint {
                    attributes,
                    start_time_unix_nano: start_unix_ns,
                    time_unix_nano: now_unix_ns,
                    count: value.count,
                    sum: Some(value.sum),
                    bucket_counts: value.counts.clone(),
                    explicit_bounds: value.bounds.clone(),
                    ..Default::default()
                });
            }
            // A metric is always built with one kind (metrics.rs); skip rather than panic.
            _ => tracing::debug!("metric {} mixes kinds; point skipped", one.metric.name),
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource(settings)),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A log event (breach transitions).
#[derive(Clone, Debug, PartialEq)]
pub struct LogEvent {
    pub time_unix_ns: u64,
    pub event_name: &'static str,
    /// OpenTelemetry severity number (9 info, 13 warn, 17 error).
    pub severity_number: i32,
    pub severity_text: &'static str,
    pub body: String,
    pub attributes: Vec<(String, String)>,
}

pub fn logs_request(settings: &OtlpSettings, events: &[LogEvent]) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource(settings)),
            scope_logs: vec![ScopeLogs {
                scope: Some(scope()),
                log_records: events
                    .iter()
                    .map(|event| LogRecord {
                        time_unix_nano: event.time_unix_ns,
                        observed_time_unix_nano: event.time_unix_ns,
                        severity_number: event.severity_number,
                        severity_text: event.severity_text.to_string(),
                        body: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(event.body.clone())),
                        }),
                        attributes: event
                            .attributes
                            .iter()
                            .map(|(k, v)| string_attribute(k, v))
                            .collect(),
                        event_name: event.event_name.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

struct GrpcClients {
    metrics: MetricsServiceClient<tonic::transport::Channel>,
    logs: LogsServiceClient<tonic::transport::Channel>,
}

enum Transport {
    Grpc(Box<GrpcClients>),
    Http { client: reqwest::Client },
}

/// Sends requests; remembers whether each endpoint is reachable so an outage is logged once.
pub struct OtlpExporter {
    settings: OtlpSettings,
    transport: Transport,
    queued_events: VecDeque<LogEvent>,
    dropped_events: u64,
    metrics_outage: Outage,
    logs_outage: Outage,
}

/// One signal's exports (metrics or logs) failing since when, and how many. Kept apart per
/// signal: the two may go to different endpoints, and with one shared, a logs endpoint down
/// beside working metrics logged a failure and a recovery at every export.
struct Outage {
    /// "metrics" or "logs", as the log lines name it.
    signal: &'static str,
    /// What the recovery line says became of what was measured during the outage.
    on_recovery: &'static str,
    since: Option<std::time::Instant>,
    failed_exports: u64,
}

impl Outage {
    fn new(signal: &'static str, on_recovery: &'static str) -> Self {
        Self {
            signal,
            on_recovery,
            since: None,
            failed_exports: 0,
        }
    }

    fn is_on(&self) -> bool {
        self.since.is_some()
    }

    /// Logs the first failure and the recovery, once each; `url` is the endpoint.
    fn note(&mut self, url: &str, outcome: &anyhow::Result<()>) {
        let signal = self.signal;
        match (outcome, self.since) {
            (Ok(()), Some(since)) => {
                tracing::info!(
                    "OTLP {signal} export works again after {:.0} s and {} failed exports; {}",
                    since.elapsed().as_secs_f64(),
                    self.failed_exports,
                    self.on_recovery
                );
                self.since = None;
                self.failed_exports = 0;
            }
            (Err(error), None) => {
                tracing::warn!(
                    "OTLP {signal} export failed ({error:#}); measuring goes on and exports are retried every interval, logged again only when they work (is the collector at {url} up?)"
                );
                self.since = Some(std::time::Instant::now());
                self.failed_exports = 1;
            }
            (Err(_), Some(_)) => self.failed_exports += 1,
            (Ok(()), None) => {}
        }
    }
}

fn grpc_channel(settings: &OtlpSettings, url: &str) -> anyhow::Result<tonic::transport::Channel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .with_context(|| format!("OTLP endpoint {url:?} is not a valid URL"))?
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout);
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
        if let Some(ca_file) = &settings.ca_file {
            let pem = std::fs::read(ca_file)
                .with_context(|| format!("cannot read the CA file {ca_file} ([export] ca_file)"))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .context("TLS set-up for the OTLP endpoint")?;
    }
    // Lazy: the agent starts, measures and queues even while the collector is down.
    Ok(endpoint.connect_lazy())
}

/// The HTTP client for OTLP/HTTP: the request timeout, the system's roots plus `ca_file`, and
/// no redirects (headers may carry credentials and must not follow a redirect elsewhere).
fn http_client(settings: &OtlpSettings) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("envelope/", env!("CARGO_PKG_VERSION")));
    if let Some(ca_file) = &settings.ca_file {
        let pem = std::fs::read(ca_file)
            .with_context(|| format!("cannot read the CA file {ca_file} ([export] ca_file)"))?;
        let certificate = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("the CA file {ca_file} is not a PEM certificate"))?;
        builder = builder.add_root_certificate(certificate);
    }
    builder.build().context("setting up the OTLP/HTTP client")
}

impl OtlpExporter {
    /// Builds the exporter; needs a running tokio runtime (gRPC channels spawn on it).
    pub fn new(settings: OtlpSettings) -> anyhow::Result<Self> {
        let transport = match settings.protocol {
            Protocol::Grpc => Transport::Grpc(Box::new(GrpcClients {
                metrics: MetricsServiceClient::new(grpc_channel(&settings, &settings.metrics_url)?),
                logs: LogsServiceClient::new(grpc_channel(&settings, &settings.logs_url)?),
            })),
            Protocol::HttpProtobuf => Transport::Http {
                client: http_client(&settings)?,
            },
        };
        Ok(Self {
            settings,
            transport,
            queued_events: VecDeque::new(),
            dropped_events: 0,
            metrics_outage: Outage::new(
                "metrics",
                "cumulative totals carry what was measured meanwhile",
            ),
            logs_outage: Outage::new("logs", "the breach events queued meanwhile are sent"),
        })
    }

    pub fn settings(&self) -> &OtlpSettings {
        &self.settings
    }

    fn grpc_request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for (key, value) in &self.settings.headers {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes()),
                value.parse(),
            ) {
                request.metadata_mut().insert(key, value);
            }
        }
        request
    }

    async fn post_http(&self, url: &str, body: Vec<u8>) -> anyhow::Result<()> {
        let Transport::Http { client } = &self.transport else {
            anyhow::bail!("not an HTTP exporter");
        };
        let mut request = client
            .post(url)
            .header("content-type", "application/x-protobuf")
            .body(body);
        for (key, value) in &self.settings.headers {
            request = request.header(key, value);
        }
        let response = request
            .send()
            .await
            .map_err(|error| anyhow::anyhow!("{url}: {error}"))?;
        let status = response.status();
        if !status.is_success() {
            anyhow::bail!("{url}: the collector answered {status}");
        }
        Ok(())
    }

    async fn send_metrics_once(
        &mut self,
        request: &ExportMetricsServiceRequest,
    ) -> anyhow::Result<()> {
        match &mut self.transport {
            Transport::Grpc(clients) => {
                let mut client = clients.metrics.clone();
                let request = self.grpc_request(request.clone());
                client.export(request).await.map(|_| ()).map_err(|status| {
                    anyhow::anyhow!("{}: {}", self.settings.metrics_url, status.message())
                })
            }
            Transport::Http { .. } => {
                let url = self.settings.metrics_url.clone();
                self.post_http(&url, request.encode_to_vec()).await
            }
        }
    }

    async fn send_logs_once(&mut self, request: &ExportLogsServiceRequest) -> anyhow::Result<()> {
        match &mut self.transport {
            Transport::Grpc(clients) => {
                let mut client = clients.logs.clone();
                let request = self.grpc_request(request.clone());
                client.export(request).await.map(|_| ()).map_err(|status| {
                    anyhow::anyhow!("{}: {}", self.settings.logs_url, status.message())
                })
            }
            Transport::Http { .. } => {
                let url = self.settings.logs_url.clone();
                self.post_http(&url, request.encode_to_vec()).await
            }
        }
    }

    /// Sends the metrics, retrying a bounded number of times. A failure is not an error for
    /// the caller: the next export carries the cumulative totals.
    pub async fn export_metrics(&mut self, request: &ExportMetricsServiceRequest) -> bool {
        let mut outcome = Ok(());
        for attempt in 0..ATTEMPTS {
            // During an outage one try per export: retries there only delay shutdown.
            if attempt > 0 && self.metrics_outage.is_on() {
                break;
            }
            outcome = self.send_metrics_once(request).await;
            if outcome.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        self.metrics_outage
            .note(&self.settings.metrics_url, &outcome);
        outcome.is_ok()
    }

    /// Queues breach events and sends everything queued; kept for the next try on failure.
    pub async fn export_events(&mut self, events: Vec<LogEvent>) -> bool {
        self.queued_events.extend(events);
        while self.queued_events.len() > MAX_QUEUED_EVENTS {
            self.queued_events.pop_front();
            self.dropped_events += 1;
        }
        if self.queued_events.is_empty() {
            return true;
        }
        let events: Vec<LogEvent> = self.queued_events.iter().cloned().collect();
        let request = logs_request(&self.settings, &events);
        let outcome = self.send_logs_once(&request).await;
        let sent = outcome.is_ok();
        self.logs_outage.note(&self.settings.logs_url, &outcome);
        if sent {
            self.queued_events.clear();
            if self.dropped_events > 0 {
                tracing::warn!(
                    "{} breach events were dropped during the collector outage (queue limit {MAX_QUEUED_EVENTS})",
                    self.dropped_events
                );
                self.dropped_events = 0;
            }
        }
        sent
    }

    pub fn queued_events(&self) -> usize {
        self.queued_events.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::metrics::{DISK_IO, ExportHistogram, GPU_UTILIZATION, NETWORK_RTT};
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn settings_come_from_the_config_then_the_environment_then_defaults() {
        let defaults = OtlpSettings::resolve(&ExportConfig::default(), env(&[])).unwrap();
        assert_eq!(defaults.protocol, Protocol::Grpc);
        assert_eq!(defaults.metrics_url, "http://localhost:4317");
        assert_eq!(defaults.timeout, Duration::from_secs(10));
        assert!(
            defaults
                .resource
                .contains(&("service.name".into(), "envelope".into()))
        );

        let from_env = OtlpSettings::resolve(
            &ExportConfig::default(),
            env(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%3Dcret,tenant=a"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod"),
                ("K8S_NODE_NAME", "gpu-node-7"),
            ]),
        )
        .unwrap();
        assert_eq!(from_env.protocol, Protocol::HttpProtobuf);
        assert_eq!(from_env.metrics_url, "http://collector:4318/v1/metrics");
        assert_eq!(from_env.logs_url, "http://collector:4318/v1/logs");
        assert_eq!(
            from_env.headers,
            vec![
                ("api-key".into(), "s=cret".into()),
                ("tenant".into(), "a".into())
            ]
        );
        assert_eq!(from_env.timeout, Duration::from_millis(2500));
        assert!(
            from_env
                .resource
                .contains(&("k8s.node.name".into(), "gpu-node-7".into()))
        );
        assert!(
            from_env
                .resource
                .contains(&("deployment.environment".into(), "prod".into()))
        );

        let config = ExportConfig {
            protocol: Some("grpc".into()),
            endpoint: Some("https://otel.example:4317".into()),
            headers: [("Tenant".to_string(), "b".to_string())].into(),
            timeout: Some(Duration::from_secs(3)),
            ..ExportConfig::default()
        };
        let both = OtlpSettings::resolve(
            &config,
            env(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "tenant=a"),
            ]),
        )
        .unwrap();
        assert_eq!(both.protocol, Protocol::Grpc);
        assert_eq!(both.metrics_url, "https://otel.example:4317");
        assert_eq!(both.headers, vec![("tenant".into(), "b".into())]);
        assert_eq!(both.timeout, Duration::from_secs(3));

        let bad = OtlpSettings::resolve(
            &ExportConfig::default(),
            env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]),
        );
        assert!(bad.unwrap_err().to_string().contains("needs a scheme"));
    }

    #[test]
    fn series_become_one_metric_each_with_cumulative_points() {
        let settings = OtlpSettings::resolve(&ExportConfig::default(), env(&[])).unwrap();
        let series = vec![
            Series {
                metric: &GPU_UTILIZATION,
                attributes: vec![("hw.id", "GPU-1".into())],
                value: Value::Gauge(0.5),
            },
            Series {
                metric: &DISK_IO,
                attributes: vec![("system.device", "vda".into())],
                value: Value::Counter(4096.0),
            },
            Series {
                metric: &NETWORK_RTT,
                attributes: vec![("network.peer.port", "443".into())],
                value: Value::Histogram(ExportHistogram {
                    bounds: vec![0.001, 0.01],
                    counts: vec![1, 2, 3],
                    count: 6,
                    sum: 0.5,
                }),
            },
            Series {
                metric: &GPU_UTILIZATION,
                attributes: vec![("hw.id", "GPU-2".into())],
                value: Value::Gauge(0.25),
            },
        ];
        let request = metrics_request(&settings, &series, 10, 20);
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        assert_eq!(
            metrics.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            vec![
                "hw.gpu.utilization",
                "system.disk.io",
                "envelope.network.rtt"
            ]
        );
        let Some(Data::Gauge(gauge)) = &metrics[0].data else {
            panic!()
        };
        assert_eq!(gauge.data_points.len(), 2);
        let Some(Data::Sum(sum)) = &metrics[1].data else {
            panic!()
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(sum.data_points[0].start_time_unix_nano, 10);
        let Some(Data::Histogram(histogram)) = &metrics[2].data else {
            panic!()
        };
        assert_eq!(metrics[2].unit, "s");
        assert_eq!(histogram.data_points[0].explicit_bounds, vec![0.001, 0.01]);
        assert_eq!(histogram.data_points[0].bucket_counts, vec![1, 2, 3]);
        assert_eq!(histogram.data_points[0].count, 6);
    }

    #[test]
    fn an_unreachable_collector_fails_fast_and_keeps_events_queued() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            // A port nothing listens on.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            drop(listener);
            let config = ExportConfig {
                endpoint: Some(format!("http://127.0.0.1:{port}")),
                timeout: Some(Duration::from_secs(1)),
                ..ExportConfig::default()
            };
            let settings = OtlpSettings::resolve(&config, env(&[])).unwrap();
            let mut exporter = OtlpExporter::new(settings.clone()).unwrap();
            let request = metrics_request(&settings, &[], 0, 1);
            assert!(!exporter.export_metrics(&request).await);
            let event = LogEvent {
                time_unix_ns: 1,
                event_name: "envelope.budget.breach",
                severity_number: 13,
                severity_text: "WARN",
                body: "x".into(),
                attributes: vec![],
            };
            assert!(!exporter.export_events(vec![event.clone()]).await);
            assert!(!exporter.export_events(vec![event]).await);
            assert_eq!(exporter.queued_events(), 2);
        });
    }

    /// Issue 16: an OTLP/HTTP collector answering with a redirect does not get the request
    /// (and its credential headers) sent on to the other host.
    #[test]
    fn otlp_over_http_follows_no_redirect_and_sends_its_headers_nowhere_else() {
        use std::io::{Read as _, Write as _};
        let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        elsewhere.set_nonblocking(true).unwrap();
        let target = format!("http://{}/v1/metrics", elsewhere.local_addr().unwrap());
        let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = collector.local_addr().unwrap();
        let answering = std::thread::spawn(move || {
            let (mut stream, _) = collector.accept().unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = stream.read(&mut buffer).unwrap();
                assert!(read > 0);
                request.extend_from_slice(&buffer[..read]);
            }
            write!(
                stream,
                "HTTP/1.1 308 Permanent Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
            )
            .unwrap();
            String::from_utf8_lossy(&request).to_lowercase()
        });
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let config = ExportConfig {
                protocol: Some("http/protobuf".into()),
                endpoint: Some(format!("http://{address}")),
                headers: [("api-key".to_string(), "s3cret".to_string())].into(),
                timeout: Some(Duration::from_secs(2)),
                ..ExportConfig::default()
            };
            let settings = OtlpSettings::resolve(&config, env(&[])).unwrap();
            let mut exporter = OtlpExporter::new(settings.clone()).unwrap();
            let request = metrics_request(&settings, &[], 0, 1);
            assert!(
                !exporter.export_metrics(&request).await,
                "a redirect is a failure"
            );
        });
        let seen = answering.join().unwrap();
        assert!(seen.contains("api-key: s3cret"), "{seen}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(elsewhere.accept().is_err(), "the redirect was followed");
    }
}
