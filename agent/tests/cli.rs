//! The binary's behaviour on bad input: a clear message and a non-zero exit, never a panic.
use std::process::Command;

fn envelope(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(args)
        .output()
        .expect("run envelope");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    for (args, expected) in [
        (
            &["diagnose", "--bogus"][..],
            "unexpected argument '--bogus'",
        ),
        (&["diagnose", "--duration", "0"], "greater than zero"),
        (&["diagnose", "--duration", "-5s"], "negative"),
        (&["diagnose", "--duration", "soon"], "not a duration"),
        (&["diagnose", "--top", "0"], "--top"),
        (&["run", "--window", "1ns"], "too short; use 500ms or more"),
        (&["run", "--window", "2h"], "too long; use at most 1h"),
        (&["frobnicate"], "unrecognized subcommand"),
    ] {
        let (code, _, stderr) = envelope(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_bad_configuration_is_refused_with_where_and_what() {
    let (code, _, stderr) = envelope(&["diagnose", "--config", "/nonexistent/envelope.toml"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot read the configuration /nonexistent/envelope.toml"),
        "{stderr}"
    );
    let path = std::env::temp_dir().join(format!("envelope-bad-{}.toml", std::process::id()));
    std::fs::write(&path, "[[workload]]\nname = \"a\"\nproces = [\"x\"]\n").unwrap();
    let (code, _, stderr) = envelope(&["diagnose", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(":3:1: unknown field `proces`"), "{stderr}");
}

#[test]
fn check_passes_the_shipped_example_and_fails_a_bad_file() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/envelope.toml");
    let (code, stdout, stderr) = envelope(&["check", "--config", example]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": ok (8 budgets, 5 workloads"), "{stdout}");
    let (code, _, stderr) = envelope(&["check", "--config", "/nonexistent/envelope.toml"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read the configuration"), "{stderr}");
}

#[test]
fn config_history_and_rollback_restore_byte_for_byte() {
    let dir = std::env::temp_dir().join(format!("envelope-cli-archive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    let config = dir.join("envelope.toml");
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/envelope.toml"
    ))
    .unwrap();
    let start = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    envelope::config::archive::archive(&state, &good, start).unwrap();
    let (code, stdout, _) =
        envelope(&["config", "history", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains(&format!("{} bytes", good.len())),
        "{stdout}"
    );

    // A bad edit, refused by check; one command puts the last good one back.
    std::fs::write(&config, "[[workload]]\nname = \"a\"\nproces = [\"x\"]\n").unwrap();
    let (code, _, _) = envelope(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    let (code, stdout, stderr) = envelope(&[
        "config",
        "rollback",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("restored "), "{stdout}");
    assert_eq!(std::fs::read(&config).unwrap(), good);
    let (code, _, _) = envelope(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0);
    let (code, _, stderr) = envelope(&[
        "config",
        "rollback",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        dir.join("empty").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no archived configuration"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// As root, a configuration diagnose loaded is archived.
#[test]
fn diagnose_archives_the_configuration_it_loaded() {
    if !nix_is_root() {
        eprintln!(
            "skipping diagnose_archives_the_configuration_it_loaded: needs root to load probes"
        );
        return;
    }
    let dir =
        std::env::temp_dir().join(format!("envelope-cli-diag-archive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/envelope.toml");
    let (code, _, stderr) = envelope(&[
        "diagnose",
        "--duration",
        "1s",
        "--config",
        example,
        "--state-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(code == 0 || code == 3, "{stderr}");
    let archived = envelope::config::archive::history(&dir).unwrap();
    assert_eq!(archived.len(), 1);
    assert_eq!(
        std::fs::read(&archived[0].path).unwrap(),
        std::fs::read(example).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn version_and_help_work_without_privileges() {
    let (code, stdout, _) = envelope(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("envelope "), "{stdout}");
    let (code, stdout, _) = envelope(&["diagnose", "--help"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("--duration") && stdout.contains("--json"),
        "{stdout}"
    );
}

#[test]
fn unprivileged_diagnose_says_what_to_do() {
    if !nix_is_root() {
        let (code, _, stderr) = envelope(&["diagnose", "--duration", "1s"]);
        assert_eq!(code, 1);
        assert!(
            stderr.contains("CAP_BPF") && stderr.contains("sudo"),
            "{stderr}"
        );
        return;
    }
    // As root: drop to nobody through setpriv when it exists, with no capabilities.
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipping the unprivileged run: setpriv is not installed");
        return;
    }
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_envelope"))
        .args(["diagnose", "--duration", "1s"])
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("sudo"),
        "{stderr}"
    );
}

/// Loading probes needs root; tests that do skip otherwise.
fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// As root, a short diagnose prints the documented JSON object.
#[test]
fn diagnose_json_has_the_documented_fields() {
    if !nix_is_root() {
        eprintln!("skipping diagnose_json_has_the_documented_fields: needs root to load probes");
        return;
    }
    let (code, stdout, stderr) = envelope(&["diagnose", "--duration", "1s", "--json"]);
    // 0: no bottleneck, 3: one found (whatever else runs on the machine); both are reports.
    assert!(code == 0 || code == 3, "{code}: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    assert_eq!(report["schema_version"], 1);
    assert!(report["duration_s"].as_f64().unwrap() >= 1.0);
    assert_eq!(report["interrupted"], false);
    assert!(report["storage"]["devices"].is_array());
    assert!(report["storage"]["processes"].is_array());
    assert!(report["network"]["peers"].is_array());
    let probes = report["probes"].as_array().unwrap();
    // 14 tracepoints; 15 where sched_switch falls back to raw_syscalls:sys_enter (< 5.15).
    assert_eq!(probes.len(), 14, "{probes:#?}");
    assert!(probes.iter().all(|p| p["attached"] == true), "{probes:#?}");
    assert!(
        ["model", "storage", "network", "cpu", "none"]
            .contains(&report["verdict"]["bottleneck"].as_str().unwrap())
    );
    assert_eq!(
        code == 3,
        report["verdict"]["bottleneck"] != "none",
        "exit code matches the verdict"
    );
    assert!(report["workloads"].is_array());
    assert!(probes.iter().all(|p| p["attached"] == true), "{probes:?}");
}

/// `check` refuses what `run` would refuse, with the value's line, and reads only regular
/// files (a FIFO would block, /dev/zero would fill memory).
#[test]
fn check_refuses_what_run_cannot_run_with_the_line() {
    let dir = std::env::temp_dir().join(format!("envelope-cli-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("envelope.toml");
    for (text, expected) in [
        (
            "[agent]\nwindow = \"300000000000years\"\n",
            ":2:10: [agent]: window",
        ),
        (
            "[alerting]\nenter_after = 0\n",
            ":2:15: [alerting]: enter_after must be between 1",
        ),
        (
            "[export]\nendpoint = \"http://\"\n",
            ":2:12: [export]: endpoint \"http://\"",
        ),
        (
            "[export]\nendpoint = \"https://c:4317\"\nca_file = \"/nonexistent/ca.pem\"\n",
            ":3:11: [export]: ca_file \"/nonexistent/ca.pem\" cannot be read (No such file or directory)",
        ),
        (
            "[pricing]\ngpu_hour = nan\n",
            ":2:12: [pricing]: gpu_hour NaN",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = envelope(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{text}: {stdout}{stderr}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (code, _, stderr) = envelope(&["check", "--config", "/dev/zero"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("it is a device"), "{stderr}");
    let (code, _, stderr) = envelope(&["check", "--config", "/nonexistent/envelope.toml"]);
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: cannot read the configuration /nonexistent/envelope.toml: No such file or directory"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 19: a process or workload the window never saw is an error (exit 1) naming what was
/// not found, never a "none" verdict a script would read as healthy; a process that exists
/// but did nothing is "none", said so; a missing --nvml-lib file is named as missing.
#[test]
fn diagnose_refuses_a_pid_or_workload_it_never_saw() {
    if !nix_is_root() {
        eprintln!("skipping: diagnose loads the probes (run as root)");
        return;
    }
    let (code, stdout, stderr) = envelope(&["diagnose", "--duration", "300ms", "--pid", "999999"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("error: no process 999999 ran during the window"),
        "{stderr}"
    );
    let (code, stdout, stderr) =
        envelope(&["diagnose", "--duration", "300ms", "--workload", "nosuch"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(
            "error: no workload named \"nosuch\" ran during the window; workloads seen: "
        ),
        "{stderr}"
    );
    // A process that exists and only sleeps: no bottleneck, exit 0.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let (code, stdout, stderr) =
        envelope(&["diagnose", "--duration", "300ms", "--json", "--pid", &pid]);
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["verdict"]["bottleneck"], "none", "{stdout}");
    let (code, stdout, stderr) = envelope(&[
        "diagnose",
        "--duration",
        "200ms",
        "--json",
        "--nvml-lib",
        "/nonexistent/libnvidia-ml.so.1",
    ]);
    assert!(code == 0 || code == 3, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let reason = report["gpu"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(
            "no NVML library at /nonexistent/libnvidia-ml.so.1: the file does not exist"
        ),
        "{reason}"
    );
}
