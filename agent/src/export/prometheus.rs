//! The same catalogue as the OTLP export, as a Prometheus scrape endpoint (`[export]
//! prometheus = true`, on 127.0.0.1:9464 unless `prometheus_listen` says otherwise), for teams
//! that scrape rather than push. Names follow the OpenTelemetry-to-Prometheus rules the OTLP
//! path gets from a collector or VictoriaMetrics (dots become underscores, `s` adds
//! `_seconds`, `By` `_bytes`, `1` `_ratio`, counters `_total`), so dashboards and alert rules
//! work on either path. The exposition is written by the `prometheus` crate's text encoder,
//! which escapes label values (process and workload names come from /proc and the
//! configuration); the HTTP side is hyper.
use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    Encoder, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};
use tokio::sync::RwLock;

use super::metrics::{Series, Value};

/// The Prometheus name of an OTLP metric with this unit and kind.
pub fn prometheus_name(name: &str, unit: &str, counter: bool) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let suffix = match unit {
        "s" => Some("seconds"),
        "By" => Some("bytes"),
        "1" => Some("ratio"),
        _ => None,
    };
    if let Some(suffix) = suffix
        && !out.ends_with(suffix)
    {
        out.push('_');
        out.push_str(suffix);
    }
    if counter {
        out.push_str("_total");
    }
    out
}

fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The series as a Prometheus text exposition.
pub fn render(series: &[Series], host: &str) -> String {
    let mut families: BTreeMap<String, MetricFamily> = BTreeMap::new();
    for one in series {
        let counter = matches!(one.value, Value::Counter(_));
        let name = prometheus_name(one.metric.name, one.metric.unit, counter);
        let family = families.entry(name.clone()).or_insert_with(|| {
            let mut family = MetricFamily::default();
            family.set_name(name);
            family.set_help(one.metric.description.to_string());
            family.set_field_type(match one.value {
                Value::Gauge(_) => MetricType::GAUGE,
                Value::Counter(_) => MetricType::COUNTER,
                Value::Histogram(_) => MetricType::HISTOGRAM,
            });
            family
        });
        let mut labels: Vec<LabelPair> = std::iter::once(("host.name", host))
            .chain(one.attributes.iter().map(|(k, v)| (*k, v.as_str())))
            .map(|(key, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(label_name(key));
                pair.set_value(value.to_string());
                pair
            })
            .collect();
        labels.sort_by(|a, b| a.name().cmp(b.name()));
        let mut metric = Metric::default();
        metric.set_label(labels);
        match &one.value {
            Value::Gauge(value) => {
                let mut gauge = Gauge::default();
                gauge.set_value(*value);
                metric.set_gauge(gauge);
            }
            Value::Counter(value) => {
                let mut counter = Counter::default();
                counter.set_value(*value);
                metric.set_counter(counter);
            }
            Value::Histogram(histogram) => {
                let mut out = Histogram::default();
                out.set_sample_count(histogram.count);
                out.set_sample_sum(histogram.sum);
                let mut cumulative = 0;
                let buckets: Vec<Bucket> = histogram
                    .bounds
                    .iter()
                    .zip(&histogram.counts)
                    .map(|(bound, count)| {
                        cumulative += count;
                        let mut bucket = Bucket::default();
                        bucket.set_upper_bound(*bound);
                        bucket.set_cumulative_count(cumulative);
                        bucket
                    })
                    .collect();
                out.set_bucket(buckets);
                metric.set_histogram(out);
            }
        }
        family.mut_metric().push(metric);
    }
    let families: Vec<MetricFamily> = families.into_values().collect();
    let mut text = Vec::new();
    // Writing well-formed families into a Vec cannot fail.
    if let Err(error) = TextEncoder::new().encode(&families, &mut text) {
        return format!("# envelope: the exposition could not be written: {error}\n");
    }
    String::from_utf8(text).unwrap_or_default()
}

/// The latest exposition, replaced each window.
pub type Exposition = Arc<RwLock<String>>;

/// Serves `GET /metrics` on `address` until the process ends. Binding fails at once (the
/// caller says what to do); connections are served on tasks of their own.
pub async fn serve(address: SocketAddr, exposition: Exposition) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let exposition = exposition.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let exposition = exposition.clone();
                    async move { Ok::<_, Infallible>(answer(&request, &exposition).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), service);
                // A client that never finishes (or keeps a connection open) is cut off.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), connection).await;
            });
        }
    });
    Ok(())
}

async fn answer(request: &Request<Incoming>, exposition: &Exposition) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if request.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "envelope serves /metrics only\n".to_string(),
        )
    } else if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".to_string(),
        )
    } else {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            exposition.read().await.clone(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::metrics::{
        ExportHistogram, NETWORK_RTT, REQUEST_UNTIMED, WORKLOAD_BOTTLENECK_SHARE,
    };

    #[test]
    fn names_follow_the_otlp_to_prometheus_rules_and_labels_are_escaped() {
        assert_eq!(
            prometheus_name("envelope.network.rtt", "s", false),
            "envelope_network_rtt_seconds"
        );
        assert_eq!(
            prometheus_name("system.disk.io", "By", true),
            "system_disk_io_bytes_total"
        );
        assert_eq!(
            prometheus_name("envelope.request.untimed", "{request}", true),
            "envelope_request_untimed_total"
        );
        let series = vec![
            Series {
                metric: &REQUEST_UNTIMED,
                attributes: vec![("server.port", "8000".into())],
                value: Value::Counter(3.0),
            },
            Series {
                metric: &WORKLOAD_BOTTLENECK_SHARE,
                attributes: vec![("envelope.workload", "evil\"name\nwith\\escapes".into())],
                value: Value::Gauge(0.5),
            },
            Series {
                metric: &NETWORK_RTT,
                attributes: vec![],
                value: Value::Histogram(ExportHistogram {
                    bounds: vec![0.001, 0.01],
                    counts: vec![2, 3, 1],
                    count: 6,
                    sum: 0.05,
                }),
            },
        ];
        let text = render(&series, "node-1");
        assert!(text.contains("# TYPE envelope_request_untimed_total counter\nenvelope_request_untimed_total{host_name=\"node-1\",server_port=\"8000\"} 3\n"), "{text}");
        assert!(
            text.contains("envelope_workload=\"evil\\\"name\\nwith\\\\escapes\""),
            "{text}"
        );
        assert!(
            text.contains(
                "envelope_network_rtt_seconds_bucket{host_name=\"node-1\",le=\"0.01\"} 5\n"
            ),
            "cumulative: {text}"
        );
        assert!(
            text.contains(
                "envelope_network_rtt_seconds_bucket{host_name=\"node-1\",le=\"+Inf\"} 6\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("envelope_network_rtt_seconds_count{host_name=\"node-1\"} 6\n"),
            "{text}"
        );
    }
}
