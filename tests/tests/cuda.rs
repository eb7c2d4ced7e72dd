//! The opt-in CUDA uprobes (root): `envelope diagnose --cuda-probes` against the stand-in CUDA
//! library (tests/fake-cuda), copied under the runtime's and the driver's file names and
//! driven by fake-cuda-app, which reports what it called and how long each step took. Every
//! figure is checked against the program's own: call counts and bytes exactly, times within
//! 10%.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use integration_tests::{
    envelope_binary, fake_cuda_app, fake_cuda_library, root_or_skip, unique_name,
};

/// How far envelope's times may be from the program's: both time the same calls, envelope
/// from the probes' entry to their return, the program around the call.
const TIME_TOLERANCE: f64 = 0.10;

/// Only one scenario at a time: each diagnose probes every process that maps a CUDA library,
/// so two would count each other's calls and compete for the CPUs the spinning one needs.
static SCENARIOS: Mutex<()> = Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    SCENARIOS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Builds (if need be) everything a scenario runs before any clock starts: a cargo build
/// inside a diagnose window would eat into it.
fn prepare() {
    envelope_binary();
    fake_cuda_app();
    fake_cuda_library();
}

/// The fake library copied twice into a fresh directory, as `libcudart.so.12` and
/// `libcuda.so.1`: the agent tells the runtime from the driver by file name and attaches once
/// per file (device and inode), so the two must be two files. Removed on drop.
struct CudaLibraries {
    directory: PathBuf,
    runtime: PathBuf,
    driver: PathBuf,
}

impl CudaLibraries {
    fn create() -> Self {
        let directory = std::env::temp_dir().join(unique_name("envelope-cuda-"));
        std::fs::create_dir_all(&directory).expect("library directory");
        let runtime = directory.join("libcudart.so.12");
        let driver = directory.join("libcuda.so.1");
        for copy in [&runtime, &driver] {
            std::fs::copy(fake_cuda_library(), copy).expect("copy the fake CUDA library");
        }
        Self {
            directory,
            runtime,
            driver,
        }
    }
}

impl Drop for CudaLibraries {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// Waits for a child with a deadline (a hung child fails the test instead of hanging it).
fn wait_with_deadline(
    child: &mut Child,
    what: &str,
    timeout: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// fake-cuda-app, its runtime calling into the driver copy (FAKE_CUDA_DRIVER) as the real
/// libcudart calls libcuda. Its stdout is read on a thread, so a program that hangs fails the
/// test at a deadline; killed on drop.
struct App {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl App {
    /// Starts the program and waits for its `ready` line: both libraries are loaded (and in
    /// its memory map) from then on.
    fn start(libraries: &CudaLibraries, environment: &[(&str, &str)], steps: &[&str]) -> Self {
        let mut command = Command::new(fake_cuda_app());
        command
            .arg("--runtime")
            .arg(&libraries.runtime)
            .arg("--driver")
            .arg(&libraries.driver)
            .args(steps)
            .env("FAKE_CUDA_DRIVER", &libraries.driver)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // Only the test's settings: none inherited from the shell that runs the tests.
        for setting in [
            "FAKE_CUDA_SYNC_US",
            "FAKE_CUDA_SYNC_MODE",
            "FAKE_CUDA_COPY_BYTES_PER_US",
            "FAKE_CUDA_MAX_ALLOC",
        ] {
            command.env_remove(setting);
        }
        command.envs(environment.iter().copied());
        let mut child = command.spawn().expect("start fake-cuda-app");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let app = Self {
            child,
            stdin,
            lines,
        };
        let ready = app.line(Duration::from_secs(10));
        assert_eq!(ready, format!("ready {}", app.pid()));
        app
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn line(&self, timeout: Duration) -> String {
        self.lines.recv_timeout(timeout).unwrap_or_else(|error| {
            panic!("fake-cuda-app printed no line within {timeout:?} ({error})")
        })
    }

    /// Says go and returns the program's report of each step, once it prints `done`.
    fn run_steps(&mut self, timeout: Duration) -> Vec<serde_json::Value> {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").expect("say go");
        stdin.flush().expect("say go");
        let deadline = Instant::now() + timeout;
        let mut steps = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.line(left.max(Duration::from_millis(1)));
            if line == "done" {
                return steps;
            }
            steps.push(serde_json::from_str(&line).unwrap_or_else(|error| {
                panic!("fake-cuda-app printed {line:?}, not a step report: {error}")
            }));
        }
    }

    /// Says go without waiting for the steps' reports: the program is inside its calls from
    /// then on.
    fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").expect("say go");
        stdin.flush().expect("say go");
    }

    /// Closes its stdin, which it waits on after `done`: it exits, and must exit cleanly.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = wait_with_deadline(&mut self.child, "fake-cuda-app", Duration::from_secs(10));
        assert!(status.success(), "fake-cuda-app exited with {status}");
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The report of one step by name (the first, where a name repeats).
fn step<'a>(steps: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("fake-cuda-app reported no step {name}: {steps:#?}"))
}

/// `envelope diagnose --json --cuda-probes MODE` in the background: its stderr collected line
/// by line (and echoed with the time since its start, for --nocapture), its stdout kept for
/// the report; killed on drop.
struct Diagnose {
    child: Child,
    started: Instant,
    duration: Duration,
    log: Arc<Mutex<Vec<String>>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<()>>,
}

impl Diagnose {
    /// `pid`: judge only that process's workload (`--pid`), so whatever else the machine
    /// runs meanwhile cannot push it out of the report's top workloads.
    fn start(seconds: u64, mode: &str, pid: Option<u32>) -> Self {
        let mut command = Command::new(envelope_binary());
        command
            .args(["diagnose", "--json", "--duration", &format!("{seconds}s")])
            .args(["--cuda-probes", mode]);
        if let Some(pid) = pid {
            command.args(["--pid", &pid.to_string()]);
        }
        // diagnose logs at warn by default; the attach and detach lines are info.
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start envelope diagnose");
        let started = Instant::now();
        let mut stdout = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut report = Vec::new();
            let _ = stdout.read_to_end(&mut report);
            report
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        let stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!(
                    "envelope [{:.2} s]: {line}",
                    started.elapsed().as_secs_f64()
                );
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            started,
            duration: Duration::from_secs(seconds),
            log,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Index of the first log line containing `text`.
    fn line_with(&self, text: &str) -> Option<usize> {
        self.log().iter().position(|line| line.contains(text))
    }

    /// Waits until the log has a line containing each of `texts`.
    fn wait_for_lines(&self, what: &str, texts: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while texts.iter().any(|text| self.line_with(text).is_none()) {
            assert!(
                Instant::now() < deadline,
                "envelope did not log {what} within {timeout:?}; its log:\n{}",
                self.log().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to 10 s from the start: a process's map is read again every 5 s, should the
    /// first read have come before it loaded the libraries) until the probes are on both
    /// copies, found in `pid`.
    fn wait_for_attach(&self, libraries: &CudaLibraries, pid: u32) {
        let attached = [
            attach_line(&libraries.runtime, "runtime", pid),
            attach_line(&libraries.driver, "driver", pid),
        ];
        let left = Duration::from_secs(10).saturating_sub(self.started.elapsed());
        self.wait_for_lines("attaching the CUDA probes to both copies", &attached, left);
        eprintln!(
            "CUDA probes on both copies {:.2} s into a {} s window",
            self.started.elapsed().as_secs_f64(),
            self.duration.as_secs()
        );
    }

    /// The program's calls must lie inside the window, or the counts are partial and say
    /// nothing about the probes.
    fn assert_still_measuring(&mut self, what: &str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        assert!(
            self.child.try_wait().expect("wait").is_none(),
            "{what} only {elapsed:.2} s after diagnose started, after its {} s window ended",
            self.duration.as_secs()
        );
        eprintln!(
            "{what} {elapsed:.2} s into the {} s window",
            self.duration.as_secs()
        );
    }

    /// Waits for the window to end; returns the exit code, the report and the log.
    fn finish(mut self) -> (i32, serde_json::Value, Vec<String>) {
        let timeout =
            (self.duration + Duration::from_secs(30)).saturating_sub(self.started.elapsed());
        let status = wait_with_deadline(&mut self.child, "envelope diagnose", timeout);
        let report = self.stdout.take().unwrap().join().expect("stdout reader");
        self.stderr.take().unwrap().join().expect("stderr reader");
        let log = self.log();
        let code = status.code().unwrap_or(-1);
        assert!(
            code == 0 || code == 3,
            "envelope diagnose failed ({status}); its log:\n{}",
            log.join("\n")
        );
        let report = serde_json::from_slice(&report).unwrap_or_else(|error| {
            panic!(
                "envelope diagnose printed no JSON report ({error}): {}",
                String::from_utf8_lossy(&report)
            )
        });
        (code, report, log)
    }
}

impl Drop for Diagnose {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the agent logs once it has attached to a library: `CUDA probes on PATH (runtime,
/// found in pid N): K functions (...)`.
fn attach_line(path: &Path, library: &str, pid: u32) -> String {
    format!(
        "CUDA probes on {} ({library}, found in pid {pid}): ",
        path.display()
    )
}

fn detach_line(path: &Path) -> String {
    format!(
        "CUDA probes detached from {}: no process maps it any more",
        path.display()
    )
}

/// The app's row in `gpu.processes`.
fn process_row(report: &serde_json::Value, pid: u32) -> &serde_json::Value {
    report["gpu"]["processes"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["pid"] == pid))
        .unwrap_or_else(|| panic!("no gpu.processes row for pid {pid}: {:#}", report["gpu"]))
}

/// The workload that holds `pid`.
fn workload_with(report: &serde_json::Value, pid: u32) -> &serde_json::Value {
    report["workloads"]
        .as_array()
        .and_then(|workloads| {
            workloads.iter().find(|w| {
                w["pids"]
                    .as_array()
                    .is_some_and(|pids| pids.iter().any(|p| p == pid))
            })
        })
        .unwrap_or_else(|| panic!("no workload holds pid {pid}: {:#}", report["workloads"]))
}

/// Each copy is in `cuda_probes.libraries`, probed in full.
fn assert_both_libraries_probed(report: &serde_json::Value, libraries: &CudaLibraries) {
    let listed = report["cuda_probes"]["libraries"].as_array().unwrap();
    for (path, kind) in [
        (&libraries.runtime, "runtime"),
        (&libraries.driver, "driver"),
    ] {
        let name = path.file_name().unwrap().to_str().unwrap();
        let library = listed
            .iter()
            .find(|l| {
                l["path"]
                    .as_str()
                    .is_some_and(|p| Path::new(p).file_name().is_some_and(|n| n == name))
            })
            .unwrap_or_else(|| panic!("{name} is not in cuda_probes.libraries: {listed:#?}"));
        assert_eq!(library["library"], kind, "{library:#}");
        assert!(
            library["functions_attached"].as_u64().unwrap() > 0,
            "{library:#}"
        );
        assert_eq!(library["problem"], serde_json::Value::Null, "{library:#}");
    }
    assert_eq!(
        report["cuda_probes"]["problem"],
        serde_json::Value::Null,
        "{:#}",
        report["cuda_probes"]
    );
}

fn seconds(value: &serde_json::Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

/// Envelope's time for some calls within [`TIME_TOLERANCE`] of the program's.
fn assert_time_close(what: &str, envelope: f64, program: f64) {
    eprintln!("{what}: envelope {envelope:.4} s, the program {program:.4} s");
    assert!(
        (envelope - program).abs() <= TIME_TOLERANCE * program,
        "{what}: envelope {envelope:.4} s, the program {program:.4} s: more than {:.0}% apart",
        TIME_TOLERANCE * 100.0
    );
}

/// Function names in the row's top functions.
fn function_names(cuda: &serde_json::Value) -> Vec<&str> {
    cuda["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["function"].as_str().unwrap())
        .collect()
}

/// A driver function (`cu*` but not `cuda*`) among them would mean a runtime call's nested
/// driver call was counted as a call of its own.
fn assert_no_driver_functions(cuda: &serde_json::Value) {
    let names = function_names(cuda);
    assert!(
        !names
            .iter()
            .any(|name| name.starts_with("cu") && !name.starts_with("cuda")),
        "nested driver calls counted on their own: {:#}",
        cuda["functions"]
    );
}

/// A program that ran its steps under `mode`, measured by one diagnose window.
struct Scenario {
    pid: u32,
    steps: Vec<serde_json::Value>,
    code: i32,
    report: serde_json::Value,
}

/// Starts the program first (its libraries are mapped by the time diagnose reads its map, so
/// the first read finds them), then a `seconds` window judging its workload; says go once
/// both copies are probed, and keeps the program alive until the window ends so the report
/// shows its libraries and names it.
fn scenario(
    libraries: &CudaLibraries,
    mode: &str,
    seconds: u64,
    environment: &[(&str, &str)],
    steps: &[&str],
) -> Scenario {
    let mut app = App::start(libraries, environment, steps);
    let pid = app.pid();
    let mut diagnose = Diagnose::start(seconds, mode, Some(pid));
    diagnose.wait_for_attach(libraries, pid);
    let steps = app.run_steps(Duration::from_secs(seconds + 10));
    diagnose.assert_still_measuring("fake-cuda-app finished its steps");
    let (code, report, _) = diagnose.finish();
    app.finish();
    for step in &steps {
        eprintln!("fake-cuda-app: {step}");
    }
    Scenario {
        pid,
        steps,
        code,
        report,
    }
}

#[test]
fn cuda_synchronisation_copies_and_allocations_match_what_the_program_did() {
    if !root_or_skip("CUDA synchronisation, copies and allocations") {
        return;
    }
    let _exclusive = exclusive();
    prepare();
    let libraries = CudaLibraries::create();
    // 300 synchronisations of 20 ms each, spinning on a CPU as CUDA does under
    // cudaDeviceScheduleSpin: 6 s of GPU wait that looks like CPU work to the scheduler.
    // Copies at the default 1 GB/s: 8 ms and 2 ms each. The 2 TB allocation is over the
    // fake's limit (1 TiB) and fails. Launches are not probed in this mode. About 6.2 s of
    // calls in a 12 s window: half of it active (a workload active under a quarter of the
    // window is judged idle), done by ~8 s after the 1-2 s the probes take to load.
    let run = scenario(
        &libraries,
        "sync",
        12,
        &[
            ("FAKE_CUDA_SYNC_MODE", "spin"),
            ("FAKE_CUDA_SYNC_US", "20000"),
        ],
        &[
            "stream-sync:300",
            "memcpy-h2d:20:8000000",
            "memcpy-d2h:10:2000000",
            "malloc:3:4096",
            "malloc:1:2000000000000",
            "launch:100",
        ],
    );
    let report = &run.report;
    assert_eq!(report["cuda_probes"]["mode"], "sync");
    assert_both_libraries_probed(report, &libraries);

    let row = process_row(report, run.pid);
    eprintln!("gpu.processes row: {row:#}");
    assert_eq!(
        row["gpu_index"],
        serde_json::Value::Null,
        "NVML lists no fake process"
    );
    let cuda = &row["cuda"];
    let syncs = step(&run.steps, "stream-sync");
    assert_eq!(cuda["sync_calls"], 300, "{cuda:#}");
    assert_time_close(
        "synchronisation",
        seconds(&cuda["sync_s"]),
        seconds(&syncs["seconds"]),
    );
    assert_eq!(cuda["h2d_bytes"], 160_000_000u64, "20 x 8 MB: {cuda:#}");
    assert_eq!(cuda["d2h_bytes"], 20_000_000u64, "10 x 2 MB: {cuda:#}");
    assert_eq!(
        (&cuda["d2d_bytes"], &cuda["other_copy_bytes"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "{cuda:#}"
    );
    assert_time_close(
        "host-to-device copies",
        seconds(&cuda["h2d_s"]),
        seconds(&step(&run.steps, "memcpy-h2d")["seconds"]),
    );
    // The failed allocation is a call and a failure, and none of its bytes.
    assert_eq!(cuda["alloc_bytes"], 3 * 4096, "{cuda:#}");
    assert_eq!(cuda["alloc_calls"], 4, "{cuda:#}");
    assert_eq!(cuda["failures"], 1, "{cuda:#}");
    assert_eq!(
        cuda["launches"],
        serde_json::Value::Null,
        "sync mode does not probe launches, so it cannot say 0: {cuda:#}"
    );
    // The P95 of the 330 blocking calls falls among the 300 synchronisations, each at least
    // 20 ms. It is not the mean: a spinning call preempted at its end takes longer (on a busy
    // machine, 5% of them well over). No call can have taken longer than its minimum plus
    // all the time the program's calls took beyond theirs (20, 8 and 2 ms). The histogram's
    // buckets are within 6.25% (1/16).
    let p95_ms = seconds(&cuda["blocking_p95_ms"]);
    let blocking_s: f64 = ["stream-sync", "memcpy-h2d", "memcpy-d2h"]
        .iter()
        .map(|name| seconds(&step(&run.steps, name)["seconds"]))
        .sum();
    let minimum_s = 300.0 * 0.020 + 20.0 * 0.008 + 10.0 * 0.002;
    let longest_ms = 20.0 + (blocking_s - minimum_s) * 1e3;
    eprintln!(
        "blocking P95: envelope {p95_ms:.2} ms; each synchronisation at least 20 ms, none over \
         {longest_ms:.2} ms (the program's mean {:.2} ms)",
        seconds(&syncs["ns_per_call"]) / 1e6
    );
    assert!(
        (20.0 * 15.0 / 16.0..=longest_ms * 17.0 / 16.0).contains(&p95_ms),
        "blocking P95 {p95_ms:.2} ms is not between 20 ms and the longest call possible, \
         {longest_ms:.2} ms, give or take a bucket: {cuda:#}"
    );
    let names = function_names(cuda);
    assert_eq!(names.first(), Some(&"cudaStreamSynchronize"), "{cuda:#}");
    assert_no_driver_functions(cuda);

    // The spin is GPU wait: the thread was on a CPU for those 6 s, yet they are the GPU's.
    let workload = workload_with(report, run.pid);
    let time = &workload["time"];
    eprintln!(
        "workload {}: {} ({time})",
        workload["name"], workload["bottleneck"]
    );
    assert_eq!(workload["bottleneck"], "model", "{workload:#}");
    assert!(
        seconds(&time["gpu"]) > seconds(&time["on_cpu"]),
        "gpu {} not above on_cpu {} though the CPU time was spent inside synchronisation: \
         {workload:#}",
        time["gpu"],
        time["on_cpu"]
    );
    assert_eq!(run.code, 3, "a bottleneck was found");
}

#[test]
fn launches_are_counted_once_only_when_asked_and_sleeping_syncs_are_gpu_time() {
    if !root_or_skip("CUDA launches") {
        return;
    }
    let _exclusive = exclusive();
    prepare();
    let libraries = CudaLibraries::create();
    // 20,000 runtime launches, each calling the driver's cuLaunchKernel (both probed), and
    // 5,000 direct driver launches: 25,000 launches, not 45,000. Then 200 synchronisations of
    // 20 ms asleep, off the CPU: 4 s of GPU wait in a 12 s window. The launches take about
    // 0.5 s with the probes on (some 20 us each here: see README, "Cost").
    let run = scenario(
        &libraries,
        "sync+launch",
        12,
        &[
            ("FAKE_CUDA_SYNC_MODE", "sleep"),
            ("FAKE_CUDA_SYNC_US", "20000"),
        ],
        &["launch:20000", "cu-launch:5000", "stream-sync:200"],
    );
    let report = &run.report;
    assert_eq!(report["cuda_probes"]["mode"], "sync+launch");
    assert_both_libraries_probed(report, &libraries);

    let cuda = &process_row(report, run.pid)["cuda"];
    eprintln!("cuda: {cuda:#}");
    assert_eq!(cuda["launches"], 25_000, "{cuda:#}");
    // Each under the function the program called: the runtime's nested driver launches add
    // nothing to cuLaunchKernel.
    let calls_of = |name: &str| {
        cuda["functions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["function"] == name)
            .map(|f| f["calls"].clone())
    };
    assert_eq!(
        (calls_of("cudaLaunchKernel"), calls_of("cuLaunchKernel")),
        (Some(20_000.into()), Some(5_000.into())),
        "{:#}",
        cuda["functions"]
    );
    assert_eq!(cuda["sync_calls"], 200, "{cuda:#}");
    assert_time_close(
        "synchronisation",
        seconds(&cuda["sync_s"]),
        seconds(&step(&run.steps, "stream-sync")["seconds"]),
    );
    assert_eq!(
        function_names(cuda).first(),
        Some(&"cudaStreamSynchronize"),
        "{cuda:#}"
    );

    let workload = workload_with(report, run.pid);
    eprintln!(
        "workload {}: {} ({})",
        workload["name"], workload["bottleneck"], workload["time"]
    );
    assert_eq!(workload["bottleneck"], "model", "{workload:#}");
    assert_eq!(run.code, 3, "a bottleneck was found");
}

#[test]
fn waits_on_asynchronous_copies_to_the_gpu_are_copy_time_and_name_the_input_pipeline() {
    if !root_or_skip("CUDA waits on asynchronous copies") {
        return;
    }
    let _exclusive = exclusive();
    prepare();
    let libraries = CudaLibraries::create();
    // PyTorch's blocking tensor.to("cuda"): cudaMemcpyAsync of 8 MB queued at once (the
    // stand-in's copy takes no time), then cudaStreamSynchronize waiting 20 ms for it, 300
    // times: 6 s blocked on copies to the GPU, not on the model's compute.
    let run = scenario(
        &libraries,
        "sync",
        12,
        &[
            ("FAKE_CUDA_SYNC_MODE", "sleep"),
            ("FAKE_CUDA_SYNC_US", "20000"),
            ("FAKE_CUDA_COPY_BYTES_PER_US", "1000000000"),
        ],
        &["h2d-then-sync:300:8000000"],
    );
    let report = &run.report;
    let cuda = &process_row(report, run.pid)["cuda"];
    eprintln!("cuda: {cuda:#}");
    let program = step(&run.steps, "h2d-then-sync");
    assert_eq!(cuda["h2d_bytes"], 2_400_000_000u64, "{cuda:#}");
    assert_time_close(
        "waits on copies to the GPU",
        seconds(&cuda["h2d_s"]),
        seconds(&program["seconds"]),
    );
    // The synchronisations waited for the copies: none of their time is left as
    // synchronisation (one that starts more than 100 us after its copy returned, the
    // thread preempted in between, stays synchronisation: a few of 300 on this busy VM).
    assert!(
        seconds(&cuda["sync_s"]) < 0.2 * seconds(&cuda["h2d_s"]),
        "{cuda:#}"
    );
    let workload = workload_with(report, run.pid);
    eprintln!("workload {}: {}", workload["name"], workload["summary"]);
    assert_eq!(workload["bottleneck"], "model", "{workload:#}");
    assert!(
        workload["summary"]
            .as_str()
            .is_some_and(|summary| summary.contains("input pipeline")
                && summary.contains("of active time copying to the GPU")),
        "{workload:#}"
    );
}

/// A program already in a loop of CUDA calls when the probes attach: its calls are counted
/// from the attach on. The return probes go on before the entry probes: the other way round,
/// a call that entered between the two stayed open for its thread, and every later call of
/// the thread counted as nested in it (not at all) until it went stale a minute later. The
/// dashboard test lost its copy series to that in 3 runs of 5.
#[test]
fn calls_of_a_program_already_running_are_counted_from_the_attach_on() {
    if !root_or_skip("CUDA calls of a program already running") {
        return;
    }
    let _exclusive = exclusive();
    prepare();
    let libraries = CudaLibraries::create();
    // Copies of 1,000 bytes, each sleeping 1 us (the kernel's timer slack makes it about
    // 60): thousands a second, without end, the runtime calling the driver in each.
    let mut app = App::start(
        &libraries,
        &[("FAKE_CUDA_COPY_BYTES_PER_US", "1000")],
        &["memcpy-h2d:4000000000:1000"],
    );
    app.go();
    let pid = app.pid();
    let diagnose = Diagnose::start(6, "sync", Some(pid));
    diagnose.wait_for_attach(&libraries, pid);
    let attached_at = diagnose.started.elapsed();
    let (_, report, _) = diagnose.finish();
    let cuda = &process_row(&report, pid)["cuda"];
    eprintln!("cuda: {cuda:#}");
    let copies = cuda["h2d_bytes"].as_u64().expect("h2d_bytes") / 1000;
    let functions = cuda["functions"].as_array().expect("functions");
    let memcpy = functions
        .iter()
        .find(|function| function["function"] == "cudaMemcpy")
        .unwrap_or_else(|| panic!("no cudaMemcpy among {functions:#?}"));
    assert_eq!(memcpy["calls"].as_u64(), Some(copies), "{memcpy:#}");
    assert_eq!(memcpy["bytes"].as_u64(), Some(copies * 1000), "{memcpy:#}");
    // At least 3 s left after the attach: a call every 1.2 ms or more often (one every
    // 60 us when the CPUs are free). A thread stuck in a call whose return went unseen
    // counts none.
    let left = Duration::from_secs(6).saturating_sub(attached_at);
    assert!(
        left >= Duration::from_secs(3),
        "attached only after {attached_at:?}"
    );
    assert!(
        copies as f64 >= left.as_secs_f64() / 1.2e-3,
        "{copies} copies counted in the {left:?} after the attach"
    );
    assert_no_driver_functions(cuda);
}

#[test]
fn libraries_are_detached_when_no_process_maps_them() {
    if !root_or_skip("CUDA probes detached") {
        return;
    }
    let _exclusive = exclusive();
    prepare();
    let libraries = CudaLibraries::create();
    // Diagnose first and the program after: the agent finds the libraries in a process that
    // starts during the window. It exits about 2 s in; the next second's refresh sees no
    // process mapping either copy.
    let mut diagnose = Diagnose::start(10, "sync", None);
    let mut app = App::start(
        &libraries,
        &[("FAKE_CUDA_SYNC_US", "1000")],
        &["stream-sync:10"],
    );
    let pid = app.pid();
    diagnose.wait_for_attach(&libraries, pid);
    let steps = app.run_steps(Duration::from_secs(10));
    app.finish();
    diagnose.assert_still_measuring("fake-cuda-app exited");
    // The libraries are detached one after the other, and closing a uprobe link takes about
    // 0.1 s here: the second line comes some 1.7 s after the first.
    let detached = [
        detach_line(&libraries.runtime),
        detach_line(&libraries.driver),
    ];
    diagnose.wait_for_lines(
        "detaching from both copies",
        &detached,
        Duration::from_secs(5),
    );
    let detached_at = diagnose.started.elapsed().as_secs_f64();
    let (_, report, log) = diagnose.finish();
    eprintln!("detached from both copies by {detached_at:.2} s");
    let position = |text: &str| log.iter().position(|line| line.contains(text));
    for (path, kind) in [
        (&libraries.runtime, "runtime"),
        (&libraries.driver, "driver"),
    ] {
        let attached = position(&attach_line(path, kind, pid));
        let detached = position(&detach_line(path));
        assert!(
            attached.is_some() && attached < detached,
            "{} attached at log line {attached:?}, detached at {detached:?}",
            path.display()
        );
    }
    eprintln!("cuda_probes: {:#}", report["cuda_probes"]);
    assert_eq!(report["cuda_probes"]["mode"], "sync");
    // The calls of a process that exited before the window's end still count.
    let cuda = &process_row(&report, pid)["cuda"];
    assert_eq!(
        cuda["sync_calls"],
        step(&steps, "stream-sync")["calls"],
        "{cuda:#}"
    );
}

/// A mode that is not one of the three is refused before anything loads (no root needed),
/// and the message names the modes there are.
#[test]
fn an_unknown_cuda_probes_mode_is_refused_with_the_modes_named() {
    let output = Command::new(envelope_binary())
        .args(["diagnose", "--cuda-probes", "all"])
        .output()
        .expect("run envelope");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "a usage error: {stderr}");
    assert!(stderr.contains("sync+launch"), "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
