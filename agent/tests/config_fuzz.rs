//! Mutated configurations (seeded, bounded): `check` never panics, and whatever it accepts
//! `run` can build and run: the exporter, the metric state, the window timer, every budget
//! evaluated and recorded. Whatever it refuses comes with a line and column.
use std::path::Path;

use envelope::{
    analysis::attribution::{TimeBreakdown, WorkloadWindow},
    app::daemon,
    budgets::{self, BudgetState, observe},
    config::{self, ConfigError},
    export::metrics::{Limits, MetricsState},
};

const SHIPPED: &str = include_str!("../../systemd/envelope.toml");

/// xorshift64*: a fixed seed gives the same mutations on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NUMBERS: &[&str] = &[
    "nan",
    "inf",
    "-inf",
    "-1.0",
    "0",
    "0.0",
    "-0.0",
    "1e308",
    "5.0",
    "1",
    "0.5",
    "99999999999",
    "-2",
    "1.0e-320",
    "\"3\"",
];
const DURATIONS: &[&str] = &[
    "\"0s\"",
    "\"1ns\"",
    "\"300000000000years\"",
    "\"\"",
    "\"soon\"",
    "\"1.5s\"",
    "\"500ms\"",
    "\"1h\"",
    "\"-1s\"",
    "\"10 s\"",
    "\"3d\"",
    "1",
];
const LINES: &[&str] = &[
    "[agent]",
    "window = \"1ns\"",
    "[[budget]]",
    "name = \"x\"",
    "workload = \"*\"",
    "metric = \"retransmits\"",
    "max = 1.0",
    "actions = [{ command = [\"\"] }]",
    "actions = [{ webhook = \"http://\" }]",
    "[export]",
    "endpoint = \"http://\"",
    "headers = { a = \"b\\r\\nc: d\" }",
    "ca_file = \"/nonexistent\"",
    "[[workload]]",
    "name = \"w\"",
    "process = [\"[\"]",
    "[alerting]",
    "windows = []",
    "enter_after = 0",
    "leave_after = -1",
    "[pricing]",
    "gpu_hour = -2.5",
    "\u{0}",
    "]]]",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..1 + rng.below(4) {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let at = rng.below(lines.len());
        match rng.below(7) {
            0 => {
                // A number literal replaced.
                if let Some((key, _)) = lines[at].split_once(" = ") {
                    lines[at] = format!("{key} = {}", rng.pick(NUMBERS));
                }
            }
            1 => {
                if let Some((key, _)) = lines[at].split_once(" = ") {
                    lines[at] = format!("{key} = {}", rng.pick(DURATIONS));
                }
            }
            2 => {
                lines.remove(at);
            }
            3 => {
                let copy = lines[at].clone();
                lines.insert(at, copy);
            }
            4 => lines.insert(at, rng.pick(LINES).to_string()),
            5 => {
                let line = &mut lines[at];
                if !line.is_empty() {
                    let cut = rng.below(line.len());
                    let cut = (0..=cut)
                        .rev()
                        .find(|&i| line.is_char_boundary(i))
                        .unwrap_or(0);
                    line.truncate(cut);
                }
            }
            _ => {
                let mut bytes = lines[at].clone().into_bytes();
                if !bytes.is_empty() {
                    let i = rng.below(bytes.len());
                    const ALPHABET: &[u8] = b" =\"[]{},.#-0123456789abcxyz";
                    bytes[i] = ALPHABET[rng.below(ALPHABET.len())];
                }
                lines[at] = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
    }
    lines.join("\n")
}

/// What `run` builds from an accepted configuration, probes aside; panics if it cannot.
fn run_builds(path: &Path) {
    let prepared = daemon::check(path).expect("accepted by check");
    let config = &prepared.config;
    let window = config.agent.window;
    assert!(tokio::time::Instant::now().checked_add(window).is_some());
    let _timer = tokio::time::interval(window);
    let _tracking = tokio::time::interval(config.agent.gpu_interval);
    let thresholds: Vec<f64> = config
        .budgets
        .iter()
        .filter(|b| b.metric.is_latency())
        .map(|b| b.threshold / 1e3)
        .collect();
    let _metrics = MetricsState::new(
        Limits {
            workloads: config.agent.max_workloads,
            peers: config.agent.max_peers,
            devices: config.agent.max_devices,
            gpu_processes: config.agent.max_gpu_processes,
        },
        &thresholds,
    );
    let busy = WorkloadWindow {
        name: "w".into(),
        window_ns: window.as_nanos() as u64,
        time: TimeBreakdown {
            on_cpu_ns: 1_000_000,
            storage_ns: 5_000_000,
            ..TimeBreakdown::default()
        },
        ..WorkloadWindow::default()
    };
    for (i, workloads) in [vec![], vec![busy]].iter().enumerate() {
        let at_s = 1_800_000_000 + i as u64 * 10;
        let results = budgets::evaluate_window(config, workloads, at_s);
        assert_eq!(results.len(), config.budgets.len());
        for (budget, result) in config.budgets.iter().zip(&results) {
            let mut state = BudgetState::default();
            let policy = config.policy(budget);
            for step in 0..3 {
                let observed = result.observed.unwrap_or(budget.threshold * 2.0 + 1.0);
                state.record(
                    &budget.name,
                    &observe(at_s + step, observed, budget.threshold, budget.bound),
                    &policy,
                );
            }
        }
    }
}

#[test]
fn mutated_configurations_never_panic_and_check_accepts_only_what_runs() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envelope.toml");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..1_500 {
        let text = mutate(&mut rng, SHIPPED);
        std::fs::write(&path, &text).unwrap();
        let loaded = config::load(&path);
        let checked = daemon::check(&path);
        assert_eq!(
            loaded.is_ok(),
            checked.is_ok(),
            "load and check disagree on:\n{text}\n{:?}",
            checked.err()
        );
        match loaded {
            Ok(_) => {
                run_builds(&path);
                accepted += 1;
            }
            Err(ConfigError::At { line, column, .. }) => {
                assert!(line >= 1 && column >= 1);
                assert!(
                    line <= text.lines().count().max(1) + 1,
                    "line {line} of:\n{text}"
                );
                refused += 1;
            }
            Err(other) => panic!("a text that exists was not read: {other}"),
        }
    }
    // Both sides exercised (the mix depends only on the seed).
    assert!(
        accepted > 100 && refused > 100,
        "{accepted} accepted, {refused} refused"
    );
    eprintln!("{accepted} accepted, {refused} refused");
}
