//! Breach events as people and collectors read them: one log line, and the same as an OTLP
//! log record with its attributes (`envelope.budget.breach`).
use std::time::SystemTime;

use super::otlp::{LogEvent, unix_ns};
use crate::{
    analysis::attribution::Verdict,
    budgets::{BreachEvent, BudgetResult},
    model::vocabulary::{Bound, BreachStatus},
};

/// The breach event as one line for the log, and as an OTLP log event.
pub fn explain(
    event: &BreachEvent,
    result: &BudgetResult,
    verdict: Option<&Verdict>,
    window_labels: &[String],
    at: SystemTime,
) -> (String, LogEvent) {
    let status = event.status.name();
    // What this window measured, whatever the transition (a breach may fire on a good
    // window of a bad hour, or resolve on a bad one).
    let relation = match (result.bound, result.good) {
        (Bound::Ceiling, Some(false)) => "above its ceiling",
        (Bound::Floor, Some(false)) => "below its floor",
        (_, Some(true)) => "within its bound",
        (_, None) => "for its bound",
    };
    let burn: Vec<String> = event
        .burn_rates
        .iter()
        .zip(window_labels)
        .map(|((_, long, short), label)| format!("{long} over {label} (short window {short})"))
        .collect();
    let verdict_text = verdict.map_or_else(
        || "no verdict".to_string(),
        |v| {
            let offender = v
                .evidence
                .first()
                .map_or(String::new(), |e| format!("; {e}"));
            format!("{}{offender}", v.summary)
        },
    );
    let observed = event
        .observed
        .map_or_else(|| "no data".to_string(), |v| v.to_string());
    let mut line = format!(
        "budget {:?} {status} for workload {:?}: {} = {observed} {relation} {} ; burn rate {}; verdict: {verdict_text}; breach id {}",
        event.budget,
        result.workload,
        result.metric,
        event.threshold,
        burn.join(", "),
        event.breach_id,
    );
    if !event.reason.is_empty() {
        line.push_str(&format!("; {status}: {}", event.reason));
    }
    if let Some(cause) = &event.cause {
        line.push_str(&format!("; cause: {}", cause.summary));
    }
    if let Some(source) = &event.source {
        line.push_str(&format!("; measured by the {source}"));
    }
    if let Some(stage) = &event.stage {
        line.push_str(&format!(
            "; stage {:?} overspent the most: {} = {} against its allocation {}",
            stage.stage,
            result.metric,
            stage
                .observed
                .map_or_else(|| "no data".to_string(), |v| v.to_string()),
            stage.allocation
        ));
    }
    let mut attributes = vec![
        ("envelope.budget".to_string(), event.budget.clone()),
        ("envelope.workload".to_string(), result.workload.clone()),
        (
            "envelope.budget.metric".to_string(),
            result.metric.name().to_string(),
        ),
        ("envelope.breach.id".to_string(), event.breach_id.clone()),
        ("envelope.breach.status".to_string(), status.to_string()),
        ("envelope.budget.observed".to_string(), observed.clone()),
        ("envelope.breach.reason".to_string(), event.reason.clone()),
        (
            "envelope.budget.threshold".to_string(),
            event.threshold.to_string(),
        ),
    ];
    if let Some(cause) = &event.cause {
        attributes.extend([
            ("envelope.breach.cause".to_string(), cause.summary.clone()),
            (
                "envelope.breach.cause.bottleneck".to_string(),
                cause.bottleneck.name().to_string(),
            ),
            (
                "envelope.breach.cause.share".to_string(),
                cause.share.to_string(),
            ),
            (
                "envelope.breach.bad_windows".to_string(),
                format!("{}/{}", cause.bad_windows, cause.windows),
            ),
        ]);
    }
    if let Some(source) = &event.source {
        attributes.push(("envelope.budget.source".to_string(), source.clone()));
    }
    if let Some(stage) = &event.stage {
        attributes.extend([
            ("envelope.stage".to_string(), stage.stage.clone()),
            (
                "envelope.stage.observed".to_string(),
                stage.observed.map_or_else(String::new, |v| v.to_string()),
            ),
            (
                "envelope.stage.allocation".to_string(),
                stage.allocation.to_string(),
            ),
        ]);
    }
    for ((_, long, _), label) in event.burn_rates.iter().zip(window_labels) {
        attributes.push((format!("envelope.burn_rate.{label}"), long.to_string()));
    }
    if let Some(verdict) = verdict {
        attributes.push((
            "envelope.bottleneck".to_string(),
            verdict.bottleneck.name().to_string(),
        ));
        if let Some(offender) = verdict.evidence.first() {
            attributes.push(("envelope.top_offender".to_string(), offender.clone()));
        }
    }
    let firing = event.status == BreachStatus::Firing;
    let log_event = LogEvent {
        time_unix_ns: unix_ns(at),
        event_name: "envelope.budget.breach",
        severity_number: if firing { 13 } else { 9 },
        severity_text: if firing { "WARN" } else { "INFO" },
        body: line.clone(),
        attributes,
    };
    (line, log_event)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::model::vocabulary::{Bottleneck, BudgetMetric};

    #[test]
    fn a_breach_event_explains_itself() {
        let event = BreachEvent {
            budget: "loader p95".into(),
            status: BreachStatus::Firing,
            breach_id: "loader p95@1800".into(),
            observed: Some(84.0),
            threshold: 10.0,
            burn_rates: vec![(3600, 20.0, 30.0)],
            reason: String::new(),
            cause: None,
            source: None,
            stage: None,
        };
        let result = BudgetResult {
            name: "loader p95".into(),
            workload: "loader".into(),
            metric: BudgetMetric::StorageP95Ms,
            bound: Bound::Ceiling,
            threshold: 10.0,
            observed: Some(84.0),
            good: Some(false),
            no_data: false,
            source: None,
            stages: vec![],
            requests_within: None,
            requests_beyond: None,
        };
        let verdict = Verdict {
            bottleneck: Bottleneck::Storage,
            confidence: 0.9,
            workload: Some("loader".into()),
            pid: Some(42),
            summary: "storage - loader (pid 42) spent 70% blocked on nvme0n1".into(),
            evidence: vec!["nvme0n1: P95 84 ms".into()],
            share: 0.7,
            note: None,
        };
        let at = UNIX_EPOCH + Duration::from_secs(1800);
        let (line, log) = explain(&event, &result, Some(&verdict), &["1h".into()], at);
        assert_eq!(
            line,
            "budget \"loader p95\" firing for workload \"loader\": storage_p95_ms = 84 above its ceiling 10 ; burn rate 20 over 1h (short window 30); verdict: storage - loader (pid 42) spent 70% blocked on nvme0n1; nvme0n1: P95 84 ms; breach id loader p95@1800"
        );
        assert_eq!(log.severity_number, 13);
        assert_eq!(log.time_unix_ns, 1_800_000_000_000);
        let attribute = |key: &str| {
            log.attributes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(attribute("envelope.breach.status"), Some("firing"));
        assert_eq!(attribute("envelope.burn_rate.1h"), Some("20"));
        assert_eq!(attribute("envelope.bottleneck"), Some("storage"));
        assert_eq!(
            attribute("envelope.top_offender"),
            Some("nvme0n1: P95 84 ms")
        );
        assert_eq!(
            attribute("envelope.breach.cause"),
            None,
            "no cause was given"
        );
    }

    #[test]
    fn a_breach_event_carries_its_cause_and_source_in_the_line_and_the_attributes() {
        use crate::analysis::attribution::TimeBreakdown;
        use crate::budgets::cause::{RecentWindows, WindowCause};
        let verdict = Verdict {
            bottleneck: Bottleneck::Model,
            confidence: 0.9,
            workload: Some("llm".into()),
            pid: Some(42),
            summary: "model - llm (pid 42) spent 58% waiting on GPU 0 at 99% utilization".into(),
            evidence: vec![],
            share: 0.58,
            note: None,
        };
        let time = TimeBreakdown {
            gpu_ns: 580,
            on_cpu_ns: 420,
            ..Default::default()
        };
        let mut recent = RecentWindows::default();
        for _ in 0..2 {
            recent.push(
                WindowCause::of(Some(false), Some(612.0), 1_000, Some((&time, &verdict))),
                6,
            );
        }
        let event = BreachEvent {
            budget: "ttft".into(),
            status: BreachStatus::Firing,
            breach_id: "ttft@1800".into(),
            observed: Some(612.0),
            threshold: 400.0,
            burn_rates: vec![],
            reason: String::new(),
            cause: recent.explain("llm", BudgetMetric::TtftP95Ms, Bound::Ceiling, 400.0),
            source: Some("engine, vllm".into()),
            stage: None,
        };
        let result = BudgetResult {
            name: "ttft".into(),
            workload: "llm".into(),
            metric: BudgetMetric::TtftP95Ms,
            bound: Bound::Ceiling,
            threshold: 400.0,
            observed: Some(612.0),
            good: Some(false),
            no_data: false,
            source: Some("engine, vllm".into()),
            stages: vec![],
            requests_within: None,
            requests_beyond: None,
        };
        let (line, log) = explain(&event, &result, Some(&verdict), &[], UNIX_EPOCH);
        let cause = "ttft_p95_ms 612 > 400 in 2 of the last 2 windows; in those windows llm lost 58% of its active time waiting on the GPU; latest: model - llm (pid 42) spent 58% waiting on GPU 0 at 99% utilization";
        assert!(
            line.ends_with(&format!("; cause: {cause}; measured by the engine, vllm")),
            "{line}"
        );
        let attribute = |key: &str| {
            log.attributes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(attribute("envelope.breach.cause"), Some(cause));
        assert_eq!(attribute("envelope.breach.cause.bottleneck"), Some("model"));
        assert_eq!(attribute("envelope.breach.cause.share"), Some("0.58"));
        assert_eq!(attribute("envelope.breach.bad_windows"), Some("2/2"));
        assert_eq!(attribute("envelope.budget.source"), Some("engine, vllm"));
    }
}
