//! GPUs as plain samples: what the NVML reader (host/gpu.rs) produces and the window
//! summary (analysis/gpu.rs) reads. `None` fields are unsupported on that GPU or driver.
use serde::Serialize;

/// One GPU at one moment. `None` fields are unsupported on this GPU or driver.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuDeviceSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub utilization_percent: Option<u32>,
    pub memory_utilization_percent: Option<u32>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub power_mw: Option<u32>,
    pub energy_mj: Option<u64>,
    pub temperature_c: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_clock_mhz: Option<u32>,
    /// NVML's clocks-throttle-reasons bit mask.
    pub throttle_reasons_mask: Option<u64>,
    pub pcie_tx_kib_per_s: Option<u32>,
    pub pcie_rx_kib_per_s: Option<u32>,
    pub ecc_corrected_errors: Option<u64>,
    pub ecc_uncorrected_errors: Option<u64>,
    pub mig_enabled: Option<bool>,
    /// Names of the fields above that this GPU or driver does not support.
    pub unsupported: Vec<&'static str>,
}

/// A critical XID error the driver reported (e.g. 79: fell off the bus, 48: double-bit ECC).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct XidEvent {
    pub gpu_index: u32,
    /// None when the driver could not say which XID it was.
    pub xid: Option<u64>,
}

/// One process using a GPU at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuProcessSample {
    pub pid: u32,
    pub gpu_index: u32,
    /// None when the driver cannot tell (e.g. Windows WDDM).
    pub memory_bytes: Option<u64>,
    /// SM utilization percent in the driver's last sampling period; None without a sample.
    pub sm_utilization_percent: Option<u32>,
}

/// A GPU that could not be read this time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StaleGpu {
    pub index: u32,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub devices: Vec<GpuDeviceSample>,
    pub processes: Vec<GpuProcessSample>,
    pub stale: Vec<StaleGpu>,
    /// Critical XID errors delivered since the previous sample.
    pub xid_events: Vec<XidEvent>,
}

/// Which CUDA calls the opt-in uprobes count (`[gpu] cuda_probes`, `diagnose --cuda-probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum CudaProbes {
    /// No uprobes: GPU waits are inferred from ioctl/poll sleeps of processes with a GPU
    /// context.
    #[default]
    #[serde(rename = "off")]
    Off,
    /// Synchronisations, copies and allocations.
    #[serde(rename = "sync")]
    Sync,
    /// Kernel launches too: each costs a uprobe round trip (see README).
    #[serde(rename = "sync+launch")]
    SyncAndLaunch,
}

impl CudaProbes {
    pub const NAMES: [&'static str; 3] = ["off", "sync", "sync+launch"];

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "off" => Some(Self::Off),
            "sync" => Some(Self::Sync),
            "sync+launch" => Some(Self::SyncAndLaunch),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Sync => "sync",
            Self::SyncAndLaunch => "sync+launch",
        }
    }

    /// Whether functions of this call class are probed in this mode.
    pub fn probes(self, call: u8) -> bool {
        match self {
            Self::Off => false,
            Self::Sync => call != agent_common::cuda::call::LAUNCH,
            Self::SyncAndLaunch => true,
        }
    }
}

/// NVML clocks-throttle-reason bits (nvml.h `nvmlClocksThrottleReason*`) and their names.
pub const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "idle"),
    (0x2, "applications_clocks"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clocks"),
];

/// Names of the reasons set in an NVML mask, in bit order.
pub fn throttle_reason_names(mask: u64) -> Vec<&'static str> {
    THROTTLE_REASONS
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_masks_name_every_set_bit() {
        assert_eq!(throttle_reason_names(0), Vec::<&str>::new());
        assert_eq!(
            throttle_reason_names(0x4 | 0x40),
            vec!["sw_power_cap", "hw_thermal_slowdown"]
        );
        assert_eq!(throttle_reason_names(0x1ff).len(), 9);
    }
}
