//! `fake-cuda-app`: a stand-in CUDA program. It loads the fake runtime (and driver) with
//! dlopen, as real programs reach libcudart and libcuda, makes the calls its steps name, and
//! reports what it measured around each call, for a test to compare with what envelope's
//! uprobes saw.
//!
//! ```text
//! fake-cuda-app --runtime PATH [--driver PATH] [--no-wait] STEP...
//! ```
//!
//! Protocol on stdout: `ready <pid>` once the libraries are loaded and checked; then, after a
//! line on stdin (the test's "go", sent once its probes are attached), one JSON line per step
//! and `done`; then it waits for another line or EOF on stdin before exiting, so the process
//! outlives the agent's measurement window. `--no-wait` skips both waits.
//!
//! Exit status: 0 on success, 2 for a usage error, 1 when a library cannot be loaded or fails
//! the check.

use std::{
    ffi::{CStr, CString, c_void},
    io::{BufRead, Write},
    os::unix::ffi::OsStrExt,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

const USAGE: &str = "\
usage: fake-cuda-app --runtime PATH [--driver PATH] [--no-wait] STEP...
  STEP is NAME:CALLS or, for copies and allocations, NAME:CALLS:BYTES
  runtime: device-sync stream-sync event-sync launch
           memcpy-h2d memcpy-d2h memcpy-d2d memcpy-default memcpy-async-h2d memcpy-async-d2h
           memcpy-peer malloc h2d-then-sync (these take BYTES)
  driver (needs --driver): ctx-sync cu-stream-sync cu-launch
           htod dtoh htod-async mem-alloc (these take BYTES)";

/// Every symbol the probes may attach to. The app checks that each file it loads exports all
/// of them at distinct addresses: if the compiler merged two identical bodies into one
/// address, a uprobe would count each call under both names and the test would blame the
/// agent.
const SYMBOLS: &[&CStr] = &[
    c"cudaDeviceSynchronize",
    c"cudaStreamSynchronize",
    c"cudaEventSynchronize",
    c"cudaMemcpy",
    c"cudaMemcpyAsync",
    c"cudaMemcpyPeer",
    c"cudaMalloc",
    c"cudaMallocAsync",
    c"cudaFree",
    c"cudaLaunchKernel",
    c"cuInit",
    c"cuCtxSynchronize",
    c"cuStreamSynchronize",
    c"cuEventSynchronize",
    c"cuMemcpyHtoD_v2",
    c"cuMemcpyDtoH_v2",
    c"cuMemcpyDtoD_v2",
    c"cuMemcpyHtoDAsync_v2",
    c"cuMemcpyDtoHAsync_v2",
    c"cuMemAlloc_v2",
    c"cuMemFree_v2",
    c"cuLaunchKernel",
];

/// Made-up addresses for the memory, stream, event and kernel arguments. The library never
/// dereferences them; were it to, these crash at once instead of reading something real.
const FAKE_DEVICE: usize = 0x7000_dead_0000;
const FAKE_HOST: usize = 0x7000_beef_0000;
const FAKE_STREAM: usize = 0x5157;
const FAKE_EVENT: usize = 0xe7e7;
const FAKE_KERNEL: usize = 0xc0de;

#[derive(Clone, Copy, PartialEq)]
enum Op {
    DeviceSync,
    StreamSync,
    EventSync,
    CtxSync,
    CuStreamSync,
    /// cudaMemcpy with this cudaMemcpyKind.
    Memcpy(i32),
    /// cudaMemcpyAsync with this cudaMemcpyKind.
    MemcpyAsync(i32),
    /// cudaMemcpyAsync host to device, then cudaStreamSynchronize: PyTorch's blocking
    /// `tensor.to("cuda")` (one call of the step is both).
    H2dThenSync,
    MemcpyPeer,
    HtoD,
    DtoH,
    HtoDAsync,
    Malloc,
    MemAlloc,
    Launch,
    CuLaunch,
}

const OPS: &[(&str, Op)] = &[
    ("device-sync", Op::DeviceSync),
    ("stream-sync", Op::StreamSync),
    ("event-sync", Op::EventSync),
    ("ctx-sync", Op::CtxSync),
    ("cu-stream-sync", Op::CuStreamSync),
    ("memcpy-h2d", Op::Memcpy(1)),
    ("memcpy-d2h", Op::Memcpy(2)),
    ("memcpy-d2d", Op::Memcpy(3)),
    ("memcpy-default", Op::Memcpy(4)),
    ("memcpy-async-h2d", Op::MemcpyAsync(1)),
    ("memcpy-async-d2h", Op::MemcpyAsync(2)),
    ("h2d-then-sync", Op::H2dThenSync),
    ("memcpy-peer", Op::MemcpyPeer),
    ("htod", Op::HtoD),
    ("dtoh", Op::DtoH),
    ("htod-async", Op::HtoDAsync),
    ("malloc", Op::Malloc),
    ("mem-alloc", Op::MemAlloc),
    ("launch", Op::Launch),
    ("cu-launch", Op::CuLaunch),
];

impl Op {
    /// Copies and allocations take a size; the rest must not be given one.
    fn takes_bytes(self) -> bool {
        !matches!(
            self,
            Op::DeviceSync
                | Op::StreamSync
                | Op::EventSync
                | Op::CtxSync
                | Op::CuStreamSync
                | Op::Launch
                | Op::CuLaunch
        )
    }

    fn needs_driver(self) -> bool {
        matches!(
            self,
            Op::CtxSync
                | Op::CuStreamSync
                | Op::HtoD
                | Op::DtoH
                | Op::HtoDAsync
                | Op::MemAlloc
                | Op::CuLaunch
        )
    }
}

struct Step {
    name: &'static str,
    op: Op,
    calls: u64,
    bytes: usize,
}

struct Args {
    runtime: PathBuf,
    driver: Option<PathBuf>,
    wait: bool,
    steps: Vec<Step>,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("fake-cuda-app: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fake-cuda-app: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The arguments, Ok(None) for --help, or what is wrong with them.
fn parse_args(mut arguments: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut runtime = None;
    let mut driver = None;
    let mut wait = true;
    let mut steps = Vec::new();
    while let Some(argument) = arguments.next() {
        let (flag, inline) = match argument.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (argument.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--no-wait" => wait = false,
            "--runtime" | "--driver" => {
                let value = inline
                    .or_else(|| arguments.next())
                    .filter(|value| !value.is_empty())
                    .ok_or_else(|| format!("{flag} needs a path"))?;
                // dlopen searches the library path for a name without a slash; the test means
                // exactly this file.
                let path = std::path::absolute(&value)
                    .map_err(|error| format!("{flag} {value}: {error}"))?;
                if flag == "--runtime" {
                    runtime = Some(path);
                } else {
                    driver = Some(path);
                }
            }
            _ if argument.starts_with('-') => return Err(format!("unknown option {argument}")),
            _ => steps.push(parse_step(&argument)?),
        }
    }
    let runtime = runtime.ok_or("--runtime is required")?;
    if steps.is_empty() {
        return Err("no steps given".into());
    }
    if driver.is_none()
        && let Some(step) = steps.iter().find(|step| step.op.needs_driver())
    {
        return Err(format!(
            "step {} calls the driver API and needs --driver",
            step.name
        ));
    }
    Ok(Some(Args {
        runtime,
        driver,
        wait,
        steps,
    }))
}

fn parse_step(text: &str) -> Result<Step, String> {
    let mut parts = text.split(':');
    let name = parts.next().unwrap_or_default();
    let &(name, op) = OPS
        .iter()
        .find(|(known, _)| *known == name)
        .ok_or_else(|| format!("unknown step {name:?} in {text:?}"))?;
    let calls = parts
        .next()
        .ok_or_else(|| format!("step {text:?} has no call count (NAME:CALLS)"))?;
    let calls: u64 = calls
        .parse()
        .map_err(|_| format!("step {text:?}: call count {calls:?} is not an unsigned integer"))?;
    let bytes = match (op.takes_bytes(), parts.next()) {
        (true, Some(bytes)) => bytes.parse().map_err(|_| {
            format!("step {text:?}: byte count {bytes:?} is not an unsigned integer")
        })?,
        (true, None) => return Err(format!("step {text:?} needs a size ({name}:CALLS:BYTES)")),
        (false, Some(_)) => {
            return Err(format!(
                "step {text:?}: {name} takes no size ({name}:CALLS)"
            ));
        }
        (false, None) => 0,
    };
    if parts.next().is_some() {
        return Err(format!("step {text:?} has too many fields"));
    }
    Ok(Step {
        name,
        op,
        calls,
        bytes,
    })
}

/// A loaded file: its path, for messages, and its dlopen handle, never closed.
struct Library {
    path: PathBuf,
    handle: *mut c_void,
}

impl Library {
    /// Loads like libcudart loads libcuda: by full path, all symbols bound now (so no lazy
    /// binding happens inside a measured call), kept out of the global namespace.
    fn open(path: PathBuf) -> Result<Self, String> {
        let name = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| format!("{} has a NUL byte", path.display()))?;
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(format!("cannot load {}: {}", path.display(), dl_error()));
        }
        Ok(Self { path, handle })
    }

    fn address(&self, symbol: &CStr) -> Result<usize, String> {
        let address = unsafe { libc::dlsym(self.handle, symbol.as_ptr()) };
        if address.is_null() {
            return Err(format!(
                "{} has no symbol {}",
                self.path.display(),
                symbol.to_string_lossy()
            ));
        }
        Ok(address as usize)
    }

    /// The symbol as a function pointer. `F` must be an `unsafe extern "C" fn` type matching
    /// the export's signature.
    fn function<F: Copy>(&self, symbol: &CStr) -> Result<F, String> {
        assert_eq!(size_of::<F>(), size_of::<usize>());
        let address = self.address(symbol)?;
        Ok(unsafe { std::mem::transmute_copy::<usize, F>(&address) })
    }

    /// Fails when any two of [`SYMBOLS`] are missing or share an address (see there).
    fn check_distinct(&self) -> Result<(), String> {
        let mut seen: Vec<(usize, &CStr)> = Vec::with_capacity(SYMBOLS.len());
        for &symbol in SYMBOLS {
            let address = self.address(symbol)?;
            if let Some((_, other)) = seen.iter().find(|(seen, _)| *seen == address) {
                return Err(format!(
                    "{}: {} and {} share the address {address:#x}; a uprobe on one would \
                     also count the other (were identical functions merged?)",
                    self.path.display(),
                    other.to_string_lossy(),
                    symbol.to_string_lossy()
                ));
            }
            seen.push((address, symbol));
        }
        Ok(())
    }
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

#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

type Sync0 = unsafe extern "C" fn() -> i32;
type SyncOn = unsafe extern "C" fn(*mut c_void) -> i32;
type Memcpy = unsafe extern "C" fn(*mut c_void, *const c_void, usize, i32) -> i32;
type MemcpyAsync = unsafe extern "C" fn(*mut c_void, *const c_void, usize, i32, *mut c_void) -> i32;
type MemcpyPeer = unsafe extern "C" fn(*mut c_void, i32, *const c_void, i32, usize) -> i32;
type Malloc = unsafe extern "C" fn(*mut *mut c_void, usize) -> i32;
type LaunchKernel =
    unsafe extern "C" fn(*const c_void, Dim3, Dim3, *mut *mut c_void, usize, *mut c_void) -> i32;
type CuSync0 = unsafe extern "C" fn() -> u32;
type CuSyncOn = unsafe extern "C" fn(*mut c_void) -> u32;
type CuHtoD = unsafe extern "C" fn(u64, *const c_void, usize) -> u32;
type CuDtoH = unsafe extern "C" fn(*mut c_void, u64, usize) -> u32;
type CuHtoDAsync = unsafe extern "C" fn(u64, *const c_void, usize, *mut c_void) -> u32;
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

/// One call of the step's function, answering whether it returned success. The symbol is
/// resolved here, before the test says go, so dlsym's cost is in no measured call.
fn caller(
    step: &Step,
    runtime: &Library,
    driver: Option<&Library>,
) -> Result<Box<dyn FnMut() -> bool>, String> {
    let bytes = step.bytes;
    let device = FAKE_DEVICE as *mut c_void;
    let host = FAKE_HOST as *mut c_void;
    let stream = FAKE_STREAM as *mut c_void;
    let need_driver = || driver.ok_or_else(|| format!("step {} needs --driver", step.name));
    Ok(match step.op {
        Op::DeviceSync => {
            let function: Sync0 = runtime.function(c"cudaDeviceSynchronize")?;
            Box::new(move || unsafe { function() } == 0)
        }
        Op::StreamSync => {
            let function: SyncOn = runtime.function(c"cudaStreamSynchronize")?;
            Box::new(move || unsafe { function(stream) } == 0)
        }
        Op::EventSync => {
            let function: SyncOn = runtime.function(c"cudaEventSynchronize")?;
            Box::new(move || unsafe { function(FAKE_EVENT as *mut c_void) } == 0)
        }
        Op::CtxSync => {
            let function: CuSync0 = need_driver()?.function(c"cuCtxSynchronize")?;
            Box::new(move || unsafe { function() } == 0)
        }
        Op::CuStreamSync => {
            let function: CuSyncOn = need_driver()?.function(c"cuStreamSynchronize")?;
            Box::new(move || unsafe { function(stream) } == 0)
        }
        Op::Memcpy(kind) => {
            let function: Memcpy = runtime.function(c"cudaMemcpy")?;
            let (dst, src) = if kind == 2 {
                (host, device)
            } else {
                (device, host)
            };
            Box::new(move || unsafe { function(dst, src, bytes, kind) } == 0)
        }
        Op::MemcpyAsync(kind) => {
            let function: MemcpyAsync = runtime.function(c"cudaMemcpyAsync")?;
            let (dst, src) = if kind == 2 {
                (host, device)
            } else {
                (device, host)
            };
            Box::new(move || unsafe { function(dst, src, bytes, kind, stream) } == 0)
        }
        Op::H2dThenSync => {
            let copy: MemcpyAsync = runtime.function(c"cudaMemcpyAsync")?;
            let sync: SyncOn = runtime.function(c"cudaStreamSynchronize")?;
            Box::new(move || {
                let copied = unsafe { copy(device, host, bytes, 1, stream) } == 0;
                let synced = unsafe { sync(stream) } == 0;
                copied && synced
            })
        }
        Op::MemcpyPeer => {
            let function: MemcpyPeer = runtime.function(c"cudaMemcpyPeer")?;
            Box::new(move || unsafe { function(device, 1, host, 0, bytes) } == 0)
        }
        Op::HtoD => {
            let function: CuHtoD = need_driver()?.function(c"cuMemcpyHtoD_v2")?;
            Box::new(move || unsafe { function(FAKE_DEVICE as u64, host, bytes) } == 0)
        }
        Op::DtoH => {
            let function: CuDtoH = need_driver()?.function(c"cuMemcpyDtoH_v2")?;
            Box::new(move || unsafe { function(host, FAKE_DEVICE as u64, bytes) } == 0)
        }
        Op::HtoDAsync => {
            let function: CuHtoDAsync = need_driver()?.function(c"cuMemcpyHtoDAsync_v2")?;
            Box::new(move || unsafe { function(FAKE_DEVICE as u64, host, bytes, stream) } == 0)
        }
        // Allocations are never freed: the memory is made up, and a free would be one more
        // call for the probes that no step asked for.
        Op::Malloc => {
            let function: Malloc = runtime.function(c"cudaMalloc")?;
            Box::new(move || {
                let mut pointer = std::ptr::null_mut();
                unsafe { function(&mut pointer, bytes) == 0 && !pointer.is_null() }
            })
        }
        Op::MemAlloc => {
            let function: CuMemAlloc = need_driver()?.function(c"cuMemAlloc_v2")?;
            Box::new(move || {
                let mut address = 0;
                unsafe { function(&mut address, bytes) == 0 && address != 0 }
            })
        }
        Op::Launch => {
            let function: LaunchKernel = runtime.function(c"cudaLaunchKernel")?;
            let grid = Dim3 { x: 4, y: 1, z: 1 };
            let block = Dim3 { x: 256, y: 1, z: 1 };
            Box::new(move || {
                let (null, kernel) = (std::ptr::null_mut(), FAKE_KERNEL as *const c_void);
                unsafe { function(kernel, grid, block, null, 0, stream) == 0 }
            })
        }
        Op::CuLaunch => {
            let function: CuLaunch = need_driver()?.function(c"cuLaunchKernel")?;
            Box::new(move || {
                let (null, kernel) = (std::ptr::null_mut(), FAKE_KERNEL as *mut c_void);
                unsafe { function(kernel, 4, 1, 1, 256, 1, 1, 0, stream, null, null) == 0 }
            })
        }
    })
}

fn run(args: Args) -> Result<(), String> {
    let runtime = Library::open(args.runtime)?;
    let driver = args.driver.map(Library::open).transpose()?;
    for library in std::iter::once(&runtime).chain(&driver) {
        library.check_distinct()?;
    }
    let mut callers = args
        .steps
        .iter()
        .map(|step| caller(step, &runtime, driver.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;

    say(&format!("ready {}", std::process::id()))?;
    if args.wait && !read_line()? {
        return Err(
            "stdin closed before the go line (pass --no-wait to run without waiting)".into(),
        );
    }

    for (step, call) in args.steps.iter().zip(&mut callers) {
        let mut seconds = Duration::ZERO;
        let (mut failures, mut bytes) = (0u64, 0u64);
        for _ in 0..step.calls {
            // Only the call itself is timed, as a uprobe/uretprobe pair would see it.
            let start = Instant::now();
            let succeeded = call();
            seconds += start.elapsed();
            if !succeeded {
                failures += 1;
            } else if step.op.takes_bytes() {
                bytes += step.bytes as u64;
            }
        }
        say(&report(step, bytes, failures, seconds))?;
    }

    say("done")?;
    if args.wait {
        read_line()?;
    }
    Ok(())
}

/// The step's JSON line, fields in a fixed order (serde_json's `json!` would sort them).
fn report(step: &Step, bytes: u64, failures: u64, seconds: Duration) -> String {
    let ns_per_call = if step.calls == 0 {
        0.0
    } else {
        seconds.as_nanos() as f64 / step.calls as f64
    };
    format!(
        r#"{{"step":{},"calls":{},"bytes":{},"failures":{},"seconds":{},"ns_per_call":{}}}"#,
        serde_json::Value::from(step.name),
        step.calls,
        bytes,
        failures,
        serde_json::Value::from(seconds.as_secs_f64()),
        serde_json::Value::from(ns_per_call),
    )
}

/// Prints a line and flushes it: the test reads stdout through a pipe as the steps run.
fn say(line: &str) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|error| format!("writing to stdout: {error}"))
}

/// Blocks for one line of stdin; false at EOF.
fn read_line() -> Result<bool, String> {
    let mut line = String::new();
    let read = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|error| format!("reading stdin: {error}"))?;
    Ok(read > 0)
}
