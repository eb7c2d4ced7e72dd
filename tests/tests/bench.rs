//! The benchmark (`cargo xtask bench`, root): probe cost, agent cost, workload slowdown and
//! accuracy, side by side with a reference tracer. Ignored by `cargo test`: it measures, it
//! never gates on a time. Writes target/bench/results.json and BENCHMARKS.md.
//!
//! The reference: bcc's biolatency and tcprtt cannot run on this kernel family (no kernel
//! headers, and kprobes do not attach), so the same two measurements are made with bpftrace
//! on the same tracepoints envelope uses, with bcc's log2 histograms (`hist()`).
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    ScratchFile, VethPair, daemon::Scratch, load_probes, tool_or_skip, veth_tools_or_skip,
    window_since,
};
use serde_json::{Value, json};

const ROUNDS: usize = 5;
const FIO_SECONDS: u64 = 8;
const IPERF_SECONDS: u64 = 5;

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The release binary `cargo xtask bench` built (overhead of a debug build means nothing).
fn envelope_release() -> PathBuf {
    std::env::var_os("ENVELOPE_BENCH_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release/envelope"))
}

fn run_json(command: &mut Command) -> Value {
    let output = command.output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{command:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// fio random reads, direct, on `file`; the whole JSON report.
fn fio(file: &Path, block_size: &str, queue_depth: u32, seconds: u64) -> Value {
    run_json(Command::new("fio").args([
        "--name=bench",
        &format!("--filename={}", file.display()),
        "--rw=randread",
        &format!("--bs={block_size}"),
        "--direct=1",
        "--ioengine=libaio",
        &format!("--iodepth={queue_depth}"),
        "--time_based",
        &format!("--runtime={seconds}"),
        "--output-format=json",
    ]))
}

fn fio_iops(report: &Value) -> f64 {
    report["jobs"][0]["read"]["iops"]
        .as_f64()
        .expect("fio iops")
}

/// (P50, P95, P99) completion latency in ms from fio's own percentiles.
fn fio_clat_ms(report: &Value) -> (f64, f64, f64) {
    let percentiles = &report["jobs"][0]["read"]["clat_ns"]["percentile"];
    let at = |key: &str| percentiles[key].as_f64().expect("fio percentile") / 1e6;
    (at("50.000000"), at("95.000000"), at("99.000000"))
}

/// iperf3 over loopback; bits per second received.
/// iperf3 throughput in bit/s over loopback, or across `veth` (server in its server namespace,
/// client in its client namespace).
fn iperf3(seconds: u64, veth: Option<&VethPair>) -> f64 {
    let port = 5301;
    let in_namespace = |namespace: Option<&String>, args: &[&str]| {
        let mut command = match namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace, "iperf3"]);
                command
            }
            None => Command::new("iperf3"),
        };
        command.args(args);
        command
    };
    let mut server = in_namespace(
        veth.map(|pair| &pair.server_namespace),
        &["-s", "-1", "-p", &port.to_string()],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let server_address = veth.map_or("127.0.0.1".to_string(), |pair| {
        pair.server_address.to_string()
    });
    let report = run_json(&mut in_namespace(
        veth.map(|pair| &pair.client_namespace),
        &[
            "-c",
            &server_address,
            "-p",
            &port.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    ));
    let _ = server.wait();
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3 throughput")
}

/// The loads each observer runs in every round, in this order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Load {
    /// fio 4 KiB random reads, queue depth 32 (IOPS).
    Storage,
    /// iperf3 over loopback (bit/s).
    Loopback,
    /// iperf3 across a veth pair between two namespaces (bit/s).
    Veth,
}

const LOADS: [Load; 3] = [Load::Storage, Load::Loopback, Load::Veth];

impl Load {
    /// Key in results.json.
    fn key(self) -> &'static str {
        match self {
            Load::Storage => "storage_load",
            Load::Loopback => "network_load",
            Load::Veth => "veth_load",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Load::Storage => "fio 4k QD32",
            Load::Loopback => "iperf3 loopback",
            Load::Veth => "iperf3 veth",
        }
    }
}

/// Per BPF program: (run time ns, run count).
fn bpf_stats() -> BTreeMap<(u64, String), (u64, u64)> {
    bpf_stats_with_misses()
        .into_iter()
        .map(|(key, (time, count, _))| (key, (time, count)))
        .collect()
}

/// Per BPF program: (run time ns, run count, runs the kernel skipped: recursion_misses).
fn bpf_stats_with_misses() -> BTreeMap<(u64, String), (u64, u64, u64)> {
    let programs = run_json(Command::new("bpftool").args(["prog", "show", "--json"]));
    programs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                (p["id"].as_u64()?, p["name"].as_str()?.to_string()),
                // bpftool leaves these out while they are zero.
                (
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                    p["recursion_misses"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect()
}

/// Total run time of `programs` between two readings.
fn probe_time_ns(
    before: &BTreeMap<(u64, String), (u64, u64)>,
    after: &BTreeMap<(u64, String), (u64, u64)>,
    programs: &std::collections::HashSet<u64>,
) -> u64 {
    after
        .iter()
        .filter(|((id, _), _)| programs.contains(id))
        .map(|(key, (time, _))| time - before.get(key).map_or(0, |(time0, _)| *time0))
        .sum()
}

/// Nanoseconds per event per program between two readings (programs that ran only).
fn cost_per_event(
    before: &BTreeMap<(u64, String), (u64, u64)>,
    after: &BTreeMap<(u64, String), (u64, u64)>,
    programs: &std::collections::HashSet<u64>,
) -> BTreeMap<String, (f64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for ((id, name), (time, count)) in after {
        if !programs.contains(id) {
            continue;
        }
        let (time0, count0) = before.get(&(*id, name.clone())).copied().unwrap_or((0, 0));
        let entry = out.entry(name.clone()).or_default();
        entry.0 += time - time0;
        entry.1 += count - count0;
    }
    out.into_iter()
        .filter(|(_, (_, count))| *count > 0)
        .map(|(name, (time, count))| (name, (time as f64 / count as f64, count)))
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Observer {
    None,
    Envelope,
    /// envelope with every probe on its classic tracepoint (`ENVELOPE_PROBES=tracepoint`),
    /// the path kernels without BTF take.
    EnvelopeClassic,
    Reference,
    /// Empty programs on every tracepoint envelope and the reference use: what any program
    /// there costs on this machine (the statistics' own clock reads and the dispatch
    /// included), and the slowdown that comes with enabling the tracepoints at all.
    Floor,
}

impl Observer {
    fn name(self) -> &'static str {
        match self {
            Observer::None => "no agent",
            Observer::Envelope => "envelope run",
            Observer::EnvelopeClassic => "envelope run, classic tracepoints",
            Observer::Reference => "bpftrace (bcc-style log2)",
            Observer::Floor => "empty programs (floor)",
        }
    }

    /// Key in results.json.
    fn key(self) -> &'static str {
        match self {
            Observer::None => "none",
            Observer::Envelope => "envelope",
            Observer::EnvelopeClassic => "envelope_classic",
            Observer::Reference => "reference",
            Observer::Floor => "floor",
        }
    }
}

/// The reference: `biolatency -Q` (block_io_start is where bcc starts its clock with -Q, so
/// OS queueing counts, as in envelope's total stage and fio's completion latency) and
/// `tcprtt` per remote port, on tracepoints, in one bpftrace process.
const REFERENCE_SCRIPT: &str = r#"
tracepoint:block:block_io_start { @start[args->dev, args->sector] = nsecs; }
tracepoint:block:block_rq_complete /@start[args->dev, args->sector]/ {
  @block_usecs = hist((nsecs - @start[args->dev, args->sector]) / 1000);
  delete(@start[args->dev, args->sector]);
}
tracepoint:tcp:tcp_probe { @srtt_usecs[args->dport] = hist(args->srtt); }
"#;

/// Tracepoints envelope attaches by default, plus the reference's block_io_start.
const FLOOR_TRACEPOINTS: &[&str] = &[
    "block:block_bio_queue",
    "block:block_split",
    "block:block_rq_issue",
    "block:block_rq_complete",
    "block:block_io_start",
    "tcp:tcp_probe",
    "tcp:tcp_retransmit_skb",
    "sock:inet_sock_set_state",
    "sock:sock_send_length",
    "sock:sock_recv_length",
    "sched:sched_switch",
    "sched:sched_wakeup",
    "sched:sched_wakeup_new",
    "sched:sched_process_exit",
    "sched:sched_process_fork",
];

/// bpftrace programs on block:block_rq_issue, each adding one building block to the empty
/// one. The `if` keeps bpftrace from dropping an unused value.
const PRIMITIVES: &[(&str, &str)] = &[
    ("empty program", "tracepoint:block:block_rq_issue { }"),
    (
        "read the clock (bpf_ktime_get_ns)",
        "tracepoint:block:block_rq_issue { $t = nsecs; if ($t == 1) { printf(\"\"); } }",
    ),
    (
        "one hash map lookup (key present)",
        "BEGIN { @h[1] = 1; } tracepoint:block:block_rq_issue { $v = @h[1]; if ($v == 7) { printf(\"\"); } }",
    ),
    (
        "one hash map update in place",
        "BEGIN { @h[1] = 1; } tracepoint:block:block_rq_issue { @h[1] = 2; }",
    ),
    (
        "one hash map insert and delete",
        "tracepoint:block:block_rq_issue { @h[args->sector] = 1; delete(@h[args->sector]); }",
    ),
];

/// ns per event of a bpftrace script's block_rq_issue program under 4 s of fio.
fn primitive_cost(script: &str, file: &Path) -> (f64, u64) {
    let running = Running::bpftrace(script);
    let before = bpf_stats();
    fio(file, "4k", 32, 4);
    let after = bpf_stats();
    let cost = cost_per_event(&before, &after, &running.programs)
        .into_iter()
        .find(|(name, _)| name.starts_with("block_rq_issue"))
        .map_or((f64::NAN, 0), |(_, cost)| cost);
    running.stop();
    cost
}

/// A fixed amount of work, timed under each observer: what the workload pays for being
/// observed, including what the kernel does before any program runs (filling a trace record,
/// dispatching to the program) and work in interrupt context, which BPF run-time statistics
/// do not show.
#[derive(Clone, Copy, Debug, PartialEq)]
enum FixedWork {
    /// 4 KiB direct reads, 8 threads (queue depth 8): block probes, and a context switch per
    /// read.
    DirectReads,
    /// 1-byte ping-pong between two threads over pipes: context switches and wake-ups only.
    PipeRoundTrips,
    /// 64-byte request/response pairs over one loopback TCP connection: socket, TCP and
    /// scheduler probes.
    TcpPairs,
}

const FIXED_WORK: [FixedWork; 3] = [
    FixedWork::DirectReads,
    FixedWork::PipeRoundTrips,
    FixedWork::TcpPairs,
];

impl FixedWork {
    fn key(self) -> &'static str {
        match self {
            FixedWork::DirectReads => "direct_reads",
            FixedWork::PipeRoundTrips => "pipe_round_trips",
            FixedWork::TcpPairs => "tcp_pairs",
        }
    }

    fn label(self) -> &'static str {
        match self {
            FixedWork::DirectReads => "4 KiB direct read (8 threads)",
            FixedWork::PipeRoundTrips => "pipe round trip (2 threads)",
            FixedWork::TcpPairs => "TCP request/response on loopback",
        }
    }

    /// Operations per run.
    fn operations(self) -> u64 {
        match self {
            FixedWork::DirectReads => 8 * 6000,
            FixedWork::PipeRoundTrips => 200_000,
            FixedWork::TcpPairs => 20_000,
        }
    }
}

/// One timed run of fixed work.
#[derive(Clone, Copy, Debug)]
struct WholeCost {
    /// CPU time of the whole machine (user, system, interrupts; idle and I/O wait left out,
    /// from /proc/stat) per operation, in microseconds.
    cpu_us_per_op: f64,
    /// Runs of the observer's programs per operation.
    events_per_op: f64,
    /// Runs the kernel skipped for the observer's programs (recursion_misses).
    lost_events: u64,
}

/// Busy CPU time of the whole machine so far, in seconds (every CPU's user, nice, system, irq,
/// softirq and steal from /proc/stat).
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| cpu.get(i)).sum();
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Runs `work` once in a child process (this test binary's `bench_fixed_work`) and measures
/// the machine's CPU time and the observer's program runs while it ran.
fn whole_cost(
    work: FixedWork,
    file: &Path,
    programs: &std::collections::HashSet<u64>,
) -> WholeCost {
    let stats_before = bpf_stats_with_misses();
    let busy_before = machine_busy_seconds();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "bench_fixed_work",
            "--test-threads=1",
        ])
        .env("ENVELOPE_BENCH_WORK", work.key())
        .env("ENVELOPE_BENCH_FILE", file)
        .stdout(Stdio::null())
        .status()
        .expect("run the fixed work");
    assert!(status.success(), "the fixed work {} failed", work.key());
    let busy = machine_busy_seconds() - busy_before;
    let stats_after = bpf_stats_with_misses();
    let (mut runs, mut lost) = (0, 0);
    for (key, (_, count, misses)) in &stats_after {
        if programs.contains(&key.0) {
            let (_, count0, misses0) = stats_before.get(key).copied().unwrap_or_default();
            runs += count - count0;
            lost += misses - misses0;
        }
    }
    let operations = work.operations() as f64;
    WholeCost {
        cpu_us_per_op: busy / operations * 1e6,
        events_per_op: runs as f64 / operations,
        lost_events: lost,
    }
}

/// Per observer and work: medians over the rounds, and what observing added against no
/// observer, per operation and per event of that observer.
fn whole_cost_json(whole: &BTreeMap<(&str, &str), Vec<WholeCost>>) -> Value {
    let med = |values: Vec<f64>| median(&mut values.clone());
    let mut out = serde_json::Map::new();
    for work in FIXED_WORK {
        let Some(none) = whole.get(&(Observer::None.key(), work.key())) else {
            continue;
        };
        let baseline = med(none.iter().map(|w| w.cpu_us_per_op).collect());
        let mut observers = serde_json::Map::new();
        for observer in [
            Observer::None,
            Observer::Envelope,
            Observer::EnvelopeClassic,
            Observer::Reference,
            Observer::Floor,
        ] {
            let Some(runs) = whole.get(&(observer.key(), work.key())) else {
                continue;
            };
            let cpu = med(runs.iter().map(|w| w.cpu_us_per_op).collect());
            let events = med(runs.iter().map(|w| w.events_per_op).collect());
            let added = cpu - baseline;
            observers.insert(
                observer.key().to_string(),
                json!({
                    "cpu_us_per_op": (cpu * 1000.0).round() / 1000.0,
                    "added_us_per_op": (added * 1000.0).round() / 1000.0,
                    "events_per_op": (events * 100.0).round() / 100.0,
                    "added_ns_per_event": (events > 0.0).then(|| (added * 1000.0 / events).round()),
                    "lost_events": runs.iter().map(|w| w.lost_events).sum::<u64>(),
                }),
            );
        }
        out.insert(
            work.key().to_string(),
            json!({"label": work.label(), "operations": work.operations(), "observers": observers}),
        );
    }
    out.into()
}

/// The fixed work `whole_cost` times, run as a child process of the benchmark (it does
/// nothing without ENVELOPE_BENCH_WORK).
#[test]
#[ignore = "a child of the benchmark: the fixed work it times"]
fn bench_fixed_work() {
    use std::io::Read as _;
    let Ok(work) = std::env::var("ENVELOPE_BENCH_WORK") else {
        return;
    };
    match work.as_str() {
        "direct_reads" => {
            use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
            let path = std::env::var("ENVELOPE_BENCH_FILE").expect("ENVELOPE_BENCH_FILE");
            let blocks = std::fs::metadata(&path).unwrap().len() / 4096;
            std::thread::scope(|scope| {
                for thread in 0..8u64 {
                    let path = &path;
                    scope.spawn(move || {
                        let file = std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_DIRECT)
                            .open(path)
                            .unwrap();
                        let mut buffer = integration_tests::AlignedBuffer::new(4096);
                        let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ thread;
                        for _ in 0..FixedWork::DirectReads.operations() / 8 {
                            seed = seed
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let block = (seed >> 33) % blocks;
                            file.read_exact_at(buffer.as_mut_slice(), block * 4096)
                                .unwrap();
                        }
                    });
                }
            });
        }
        "pipe_round_trips" => {
            let mut ping = [0i32; 2];
            let mut pong = [0i32; 2];
            // SAFETY: pipe() fills the two-element arrays.
            unsafe {
                assert_eq!(libc::pipe(ping.as_mut_ptr()), 0);
                assert_eq!(libc::pipe(pong.as_mut_ptr()), 0);
            }
            let rounds = FixedWork::PipeRoundTrips.operations();
            let echo = std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                for _ in 0..rounds {
                    // SAFETY: valid pipe ends and a one-byte buffer.
                    unsafe {
                        libc::read(ping[0], byte.as_mut_ptr().cast(), 1);
                        libc::write(pong[1], byte.as_ptr().cast(), 1);
                    }
                }
            });
            let mut byte = [7u8; 1];
            for _ in 0..rounds {
                // SAFETY: as above.
                unsafe {
                    libc::write(ping[1], byte.as_ptr().cast(), 1);
                    libc::read(pong[0], byte.as_mut_ptr().cast(), 1);
                }
            }
            echo.join().unwrap();
        }
        "tcp_pairs" => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap();
            let server = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                stream.set_nodelay(true).unwrap();
                let mut request = [0u8; 64];
                while stream.read_exact(&mut request).is_ok() {
                    stream.write_all(&request).unwrap();
                }
            });
            let mut client = TcpStream::connect(address).unwrap();
            client.set_nodelay(true).unwrap();
            let mut buffer = [7u8; 64];
            for _ in 0..FixedWork::TcpPairs.operations() {
                client.write_all(&buffer).unwrap();
                client.read_exact(&mut buffer).unwrap();
            }
            drop(client);
            server.join().unwrap();
        }
        other => panic!("unknown fixed work {other}"),
    }
}

/// A running observer process, stopped (and its output kept) on `stop`.
struct Running {
    child: Option<Child>,
    /// The BPF programs this observer loaded (ids: bpftrace names its programs after the
    /// tracepoints, as envelope does).
    programs: std::collections::HashSet<u64>,
    started: Instant,
    output: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Running {
    fn start(observer: Observer, scratch: &Path) -> Self {
        match observer {
            Observer::None => Self::watch(|_| None),
            Observer::Envelope | Observer::EnvelopeClassic => Self::watch(|output| {
                let config = scratch.join("bench.toml");
                std::fs::write(
                    &config,
                    format!(
                        "[agent]\nwindow = \"10s\"\nstate_dir = \"{}\"\n[export]\nenabled = false\n",
                        scratch.join("state").display()
                    ),
                )
                .unwrap();
                let probes = if observer == Observer::EnvelopeClassic {
                    "tracepoint"
                } else {
                    "default"
                };
                let child = Command::new(envelope_release())
                    .env("ENVELOPE_PROBES", probes)
                    .args(["run", "--config"])
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start envelope run");
                Some(Self::collect(child, output, "running"))
            }),
            Observer::Floor => Self::bpftrace(
                &(FLOOR_TRACEPOINTS
                    .iter()
                    .map(|tracepoint| format!("tracepoint:{tracepoint}"))
                    .collect::<Vec<_>>()
                    .join(",")
                    + " { }"),
            ),
            Observer::Reference => Self::bpftrace(REFERENCE_SCRIPT),
        }
    }

    fn bpftrace(script: &str) -> Self {
        Self::watch(|output| {
            let child = Command::new("bpftrace")
                .args(["-e", script])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start bpftrace");
            Some(Self::collect(child, output, "Attaching"))
        })
    }

    /// Starts an observer with `spawn` and notes the BPF programs it loaded.
    fn watch(
        spawn: impl FnOnce(&std::sync::Arc<std::sync::Mutex<String>>) -> Option<Child>,
    ) -> Self {
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let loaded_before: std::collections::HashSet<u64> =
            bpf_stats().keys().map(|(id, _)| *id).collect();
        let child = spawn(&output);
        let programs = bpf_stats()
            .keys()
            .map(|(id, _)| *id)
            .filter(|id| !loaded_before.contains(id))
            .collect();
        Self {
            child,
            programs,
            started: Instant::now(),
            output,
        }
    }

    /// Collects the child's output, returning once a line containing `ready` appeared.
    fn collect(
        mut child: Child,
        output: &std::sync::Arc<std::sync::Mutex<String>>,
        ready: &'static str,
    ) -> Child {
        let stream: Box<dyn std::io::Read + Send> = match child.stdout.take() {
            Some(stdout) => Box::new(stdout),
            None => Box::new(child.stderr.take().expect("piped stderr")),
        };
        let (ready_sender, is_ready) = std::sync::mpsc::channel();
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains(ready) {
                    let _ = ready_sender.send(());
                }
                let mut text = output.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        is_ready
            .recv_timeout(Duration::from_secs(30))
            .expect("the observer did not start within 30 s");
        // Attached and settled.
        std::thread::sleep(Duration::from_secs(1));
        child
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// (CPU seconds used, wall seconds) so far, from /proc.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().ok()? + fields[12].parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(ticks / hz)
    }

    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
    }

    /// Stops the observer with SIGINT (bpftrace prints its maps then, envelope measures its
    /// last window), sent again every 5 s: a bpftrace run of this benchmark once caught the
    /// first SIGINT and went on waiting in epoll for ten minutes, and the second ended it. A
    /// process still there after 30 s is killed. Returns its output.
    fn stop(mut self) -> String {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut next_signal = Instant::now();
            loop {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                if Instant::now() >= deadline {
                    eprintln!("observer {pid} ignored SIGINT for 30 s; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                if Instant::now() >= next_signal {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
                    next_signal = Instant::now() + Duration::from_secs(5);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        self.output.lock().unwrap().clone()
    }
}

/// A log2 histogram printed by bpftrace's hist(), as (low, high, count) in its unit.
fn parse_log2(text: &str, map: &str) -> Vec<(f64, f64, u64)> {
    let unit = |s: &str| -> Option<f64> {
        let s = s.trim();
        let (number, scale) = match s.chars().last()? {
            'K' => (&s[..s.len() - 1], 1024.0),
            'M' => (&s[..s.len() - 1], 1024.0 * 1024.0),
            'G' => (&s[..s.len() - 1], 1024.0 * 1024.0 * 1024.0),
            _ => (s, 1.0),
        };
        number.parse::<f64>().ok().map(|n| n * scale)
    };
    text.split(&format!("@{map}:"))
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('['))
        .filter_map(|line| {
            let (range, rest) = line.split_once(')').or_else(|| line.split_once(']'))?;
            let (low, high) = range.trim_start_matches('[').split_once(',')?;
            let count = rest.split_whitespace().next()?.parse().ok()?;
            Some((unit(low)?, unit(high)?, count))
        })
        .collect()
}

/// A quantile from log2 buckets, interpolated inside the bucket (as kept as possible).
fn log2_quantile(buckets: &[(f64, f64, u64)], quantile: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|b| b.2).sum();
    if total == 0 {
        return None;
    }
    let rank = quantile * total as f64;
    let mut below = 0.0;
    for (low, high, count) in buckets {
        let count = *count as f64;
        if below + count >= rank {
            return Some(low + (rank - below) / count * (high - low));
        }
        below += count;
    }
    buckets.last().map(|b| b.1)
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn error_percent(measured: f64, truth: f64) -> f64 {
    (measured - truth) / truth * 100.0
}

/// Calls per step of the CUDA uprobe benchmark.
const CUDA_CALLS_PER_STEP: u64 = 200_000;

/// The stand-in library and program, built optimised: a debug build's functions start with
/// a stack adjustment the kernel single-steps, which is not what a real library's costs.
fn fake_cuda_release() -> (PathBuf, PathBuf) {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "fake-cuda"])
        .current_dir(workspace())
        .status()
        .expect("cargo build -p fake-cuda");
    assert!(status.success(), "building fake-cuda failed");
    let release = workspace().join("target/release");
    (
        release.join("libfake_cuda.so"),
        release.join("fake-cuda-app"),
    )
}

/// The stand-in program's ns per call for each step, one run.
fn fake_cuda_run(app: &Path, libraries: &Path, steps: &[String]) -> BTreeMap<String, f64> {
    let output = Command::new(app)
        .arg("--runtime")
        .arg(libraries.join("libcudart.so.12"))
        .arg("--driver")
        .arg(libraries.join("libcuda.so.1"))
        .arg("--no-wait")
        .args(steps)
        .env("FAKE_CUDA_SYNC_US", "0")
        .env("FAKE_CUDA_COPY_BYTES_PER_US", "0")
        .output()
        .expect("run fake-cuda-app");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|step| {
            (
                step["step"].as_str().unwrap_or("?").to_string(),
                step["ns_per_call"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

/// Per-call cost of the CUDA uprobes: the stand-in program's loops with the probes off and on
/// (`cuda_probes = "sync+launch"`), alternating; writes target/bench/cuda.json, which the
/// main benchmark folds into results.json and BENCHMARKS.md.
#[test]
#[ignore = "benchmark: run it with `cargo xtask bench` (root)"]
fn bench_cuda_uprobes() {
    assert!(
        envelope_release().exists(),
        "no release binary at {} (cargo xtask bench builds it)",
        envelope_release().display()
    );
    assert!(
        tool_or_skip("benchmark", "bpftool"),
        "the benchmark needs bpftool"
    );
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enable BPF run-time stats");
    let (library, app) = fake_cuda_release();
    let libraries =
        std::env::temp_dir().join(format!("envelope-bench-cuda-{}", std::process::id()));
    std::fs::create_dir_all(&libraries).unwrap();
    for name in ["libcudart.so.12", "libcuda.so.1"] {
        std::fs::copy(&library, libraries.join(name)).unwrap();
    }
    // One step per kind of call; launches through the runtime are not nested here
    // (FAKE_CUDA_DRIVER unset): one probed call each.
    let n = CUDA_CALLS_PER_STEP;
    let steps: Vec<String> = [
        format!("launch:{n}"),
        format!("stream-sync:{n}"),
        format!("memcpy-async-h2d:{n}:4096"),
        format!("malloc:{n}:4096"),
        format!("cu-launch:{}", n / 10),
    ]
    .into_iter()
    .collect();
    let mut off: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut on: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut bpf_ns = Vec::new();
    for _ in 0..ROUNDS {
        for (step, ns) in fake_cuda_run(&app, &libraries, &steps) {
            off.entry(step).or_default().push(ns);
        }
        // The agent with the probes on, and a process that keeps both files mapped so they
        // stay attached between the timed runs.
        let mut agent = Command::new(envelope_release())
            .args([
                "diagnose",
                "--duration",
                "120s",
                "--json",
                "--cuda-probes",
                "sync+launch",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start envelope");
        let mut holder = Command::new(&app)
            .arg("--runtime")
            .arg(libraries.join("libcudart.so.12"))
            .arg("--driver")
            .arg(libraries.join("libcuda.so.1"))
            .arg("launch:1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the holder");
        let stderr = BufReader::new(agent.stderr.take().unwrap());
        let (attached, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = 0;
            for line in stderr.lines().map_while(Result::ok) {
                if line.contains("CUDA probes on ") {
                    seen += 1;
                    if seen == 2 {
                        let _ = attached.send(());
                    }
                }
            }
        });
        lines
            .recv_timeout(Duration::from_secs(60))
            .expect("envelope attached to both libraries within 60 s");
        let before = bpf_stats();
        let runs = fake_cuda_run(&app, &libraries, &steps);
        let after = bpf_stats();
        let (time, count) = after
            .iter()
            .filter(|((_, name), _)| name == "cuda_call" || name == "cuda_return")
            .map(|(key, (time, count))| {
                let (time0, count0) = before.get(key).copied().unwrap_or((0, 0));
                (time - time0, count - count0)
            })
            .fold((0, 0), |(t, c), (dt, dc)| (t + dt, c + dc));
        if count > 0 {
            // Two runs (entry and return) per call.
            bpf_ns.push(time as f64 / count as f64 * 2.0);
        }
        for (step, ns) in runs {
            on.entry(step).or_default().push(ns);
        }
        let _ = holder.kill();
        let _ = holder.wait();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = agent.wait();
    }
    let _ = std::fs::remove_dir_all(&libraries);
    let steps_json: serde_json::Map<String, Value> = off
        .iter()
        .map(|(step, offs)| {
            let mut offs = offs.clone();
            let mut ons = on.get(step).cloned().unwrap_or_default();
            (
                step.clone(),
                json!({"off_ns": median(&mut offs), "on_ns": median(&mut ons), "off_runs": offs, "on_runs": ons}),
            )
        })
        .collect();
    let result = json!({
        "calls_per_step": n,
        "rounds": ROUNDS,
        "steps": steps_json,
        "bpf_ns_per_call": median(&mut bpf_ns),
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    let out = workspace().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("cuda.json"),
        serde_json::to_string_pretty(&result).unwrap(),
    )
    .unwrap();
}

#[test]
#[ignore = "benchmark: run it with `cargo xtask bench` (root)"]
fn benchmark() {
    for tool in ["fio", "iperf3", "bpftool", "bpftrace"] {
        assert!(
            tool_or_skip("benchmark", tool),
            "the benchmark needs {tool}"
        );
    }
    assert!(
        veth_tools_or_skip("benchmark"),
        "the benchmark needs root, ip, tc and ss"
    );
    assert!(
        envelope_release().exists(),
        "no release binary at {} (cargo xtask bench builds it)",
        envelope_release().display()
    );
    let scratch = Scratch::new();
    let file = ScratchFile::create(256 << 20);
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").expect("enable BPF run-time stats");

    // 1-3: alternate no agent / envelope / reference, ROUNDS times, on both loads.
    let observers = [
        Observer::None,
        Observer::Envelope,
        Observer::EnvelopeClassic,
        Observer::Reference,
        Observer::Floor,
    ];
    // A veth pair whose shaping is far above what this machine can push: iperf3 across two
    // namespaces, so the packets take the veth path instead of loopback's.
    let veth = VethPair::create("40gbit", "50ms");
    type Costs = BTreeMap<String, Vec<(f64, u64)>>;
    // Per load: workload results per observer, envelope's and the floor's cost per program.
    let mut workload_runs: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut envelope_cost: BTreeMap<&str, Costs> = BTreeMap::new();
    let mut floor_cost: BTreeMap<&str, Costs> = BTreeMap::new();
    let mut reference_cost: Costs = BTreeMap::new();
    let mut probe_cpu: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut agent_cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut agent_rss: Vec<f64> = Vec::new();
    let mut whole: BTreeMap<(&str, &str), Vec<WholeCost>> = BTreeMap::new();
    for round in 0..ROUNDS {
        for observer in observers {
            eprintln!("round {}/{ROUNDS}: {}", round + 1, observer.name());
            let running = Running::start(observer, &scratch.0);
            // Idle: the agent's own cost with nothing to measure.
            if observer == Observer::Envelope && round == 0 {
                let cpu0 = running.cpu_seconds().unwrap();
                std::thread::sleep(Duration::from_secs(10));
                agent_cpu
                    .entry("idle")
                    .or_default()
                    .push((running.cpu_seconds().unwrap() - cpu0) / 10.0 * 100.0);
            }
            for load in LOADS {
                let stats_before = bpf_stats();
                let cpu_before = running.cpu_seconds();
                let started = Instant::now();
                let value = match load {
                    Load::Storage => fio_iops(&fio(&file.path, "4k", 32, FIO_SECONDS)),
                    Load::Loopback => iperf3(IPERF_SECONDS, None),
                    Load::Veth => iperf3(IPERF_SECONDS, Some(&veth)),
                };
                let wall = started.elapsed();
                let stats_after = bpf_stats();
                workload_runs
                    .entry(load.key())
                    .or_default()
                    .entry(observer.name())
                    .or_default()
                    .push(value);
                if observer == Observer::None {
                    continue;
                }
                // CPU the observer's programs took, as a share of the machine, while the load
                // ran: what they take from the workload, without the throughput's noise.
                probe_cpu
                    .entry((observer.name(), load.key()))
                    .or_default()
                    .push(
                        probe_time_ns(&stats_before, &stats_after, &running.programs) as f64
                            / (wall.as_nanos() as f64 * cpus as f64)
                            * 100.0,
                    );
                if observer == Observer::EnvelopeClassic {
                    continue; // per-program figures: the default path's only
                }
                let costs = cost_per_event(&stats_before, &stats_after, &running.programs);
                let table = match observer {
                    Observer::Envelope => {
                        agent_cpu.entry(load.label()).or_default().extend(
                            running
                                .cpu_seconds()
                                .zip(cpu_before)
                                .map(|(b, a)| (b - a) / wall.as_secs_f64() * 100.0),
                        );
                        envelope_cost.entry(load.key()).or_default()
                    }
                    Observer::Floor => floor_cost.entry(load.key()).or_default(),
                    _ => &mut reference_cost,
                };
                for (name, cost) in costs {
                    table.entry(name).or_default().push(cost);
                }
            }
            for work in FIXED_WORK {
                let measured = whole_cost(work, &file.path, &running.programs);
                whole
                    .entry((observer.key(), work.key()))
                    .or_default()
                    .push(measured);
            }
            if observer == Observer::Envelope {
                agent_rss.extend(running.peak_rss_mib());
            }
            let _ = running.started;
            running.stop();
        }
    }
    drop(veth);

    // What the building blocks of a probe cost on this machine: one bpftrace program on
    // block_rq_issue at a time, under the same fio load.
    let primitives: Vec<Value> = PRIMITIVES
        .iter()
        .map(|(what, script)| {
            let (ns, events) = primitive_cost(script, &file.path);
            json!({"what": what, "ns_per_event": (ns * 10.0).round() / 10.0, "events": events})
        })
        .collect();

    // 4: accuracy, storage. envelope's probes (loaded here) and the reference watch the same
    // fio run; fio's own completion percentiles are the truth. 512 KiB reads at depth 32: the
    // device's time dominates fio's CPU time (at 4 KiB, completion latency on this VM is mostly
    // fio's own CPU, which no block-layer tool sees).
    let reference = Running::start(Observer::Reference, &scratch.0);
    let probes = load_probes();
    let before = probes.snapshot().unwrap();
    let started = Instant::now();
    let report = fio(&file.path, "512k", 32, 10);
    let (_, window) = window_since(&probes, &before, started.elapsed());
    let (dev_major, dev_minor) = file.device();
    let device = window
        .storage
        .devices
        .iter()
        .find(|d| (d.major, d.minor) == (dev_major, dev_minor) || d.ops > 1000)
        .expect("the scratch file's device in envelope's window");
    let reads = device
        .operations
        .iter()
        .find(|o| o.operation == "read")
        .expect("reads");
    let truth = fio_clat_ms(&report);
    drop(probes);
    let reference_output = reference.stop();
    let reference_block = parse_log2(&reference_output, "block_usecs");
    let reference_quantile = |q: f64| log2_quantile(&reference_block, q).map(|us| us / 1000.0);
    let storage_accuracy = json!({
        "load": "fio randread 512k, iodepth 32, direct, 10 s",
        "fio_clat_ms": {"p50": truth.0, "p95": truth.1, "p99": truth.2},
        "envelope_ms": {"p50": reads.latency.p50_ms, "p95": reads.latency.p95_ms, "p99": reads.latency.p99_ms},
        "reference_log2_ms": {"p50": reference_quantile(0.5), "p95": reference_quantile(0.95), "p99": reference_quantile(0.99)},
    });

    // 4: accuracy, RTT: a tbf queue on a veth pair; the kernel's srtt from `ss -ti` is the truth.
    let pair = VethPair::create("8mbit", "400ms");
    let server_address = SocketAddrV4::new(pair.server_address, 5201);
    let reference = Running::start(Observer::Reference, &scratch.0);
    let probes = load_probes();
    let server = pair.spawn_sink_server(server_address, Some(65536));
    let client = VethPair::in_namespace(&pair.client_namespace, move || {
        let mut stream = TcpStream::connect(server_address).expect("connect across the veth");
        let chunk = vec![1u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            stream.write_all(&chunk).expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let before = probes.snapshot().unwrap();
    let sampled = Instant::now();
    let mut ss_samples = Vec::new();
    while sampled.elapsed() < Duration::from_secs(5) {
        ss_samples.extend(VethPair::ss_rtt_ms(&pair.client_namespace, server_address));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, window) = window_since(&probes, &before, sampled.elapsed());
    client.join().expect("client");
    server.join().expect("server");
    drop(probes);
    let reference_output = reference.stop();
    let peer = window
        .network
        .peers
        .iter()
        .find(|p| p.peer == server_address.to_string())
        .expect("the veth peer");
    let ss_p50 = median(&mut ss_samples.clone());
    ss_samples.sort_by(f64::total_cmp);
    let ss_quantile = |q: f64| ss_samples[((ss_samples.len() - 1) as f64 * q).round() as usize];
    let reference_rtt = parse_log2(&reference_output, "srtt_usecs[5201]");
    let rtt_accuracy = json!({
        "load": "bulk TCP through tbf 8mbit (queue 400 ms) on a veth pair, receive window ~64 KiB",
        "ss_srtt_ms": {"p50": ss_p50, "p95": ss_quantile(0.95), "p99": ss_quantile(0.99), "samples": ss_samples.len()},
        "envelope_ms": {"p50": peer.rtt_p50_ms, "p95": peer.rtt_p95_ms, "p99": peer.rtt_p99_ms, "samples": peer.rtt_samples},
        // Per remote port, as `tcprtt -p` would (the only flow to port 5201 is this one).
        "reference_log2_ms": {
            "p50": log2_quantile(&reference_rtt, 0.5).map(|us| us / 1000.0),
            "p95": log2_quantile(&reference_rtt, 0.95).map(|us| us / 1000.0),
            "p99": log2_quantile(&reference_rtt, 0.99).map(|us| us / 1000.0),
        },
    });
    drop(pair);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");

    // Results.
    let med = |values: &[f64]| median(&mut values.to_vec());
    // Per program: ns per event over all rounds, and the floor (an empty program on the same
    // tracepoint under the same load) it is compared against.
    let per_event = |runs: &[(f64, u64)]| {
        let events: u64 = runs.iter().map(|r| r.1).sum();
        (
            runs.iter().map(|r| r.0 * r.1 as f64).sum::<f64>() / events.max(1) as f64,
            events,
        )
    };
    let floor_all: Costs =
        floor_cost
            .values()
            .flatten()
            .fold(BTreeMap::new(), |mut all, (name, runs)| {
                all.entry(name.clone())
                    .or_insert_with(Vec::new)
                    .extend(runs);
                all
            });
    // bpftrace's programs carry the kernel's 15-character names, envelope's their full ones.
    let floor_of = |floor: &BTreeMap<String, Vec<(f64, u64)>>, name: &str| {
        // The BTF programs are `<tracepoint>_btf`; the floor is an empty program there.
        let name = name.strip_suffix("_btf").unwrap_or(name);
        let short: String = name.chars().take(15).collect();
        floor
            .get(&short)
            .or_else(|| floor.get(name))
            .map(|runs| per_event(runs).0)
    };
    let round1 = |value: f64| (value * 10.0).round() / 10.0;
    let costs = |table: &BTreeMap<String, Vec<(f64, u64)>>,
                 floor: &BTreeMap<String, Vec<(f64, u64)>>|
     -> Value {
        table
            .iter()
            .map(|(name, runs)| {
                let (ns, events) = per_event(runs);
                let floor_ns = floor_of(floor, name);
                (
                    name.clone(),
                    json!({
                        "ns_per_event": round1(ns),
                        "events": events,
                        "floor_ns": floor_ns.map(round1),
                        "net_ns": floor_ns.map(|f| round1(ns - f)),
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    // Weighted by events: (gross, floor, net). The floor is weighted by the measured
    // program's own event mix; programs without a floor count their gross cost as net.
    let weighted = |table: &BTreeMap<String, Vec<(f64, u64)>>,
                    floor: &BTreeMap<String, Vec<(f64, u64)>>| {
        let (mut time, mut floor_time, mut events) = (0.0, 0.0, 0u64);
        for (name, runs) in table {
            let (ns, n) = per_event(runs);
            time += ns * n as f64;
            floor_time += floor_of(floor, name).unwrap_or(0.0) * n as f64;
            events += n;
        }
        let events = events.max(1) as f64;
        json!({
            "gross": round1(time / events),
            "floor": round1(floor_time / events),
            "net": round1((time - floor_time) / events),
        })
    };
    // Slowdown per round against the no-agent run of the same round (they ran a minute
    // apart), then the median over rounds, with the range to show the noise.
    let per_round = |table: &BTreeMap<&str, Vec<f64>>, observer: Observer| -> Vec<f64> {
        table[observer.name()]
            .iter()
            .zip(&table[Observer::None.name()])
            .map(|(with, without)| (1.0 - with / without) * 100.0)
            .collect()
    };
    let slowdown = |table: &BTreeMap<&str, Vec<f64>>, observer: Observer| {
        let rounds = per_round(table, observer);
        json!({
            "median": med(&rounds),
            "min": rounds.iter().copied().fold(f64::INFINITY, f64::min),
            "max": rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            "rounds": rounds,
        })
    };
    let empty = Costs::new();
    let per_load = |value: &dyn Fn(Load) -> Value| -> Value {
        LOADS
            .iter()
            .map(|&load| (load.key().to_string(), value(load)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let envelope_of = |load: Load| envelope_cost.get(load.key()).unwrap_or(&empty);
    let floor_of_load = |load: Load| floor_cost.get(load.key()).unwrap_or(&empty);
    let observers_json = |value: &dyn Fn(Observer) -> Value| -> Value {
        [
            Observer::Envelope,
            Observer::EnvelopeClassic,
            Observer::Reference,
            Observer::Floor,
        ]
        .iter()
        .map(|&observer| (observer.key().to_string(), value(observer)))
        .collect::<serde_json::Map<_, _>>()
        .into()
    };
    let results = json!({
        "machine": {
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": cpus,
        },
        "rounds": ROUNDS,
        "loads": per_load(&|load| json!(load.label())),
        "probe_cost": {
            "envelope": per_load(&|load| costs(envelope_of(load), floor_of_load(load))),
            "envelope_weighted_ns_per_event": per_load(&|load| weighted(envelope_of(load), floor_of_load(load))),
            "reference_bpftrace": costs(&reference_cost, &floor_all),
            "reference_weighted_ns_per_event": weighted(&reference_cost, &floor_all),
            "floor_bpftrace": per_load(&|load| costs(floor_of_load(load), &empty)),
        },
        "agent": {
            "cpu_percent_of_one_core": agent_cpu.iter().map(|(k, v)| (k.to_string(), json!(med(v)))).collect::<serde_json::Map<_, _>>(),
            "peak_rss_mib": agent_rss.iter().copied().fold(0.0, f64::max),
        },
        "workload": {
            // fio in IOPS, iperf3 in Gbit/s.
            "results": per_load(&|load| {
                let scale = if load == Load::Storage { 1.0 } else { 1e9 };
                workload_runs[load.key()]
                    .iter()
                    .map(|(observer, runs)| {
                        let runs: Vec<f64> = runs.iter().map(|v| v / scale).collect();
                        (observer.to_string(), json!({"median": med(&runs), "runs": runs}))
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            }),
            "slowdown_percent": observers_json(&|observer| per_load(&|load| slowdown(&workload_runs[load.key()], observer))),
            "probe_cpu_percent_of_machine": observers_json(&|observer| per_load(&|load| {
                json!(med(probe_cpu.get(&(observer.name(), load.key())).map_or(&[][..], Vec::as_slice)))
            })),
        },
        "whole_cost": whole_cost_json(&whole),
        "primitives_on_block_rq_issue": primitives,
        "accuracy": {"storage": storage_accuracy, "rtt": rtt_accuracy},
        // Written by bench_cuda_uprobes, which runs first (tests run in name order).
        "cuda_uprobes": std::fs::read(workspace().join("target/bench/cuda.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .unwrap_or(Value::Null),
    });
    let out = workspace().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
    std::fs::write(workspace().join("BENCHMARKS.md"), render(&results)).unwrap();
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
    // The run itself is the result; sanity only: envelope saw the load it was benchmarked on.
    assert!(
        LOADS.iter().all(|load| !envelope_of(*load).is_empty()),
        "no envelope program ran under some load"
    );
    let _ = error_percent;
}

fn number(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "–".to_string(), |v| format!("{v:.3}"))
}

/// BENCHMARKS.md from the results.
fn render(r: &Value) -> String {
    let mut md = String::new();
    let w = &mut md;
    use std::fmt::Write as _;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `cargo xtask bench` (root; raw figures in `target/bench/results.json`). Machine: kernel {}, {} CPUs, shared and noisy, so each round runs every load under no agent / envelope / reference / empty programs in turn, {} rounds, and medians are reported. The reference is bpftrace running bcc's biolatency and tcprtt on the same tracepoints with log2 histograms: bcc itself cannot run here (no kernel headers, kprobes do not attach).\n",
        r["machine"]["kernel"].as_str().unwrap_or("?"),
        r["machine"]["cpus"],
        r["rounds"]
    );
    let _ = writeln!(w, "## Probe cost (BPF run-time statistics, ns per event)\n");
    let _ = writeln!(
        w,
        "The kernel's statistics time each run with two clock reads around the program, so even an empty program costs something; on this VM that floor is large. Each envelope program is shown as measured (gross), next to an empty bpftrace program on the same tracepoint under the same load (floor), and the difference (net): what envelope's own work costs per event.\n"
    );
    let _ = writeln!(
        w,
        "| load | program | gross | floor | net | events |\n|---|---|---|---|---|---|"
    );
    let cell = |v: &Value, f: &str| {
        Some(&v[f])
            .filter(|v| !v.is_null())
            .map_or("–".to_string(), Value::to_string)
    };
    for load in LOADS {
        for (name, cost) in r["probe_cost"]["envelope"][load.key()]
            .as_object()
            .into_iter()
            .flatten()
        {
            let _ = writeln!(
                w,
                "| {} | `{name}` | {} | {} | {} | {} |",
                load.label(),
                cell(cost, "ns_per_event"),
                cell(cost, "floor_ns"),
                cell(cost, "net_ns"),
                cell(cost, "events"),
            );
        }
    }
    let e = &r["probe_cost"]["envelope_weighted_ns_per_event"];
    let reference = &r["probe_cost"]["reference_weighted_ns_per_event"];
    let weighted_line = |v: &Value| format!("{} / {} / {} ns", v["gross"], v["floor"], v["net"]);
    let _ = writeln!(
        w,
        "\nWeighted by events, gross / floor / net: envelope {}; reference (bpftrace: block_io_start, block_rq_complete and tcp_probe, all loads) {}. Target: at or below 100 ns.\n",
        LOADS
            .iter()
            .map(|load| format!("{} ({})", weighted_line(&e[load.key()]), load.label()))
            .collect::<Vec<_>>()
            .join(", "),
        weighted_line(reference),
    );
    if let Some(primitives) = r["primitives_on_block_rq_issue"].as_array() {
        let empty = primitives
            .first()
            .and_then(|p| p["ns_per_event"].as_f64())
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            w,
            "What the building blocks cost on this machine (one bpftrace program at a time on `block_rq_issue`, under fio):\n\n| program | ns per event | over the empty program |\n|---|---|---|"
        );
        for primitive in primitives {
            let ns = primitive["ns_per_event"].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                w,
                "| {} | {ns:.0} | {:.0} |",
                primitive["what"].as_str().unwrap_or("?"),
                ns - empty
            );
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(
        w,
        "## Agent cost (`envelope run`, window 10 s, export off)\n"
    );
    let _ = writeln!(w, "| condition | CPU, % of one core (median) |\n|---|---|");
    for (k, v) in r["agent"]["cpu_percent_of_one_core"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let _ = writeln!(w, "| {k} | {} |", number(v));
    }
    let _ = writeln!(
        w,
        "\nPeak RSS: {} MiB. Targets: at or below 1% of one core and 40 MiB.\n",
        number(&r["agent"]["peak_rss_mib"])
    );
    let _ = writeln!(w, "## Workload slowdown\n");
    let workload = &r["workload"];
    let _ = writeln!(
        w,
        "| observer | {} |\n|---|---|---|---|",
        LOADS
            .iter()
            .map(|load| {
                let unit = if *load == Load::Storage {
                    "IOPS"
                } else {
                    "Gbit/s"
                };
                format!("{} {unit} (median)", load.label())
            })
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for observer in [
        Observer::None,
        Observer::Envelope,
        Observer::EnvelopeClassic,
        Observer::Reference,
        Observer::Floor,
    ] {
        let _ = writeln!(
            w,
            "| {} | {} |",
            observer.name(),
            LOADS
                .iter()
                .map(|load| number(&workload["results"][load.key()][observer.name()]["median"]))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let s = &workload["slowdown_percent"];
    let range = |who: &str, load: Load| {
        let v = &s[who][load.key()];
        format!(
            "{}% ({} to {})",
            number(&v["median"]),
            number(&v["min"]),
            number(&v["max"])
        )
    };
    let row = |value: &dyn Fn(Load) -> String| {
        LOADS
            .iter()
            .map(|load| value(*load))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let header = LOADS
        .iter()
        .map(|load| load.label())
        .collect::<Vec<_>>()
        .join(" | ");
    let _ = writeln!(
        w,
        "\nSlowdown vs no agent, per round against that round's no-agent run, median (range over rounds). Negative = faster than without (noise). Target: at or below 1% and no worse than the reference.\n\n| observer | {header} |\n|---|---|---|---|\n| envelope run | {} |\n| envelope run, classic tracepoints | {} |\n| bpftrace (bcc-style log2) | {} |\n| empty programs (floor) | {} |\n",
        row(&|load| range("envelope", load)),
        row(&|load| range("envelope_classic", load)),
        row(&|load| range("reference", load)),
        row(&|load| range("floor", load)),
    );
    let cpu_share = &workload["probe_cpu_percent_of_machine"];
    let share = |who: &str| row(&|load| format!("{}%", number(&cpu_share[who][load.key()])));
    let _ = writeln!(
        w,
        "CPU time the observer's programs ran (BPF statistics) while the load ran, as a share of the machine ({} CPUs), median over rounds: the part of the slowdown the probes cause, without the throughput's noise.\n\n| observer | {header} |\n|---|---|---|---|\n| envelope run | {} |\n| bpftrace (bcc-style log2) | {} |\n| empty programs (floor) | {} |\n",
        r["machine"]["cpus"],
        share("envelope"),
        share("reference"),
        share("floor"),
    );
    render_whole_cost(w, r);
    render_cuda_uprobes(w, r);
    let _ = writeln!(w, "## Accuracy\n");
    let a = &r["accuracy"];
    let _ = writeln!(
        w,
        "Storage ({}):\n",
        a["storage"]["load"].as_str().unwrap_or("")
    );
    let _ = writeln!(w, "| | P50 ms | P95 ms | P99 ms |\n|---|---|---|---|");
    for (label, key) in [
        ("fio completion latency (truth)", "fio_clat_ms"),
        ("envelope", "envelope_ms"),
        ("reference (log2)", "reference_log2_ms"),
    ] {
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} |",
            number(&a["storage"][key]["p50"]),
            number(&a["storage"][key]["p95"]),
            number(&a["storage"][key]["p99"])
        );
    }
    let _ = writeln!(w, "\nRTT ({}):\n", a["rtt"]["load"].as_str().unwrap_or(""));
    let _ = writeln!(w, "| | P50 ms | P95 ms | P99 ms |\n|---|---|---|---|");
    for (label, key) in [
        ("kernel srtt via ss -ti (truth)", "ss_srtt_ms"),
        ("envelope", "envelope_ms"),
        ("reference (log2)", "reference_log2_ms"),
    ] {
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} |",
            number(&a["rtt"][key]["p50"]),
            number(&a["rtt"][key]["p95"]),
            number(&a["rtt"][key]["p99"])
        );
    }
    let _ = writeln!(
        w,
        "\nTarget: P50/P95/P99 within 10% of the independent measurement.\n"
    );
    let _ = writeln!(w, "## Against the targets\n");
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let worst_load = |what: &str| {
        LOADS
            .iter()
            .map(|load| e[load.key()][what].as_f64().unwrap_or(f64::NAN))
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let (weighted, weighted_gross) = (worst_load("net"), worst_load("gross"));
    let cpu = r["agent"]["cpu_percent_of_one_core"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_f64())
        .fold(0.0, f64::max);
    let rss = r["agent"]["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
    let worst_slowdown = |who: &str| {
        LOADS
            .iter()
            .map(|load| s[who][load.key()]["median"].as_f64().unwrap_or(f64::NAN))
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let worst_envelope = worst_slowdown("envelope");
    let worst_reference = worst_slowdown("reference");
    let accuracy_errors: Vec<f64> = [("storage", "fio_clat_ms"), ("rtt", "ss_srtt_ms")]
        .iter()
        .flat_map(|(kind, truth)| {
            ["p50", "p95", "p99"].into_iter().filter_map(move |q| {
                let truth = a[kind][truth][q].as_f64()?;
                let measured = a[kind]["envelope_ms"][q].as_f64()?;
                Some(((measured - truth) / truth * 100.0).abs())
            })
        })
        .collect();
    let worst_accuracy = accuracy_errors.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        w,
        "| target | measured | |\n|---|---|---|\n| probe cost <= 100 ns/event | {weighted:.0} ns net of the empty-program floor ({weighted_gross:.0} ns gross; worst load, weighted) | {} |\n| agent <= 1% of a core | {cpu:.2}% (worst condition) | {} |\n| agent <= 40 MiB RSS | {rss:.1} MiB | {} |\n| slowdown <= 1% | {worst_envelope:.1}% (worst load, median over rounds) | {} |\n| slowdown no worse than the reference | reference {worst_reference:.1}% | {} |\n| P50/P95/P99 within 10% | worst {worst_accuracy:.1}% ({} quantiles) | {} |\n",
        verdict(weighted <= 100.0),
        verdict(cpu <= 1.0),
        verdict(rss <= 40.0),
        verdict(worst_envelope <= 1.0),
        verdict(worst_envelope <= worst_reference + 1.0),
        accuracy_errors.len(),
        verdict(!accuracy_errors.is_empty() && worst_accuracy <= 10.0),
    );
    md.push_str(FINDINGS);
    md
}

/// The CUDA uprobes' table (from `bench_cuda_uprobes`), when that part ran.
fn render_cuda_uprobes(w: &mut String, r: &Value) {
    use std::fmt::Write as _;
    let cuda = &r["cuda_uprobes"];
    let Some(steps) = cuda["steps"].as_object() else {
        return;
    };
    let _ = writeln!(
        w,
        "## CUDA uprobes (opt-in)\n\nThe stand-in CUDA library of `tests/fake-cuda`, called in a tight loop by `fake-cuda-app` ({} calls per step, {} rounds alternating probes off and `cuda_probes = \"sync+launch\"`, medians). `added` is the whole cost a call pays: the breakpoint trap, the entry and return programs and the return-address swap. `BPF` is the two programs' own run time per call (BPF statistics), the rest is the kernel's uprobe machinery. A call whose function's first instruction the kernel cannot emulate is single-stepped (the stand-in's `cuLaunchKernel` starts with a store below the stack pointer).\n\n| call | off ns/call | on ns/call | added ns/call | loop slowdown |\n|---|---|---|---|---|",
        cuda["calls_per_step"], cuda["rounds"]
    );
    for (step, figures) in steps {
        let off = figures["off_ns"].as_f64().unwrap_or(f64::NAN);
        let on = figures["on_ns"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            w,
            "| {step} | {off:.0} | {on:.0} | {:.0} | {:.1}x |",
            on - off,
            on / off
        );
    }
    let launch = &steps.get("launch").cloned().unwrap_or(Value::Null);
    let launch_added_ns = launch["on_ns"].as_f64().unwrap_or(f64::NAN)
        - launch["off_ns"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        w,
        "\nBPF run time per probed call (entry + return programs): {} ns. At {launch_added_ns:.0} ns a launch, counting 10,000 launches a second costs {:.1}% of a core: `sync+launch` is for diagnosis, `sync` (synchronisations, copies and allocations, which last microseconds to milliseconds) for always-on use.\n",
        number(&cuda["bpf_ns_per_call"]),
        launch_added_ns * 10_000.0 / 1e9 * 100.0
    );
}

/// The whole-cost table: machine CPU per operation of fixed work under each observer.
fn render_whole_cost(w: &mut String, r: &Value) {
    use std::fmt::Write as _;
    let whole = &r["whole_cost"];
    if whole.as_object().is_none_or(|o| o.is_empty()) {
        return;
    }
    let _ = writeln!(
        w,
        "## Whole cost (what the workload pays)\n\nA fixed amount of work, run as its own process under each observer in turn ({} rounds, medians), timed as the whole machine's busy CPU (user, system and interrupt time from /proc/stat). This includes what BPF run-time statistics leave out: the kernel filling a classic tracepoint's record before the program runs, the dispatch to the program, and work in interrupt context. `added` is against no observer in the same rounds; per event divides it by the observer's own program runs per operation. `lost` is the runs the kernel skipped (recursion_misses) over all rounds.\n\n| work | observer | CPU µs/op | added µs/op | events/op | added ns/event | lost events |\n|---|---|---|---|---|---|---|",
        r["rounds"]
    );
    for work in FIXED_WORK {
        let entry = &whole[work.key()];
        for observer in [
            Observer::None,
            Observer::Envelope,
            Observer::EnvelopeClassic,
            Observer::Reference,
            Observer::Floor,
        ] {
            let o = &entry["observers"][observer.key()];
            if o.is_null() {
                continue;
            }
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} |",
                work.label(),
                observer.name(),
                number(&o["cpu_us_per_op"]),
                number(&o["added_us_per_op"]),
                number(&o["events_per_op"]),
                o["added_ns_per_event"]
                    .as_f64()
                    .map_or("–".to_string(), |v| format!("{v:.0}")),
                o["lost_events"],
            );
        }
    }
    let _ = writeln!(w);
}

/// What the numbers mean, and what was done about the missed targets (kept with the code
/// that measures them; update it when the numbers move).
const FINDINGS: &str = "## Findings

### aya-log and bpf_loop (run of 2026-11-30)

One full run after the probes gained aya-log (level-gated debug events) and the BTF block
completion its bpf_loop walk of long merged requests; the tables above are that run.

- Lost events: none on the BTF probes, in any load or fixed work. Classic tracepoints lost
  582 runs in 5 x 48,000 direct reads, the bpftrace reference 74, empty programs 65.
- BPF run time net of the floor, weighted: 188.5 ns under fio (185.0 in the previous run),
  219.4 over loopback (229.0), 97.1 over veth (98.0); the reference 96.9 (100.4). The block
  programs moved within the runs' spread: `block_bio_queue_btf` 119.6 ns (116.3),
  `block_rq_issue_btf` 235.9 (227.5), `block_rq_complete_btf` 188.8 (190.5). At the default
  log level the verifier removes aya-log's branches: what is left is a load and compare on the
  rare paths and a stack move or two from register allocation (`block_rq_issue_btf` is 1,440
  bytes after the verifier against 1,384 without aya-log; README, \"The probes' own
  diagnostics\"). The bpf_loop walk runs only for requests of more than 4 bios.
- The programs' CPU share under fio: 3.59% of the machine against the reference's 1.80%
  (3.77 / 1.81 in the previous run): still not at or below the reference, for the reason
  given below (5.3 events per direct read against 2).
- The whole-cost table of this run is noise-dominated: envelope added 2.08 us per direct read
  (0.21 in the previous run) while its BPF run time per read did not change, and several
  observers came out cheaper than no observer. Its resolution is the CPU accounting tick (see
  below); compare the BPF statistics, or several runs.
- The bench itself hung once: bpftrace caught the SIGINT that ends an observer and kept
  waiting in epoll for ten minutes until a second SIGINT. Observers are now sent SIGINT every
  5 s and killed after 30 s.

### BTF raw tracepoints (runs of 2026-11-29)

Two full runs; the tables above are the second. These runs are on a faster VM than the
earlier ones below (empty-program floor 32-37 ns per event instead of 76-90), so compare
within a run, not across.

- Lost events: envelope's probes, now BTF raw tracepoints, lost none in either run, in any
  load or fixed work (recursion_misses, whole-cost table). The same envelope on classic
  tracepoints lost 170-399 runs in 5 x 48,000 direct reads, the bpftrace reference (classic
  tracepoints) 56-106: a classic tracepoint program is skipped whenever any other tracing
  program runs on that CPU, a raw tracepoint program only when the same program is already
  running there.
- Whole cost per event (machine CPU, fixed work, same rounds), BTF against classic: 238-277
  against 278-516 ns per event of a direct read, 169-539 against 636-647 per event of a pipe
  round trip, 213-751 against 293-886 per event of a TCP request/response. Lower in all six
  comparisons: the raw tracepoints skip the trace record the kernel fills and the perf
  dispatch before a classic program runs, which BPF run-time statistics never showed. The
  spread between runs is the measurement's: its resolution is the kernel's CPU accounting
  tick (10 ms on runs of about a second), so differences under ~0.4 us per operation, and
  the negative figures, are noise. Against the reference per operation: envelope handles
  5-12 events per operation where the reference handles 0-2 (envelope attributes time and
  owners; the reference only times block I/O and samples RTT), so it adds more per
  operation. The CPU share of its programs under fio is 2.8-3.1% of the machine against the
  reference's 1.6-1.75%: not at or below the reference.
- BPF run time net of the floor, weighted by events: 141-146 ns under fio, 167-187 ns under
  iperf3 over loopback, 90-92 ns over the veth pair (the reference: 88-98 ns). The 100 ns
  target holds on the veth load only. What prevents it elsewhere, by the building blocks
  measured above (clock ~31 ns, hash lookup ~23 ns, in-place update ~50 ns, insert and
  delete ~110 ns over the empty program): `sched_switch_btf` (173-435 ns net) looks up the
  tracked process and the thread's state and updates the per-process time twice;
  `block_bio_queue_btf` (~200 ns net) reads the clock, the tracked process, the submitter's
  cgroup id and command name; `block_rq_complete_btf` (~160 ns) one device value with two
  histograms and the process's I/O. Each counter and bucket is now a locked add (raw
  tracepoints may nest on one CPU), a few ns each.
- Peak RSS: the first of these runs measured 79.7 MiB: parsing the kernel's BTF (6 MB,
  every type and name) took ~60 MB for a moment inside the agent. It now runs in a
  short-lived child process (`envelope btf-offsets`) and the loader's own parse is dropped
  before aya's second one: 29.6 MiB peak in the second run, 18 MiB resident after start-up
  (classic tracepoints: 25 / 9).

### Earlier runs (2026-11-27, classic tracepoints)

Figures below are from the runs of 2026-11-27 (three full runs after the changes listed).

- Accuracy: envelope's log-linear histograms (16 buckets per power of two) land within a few
  percent of fio's own completion percentiles and of the kernel's srtt; the bcc-style log2
  reference on the same events is off by tens of percent at P95/P99 (and by up to 2x by
  construction).
- Agent: the userspace side does no per-event work (it reads maps once a window), so its CPU
  stays a fraction of a percent of one core and its memory is the maps' mirror plus the
  runtime.
- Why the 100 ns target is missed here: on this VM every building block of a probe costs
  85-95 ns (reading the clock, one hash lookup: the table above), an in-place hash update
  ~230-250 ns and an insert plus delete ~480-560 ns, several times the published bare-metal
  figures (bcc/ebpf_exporter: +35 to +96 ns for a whole tracepoint program with map work).
  The guest kernel reports `spec_rstack_overflow: Vulnerable: Safe RET, no microcode` and
  runs nested (`nested_pvm=1` on its command line); return thunks and nested paging would make
  every call, return and cold memory access slow, which fits, but that cause is our
  inference, not measured. A probe that reads the clock and looks one thing up therefore
  costs ~180 ns net here whatever it is written in. The cheapest envelope program,
  `block_rq_issue` (clock plus one array slot), is at ~85 ns net; the weighted averages are
  ~305-355 ns net under fio and iperf3 over loopback and ~205 ns over the veth pair, against
  ~380-470 ns net for the reference's three bpftrace programs, which do less per event.
- What was done about it (gross weighted cost before: 755 ns under fio, 674 ns under iperf3;
  after: ~390-440 ns, ~280 ns on the veth load): `raw_syscalls:sys_enter` (one probe per
  system call of the node) replaced by reading the system call from the sleeping thread's
  saved registers, and only for interruptible sleeps; tracepoint fields read straight from
  the record instead of one `bpf_probe_read_kernel` call per field (the helper path remains
  for other kernels' layouts, and `ENVELOPE_TRACEPOINT_READS=helper` tests it); block
  requests in flight kept in a fixed table of slots instead of an LRU hash with an insert and
  a delete per request (the largest single saving); both latency histograms and the counters
  of a device in one per-CPU value (one lookup per completion instead of three); the
  tracked-process record carries the last I/O and socket times (one lookup instead of up to
  three); no counter lookup per ACK (the RTT histogram counts the samples); the zeroed
  histogram fetched only for new keys; the clock read only for tracked threads.
- Left, largest first: `block_bio_queue` (~500-560 ns net: clock, pid, tracked lookup, cgroup
  id and command name of the submitter, the slot); `sched_switch` for tracked threads
  (~440-880 ns net: the thread's state twice, the per-process time twice). Accumulating time
  per thread instead of per process would save two lookups per switch, but a thread's exit
  would then move its whole lifetime between maps, and a window read racing that move would
  count it twice: not done. Raw tracepoints (`BPF_PROG_TYPE_RAW_TRACEPOINT`) for `tcp_probe`
  and `block_rq_complete` would also skip the record the kernel fills before a classic
  tracepoint program runs, a cost outside `run_time_ns`.
- Slowdown: the throughput comparison cannot resolve 1% on this VM. Rounds collapse for every
  observer alike when a neighbour is busy (fio between 16k and 63k IOPS in one run, with or
  without probes), per-round slowdowns range over tens of percent in both directions, and the
  empty programs came out \"faster than no agent\" in some runs. The CPU share is the robust
  figure: envelope's programs used ~3% of this 2-CPU machine while fio ran at ~50-56k IOPS
  (the reference ~2.6-2.9%, empty programs ~0.8%), ~2.5% during iperf3 over loopback (the
  reference ~1.1%: it runs one program there, envelope also attributes time and owners) and
  ~3.5% over the veth pair (the reference ~2.9%). The cost is per event, so the same event
  rates on a 32-CPU GPU node would take ~0.2% of it (arithmetic, not measured). A bare-metal
  GPU node is where the 1% target should be judged.

## Soak

`tests/tests/soak.rs` (root, 90 s in CI; `cargo xtask soak --minutes 30` for the long mode)
runs `envelope run` (window 1 s, export every window) under fio random 4 KiB direct reads,
iperf3 bulk TCP on loopback (paced at 200 Mbit/s so the other loads keep their CPU), a
loopback request/response stream, short TCP connections as fast as they go, a shell starting
`/bin/true` in a loop (thousands of processes per second), a SIGHUP every 10 s, a budget that
fires with its action, and the collector stopped for 15 s halfway. From 20 s on it samples the
daemon every 5 s. It fails when the second half of the run peaks higher than the first half
(RSS, plus 10% and 4 MiB), when RSS passes 128 MiB, when open files or threads grow by more
than 2, when a plain hash map (live things only) grows past its first-half peak, or when the
reads done during the outage do not reach the collector afterwards.

### 30 minutes (2026-11-30, at 320b8ae's code, 2-vCPU VM, kernel 6.18)

| | at 20 s | 20 s - 8 min | 8 - 30 min | at 30 min |
|---|---|---|---|---|
| RSS | 50.2 MiB | rises to 59.9 MiB | 54.3-66.3 MiB, no trend (peak 62.6 MiB in the first half of the run, 66.3 in the second) | 63.2 MiB |
| open fds | 64 | 63-65 | 62-65 | 63 |
| threads | 4 | 4 | 4 | 4 |
| `TRACKED_PROCESSES` (hash, 32,768) | 33 | 17-2,052 | 17-28 | 19 |
| `STORAGE_DEVICES` (per-CPU hash, 80) | 4 | 4-8 | 4 | 4 |
| `TIME_BY_PROCESS` (LRU, 8,192) | 7,947 | full | full | 8,029 |
| `PEER_RTT` (LRU, 512) | 343 | 271-841 | | 466 |
| `PROCESS_IO` (LRU, 4,096) | 17 | rises to 430 | 430-469 | 469 |
| `PEER_COUNTERS` (LRU, 1,024) / `REQUEST_COUNTERS` (1,024) | 3 / 8 | rise to 78 / 106 | 78 / 106 | 78 / 106 |
| `THREAD_STATES` (LRU, 65,536) | 24 | 15-60 | 20-21 | 21 |

- 180 SIGHUP reloads; the collector outage lasted 12 s (13 failed exports), and the first
  export after it carried the reads fio did meanwhile.
- The rise in the first 8 minutes follows the per-process and per-peer state filling (the
  LRU maps above, and the agent's series for them up to its cardinality limits); after it RSS
  moves within 12 MiB and returns memory (54.3 MiB at 23 min). An earlier 30-minute run of
  the same load read 49.0 -> 63.2 MiB by 8 min, then 56.5-67.5 MiB to the end. The first sample had been the test's baseline (first + 20% + 4 MiB),
  which that run failed at 67.5 MiB: the criterion is now first half against second half.
- Entry counts are read with BPF_MAP_GET_NEXT_KEY while the probes write: a key deleted under
  the walk restarts it, so a count can exceed the capacity (`TIME_BY_PROCESS` read 9,263 of
  8,192 once). They show the order of magnitude, not an exact figure.
- `TRACKED_PROCESSES` reached 2,052 during the first minutes (processes of the tracked shell
  loop alive at the sampling instant and not yet untracked) and held at 17-28 from 8 minutes on.
  The fork probe then also tracked new threads of tracked processes by their thread id,
  entries that nothing removed (userspace's refresh only knows processes); it no longer does
  (BTF), and a thread's entry goes at its exit (classic).

### 90 seconds (CI)

The figures of an earlier 90 s run (before iperf3 was added): RSS 36.9-37.2 MiB at 20 s and
42.3-45.0 MiB at 90 s (the step comes with the outage: queued events and the reconnecting
channel), fds 55-57, threads 4, `TRACKED_PROCESSES` 14-15, `TIME_BY_PROCESS` ~8,000-8,180.
With iperf3: RSS 51.1 MiB at 20 s and 51.9 MiB at 90 s, fds 62-63, threads 4.

The first run of the soak found a leak: processes tracked at fork were never untracked, and
`TRACKED_PROCESSES` filled its 32,768 entries in 70 s of process churn (10,085 at 20 s,
32,423 at 90 s), after which new processes were not tracked at all; the exit probe now
removes a process when its leader exits. Under this churn the LRU maps sit at their capacity
by design: `TIME_BY_PROCESS` evicts the times of exited processes before the window reads
them when thousands start per second, so very short-lived processes can go unaccounted
(bounded memory, a known blind spot).
";

/// Re-renders BENCHMARKS.md from the last run's target/bench/results.json (after editing the
/// findings, without measuring again): `cargo test -p integration-tests --test bench render -- --ignored`.
#[test]
#[ignore = "renders BENCHMARKS.md from target/bench/results.json"]
fn render_benchmarks_from_the_last_results() {
    let results: Value = serde_json::from_slice(
        &std::fs::read(workspace().join("target/bench/results.json"))
            .expect("no target/bench/results.json: run `cargo xtask bench` first"),
    )
    .expect("results.json");
    let rendered = render(&results);
    assert!(rendered.contains("## Against the targets"));
    std::fs::write(workspace().join("BENCHMARKS.md"), rendered).unwrap();
}
