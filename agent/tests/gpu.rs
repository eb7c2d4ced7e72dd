//! GPU telemetry through the real NVML code path (nvml-wrapper, dlopen, FFI), against a fake
//! libnvidia-ml built from tests/fake-nvml whose answers each test scripts.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

use envelope::{
    analysis::gpu::summarize_gpu,
    host::{
        gpu::{GpuUnavailable, NvmlSource, load_nvml},
        system::LiveSystem,
    },
};
use serde_json::{Value, json};

/// Builds the fake library once and returns its path.
fn fake_nvml() -> &'static Path {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let output = Command::new(env!("CARGO"))
            .args(["build", "--package", "fake-nvml", "--message-format=json"])
            .current_dir(workspace)
            .output()
            .expect("cargo build fake-nvml");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|message| {
                message["reason"] == "compiler-artifact" && message["target"]["name"] == "fake_nvml"
            })
            .flat_map(|message| message["filenames"].as_array().cloned().unwrap_or_default())
            .filter_map(|file| file.as_str().map(PathBuf::from))
            .find(|file| file.extension().is_some_and(|ext| ext == "so"))
            .expect("cargo reported no libfake_nvml.so")
    })
}

/// The fake reads its script from one environment variable: one test at a time.
struct Script {
    path: PathBuf,
    _exclusive: MutexGuard<'static, ()>,
}

impl Script {
    fn new(content: &Value) -> Self {
        static EXCLUSIVE: Mutex<()> = Mutex::new(());
        let exclusive = EXCLUSIVE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path =
            std::env::temp_dir().join(format!("envelope-fake-nvml-{}.json", std::process::id()));
        let script = Self {
            path,
            _exclusive: exclusive,
        };
        script.set(content);
        // SAFETY: tests that read the environment hold the same lock.
        unsafe { std::env::set_var("FAKE_NVML_SCRIPT", &script.path) };
        script
    }

    fn set(&self, content: &Value) {
        std::fs::write(&self.path, serde_json::to_vec(content).unwrap()).unwrap();
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn two_gpus() -> Value {
    json!({
        "driver_version": "555.42.06",
        "devices": [
            {
                "uuid": "GPU-0000-aaaa", "name": "Fake H100",
                "utilization_gpu_percent": 97, "utilization_memory_percent": 41,
                "memory_total_bytes": 85_899_345_920u64, "memory_used_bytes": 42_949_672_960u64,
                "power_mw": 612_500, "energy_mj": 9_000_000, "temperature_c": 77,
                "sm_clock_mhz": 1980, "memory_clock_mhz": 2619,
                "throttle_reasons": 0x4 | 0x20,
                "pcie_tx_kb_per_s": 2000, "pcie_rx_kb_per_s": 500,
                "ecc_corrected": 3, "ecc_uncorrected": 0,
                "mig_mode": [1, 1],
                "compute_processes": [
                    {"pid": std::process::id(), "memory_bytes": 21_474_836_480u64},
                    {"pid": 4_000_000, "memory_bytes": 1_073_741_824u64}
                ],
                "process_sm_percent": [[std::process::id(), 88]]
            },
            {
                "uuid": "GPU-1111-bbbb", "name": "Fake T4",
                "utilization_gpu_percent": 3, "utilization_memory_percent": 1,
                "memory_total_bytes": 16_106_127_360u64, "memory_used_bytes": 268_435_456u64,
                "temperature_c": 40, "sm_clock_mhz": 300, "memory_clock_mhz": 405,
                "throttle_reasons": 1,
                "unsupported": ["GetPowerUsage", "GetTotalEnergyConsumption", "GetTotalEccErrors", "GetMigMode"],
                "graphics_processes": [{"pid": 4_000_001, "memory_bytes": 104_857_600u64}]
            }
        ]
    })
}

#[test]
fn every_value_arrives_exactly_through_the_ffi_path() {
    let _script = Script::new(&two_gpus());
    let nvml = load_nvml(Some(fake_nvml())).expect("load fake NVML");
    let mut source = NvmlSource::new(&nvml).expect("open fake NVML");
    assert_eq!(source.device_count(), 2);
    let sample = source.sample(Instant::now());
    assert!(sample.stale.is_empty(), "{:?}", sample.stale);
    let summary = summarize_gpu(&[sample], source.driver_version(), &LiveSystem);
    assert!(summary.available);
    assert_eq!(summary.driver_version.as_deref(), Some("555.42.06"));

    let h100 = &summary.devices[0];
    assert_eq!(
        (h100.index, h100.uuid.as_str(), h100.name.as_str()),
        (0, "GPU-0000-aaaa", "Fake H100")
    );
    assert_eq!(h100.utilization, Some(0.97));
    assert_eq!(h100.memory_utilization, Some(0.41));
    assert_eq!(h100.memory_total_bytes, Some(85_899_345_920));
    assert_eq!(h100.memory_used_bytes, Some(42_949_672_960));
    assert_eq!(h100.power_w, Some(612.5));
    assert_eq!(h100.energy_j, Some(9_000.0));
    assert_eq!(h100.temperature_c, Some(77));
    assert_eq!(
        (h100.sm_clock_mhz, h100.memory_clock_mhz),
        (Some(1980), Some(2619))
    );
    assert_eq!(
        h100.throttle_reasons,
        vec!["sw_power_cap", "sw_thermal_slowdown"]
    );
    assert_eq!(h100.pcie_tx_bytes_per_s, Some(2_048_000.0));
    assert_eq!(h100.pcie_rx_bytes_per_s, Some(512_000.0));
    assert_eq!(
        (h100.ecc_corrected_errors, h100.ecc_uncorrected_errors),
        (Some(3), Some(0))
    );
    assert_eq!(h100.mig_enabled, Some(true));
    assert!(h100.unsupported.is_empty(), "{:?}", h100.unsupported);

    // Unsupported fields are null and named, never zero.
    let t4 = &summary.devices[1];
    assert_eq!(t4.utilization, Some(0.03));
    assert_eq!(t4.power_w, None);
    assert_eq!(t4.energy_j, None);
    assert_eq!(
        (t4.ecc_corrected_errors, t4.ecc_uncorrected_errors),
        (None, None)
    );
    assert_eq!(t4.mig_enabled, None);
    assert_eq!(
        t4.unsupported,
        vec![
            "power",
            "energy",
            "ecc_corrected",
            "ecc_uncorrected",
            "mig_mode"
        ]
    );
    assert_eq!(t4.throttle_reasons, vec!["idle"]);

    // Processes: joined with /proc, largest memory first; SM only where the driver sampled.
    let me = std::process::id();
    let processes: Vec<_> = summary
        .processes
        .iter()
        .map(|p| (p.pid, p.gpu_index, p.memory_bytes, p.sm_utilization))
        .collect();
    assert_eq!(
        processes,
        vec![
            (me, Some(0), Some(21_474_836_480), Some(0.88)),
            (4_000_000, Some(0), Some(1_073_741_824), None),
            (4_000_001, Some(1), Some(104_857_600), None),
        ]
    );
    assert!(
        summary.processes[0].name.starts_with("gpu"),
        "test binary name: {}",
        summary.processes[0].name
    );
    assert_eq!(summary.processes[1].name, "exited");
}

#[test]
fn a_library_without_gpus_says_so() {
    let _script = Script::new(&json!({"devices": []}));
    let nvml = load_nvml(Some(fake_nvml())).expect("the library loads");
    let error = NvmlSource::new(&nvml).err().expect("no GPUs");
    assert!(matches!(error, GpuUnavailable::NoDevices), "{error}");
    assert_eq!(error.to_string(), "NVML reports no GPU on this machine");
}

#[test]
fn a_driver_that_is_not_loaded_says_what_to_do() {
    // 9 = NVML_ERROR_DRIVER_NOT_LOADED
    let _script = Script::new(&json!({"init_error": 9, "devices": []}));
    let error = load_nvml(Some(fake_nvml())).expect_err("init fails");
    assert!(
        matches!(error, GpuUnavailable::DriverNotLoaded(_)),
        "{error}"
    );
    assert!(error.to_string().contains("nvidia-smi"), "{error}");
}

#[test]
fn a_failing_gpu_goes_stale_backs_off_and_recovers() {
    let script = Script::new(&two_gpus());
    let nvml = load_nvml(Some(fake_nvml())).unwrap();
    let mut source = NvmlSource::new(&nvml).unwrap();
    let start = Instant::now();
    assert_eq!(source.sample(start).devices.len(), 2);

    let mut failing = two_gpus();
    failing["devices"][1]["fail_with"] = json!(999); // NVML_ERROR_UNKNOWN
    script.set(&failing);
    let sample = source.sample(start + Duration::from_millis(10));
    assert_eq!(
        sample.devices.iter().map(|d| d.index).collect::<Vec<_>>(),
        vec![0],
        "GPU 0 keeps reporting"
    );
    assert_eq!(sample.stale.len(), 1);
    assert_eq!(sample.stale[0].index, 1);
    assert_eq!(sample.stale[0].reason, "an internal driver error occurred"); // NVML_ERROR_UNKNOWN

    // Healthy again, but inside the backoff: not asked yet, still stale.
    script.set(&two_gpus());
    let sample = source.sample(start + Duration::from_millis(500));
    assert_eq!(
        sample.stale.iter().map(|s| s.index).collect::<Vec<_>>(),
        vec![1]
    );
    // After the backoff it is read again and recovers.
    let sample = source.sample(start + Duration::from_secs(2));
    assert!(sample.stale.is_empty());
    assert_eq!(sample.devices.len(), 2);
    assert_eq!(sample.devices[1].utilization_percent, Some(3));
}

#[test]
fn a_gpu_that_falls_off_the_bus_is_stale_not_fatal() {
    let script = Script::new(&two_gpus());
    let nvml = load_nvml(Some(fake_nvml())).unwrap();
    let mut source = NvmlSource::new(&nvml).unwrap();
    let mut lost = two_gpus();
    lost["devices"][0]["lost"] = json!(true);
    script.set(&lost);
    let sample = source.sample(Instant::now());
    assert_eq!(sample.stale.len(), 1);
    assert_eq!(sample.stale[0].index, 0);
    assert_eq!(sample.devices.len(), 1);
    assert_eq!(sample.devices[0].uuid, "GPU-1111-bbbb");
    // The lost GPU's processes are not reported from stale data.
    assert!(sample.processes.iter().all(|p| p.gpu_index == 1));
}

#[test]
fn critical_xid_errors_are_reported_per_gpu() {
    let mut script_content = two_gpus();
    // GPU 1 cannot be watched; GPU 0 reports XID 79 (fell off the bus) and 48 (DBE).
    script_content["devices"][1]["event_types"] = json!(0);
    let script = Script::new(&script_content);
    let nvml = load_nvml(Some(fake_nvml())).unwrap();
    let mut source = NvmlSource::new(&nvml).unwrap();
    let quiet = source.sample(Instant::now());
    assert!(quiet.xid_events.is_empty());
    assert!(quiet.devices[1].unsupported.contains(&"xid_errors"));
    assert!(!quiet.devices[0].unsupported.contains(&"xid_errors"));

    script_content["xid_events"] = json!([{"device": 0, "xid": 79}, {"device": 0, "xid": 48}]);
    script.set(&script_content);
    let noisy = source.sample(Instant::now());
    let summary = summarize_gpu(&[quiet, noisy], None, &LiveSystem);
    assert_eq!(summary.devices[0].xid_errors, vec![79, 48]);
    assert!(summary.devices[1].xid_errors.is_empty());
    // Delivered once: the next sample has none.
    assert!(source.sample(Instant::now()).xid_events.is_empty());
}

/// Loading probes needs root; tests that do skip otherwise.
fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The whole command, as root: `diagnose --json --nvml-lib` carries the documented GPU fields.
#[test]
fn diagnose_json_has_the_documented_gpu_fields() {
    if !is_root() {
        eprintln!(
            "skipping diagnose_json_has_the_documented_gpu_fields: needs root to load probes"
        );
        return;
    }
    let script = Script::new(&two_gpus());
    let output = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(["diagnose", "--duration", "1s", "--json", "--nvml-lib"])
        .arg(fake_nvml())
        .env("FAKE_NVML_SCRIPT", &script.path)
        .output()
        .expect("run envelope");
    // 0: no bottleneck, 3: one found; both are reports.
    assert!(
        matches!(output.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let gpu = &report["gpu"];
    assert_eq!(gpu["available"], true);
    let devices = gpu["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["index"], 0);
    assert_eq!(devices[0]["uuid"], "GPU-0000-aaaa");
    assert_eq!(devices[0]["name"], "Fake H100");
    assert_eq!(devices[0]["utilization"], 0.97);
    assert_eq!(devices[0]["memory_used_bytes"], 42_949_672_960u64);
    assert_eq!(devices[0]["memory_total_bytes"], 85_899_345_920u64);
    assert_eq!(devices[0]["power_w"], 612.5);
    assert_eq!(devices[0]["temperature_c"], 77);
    assert_eq!(
        devices[0]["throttle_reasons"],
        json!(["sw_power_cap", "sw_thermal_slowdown"])
    );
    assert_eq!(devices[1]["power_w"], Value::Null);
    assert!(
        devices[1]["unsupported"]
            .as_array()
            .unwrap()
            .contains(&json!("power"))
    );
    let processes = gpu["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 3);
    assert_eq!(processes[0]["gpu_index"], 0);
    assert_eq!(processes[0]["memory_bytes"], 21_474_836_480u64);
    assert_eq!(processes[0]["sm_utilization"], 0.88);
    assert_eq!(processes[2]["pid"], 4_000_001);
}

#[test]
fn no_library_means_no_gpu_section_and_one_line_why() {
    if !is_root() {
        eprintln!(
            "skipping no_library_means_no_gpu_section_and_one_line_why: needs root to load probes"
        );
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args([
            "diagnose",
            "--duration",
            "1s",
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
        ])
        .output()
        .expect("run envelope");
    assert!(
        matches!(output.status.code(), Some(0 | 3)),
        "a missing GPU is not fatal"
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let gpu_lines: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("GPU"))
        .collect();
    assert_eq!(gpu_lines.len(), 1, "{text}");
    assert!(
        gpu_lines[0].starts_with("GPU: not measured: no NVML library"),
        "{}",
        gpu_lines[0]
    );
}
