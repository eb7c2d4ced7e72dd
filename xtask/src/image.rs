//! The container image: `cargo xtask image` builds `Containerfile` with the OCI builder it
//! finds; `cargo xtask rootfs` assembles the final image's root filesystem from a built
//! binary. The Containerfile's build stage runs `rootfs` and its final stage copies the result,
//! so the image and `tests/tests/image.rs` (which runs the agent in an assembled root with the
//! DaemonSet's security context) use one recipe.
use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The image the DaemonSet runs (agent/deploy/kubernetes/daemonset.yaml; a test keeps the two
/// in step).
pub fn default_tag() -> String {
    format!(
        "ghcr.io/envelope-agent/envelope:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// Directories the image has, empty: mount points of the DaemonSet's volumes and of the
/// kernel's filesystems, the state directory, and /tmp.
pub const DIRECTORIES: &[&str] = &[
    "proc",
    "sys",
    "sys/kernel/tracing",
    "sys/kernel/btf",
    "sys/fs/cgroup",
    "dev",
    "tmp",
    "var/lib/envelope",
    "etc/envelope",
];

/// CA certificates for OTLP over TLS (Debian's bundle, which the build stage installs).
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// The shared libraries `binary` loads, as absolute paths (from `ldd`).
fn linked_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("could not run ldd (Debian: apt-get install libc-bin)")?;
    if !output.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, target)) => target.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Copies `from` (following links) to `root/to`, creating parents, with `mode`.
fn place(root: &Path, from: &Path, to: &str, mode: u32) -> anyhow::Result<()> {
    let target = root.join(to.trim_start_matches('/'));
    if let Some(parent) = target.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::copy(from, &target)
        .with_context(|| format!("cannot copy {} to {}", from.display(), target.display()))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Assembles the final image's root filesystem under `root` (which must not exist yet or be
/// empty): the binary, what it links, CA certificates, the default configuration, a
/// passwd/group naming root and nobody, and the mount points.
pub fn assemble_rootfs(workspace: &Path, binary: &Path, root: &Path) -> anyhow::Result<()> {
    if root.exists() && fs::read_dir(root)?.next().is_some() {
        bail!(
            "{} is not empty; give a new directory for the image's root",
            root.display()
        );
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(root)?;
    place(root, binary, "usr/bin/envelope", 0o755)?;
    let libraries = linked_libraries(binary)?;
    for library in &libraries {
        place(root, library, &library.to_string_lossy(), 0o755)?;
    }
    // NVML (libnvidia-ml.so.1, injected by the NVIDIA container toolkit) is loaded at run time
    // and names these in DT_NEEDED; glibc 2.34+ keeps them as small stubs beside libc.
    if let Some(libc_dir) = libraries
        .iter()
        .find(|l| l.file_name().is_some_and(|n| n == "libc.so.6"))
        .and_then(|l| l.parent())
    {
        for stub in ["libpthread.so.0", "libdl.so.2", "librt.so.1"] {
            let path = libc_dir.join(stub);
            if path.exists() {
                place(root, &path, &path.to_string_lossy(), 0o755)?;
            }
        }
    }
    let bundle = Path::new("/").join(CA_BUNDLE);
    if !bundle.exists() {
        bail!(
            "{} is missing: install the CA certificates (Debian: apt-get install ca-certificates)",
            bundle.display()
        );
    }
    place(root, &bundle, CA_BUNDLE, 0o644)?;
    place(
        root,
        &workspace.join("systemd/envelope.toml"),
        "etc/envelope/envelope.toml",
        0o644,
    )?;
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    for directory in DIRECTORIES {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(root.join(directory))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// Builds `Containerfile` with buildah, podman or docker, whichever works here, and says which.
pub fn build_image(workspace: &Path, tag: &str) -> anyhow::Result<()> {
    let mut tried = Vec::new();
    for builder in ["buildah", "podman", "docker"] {
        if which::which(builder).is_err() {
            continue;
        }
        // docker's client is often installed without a daemon to talk to.
        if builder == "docker"
            && !Command::new(builder)
                .arg("info")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            tried.push("docker (its daemon is not running)".to_string());
            continue;
        }
        let mut command = Command::new(builder);
        match builder {
            "buildah" => command.args(["build", "--layers"]),
            _ => command.arg("build"),
        };
        command
            .args(["-f", "Containerfile", "-t", tag, "."])
            .current_dir(workspace);
        eprintln!("xtask: building {tag} with {builder}");
        let status = command
            .status()
            .with_context(|| format!("could not start {builder}"))?;
        if !status.success() {
            bail!("{builder} build failed ({status}); see its output above");
        }
        eprintln!(
            "xtask: built {tag} with {builder}; push it with `{builder} push {tag}` (or retag it for your registry)"
        );
        return Ok(());
    }
    tried.push("buildah and podman (not installed)".to_string());
    bail!(
        "no OCI builder could build the image here: tried {}. Install buildah or podman (Debian: apt-get install buildah), or start docker",
        tried.join(", ")
    )
}
