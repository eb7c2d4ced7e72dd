//! Servers and tools the end-to-end export tests use, fetched without changing the system:
//! VictoriaMetrics (a real time-series database taking OTLP over HTTP) and promtool (checks
//! and unit-tests the shipped alerting rules). Both come from Debian 13 "trixie" through a
//! private apt configuration (its own source list, lists and cache under target/), and are
//! unpacked with `dpkg-deb -x` into target/test-tools/. The machine's apt state is untouched.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::run_checked;

/// (binary, Debian package) fetched into target/test-tools/bin.
const TOOLS: [(&str, &str); 2] = [
    ("victoria-metrics", "victoria-metrics"),
    ("promtool", "promtool"),
];

/// The Debian mirror this machine already uses (deb822 or one-line format).
fn debian_mirror() -> String {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let one_line = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    deb822
        .lines()
        .filter_map(|line| line.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .chain(
            one_line
                .lines()
                .filter(|line| line.starts_with("deb "))
                .filter_map(|line| line.split_whitespace().find(|w| w.contains("://"))),
        )
        .find(|uri| uri.trim_end_matches('/').ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

pub fn tools_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("test-tools")
}

pub fn ensure_test_servers(workspace: &Path) -> anyhow::Result<()> {
    let dir = tools_dir(workspace);
    let bin = dir.join("bin");
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(binary, _)| !bin.join(binary).exists())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if which::which("apt-get").is_err() || which::which("dpkg-deb").is_err() {
        eprintln!(
            "xtask: no apt-get/dpkg-deb, so {} cannot be fetched; the export end-to-end tests will skip. \
             Put the binaries in {} to run them.",
            missing.join(", "),
            bin.display()
        );
        return Ok(());
    }
    eprintln!(
        "xtask: fetching test servers from Debian trixie into {} (private apt configuration; the system is not changed): {}",
        dir.display(),
        missing.join(" ")
    );
    let apt = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial", "debs"] {
        std::fs::create_dir_all(apt.join(sub))
            .with_context(|| format!("creating {}", apt.display()))?;
    }
    let sources = apt.join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} trixie main\n",
            debian_mirror()
        ),
    )?;
    let options = [
        format!("-oDir::Etc::sourcelist={}", sources.display()),
        "-oDir::Etc::sourceparts=/nonexistent".to_string(),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
        // Downloading into a directory the _apt user cannot write would only warn.
        "-oAPT::Sandbox::User=root".to_string(),
    ];
    run_checked(
        Command::new("apt-get")
            .args(&options)
            .args(["update", "-q"]),
    )
    .context("apt-get update with the private trixie source failed (no network?)")?;
    // `apt-get download` writes into its working directory (run_checked would reset it).
    let status = Command::new("apt-get")
        .current_dir(apt.join("debs"))
        .args(&options)
        .args(["download", "-q"])
        .args(&missing)
        .status()
        .context("could not start apt-get download")?;
    anyhow::ensure!(
        status.success(),
        "apt-get download {} failed ({status})",
        missing.join(" ")
    );
    for entry in std::fs::read_dir(apt.join("debs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run_checked(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&path)
                    .arg(dir.join("root")),
            )?;
        }
    }
    std::fs::create_dir_all(&bin)?;
    for (binary, _) in TOOLS {
        let unpacked = dir.join("root/usr/bin").join(binary);
        if unpacked.exists() {
            let _ = std::fs::remove_file(bin.join(binary));
            std::os::unix::fs::symlink(&unpacked, bin.join(binary))?;
        }
    }
    Ok(())
}
