//! The systemd unit's privileges are enough, and no more than needed: `envelope diagnose` runs
//! as an unprivileged user holding exactly the unit's AmbientCapabilities= (read from
//! systemd/envelope.service, so the test and the unit cannot drift), every probe attaches and
//! storage and network data flow; with any one of them taken away, envelope refuses to start
//! and names the capability it lacks. Root only: setpriv needs it to hand out capabilities.
use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use integration_tests::{AlignedBuffer, ScratchFile, envelope_binary, root_or_skip, tool_or_skip};

const UNIT: &str = include_str!("../../systemd/envelope.service");
/// The unprivileged user the commands run as (nobody); the unit uses a DynamicUser=.
const UNPRIVILEGED: &str = "65534";

/// The capabilities of a `Name=CAP_A CAP_B` line of the unit, e.g. ["CAP_BPF", "CAP_PERFMON"].
fn unit_capabilities(setting: &str) -> Vec<String> {
    let prefix = format!("{setting}=");
    let lines: Vec<&str> = UNIT
        .lines()
        .filter_map(|line| line.strip_prefix(prefix.as_str()))
        .collect();
    assert_eq!(lines.len(), 1, "one {setting}= line expected in the unit");
    lines[0].split_whitespace().map(str::to_string).collect()
}

/// Capability number, as /proc/PID/status counts them.
fn capability_bit(name: &str) -> u32 {
    match name {
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("add {other}'s number to capability_bit"),
    }
}

/// The binary, copied where an unprivileged user can surely execute it.
struct ExecutableCopy {
    directory: PathBuf,
    binary: PathBuf,
}

impl ExecutableCopy {
    fn new() -> Self {
        let directory = std::env::temp_dir().join(integration_tests::unique_name("envelope-svc-"));
        std::fs::create_dir_all(&directory).unwrap();
        std::fs::set_permissions(&directory, std::fs::Permissions::from_mode(0o755)).unwrap();
        let binary = directory.join("envelope");
        std::fs::copy(envelope_binary(), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { directory, binary }
    }
}

impl Drop for ExecutableCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// Runs `program arguments` as nobody with exactly `capabilities` (ambient, inheritable and
/// bounding set, no new privileges), as systemd runs the unit.
fn run_with_capabilities(capabilities: &[String], program: &Path, arguments: &[&str]) -> Output {
    run_with_capabilities_and_environment(capabilities, program, arguments, &[])
}

fn run_with_capabilities_and_environment(
    capabilities: &[String],
    program: &Path,
    arguments: &[&str],
    environment: &[(&str, &str)],
) -> Output {
    let mut set = String::from("-all");
    for capability in capabilities {
        set += &format!(",+{}", capability.trim_start_matches("CAP_").to_lowercase());
    }
    Command::new("setpriv")
        .args([
            &format!("--reuid={UNPRIVILEGED}"),
            &format!("--regid={UNPRIVILEGED}"),
            "--clear-groups",
            "--no-new-privs",
            &format!("--inh-caps={set}"),
            &format!("--ambient-caps={set}"),
            &format!("--bounding-set={set}"),
        ])
        .arg(program)
        .args(arguments)
        .envs(environment.iter().copied())
        .output()
        .expect("run setpriv")
}

/// Direct reads and a loopback TCP ping-pong until dropped, so storage and network probes
/// have something to see.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(scratch: &ScratchFile) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let path = scratch.path.clone();
        let reads = {
            let stop = stop.clone();
            thread::spawn(move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .expect("open O_DIRECT");
                let blocks = file.metadata().unwrap().len() / 4096;
                let mut buffer = AlignedBuffer::new(4096);
                let mut block = 0;
                while !stop.load(Ordering::Relaxed) {
                    file.read_exact_at(buffer.as_mut_slice(), block * 4096)
                        .expect("pread");
                    block = (block + 7) % blocks;
                }
            })
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut connection, _) = listener.accept().unwrap();
            let mut byte = [0u8; 1];
            while connection.read_exact(&mut byte).is_ok() {
                if connection.write_all(&byte).is_err() {
                    break;
                }
            }
        });
        let client = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut connection = TcpStream::connect(address).unwrap();
                let mut byte = [0u8; 1];
                while !stop.load(Ordering::Relaxed) {
                    connection.write_all(b"x").unwrap();
                    connection.read_exact(&mut byte).unwrap();
                    thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        Self {
            stop,
            threads: vec![reads, client, server],
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Root and setpriv are there; tracefs is mounted (as root's preflight does), since a fresh
/// machine may not have it and the classic path needs it.
fn can_run(test: &str) -> bool {
    if !(root_or_skip(test) && tool_or_skip(test, "setpriv")) {
        return false;
    }
    envelope::kernel::preflight::run().expect("preflight as root (mounts tracefs)");
    true
}

fn kernel_has_btf() -> bool {
    Path::new("/sys/kernel/btf/vmlinux").exists()
}

#[test]
fn the_unit_grants_the_capabilities_it_bounds() {
    assert_eq!(
        unit_capabilities("AmbientCapabilities"),
        unit_capabilities("CapabilityBoundingSet")
    );
}

#[test]
fn the_units_capabilities_are_enough_for_every_probe_and_data_flows() {
    if !can_run("the_units_capabilities_are_enough_for_every_probe_and_data_flows") {
        return;
    }
    let capabilities = unit_capabilities("AmbientCapabilities");
    let copy = ExecutableCopy::new();

    // What the process holds is exactly the unit's set, and it is not root.
    let status =
        run_with_capabilities(&capabilities, Path::new("/bin/cat"), &["/proc/self/status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    let effective = envelope::kernel::preflight::effective_capabilities(&status).expect("CapEff");
    let expected = capabilities
        .iter()
        .fold(0u64, |bits, name| bits | (1 << capability_bit(name)));
    assert_eq!(
        effective, expected,
        "CapEff of the unprivileged run: {status}"
    );
    assert!(status.lines().any(|line| line.starts_with("Uid:\t65534")));

    let scratch = ScratchFile::create(64 << 20);
    let traffic = Traffic::start(&scratch);
    let output = run_with_capabilities(
        &capabilities,
        &copy.binary,
        &["diagnose", "--json", "--duration", "3s", "--top", "50"],
    );
    drop(traffic);
    let report = diagnose_report(&output, &format!("as nobody with {capabilities:?}"));
    // The unit grants no CAP_DAC_READ_SEARCH: BTF raw tracepoints need no tracefs.
    every_probe_attached(&report, kernel_has_btf().then_some("btf"));
    let me = std::process::id();
    let devices = report["storage"]["devices"].as_array().expect("devices");
    assert!(
        devices
            .iter()
            .any(|device| device["ops"].as_u64() > Some(0)),
        "no storage I/O seen: {devices:?}"
    );
    let processes = report["storage"]["processes"]
        .as_array()
        .expect("processes");
    assert!(
        processes
            .iter()
            .any(|process| process["pid"] == me && process["ops"].as_u64() > Some(0)),
        "the test's direct reads were not charged to it (pid {me}): {processes:?}"
    );
    let peers = report["network"]["peers"].as_array().expect("peers");
    assert!(
        peers
            .iter()
            .any(|peer| peer["address"] == "127.0.0.1" && peer["rtt_samples"].as_u64() > Some(0)),
        "no loopback RTT samples: {peers:?}"
    );
    assert!(
        report["workloads"]
            .as_array()
            .is_some_and(|workloads| !workloads.is_empty()),
        "the scheduler probes saw no workload"
    );
}

/// The unit holds no CAP_DAC_READ_SEARCH (it would let the agent read any file): tracefs is
/// closed to it, and only classic tracepoints, on a kernel without BTF, need it. Forcing the
/// classic path there (`ENVELOPE_PROBES=tracepoint`) fails with a message naming the
/// capability, and with it added the classic probes attach.
#[test]
fn only_classic_tracepoints_need_cap_dac_read_search() {
    if !can_run("only_classic_tracepoints_need_cap_dac_read_search") {
        return;
    }
    if !kernel_has_btf() {
        eprintln!(
            "skipped only_classic_tracepoints_need_cap_dac_read_search: this kernel has no BTF, \
             so the unit needs the drop-in with CAP_DAC_READ_SEARCH"
        );
        return;
    }
    let capabilities = unit_capabilities("AmbientCapabilities");
    assert!(!capabilities.iter().any(|c| c == "CAP_DAC_READ_SEARCH"));
    let copy = ExecutableCopy::new();
    let listing = run_with_capabilities(
        &capabilities,
        Path::new("/bin/ls"),
        &["/sys/kernel/tracing/events"],
    );
    assert!(
        !listing.status.success(),
        "tracefs should be root-only: {}",
        String::from_utf8_lossy(&listing.stdout)
    );
    let classic = [("ENVELOPE_PROBES", "tracepoint")];
    let arguments = ["diagnose", "--json", "--duration", "1s"];
    let output =
        run_with_capabilities_and_environment(&capabilities, &copy.binary, &arguments, &classic);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CAP_DAC_READ_SEARCH") && stderr.contains("needs tracefs"),
        "{stderr}"
    );

    let mut more = capabilities.clone();
    more.push("CAP_DAC_READ_SEARCH".to_string());
    let output = run_with_capabilities_and_environment(&more, &copy.binary, &arguments, &classic);
    let report = diagnose_report(&output, "classic probes with CAP_DAC_READ_SEARCH");
    every_probe_attached(&report, Some("tracepoint"));
}

/// The JSON report of a `diagnose --json` that succeeded (0) or found a bottleneck (3).
fn diagnose_report(output: &Output, run: &str) -> serde_json::Value {
    let code = output.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "envelope {run} failed ({code}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

/// Every probe of the report attached, as `kind` (btf, tracepoint) when given.
fn every_probe_attached(report: &serde_json::Value, kind: Option<&str>) {
    let probes = report["probes"].as_array().expect("probes");
    assert!(!probes.is_empty());
    for probe in probes {
        assert_eq!(probe["attached"], true, "probe did not attach: {probe}");
        if let Some(kind) = kind {
            assert_eq!(probe["kind"], kind, "{probe}");
        }
    }
}

#[test]
fn each_missing_capability_is_named() {
    if !can_run("each_missing_capability_is_named") {
        return;
    }
    let capabilities = unit_capabilities("AmbientCapabilities");
    let copy = ExecutableCopy::new();
    for missing in &capabilities {
        let fewer: Vec<String> = capabilities
            .iter()
            .filter(|capability| *capability != missing)
            .cloned()
            .collect();
        let output = run_with_capabilities(
            &fewer,
            &copy.binary,
            &["diagnose", "--json", "--duration", "1s"],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "without {missing}: {stderr}");
        assert!(
            stderr.contains(missing.as_str()),
            "without {missing} the error should name it: {stderr}"
        );
    }
}
