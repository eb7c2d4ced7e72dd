//! A fake `libcudart.so` and `libcuda.so` in one file: exports the CUDA runtime and driver
//! functions envelope's uprobes attach to, taking as long as the test says. No GPU is touched:
//! synchronisation and copies only wait, allocations hand out made-up device addresses, and
//! launches return at once. Pointers the caller passes for memory are never dereferenced.
//!
//! Settings come from the environment, read once on the first call (so a run's calls all
//! behave alike):
//! - `FAKE_CUDA_SYNC_US`: how long each synchronisation call waits, in µs (default 0).
//! - `FAKE_CUDA_SYNC_MODE`: `sleep` (default) blocks the thread, off CPU; `spin` busy-waits,
//!   on CPU, as the real runtime does under `cudaDeviceScheduleSpin`.
//! - `FAKE_CUDA_COPY_BYTES_PER_US`: copy bandwidth (default 1000 bytes/µs, 1 GB/s); a copy
//!   sleeps `count / this` whole µs. 0 makes copies instant.
//! - `FAKE_CUDA_MAX_ALLOC`: allocations larger than this many bytes fail as out of memory
//!   (default 1 << 40).
//! - `FAKE_CUDA_DRIVER`: path of the file to use as the driver. When set, runtime functions
//!   call the driver's exported functions (through dlopen/dlsym) instead of doing the work
//!   themselves, as the real runtime sits on top of the driver, so probes on the driver fire
//!   inside runtime calls.
//!
//! Error codes are CUDA's: `cudaError_t` (i32) for the runtime, `CUresult` (u32) for the
//! driver. Both use 2 for out of memory.
#![allow(clippy::missing_safety_doc, non_snake_case)]

use std::{
    ffi::{CStr, CString, c_void},
    hint::black_box,
    os::unix::ffi::OsStrExt,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

const CUDA_SUCCESS: i32 = 0;
const CUDA_ERROR_INVALID_VALUE: i32 = 1;
const CUDA_ERROR_MEMORY_ALLOCATION: i32 = 2;
const CUDA_ERROR_INVALID_MEMCPY_DIRECTION: i32 = 21;

const CU_SUCCESS: u32 = 0;
const CU_ERROR_INVALID_VALUE: u32 = 1;
const CU_ERROR_OUT_OF_MEMORY: u32 = 2;

/// `cudaMemcpyKind` values.
const KIND_HOST_TO_HOST: i32 = 0;
const KIND_HOST_TO_DEVICE: i32 = 1;
const KIND_DEVICE_TO_HOST: i32 = 2;
const KIND_DEVICE_TO_DEVICE: i32 = 3;
const KIND_DEFAULT: i32 = 4;

/// Where made-up device addresses start: non-zero, and far from anything the process maps,
/// so a bug that dereferences one crashes instead of corrupting memory.
const FAKE_DEVICE_BASE: u64 = 0x7000_0000_0000;

/// The next made-up device address; each allocation advances it by its size.
static NEXT_DEVICE_ADDRESS: AtomicU64 = AtomicU64::new(FAKE_DEVICE_BASE);

/// One distinct constant per exported function, passed through `black_box` first thing.
/// Several exports have identical bodies (e.g. cuStreamSynchronize and cuEventSynchronize);
/// LLVM's function merging would make them aliases at one address, and uprobes, attached by
/// address, would then count each call under both names.
#[repr(u32)]
enum Site {
    CudaDeviceSynchronize = 1,
    CudaStreamSynchronize,
    CudaEventSynchronize,
    CudaMemcpy,
    CudaMemcpyAsync,
    CudaMemcpyPeer,
    CudaMalloc,
    CudaMallocAsync,
    CudaFree,
    CudaLaunchKernel,
    CuInit,
    CuCtxSynchronize,
    CuStreamSynchronize,
    CuEventSynchronize,
    CuMemcpyHtoD,
    CuMemcpyDtoH,
    CuMemcpyDtoD,
    CuMemcpyHtoDAsync,
    CuMemcpyDtoHAsync,
    CuMemAlloc,
    CuMemFree,
    CuLaunchKernel,
}

/// Marks the body of an exported function as its own (see [`Site`]).
#[inline(always)]
fn site(site: Site) {
    black_box(site as u32);
}

struct Config {
    sync: Duration,
    spin: bool,
    copy_bytes_per_us: u64,
    max_alloc: u64,
    driver_path: Option<CString>,
}

/// The settings, read from the environment on first use. Reading once keeps every call's
/// cost the same and lets a test change nothing mid-run by accident.
fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let mode = std::env::var("FAKE_CUDA_SYNC_MODE").unwrap_or_default();
        let spin = match mode.as_str() {
            "spin" => true,
            "" | "sleep" => false,
            other => {
                eprintln!(
                    "fake-cuda: FAKE_CUDA_SYNC_MODE={other:?} is not spin or sleep; sleeping"
                );
                false
            }
        };
        Config {
            sync: Duration::from_micros(number("FAKE_CUDA_SYNC_US", 0)),
            spin,
            copy_bytes_per_us: number("FAKE_CUDA_COPY_BYTES_PER_US", 1000),
            max_alloc: number("FAKE_CUDA_MAX_ALLOC", 1 << 40),
            driver_path: std::env::var_os("FAKE_CUDA_DRIVER")
                .filter(|path| !path.is_empty())
                .and_then(|path| CString::new(path.as_bytes()).ok()),
        }
    })
}

/// An unsigned integer setting; a malformed one is reported and replaced by the default, so
/// a typo shows in the test's output rather than silently changing nothing.
fn number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            eprintln!("fake-cuda: {name}={text:?} is not an unsigned integer; using {default}");
            default
        }),
    }
}

/// What every synchronisation call does when it does not delegate: wait the configured time.
fn sync_wait() {
    let config = config();
    if config.sync.is_zero() {
        return;
    }
    if config.spin {
        let start = Instant::now();
        while start.elapsed() < config.sync {
            std::hint::spin_loop();
        }
    } else {
        std::thread::sleep(config.sync);
    }
}

/// What every copy does when it does not delegate: sleep as long as the configured bandwidth
/// takes to move `count` bytes. The data pointers are fake and never touched.
fn copy_wait(count: usize) {
    let per_us = config().copy_bytes_per_us;
    if per_us == 0 {
        return;
    }
    let micros = count as u64 / per_us;
    if micros > 0 {
        std::thread::sleep(Duration::from_micros(micros));
    }
}

/// A made-up device address for `size` bytes, or None when the size is over the limit.
fn fake_alloc(size: usize) -> Option<u64> {
    if size as u64 > config().max_alloc {
        return None;
    }
    // Advance by the size rounded up to 256 (cudaMalloc's alignment), so allocations are
    // distinct and never overlap; saturating, as FAKE_CUDA_MAX_ALLOC may allow any size.
    let step = (size as u64).saturating_add(255) & !255;
    let address = NEXT_DEVICE_ADDRESS.fetch_add(step.max(256), Ordering::Relaxed);
    Some(address.max(FAKE_DEVICE_BASE))
}

type CuSync = unsafe extern "C" fn() -> u32;
type CuSyncOn = unsafe extern "C" fn(*mut c_void) -> u32;
type CuHtoD = unsafe extern "C" fn(u64, *const c_void, usize) -> u32;
type CuDtoH = unsafe extern "C" fn(*mut c_void, u64, usize) -> u32;
type CuDtoD = unsafe extern "C" fn(u64, u64, usize) -> u32;
type CuHtoDAsync = unsafe extern "C" fn(u64, *const c_void, usize, *mut c_void) -> u32;
type CuDtoHAsync = unsafe extern "C" fn(*mut c_void, u64, usize, *mut c_void) -> u32;
type CuMemAlloc = unsafe extern "C" fn(*mut u64, usize) -> u32;
type CuLaunch = unsafe extern "C" fn(
    *mut c_void,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut c_void,
    *mut *mut c_void,
    *mut *mut c_void,
) -> u32;

/// The driver's exported functions the runtime calls, found with dlsym. Calling through
/// these pointers, rather than calling this crate's functions directly, is the point: the
/// call enters the symbol's address in the driver file, where the test's uprobes are.
struct Driver {
    ctx_synchronize: Option<CuSync>,
    stream_synchronize: Option<CuSyncOn>,
    event_synchronize: Option<CuSyncOn>,
    memcpy_htod: Option<CuHtoD>,
    memcpy_dtoh: Option<CuDtoH>,
    memcpy_dtod: Option<CuDtoD>,
    memcpy_htod_async: Option<CuHtoDAsync>,
    memcpy_dtoh_async: Option<CuDtoHAsync>,
    mem_alloc: Option<CuMemAlloc>,
    launch_kernel: Option<CuLaunch>,
}

/// The driver named by `FAKE_CUDA_DRIVER`, loaded once on first use; None when unset or
/// when it cannot be loaded (then the runtime does the work itself, after saying so).
fn driver() -> Option<&'static Driver> {
    static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();
    DRIVER
        .get_or_init(|| config().driver_path.as_deref().and_then(load_driver))
        .as_ref()
}

fn load_driver(path: &CStr) -> Option<Driver> {
    // RTLD_LOCAL, as the real runtime loads libcuda: the driver's symbols must not interpose
    // on anything else in the process. The handle is never closed.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        eprintln!(
            "fake-cuda: cannot load FAKE_CUDA_DRIVER={}: {}; the runtime does the work itself",
            path.to_string_lossy(),
            dl_error()
        );
        return None;
    }
    // Resolves one symbol as a function pointer of type `$type`; a missing one is reported
    // and leaves that runtime function doing the work itself.
    macro_rules! symbol {
        ($name:literal as $type:ty) => {{
            let address = unsafe { libc::dlsym(handle, $name.as_ptr()) };
            if address.is_null() {
                eprintln!(
                    "fake-cuda: FAKE_CUDA_DRIVER={} has no {}; the runtime does that work itself",
                    path.to_string_lossy(),
                    $name.to_string_lossy()
                );
                None
            } else {
                Some(unsafe { std::mem::transmute::<*mut c_void, $type>(address) })
            }
        }};
    }
    Some(Driver {
        ctx_synchronize: symbol!(c"cuCtxSynchronize" as CuSync),
        stream_synchronize: symbol!(c"cuStreamSynchronize" as CuSyncOn),
        event_synchronize: symbol!(c"cuEventSynchronize" as CuSyncOn),
        memcpy_htod: symbol!(c"cuMemcpyHtoD_v2" as CuHtoD),
        memcpy_dtoh: symbol!(c"cuMemcpyDtoH_v2" as CuDtoH),
        memcpy_dtod: symbol!(c"cuMemcpyDtoD_v2" as CuDtoD),
        memcpy_htod_async: symbol!(c"cuMemcpyHtoDAsync_v2" as CuHtoDAsync),
        memcpy_dtoh_async: symbol!(c"cuMemcpyDtoHAsync_v2" as CuDtoHAsync),
        mem_alloc: symbol!(c"cuMemAlloc_v2" as CuMemAlloc),
        launch_kernel: symbol!(c"cuLaunchKernel" as CuLaunch),
    })
}

fn dl_error() -> String {
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "unknown error".to_owned()
    } else {
        unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The runtime's answer for a driver result: the real runtime turns driver failures into its
/// own codes; the fake only ever fails allocations, so any failure reads as out of memory.
fn from_driver(result: u32) -> i32 {
    if result == CU_SUCCESS {
        CUDA_SUCCESS
    } else {
        CUDA_ERROR_MEMORY_ALLOCATION
    }
}

/// A device address as the runtime passes it to the driver (`CUdeviceptr`).
fn device_address(pointer: *const c_void) -> u64 {
    pointer as usize as u64
}

// ---- Runtime API (libcudart) ----
// Functions that hand the caller's pointers on to the driver are `unsafe`, as the driver may
// take them for real ones; the ABI is the same either way.

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cudaDeviceSynchronize() -> i32 {
    site(Site::CudaDeviceSynchronize);
    match driver().and_then(|driver| driver.ctx_synchronize) {
        Some(function) => from_driver(unsafe { function() }),
        None => {
            sync_wait();
            CUDA_SUCCESS
        }
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cudaStreamSynchronize(stream: *mut c_void) -> i32 {
    site(Site::CudaStreamSynchronize);
    match driver().and_then(|driver| driver.stream_synchronize) {
        Some(function) => from_driver(unsafe { function(stream) }),
        None => {
            sync_wait();
            CUDA_SUCCESS
        }
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cudaEventSynchronize(event: *mut c_void) -> i32 {
    site(Site::CudaEventSynchronize);
    match driver().and_then(|driver| driver.event_synchronize) {
        Some(function) => from_driver(unsafe { function(event) }),
        None => {
            sync_wait();
            CUDA_SUCCESS
        }
    }
}

/// Kinds 1–3 go to the driver's matching copy when there is one; host-to-host and default
/// (where the real runtime works out the direction itself) always wait here.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cudaMemcpy(
    dst: *mut c_void,
    src: *const c_void,
    count: usize,
    kind: i32,
) -> i32 {
    site(Site::CudaMemcpy);
    let driver = driver();
    let delegated = match kind {
        KIND_HOST_TO_DEVICE => driver
            .and_then(|driver| driver.memcpy_htod)
            .map(|function| unsafe { function(device_address(dst), src, count) }),
        KIND_DEVICE_TO_HOST => driver
            .and_then(|driver| driver.memcpy_dtoh)
            .map(|function| unsafe { function(dst, device_address(src), count) }),
        KIND_DEVICE_TO_DEVICE => driver
            .and_then(|driver| driver.memcpy_dtod)
            .map(|function| unsafe { function(device_address(dst), device_address(src), count) }),
        KIND_HOST_TO_HOST | KIND_DEFAULT => None,
        _ => return CUDA_ERROR_INVALID_MEMCPY_DIRECTION,
    };
    match delegated {
        Some(result) => from_driver(result),
        None => {
            copy_wait(count);
            CUDA_SUCCESS
        }
    }
}

/// Kinds 1 and 2 go to the driver's async copies when there is one. Like the synchronous
/// copy, it takes the copy's whole time: the test measures the call, not the GPU.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cudaMemcpyAsync(
    dst: *mut c_void,
    src: *const c_void,
    count: usize,
    kind: i32,
    stream: *mut c_void,
) -> i32 {
    site(Site::CudaMemcpyAsync);
    let driver = driver();
    let delegated = match kind {
        KIND_HOST_TO_DEVICE => driver
            .and_then(|driver| driver.memcpy_htod_async)
            .map(|function| unsafe { function(device_address(dst), src, count, stream) }),
        KIND_DEVICE_TO_HOST => driver
            .and_then(|driver| driver.memcpy_dtoh_async)
            .map(|function| unsafe { function(dst, device_address(src), count, stream) }),
        KIND_HOST_TO_HOST | KIND_DEVICE_TO_DEVICE | KIND_DEFAULT => None,
        _ => return CUDA_ERROR_INVALID_MEMCPY_DIRECTION,
    };
    match delegated {
        Some(result) => from_driver(result),
        None => {
            copy_wait(count);
            CUDA_SUCCESS
        }
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cudaMemcpyPeer(
    _dst: *mut c_void,
    _dst_device: i32,
    _src: *const c_void,
    _src_device: i32,
    count: usize,
) -> i32 {
    site(Site::CudaMemcpyPeer);
    copy_wait(count);
    CUDA_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cudaMalloc(ptr: *mut *mut c_void, size: usize) -> i32 {
    site(Site::CudaMalloc);
    if ptr.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if let Some(function) = driver().and_then(|driver| driver.mem_alloc) {
        let mut address = 0u64;
        let result = unsafe { function(&mut address, size) };
        if result != CU_SUCCESS {
            return from_driver(result);
        }
        unsafe { *ptr = address as usize as *mut c_void };
        return CUDA_SUCCESS;
    }
    match fake_alloc(size) {
        Some(address) => {
            unsafe { *ptr = address as usize as *mut c_void };
            CUDA_SUCCESS
        }
        None => CUDA_ERROR_MEMORY_ALLOCATION,
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cudaMallocAsync(
    ptr: *mut *mut c_void,
    size: usize,
    _stream: *mut c_void,
) -> i32 {
    site(Site::CudaMallocAsync);
    if ptr.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match fake_alloc(size) {
        Some(address) => {
            unsafe { *ptr = address as usize as *mut c_void };
            CUDA_SUCCESS
        }
        None => CUDA_ERROR_MEMORY_ALLOCATION,
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cudaFree(_ptr: *mut c_void) -> i32 {
    site(Site::CudaFree);
    CUDA_SUCCESS
}

/// `dim3`, passed by value as in the real signature (12 bytes, in two registers on x86-64).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cudaLaunchKernel(
    func: *const c_void,
    grid: Dim3,
    block: Dim3,
    args: *mut *mut c_void,
    shared_mem: usize,
    stream: *mut c_void,
) -> i32 {
    site(Site::CudaLaunchKernel);
    match driver().and_then(|driver| driver.launch_kernel) {
        Some(function) => from_driver(unsafe {
            function(
                func.cast_mut(),
                grid.x,
                grid.y,
                grid.z,
                block.x,
                block.y,
                block.z,
                u32::try_from(shared_mem).unwrap_or(u32::MAX),
                stream,
                args,
                std::ptr::null_mut(),
            )
        }),
        None => CUDA_SUCCESS,
    }
}

// ---- Driver API (libcuda) ----
// These never delegate further: they are the bottom of the stack.

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuInit(_flags: u32) -> u32 {
    site(Site::CuInit);
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuCtxSynchronize() -> u32 {
    site(Site::CuCtxSynchronize);
    sync_wait();
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuStreamSynchronize(_stream: *mut c_void) -> u32 {
    site(Site::CuStreamSynchronize);
    sync_wait();
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuEventSynchronize(_event: *mut c_void) -> u32 {
    site(Site::CuEventSynchronize);
    sync_wait();
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuMemcpyHtoD_v2(_dst: u64, _src: *const c_void, count: usize) -> u32 {
    site(Site::CuMemcpyHtoD);
    copy_wait(count);
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuMemcpyDtoH_v2(_dst: *mut c_void, _src: u64, count: usize) -> u32 {
    site(Site::CuMemcpyDtoH);
    copy_wait(count);
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuMemcpyDtoD_v2(_dst: u64, _src: u64, count: usize) -> u32 {
    site(Site::CuMemcpyDtoD);
    copy_wait(count);
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuMemcpyHtoDAsync_v2(
    _dst: u64,
    _src: *const c_void,
    count: usize,
    _stream: *mut c_void,
) -> u32 {
    site(Site::CuMemcpyHtoDAsync);
    copy_wait(count);
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuMemcpyDtoHAsync_v2(
    _dst: *mut c_void,
    _src: u64,
    count: usize,
    _stream: *mut c_void,
) -> u32 {
    site(Site::CuMemcpyDtoHAsync);
    copy_wait(count);
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut u64, size: usize) -> u32 {
    site(Site::CuMemAlloc);
    if ptr.is_null() {
        return CU_ERROR_INVALID_VALUE;
    }
    match fake_alloc(size) {
        Some(address) => {
            unsafe { *ptr = address };
            CU_SUCCESS
        }
        None => CU_ERROR_OUT_OF_MEMORY,
    }
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cuMemFree_v2(_ptr: u64) -> u32 {
    site(Site::CuMemFree);
    CU_SUCCESS
}

#[unsafe(no_mangle)]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn cuLaunchKernel(
    _f: *mut c_void,
    _gx: u32,
    _gy: u32,
    _gz: u32,
    _bx: u32,
    _by: u32,
    _bz: u32,
    _shared: u32,
    _stream: *mut c_void,
    _params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> u32 {
    site(Site::CuLaunchKernel);
    CU_SUCCESS
}
