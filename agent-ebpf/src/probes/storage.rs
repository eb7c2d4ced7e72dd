//! Block I/O latency per device and direction, split into queued->complete (what the
//! application waits for) and issued->complete (the device alone), plus I/O charged to the
//! process that queued it.
//!
//! Requests are matched across tracepoints by (device, start sector): the classic block
//! tracepoints carry no request pointer. The in-flight map is an LRU, so completions the
//! probes miss (merged bios, requests started before attach) age out instead of leaking.
use agent_common::{
    histogram::LatencyHistogram,
    storage::{
        InflightRequest, InflightRequestKey, IoOperation, LatencyStage, ProcessIoKey,
        ProcessIoStats, STALE_REQUEST_NS, StorageCounters, StorageDeviceKey, StorageLatencyKey,
    },
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuHashMap},
    programs::TracePointContext,
};

use super::shared::{get_or_insert, offset, record_latency};

/// Not preallocated: a 4 KiB histogram per CPU exists only for (device, direction, stage)
/// keys that saw I/O, instead of for every possible key on every CPU.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Userspace sizes this to the machine's block devices at load time.
#[map]
static STORAGE_LATENCY: PerCpuHashMap<StorageLatencyKey, LatencyHistogram> =
    PerCpuHashMap::with_max_entries(256, BPF_F_NO_PREALLOC);

#[map]
static STORAGE_COUNTERS: PerCpuHashMap<StorageDeviceKey, StorageCounters> =
    PerCpuHashMap::with_max_entries(256, BPF_F_NO_PREALLOC);

#[map]
static PROCESS_IO: LruPerCpuHashMap<ProcessIoKey, ProcessIoStats> =
    LruPerCpuHashMap::with_max_entries(4096, 0);

#[map]
static INFLIGHT_REQUESTS: LruHashMap<InflightRequestKey, InflightRequest> =
    LruHashMap::with_max_entries(16384, 0);

const ZERO_COUNTERS: StorageCounters = StorageCounters {
    completed_requests: 0,
    completed_bytes: 0,
    errors: 0,
    untimed_completions: 0,
};

const ZERO_PROCESS_IO: ProcessIoStats = ProcessIoStats {
    completed_requests: 0,
    completed_bytes: 0,
    latency_sum_ns: 0,
    comm: [0; 16],
};

#[tracepoint(category = "block", name = "block_bio_queue")]
pub fn block_bio_queue(ctx: TracePointContext) -> u32 {
    let _ = try_block_bio_queue(&ctx);
    0
}

#[inline(always)]
fn try_block_bio_queue(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets come from the tracepoint's own format file; reads go through
    // bpf_probe_read_kernel and fail cleanly if wrong.
    let dev: u32 = unsafe { ctx.read_at(offset!(bio_queue_dev))? };
    let sector: u64 = unsafe { ctx.read_at(offset!(bio_queue_sector))? };
    let key = InflightRequestKey::new(dev, sector);
    // block_bio_queue runs in the submitter's context (submit_bio), so the current task is
    // the process, or the kernel thread (writeback, journal), that asked for the I/O.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: plain helper call.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    super::sched::note_io_queued(tgid, now);
    let request = InflightRequest {
        queued_ns: now,
        issued_ns: 0,
        cgroup_id,
        tgid,
        _padding: 0,
        comm,
    };
    INFLIGHT_REQUESTS.insert(&key, &request, 0)?;
    Ok(())
}

/// A bio too large for the device is split: the front keeps the original sector, the rest
/// continues at `new_sector` as its own request. Both inherit the submitter and queue time,
/// so the second request is timed from when the application queued it too.
#[tracepoint(category = "block", name = "block_split")]
pub fn block_split(ctx: TracePointContext) -> u32 {
    let _ = try_block_split(&ctx);
    0
}

#[inline(always)]
fn try_block_split(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: see try_block_bio_queue.
    let dev: u32 = unsafe { ctx.read_at(offset!(split_dev))? };
    let sector: u64 = unsafe { ctx.read_at(offset!(split_sector))? };
    let new_sector: u64 = unsafe { ctx.read_at(offset!(split_new_sector))? };
    let key = InflightRequestKey::new(dev, sector);
    // SAFETY: copied out at once.
    let Some(request) = INFLIGHT_REQUESTS
        .get_ptr(&key)
        .map(|request| unsafe { *request })
    else {
        return Ok(());
    };
    let remainder = InflightRequestKey::new(dev, new_sector);
    INFLIGHT_REQUESTS.insert(&remainder, &request, 0)?;
    Ok(())
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn block_rq_issue(ctx: TracePointContext) -> u32 {
    let _ = try_block_rq_issue(&ctx);
    0
}

#[inline(always)]
fn try_block_rq_issue(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: see try_block_bio_queue.
    let dev: u32 = unsafe { ctx.read_at(offset!(rq_issue_dev))? };
    let sector: u64 = unsafe { ctx.read_at(offset!(rq_issue_sector))? };
    let key = InflightRequestKey::new(dev, sector);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match INFLIGHT_REQUESTS.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; a racing writer can only change timestamps.
        Some(request) => unsafe { (*request).issued_ns = now },
        None => {
            // Issued without a queue event (e.g. a flush the block layer generated): the device
            // time is still measurable, the submitter is not known.
            let request = InflightRequest {
                queued_ns: 0,
                issued_ns: now,
                cgroup_id: 0,
                tgid: 0,
                _padding: 0,
                comm: [0; 16],
            };
            INFLIGHT_REQUESTS.insert(&key, &request, 0)?;
        }
    }
    Ok(())
}

#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    let _ = try_block_rq_complete(&ctx);
    0
}

#[inline(always)]
fn try_block_rq_complete(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: see try_block_bio_queue.
    let dev: u32 = unsafe { ctx.read_at(offset!(rq_complete_dev))? };
    let sector: u64 = unsafe { ctx.read_at(offset!(rq_complete_sector))? };
    let nr_sector: u32 = unsafe { ctx.read_at(offset!(rq_complete_nr_sector))? };
    let error: i32 = unsafe { ctx.read_at(offset!(rq_complete_error))? };
    let rwbs: [u8; 8] = unsafe { ctx.read_at(offset!(rq_complete_rwbs))? };
    let operation = IoOperation::from_rwbs(&rwbs) as u8;
    let bytes = (nr_sector as u64) << 9;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };

    let key = InflightRequestKey::new(dev, sector);
    // SAFETY: copy the entry out before removing it; a stale copy only skews one sample.
    let request = INFLIGHT_REQUESTS
        .get_ptr(&key)
        .map(|request| unsafe { *request });
    if request.is_some() {
        let _ = INFLIGHT_REQUESTS.remove(&key);
    }

    let device_key = StorageDeviceKey {
        dev,
        operation,
        _padding: [0; 3],
    };
    let mut timed = false;
    if let Some(request) = request {
        if request.issued_ns != 0 && now.wrapping_sub(request.issued_ns) < STALE_REQUEST_NS {
            let latency_key =
                StorageLatencyKey::new(dev, operation, LatencyStage::IssuedToComplete);
            record_latency!(STORAGE_LATENCY, &latency_key, now - request.issued_ns);
            timed = true;
        }
        let mut queued_latency_ns = 0;
        if request.queued_ns != 0 && now.wrapping_sub(request.queued_ns) < STALE_REQUEST_NS {
            queued_latency_ns = now - request.queued_ns;
            let latency_key =
                StorageLatencyKey::new(dev, operation, LatencyStage::QueuedToComplete);
            record_latency!(STORAGE_LATENCY, &latency_key, queued_latency_ns);
            timed = true;
        }
        if timed {
            charge_process(&request, dev, operation, bytes, queued_latency_ns);
        }
    }

    if let Some(counters) = get_or_insert!(STORAGE_COUNTERS, &device_key, &ZERO_COUNTERS) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe {
            (*counters).completed_requests += 1;
            (*counters).completed_bytes += bytes;
            if error != 0 {
                (*counters).errors += 1;
            }
            if !timed {
                (*counters).untimed_completions += 1;
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn charge_process(request: &InflightRequest, dev: u32, operation: u8, bytes: u64, latency_ns: u64) {
    let key = ProcessIoKey {
        tgid: request.tgid,
        dev,
        cgroup_id: request.cgroup_id,
        operation,
        _padding: [0; 7],
    };
    if let Some(stats) = get_or_insert!(PROCESS_IO, &key, &ZERO_PROCESS_IO) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe {
            (*stats).completed_requests += 1;
            (*stats).completed_bytes += bytes;
            (*stats).latency_sum_ns += latency_ns;
            (*stats).comm = request.comm;
        }
    }
}
