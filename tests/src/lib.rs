//! Helpers for the integration tests: loading the real probes, root checks, scratch files
//! for direct I/O, and network namespaces joined by a veth pair. Everything a test creates is
//! removed on drop, so a failing assertion leaves nothing behind.
pub mod daemon;
pub mod engine_fixture;
pub mod otlp_receiver;

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use envelope::{
    analysis::window::{WindowSummary, summarize_window},
    host::system::LiveSystem,
    kernel::{preflight, probes::KernelProbes},
    model::KernelSnapshot,
};

/// True when the test may load probes; otherwise prints why it skips.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping {test}: loading eBPF probes needs root (run `sudo cargo xtask test`)");
    false
}

/// True when `tool` is on PATH; otherwise prints why the test skips.
pub fn tool_or_skip(test: &str, tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "skipping {test}: `{tool}` is not installed (`cargo xtask test` installs it as root)"
        );
    }
    found
}

/// Tests that make traffic and count it per process must not overlap: the process is the
/// same for every test thread. Holding this makes plain `cargo test` safe as well.
static PROBE_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loaded probes plus the right to be the only test making traffic. Derefs to the probes.
pub struct ExclusiveProbes {
    probes: KernelProbes,
    _exclusive: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for ExclusiveProbes {
    type Target = KernelProbes;
    fn deref(&self) -> &KernelProbes {
        &self.probes
    }
}

impl std::ops::DerefMut for ExclusiveProbes {
    fn deref_mut(&mut self) -> &mut KernelProbes {
        &mut self.probes
    }
}

/// The right to be the only test of this process making traffic, for a test that judges
/// the whole process with `diagnose --pid` and loads no probes itself.
pub fn exclusive_traffic() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding the lock must not fail every later one.
    PROBE_TESTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The real probes, loaded through the same path as `envelope diagnose`.
pub fn load_probes() -> ExclusiveProbes {
    load_probes_with(&envelope::kernel::probes::ProbeOptions::from_environment())
}

/// [`load_probes`] with the choice of programs made by the test.
pub fn load_probes_with(options: &envelope::kernel::probes::ProbeOptions) -> ExclusiveProbes {
    let exclusive = exclusive_traffic();
    let report = preflight::run().expect("preflight");
    let probes =
        KernelProbes::load_with(report.tracefs.as_deref(), options).expect("loading the probes");
    for status in probes.statuses() {
        assert!(
            status.attached,
            "probe {} did not attach: {:?}",
            status.tracepoint, status.problem
        );
    }
    ExclusiveProbes {
        probes,
        _exclusive: exclusive,
    }
}

/// Summarises what the probes saw between `before` and now.
pub fn window_since(
    probes: &KernelProbes,
    before: &KernelSnapshot,
    duration: Duration,
) -> (KernelSnapshot, WindowSummary) {
    let delta = probes.snapshot().expect("reading maps").since(before);
    let summary = summarize_window(&delta, duration, &LiveSystem, 1000);
    (delta, summary)
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// This test process's name as the kernel has it (`comm`, what a workload's `process` rule
/// matches), for tests where the test process is the workload.
pub fn own_process_name() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("/proc/self/comm")
        .trim()
        .to_string()
}

/// A name no other test run uses at the same time.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a binary or cdylib the workspace builds, built once per test process through
/// cargo (so these tests work from a plain `cargo test` too).
fn cargo_artifact(
    package: &str,
    wanted: impl Fn(&serde_json::Value) -> Option<PathBuf>,
) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let output = Command::new(env!("CARGO"))
        .args(["build", "--package", package, "--message-format=json"])
        .current_dir(workspace)
        .output()
        .expect("cargo build");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .find_map(|message| wanted(&message))
        .unwrap_or_else(|| panic!("cargo built no artifact of {package}"))
}

/// The `envelope` binary.
pub fn envelope_binary() -> &'static Path {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        cargo_artifact("envelope-agent", |message| {
            message["executable"]
                .as_str()
                .filter(|path| path.ends_with("/envelope"))
                .map(PathBuf::from)
        })
    })
}

/// The shared library a test-double package builds (its cdylib target `target`).
fn cdylib_artifact(package: &str, target: &str) -> PathBuf {
    cargo_artifact(package, |message| {
        (message["target"]["name"] == target)
            .then(|| {
                message["filenames"]
                    .as_array()?
                    .iter()
                    .find_map(|f| f.as_str().filter(|f| f.ends_with(".so")))
                    .map(PathBuf::from)
            })
            .flatten()
    })
}

/// The fake NVML library (tests/fake-nvml).
pub fn fake_nvml_library() -> &'static Path {
    static LIBRARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIBRARY.get_or_init(|| cdylib_artifact("fake-nvml", "fake_nvml"))
}

/// The fake CUDA library (tests/fake-cuda's cdylib): one file that exports both the runtime's
/// and the driver's functions. The agent tells the two libraries apart by file name, so
/// tests copy it as `libcudart.so.*` and `libcuda.so.*`.
pub fn fake_cuda_library() -> &'static Path {
    static LIBRARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIBRARY.get_or_init(|| cdylib_artifact("fake-cuda", "fake_cuda"))
}

/// The stand-in CUDA program (tests/fake-cuda's `fake-cuda-app`), which loads copies of
/// [`fake_cuda_library`] and reports what it called and how long each step took.
pub fn fake_cuda_app() -> &'static Path {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        cargo_artifact("fake-cuda", |message| {
            (message["target"]["name"] == "fake-cuda-app")
                .then(|| message["executable"].as_str().map(PathBuf::from))
                .flatten()
        })
    })
}

/// Runs `envelope diagnose --json` for `seconds` with extra arguments; returns (exit code,
/// report).
pub fn diagnose_json(
    seconds: u32,
    extra: &[&str],
    environment: &[(&str, &Path)],
) -> (i32, serde_json::Value) {
    let mut command = Command::new(envelope_binary());
    command
        .args(["diagnose", "--json", "--duration", &format!("{seconds}s")])
        .args(extra);
    for (name, value) in environment {
        command.env(name, value);
    }
    let output = command.output().expect("run envelope");
    let code = output.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "envelope failed ({code}): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        code,
        serde_json::from_slice(&output.stdout).expect("one JSON object"),
    )
}

/// The workload entry named `name` in a diagnose report.
pub fn workload<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["workloads"]
        .as_array()
        .and_then(|workloads| workloads.iter().find(|w| w["name"] == name))
        .unwrap_or_else(|| panic!("no workload {name} in {:#}", report["workloads"]))
}

/// True when root and `ip`, `tc` and `ss` are there, which the veth tests need.
pub fn veth_tools_or_skip(test: &str) -> bool {
    root_or_skip(test)
        && ["ip", "tc", "ss"]
            .iter()
            .all(|tool| tool_or_skip(test, tool))
}

/// A file on a real block device (the target directory, not tmpfs), removed on drop.
pub struct ScratchFile {
    pub path: PathBuf,
}

impl ScratchFile {
    /// Creates `size_bytes` of written (not sparse) data, so later direct I/O touches the disk
    /// and overwrites need no extent conversion.
    pub fn create(size_bytes: usize) -> Self {
        // Under target/: on the disk the workspace lives on, never a tmpfs.
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp"));
        std::fs::create_dir_all(&dir).expect("target tmp dir");
        let path = dir.join(unique_name("envelope-scratch-"));
        let chunk = vec![0xA5u8; 1 << 20];
        let mut file = File::create(&path).expect("create scratch file");
        let mut written = 0;
        while written < size_bytes {
            let n = chunk.len().min(size_bytes - written);
            std::io::Write::write_all(&mut file, &chunk[..n]).expect("fill scratch file");
            written += n;
        }
        file.sync_all().expect("sync scratch file");
        Self { path }
    }

    /// (major, minor) of the block device the file lives on.
    pub fn device(&self) -> (u32, u32) {
        let meta = std::fs::metadata(&self.path).expect("stat");
        let dev = std::os::unix::fs::MetadataExt::dev(&meta);
        (
            nix::sys::stat::major(dev) as u32,
            nix::sys::stat::minor(dev) as u32,
        )
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A page-aligned buffer, as O_DIRECT requires.
pub struct AlignedBuffer {
    pointer: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuffer {
    pub fn new(size: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(size, 4096).expect("layout");
        // SAFETY: non-zero size.
        let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!pointer.is_null());
        Self { pointer, layout }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: allocated with this size, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.pointer, self.layout.size()) }
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.pointer, self.layout) }
    }
}

fn run(command: &[&str]) {
    let output = Command::new(command[0])
        .args(&command[1..])
        .output()
        .expect("spawn");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Two network namespaces joined by a veth pair, with a token-bucket filter on the client
/// side's egress so queued data waits (real delay). Removed on drop.
pub struct VethPair {
    pub client_namespace: String,
    pub server_namespace: String,
    pub client_address: std::net::Ipv4Addr,
    pub server_address: std::net::Ipv4Addr,
}

impl VethPair {
    /// `rate` and `latency` are tc tbf arguments, e.g. "8mbit" and "400ms".
    pub fn create(rate: &str, latency: &str) -> Self {
        let name = unique_name("env");
        let client_namespace = format!("{name}c");
        let server_namespace = format!("{name}s");
        let client_link = format!("{name}c0");
        let server_link = format!("{name}s0");
        // Addresses only exist inside these two private namespaces.
        let subnet = 100 + UNIQUE.fetch_add(1, Ordering::Relaxed) % 150;
        let client_address = std::net::Ipv4Addr::new(10, 251, subnet as u8, 1);
        let server_address = std::net::Ipv4Addr::new(10, 251, subnet as u8, 2);
        let pair = Self {
            client_namespace: client_namespace.clone(),
            server_namespace: server_namespace.clone(),
            client_address,
            server_address,
        };
        run(&["ip", "netns", "add", &client_namespace]);
        run(&["ip", "netns", "add", &server_namespace]);
        run(&[
            "ip",
            "link",
            "add",
            &client_link,
            "netns",
            &client_namespace,
            "type",
            "veth",
            "peer",
            "name",
            &server_link,
            "netns",
            &server_namespace,
        ]);
        for (namespace, link, address) in [
            (&client_namespace, &client_link, client_address),
            (&server_namespace, &server_link, server_address),
        ] {
            run(&[
                "ip",
                "-n",
                namespace,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                link,
            ]);
            run(&["ip", "-n", namespace, "link", "set", link, "up"]);
            run(&["ip", "-n", namespace, "link", "set", "lo", "up"]);
        }
        run(&[
            "tc",
            "-n",
            &client_namespace,
            "qdisc",
            "add",
            "dev",
            &client_link,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "16kb",
            "latency",
            latency,
        ]);
        pair
    }

    /// Runs `f` on a new thread that has joined `namespace`'s network stack.
    pub fn in_namespace<T: Send + 'static>(
        namespace: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{namespace}");
        std::thread::spawn(move || {
            let handle = File::open(&path).expect("open netns");
            nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    /// A TCP server in the server namespace that reads everything one client sends and
    /// returns the byte count. `receive_buffer` (SO_RCVBUF, set before listen so the accepted
    /// socket inherits it) caps the receive window. Returns once the server is listening.
    pub fn spawn_sink_server(
        &self,
        address: std::net::SocketAddrV4,
        receive_buffer: Option<usize>,
    ) -> std::thread::JoinHandle<usize> {
        use nix::sys::socket::{self, sockopt};
        let (ready_sender, ready) = std::sync::mpsc::channel();
        let server = Self::in_namespace(&self.server_namespace, move || {
            let fd = socket::socket(
                socket::AddressFamily::Inet,
                socket::SockType::Stream,
                socket::SockFlag::empty(),
                None,
            )
            .expect("socket");
            if let Some(bytes) = receive_buffer {
                socket::setsockopt(&fd, sockopt::RcvBuf, &bytes).expect("SO_RCVBUF");
            }
            socket::setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            socket::bind(raw, &socket::SockaddrIn::from(address)).expect("bind");
            socket::listen(&fd, socket::Backlog::new(4).expect("backlog")).expect("listen");
            let listener = std::net::TcpListener::from(fd);
            ready_sender.send(()).expect("signal ready");
            let (mut stream, _) = listener.accept().expect("accept");
            let mut sink = vec![0u8; 1 << 16];
            let mut received = 0;
            while let Ok(n) = std::io::Read::read(&mut stream, &mut sink) {
                if n == 0 {
                    break;
                }
                received += n;
            }
            received
        });
        ready.recv().expect("server ready");
        server
    }

    /// Smoothed RTT samples (ms) of sockets in `namespace` talking to `peer`, from `ss -ti`.
    pub fn ss_rtt_ms(namespace: &str, peer: std::net::SocketAddrV4) -> Vec<f64> {
        parse_ss_rtt(&ss_tcp_info(namespace, peer))
    }
}

/// `ss -tin` output for sockets in `namespace` talking to `peer`.
fn ss_tcp_info(namespace: &str, peer: std::net::SocketAddrV4) -> String {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            namespace,
            "ss",
            "-tinH",
            "dst",
            &peer.to_string(),
        ])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Total retransmitted segments of sockets in `namespace` talking to `peer` (`retrans:a/b`).
pub fn ss_total_retransmits(namespace: &str, peer: std::net::SocketAddrV4) -> u64 {
    ss_tcp_info(namespace, peer)
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("retrans:"))
        .filter_map(|value| value.split('/').nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Every `rtt:<srtt>/<rttvar>` in `ss -ti` output, in ms.
pub fn parse_ss_rtt(text: &str) -> Vec<f64> {
    text.split_whitespace()
        .filter_map(|word| word.strip_prefix("rtt:"))
        .filter_map(|value| value.split('/').next()?.parse().ok())
        .collect()
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and with it the pair.
        for namespace in [&self.client_namespace, &self.server_namespace] {
            let _ = Command::new("ip")
                .args(["netns", "delete", namespace])
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ss_rtt_is_parsed() {
        let text = "0 0 10.251.1.1:40000 10.251.1.2:5201\n\t cubic wscale:7,7 rto:268 rtt:64.211/2.5 ato:40 mss:1448";
        assert_eq!(super::parse_ss_rtt(text), vec![64.211]);
        assert!(super::parse_ss_rtt("no sockets").is_empty());
    }
}
