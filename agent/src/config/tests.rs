//! The configuration's checks: each mistake is refused with its line, column and a hint.
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
    let text = include_str!("../../../systemd/envelope.toml");
    let config = parse_config("systemd/envelope.toml", text).unwrap();
    assert_eq!(
        config.budgets.len(),
        8,
        "6 budgets and an envelope's 2 bounds"
    );
    assert_eq!(config.engines.len(), 2);
    assert_eq!(config.budgets[6].stages.len(), 3);
    assert_eq!(config.alerting.burn_rate_windows[0].long_s, 3_600);
    assert_eq!(config.alerting.burn_rate_windows[2].long_s, 3 * 86_400);
    assert_eq!(config.pricing.gpu_hour, Some(2.5));
    assert_eq!(
        config.workloads.workload_of(&facts("torchrun", None, None)),
        Some("trainer")
    );
    assert_eq!(
        config
            .budgets
            .iter()
            .map(|b| b.actions.len())
            .sum::<usize>(),
        4,
        "2 budgets' and the envelope's, on each of its 2 bounds"
    );
    assert_eq!(
        config.alerting.action_min_interval,
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
            "b.toml:7:10: budget \"x\": unknown metric \"storage_p96_ms\"; one of: storage_p95_ms"
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
    let checker = check::Checker::new("t", "ab\ncd");
    assert_eq!(checker.line_and_column(0), (1, 1));
    assert_eq!(checker.line_and_column(4), (2, 2));
    assert_eq!(checker.line_and_column(5), (2, 3));
}

/// Every case the architecture issue found passing `check` though `run` could not run it (or
/// would run it wrongly) is refused, at the value's own line and column.
#[test]
fn what_run_cannot_run_is_refused_at_its_line() {
    let base = "[[workload]]\nname = \"w\"\nprocess = [\"p\"]\n";
    let budget = |tail: &str| {
        format!(
            "{base}[[budget]]\nname = \"b\"\nworkload = \"w\"\nmetric = \"storage_p95_ms\"\n{tail}"
        )
    };
    // (configuration, line of the offending value, what the message says)
    let cases: Vec<(String, usize, &str)> = vec![
        (
            budget("max = nan\n"),
            8,
            "outside what storage_p95_ms can be",
        ),
        (budget("max = inf\n"), 8, "use a finite number"),
        (budget("max = -1.0\n"), 8, "0 to 3600000 ms"),
        (
            format!(
                "{base}[[budget]]\nname = \"b\"\nworkload = \"w\"\nmetric = \"gpu_utilization\"\nmax = 5.0\n"
            ),
            8,
            "between 0 and 1",
        ),
        (
            format!(
                "{base}[[budget]]\nname = \"b\"\nworkload = \"w\"\nmetric = \"gpu_throttled\"\nmin = 1.0\n"
            ),
            8,
            "gpu_throttled takes only max",
        ),
        (
            budget("max = 1.0\nobjective = nan\n"),
            9,
            "objective NaN must be between 0 and 1",
        ),
        (
            "[alerting]\nenter_after = 0\n".into(),
            2,
            "enter_after must be between 1 and",
        ),
        (
            "[alerting]\nleave_after = 0\n".into(),
            2,
            "leave_after must be between 1 and",
        ),
        (
            "[alerting]\nwindows = [{ long = \"1h\", short = \"5m\", factor = -1.0 }]\n".into(),
            2,
            "factor -1 must be a finite number above 0",
        ),
        (
            "[alerting]\nwindows = [{ long = \"5m\", short = \"1h\", factor = 1.0 }]\n".into(),
            2,
            "must be shorter than its long window",
        ),
        (
            "[alerting]\nwindows = []\n".into(),
            2,
            "windows needs 1 to 10 pairs",
        ),
        (
            "[alerting]\nwindows = [{ long = \"1500ms\", short = \"1s\", factor = 1.0 }]\n".into(),
            2,
            "must be whole seconds",
        ),
        (
            "[alerting]\nwindows = [{ long = \"1h\", short = \"500ms\", factor = 1.0 }]\n".into(),
            2,
            "out of range",
        ),
        (
            "[pricing]\ngpu_hour = -2.5\n".into(),
            2,
            "gpu_hour -2.5 must be a finite price",
        ),
        (
            "[pricing]\ncpu_core_hour = nan\n".into(),
            2,
            "cpu_core_hour NaN",
        ),
        (
            "[agent]\nwindow = \"300000000000years\"\n".into(),
            2,
            "[agent]: window",
        ),
        (
            "[agent]\nwindow = \"2h\"\n".into(),
            2,
            "too long; use at most 1h",
        ),
        (
            "[agent]\ngpu_interval = \"0s\"\n".into(),
            2,
            "gpu_interval \"0s\" is out of range",
        ),
        (
            "[export]\nendpoint = \"http://\"\n".into(),
            2,
            "endpoint \"http://\"",
        ),
        (
            "[export]\nendpoint = \"ftp://collector:4317\"\n".into(),
            2,
            "needs a scheme",
        ),
        (
            "[export]\nendpoint = \"https://c:4317\"\nca_file = \"/nonexistent/ca.pem\"\n".into(),
            3,
            "ca_file \"/nonexistent/ca.pem\" cannot be read (No such file or directory)",
        ),
        (
            "[export]\ntimeout = \"0s\"\n".into(),
            2,
            "timeout \"0s\" is out of range; use a duration above zero",
        ),
        (
            "[export]\ninterval = \"0s\"\n".into(),
            2,
            "interval \"0s\" is out of range",
        ),
        (
            "[export]\nheaders = { authorization = \"Bearer x\\r\\nX-Evil: 1\" }\n".into(),
            2,
            "a CR or LF would inject headers",
        ),
        (
            "[export.headers]\n\"bad name\" = \"v\"\n".into(),
            2,
            "not a valid HTTP header name",
        ),
        (
            budget("max = 1.0\nactions = [{ command = [\"\"] }]\n"),
            9,
            "command needs a program",
        ),
        (
            budget("max = 1.0\nactions = [{ command = [\"/bin/true\"], timeout = \"0s\" }]\n"),
            9,
            "action timeout \"0s\" is out of range",
        ),
        (
            budget("max = 1.0\nactions = [{ command = [\"no-such-program-anywhere\"] }]\n"),
            9,
            "is not on PATH; give its absolute path",
        ),
        (
            budget("max = 1.0\nactions = [{ webhook = \"http://\" }]\n"),
            9,
            "webhook \"http://\"",
        ),
        (
            budget("max = 1.0\npeer = \"not-an-address\"\n"),
            9,
            "peer applies to network_rtt_p95_ms",
        ),
        (
            budget("max = 1.0\ndevice = \"vda\"\nmin = 2.0\n"),
            10,
            "give exactly one of max",
        ),
        (
            "[[workload]]\nname = \"*\"\nprocess = [\"p\"]\n".into(),
            2,
            "not \"*\"",
        ),
    ];
    for (text, line, hint) in &cases {
        let error = parse_config("c.toml", text)
            .err()
            .unwrap_or_else(|| panic!("accepted:\n{text}"));
        let shown = error.to_string();
        assert!(shown.contains(hint), "{shown:?} should contain {hint:?}");
        match error {
            ConfigError::At { line: at, .. } => assert_eq!(at, *line, "{shown}"),
            other => panic!("no line in {other:?}"),
        }
    }
}

#[test]
fn hostile_files_are_refused_without_reading_them() {
    let error = load(Path::new("/dev/zero")).unwrap_err().to_string();
    assert_eq!(
        error,
        "cannot read the configuration /dev/zero: it is a device; give the path of a TOML file"
    );
    let dir = std::env::temp_dir().join(format!("envelope-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo.toml");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // Opening a FIFO without a writer would block; this must return at once.
    let error = load(&fifo).unwrap_err().to_string();
    assert!(
        error.ends_with("it is a FIFO; give the path of a TOML file"),
        "{error}"
    );
    let large = dir.join("large.toml");
    std::fs::write(&large, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
    let error = load(&large).unwrap_err().to_string();
    assert!(
        error.contains("a configuration is at most 1048576 bytes"),
        "{error}"
    );
    let missing = load(&dir.join("missing.toml")).unwrap_err().to_string();
    assert!(
        missing.ends_with(": No such file or directory"),
        "{missing}"
    );
    assert_eq!(missing.matches("No such file").count(), 1, "{missing}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// 50,000 workloads and budgets on them: checked in well under a second (no quadratic step).
#[test]
fn a_large_configuration_checks_in_linear_time() {
    use std::fmt::Write as _;
    let mut text = String::new();
    for i in 0..50_000 {
        let _ = write!(
            text,
            "[[workload]]\nname = \"w{i}\"\nprocess = [\"p{i}\"]\n"
        );
    }
    for i in 0..1_000 {
        let _ = write!(
            text,
            "[[budget]]\nname = \"b{i}\"\nworkload = \"w{i}\"\nmetric = \"retransmits\"\nmax = 1.0\n"
        );
    }
    let started = std::time::Instant::now();
    let config = parse_config("large.toml", &text).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(config.budgets.len(), 1_000);
    assert_eq!(
        config.workloads.workload_of(&ProcessFacts {
            name: "p49999",
            ..ProcessFacts::default()
        }),
        Some("w49999")
    );
    // Debug builds are ~10x slower than release; the quadratic version took ~10 s in release.
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn a_peer_is_kept_as_the_report_writes_it() {
    let text = |peer: &str| {
        format!(
            "[[budget]]\nname = \"b\"\nworkload = \"*\"\nmetric = \"network_rtt_p95_ms\"\nmax = 1.0\npeer = \"{peer}\"\n"
        )
    };
    for (written, kept) in [
        ("[::ffff:10.0.0.7]:443", "10.0.0.7:443"),
        ("[2001:DB8:0::1]:443", "[2001:db8::1]:443"),
        ("10.0.0.7:6333", "10.0.0.7:6333"),
    ] {
        let config = parse_config("p.toml", &text(written)).unwrap();
        assert_eq!(config.budgets[0].peer.as_deref(), Some(kept), "{written}");
    }
}

#[test]
fn webhooks_take_headers_and_https_only_and_urls_are_redacted_in_messages() {
    let base = "[[budget]]\nname = \"b\"\nworkload = \"*\"\nmetric = \"retransmits\"\nmax = 1.0\n";
    let config = parse_config(
        "w.toml",
        &format!("{base}actions = [{{ webhook = \"https://hooks.example.com/e\", headers = {{ Authorization = \"Bearer x\" }}, allow_link_local = true }}]\n"),
    )
    .unwrap();
    assert_eq!(
        config.budgets[0].actions[0],
        Action::Webhook {
            url: "https://hooks.example.com/e".into(),
            timeout: std::time::Duration::from_secs(10),
            headers: vec![("authorization".into(), "Bearer x".into())],
            allow_link_local: true,
        }
    );
    let error = parse_config(
        "w.toml",
        &format!("[alerting]\nhttps_only = true\n{base}actions = [{{ webhook = \"http://u:p@hooks.example.com/e?token=t\" }}]\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("is not https:// and [alerting] https_only = true"),
        "{error}"
    );
    assert!(
        !error.contains("token=t") && !error.contains("u:p@"),
        "{error}"
    );
    let error = parse_config(
        "w.toml",
        &format!("{base}actions = [{{ command = [\"/bin/true\"], headers = {{ a = \"b\" }} }}]\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("apply to webhooks only"), "{error}");
    let error = parse_config(
        "w.toml",
        &format!("{base}actions = [{{ webhook = \"https://h/e\", headers = {{ a = \"b\\r\\nc: d\" }} }}]\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("a CR or LF would inject headers"), "{error}");
    assert_eq!(
        redacted_url("https://user:secret@hooks.example.com/x?token=abc"),
        "https://***@hooks.example.com/x?***"
    );
    assert_eq!(
        Action::Webhook {
            url: "https://h.example/x?key=1".into(),
            timeout: std::time::Duration::from_secs(1),
            headers: Vec::new(),
            allow_link_local: false,
        }
        .to_string(),
        "webhook https://h.example/x?***"
    );
}

#[test]
fn engine_endpoints_are_checked_with_hints() {
    let config = parse_config(
        "t.toml",
        r#"
[agent]
engine_timeout = "500ms"

[[workload]]
name = "llm"
process = ["vllm"]
metrics_url = "http://127.0.0.1:8000/metrics"

[[workload]]
name = "vision"
process = ["tritonserver"]
metrics_url = "http://127.0.0.1:8002/metrics"
engine = "triton"

[[workload]]
name = "custom"
process = ["app"]
metrics_url = "http://127.0.0.1:9000/metrics"
engine = "generic"
request_histogram = "app_request_seconds"
ttft_histogram = "app:ttft_seconds"

[[workload]]
name = "plain"
process = ["nginx"]
"#,
    )
    .unwrap();
    assert_eq!(config.agent.engine_timeout, Duration::from_millis(500));
    let engines: Vec<(&str, &EngineChoice)> = config
        .engines
        .iter()
        .map(|e| (e.workload.as_str(), &e.engine))
        .collect();
    assert_eq!(engines.len(), 3, "one per workload with a metrics_url");
    assert_eq!(engines[0], ("llm", &EngineChoice::Recognise));
    assert_eq!(
        engines[1],
        (
            "vision",
            &EngineChoice::Named(crate::model::engine::EngineKind::Triton)
        )
    );
    let EngineChoice::Generic(names) = engines[2].1 else {
        panic!("{engines:?}");
    };
    assert_eq!(
        names.request_histogram.as_deref(),
        Some("app_request_seconds")
    );
    assert_eq!(names.ttft_histogram.as_deref(), Some("app:ttft_seconds"));

    let workload = "[[workload]]\nname = \"w\"\nprocess = [\"p\"]\n";
    for (extra, hint) in [
        ("metrics_url = \"127.0.0.1:8000\"\n", "needs a scheme"),
        ("metrics_url = \"ftp://x/metrics\"\n", "needs a scheme"),
        (
            "metrics_url = \"http://x/metrics\"\nengine = \"ollama\"\n",
            "engine \"ollama\" is not one envelope reads; use vllm, sglang",
        ),
        (
            "metrics_url = \"http://x/metrics\"\nengine = \"generic\"\n",
            "needs the names of its histograms",
        ),
        (
            "metrics_url = \"http://x/metrics\"\nrequest_histogram = \"a\"\n",
            "set engine = \"generic\" with it",
        ),
        (
            "metrics_url = \"http://x/metrics\"\nengine = \"generic\"\nrequest_histogram = \"a_bucket{le}\"\n",
            "is not a Prometheus metric name",
        ),
        ("engine = \"vllm\"\n", "engine needs metrics_url"),
    ] {
        let error = parse_config("t.toml", &format!("{workload}{extra}"))
            .unwrap_err()
            .to_string();
        assert!(error.contains(hint), "{error:?} should contain {hint:?}");
        assert!(error.starts_with("t.toml:"), "with its line: {error}");
    }
    let error = parse_config("t.toml", "[agent]\nengine_timeout = \"1h\"\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("engine_timeout"), "{error}");
}

const RAG: &str = r#"
[pricing]
gpu_hour = 2.5

[[workload]]
name = "gateway"
process = ["gateway"]

[[workload]]
name = "intent"
process = ["intent"]

[[workload]]
name = "llm"
process = ["vllm"]
metrics_url = "http://127.0.0.1:8000/metrics"

[[envelope]]
name = "rag"
entry = "gateway"
request_p95_ms = 1500.0
cost_per_request = 0.02
objective = 0.99
actions = [{ command = ["/bin/true"] }]

[[envelope.stage]]
name = "intent detection"
workload = "intent"
request_p95_ms = 100.0
cost_per_request = 0.001

[[envelope.stage]]
name = "retrieval"
peer = "10.0.0.7:6333"
request_p95_ms = 300.0

[[envelope.stage]]
name = "generation"
workload = "llm"
request_p95_ms = 1000.0
cost_per_request = 0.015
"#;

#[test]
fn an_envelope_becomes_one_budget_per_end_to_end_bound_with_its_stages() {
    let config = parse_config("rag.toml", RAG).unwrap();
    let names: Vec<&str> = config.budgets.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["rag: request_p95_ms", "rag: cost_per_request"]);
    let latency = &config.budgets[0];
    assert_eq!(
        (
            latency.workload.as_str(),
            latency.threshold,
            latency.objective
        ),
        ("gateway", 1500.0, 0.99)
    );
    assert_eq!(latency.actions.len(), 1);
    let stages: Vec<(&str, Option<&str>, Option<&str>, f64)> = latency
        .stages
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.workload.as_deref(),
                s.peer.as_deref(),
                s.allocation,
            )
        })
        .collect();
    assert_eq!(
        stages,
        [
            ("intent detection", Some("intent"), None, 100.0),
            ("retrieval", None, Some("10.0.0.7:6333"), 300.0),
            ("generation", Some("llm"), None, 1000.0),
        ]
    );
    let cost: Vec<f64> = config.budgets[1]
        .stages
        .iter()
        .map(|s| s.allocation)
        .collect();
    assert_eq!(cost, [0.001, 0.015], "only the stages that allocate a cost");
}

#[test]
fn stage_allocations_that_cannot_fit_are_refused_saying_by_how_much() {
    let over = RAG.replace("request_p95_ms = 1000.0", "request_p95_ms = 1200.0");
    let error = parse_config("rag.toml", &over).unwrap_err().to_string();
    assert!(
        error.contains(
            "envelope \"rag\": the stages' request_p95_ms allocations sum to 1600 (intent detection 100 + retrieval 300 + generation 1200), 100 more than the end-to-end bound 1500"
        ),
        "{error}"
    );
    assert!(
        error.starts_with("rag.toml:21:"),
        "at the bound's line: {error}"
    );
    let costly = RAG.replace("cost_per_request = 0.015", "cost_per_request = 0.025");
    let error = parse_config("rag.toml", &costly).unwrap_err().to_string();
    assert!(
        error.contains("cost_per_request allocations sum to 0.026"),
        "{error}"
    );
    assert!(
        error.contains("0.006 more than the end-to-end bound 0.02"),
        "{error}"
    );
    for (from, to, hint) in [
        (
            "entry = \"gateway\"",
            "entry = \"nobody\"",
            "envelope \"rag\": workload \"nobody\" is not defined",
        ),
        (
            "peer = \"10.0.0.7:6333\"",
            "peer = \"vector-db\"",
            "must be address:port",
        ),
        (
            "peer = \"10.0.0.7:6333\"",
            "peer = \"10.0.0.7:6333\"\nworkload = \"llm\"",
            "give exactly one of workload",
        ),
        (
            "name = \"retrieval\"",
            "name = \"generation\"",
            "stage names must be unique",
        ),
        (
            "request_p95_ms = 1500.0\n",
            "",
            "request_p95_ms is allocated, but the envelope has no end-to-end request_p95_ms",
        ),
        ("gpu_hour = 2.5", "", "cost_per_request needs [pricing]"),
        (
            "peer = \"10.0.0.7:6333\"\nrequest_p95_ms = 300.0",
            "peer = \"10.0.0.7:6333\"\ncost_per_request = 0.001",
            "an upstream's cost is not measured on this node",
        ),
    ] {
        let text = RAG.replacen(from, to, 1);
        assert_ne!(text, RAG, "{from}");
        let error = parse_config("rag.toml", &text).unwrap_err().to_string();
        assert!(error.contains(hint), "{error:?} should contain {hint:?}");
    }
    let none = "[[workload]]\nname = \"g\"\nprocess = [\"g\"]\n[[envelope]]\nname = \"e\"\nentry = \"g\"\n";
    let error = parse_config("e.toml", none).unwrap_err().to_string();
    assert!(error.contains("give its end-to-end bounds"), "{error}");
}

#[test]
fn cuda_probes_take_one_of_three_modes_and_default_to_off() {
    assert_eq!(
        parse_config("e.toml", "").unwrap().gpu.cuda_probes,
        crate::model::gpu::CudaProbes::Off
    );
    for (text, mode) in [
        ("off", crate::model::gpu::CudaProbes::Off),
        ("sync", crate::model::gpu::CudaProbes::Sync),
        ("sync+launch", crate::model::gpu::CudaProbes::SyncAndLaunch),
    ] {
        let config = parse_config("e.toml", &format!("[gpu]\ncuda_probes = \"{text}\"\n")).unwrap();
        assert_eq!(config.gpu.cuda_probes, mode);
    }
    let error = parse_config("e.toml", "[gpu]\ncuda_probes = \"all\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("e.toml:2:15: [gpu]: cuda_probes \"all\" is not a mode; use \"off\""),
        "{error}"
    );
    let error = parse_config("e.toml", "[gpu]\ncuda_probe = \"sync\"\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown field `cuda_probe`"), "{error}");
}
