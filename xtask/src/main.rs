//! `cargo xtask`: the project's developer commands.
//!
//! - `build-ebpf`: sets up what the eBPF build needs (nightly's rust-src, bpf-linker built
//!   against nightly's own LLVM), builds the probes and prints what the object holds.
//! - `run -- ARGS`: builds everything and runs `envelope ARGS` (as root).
//! - `test`: sets up the build and the test tools (Debian packages), then runs every test.
//! - `image`: builds the container image (Containerfile) with buildah, podman or docker.
//! - `rootfs`: assembles the image's root filesystem from a built binary (the Containerfile's
//!   build stage runs it; tests/tests/image.rs runs the agent in such a root).
pub mod image;
mod test_servers;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF probes, installing missing prerequisites, and describe the object.
    BuildEbpf {
        /// Build the release agent that embeds the object (default: debug).
        #[arg(long)]
        release: bool,
    },
    /// Build and run `envelope` with the given arguments (the probes need root).
    Run {
        /// Use a debug build instead of release.
        #[arg(long)]
        debug: bool,
        /// Arguments for envelope, after `--`; e.g. `cargo xtask run -- diagnose --duration 5s`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmark (root): probe cost, agent cost, workload slowdown and accuracy against
    /// a reference tracer; writes BENCHMARKS.md and target/bench/results.json. Takes ~5 min.
    Bench,
    /// The soak test for longer (root): `envelope run` under storage, network, process and
    /// connection churn with reloads and a collector outage; prints RSS, fds, threads and map
    /// entries every 5 s and fails on growth (tests/tests/soak.rs). Default 30 minutes.
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
    /// Build the container image from Containerfile with buildah, podman or docker (the first
    /// that works), tagged as the DaemonSet expects unless --tag says otherwise.
    Image {
        /// Image name and tag (default: ghcr.io/envelope-agent/envelope:<version>).
        #[arg(long)]
        tag: Option<String>,
    },
    /// Assemble the container image's root filesystem in DIR from a built envelope binary.
    Rootfs {
        /// The binary to put in the image (e.g. target/release/envelope).
        #[arg(long)]
        binary: PathBuf,
        /// A new or empty directory.
        root: PathBuf,
    },
    /// Set up prerequisites and run every test (unit tests; root-only probe tests run when root).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace, failing with the command line when it fails.
pub fn run_checked(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("could not start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .map(|ids| {
                    ids.split_whitespace().nth(1) == Some("0") // effective uid
                })
        })
        .unwrap_or(false)
}

/// Builds the agent (which builds and embeds the probes) and returns the object's path.
fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    let mut command = Command::new(env!("CARGO"));
    command.args([
        "build",
        "--package",
        "envelope-agent",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        command.arg("--release");
    }
    let output = command
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("could not start cargo")?;
    if !output.status.success() {
        bail!("building envelope failed (see the compiler output above)");
    }
    // The build script's OUT_DIR holds the object; cargo names it in its JSON messages.
    let out_dir = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "build-script-executed")
        .filter(|message| {
            message["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("/agent#"))
        })
        .find_map(|message| message["out_dir"].as_str().map(PathBuf::from))
        .context("cargo did not report the agent's build-script output directory")?;
    Ok(out_dir.join("envelope-probes"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::BuildEbpf { release } => {
            toolchain::ensure_ebpf_toolchain()?;
            let object = build_agent(release)?;
            toolchain::describe_object(&object)?;
        }
        Task::Run { debug, args } => {
            toolchain::ensure_ebpf_toolchain()?;
            build_agent(!debug)?;
            let binary = workspace_root()
                .join("target")
                .join(if debug { "debug" } else { "release" })
                .join("envelope");
            let mut command = if is_root() {
                Command::new(&binary)
            } else {
                eprintln!("envelope's probes need root: running it through sudo");
                let mut sudo = Command::new("sudo");
                sudo.arg("-E").arg(&binary);
                sudo
            };
            let status = command
                .args(&args)
                .status()
                .with_context(|| format!("could not start {}", binary.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Bench => {
            if !is_root() {
                bail!("the benchmark loads probes and runs fio against direct I/O: run it as root");
            }
            toolchain::ensure_ebpf_toolchain()?;
            toolchain::ensure_test_tools(true)?;
            toolchain::ensure_bench_tools()?;
            build_agent(true)?;
            let binary = workspace_root().join("target/release/envelope");
            eprintln!(
                "xtask: benchmarking {} (about 5 minutes; keep the machine otherwise idle)",
                binary.display()
            );
            run_checked(
                Command::new(env!("CARGO"))
                    .env("ENVELOPE_BENCH_BINARY", &binary)
                    .args(["test", "-p", "integration-tests", "--test", "bench", "--"])
                    .args(["--ignored", "--nocapture", "--test-threads=1"]),
            )?;
            eprintln!("xtask: results in BENCHMARKS.md and target/bench/results.json");
        }
        Task::Soak { minutes } => {
            if !is_root() {
                bail!("the soak test loads probes and reads with O_DIRECT: run it as root");
            }
            toolchain::ensure_ebpf_toolchain()?;
            toolchain::ensure_test_tools(true)?;
            eprintln!("xtask: soaking envelope for {minutes} minutes");
            run_checked(
                Command::new(env!("CARGO"))
                    .env("ENVELOPE_SOAK_SECONDS", (minutes * 60).to_string())
                    .args(["test", "-p", "integration-tests", "--test", "soak", "--"])
                    .args(["--nocapture", "--test-threads=1"]),
            )?;
        }
        Task::Image { tag } => {
            image::build_image(&workspace_root(), &tag.unwrap_or_else(image::default_tag))?;
        }
        Task::Rootfs { binary, root } => {
            image::assemble_rootfs(&workspace_root(), &binary, &root)?;
            eprintln!(
                "xtask: the image's root filesystem is in {}",
                root.display()
            );
        }
        Task::Test { cargo_args } => {
            toolchain::ensure_ebpf_toolchain()?;
            toolchain::ensure_test_tools(is_root())?;
            if let Err(error) = test_servers::ensure_test_servers(&workspace_root()) {
                eprintln!("xtask: {error:#}; the export end-to-end tests will skip and say why");
            }
            if !is_root() {
                eprintln!("note: not root, so the tests that load the probes will skip and say so");
            }
            // One test thread: the probe tests measure traffic per process, and tests running
            // side by side in one process would count each other's I/O.
            run_checked(
                Command::new(env!("CARGO"))
                    .args(["test", "--workspace"])
                    .args(&cargo_args)
                    .args(["--", "--test-threads=1"]),
            )?;
            // The probes above ran as BTF raw tracepoints (where the kernel has BTF); the
            // storage and network measurements again on classic tracepoints, the path kernels
            // without BTF take. (The attribution scenarios cover both inside their own tests.)
            if is_root() && cargo_args.is_empty() {
                eprintln!("xtask: the storage and network tests again on classic tracepoints");
                run_checked(
                    Command::new(env!("CARGO"))
                        .env("ENVELOPE_PROBES", "tracepoint")
                        .args(["test", "-p", "integration-tests"])
                        .args(["--test", "storage", "--test", "network"])
                        .args(["--", "--test-threads=1"]),
                )?;
            }
        }
    }
    Ok(())
}
