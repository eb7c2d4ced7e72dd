//! GPUs through NVML (nvml-wrapper; libnvidia-ml is loaded at run time, so the agent runs on
//! machines without a driver). Reads per GPU and per process; turns NVML's answers into plain
//! samples. A field the GPU or driver does not support is `None` and named in `unsupported`,
//! never a zero. A GPU whose calls fail is marked stale and retried with backoff; the agent
//! keeps going and logs only the transitions.
use std::{
    ffi::OsStr,
    path::Path,
    time::{Duration, Instant},
};

use crate::model::gpu::{GpuDeviceSample, GpuProcessSample, GpuSample, StaleGpu, XidEvent};
use nvml_wrapper::{
    EventSet, Nvml,
    bitmasks::event::EventTypes,
    enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor},
    enums::{device::UsedGpuMemory, event::XidError},
    error::NvmlError,
};

/// Library name the NVIDIA driver installs (found through the dynamic loader's paths).
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// Why there is no GPU section, in one line with what to do.
#[derive(Debug, thiserror::Error)]
pub enum GpuUnavailable {
    #[error(
        "no NVML library ({library}: {detail}); no NVIDIA driver here? If it is installed \
         off the usual paths, pass --nvml-lib /path/to/libnvidia-ml.so.1"
    )]
    NoLibrary { library: String, detail: String },
    #[error(
        "the NVIDIA driver is not loaded (NVML: {0}); load it (nvidia-smi should work) and retry"
    )]
    DriverNotLoaded(String),
    #[error(
        "no NVML library at {library}: the file does not exist; give --nvml-lib (or [agent] \
         nvml_lib) the path of the driver's libnvidia-ml.so.1 (`find / -name 'libnvidia-ml.so*'`)"
    )]
    GivenLibraryMissing { library: String },
    #[error(
        "{library} is not an NVML library ({detail}); give --nvml-lib (or [agent] nvml_lib) the \
         path of the driver's libnvidia-ml.so.1"
    )]
    NotNvml { library: String, detail: String },
    #[error("NVML reports no GPU on this machine")]
    NoDevices,
    #[error("NVML failed to start: {0}")]
    Init(String),
}

/// Retry state of one GPU.
#[derive(Clone, Debug, Default)]
struct DeviceHealth {
    consecutive_failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

/// Longest wait between retries of a failing GPU.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn backoff(consecutive_failures: u32) -> Duration {
    let exponent = consecutive_failures.saturating_sub(1).min(6);
    (Duration::from_secs(1) * 2u32.pow(exponent)).min(MAX_BACKOFF)
}

/// Reads GPUs through a loaded NVML (see [`load_nvml`]), which it borrows.
pub struct NvmlSource<'nvml> {
    nvml: &'nvml Nvml,
    health: Vec<DeviceHealth>,
    /// NVML's timestamp of the newest per-process utilization sample seen, per GPU.
    last_process_sample: Vec<u64>,
    /// Critical XID events of the GPUs that support them; None when none does.
    xid_events: Option<EventSet<'nvml>>,
    /// Per GPU: whether its XID errors are watched.
    xid_watched: Vec<bool>,
}

/// What NVML's answer means for a field: a value, unsupported, or a failure of the GPU.
enum FieldError {
    Unsupported,
    Failed(NvmlError),
}

fn classify(error: NvmlError) -> FieldError {
    match error {
        NvmlError::NotSupported
        | NvmlError::FunctionNotFound
        | NvmlError::FailedToLoadSymbol(_) => FieldError::Unsupported,
        other => FieldError::Failed(other),
    }
}

/// Reads optional fields, collecting unsupported names; the first real failure aborts.
struct FieldReader {
    unsupported: Vec<&'static str>,
}

impl FieldReader {
    fn read<T>(
        &mut self,
        name: &'static str,
        result: Result<T, NvmlError>,
    ) -> Result<Option<T>, NvmlError> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(error) => match classify(error) {
                FieldError::Unsupported => {
                    self.unsupported.push(name);
                    Ok(None)
                }
                FieldError::Failed(error) => Err(error),
            },
        }
    }
}

/// Loads NVML from `library` (default: the driver's libnvidia-ml.so.1).
pub fn load_nvml(library: Option<&Path>) -> Result<Nvml, GpuUnavailable> {
    let library_name = library.map_or_else(
        || DEFAULT_NVML_LIBRARY.to_string(),
        |p| p.display().to_string(),
    );
    if let Some(path) = library
        && !path.exists()
    {
        return Err(GpuUnavailable::GivenLibraryMissing {
            library: library_name,
        });
    }
    let mut builder = Nvml::builder();
    builder.lib_path(library.map_or(OsStr::new(DEFAULT_NVML_LIBRARY), Path::as_os_str));
    let given = library.is_some();
    builder.init().map_err(|error| match error {
        // A file the user named that the loader refuses (not a shared library, wrong
        // architecture) or that lacks NVML's entry point: not an NVML library.
        NvmlError::LibloadingError(detail) if given => GpuUnavailable::NotNvml {
            library: library_name.clone(),
            detail: detail.to_string(),
        },
        NvmlError::FailedToLoadSymbol(detail) if given => GpuUnavailable::NotNvml {
            library: library_name.clone(),
            detail,
        },
        NvmlError::LibloadingError(detail) => GpuUnavailable::NoLibrary {
            library: library_name.clone(),
            detail: detail.to_string(),
        },
        NvmlError::FailedToLoadSymbol(detail) => GpuUnavailable::NoLibrary {
            library: library_name.clone(),
            detail,
        },
        NvmlError::DriverNotLoaded => GpuUnavailable::DriverNotLoaded(error.to_string()),
        other => GpuUnavailable::Init(other.to_string()),
    })
}

impl<'nvml> NvmlSource<'nvml> {
    /// Counts the GPUs and starts watching their critical XID errors.
    pub fn new(nvml: &'nvml Nvml) -> Result<Self, GpuUnavailable> {
        let count = nvml
            .device_count()
            .map_err(|error| GpuUnavailable::Init(error.to_string()))?;
        if count == 0 {
            return Err(GpuUnavailable::NoDevices);
        }
        let mut source = Self {
            nvml,
            health: vec![DeviceHealth::default(); count as usize],
            last_process_sample: vec![0; count as usize],
            xid_events: None,
            xid_watched: vec![false; count as usize],
        };
        source.watch_xid_errors();
        Ok(source)
    }

    /// Registers every GPU that supports it for critical XID events. A GPU that cannot be
    /// watched reports `xid_errors` as unsupported; nothing else is lost.
    fn watch_xid_errors(&mut self) {
        let Ok(mut set) = self.nvml.create_event_set() else {
            return;
        };
        for index in 0..self.device_count() {
            let Ok(device) = self.nvml.device_by_index(index) else {
                continue;
            };
            let supported = device
                .supported_event_types()
                .is_ok_and(|types| types.contains(EventTypes::CRITICAL_XID_ERROR));
            if !supported {
                continue;
            }
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(registered) => {
                    set = registered;
                    self.xid_watched[index as usize] = true;
                }
                // Registration failure frees the set: stop watching rather than retry blindly.
                Err(error) => {
                    tracing::info!("GPU {index}: cannot watch XID errors ({})", error.error);
                    self.xid_watched
                        .iter_mut()
                        .for_each(|watched| *watched = false);
                    return;
                }
            }
        }
        if self.xid_watched.iter().any(|watched| *watched) {
            self.xid_events = Some(set);
        }
    }

    /// Every XID event waiting in the set, without blocking.
    fn drain_xid_events(&self) -> Vec<XidEvent> {
        let Some(set) = &self.xid_events else {
            return Vec::new();
        };
        let mut events = Vec::new();
        // Bounded: a storm of events cannot hold up the sample.
        for _ in 0..1024 {
            match set.wait(0) {
                Ok(event) => {
                    let Ok(gpu_index) = event.device.index() else {
                        continue;
                    };
                    let xid = match event.event_data {
                        Some(XidError::Value(code)) => Some(code),
                        _ => None,
                    };
                    tracing::warn!(
                        "GPU {gpu_index}: critical XID error {}",
                        xid.map_or("unknown".to_string(), |x| x.to_string())
                    );
                    events.push(XidEvent { gpu_index, xid });
                }
                // Timeout: nothing more is waiting.
                Err(_) => break,
            }
        }
        events
    }

    pub fn device_count(&self) -> u32 {
        self.health.len() as u32
    }

    pub fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }

    /// Reads every GPU that is not waiting out a backoff.
    pub fn sample(&mut self, now: Instant) -> GpuSample {
        let mut sample = GpuSample {
            xid_events: self.drain_xid_events(),
            ..GpuSample::default()
        };
        for index in 0..self.device_count() {
            let health = &self.health[index as usize];
            if health.retry_at.is_some_and(|at| now < at) {
                sample.stale.push(StaleGpu {
                    index,
                    reason: health.last_error.clone().unwrap_or_default(),
                });
                continue;
            }
            match self.read_device(index) {
                Ok((device, processes)) => {
                    let health = &mut self.health[index as usize];
                    if health.consecutive_failures > 0 {
                        tracing::info!(
                            "GPU {index} answers again after {} failed reads",
                            health.consecutive_failures
                        );
                    }
                    *health = DeviceHealth::default();
                    sample.devices.push(device);
                    sample.processes.extend(processes);
                }
                Err(error) => {
                    let health = &mut self.health[index as usize];
                    health.consecutive_failures += 1;
                    health.retry_at = Some(now + backoff(health.consecutive_failures));
                    let reason = error.to_string();
                    if health.consecutive_failures == 1 {
                        tracing::warn!(
                            "GPU {index} is stale: NVML says \"{reason}\"; retrying with backoff"
                        );
                    }
                    health.last_error = Some(reason.clone());
                    sample.stale.push(StaleGpu { index, reason });
                }
            }
        }
        sample
    }

    fn read_device(
        &mut self,
        index: u32,
    ) -> Result<(GpuDeviceSample, Vec<GpuProcessSample>), NvmlError> {
        let device = self.nvml.device_by_index(index)?;
        // Identity and the headline figures: a failure here is a failure of the GPU.
        let uuid = device.uuid()?;
        let name = device.name()?;
        let mut fields = FieldReader {
            unsupported: Vec::new(),
        };
        let utilization = fields.read("utilization", device.utilization_rates())?;
        let memory = fields.read("memory", device.memory_info())?;
        let power_mw = fields.read("power", device.power_usage())?;
        let energy_mj = fields.read("energy", device.total_energy_consumption())?;
        let temperature_c =
            fields.read("temperature", device.temperature(TemperatureSensor::Gpu))?;
        let sm_clock_mhz = fields.read("sm_clock", device.clock_info(Clock::SM))?;
        let memory_clock_mhz = fields.read("memory_clock", device.clock_info(Clock::Memory))?;
        let throttle = fields.read("throttle_reasons", device.current_throttle_reasons())?;
        let pcie_tx = fields.read("pcie_tx", device.pcie_throughput(PcieUtilCounter::Send))?;
        let pcie_rx = fields.read("pcie_rx", device.pcie_throughput(PcieUtilCounter::Receive))?;
        let ecc_corrected = fields.read(
            "ecc_corrected",
            device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
        )?;
        let ecc_uncorrected = fields.read(
            "ecc_uncorrected",
            device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        )?;
        let mig = fields.read("mig_mode", device.mig_mode())?;
        if !self.xid_watched[index as usize] {
            fields.unsupported.push("xid_errors");
        }

        // Processes: compute and graphics contexts, joined with the driver's SM samples.
        let mut processes: Vec<GpuProcessSample> = Vec::new();
        for list in [
            device.running_compute_processes(),
            device.running_graphics_processes(),
        ] {
            let list = fields.read("processes", list)?.unwrap_or_default();
            for process in list {
                if processes.iter().any(|known| known.pid == process.pid) {
                    continue;
                }
                processes.push(GpuProcessSample {
                    pid: process.pid,
                    gpu_index: index,
                    memory_bytes: match process.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => Some(bytes),
                        UsedGpuMemory::Unavailable => None,
                    },
                    sm_utilization_percent: None,
                });
            }
        }
        let last_seen = self.last_process_sample[index as usize];
        let samples = match device.process_utilization_stats(last_seen) {
            // NOT_FOUND: no process ran a kernel since `last_seen`.
            Err(NvmlError::NotFound) => Vec::new(),
            other => fields
                .read("process_utilization", other)?
                .unwrap_or_default(),
        };
        for utilization_sample in samples {
            self.last_process_sample[index as usize] =
                self.last_process_sample[index as usize].max(utilization_sample.timestamp);
            if let Some(process) = processes
                .iter_mut()
                .find(|p| p.pid == utilization_sample.pid)
            {
                process.sm_utilization_percent = Some(utilization_sample.sm_util);
            }
        }
        fields.unsupported.dedup();

        let device_sample = GpuDeviceSample {
            index,
            uuid,
            name,
            utilization_percent: utilization.as_ref().map(|u| u.gpu),
            memory_utilization_percent: utilization.as_ref().map(|u| u.memory),
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            power_mw,
            energy_mj,
            temperature_c,
            sm_clock_mhz,
            memory_clock_mhz,
            throttle_reasons_mask: throttle.map(|reasons| reasons.bits()),
            pcie_tx_kib_per_s: pcie_tx,
            pcie_rx_kib_per_s: pcie_rx,
            ecc_corrected_errors: ecc_corrected,
            ecc_uncorrected_errors: ecc_uncorrected,
            mig_enabled: mig.map(|mode| mode.current == 1),
            unsupported: fields.unsupported,
        };
        Ok((device_sample, processes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn a_missing_library_says_what_to_do() {
        let error = load_nvml(Some(Path::new("/nonexistent/libnvidia-ml.so.1")))
            .err()
            .unwrap();
        let message = error.to_string();
        assert!(message.contains("no NVML library"), "{message}");
        assert!(message.contains("--nvml-lib"), "{message}");
        // The user named the file: say it does not exist, not that no driver is installed.
        assert!(
            message.starts_with(
                "no NVML library at /nonexistent/libnvidia-ml.so.1: the file does not exist"
            ),
            "{message}"
        );
        assert!(!message.contains("no NVIDIA driver here"), "{message}");
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("libnvidia-ml.so.1");
        std::fs::write(&text, "not a library").unwrap();
        let not_nvml = load_nvml(Some(&text)).err().unwrap().to_string();
        assert!(
            not_nvml.starts_with(&format!("{} is not an NVML library (", text.display())),
            "{not_nvml}"
        );
    }
}
