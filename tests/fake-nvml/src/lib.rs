//! A fake `libnvidia-ml.so`: exports the NVML C functions envelope calls, answering from a
//! JSON script the test writes. The script is re-read on every call, so a test can change the
//! GPUs' state mid-run (a call that starts failing, a GPU that disappears).
//!
//! `FAKE_NVML_SCRIPT` names the script file. Error codes are NVML's (`nvmlReturn_t`).
#![allow(clippy::missing_safety_doc, non_snake_case)]

use std::{
    ffi::{c_char, c_uint, c_ulonglong},
    os::raw::c_void,
};

use serde::Deserialize;

const SUCCESS: u32 = 0;
const ERROR_UNINITIALIZED: u32 = 1;
const ERROR_INVALID_ARGUMENT: u32 = 2;
const ERROR_NOT_SUPPORTED: u32 = 3;
const ERROR_INSUFFICIENT_SIZE: u32 = 7;
const ERROR_NOT_FOUND: u32 = 6;
const ERROR_GPU_IS_LOST: u32 = 15;
const ERROR_UNKNOWN: u32 = 999;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Script {
    /// nvmlInit_v2 returns this code when set (e.g. 9 = driver not loaded).
    init_error: Option<u32>,
    driver_version: String,
    devices: Vec<FakeDevice>,
    /// Critical XID events, delivered in order, one per nvmlEventSetWait call.
    xid_events: Vec<FakeXid>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct FakeXid {
    device: u32,
    xid: u64,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct FakeDevice {
    uuid: String,
    name: String,
    utilization_gpu_percent: u32,
    utilization_memory_percent: u32,
    memory_total_bytes: u64,
    memory_used_bytes: u64,
    power_mw: u32,
    energy_mj: u64,
    temperature_c: u32,
    sm_clock_mhz: u32,
    memory_clock_mhz: u32,
    throttle_reasons: u64,
    pcie_tx_kb_per_s: u32,
    pcie_rx_kb_per_s: u32,
    ecc_corrected: u64,
    ecc_uncorrected: u64,
    mig_mode: Option<(u32, u32)>,
    compute_processes: Vec<FakeProcess>,
    graphics_processes: Vec<FakeProcess>,
    process_sm_percent: Vec<(u32, u32)>,
    /// Names of functions (without the `nvmlDevice` prefix, e.g. "GetPowerUsage") that
    /// answer NOT_SUPPORTED.
    unsupported: Vec<String>,
    /// When set, every per-device call answers this error code (e.g. 999 unknown).
    fail_with: Option<u32>,
    /// The GPU fell off the bus: handle lookups and calls answer GPU_IS_LOST.
    lost: bool,
    /// nvmlEventType bits the GPU supports; default: critical XID (8).
    event_types: Option<u64>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct FakeProcess {
    pid: u32,
    memory_bytes: u64,
}

fn script() -> Script {
    let Some(path) = std::env::var_os("FAKE_NVML_SCRIPT") else {
        return Script::default();
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// Device handles are the index plus one, so a null handle is never valid.
fn handle_of(index: u32) -> *mut c_void {
    (index as usize + 1) as *mut c_void
}

/// The scripted device behind a handle, or the error the call must answer.
fn device(handle: *mut c_void, function: &str) -> Result<FakeDevice, u32> {
    let index = (handle as usize)
        .checked_sub(1)
        .ok_or(ERROR_INVALID_ARGUMENT)?;
    let device = script()
        .devices
        .get(index)
        .cloned()
        .ok_or(ERROR_GPU_IS_LOST)?;
    if device.lost {
        return Err(ERROR_GPU_IS_LOST);
    }
    if let Some(code) = device.fail_with {
        return Err(code);
    }
    if device.unsupported.iter().any(|name| name == function) {
        return Err(ERROR_NOT_SUPPORTED);
    }
    Ok(device)
}

/// Runs `answer` on the device and writes through its pointers, or returns the error code.
macro_rules! with_device {
    ($handle:expr, $function:literal, |$device:ident| $body:block) => {
        match device($handle, $function) {
            Ok($device) => {
                $body;
                SUCCESS
            }
            Err(code) => code,
        }
    };
}

unsafe fn write_c_string(text: &str, out: *mut c_char, length: c_uint) -> u32 {
    if out.is_null() || text.len() + 1 > length as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr().cast(), out, text.len());
        *out.add(text.len()) = 0;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> u32 {
    script().init_error.unwrap_or(SUCCESS)
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> u32 {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> u32 {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(_code: u32) -> *const c_char {
    c"fake NVML error".as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(out: *mut c_char, length: c_uint) -> u32 {
    unsafe { write_c_string(&script().driver_version, out, length) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> u32 {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    unsafe { *count = script().devices.len() as c_uint };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    out: *mut *mut c_void,
) -> u32 {
    let script = script();
    match script.devices.get(index as usize) {
        None => ERROR_INVALID_ARGUMENT,
        Some(device) if device.lost => ERROR_GPU_IS_LOST,
        Some(_) => {
            unsafe { *out = handle_of(index) };
            SUCCESS
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(handle: *mut c_void, out: *mut c_uint) -> u32 {
    with_device!(handle, "GetIndex", |_device| {
        unsafe { *out = handle as usize as c_uint - 1 }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    handle: *mut c_void,
    out: *mut c_char,
    length: c_uint,
) -> u32 {
    match device(handle, "GetUUID") {
        Ok(device) => unsafe { write_c_string(&device.uuid, out, length) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    handle: *mut c_void,
    out: *mut c_char,
    length: c_uint,
) -> u32 {
    match device(handle, "GetName") {
        Ok(device) => unsafe { write_c_string(&device.name, out, length) },
        Err(code) => code,
    }
}

#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    handle: *mut c_void,
    out: *mut Utilization,
) -> u32 {
    with_device!(handle, "GetUtilizationRates", |device| {
        unsafe {
            *out = Utilization {
                gpu: device.utilization_gpu_percent,
                memory: device.utilization_memory_percent,
            }
        }
    })
}

#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    handle: *mut c_void,
    out: *mut MemoryV2,
) -> u32 {
    with_device!(handle, "GetMemoryInfo_v2", |device| {
        unsafe {
            (*out).total = device.memory_total_bytes;
            (*out).reserved = 0;
            (*out).used = device.memory_used_bytes;
            (*out).free = device
                .memory_total_bytes
                .saturating_sub(device.memory_used_bytes);
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(handle: *mut c_void, out: *mut c_uint) -> u32 {
    with_device!(handle, "GetPowerUsage", |device| {
        unsafe { *out = device.power_mw }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    handle: *mut c_void,
    out: *mut c_ulonglong,
) -> u32 {
    with_device!(handle, "GetTotalEnergyConsumption", |device| {
        unsafe { *out = device.energy_mj }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    handle: *mut c_void,
    sensor: c_uint,
    out: *mut c_uint,
) -> u32 {
    if sensor != 0 {
        return ERROR_INVALID_ARGUMENT; // only NVML_TEMPERATURE_GPU exists
    }
    with_device!(handle, "GetTemperature", |device| {
        unsafe { *out = device.temperature_c }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    handle: *mut c_void,
    clock: c_uint,
    out: *mut c_uint,
) -> u32 {
    // NVML_CLOCK_GRAPHICS 0, SM 1, MEM 2, VIDEO 3
    with_device!(handle, "GetClockInfo", |device| {
        unsafe {
            *out = match clock {
                1 => device.sm_clock_mhz,
                2 => device.memory_clock_mhz,
                _ => 0,
            }
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    handle: *mut c_void,
    out: *mut c_ulonglong,
) -> u32 {
    with_device!(handle, "GetCurrentClocksThrottleReasons", |device| {
        unsafe { *out = device.throttle_reasons }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    handle: *mut c_void,
    counter: c_uint,
    out: *mut c_uint,
) -> u32 {
    // NVML_PCIE_UTIL_TX_BYTES 0, RX 1 (KB/s)
    with_device!(handle, "GetPcieThroughput", |device| {
        unsafe {
            *out = if counter == 0 {
                device.pcie_tx_kb_per_s
            } else {
                device.pcie_rx_kb_per_s
            }
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    handle: *mut c_void,
    error_type: c_uint,
    _counter_type: c_uint,
    out: *mut c_ulonglong,
) -> u32 {
    // NVML_MEMORY_ERROR_TYPE_CORRECTED 0, UNCORRECTED 1
    with_device!(handle, "GetTotalEccErrors", |device| {
        unsafe {
            *out = if error_type == 0 {
                device.ecc_corrected
            } else {
                device.ecc_uncorrected
            }
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    handle: *mut c_void,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> u32 {
    match device(handle, "GetMigMode") {
        Ok(FakeDevice {
            mig_mode: Some((now, next)),
            ..
        }) => {
            unsafe {
                *current = now;
                *pending = next;
            }
            SUCCESS
        }
        Ok(_) => ERROR_NOT_SUPPORTED,
        Err(code) => code,
    }
}

#[repr(C)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// NVML's two-call protocol: with too small a buffer, say how many entries there are.
unsafe fn write_processes(
    processes: &[FakeProcess],
    count: *mut c_uint,
    out: *mut ProcessInfo,
) -> u32 {
    unsafe {
        if processes.is_empty() {
            *count = 0;
            return SUCCESS;
        }
        if out.is_null() || (*count as usize) < processes.len() {
            *count = processes.len() as c_uint;
            return ERROR_INSUFFICIENT_SIZE;
        }
        for (i, process) in processes.iter().enumerate() {
            *out.add(i) = ProcessInfo {
                pid: process.pid,
                used_gpu_memory: process.memory_bytes,
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            };
        }
        *count = processes.len() as c_uint;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    handle: *mut c_void,
    count: *mut c_uint,
    out: *mut ProcessInfo,
) -> u32 {
    match device(handle, "GetComputeRunningProcesses_v3") {
        Ok(device) => unsafe { write_processes(&device.compute_processes, count, out) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    handle: *mut c_void,
    count: *mut c_uint,
    out: *mut ProcessInfo,
) -> u32 {
    match device(handle, "GetGraphicsRunningProcesses_v3") {
        Ok(device) => unsafe { write_processes(&device.graphics_processes, count, out) },
        Err(code) => code,
    }
}

#[repr(C)]
pub struct ProcessUtilizationSample {
    pid: c_uint,
    time_stamp: c_ulonglong,
    sm_util: c_uint,
    mem_util: c_uint,
    enc_util: c_uint,
    dec_util: c_uint,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    handle: *mut c_void,
    out: *mut ProcessUtilizationSample,
    count: *mut c_uint,
    _last_seen: c_ulonglong,
) -> u32 {
    let device = match device(handle, "GetProcessUtilization") {
        Ok(device) => device,
        Err(code) => return code,
    };
    let samples = &device.process_sm_percent;
    unsafe {
        if samples.is_empty() {
            *count = 0;
            return ERROR_NOT_FOUND; // what the driver answers when nothing ran since last_seen
        }
        if out.is_null() || (*count as usize) < samples.len() {
            *count = samples.len() as c_uint;
            return ERROR_INSUFFICIENT_SIZE;
        }
        for (i, (pid, sm)) in samples.iter().enumerate() {
            *out.add(i) = ProcessUtilizationSample {
                pid: *pid,
                time_stamp: 1,
                sm_util: *sm,
                mem_util: 0,
                enc_util: 0,
                dec_util: 0,
            };
        }
        *count = samples.len() as c_uint;
    }
    SUCCESS
}

const ERROR_TIMEOUT: u32 = 10;
const EVENT_TYPE_XID_CRITICAL_ERROR: u64 = 8;

/// How many of the script's XID events have been delivered since the set was created.
static XID_DELIVERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut *mut c_void) -> u32 {
    XID_DELIVERED.store(0, std::sync::atomic::Ordering::SeqCst);
    unsafe { *set = 0x5e7 as *mut c_void };
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(_set: *mut c_void) -> u32 {
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    handle: *mut c_void,
    out: *mut c_ulonglong,
) -> u32 {
    with_device!(handle, "GetSupportedEventTypes", |device| {
        unsafe { *out = device.event_types.unwrap_or(EVENT_TYPE_XID_CRITICAL_ERROR) }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    handle: *mut c_void,
    _types: c_ulonglong,
    _set: *mut c_void,
) -> u32 {
    match device(handle, "RegisterEvents") {
        Ok(_) => SUCCESS,
        Err(code) => code,
    }
}

#[repr(C)]
pub struct EventData {
    device: *mut c_void,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    _set: *mut c_void,
    out: *mut EventData,
    _timeout_ms: c_uint,
) -> u32 {
    let events = script().xid_events;
    let next = XID_DELIVERED.load(std::sync::atomic::Ordering::SeqCst);
    let Some(event) = events.get(next) else {
        return ERROR_TIMEOUT;
    };
    XID_DELIVERED.store(next + 1, std::sync::atomic::Ordering::SeqCst);
    unsafe {
        *out = EventData {
            device: handle_of(event.device),
            event_type: EVENT_TYPE_XID_CRITICAL_ERROR,
            event_data: event.xid,
            gpu_instance_id: u32::MAX,
            compute_instance_id: u32::MAX,
        };
    }
    SUCCESS
}

// Keep the unused codes documented in one place for script writers.
#[allow(dead_code)]
const CODES: [u32; 3] = [ERROR_UNINITIALIZED, ERROR_UNKNOWN, ERROR_NOT_FOUND];
