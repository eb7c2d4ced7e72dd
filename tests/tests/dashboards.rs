//! The shipped dashboard and alert rules against real tools: promtool checks and unit-tests
//! the rules; VictoriaMetrics (a real time-series database taking OTLP over HTTP) stores what a
//! real `envelope run` exports, and every query of the dashboard must parse and return data.
//! `cargo xtask test` fetches both tools into target/test-tools/bin.
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    ScratchFile,
    daemon::{Daemon, ReadLoad, Scratch, wait_for},
    engine_fixture::{Answer, MetricsEndpoint, vllm},
    fake_nvml_library, root_or_skip,
};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/deploy");

fn test_tool(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/test-tools/bin"
    ))
    .join(name);
    if path.exists() {
        Some(path)
    } else {
        println!(
            "SKIP: {name} is not in {} (`cargo xtask test` fetches it)",
            path.display()
        );
        None
    }
}

#[test]
fn shipped_alert_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = test_tool("promtool") else {
        return;
    };
    let rules = Path::new(DEPLOY).join("prometheus");
    for args in [
        ["check", "rules", "envelope-rules.yml"],
        ["test", "rules", "envelope-rules.test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&rules)
            .output()
            .expect("run promtool");
        assert!(
            output.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// VictoriaMetrics on a free port with its own data directory; killed on drop.
struct VictoriaMetrics {
    child: Child,
    port: u16,
}

impl VictoriaMetrics {
    fn start(binary: &Path, data: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", data.display()))
            .args([
                "-opentelemetry.usePrometheusNaming",
                "-search.latencyOffset=0s",
                "-loggerLevel=ERROR",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("start victoria-metrics");
        let database = Self { child, port };
        wait_for("VictoriaMetrics to answer", Duration::from_secs(20), || {
            database.get("/health").is_ok()
        });
        database
    }

    fn get(&self, path_and_query: &str) -> Result<String, String> {
        ureq_get(&format!("http://127.0.0.1:{}{path_and_query}", self.port))
    }

    /// Runs an instant query; Ok(number of series) or Err(what the database said).
    fn query(&self, expr: &str) -> Result<usize, String> {
        let body = self.get(&format!("/api/v1/query?query={}", urlencode(expr)))?;
        let answer: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if answer["status"] != "success" {
            return Err(body);
        }
        Ok(answer["data"]["result"].as_array().map_or(0, Vec::len))
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP GET through curl (present wherever apt is; keeps the test crate free of an
/// HTTP client).
fn ureq_get(url: &str) -> Result<String, String> {
    let output = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--max-time", "10", url])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let body = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(body)
    } else {
        Err(format!(
            "{body}{}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Every PromQL expression in the dashboard: panel targets and the variables' queries.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(DEPLOY).join("grafana/envelope.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                format!("{} / {}", panel["title"], target["refId"]),
                target["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(query) = variable["query"]["query"].as_str() {
            // label_values(METRIC_SELECTOR, LABEL) is Grafana's; the selector is PromQL.
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .map(|(selector, _)| selector.to_string())
                .expect("label_values(selector, label)");
            queries.push((format!("variable {}", variable["name"]), inner));
        }
    }
    queries
}

/// The first metric name a PromQL expression selects (the word before its first `{`).
fn metric_in(expr: &str) -> Option<&str> {
    let before = &expr[..expr.find('{')?];
    let start = before
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map_or(0, |i| i + 1);
    Some(&before[start..]).filter(|name| !name.is_empty())
}

/// Grafana's variables, as a dashboard viewer with everything selected would send them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__range", "2m")
        .replace("$host", ".+")
        .replace("$workload", ".*")
}

#[test]
fn every_dashboard_query_parses_and_returns_data_from_a_real_database() {
    if !root_or_skip("dashboard queries against VictoriaMetrics fed by envelope run") {
        return;
    }
    let Some(victoria_metrics) = test_tool("victoria-metrics") else {
        return;
    };
    let dir = Scratch::new();
    let database = VictoriaMetrics::start(&victoria_metrics, &dir.0.join("vm-data"));
    // A GPU through the fake NVML library, budgets with latency thresholds for the budget
    // lines, and real disk and loopback traffic.
    let script = dir.0.join("gpu.json");
    std::fs::write(
        &script,
        serde_json::json!({
            "driver_version": "555.42.06",
            "devices": [{
                "uuid": "GPU-0000-aaaa", "name": "Fake H100",
                "utilization_gpu_percent": 97, "utilization_memory_percent": 41,
                "memory_total_bytes": 85_899_345_920u64, "memory_used_bytes": 42_949_672_960u64,
                "power_mw": 612_500, "energy_mj": 9_000_000, "temperature_c": 77,
                "sm_clock_mhz": 1980, "memory_clock_mhz": 2619,
                "throttle_reasons": 0x4 | 0x20,
                "pcie_tx_kb_per_s": 2000, "pcie_rx_kb_per_s": 500,
                "ecc_corrected": 3, "ecc_uncorrected": 0,
                "compute_processes": [{"pid": std::process::id(), "memory_bytes": 1_073_741_824u64}],
                "process_sm_percent": [[std::process::id(), 50]]
            }]
        })
        .to_string(),
    )
    .unwrap();
    // A vLLM endpoint served by this process, which is also the workload that holds the GPU:
    // the Envelope row's engine figures, cost per request and burn by cause.
    let engine = MetricsEndpoint::start(|n| Answer::Text(vllm(n as u64)));
    let me = integration_tests::own_process_name();
    let config = dir.0.join("envelope.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
window = "1s"
state_dir = "{state}"

[pricing]
gpu_hour = 2.5

[gpu]
cuda_probes = "sync"

[export]
protocol = "http/protobuf"
metrics_endpoint = "http://127.0.0.1:{port}/opentelemetry/v1/metrics"
# VictoriaMetrics takes no logs: events go to a port nothing listens on (and are queued).
logs_endpoint = "http://127.0.0.1:9/v1/logs"
timeout = "2s"

[[workload]]
name = "reader"
process = ["dd"]

[[budget]]
name = "reader storage p95"
workload = "reader"
metric = "storage_p95_ms"
max = 50.0

[[budget]]
name = "node rtt p95"
workload = "*"
metric = "network_rtt_p95_ms"
max = 20.0

[[workload]]
name = "llm"
process = ["{me}"]
metrics_url = "{engine}"

# Always breached (first tokens take 190 ms and more): bad windows to count by cause.
[[budget]]
name = "llm ttft"
workload = "llm"
metric = "ttft_p95_ms"
max = 1.0

[[budget]]
name = "llm cost per request"
workload = "llm"
metric = "cost_per_request"
max = 0.01
"#,
            state = dir.0.join("state").display(),
            port = database.port,
            me = me,
            engine = engine.url(),
        ),
    )
    .unwrap();
    let file = ScratchFile::create(32 << 20);
    let _load = ReadLoad::start(&file.path);
    let daemon = Daemon::start_with(
        &config,
        &["--nvml-lib", fake_nvml_library().to_str().unwrap()],
        &[("FAKE_NVML_SCRIPT", &script)],
    );
    // CUDA calls for the CUDA panels: the stand-in library, one program synchronising, one
    // copying to the GPU, both until the test ends.
    let mut cuda = CudaCalls::start(&dir.0);
    // Enough exports for rate() over 30 s to have several points. A timeout names the
    // series still missing.
    let needed = [
        "envelope_network_rtt_seconds_count",
        "hw_gpu_utilization_ratio",
        "envelope_storage_latency_seconds_count",
        "envelope_budget_bad_windows_total",
        "envelope_cuda_io_bytes_total",
        "envelope_cuda_call_time_seconds_total",
    ];
    let missing = || -> Vec<&str> {
        needed
            .iter()
            .copied()
            .filter(|series| !database.query(series).is_ok_and(|n| n > 0))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !missing().is_empty() {
        assert!(
            Instant::now() < deadline,
            "after 60 s the database still has no {:?}; CUDA programs: {}",
            missing(),
            cuda.state()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(6));

    let mut failures = Vec::new();
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "only {} queries found", queries.len());
    for (title, expr) in &queries {
        match database.query(&substitute(expr)) {
            Ok(0) => {
                // What the database holds of the metric queried: how many points each series
                // has over the range, to tell a series never written from one written late.
                let held = metric_in(expr)
                    .map(|metric| {
                        database
                            .get(&format!(
                                "/api/v1/query?query={}",
                                urlencode(&format!("count_over_time({metric}[2m])"))
                            ))
                            .unwrap_or_else(|error| error)
                    })
                    .unwrap_or_default();
                failures.push(format!("{title}: no data for {expr}\n  held: {held}"));
            }
            Ok(_) => {}
            Err(error) => failures.push(format!("{title}: {expr}: {error}")),
        }
    }
    let cuda_state = cuda.state();
    // The logs endpoint was down throughout and the metrics one up: one line for the logs
    // outage, no recovery (outages are kept per signal; one shared flipped every export).
    assert_eq!(daemon.log_lines_with("OTLP logs export failed"), 1);
    assert_eq!(daemon.log_lines_with("export works again"), 0);
    assert_eq!(daemon.stop(), 0);
    drop(cuda);
    assert!(
        failures.is_empty(),
        "dashboard queries failing:\n{}\nCUDA programs: {cuda_state}",
        failures.join("\n")
    );
}

/// Programs calling the stand-in CUDA library (tests/fake-cuda) until dropped.
struct CudaCalls(Vec<std::process::Child>, PathBuf);

impl CudaCalls {
    fn start(dir: &Path) -> Self {
        use std::io::Write as _;
        for name in ["libcudart.so.12", "libcuda.so.1"] {
            std::fs::copy(integration_tests::fake_cuda_library(), dir.join(name)).unwrap();
        }
        let children = [
            ("stream-sync:1000000", "2000"),
            ("memcpy-h2d:1000000:200000", "0"),
        ]
        .into_iter()
        .enumerate()
        .map(|(n, (step, sync_us))| {
            let stderr = std::fs::File::create(dir.join(format!("cuda-app-{n}.stderr"))).unwrap();
            let mut child = std::process::Command::new(integration_tests::fake_cuda_app())
                .arg("--runtime")
                .arg(dir.join("libcudart.so.12"))
                .arg("--driver")
                .arg(dir.join("libcuda.so.1"))
                .arg(step)
                .env("FAKE_CUDA_SYNC_US", sync_us)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start fake-cuda-app");
            // Calls made before the agent attaches are not counted; the loops run on.
            let _ = child.stdin.as_mut().unwrap().write_all(b"go\n");
            child
        })
        .collect();
        Self(children, dir.to_path_buf())
    }

    /// Each program's pid and whether it still runs, with what it wrote to stderr: for a
    /// failure message.
    fn state(&mut self) -> String {
        let dir = &self.1;
        self.0
            .iter_mut()
            .enumerate()
            .map(|(n, child)| {
                let stderr = std::fs::read_to_string(dir.join(format!("cuda-app-{n}.stderr")))
                    .unwrap_or_default();
                format!(
                    "pid {}: {:?}, stderr {stderr:?}",
                    child.id(),
                    child.try_wait()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Drop for CudaCalls {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `[export] prometheus = true`: the daemon serves the same catalogue for scraping, promtool
/// accepts the exposition, and the names are those the dashboard and rules query.
#[test]
fn the_prometheus_endpoint_serves_the_catalogue_and_promtool_accepts_it() {
    if !root_or_skip("the Prometheus endpoint of envelope run") {
        return;
    }
    let Some(promtool) = test_tool("promtool") else {
        return;
    };
    let dir = Scratch::new();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let engine = MetricsEndpoint::start(|n| Answer::Text(vllm(n as u64)));
    let me = integration_tests::own_process_name();
    let config = dir.0.join("envelope.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
window = "1s"
state_dir = "{state}"

[export]
enabled = false
prometheus = true
prometheus_listen = "127.0.0.1:{port}"

[[workload]]
name = "reader"
process = ["dd"]

[[workload]]
name = "llm \"quoted\""
process = ["{me}"]
metrics_url = "{engine}"

[[budget]]
name = "reader storage p95"
workload = "reader"
metric = "storage_p95_ms"
max = 50.0
"#,
            state = dir.0.join("state").display(),
            me = me,
            engine = engine.url(),
        ),
    )
    .unwrap();
    let file = ScratchFile::create(16 << 20);
    let _load = ReadLoad::start(&file.path);
    let daemon = Daemon::start(&config, &[]);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut text = String::new();
    wait_for("a full exposition", Duration::from_secs(30), || {
        text = ureq_get(&url).unwrap_or_default();
        text.contains("envelope_storage_latency_seconds_bucket")
            && text.contains("envelope_engine_requests_total")
    });
    for expected in [
        "# TYPE envelope_budget_state gauge",
        "# TYPE envelope_budget_windows_total counter",
        "# TYPE envelope_storage_latency_seconds histogram",
        "envelope_workload=\"llm \\\"quoted\\\"\"",
        "host_name=\"",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = check.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let missing = ureq_get(&format!("http://127.0.0.1:{port}/other")).unwrap_err();
    assert!(missing.contains("serves /metrics only"), "{missing}");
    assert_eq!(daemon.stop(), 0);
}
