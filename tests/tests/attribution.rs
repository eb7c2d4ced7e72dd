//! Scenarios with a known answer (root only): each load must get the right verdict for the
//! right workload, and the evidence must name the right device, peer or GPU.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    ScratchFile, VethPair, diagnose_json, fake_nvml_library, root_or_skip, veth_tools_or_skip,
    workload,
};

/// A child process, killed when the test ends however it ends.
struct Load(Child);

impl Load {
    fn shell(script: &str) -> Self {
        Self(
            Command::new("sh")
                .args(["-c", script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scenario ran on the kind of probes it meant to: classic tracepoints where
/// `ENVELOPE_PROBES=tracepoint` says so, BTF raw tracepoints otherwise (kernels with BTF),
/// except sched_switch on the sys_enter fallback. And none missed an event.
fn assert_probe_kinds(report: &serde_json::Value, environment: &[(&str, &Path)]) {
    let set = |name: &str| environment.iter().any(|(key, _)| *key == name);
    let has_btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    for probe in report["probes"].as_array().unwrap() {
        let name = probe["tracepoint"].as_str().unwrap();
        let classic = set("ENVELOPE_PROBES")
            || !has_btf
            || name == "raw_syscalls:sys_enter"
            || (name == "sched:sched_switch" && set("ENVELOPE_SYSCALL_PROBE"));
        let expected = if classic { "tracepoint" } else { "btf" };
        assert_eq!(probe["kind"], expected, "{probe:#}");
        assert_eq!(probe["attached"], true, "{probe:#}");
    }
}

/// Only one scenario at a time: each measures the whole node.
static SCENARIOS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    SCENARIOS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn direct_reads_in_a_loop_are_a_storage_bottleneck_on_their_device() {
    storage_scenario(&[]);
}

/// Both scenarios with every probe on its classic tracepoint (kernels without BTF), and every
/// tracepoint field read through bpf_probe_read_kernel: the path the probes take on kernels
/// whose tracepoint layouts differ from the compiled one.
#[test]
fn fields_read_through_the_helper_give_the_same_verdicts() {
    let helper = [
        ("ENVELOPE_PROBES", Path::new("tracepoint")),
        ("ENVELOPE_TRACEPOINT_READS", Path::new("helper")),
    ];
    storage_scenario(&helper);
    network_scenario(5205, &helper);
}

/// Both scenarios on classic tracepoints with direct field loads (the other scenarios run on
/// BTF raw tracepoints wherever the kernel has BTF).
#[test]
fn classic_tracepoints_give_the_same_verdicts() {
    let classic = [("ENVELOPE_PROBES", Path::new("tracepoint"))];
    storage_scenario(&classic);
    network_scenario(5206, &classic);
}

fn storage_scenario(environment: &[(&str, &Path)]) {
    if !root_or_skip("storage scenario") {
        return;
    }
    let _exclusive = exclusive();
    let file = ScratchFile::create(256 << 20);
    // 1 MiB direct reads: the device's time dominates the CPU's.
    let load = Load::shell(&format!(
        "while :; do dd if={} of=/dev/null bs=1M iflag=direct 2>/dev/null; done",
        file.path.display()
    ));
    // A configured workload: the dd processes the loop starts get its name.
    let config = file.path.with_extension("toml");
    std::fs::write(
        &config,
        concat!(
            "[[workload]]\nname = \"bulk-reader\"\nprocess = [\"dd\"]\n",
            "[[budget]]\nname = \"generous p95\"\nworkload = \"bulk-reader\"\n",
            "metric = \"storage_p95_ms\"\nmax = 10000.0\n",
            "[[budget]]\nname = \"stalls\"\nworkload = \"bulk-reader\"\n",
            "metric = \"lost_share_storage\"\nmax = 0.3\n",
        ),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (code, report) = diagnose_json(4, &["--config", config.to_str().unwrap()], environment);
    assert_probe_kinds(&report, environment);
    let _ = std::fs::remove_file(&config);
    let dd = workload(&report, "bulk-reader");
    // Budgets evaluated on the same window: the P95 ceiling holds, the stall share does not.
    let budgets = report["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 2);
    assert_eq!(
        (budgets[0]["name"].as_str(), budgets[0]["good"].as_bool()),
        (Some("generous p95"), Some(true))
    );
    assert_eq!(
        (budgets[1]["name"].as_str(), budgets[1]["good"].as_bool()),
        (Some("stalls"), Some(false))
    );
    assert!(budgets[1]["observed"].as_f64().unwrap() > 0.3);
    assert_eq!(dd["bottleneck"], "storage", "{dd:#}");
    let (major, minor) = file.device();
    let device = report["storage"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["major"] == major && d["minor"] == minor)
        .expect("the file's device");
    let evidence = dd["evidence"].as_array().unwrap();
    assert!(
        evidence.iter().any(|e| e
            .as_str()
            .unwrap()
            .starts_with(&format!("{}: P95", device["device"].as_str().unwrap()))),
        "{evidence:#?}"
    );
    assert_eq!(report["verdict"]["bottleneck"], "storage");
    assert_eq!(code, 3, "bottleneck found");
    let shares = &dd["time"];
    let sum: f64 = [
        "on_cpu",
        "waiting_for_cpu",
        "storage",
        "network",
        "gpu",
        "other_sleep",
    ]
    .iter()
    .map(|k| shares[k].as_f64().unwrap())
    .sum();
    assert!((sum - 1.0).abs() < 1e-9, "time fractions sum to {sum}");
    drop(load);
}

#[test]
fn a_spinner_is_a_cpu_bottleneck() {
    if !root_or_skip("cpu scenario") {
        return;
    }
    let _exclusive = exclusive();
    let load = Load::shell("while :; do :; done");
    std::thread::sleep(Duration::from_millis(300));
    let (code, report) = diagnose_json(3, &["--pid", &load.pid().to_string()], &[]);
    let sh = workload(&report, "sh");
    assert_eq!(sh["bottleneck"], "cpu", "{sh:#}");
    assert!(sh["time"]["on_cpu"].as_f64().unwrap() > 0.5, "{sh:#}");
    assert_eq!(report["verdict"]["workload"], "sh");
    assert_eq!(code, 3);
}

#[test]
fn bulk_sends_through_a_delayed_veth_are_a_network_bottleneck_on_that_peer() {
    network_scenario(5203, &[]);
}

/// The same scenario through the fallback for kernels before 5.15, where sched_switch cannot
/// read the system call from the thread's registers and raw_syscalls:sys_enter notes it.
#[test]
fn the_sys_enter_fallback_attributes_the_network_wait_too() {
    network_scenario(5204, &[("ENVELOPE_SYSCALL_PROBE", Path::new("sys_enter"))]);
}

fn network_scenario(port: u16, environment: &[(&str, &Path)]) {
    if !veth_tools_or_skip("network scenario") {
        return;
    }
    let _exclusive = exclusive();
    // Resolve (and if need be build) the binary first: the load below lasts 6 s, and a cargo
    // build inside diagnose_json would eat into it when this test runs first.
    integration_tests::envelope_binary();
    let pair = VethPair::create("4mbit", "400ms");
    let server_address = SocketAddrV4::new(pair.server_address, port);
    let server = pair.spawn_sink_server(server_address, Some(65536));
    // This test process is the workload: one thread sends for the whole window.
    let client = VethPair::in_namespace(&pair.client_namespace, move || {
        let mut stream = TcpStream::connect(server_address).expect("connect");
        let chunk = vec![7u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            stream.write_all(&chunk).expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let me = std::process::id().to_string();
    let (code, report) = diagnose_json(4, &["--pid", &me], environment);
    assert_probe_kinds(&report, environment);
    client.join().unwrap();
    server.join().unwrap();
    let syscall_probe = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["tracepoint"] == "raw_syscalls:sys_enter");
    // The fallback attaches sys_enter; the default path needs no probe on system calls.
    assert_eq!(
        syscall_probe.is_some_and(|p| p["attached"] == true),
        environment
            .iter()
            .any(|(name, _)| *name == "ENVELOPE_SYSCALL_PROBE"),
        "{:#}",
        report["probes"]
    );
    let workloads = report["workloads"].as_array().unwrap();
    assert_eq!(
        workloads.len(),
        1,
        "--pid narrows to this process: {workloads:#?}"
    );
    let this = &workloads[0];
    assert_eq!(this["bottleneck"], "network", "{this:#}");
    let evidence = this["evidence"].as_array().unwrap();
    assert!(
        evidence.iter().any(|e| e
            .as_str()
            .unwrap()
            .starts_with(&format!("{server_address}: RTT P95"))),
        "{evidence:#?}"
    );
    assert_eq!(code, 3);
}

#[test]
fn a_process_on_a_saturated_gpu_is_a_model_bottleneck_on_that_gpu() {
    if !root_or_skip("model scenario") {
        return;
    }
    let _exclusive = exclusive();
    let load = Load::shell("while :; do sleep 0.05; done");
    let script = std::env::temp_dir().join(format!(
        "envelope-model-scenario-{}.json",
        std::process::id()
    ));
    std::fs::write(
        &script,
        serde_json::to_vec(&serde_json::json!({
            "devices": [
                {"uuid": "GPU-idle", "name": "Fake A10", "utilization_gpu_percent": 2, "memory_total_bytes": 1u64 << 34},
                {"uuid": "GPU-busy", "name": "Fake H100", "utilization_gpu_percent": 98,
                 "memory_total_bytes": 1u64 << 36, "memory_used_bytes": 1u64 << 35, "throttle_reasons": 4,
                 "compute_processes": [{"pid": load.pid(), "memory_bytes": 1u64 << 34}]}
            ]
        }))
        .unwrap(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let library = fake_nvml_library().to_str().unwrap().to_string();
    let (code, report) = diagnose_json(
        3,
        &["--nvml-lib", &library, "--pid", &load.pid().to_string()],
        &[("FAKE_NVML_SCRIPT", &script)],
    );
    let _ = std::fs::remove_file(&script);
    let sh = workload(&report, "sh");
    assert_eq!(sh["bottleneck"], "model", "{sh:#}");
    assert_eq!(
        sh["summary"]
            .as_str()
            .unwrap()
            .split(" keeps GPU ")
            .nth(1)
            .unwrap(),
        "1 (Fake H100) 98% busy, throttled: sw_power_cap"
    );
    assert_eq!(code, 3);
}

#[test]
fn an_idle_process_has_no_bottleneck() {
    if !root_or_skip("idle scenario") {
        return;
    }
    let _exclusive = exclusive();
    let load = Load::shell("while :; do sleep 0.2; done");
    std::thread::sleep(Duration::from_millis(300));
    let (code, report) = diagnose_json(3, &["--pid", &load.pid().to_string()], &[]);
    assert_eq!(
        report["verdict"]["bottleneck"], "none",
        "{:#}",
        report["verdict"]
    );
    assert_eq!(code, 0, "no bottleneck");
}

/// A server that served a client and now waits in accept() for the next one is idle, not
/// held back by the network: its wait is other sleep, and its workload has no bottleneck.
#[test]
fn a_server_waiting_for_its_next_client_is_idle() {
    if !root_or_skip("idle server scenario") {
        return;
    }
    let _exclusive = exclusive();
    // Resolve (and if need be build) the binary first, so the window starts on time.
    integration_tests::envelope_binary();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    // Inside diagnose's 5 s window: one client served at ~2 s, then ~3 s in accept().
    let server = std::thread::spawn(move || {
        let (mut connection, _) = listener.accept().expect("first client");
        let mut request = [0u8; 5];
        connection.read_exact(&mut request).expect("request");
        connection.write_all(b"reply").expect("reply");
        let _ = listener.accept(); // the wait under test; the last connect below ends it
    });
    let client = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2000));
        let mut stream = TcpStream::connect(address).expect("connect");
        stream.write_all(b"hello").expect("send");
        let mut reply = [0u8; 5];
        stream.read_exact(&mut reply).expect("reply");
    });
    let me = std::process::id().to_string();
    let (code, report) = diagnose_json(5, &["--pid", &me], &[]);
    client.join().unwrap();
    let _ = TcpStream::connect(address);
    server.join().unwrap();
    let this = &report["workloads"][0];
    assert!(
        this["time"]["network"]
            .as_f64()
            .is_some_and(|share| share < 0.05),
        "accept() is not a network wait: {this:#}"
    );
    assert_eq!(this["bottleneck"], "none", "{this:#}");
    assert_eq!(code, 0, "no bottleneck");
}
