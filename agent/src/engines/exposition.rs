//! The Prometheus text exposition, parsed by `nom-openmetrics`, keeping only the series a
//! catalogue reads. A line the parser refuses is skipped and counted, not fatal: one odd
//! metric must not hide an engine's latency.
use std::collections::HashSet;

use nom_openmetrics::parser::family;

use crate::model::engine::Series;

/// What an exposition held of the `wanted` series, and how many of its sample lines (of
/// those wanted) could not be read.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub series: Vec<Series>,
    pub unreadable_lines: usize,
}

/// A sample line's metric name: up to its labels or its value.
fn metric_name(line: &str) -> &str {
    let end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    &line[..end]
}

/// The line without a trailing timestamp (`name{labels} value 1700000000000`), which the
/// parser does not accept and envelope does not need.
fn without_timestamp(line: &str) -> &str {
    let after_labels = line
        .rfind('}')
        .map_or(metric_name(line).len(), |end| end + 1);
    let tail = &line[after_labels..];
    let mut fields = tail.split_whitespace();
    match (fields.next(), fields.next(), fields.next()) {
        (Some(_), Some(_), None) => {
            let cut = tail.trim_end().rfind([' ', '\t']).unwrap_or(tail.len());
            line[..after_labels + cut].trim_end()
        }
        _ => line,
    }
}

/// Parses `text`, keeping the samples whose name is in `wanted`. Comments, `# HELP` and
/// `# TYPE` lines and blank lines are dropped before parsing (types come from the
/// catalogue); so are samples whose value is a signed infinity, which no figure uses and on
/// which nom-openmetrics 0.3 writes a debug line to stderr.
pub fn parse(text: &str, wanted: &HashSet<String>) -> Parsed {
    let mut kept = String::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r').trim_start();
        if line.is_empty() || line.starts_with('#') || !wanted.contains(metric_name(line)) {
            continue;
        }
        let line = without_timestamp(line);
        if line.ends_with("+Inf") || line.ends_with("-Inf") {
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    let mut parsed = Parsed::default();
    let mut rest = kept.as_str();
    while !rest.is_empty() {
        match family(rest) {
            Ok((after, family)) if after.len() < rest.len() => {
                parsed.series.extend(family.samples.iter().map(|sample| {
                    Series {
                        name: sample.name().to_string(),
                        labels: sample
                            .labels()
                            .iter()
                            .map(|label| (label.name.to_string(), label.value.clone()))
                            .collect(),
                        value: sample.number(),
                    }
                }));
                rest = after;
            }
            _ => {
                parsed.unreadable_lines += 1;
                rest = rest.split_once('\n').map_or("", |(_, after)| after);
            }
        }
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn keeps_the_wanted_series_with_their_labels_from_a_python_client_exposition() {
        let text = "# HELP vllm:num_requests_running Number of requests.\n\
            # TYPE vllm:num_requests_running gauge\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"meta/Llama-3\"} 4.0\n\
            # HELP vllm:e2e_request_latency_seconds Histogram.\n\
            # TYPE vllm:e2e_request_latency_seconds histogram\n\
            vllm:e2e_request_latency_seconds_bucket{le=\"0.3\",model_name=\"meta/Llama-3\"} 1.0\n\
            vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"meta/Llama-3\"} 3.0\n\
            vllm:e2e_request_latency_seconds_created{model_name=\"meta/Llama-3\"} 1.7e+09\n\
            process_cpu_seconds_total 12.5\n";
        let parsed = parse(
            text,
            &wanted(&[
                "vllm:num_requests_running",
                "vllm:e2e_request_latency_seconds_bucket",
            ]),
        );
        assert_eq!(parsed.unreadable_lines, 0);
        assert_eq!(parsed.series.len(), 3);
        assert_eq!(parsed.series[0].value, 4.0);
        assert_eq!(parsed.series[0].label("model_name"), Some("meta/Llama-3"));
        assert_eq!(parsed.series[2].label("le"), Some("+Inf"));
        assert_eq!(parsed.series[2].value, 3.0);
    }

    #[test]
    fn blank_lines_crlf_and_timestamps_are_read_and_garbage_is_skipped_and_counted() {
        // metrics-exporter-prometheus (TGI) separates families with blank lines.
        let text = "# TYPE tgi_queue_size gauge\r\ntgi_queue_size 3\r\n\r\n\
            tgi_request_success 10 1700000000000\n\
            tgi_request_success{broken 7\n\
            tgi_batch_current_size +Inf\n\
            tgi_batch_current_size 2\n";
        let parsed = parse(
            text,
            &wanted(&[
                "tgi_queue_size",
                "tgi_request_success",
                "tgi_batch_current_size",
            ]),
        );
        let values: Vec<(&str, f64)> = parsed
            .series
            .iter()
            .map(|s| (s.name.as_str(), s.value))
            .collect();
        assert_eq!(
            values,
            vec![
                ("tgi_queue_size", 3.0),
                ("tgi_request_success", 10.0),
                ("tgi_batch_current_size", 2.0)
            ]
        );
        assert_eq!(parsed.unreadable_lines, 1);
    }

    #[test]
    fn nothing_wanted_in_garbage_is_nothing_read() {
        let parsed = parse("\u{0}\u{1}binary\n<html>oops</html>", &wanted(&["x"]));
        assert_eq!(parsed, Parsed::default());
    }
}
