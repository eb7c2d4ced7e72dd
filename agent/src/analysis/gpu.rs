//! Summarises GPU samples over a window: per GPU and per process, units kept end to end
//! (fractions stay 0..1, bytes stay bytes, watts, degrees Celsius).
use std::collections::BTreeMap;

use serde::Serialize;

use super::cuda::CudaActivity;
use crate::model::{
    gpu::{GpuSample, StaleGpu, throttle_reason_names},
    process::SystemNames,
};

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuDeviceSummary {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    /// Mean share of time a kernel ran, 0..1.
    pub utilization: Option<f64>,
    /// Mean share of time device memory was read or written, 0..1.
    pub memory_utilization: Option<f64>,
    /// Last reading.
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// Mean power draw.
    pub power_w: Option<f64>,
    /// Energy counter since the driver loaded, last reading.
    pub energy_j: Option<f64>,
    /// Highest reading.
    pub temperature_c: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// Every reason seen active in the window (NVML names, e.g. "sw_power_cap").
    pub throttle_reasons: Vec<&'static str>,
    pub pcie_tx_bytes_per_s: Option<f64>,
    pub pcie_rx_bytes_per_s: Option<f64>,
    pub ecc_corrected_errors: Option<u64>,
    pub ecc_uncorrected_errors: Option<u64>,
    pub mig_enabled: Option<bool>,
    /// Critical XID errors reported in the window, in order (999: the driver did not say which).
    pub xid_errors: Vec<u64>,
    /// Fields this GPU or driver does not support (their values above are null).
    pub unsupported: Vec<&'static str>,
    /// Readings that went into the figures.
    pub samples: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuProcessSummary {
    pub pid: u32,
    pub name: String,
    pub cgroup: Option<String>,
    /// None for a process only the CUDA probes saw (NVML did not list it, or there is no
    /// NVML).
    pub gpu_index: Option<u32>,
    /// Most GPU memory seen in use.
    pub memory_bytes: Option<u64>,
    /// Mean SM utilization over the driver's samples, 0..1; null without samples.
    pub sm_utilization: Option<f64>,
    /// Its CUDA calls in the window, when the CUDA probes are on and saw it call.
    pub cuda: Option<CudaActivity>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuSummary {
    /// False when NVML could not be used; `reason` says why.
    pub available: bool,
    pub reason: Option<String>,
    pub driver_version: Option<String>,
    pub devices: Vec<GpuDeviceSummary>,
    pub processes: Vec<GpuProcessSummary>,
    /// GPUs whose last read failed, and NVML's error.
    pub stale: Vec<StaleGpu>,
}

impl GpuSummary {
    pub fn unavailable(reason: String) -> Self {
        Self {
            available: false,
            reason: Some(reason),
            ..Self::default()
        }
    }
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Rounds away float noise from averaging, keeping 4 significant decimals of a fraction.
fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

pub fn summarize_gpu(
    samples: &[GpuSample],
    driver_version: Option<String>,
    names: &dyn SystemNames,
) -> GpuSummary {
    #[derive(Default)]
    struct Device {
        summary: GpuDeviceSummary,
        utilization: Vec<f64>,
        memory_utilization: Vec<f64>,
        power_w: Vec<f64>,
        pcie_tx: Vec<f64>,
        pcie_rx: Vec<f64>,
        throttle_mask: u64,
    }
    let mut devices: BTreeMap<u32, Device> = BTreeMap::new();
    let mut processes: BTreeMap<(u32, u32), (Option<u64>, Vec<f64>)> = BTreeMap::new();
    for sample in samples {
        for reading in &sample.devices {
            let device = devices.entry(reading.index).or_default();
            let summary = &mut device.summary;
            summary.index = reading.index;
            summary.uuid.clone_from(&reading.uuid);
            summary.name.clone_from(&reading.name);
            summary.samples += 1;
            device
                .utilization
                .extend(reading.utilization_percent.map(|p| f64::from(p) / 100.0));
            device.memory_utilization.extend(
                reading
                    .memory_utilization_percent
                    .map(|p| f64::from(p) / 100.0),
            );
            device
                .power_w
                .extend(reading.power_mw.map(|mw| f64::from(mw) / 1000.0));
            // NVML reports PCIe throughput in KiB/s.
            device
                .pcie_tx
                .extend(reading.pcie_tx_kib_per_s.map(|k| f64::from(k) * 1024.0));
            device
                .pcie_rx
                .extend(reading.pcie_rx_kib_per_s.map(|k| f64::from(k) * 1024.0));
            device.throttle_mask |= reading.throttle_reasons_mask.unwrap_or(0);
            summary.memory_used_bytes = reading.memory_used_bytes;
            summary.memory_total_bytes = reading.memory_total_bytes;
            summary.energy_j = reading.energy_mj.map(|mj| mj as f64 / 1000.0);
            summary.temperature_c = summary.temperature_c.max(reading.temperature_c);
            summary.sm_clock_mhz = reading.sm_clock_mhz;
            summary.memory_clock_mhz = reading.memory_clock_mhz;
            summary.ecc_corrected_errors = reading.ecc_corrected_errors;
            summary.ecc_uncorrected_errors = reading.ecc_uncorrected_errors;
            summary.mig_enabled = reading.mig_enabled;
            summary.unsupported.clone_from(&reading.unsupported);
        }
        for event in &sample.xid_events {
            devices
                .entry(event.gpu_index)
                .or_default()
                .summary
                .xid_errors
                .push(event.xid.unwrap_or(999));
        }
        for process in &sample.processes {
            let entry = processes
                .entry((process.gpu_index, process.pid))
                .or_default();
            entry.0 = entry.0.max(process.memory_bytes);
            entry
                .1
                .extend(process.sm_utilization_percent.map(|p| f64::from(p) / 100.0));
        }
    }
    let devices = devices
        .into_values()
        .map(|device| {
            let mut summary = device.summary;
            summary.utilization = mean(&device.utilization).map(|v| round(v, 4));
            summary.memory_utilization = mean(&device.memory_utilization).map(|v| round(v, 4));
            summary.power_w = mean(&device.power_w).map(|v| round(v, 3));
            summary.pcie_tx_bytes_per_s = mean(&device.pcie_tx).map(|v| v.round());
            summary.pcie_rx_bytes_per_s = mean(&device.pcie_rx).map(|v| v.round());
            summary.throttle_reasons = throttle_reason_names(device.throttle_mask);
            summary
        })
        .collect();
    let mut processes: Vec<GpuProcessSummary> = processes
        .into_iter()
        .map(|((gpu_index, pid), (memory_bytes, sm))| {
            let identity = names.process(pid, "");
            GpuProcessSummary {
                pid,
                name: if identity.name.is_empty() {
                    "exited".to_string()
                } else {
                    identity.name
                },
                cgroup: identity.cgroup,
                gpu_index: Some(gpu_index),
                memory_bytes,
                sm_utilization: mean(&sm).map(|v| round(v, 4)),
                cuda: None,
            }
        })
        .collect();
    processes.sort_by(|a, b| b.memory_bytes.cmp(&a.memory_bytes).then(a.pid.cmp(&b.pid)));
    GpuSummary {
        available: true,
        reason: None,
        driver_version,
        devices,
        processes,
        stale: samples.last().map(|s| s.stale.clone()).unwrap_or_default(),
    }
}

/// Adds each process's CUDA calls to its rows (a process on two GPUs: to the first), and a
/// row for each process only the CUDA probes saw.
pub fn add_cuda(gpu: &mut GpuSummary, cuda: &BTreeMap<u32, CudaActivity>, names: &dyn SystemNames) {
    for (&pid, activity) in cuda {
        match gpu.processes.iter_mut().find(|process| process.pid == pid) {
            Some(process) => process.cuda = Some(activity.clone()),
            None => {
                let identity = names.process(pid, "");
                gpu.processes.push(GpuProcessSummary {
                    pid,
                    name: if identity.name.is_empty() {
                        "exited".to_string()
                    } else {
                        identity.name
                    },
                    cgroup: identity.cgroup,
                    gpu_index: None,
                    memory_bytes: None,
                    sm_utilization: None,
                    cuda: Some(activity.clone()),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        gpu::{GpuDeviceSample, GpuProcessSample},
        process::{ProcessIdentity, ProcessKind},
    };

    struct Names;
    impl SystemNames for Names {
        fn block_device_name(&self, _: u32, _: u32) -> Option<String> {
            None
        }
        fn process(&self, tgid: u32, _: &str) -> ProcessIdentity {
            ProcessIdentity {
                name: format!("proc{tgid}"),
                kind: ProcessKind::Process,
                cgroup: None,
                executable: None,
            }
        }
    }

    fn reading(
        utilization: u32,
        power_mw: u32,
        temperature: u32,
        throttle: u64,
    ) -> GpuDeviceSample {
        GpuDeviceSample {
            index: 0,
            uuid: "GPU-1".into(),
            name: "Fake".into(),
            utilization_percent: Some(utilization),
            memory_utilization_percent: Some(10),
            memory_used_bytes: Some(utilization as u64 * 1000),
            memory_total_bytes: Some(80 << 30),
            power_mw: Some(power_mw),
            temperature_c: Some(temperature),
            throttle_reasons_mask: Some(throttle),
            pcie_tx_kib_per_s: Some(1000),
            ..GpuDeviceSample::default()
        }
    }

    #[test]
    fn window_means_maxima_and_last_values() {
        let samples = vec![
            GpuSample {
                devices: vec![reading(50, 200_000, 60, 0x4)],
                ..GpuSample::default()
            },
            GpuSample {
                devices: vec![reading(100, 300_000, 70, 0x40)],
                ..GpuSample::default()
            },
        ];
        let summary = summarize_gpu(&samples, Some("555.42".into()), &Names);
        let [gpu] = summary.devices.as_slice() else {
            panic!()
        };
        assert_eq!(gpu.utilization, Some(0.75));
        assert_eq!(gpu.memory_utilization, Some(0.1));
        assert_eq!(gpu.power_w, Some(250.0));
        assert_eq!(gpu.temperature_c, Some(70));
        assert_eq!(gpu.memory_used_bytes, Some(100_000));
        assert_eq!(
            gpu.throttle_reasons,
            vec!["sw_power_cap", "hw_thermal_slowdown"]
        );
        assert_eq!(gpu.pcie_tx_bytes_per_s, Some(1_024_000.0));
        assert_eq!(gpu.power_w, Some(250.0));
        assert_eq!(gpu.samples, 2);
        assert_eq!(gpu.energy_j, None);
        assert_eq!(summary.driver_version.as_deref(), Some("555.42"));
    }

    #[test]
    fn processes_keep_peak_memory_and_mean_sm() {
        let process = |memory, sm| GpuProcessSample {
            pid: 7,
            gpu_index: 1,
            memory_bytes: Some(memory),
            sm_utilization_percent: sm,
        };
        let samples = vec![
            GpuSample {
                processes: vec![process(2 << 30, Some(80))],
                ..GpuSample::default()
            },
            GpuSample {
                processes: vec![process(3 << 30, None)],
                ..GpuSample::default()
            },
            GpuSample {
                processes: vec![process(1 << 30, Some(60))],
                ..GpuSample::default()
            },
        ];
        let summary = summarize_gpu(&samples, None, &Names);
        assert_eq!(summary.processes.len(), 1);
        let p = &summary.processes[0];
        assert_eq!((p.pid, p.gpu_index, p.name.as_str()), (7, Some(1), "proc7"));
        assert_eq!(p.memory_bytes, Some(3 << 30));
        assert_eq!(p.sm_utilization, Some(0.7));
    }
}
