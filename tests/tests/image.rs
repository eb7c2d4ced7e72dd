//! The container image without a container runtime (CI's sandbox cannot run one): its root
//! filesystem is assembled by the Containerfile's own recipe (`cargo xtask rootfs`), and the
//! agent runs in it with exactly the DaemonSet's security context: a read-only root, the
//! host's PID namespace, tracefs, BTF and cgroup mounted read-only, every capability dropped but
//! BPF and PERFMON, no privilege escalation. A second test keeps the
//! Containerfile, the manifest and the systemd unit in agreement.
use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{ScratchFile, daemon::ReadLoad, envelope_binary, root_or_skip};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(workspace().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value after `key:` on the manifest line that has it (first occurrence).
fn manifest_value<'a>(manifest: &'a str, key: &str) -> &'a str {
    manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("the manifest has no {key}"))
        .trim()
}

/// `["a", "b"]` as written in the manifest and the Containerfile.
fn string_list(text: &str) -> Vec<String> {
    text.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|item| item.trim().trim_matches('"').to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

/// The Containerfile's instruction `name` in its last stage (e.g. "CMD").
fn final_stage(containerfile: &str, name: &str) -> String {
    let last_stage = containerfile
        .rsplit_once("\nFROM ")
        .map_or(containerfile, |(_, stage)| stage);
    last_stage
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("the final stage has no {name}"))
        .to_string()
}

#[test]
fn the_manifest_the_containerfile_and_the_unit_agree() {
    let manifest = read("agent/deploy/kubernetes/daemonset.yaml");
    let containerfile = read("Containerfile");
    let unit = read("systemd/envelope.service");
    // The image the manifest runs is the one `cargo xtask image` tags.
    assert_eq!(
        manifest_value(&manifest, "image"),
        format!(
            "ghcr.io/envelope-agent/envelope:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert!(
        final_stage(&containerfile, "LABEL").contains("org.opencontainers.image.title"),
        "OCI labels"
    );
    assert!(containerfile.contains(&format!(
        "org.opencontainers.image.version=\"{}\"",
        env!("CARGO_PKG_VERSION")
    )));
    // Entrypoint and arguments: the manifest's args replace CMD and must say the same.
    assert_eq!(
        string_list(&final_stage(&containerfile, "ENTRYPOINT")),
        ["/usr/bin/envelope"]
    );
    let args = string_list(manifest_value(&manifest, "args"));
    assert_eq!(string_list(&final_stage(&containerfile, "CMD")), args);
    assert_eq!(args, ["run", "--config", "/etc/envelope/envelope.toml"]);
    assert!(manifest.contains("mountPath: /etc/envelope\n"));
    // Root in the container, which the manifest must not contradict.
    assert_eq!(final_stage(&containerfile, "USER"), "0:0");
    assert!(!manifest.contains("runAsNonRoot: true"));
    assert!(!manifest.contains("runAsUser:"));
    // The capabilities: the manifest's, the unit's, the same two.
    let added = string_list(manifest_value(&manifest, "add"));
    assert_eq!(added, ["BPF", "PERFMON"]);
    assert_eq!(string_list(manifest_value(&manifest, "drop")), ["ALL"]);
    let bounding = unit
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit's CapabilityBoundingSet");
    let mut from_unit: Vec<String> = bounding
        .split_whitespace()
        .map(|cap| cap.trim_start_matches("CAP_").to_string())
        .collect();
    from_unit.sort();
    let mut from_manifest = added.clone();
    from_manifest.sort();
    assert_eq!(from_unit, from_manifest);
    assert_eq!(manifest_value(&manifest, "readOnlyRootFilesystem"), "true");
    assert_eq!(
        manifest_value(&manifest, "allowPrivilegeEscalation"),
        "false"
    );
    assert_eq!(manifest_value(&manifest, "hostPID"), "true");
    // Every mount point the manifest uses exists in the image (xtask's list).
    let image_rs = read("xtask/src/image.rs");
    for line in manifest.lines() {
        if let Some(path) = line.trim().strip_prefix("mountPath: ") {
            let relative = path.trim_start_matches('/');
            assert!(
                image_rs.contains(&format!("\"{relative}\"")),
                "the image has no directory for the manifest's mount {path}"
            );
        }
    }
}

/// `cargo xtask rootfs`: the Containerfile's recipe, run here.
fn assemble_rootfs(binary: &Path, root: &Path) {
    let status = Command::new(env!("CARGO"))
        .args([
            "run",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "rootfs",
            "--binary",
        ])
        .arg(binary)
        .arg(root)
        .current_dir(workspace())
        .status()
        .expect("cargo run xtask rootfs");
    assert!(status.success(), "xtask rootfs failed");
}

/// The mounts of the DaemonSet's pod, as (source, target in the root, filesystem type,
/// read-only): what the runtime gives every container (/proc of the host's PID namespace,
/// sysfs, /dev), then the manifest's volumes, then the writable state volume and /tmp.
fn pod_mounts(root: &Path) -> Vec<(PathBuf, PathBuf, Option<&'static str>, bool)> {
    [
        ("sysfs", "sys", Some("sysfs"), true),
        ("/sys/kernel/tracing", "sys/kernel/tracing", None, true),
        ("/sys/kernel/btf", "sys/kernel/btf", None, true),
        ("/sys/fs/cgroup", "sys/fs/cgroup", None, true),
        ("/proc", "proc", None, false),
        ("/dev", "dev", None, false),
        ("tmpfs", "var/lib/envelope", Some("tmpfs"), false),
        ("tmpfs", "tmp", Some("tmpfs"), false),
    ]
    .into_iter()
    .map(|(source, target, fstype, read_only)| {
        (PathBuf::from(source), root.join(target), fstype, read_only)
    })
    .collect()
}

/// What the kubelet and the runtime do for the DaemonSet's pod, in the child before exec:
/// a mount namespace with the volumes, a read-only root, chroot, capabilities, no_new_privs.
/// Runs between fork and exec, so it only makes system calls (nix passes paths through a
/// stack buffer; everything else was prepared before the fork).
fn enter_pod(
    root: &Path,
    mounts: &[(PathBuf, PathBuf, Option<&'static str>, bool)],
) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    let fail = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let read_only = |target: &Path| {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
    };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(fail)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(fail)?;
    // readOnlyRootFilesystem: true.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(fail)?;
    read_only(root).map_err(fail)?;
    for (source, target, fstype, ro) in mounts {
        match fstype {
            Some(fstype) => {
                let flags = if *ro {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                };
                mount(
                    Some(source.as_path()),
                    target.as_path(),
                    Some(*fstype),
                    flags,
                    None::<&str>,
                )
                .map_err(fail)?;
            }
            None => {
                mount(
                    Some(source.as_path()),
                    target.as_path(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(fail)?;
                if *ro {
                    read_only(target).map_err(fail)?;
                }
            }
        }
    }
    nix::unistd::chroot(root).map_err(fail)?;
    nix::unistd::chdir("/").map_err(fail)?;
    // SAFETY: plain prctl calls.
    unsafe {
        // capabilities: drop ALL, add BPF, PERFMON. Root's capabilities after exec are its
        // bounding set, so this leaves exactly those two.
        // linux/capability.h: CAP_PERFMON 38, CAP_BPF 39.
        const KEEP: [libc::c_ulong; 2] = [38, 39];
        for capability in 0..=63 {
            if !KEEP.contains(&capability)
                && libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        // allowPrivilegeEscalation: false.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn the_image_runs_diagnose_with_the_daemonsets_security_context() {
    if !root_or_skip("the image's entrypoint under the DaemonSet's security context") {
        return;
    }
    if !Path::new("/sys/kernel/tracing/events").exists() {
        // The agent mounts tracefs itself on the host; inside the pod it is a volume.
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
    }
    let scratch = std::env::temp_dir().join(format!("envelope-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let root = scratch.join("rootfs");
    assemble_rootfs(envelope_binary(), &root);
    for file in [
        "usr/bin/envelope",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/envelope/envelope.toml",
        "etc/passwd",
    ] {
        assert!(root.join(file).is_file(), "the image has no {file}");
    }
    // A host process reading from disk the agent in the pod must see and name.
    let file = ScratchFile::create(32 << 20);
    let load = ReadLoad::start(&file.path);
    let child_root = root.clone();
    let mounts = pod_mounts(&root);
    let mut command = Command::new("/usr/bin/envelope");
    command
        .args(["diagnose", "--duration", "2s", "--json"])
        .env_clear()
        .env("PATH", "/usr/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: enter_pod makes only system calls on data prepared before the fork.
    unsafe {
        command.pre_exec(move || enter_pod(&child_root, &mounts));
    }
    let started = Instant::now();
    let output = command.output().expect("run envelope in the image's root");
    drop(load);
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        matches!(output.status.code(), Some(0 | 3)),
        "{:?}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    let probes = report["probes"].as_array().unwrap();
    let detached: Vec<&serde_json::Value> = probes
        .iter()
        .filter(|p| p["attached"] != true && p["tracepoint"] != "raw_syscalls:sys_enter")
        .collect();
    assert!(
        detached.is_empty(),
        "probes not attached in the pod: {detached:?}"
    );
    let readers: Vec<&str> = report["storage"]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(
        readers.contains(&"dd"),
        "the host's dd is not named from the pod: {readers:?}\n{stderr}"
    );
}
