//! Serving engines' own metrics over real HTTP: fixture endpoints written from each engine
//! family's documented names, scraped through the agent's reader (`app::engines`), with
//! quantiles checked against hand-computed `histogram_quantile` values, a counter reset, and
//! endpoints that are slow, huge, garbled or down. The last test runs `envelope diagnose`
//! against one (root).
use std::time::{Duration, Instant};

use envelope::{
    analysis::engines::EngineSummary,
    app::engines::EngineReaders,
    config::EngineEndpointConfig,
    model::engine::{EngineChoice, EngineKind, GenericNames},
};
use integration_tests::{
    diagnose_json,
    engine_fixture::{
        Answer, E2E_BOUNDS, MetricsEndpoint, TTFT_BOUNDS, VLLM_LABELS, histogram, sample, vllm,
    },
    root_or_skip,
};

fn reader(url: &str, engine: EngineChoice, timeout: Duration) -> EngineReaders {
    let mut readers = EngineReaders::default();
    readers.configure(
        &[EngineEndpointConfig {
            workload: "llm".into(),
            url: url.into(),
            engine,
        }],
        timeout,
    );
    readers
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Two windows of one reader: the start scrape, then `windows` window ends.
fn windows(readers: &mut EngineReaders, count: usize) -> Vec<EngineSummary> {
    runtime().block_on(async {
        readers.start().await;
        let mut all = Vec::new();
        for _ in 0..count {
            all.extend(readers.window().await);
        }
        all
    })
}

#[test]
fn vllm_figures_are_the_window_increase_with_exact_histogram_quantiles() {
    let endpoint = MetricsEndpoint::start(|n| Answer::Text(vllm(n as u64)));
    let mut readers = reader(
        &endpoint.url(),
        EngineChoice::Recognise,
        Duration::from_secs(2),
    );
    let started = Instant::now();
    let window = windows(&mut readers, 1).remove(0);
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(window.stale, None, "{window:#?}");
    assert_eq!(window.engine, Some(EngineKind::Vllm));
    assert_eq!(
        window.model.as_deref(),
        Some("meta-llama/Llama-3.1-8B-Instruct")
    );
    assert_eq!(window.requests, Some(100));
    // histogram_quantile by hand on the window's buckets (0.3:0 0.5:10 0.8:40 1:80 1.5:95
    // 2:100 +Inf:100): P50 rank 50 in (0.8, 1]: 0.8 + 0.2 * 10/40 = 0.85 s; P95 rank 95 in
    // (1, 1.5]: 1 + 0.5 * 15/15 = 1.5 s; P99 rank 99 in (1.5, 2]: 1.5 + 0.5 * 4/5 = 1.9 s.
    assert_eq!(window.e2e_p50_ms, Some(850.0));
    assert_eq!(window.e2e_p95_ms, Some(1500.0));
    assert_eq!(window.e2e_p99_ms, Some(1900.0));
    assert_eq!(window.e2e_mean_ms, Some(865.0), "86.5 s over 100 requests");
    // First token (0.1:20 0.25:70 0.5:95 0.75:100): P50 0.1 + 0.15 * 30/50 = 0.19 s, P95
    // 0.25 + 0.25 * 25/25 = 0.5 s, P99 0.5 + 0.25 * 4/5 = 0.7 s.
    assert_eq!(window.ttft_p50_ms, Some(190.0));
    assert_eq!(window.ttft_p95_ms, Some(500.0));
    assert_eq!(window.ttft_p99_ms, Some(700.0));
    assert_eq!(window.prompt_tokens, Some(5000));
    assert_eq!(window.generation_tokens, Some(20000));
    assert_eq!(window.prefix_cache_hit_rate, Some(0.6));
    assert_eq!(window.kv_cache_usage, Some(0.42));
    assert_eq!((window.running, window.waiting), (Some(7.0), Some(3.0)));
    // Not exported by this fixture: absent, not 0.
    assert_eq!((window.tpot_p95_ms, window.queue_p95_ms), (None, None));
    // The rate is over the time between the two scrapes, which lies within the test's.
    let rate = window.rate_per_s.unwrap();
    assert!(
        rate >= 100.0 / elapsed,
        "{rate}/s over at most {elapsed:.3} s"
    );
    assert_eq!(
        endpoint.requests(),
        2,
        "one scrape at the start, one at the window's end"
    );
}

#[test]
fn an_engine_restart_counts_from_zero() {
    // Scrapes 0 and 1 grow; the engine restarts before scrape 2 (one round since).
    let endpoint = MetricsEndpoint::start(|n| {
        Answer::Text(match n {
            0 => vllm(3),
            1 => vllm(5),
            _ => vllm(1).replace(" 7.0\n", " 0.0\n"),
        })
    });
    let mut readers = reader(
        &endpoint.url(),
        EngineChoice::Recognise,
        Duration::from_secs(2),
    );
    let all = windows(&mut readers, 2);
    assert_eq!(all[0].requests, Some(200));
    assert!(!all[0].restarted);
    assert!(all[1].restarted, "{:#?}", all[1]);
    // After the restart the counters hold one round plus the base (7 each).
    assert_eq!(all[1].requests, Some(107));
    assert_eq!(all[1].generation_tokens, Some(20007));
}

/// Each recognised family from its documented names: the engine it is taken for and a
/// figure only it has.
#[test]
fn every_engine_family_is_recognised_from_its_own_names() {
    let sglang = |n: u64| {
        let labels = "model_name=\"qwen\",";
        let mut text = histogram(
            "sglang:time_to_first_token_seconds",
            labels,
            &["0.1", "0.2", "0.4"],
            &[0, 10 * n, 20 * n, 20 * n],
            1.0,
        );
        text.push_str(&sample(
            "counter",
            "sglang:num_requests_total",
            labels,
            20.0 * n as f64,
        ));
        text.push_str(&sample(
            "counter",
            "sglang:prompt_tokens_total",
            labels,
            1000.0 * n as f64,
        ));
        text.push_str(&sample(
            "counter",
            "sglang:cached_tokens_total",
            labels,
            250.0 * n as f64,
        ));
        text.push_str(&sample("gauge", "sglang:num_queue_reqs", labels, 4.0));
        text
    };
    // TGI's exporter: counters without _total, blank lines between families.
    let tgi = |n: u64| {
        let mut text = histogram(
            "tgi_request_duration",
            "",
            &["0.5", "1", "2"],
            &[0, 0, 10 * n, 10 * n],
            15.0 * n as f64,
        );
        text.push('\n');
        text.push_str(&sample(
            "counter",
            "tgi_request_success",
            "",
            10.0 * n as f64,
        ));
        text.push('\n');
        text.push_str(&sample("gauge", "tgi_queue_size", "", 2.0));
        text
    };
    let triton = |n: u64| {
        let labels = "model=\"resnet\",version=\"1\",";
        let mut text = sample(
            "counter",
            "nv_inference_request_success",
            labels,
            40.0 * n as f64,
        );
        text.push_str(&sample(
            "counter",
            "nv_inference_request_duration_us",
            labels,
            40.0 * n as f64 * 12_500.0,
        ));
        text.push_str(&sample(
            "counter",
            "nv_inference_queue_duration_us",
            labels,
            40.0 * n as f64 * 500.0,
        ));
        text
    };
    let llamacpp = |n: u64| {
        let mut text = sample(
            "counter",
            "llamacpp:tokens_predicted_total",
            "",
            300.0 * n as f64,
        );
        text.push_str(&sample(
            "counter",
            "llamacpp:tokens_predicted_seconds_total",
            "",
            6.0 * n as f64,
        ));
        text.push_str(&sample("gauge", "llamacpp:requests_processing", "", 2.0));
        text
    };
    type Exposition = fn(u64) -> String;
    let cases: [(EngineKind, Exposition); 4] = [
        (EngineKind::Sglang, sglang),
        (EngineKind::Tgi, tgi),
        (EngineKind::Triton, triton),
        (EngineKind::Llamacpp, llamacpp),
    ];
    for (kind, exposition) in cases {
        let endpoint = MetricsEndpoint::start(move |n| Answer::Text(exposition(n as u64 + 1)));
        let mut readers = reader(
            &endpoint.url(),
            EngineChoice::Recognise,
            Duration::from_secs(2),
        );
        let window = windows(&mut readers, 1).remove(0);
        assert_eq!(window.engine, Some(kind), "{window:#?}");
        assert_eq!(window.stale, None, "{window:#?}");
        match kind {
            EngineKind::Sglang => {
                // 10 in (0.1, 0.2], 10 in (0.2, 0.4]: P50 rank 10 at 0.2 s.
                assert_eq!(window.ttft_p50_ms, Some(200.0));
                assert_eq!(window.requests, Some(20));
                assert_eq!(
                    window.prefix_cache_hit_rate,
                    Some(0.25),
                    "cached over prompt tokens"
                );
                assert_eq!(window.waiting, Some(4.0));
            }
            EngineKind::Tgi => {
                // All 10 in (1, 2]: P95 rank 9.5: 1 + 1 * 9.5/10.
                assert_eq!(window.e2e_p95_ms, Some(1950.0));
                assert_eq!(window.requests, Some(10));
                assert_eq!(window.ttft_p95_ms, None, "TGI has no TTFT");
            }
            EngineKind::Triton => {
                assert_eq!(window.requests, Some(40));
                assert_eq!(window.e2e_mean_ms, Some(12.5), "a mean, from microseconds");
                assert_eq!(window.queue_mean_ms, Some(0.5));
                assert_eq!(window.e2e_p95_ms, None, "no histogram, no quantile");
            }
            _ => {
                assert_eq!(window.tpot_mean_ms, Some(20.0), "6 s over 300 tokens");
                assert_eq!(window.generation_tokens, Some(300));
                assert_eq!(window.requests, None, "llama.cpp counts no requests");
            }
        }
    }
}

#[test]
fn a_generic_engine_reads_the_histograms_the_user_names() {
    let endpoint = MetricsEndpoint::start(|n| {
        let n = n as u64;
        Answer::Text(histogram(
            "app_request_seconds",
            "route=\"/v1/chat\",",
            &["0.1", "1"],
            &[4 * n, 8 * n, 8 * n],
            2.0 * n as f64,
        ))
    });
    let names = GenericNames {
        request_histogram: Some("app_request_seconds".into()),
        ..GenericNames::default()
    };
    let mut readers = reader(
        &endpoint.url(),
        EngineChoice::Generic(names),
        Duration::from_secs(2),
    );
    let window = windows(&mut readers, 1).remove(0);
    assert_eq!(window.engine, Some(EngineKind::Generic));
    assert_eq!(window.requests, Some(8), "the request histogram's count");
    // 4 <= 0.1, 4 in (0.1, 1]: P95 rank 7.6: 0.1 + 0.9 * 3.6/4 = 0.91 s.
    assert_eq!(window.e2e_p95_ms, Some(910.0));
}

/// A slow endpoint is stale after the window's grace (250 ms), not after the 2 s timeout or
/// the 5 s its answer takes: the window is never held.
#[test]
fn a_slow_endpoint_is_stale_after_the_grace_and_never_holds_the_window() {
    let slow = std::sync::Mutex::new(Some(Answer::Slow(Duration::from_secs(5), vllm(1))));
    let endpoint = MetricsEndpoint::start(move |n| match n {
        1 => slow.lock().unwrap().take().unwrap(),
        _ => Answer::Text(vllm(n as u64)),
    });
    let mut readers = reader(
        &endpoint.url(),
        EngineChoice::Recognise,
        Duration::from_secs(2),
    );
    let started = Instant::now();
    let window = windows(&mut readers, 1).remove(0);
    let elapsed = started.elapsed();
    let stale = window
        .stale
        .as_deref()
        .unwrap_or_else(|| panic!("{window:#?}"));
    assert!(stale.contains("no answer within 250 ms"), "{stale:?}");
    assert_eq!(window.requests, None, "no figures when stale");
    assert_eq!(window.engine, Some(EngineKind::Vllm), "still known");
    assert!(elapsed < Duration::from_millis(1900), "{elapsed:?}");
}

/// Answers that are too big, garbled or failing: each scrape ends stale with the reason.
/// These wait for the scrape's own outcome (a grace as long as the timeout): what is checked
/// is the reason, which needs the answer, not the grace.
#[test]
fn huge_garbled_and_failing_endpoints_are_stale_with_their_reason() {
    use envelope::engines::scrape::{EngineEndpoint, ScrapeLimits, Scraped};
    let cases: [(&str, Answer, &str); 5] = [
        (
            "huge",
            Answer::Huge {
                bytes: 50 << 20,
                length: true,
            },
            "larger than 8 MiB",
        ),
        (
            "huge, streamed",
            Answer::Huge {
                bytes: 50 << 20,
                length: false,
            },
            "larger than 8 MiB",
        ),
        (
            "garbled",
            Answer::Text("<html>\u{1}\u{2} not metrics</html>\n".into()),
            "none of vllm's metrics in the response",
        ),
        ("failing", Answer::Status(500), "HTTP 500"),
        (
            "vllm garbage",
            Answer::Text("vllm:num_requests_running{{{ 3\n".into()),
            "could not be parsed",
        ),
    ];
    let runtime = runtime();
    for (what, answer, reason) in cases {
        let answer = std::sync::Mutex::new(Some(answer));
        // The first scrape is good (the engine is known); the second gets the bad answer.
        let endpoint = MetricsEndpoint::start(move |n| match n {
            1 => answer.lock().unwrap().take().unwrap(),
            _ => Answer::Text(vllm(n as u64)),
        });
        let limits = ScrapeLimits {
            grace: Duration::from_secs(2),
            ..ScrapeLimits::default()
        };
        let mut scraper = EngineEndpoint::new(
            "llm".into(),
            endpoint.url(),
            EngineChoice::Recognise,
            limits,
        );
        let scrape = |scraper: &mut EngineEndpoint| {
            runtime.block_on(async {
                scraper.start();
                scraper
                    .collect(tokio::time::Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        assert!(matches!(scrape(&mut scraper), Scraped::Fresh(_)), "{what}");
        match scrape(&mut scraper) {
            Scraped::Stale(stale) => {
                assert!(
                    stale.contains(reason),
                    "{what}: {stale:?} should say {reason:?}"
                )
            }
            Scraped::Fresh(scrape) => panic!("{what}: {scrape:?}"),
        }
        assert_eq!(
            scraper.engine(),
            Some(EngineKind::Vllm),
            "{what}: still known"
        );
    }
}

#[test]
fn an_endpoint_that_is_down_is_retried_with_backoff() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut readers = reader(&url, EngineChoice::Recognise, Duration::from_secs(2));
    let all = windows(&mut readers, 2);
    assert!(
        all[0]
            .stale
            .as_deref()
            .is_some_and(|s| s.contains("cannot connect")),
        "{:#?}",
        all[0]
    );
    assert_eq!(all[0].engine, None, "never answered: not recognised");
    // The second window comes at once: inside the backoff, no new attempt.
    assert!(
        all[1]
            .stale
            .as_deref()
            .is_some_and(|s| s.contains("retrying in")),
        "{:#?}",
        all[1]
    );
}

/// The whole path: `envelope diagnose` with a workload naming the endpoint.
#[test]
fn diagnose_reports_the_engines_figures_in_json() {
    if !root_or_skip("diagnose with an engine endpoint") {
        return;
    }
    let endpoint = MetricsEndpoint::start(|n| Answer::Text(vllm(n as u64)));
    let directory = std::env::temp_dir().join(integration_tests::unique_name("engines"));
    std::fs::create_dir_all(&directory).unwrap();
    let config = directory.join("envelope.toml");
    std::fs::write(
        &config,
        format!(
            "[[workload]]\nname = \"llm\"\nprocess = [\"vllm\"]\nmetrics_url = \"{}\"\n",
            endpoint.url()
        ),
    )
    .unwrap();
    let (_, report) = diagnose_json(1, &["--config", config.to_str().unwrap()], &[]);
    let engines = report["engines"].as_array().expect("engines[]");
    assert_eq!(engines.len(), 1, "{engines:#?}");
    let llm = &engines[0];
    assert_eq!(llm["workload"], "llm");
    assert_eq!(llm["engine"], "vllm");
    assert_eq!(llm["requests"], 100);
    assert_eq!(llm["e2e_p95_ms"], 1500.0);
    assert_eq!(llm["ttft_p99_ms"], 700.0);
    assert_eq!(
        llm["tpot_p95_ms"],
        serde_json::Value::Null,
        "absent is null, not 0"
    );
    assert_eq!(llm["stale"], serde_json::Value::Null);
    let _ = std::fs::remove_dir_all(directory);
}

/// The daemon: request budgets on an engine's figures breach and resolve with one event and
/// one action each, and the event says what the bad windows were, what held the workload
/// back in them, and that the engine measured it.
#[test]
fn request_budgets_on_engine_figures_breach_and_resolve_through_the_daemon_with_their_cause() {
    use integration_tests::{
        daemon::{Daemon, Scratch, wait_for},
        otlp_receiver::{OtlpReceiver, attribute},
    };
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };
    if !root_or_skip("request budgets through envelope run") {
        return;
    }
    // Each scrape adds a window of traffic: slow and thin while `bad` (10 requests, first
    // tokens in (0.25, 0.5]: P95 0.4875 s), else 100 requests with first tokens <= 0.25 s.
    let bad = Arc::new(AtomicBool::new(true));
    // [the TTFT buckets' counts..., requests answered slowly end to end]
    let cumulative = Arc::new(Mutex::new([0u64; 10]));
    let slow_total = |counts: &[u64; 10]| counts[6];
    let served = (bad.clone(), cumulative.clone());
    let endpoint = MetricsEndpoint::start(move |_| {
        let (bad, cumulative) = (&served.0, &served.1);
        let mut counts = cumulative.lock().unwrap();
        // [TTFT buckets x6, slow requests, prefix-cache lookups, hits, generated tokens]
        let add: [u64; 10] = if bad.load(Ordering::SeqCst) {
            [0, 0, 10, 10, 10, 10, 10, 100, 10, 100]
        } else {
            [20, 100, 100, 100, 100, 100, 0, 100, 90, 10_000]
        };
        for (count, more) in counts.iter_mut().zip(add) {
            *count += more;
        }
        let mut text = histogram(
            "vllm:time_to_first_token_seconds",
            VLLM_LABELS,
            &TTFT_BOUNDS,
            &counts[..6],
            0.0,
        );
        text.push_str(&sample(
            "counter",
            "vllm:request_success_total",
            VLLM_LABELS,
            counts[5] as f64,
        ));
        // End to end: the same requests, all in (1.5, 2] s while bad, else in (0.3, 0.5].
        let e2e: Vec<u64> = E2E_BOUNDS
            .iter()
            .chain(["+Inf"].iter())
            .map(|bound| match *bound {
                "0.3" => 0,
                "0.5" | "0.8" | "1.0" | "1.5" => counts[5] - slow_total(&counts),
                _ => counts[5],
            })
            .collect();
        text.push_str(&histogram(
            "vllm:e2e_request_latency_seconds",
            VLLM_LABELS,
            &E2E_BOUNDS,
            &e2e,
            0.0,
        ));
        // Time per output token and queue time: the slow requests in (0.05, 0.1] and (0.1, 1],
        // the others at most 0.01 s.
        let (all, fast) = (counts[5], counts[5] - slow_total(&counts));
        for name in [
            "vllm:request_time_per_output_token_seconds",
            "vllm:request_queue_time_seconds",
        ] {
            let bounds = if name.contains("queue") {
                ["0.01", "0.1", "1.0"]
            } else {
                ["0.01", "0.05", "0.1"]
            };
            let cumulative = [fast, fast, all, all];
            text.push_str(&histogram(name, VLLM_LABELS, &bounds, &cumulative, 0.0));
        }
        for (name, value) in [
            ("vllm:prefix_cache_queries_total", counts[7]),
            ("vllm:prefix_cache_hits_total", counts[8]),
            ("vllm:generation_tokens_total", counts[9]),
        ] {
            text.push_str(&sample("counter", name, VLLM_LABELS, value as f64));
        }
        Answer::Text(text)
    });
    let dir = Scratch::new();
    let receiver = OtlpReceiver::start();
    // This test process is the workload (its threads serve the scrapes).
    let me = integration_tests::own_process_name();
    let config = dir.0.join("envelope.toml");
    let actions = dir.0.join("actions.log");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
window = "1s"
state_dir = "{state}"

[export]
endpoint = "{otlp}"
timeout = "2s"

[alerting]
windows = [{{ long = "10s", short = "2s", factor = 1.0 }}]
enter_after = 2
leave_after = 2

# One GPU (the fake NVML library gives this process one) at 3600 an hour: 1 a second, so a
# request costs 1 / (requests per second) and 1,000 tokens 1000 / (tokens per second).
[pricing]
gpu_hour = 3600.0

[[workload]]
name = "llm"
process = ["{me}"]
metrics_url = "{url}"

[[budget]]
name = "ttft"
workload = "llm"
metric = "ttft_p95_ms"
max = 400.0
objective = 0.5
actions = [{{ command = ["sh", "-c", "echo \"ttft $ENVELOPE_STATUS|$ENVELOPE_SOURCE|$ENVELOPE_CAUSE\" >> {actions}"] }}]

[[budget]]
name = "throughput"
workload = "llm"
metric = "requests_per_s"
min = 50.0
objective = 0.5
actions = [{{ command = ["sh", "-c", "echo \"throughput $ENVELOPE_STATUS|$ENVELOPE_SOURCE\" >> {actions}"] }}]

[[budget]]
name = "tpot"
workload = "llm"
metric = "tpot_p95_ms"
max = 50.0
objective = 0.5

[[budget]]
name = "queue"
workload = "llm"
metric = "queue_p95_ms"
max = 100.0
objective = 0.5

[[budget]]
name = "cache"
workload = "llm"
metric = "cache_hit_rate"
min = 0.5
objective = 0.5

# 10 requests/s while bad: 0.1 a request; 100/s after: 0.01.
[[budget]]
name = "cost"
workload = "llm"
metric = "cost_per_request"
max = 0.05
objective = 0.5

# 100 tokens/s while bad: 10 per 1,000 tokens; 10,000/s after: 0.1.
[[budget]]
name = "token cost"
workload = "llm"
metric = "cost_per_1k_tokens"
max = 1.0
objective = 0.5

# 60 GB held while bad, 10 GB after.
[[budget]]
name = "gpu memory"
workload = "llm"
metric = "gpu_memory_bytes"
max = 32e9
objective = 0.5

[[budget]]
name = "connect"
workload = "llm"
metric = "connect_p95_ms"
max = 0.000001
objective = 0.5

# 99% of requests within 1 s: while slow, none is.
[[budget]]
name = "e2e requests"
workload = "llm"
metric = "request_p95_ms"
max = 1000.0
objective = 0.99
objective_basis = "requests"
actions = [{{ command = ["sh", "-c", "echo \"e2e $ENVELOPE_STATUS\" >> {actions}"] }}]

[[envelope]]
name = "assistant"
entry = "llm"
request_p95_ms = 1000.0
objective = 0.5
actions = [{{ command = ["sh", "-c", "echo \"assistant $ENVELOPE_STATUS|$ENVELOPE_STAGE|$ENVELOPE_STAGE_OBSERVED|$ENVELOPE_STAGE_ALLOCATION\" >> {actions}"] }}]

[[envelope.stage]]
name = "retrieval"
peer = "127.0.0.1:9"
request_p95_ms = 100.0

[[envelope.stage]]
name = "generation"
workload = "llm"
request_p95_ms = 800.0
"#,
            state = dir.0.join("state").display(),
            otlp = receiver.endpoint(),
            me = me,
            url = endpoint.url(),
            actions = actions.display(),
        ),
    )
    .unwrap();
    // The GPU, with this process holding `held` bytes on it; replaced whole (the library
    // reads the script at every call).
    let gpu = dir.0.join("gpu.json");
    let hold = |held: u64| {
        let script = serde_json::json!({
            "driver_version": "555.42.06",
            "devices": [{
                "uuid": "GPU-0000-aaaa", "name": "Fake H100",
                "utilization_gpu_percent": 50, "memory_total_bytes": 85_899_345_920u64,
                "memory_used_bytes": held,
                "compute_processes": [{"pid": std::process::id(), "memory_bytes": held}]
            }]
        });
        let next = dir.0.join("gpu.json.next");
        std::fs::write(&next, script.to_string()).unwrap();
        std::fs::rename(&next, &gpu).unwrap();
    };
    hold(60_000_000_000);
    // While bad, this process also connects to a local listener every 20 ms: connects of
    // some microseconds, against a 1 ns budget (it stops with the bad phase: no data).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let connecting = bad.clone();
    let connector = std::thread::spawn(move || {
        while connecting.load(Ordering::SeqCst) {
            let _ = std::net::TcpStream::connect(target);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let daemon = Daemon::start_with(
        &config,
        &[
            "--nvml-lib",
            integration_tests::fake_nvml_library().to_str().unwrap(),
        ],
        &[("FAKE_NVML_SCRIPT", &gpu)],
    );
    let records = |budget: &str, status: &str| {
        receiver
            .log_records()
            .into_iter()
            .filter(|r| {
                r.event_name == "envelope.budget.breach"
                    && attribute(&r.attributes, "envelope.budget") == Some(budget)
                    && attribute(&r.attributes, "envelope.breach.status") == Some(status)
            })
            .collect::<Vec<_>>()
    };
    let budgets = [
        "ttft",
        "throughput",
        "tpot",
        "queue",
        "cache",
        "cost",
        "token cost",
        "gpu memory",
        "connect",
        "e2e requests",
        "assistant: request_p95_ms",
    ];
    wait_for("the breaches to fire", Duration::from_secs(40), || {
        budgets.iter().all(|b| !records(b, "firing").is_empty())
    });
    std::thread::sleep(Duration::from_secs(3));
    for budget in budgets {
        assert_eq!(
            records(budget, "firing").len(),
            1,
            "{budget}: one event while it stays bad"
        );
    }
    let firing = records("ttft", "firing");
    let cause = attribute(&firing[0].attributes, "envelope.breach.cause").unwrap_or_default();
    // 10 first tokens in (0.25, 0.5]: rank 9.5 -> 0.25 + 0.25 * 9.5/10 = 0.4875 s.
    assert!(cause.starts_with("ttft_p95_ms 487.5 > 400 in "), "{cause}");
    assert_eq!(
        attribute(&firing[0].attributes, "envelope.budget.source"),
        Some("engine, vllm")
    );
    assert!(attribute(&firing[0].attributes, "envelope.breach.cause.bottleneck").is_some());
    // The envelope names the stage that overspent: generation, 10 of 10 requests in (1.5, 2]
    // s: P95 rank 9.5 -> 1.5 + 0.5 * 9.5/10 = 1.975 s against its 800 ms.
    let envelope = records("assistant: request_p95_ms", "firing");
    assert_eq!(envelope.len(), 1);
    let stage = |key: &str| attribute(&envelope[0].attributes, key).map(str::to_string);
    assert_eq!(stage("envelope.stage").as_deref(), Some("generation"));
    assert_eq!(stage("envelope.stage.observed").as_deref(), Some("1975"));
    assert_eq!(stage("envelope.stage.allocation").as_deref(), Some("800"));

    bad.store(false, Ordering::SeqCst);
    hold(10_000_000_000);
    connector.join().unwrap();
    wait_for("the breaches to resolve", Duration::from_secs(40), || {
        budgets.iter().all(|b| !records(b, "resolved").is_empty())
    });
    std::thread::sleep(Duration::from_secs(2));
    for budget in budgets {
        assert_eq!(records(budget, "firing").len(), 1, "{budget}");
        assert_eq!(records(budget, "resolved").len(), 1, "{budget}");
    }
    wait_for("the actions", Duration::from_secs(10), || {
        std::fs::read_to_string(&actions).is_ok_and(|log| log.lines().count() == 8)
    });
    let log = std::fs::read_to_string(&actions).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let ttft: Vec<&&str> = lines.iter().filter(|l| l.starts_with("ttft ")).collect();
    assert_eq!(ttft.len(), 2, "{log}");
    assert!(
        ttft[0].starts_with("ttft firing|engine, vllm|ttft_p95_ms 487.5 > 400 in "),
        "{log}"
    );
    assert!(ttft[1].starts_with("ttft resolved|engine, vllm|"), "{log}");
    let throughput: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("throughput "))
        .collect();
    assert_eq!(
        throughput,
        [
            &"throughput firing|engine, vllm",
            &"throughput resolved|engine, vllm"
        ],
        "{log}"
    );
    let assistant: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("assistant "))
        .collect();
    assert_eq!(
        assistant,
        [
            &"assistant firing|generation|1975|800",
            &"assistant resolved|||"
        ],
        "{log}"
    );
    // At most 4 actions run at once: the other budgets, which fire in the same window, have
    // only their events (checked above).
    let e2e: Vec<&&str> = lines.iter().filter(|l| l.starts_with("e2e ")).collect();
    assert_eq!(e2e, [&"e2e firing", &"e2e resolved"], "{log}");
    assert_eq!(daemon.stop(), 0);
}
