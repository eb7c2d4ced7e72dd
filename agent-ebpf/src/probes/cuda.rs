//! CUDA calls, from uprobes on the CUDA runtime and driver libraries (opt-in: userspace
//! attaches these programs only when `[gpu] cuda_probes` asks). One entry and one return
//! program serve every function; the attach cookie says what the function is (see
//! `agent_common::cuda`). Counted in the kernel per process, function and copy direction;
//! blocking calls also mark the thread so the scheduler probe charges its time to the GPU.
use agent_common::{
    cuda::{
        Cookie, CudaCallCounters, CudaCallKey, NO_ARGUMENT, OpenCall, STALE_OPEN_CALL_NS,
        SYNC_AFTER_COPY_NS, call, direction,
    },
    histogram::LatencyHistogram,
};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_attach_cookie},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};

use super::{
    sched::{enter_gpu_call, leave_gpu_call, on_cpu_since, tracked_process},
    shared::{BPF_NOEXIST, add, record_latency},
};

/// Thread id -> the probed call it is in, or made last. Preallocated (an LRU map), like the
/// two below: about 4 MB in all, whether the probes are on or off.
#[map]
static OPEN_CUDA_CALLS: LruHashMap<u32, OpenCall> = LruHashMap::with_max_entries(16384, 0);

/// (process, function, direction) -> calls, time, bytes, failures since the probes loaded.
/// Not per CPU: the counters are added atomically, and per-CPU copies of a 32-byte value per
/// function would multiply the memory by the CPU count for calls that are microseconds apart.
#[map]
static CUDA_CALLS: LruHashMap<CudaCallKey, CudaCallCounters> =
    LruHashMap::with_max_entries(16384, 0);

/// Per process: how long its blocking calls (synchronisations, synchronous copies) took.
#[map]
static CUDA_BLOCKING_LATENCY: LruHashMap<u32, LatencyHistogram> =
    LruHashMap::with_max_entries(256, 0);

const ZERO_COUNTERS: CudaCallCounters = CudaCallCounters {
    calls: 0,
    ns: 0,
    bytes: 0,
    failures: 0,
};

/// The six arguments passed in registers. Read each with a constant offset: the verifier
/// refuses a context load at a computed one, which `ctx.arg(index)` with an index from the
/// cookie compiles to.
#[inline(always)]
fn arguments(ctx: &ProbeContext) -> [u64; 6] {
    [
        ctx.arg::<u64>(0).unwrap_or(0),
        ctx.arg::<u64>(1).unwrap_or(0),
        ctx.arg::<u64>(2).unwrap_or(0),
        ctx.arg::<u64>(3).unwrap_or(0),
        ctx.arg::<u64>(4).unwrap_or(0),
        ctx.arg::<u64>(5).unwrap_or(0),
    ]
}

/// Argument `index`, 0 when it is not one of the six in registers.
#[inline(always)]
fn argument(arguments: &[u64; 6], index: u8) -> u64 {
    match arguments.get(index as usize) {
        Some(value) => *value,
        None => 0,
    }
}

#[uprobe]
pub fn cuda_call(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // The library is probed for every process that maps it; only tracked ones count.
    if tracked_process(tgid).is_none() {
        return 0;
    }
    let thread = pid_tgid as u32;
    // SAFETY: plain helper calls.
    let (cookie, now) = unsafe {
        (
            Cookie(bpf_get_attach_cookie(ctx.as_ptr())),
            bpf_ktime_get_ns(),
        )
    };
    let open = OPEN_CUDA_CALLS.get_ptr_mut(&thread);
    // The direction of an asynchronous copy this call may be waiting for.
    let mut after_copy = direction::OTHER;
    if let Some(open) = open {
        // SAFETY: pointer from a successful lookup; plain loads and stores (only this thread
        // writes its own record).
        unsafe {
            if (*open).depth > 0 && now.wrapping_sub((*open).start_ns) < STALE_OPEN_CALL_NS {
                // Inside another probed call (the runtime calling the driver): part of it.
                (*open).depth += 1;
                return 0;
            }
            if Cookie((*open).cookie).call() == call::COPY_ASYNC && cookie.call() == call::SYNC {
                // The gap the thread ran for: a preemption between the two calls is not a
                // gap in the program (the time since it got the CPU back counts instead).
                let mut since = (*open).ended_ns;
                if let Some(switched_in) = on_cpu_since(thread)
                    && switched_in > since
                {
                    since = switched_in;
                }
                if now.wrapping_sub(since) < SYNC_AFTER_COPY_NS {
                    after_copy = (*open).direction as u8;
                }
            }
        }
    }
    let arguments = arguments(&ctx);
    let bytes_argument = cookie.bytes_argument();
    let bytes = if bytes_argument == NO_ARGUMENT {
        0
    } else {
        argument(&arguments, bytes_argument)
    };
    let mut to = cookie.direction();
    if to == direction::FROM_KIND_ARGUMENT {
        to = direction::from_memcpy_kind(argument(&arguments, cookie.kind_argument()));
    }
    if cookie.call() == call::SYNC {
        to = after_copy;
    }
    let record = OpenCall {
        start_ns: now,
        bytes,
        cookie: cookie.0,
        depth: 1,
        direction: to as u32,
        ended_ns: 0,
    };
    match open {
        // SAFETY: as above.
        Some(open) => unsafe { *open = record },
        None => {
            let _ = OPEN_CUDA_CALLS.insert(&thread, &record, 0);
        }
    }
    if call::blocks(cookie.call()) {
        enter_gpu_call(thread, tgid, now);
    }
    0
}

#[uretprobe]
pub fn cuda_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let thread = pid_tgid as u32;
    let Some(open) = OPEN_CUDA_CALLS.get_ptr_mut(&thread) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup; only this thread writes its record.
    let record = unsafe {
        if (*open).depth == 0 {
            return 0;
        }
        (*open).depth -= 1;
        if (*open).depth > 0 {
            return 0;
        }
        *open
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above; when the next call on this thread may be waiting for this one.
    unsafe { (*open).ended_ns = now };
    let cookie = Cookie(record.cookie);
    let elapsed_ns = now.wrapping_sub(record.start_ns);
    if call::blocks(cookie.call()) {
        leave_gpu_call(thread, now);
    }
    // cudaError_t and CUresult are 32-bit; 0 is success.
    let failed = ctx.ret::<u64>() & 0xffff_ffff != 0;
    let tgid = (pid_tgid >> 32) as u32;
    let key = CudaCallKey {
        tgid,
        function: cookie.function(),
        direction: record.direction as u8,
        _padding: [0; 2],
    };
    let counters = match CUDA_CALLS.get_ptr_mut(&key) {
        Some(counters) => counters,
        None => {
            let _ = CUDA_CALLS.insert(&key, &ZERO_COUNTERS, BPF_NOEXIST);
            match CUDA_CALLS.get_ptr_mut(&key) {
                Some(counters) => counters,
                None => return 0,
            }
        }
    };
    // SAFETY: pointer from a successful lookup; atomic adds (threads of one process share
    // the row).
    unsafe {
        add(&raw mut (*counters).calls, 1);
        add(&raw mut (*counters).ns, elapsed_ns);
        if failed {
            add(&raw mut (*counters).failures, 1);
        } else {
            add(&raw mut (*counters).bytes, record.bytes);
        }
    }
    if call::blocks(cookie.call()) {
        record_latency!(CUDA_BLOCKING_LATENCY, &tgid, elapsed_ns);
    }
    0
}
