//! `envelope run` end to end (root): the real probes, real disk traffic, the real daemon
//! exporting to an in-process OTLP gRPC receiver.
use std::{path::Path, time::Duration};

use integration_tests::{
    ScratchFile,
    daemon::{Daemon, ReadLoad, Scratch, wait_for},
    otlp_receiver::{OtlpReceiver, attribute, point_count},
    root_or_skip,
};
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric::Data, number_data_point};

/// A configuration with one storage budget on the `dd` workload at `max_ms`; its action
/// appends `$ENVELOPE_STATUS` to `actions.log` in `dir`.
fn storage_config(dir: &Path, endpoint: &str, max_ms: f64) -> String {
    storage_config_with(dir, endpoint, max_ms, "2s", "$ENVELOPE_STATUS")
}

/// The same with the burn window pair's short window and what the action logs.
fn storage_config_with(
    dir: &Path,
    endpoint: &str,
    max_ms: f64,
    short: &str,
    logged: &str,
) -> String {
    format!(
        r#"
[agent]
window = "1s"
state_dir = "{state}"

[export]
endpoint = "{endpoint}"
timeout = "2s"

[alerting]
windows = [{{ long = "10s", short = "{short}", factor = 1.0 }}]
enter_after = 2
leave_after = 2

[[workload]]
name = "reader"
process = ["dd"]

[[budget]]
name = "reader storage p95"
workload = "reader"
metric = "storage_p95_ms"
max = {max_ms}
objective = 0.5
actions = [{{ command = ["sh", "-c", "echo \"{logged}\" >> {actions}"] }}]
"#,
        state = dir.join("state").display(),
        actions = dir.join("actions.log").display(),
    )
}

fn counter_total(metric: &Metric) -> f64 {
    match &metric.data {
        Some(Data::Sum(sum)) => sum
            .data_points
            .iter()
            .map(|p| match p.value {
                Some(number_data_point::Value::AsDouble(v)) => v,
                Some(number_data_point::Value::AsInt(v)) => v as f64,
                None => 0.0,
            })
            .sum(),
        _ => panic!("{} is not a counter", metric.name),
    }
}

fn breach_records(receiver: &OtlpReceiver, status: &str) -> usize {
    receiver
        .log_records()
        .iter()
        .filter(|r| {
            r.event_name == "envelope.budget.breach"
                && attribute(&r.attributes, "envelope.breach.status") == Some(status)
        })
        .count()
}

#[test]
fn a_storage_breach_fires_once_acts_once_survives_a_bad_reload_and_resolves() {
    if !root_or_skip("envelope run against real disk traffic") {
        return;
    }
    let dir = Scratch::new();
    let receiver = OtlpReceiver::start();
    let config = dir.0.join("envelope.toml");
    // A ceiling of 0.1 microsecond: every real read breaks it.
    std::fs::write(
        &config,
        storage_config(&dir.0, &receiver.endpoint(), 0.0001),
    )
    .unwrap();
    let file = ScratchFile::create(64 << 20);
    let _load = ReadLoad::start(&file.path);
    let mut daemon = Daemon::start(&config, &[]);

    wait_for("the breach to fire", Duration::from_secs(40), || {
        breach_records(&receiver, "firing") >= 1
    });
    // A few more bad windows: still one event, one action (hysteresis, no flapping).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(breach_records(&receiver, "firing"), 1);
    assert_eq!(daemon.log_lines_with("firing for workload \"reader\""), 1);
    let record = receiver
        .log_records()
        .into_iter()
        .find(|r| r.event_name == "envelope.budget.breach")
        .unwrap();
    assert_eq!(
        attribute(&record.attributes, "envelope.budget"),
        Some("reader storage p95")
    );
    assert_eq!(
        attribute(&record.attributes, "envelope.workload"),
        Some("reader")
    );
    assert_eq!(
        attribute(&record.attributes, "envelope.budget.threshold"),
        Some("0.0001")
    );
    assert!(
        attribute(&record.attributes, "envelope.breach.id")
            .is_some_and(|id| id.starts_with("reader storage p95@"))
    );
    assert_eq!(record.severity_number, 13);
    let actions = dir.0.join("actions.log");
    assert_eq!(std::fs::read_to_string(&actions).unwrap(), "firing\n");

    // The metrics: names, units, attributes, bounds that include the budget's threshold.
    let latency = receiver
        .latest("envelope.storage.latency")
        .expect("storage latency exported");
    assert_eq!(latency.unit, "s");
    let Some(Data::Histogram(histogram)) = &latency.data else {
        panic!("envelope.storage.latency is not a histogram")
    };
    let reads = histogram
        .data_points
        .iter()
        .find(|p| {
            attribute(&p.attributes, "disk.io.direction") == Some("read")
                && attribute(&p.attributes, "envelope.storage.stage") == Some("total")
        })
        .expect("a read latency point");
    assert!(
        reads.explicit_bounds.contains(&1e-7),
        "{:?}",
        reads.explicit_bounds
    );
    assert_eq!(reads.bucket_counts.len(), reads.explicit_bounds.len() + 1);
    assert_eq!(reads.bucket_counts.iter().sum::<u64>(), reads.count);
    assert!(reads.count > 100, "only {} reads", reads.count);
    assert!(attribute(&reads.attributes, "system.device").is_some());
    assert_eq!(
        receiver.latest("system.disk.operations").unwrap().unit,
        "{operation}"
    );
    let lost = receiver.latest("envelope.workload.time_lost").unwrap();
    assert_eq!(lost.unit, "s");
    assert!(counter_total(&lost) > 0.0);
    let resource = receiver.metric_requests()[0].resource_metrics[0]
        .resource
        .clone()
        .unwrap();
    assert_eq!(
        attribute(&resource.attributes, "service.name"),
        Some("envelope")
    );
    assert!(attribute(&resource.attributes, "host.name").is_some());
    let state = receiver.latest("envelope.budget.state").unwrap();
    assert_eq!(point_count(&state), 1);

    // A broken configuration on SIGHUP is refused; the daemon keeps measuring and exporting.
    std::fs::write(&config, "[[budget]\nname = ").unwrap();
    let exports_before = receiver.metric_requests().len();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        daemon.log_lines_with("refused the new configuration") == 1
    });
    wait_for("exports to go on", Duration::from_secs(10), || {
        receiver.metric_requests().len() >= exports_before + 2
    });
    assert!(daemon.running());
    assert_eq!(breach_records(&receiver, "resolved"), 0);

    // A generous ceiling: the same traffic is now within the envelope, the breach resolves.
    std::fs::write(
        &config,
        storage_config(&dir.0, &receiver.endpoint(), 100_000.0),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for("the breach to resolve", Duration::from_secs(30), || {
        breach_records(&receiver, "resolved") >= 1
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(breach_records(&receiver, "firing"), 1);
    assert_eq!(breach_records(&receiver, "resolved"), 1);
    wait_for("the resolve action", Duration::from_secs(10), || {
        std::fs::read_to_string(&actions).unwrap() == "firing\nresolved\n"
    });

    // SIGTERM: exit 0 after a last export; the budget's history is on disk.
    let exports_before = receiver.metric_requests().len();
    assert_eq!(daemon.stop(), 0);
    assert!(
        receiver.metric_requests().len() > exports_before,
        "no export on shutdown"
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.0.join("state/budget-state.json")).unwrap())
            .unwrap();
    assert_eq!(saved["reader storage p95"]["breaches"], 1);

    // A restart picks the state up: the breach counter starts at 1, not 0.
    let restarted = OtlpReceiver::start();
    std::fs::write(
        &config,
        storage_config(&dir.0, &restarted.endpoint(), 100_000.0),
    )
    .unwrap();
    let daemon = Daemon::start(&config, &[]);
    wait_for(
        "the first export after a restart",
        Duration::from_secs(20),
        || restarted.latest("envelope.budget.breaches").is_some(),
    );
    assert_eq!(
        counter_total(&restarted.latest("envelope.budget.breaches").unwrap()),
        1.0
    );
    assert_eq!(daemon.stop(), 0);
}

#[test]
fn a_collector_outage_is_survived_with_one_log_line_and_counters_continue() {
    if !root_or_skip("envelope run through a collector outage") {
        return;
    }
    let dir = Scratch::new();
    let mut receiver = OtlpReceiver::start();
    let config = dir.0.join("envelope.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nwindow = \"1s\"\nstate_dir = \"{}\"\n[export]\nendpoint = \"{}\"\ntimeout = \"1s\"\n",
            dir.0.join("state").display(),
            receiver.endpoint()
        ),
    )
    .unwrap();
    let file = ScratchFile::create(32 << 20);
    let _load = ReadLoad::start(&file.path);
    let mut daemon = Daemon::start(&config, &[]);
    let disk_ops = |receiver: &OtlpReceiver| {
        receiver
            .latest("system.disk.operations")
            .map_or(0.0, |m| counter_total(&m))
    };
    wait_for("two exports", Duration::from_secs(20), || {
        receiver.metric_requests().len() >= 2 && disk_ops(&receiver) > 0.0
    });
    let before_outage = disk_ops(&receiver);
    let rss_before = daemon.rss_kib();

    receiver.stop();
    std::thread::sleep(Duration::from_secs(6));
    assert!(daemon.running(), "the daemon died during the outage");
    assert_eq!(daemon.log_lines_with("OTLP metrics export failed"), 1);

    let requests_before = receiver.metric_requests().len();
    receiver.restart();
    wait_for("exports after the outage", Duration::from_secs(20), || {
        receiver.metric_requests().len() > requests_before
    });
    let after_outage = disk_ops(&receiver);
    // Cumulative: what was read during the outage is in the first total after it.
    assert!(
        after_outage > before_outage,
        "disk operations went from {before_outage} to {after_outage}"
    );
    wait_for("the recovery line", Duration::from_secs(5), || {
        daemon.log_lines_with("OTLP metrics export works again") == 1
    });
    assert_eq!(daemon.log_lines_with("OTLP metrics export failed"), 1);
    let rss_after = daemon.rss_kib();
    assert!(
        rss_after < rss_before + 16 * 1024,
        "memory grew from {rss_before} KiB to {rss_after} KiB over an outage"
    );
    assert_eq!(daemon.stop(), 0);
}

/// Issue 18: a breach fired while the workload was busy resolves once it goes quiet, says
/// why, and runs its action once each way; the budget then reports that it has no data.
#[test]
fn a_breach_fired_while_busy_resolves_when_the_workload_goes_quiet() {
    if !root_or_skip("envelope run with disk traffic that stops") {
        return;
    }
    let dir = Scratch::new();
    let receiver = OtlpReceiver::start();
    let config = dir.0.join("envelope.toml");
    let actions = dir.0.join("actions.log");
    std::fs::write(
        &config,
        storage_config_with(
            &dir.0,
            &receiver.endpoint(),
            0.0001,
            "4s",
            "$ENVELOPE_STATUS: $ENVELOPE_REASON",
        ),
    )
    .unwrap();
    let file = ScratchFile::create(64 << 20);
    let load = ReadLoad::start(&file.path);
    let daemon = Daemon::start(&config, &[]);
    wait_for("the breach to fire", Duration::from_secs(40), || {
        breach_records(&receiver, "firing") >= 1
    });
    // The reader stops: every later window has no data for this budget.
    drop(load);
    wait_for("the breach to resolve", Duration::from_secs(30), || {
        breach_records(&receiver, "resolved") >= 1
    });
    // Quiet for a while longer: nothing fires again.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(breach_records(&receiver, "firing"), 1);
    assert_eq!(breach_records(&receiver, "resolved"), 1);
    let resolved = receiver
        .log_records()
        .into_iter()
        .find(|r| attribute(&r.attributes, "envelope.breach.status") == Some("resolved"))
        .unwrap();
    let reason = attribute(&resolved.attributes, "envelope.breach.reason").unwrap_or_default();
    assert!(reason.starts_with("no data for "), "{reason:?}");
    assert_eq!(
        attribute(&resolved.attributes, "envelope.budget.observed"),
        Some("no data")
    );
    assert_eq!(daemon.log_lines_with("resolved: no data for"), 1);
    wait_for("both actions", Duration::from_secs(10), || {
        std::fs::read_to_string(&actions)
            .unwrap_or_default()
            .lines()
            .count()
            == 2
    });
    let ran = std::fs::read_to_string(&actions).unwrap();
    let lines: Vec<&str> = ran.lines().collect();
    assert!(lines[0].starts_with("firing: burn rate "), "{ran}");
    assert!(lines[1].starts_with("resolved: no data for "), "{ran}");
    // The export says the budget has nothing to measure now.
    let no_data = receiver.latest("envelope.budget.no_data").unwrap();
    let Some(Data::Gauge(gauge)) = &no_data.data else {
        panic!("envelope.budget.no_data is not a gauge")
    };
    assert_eq!(
        gauge.data_points[0].value,
        Some(number_data_point::Value::AsDouble(1.0))
    );
    assert_eq!(daemon.stop(), 0);
}
