//! Prerequisites of the eBPF build and the tests: checked, and installed when missing, saying
//! what is done. Where that is impossible, the error names the command to run.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run_checked;

/// The toolchain aya-build uses for the probes (`rustup run nightly cargo build ...`).
const NIGHTLY: &str = "nightly";
/// bpf-linker version that builds with the pinned aya-ebpf (see shared platform notes).
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output_of(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The LLVM major version of the nightly toolchain, from `rustc +nightly -vV`.
fn nightly_llvm_major() -> anyhow::Result<u32> {
    let version = output_of(Command::new("rustup").args(["run", NIGHTLY, "rustc", "-vV"]))
        .context("could not run `rustup run nightly rustc -vV`")?;
    version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|llvm| llvm.split('.').next())
        .and_then(|major| major.trim().parse().ok())
        .context("`rustc +nightly -vV` printed no LLVM version")
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

pub fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    if which::which("rustup").is_err() {
        bail!(
            "rustup is not installed, and the eBPF probes need a nightly toolchain it manages. \
             Install it (https://rustup.rs), then run `cargo xtask build-ebpf` again"
        );
    }

    let toolchains =
        output_of(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|line| line.starts_with(NIGHTLY)) {
        eprintln!(
            "xtask: installing the nightly toolchain for the eBPF build (rustup toolchain install nightly)"
        );
        run_checked(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
            .context("could not install nightly; run `rustup toolchain install nightly --component rust-src`")?;
    }

    let components = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .unwrap_or_default();
    if !components.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly, needed to build `core` for the bpf target");
        run_checked(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
            .context("could not add rust-src (no network?); run `rustup component add rust-src --toolchain nightly`")?;
    }

    ensure_bpf_linker()
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the bitcode. It is built
/// against the toolchain's own libLLVM, reached through a lasting directory of symlinks (the
/// binary keeps an rpath to it).
fn ensure_bpf_linker() -> anyhow::Result<()> {
    let llvm_major = nightly_llvm_major()?;
    let sysroot =
        output_of(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
            .context("could not find nightly's sysroot")?;
    let nightly_lib = Path::new(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&nightly_lib)
        .with_context(|| format!("cannot read {}", nightly_lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&format!("libLLVM.so.{llvm_major}")))
        })
        .with_context(|| {
            format!(
                "nightly ships no libLLVM.so.{llvm_major}* in {}",
                nightly_lib.display()
            )
        })?;

    let prefix = home()
        .join(".local/share/envelope")
        .join(format!("bpf-linker-llvm{llvm_major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    // libLLVM.so for the build, and the exact soname so the linker also runs outside rustup.
    for link_name in [
        PathBuf::from("libLLVM.so"),
        PathBuf::from(libllvm.file_name().unwrap_or_default()),
    ] {
        let link = prefix_lib.join(link_name);
        if std::fs::read_link(&link).ok().as_deref() != Some(libllvm.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&libllvm, &link).with_context(|| {
                format!("cannot link {} -> {}", link.display(), libllvm.display())
            })?;
        }
    }

    // A linker that runs and reports the wanted version, built for this LLVM (the marker
    // file records which), needs nothing.
    let marker = prefix.join("installed-bpf-linker");
    let installed =
        output_of(Command::new("rustup").args(["run", NIGHTLY, "bpf-linker", "--version"]));
    let marker_ok = std::fs::read_to_string(&marker).ok().as_deref() == Some(BPF_LINKER_VERSION);
    if installed
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
        && marker_ok
    {
        return Ok(());
    }

    let features = format!("llvm-{llvm_major}");
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major} \
         (LLVM_PREFIX={}); this takes a few minutes, once",
        prefix.display()
    );
    let result = run_checked(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", &features]),
    );
    if let Err(error) = result {
        bail!(
            "{error:#}\nbpf-linker could not be built (no network, or no C++ compiler?). On a \
             machine that has them, run:\n  LLVM_PREFIX={} cargo install bpf-linker --version \
             {BPF_LINKER_VERSION} --no-default-features --features {features}",
            prefix.display()
        );
    }
    std::fs::write(&marker, BPF_LINKER_VERSION).context("cannot write the bpf-linker marker")?;
    Ok(())
}

/// Debian packages the integration tests drive: (command that proves it is there, package).
const TEST_TOOLS: [(&str, &str); 6] = [
    ("bpftool", "bpftool"),
    ("fio", "fio"),
    ("iperf3", "iperf3"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ss", "iproute2"),
];

pub fn ensure_test_tools(is_root: bool) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(tool, _)| which::which(tool).is_err())
        .map(|(_, package)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root || which::which("apt-get").is_err() {
        eprintln!(
            "xtask: missing test tools ({}); tests that need them will skip. Install them with \
             `sudo apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
        return Ok(());
    }
    eprintln!(
        "xtask: installing Debian packages the tests use: apt-get install -y {}",
        missing.join(" ")
    );
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Tools the benchmark drives besides the test tools: iperf3, bpftool (BPF run-time stats)
/// and bpftrace (the reference tracer).
pub fn ensure_bench_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("iperf3", "iperf3"),
        ("bpftool", "bpftool"),
        ("bpftrace", "bpftrace"),
    ]
    .iter()
    .filter(|(tool, _)| which::which(tool).is_err())
    .map(|(_, package)| *package)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing what the benchmark uses: apt-get install -y {}",
        missing.join(" ")
    );
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Prints the programs and maps an eBPF object holds, and its size.
pub fn describe_object(path: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let object = aya_obj::Object::parse(&bytes)
        .with_context(|| format!("{} is not a valid eBPF object", path.display()))?;
    println!(
        "eBPF object {} ({:.1} KiB, licence {:?})",
        path.display(),
        bytes.len() as f64 / 1024.0,
        object.license
    );
    let mut programs: Vec<_> = object.programs.iter().collect();
    programs.sort_by_key(|(name, _)| name.as_str());
    println!("programs ({}):", programs.len());
    for (name, program) in programs {
        let instructions = object
            .functions
            .get(&program.function_key())
            .map_or(0, |f| f.instructions.len());
        println!(
            "  {name:<22} {:<14} {instructions:>5} instructions",
            format!("{:?}", program.section)
        );
    }
    let mut maps: Vec<_> = object
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    maps.sort_by_key(|(name, _)| name.as_str());
    println!("maps ({}):", maps.len());
    for (name, map) in maps {
        println!(
            "  {name:<22} {:<16} key {:>3} B  value {:>5} B  max entries {:>6}",
            map_type_name(map.map_type()),
            map.key_size(),
            map.value_size(),
            map.max_entries()
        );
    }
    Ok(())
}

/// Names of the map types envelope uses (enum bpf_map_type).
fn map_type_name(map_type: u32) -> String {
    match map_type {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        10 => "lru_percpu_hash".into(),
        27 => "ringbuf".into(),
        other => format!("type {other}"),
    }
}
