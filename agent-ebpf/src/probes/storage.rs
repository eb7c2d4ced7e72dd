//! Block I/O latency per device and direction, split into queued->complete (what the
//! application waits for) and issued->complete (the device alone), plus I/O charged to the
//! process that queued it.
//!
//! Requests are matched across tracepoints by (device, start sector): the classic block
//! tracepoints carry no request pointer. In flight they live in a fixed table of slots
//! (`agent_common::storage::INFLIGHT_SLOTS`): no allocation per request, nothing to leak.
use agent_common::storage::{
    INFLIGHT_SLOTS, InflightEntry, InflightIo, InflightRequest, InflightRequestKey, InflightSlot,
    IoOperation, MAX_BIOS_PER_REQUEST, ProcessIoKey, ProcessIoStats, STALE_REQUEST_NS,
    StorageDeviceKey, StorageDeviceStats, candidate_slots, choose_slot, first_slot_will_do,
    slots_for,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{bpf_get_current_comm, bpf_loop},
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::{
    debug,
    macro_support::{Level, level_enabled},
};

use super::shared::{
    AddressSlot, add, add_sample, add32, address_of, field, get_or_insert, member,
};

/// Not preallocated: a 4 KiB histogram per CPU exists only for (device, direction, stage)
/// keys that saw I/O, instead of for every possible key on every CPU.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Userspace sizes this to the machine's block devices at load time. One value per device and
/// direction holds both latency histograms and the counters: one lookup per completion.
#[map]
static STORAGE_DEVICES: PerCpuHashMap<StorageDeviceKey, StorageDeviceStats> =
    PerCpuHashMap::with_max_entries(128, BPF_F_NO_PREALLOC);

/// A zeroed value to insert from: 8 KiB does not fit on the 512-byte eBPF stack.
#[map]
static ZERO_DEVICE_STATS: PerCpuArray<StorageDeviceStats> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PROCESS_IO: LruPerCpuHashMap<ProcessIoKey, ProcessIoStats> =
    LruPerCpuHashMap::with_max_entries(4096, 0);

/// Device requests in flight, by (device, start sector): issue and completion times.
#[map]
static INFLIGHT_REQUESTS: Array<InflightSlot> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// Application I/Os in flight, by pointer (BTF raw tracepoints only, see [`InflightIo`]): who
/// queued each, when, and how many of its parts are still at the device.
#[map]
static INFLIGHT_IOS: Array<InflightIo> = Array::with_max_entries(INFLIGHT_SLOTS, 0);

/// The slot of `table` holding the entry with `key`, if it is still there.
#[inline(always)]
fn find_in<E: InflightEntry>(table: &Array<E>, slots: [u32; 2], key: &E::Key) -> Option<*mut E> {
    for index in slots {
        if let Some(slot) = table.get_ptr_mut(index) {
            // SAFETY: pointer from a successful lookup of a preallocated array slot.
            if unsafe { (*slot).holds(key) } {
                return Some(slot);
            }
        }
    }
    None
}

/// Picks one of the two slots for an entry with `key` (see `choose_slot`); the caller
/// writes the entry there, key included, in place.
#[inline(always)]
fn claim_in<E: InflightEntry>(
    table: &Array<E>,
    [first_index, second_index]: [u32; 2],
    key: &E::Key,
    now: u64,
) -> Option<*mut E> {
    let first = table.get_ptr_mut(first_index)?;
    // SAFETY: pointers from successful lookups of preallocated array slots. Another CPU may
    // write the same slot at the same instant only if two live entries collide there; the
    // worst outcome is one mistimed sample.
    unsafe {
        if first_slot_will_do(key, &*first, now) {
            return Some(first);
        }
        let second = table.get_ptr_mut(second_index)?;
        let chosen = if choose_slot(key, &*first, &*second, now) == 1 {
            second
        } else {
            first
        };
        // Both slots may hold entries still in flight: the older is then given up, and its
        // completion will count as untimed. Rare (two live collisions in a 32,768-slot
        // table), so the agent's debug log names each one. The level is a read-only global:
        // at the default level the verifier removes this whole branch, checks included.
        if level_enabled(Level::Debug) && !(*chosen).holds(key) && !(*chosen).is_reusable(now) {
            let index = if chosen == first {
                first_index
            } else {
                second_index
            };
            debug!(
                &(),
                target: "envelope::probes",
                "{} slot {} evicted: its entry, queued {} us before, will complete untimed",
                E::TABLE,
                index,
                now.wrapping_sub((*chosen).started_ns()) / 1000
            );
        }
        Some(chosen)
    }
}

/// The slot holding the request with `key`, if it is still there.
#[inline(always)]
fn find_request(key: &InflightRequestKey) -> Option<*mut InflightSlot> {
    find_in(&INFLIGHT_REQUESTS, candidate_slots(key), key)
}

/// Claims a slot for a request with `key`; the caller fills in the request there.
#[inline(always)]
fn claim_slot(key: InflightRequestKey, now: u64) -> Option<*mut InflightSlot> {
    let slot = claim_in(&INFLIGHT_REQUESTS, candidate_slots(&key), &key, now)?;
    // SAFETY: pointer from a successful lookup.
    unsafe { (*slot).key = key };
    Some(slot)
}

/// Puts a copy of `request` in a slot for `key`.
#[inline(always)]
fn place_request(key: InflightRequestKey, request: InflightRequest, now: u64) {
    if let Some(slot) = claim_slot(key, now) {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*slot).request = request };
    }
}

const ZERO_PROCESS_IO: ProcessIoStats = ProcessIoStats {
    completed_requests: 0,
    completed_bytes: 0,
    latency_sum_ns: 0,
    comm: [0; 16],
};

// Every probe comes twice: a BTF raw tracepoint (`tp_btf`, the kernel's own arguments, its
// own recursion guard) and the classic tracepoint (a trace record, used where BTF or a member
// is missing). Both read the same fields and hand them to one handler.

/// The BTF probes follow each I/O the application queued by pointers (see [`InflightIo`]);
/// the request table then only times the device.
#[btf_tracepoint(function = "block_bio_queue")]
pub fn block_bio_queue_btf(ctx: BtfTracePointContext) -> i32 {
    let bio: *const u8 = ctx.arg(0);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    super::sched::note_io_queued(tgid, now);
    let waited_on: *const u8 = member!(bio, bio_private);
    let Some(mut key) = address_of(waited_on, AddressSlot::BioQueue) else {
        return 0;
    };
    if key == 0 {
        let Some(bio_address) = address_of(bio, AddressSlot::BioQueue) else {
            return 0;
        };
        key = bio_address;
    }
    let size: u32 = member!(bio, bio_size);
    let sector: u64 = member!(bio, bio_sector);
    // Another bio of an I/O in flight (a direct read larger than one bio holds, or spanning
    // two extents of its file): one more part. A finished I/O whose completion was missed,
    // its key's memory reused, is replaced instead. A file system's direct I/O says which
    // it is (the bytes it queued before this bio); any other bio is judged by where it
    // starts and when (see `takes_another_bio`).
    if let Some(slot) = find_in(&INFLIGHT_IOS, slots_for(key), &key) {
        // SAFETY: pointer from a successful lookup; the counts are atomic against a part
        // completing on another CPU.
        unsafe {
            let joins = match iomap_dio_queued_before(bio, key, size) {
                Some(queued_before) => queued_before != 0,
                None => (*slot).takes_another_bio(tgid, sector, now),
            };
            if joins {
                add32(&raw mut (*slot).parts, 1);
                add(&raw mut (*slot).bytes, size as u64);
                (*slot).last_bio_after = (*slot).bio_after(now);
                (*slot).next_sector = InflightIo::sector_after(sector, size);
                return 0;
            }
        }
    } else if level_enabled(Level::Debug)
        && let Some(queued_before) = iomap_dio_queued_before(bio, key, size)
        && queued_before != 0
    {
        // Its earlier bios all completed before this one was queued (the submitter paused
        // between them): they were timed as one I/O, this and any later ones are another.
        debug!(
            &(),
            target: "envelope::probes",
            "a direct I/O of pid {} queued a bio after its first {} bytes had completed: timed as two I/Os",
            tgid,
            queued_before
        );
    }
    let Some(slot) = claim_in(&INFLIGHT_IOS, slots_for(key), &key, now) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup of an array slot, filled in place; the comm
    // helper writes 16 bytes into it.
    unsafe {
        (*slot).key = key;
        (*slot).queued_ns = now;
        (*slot).cgroup_id = bpf_get_current_cgroup_id();
        (*slot).tgid = tgid;
        (*slot).bytes = size as u64;
        (*slot).parts = 1;
        (*slot).last_bio_after = 0;
        (*slot).next_sector = InflightIo::sector_after(sector, size);
        if bpf_get_current_comm((*slot).comm.as_mut_ptr().cast(), 16) != 0 {
            (*slot).comm[0] = 0;
        }
    }
    0
}

/// The kernel's `iomap_dio_bio_end_io`, overwritten by userspace at load time from
/// kallsyms; 0 where unknown (or the BTF lacks `bio.bi_end_io` or `iomap_dio.size`).
#[unsafe(no_mangle)]
static IOMAP_DIO_BIO_END_IO: u64 = 0;

/// For a bio of a file system's direct I/O (ext4, XFS, btrfs: it ends in
/// `iomap_dio_bio_end_io`, its `bi_private` is the I/O's `struct iomap_dio`), the bytes that
/// I/O queued before this bio of `size`: 0 for its first bio, so also for a new I/O whose
/// `iomap_dio` took the memory of one whose completion was missed. None for any other bio.
/// The count is exact where the bio's sector is not: a read spanning two extents of its
/// file goes on elsewhere on the disk.
#[inline(always)]
fn iomap_dio_queued_before(bio: *const u8, dio: u64, size: u32) -> Option<u64> {
    // SAFETY: a static that lives as long as the program; volatile so that the load-time
    // value is read, not the compiled 0.
    let end_io_address = unsafe { core::ptr::read_volatile(&raw const IOMAP_DIO_BIO_END_IO) };
    if end_io_address == 0 || dio == 0 {
        return None;
    }
    let end_io: u64 = member!(bio, bio_end_io);
    if end_io != end_io_address {
        return None;
    }
    let offset = super::shared::offset_of_member!(iomap_dio_size);
    // SAFETY: a fault-tolerant read of kernel memory (`bi_private` is untyped to the
    // verifier); a wrong address reads as an error.
    let queued =
        unsafe { bpf_probe_read_kernel((dio as *const u8).add(offset) as *const i64) }.ok()?;
    Some((queued as u64).saturating_sub(size as u64))
}

/// The key of the I/O that `original`, a bio a split part was cut from, belongs to: its own
/// `bi_private` where set, else itself (as `block_bio_queue_btf` keys it). `original` is an
/// address the verifier does not type, so the member is read with a helper (splits and
/// their parts are the less common path).
#[inline(always)]
fn key_of_original(original: u64) -> u64 {
    let offset = super::shared::offset_of_member!(bio_private);
    // SAFETY: a fault-tolerant read of kernel memory; a wrong address reads as an error.
    let waited_on =
        unsafe { bpf_probe_read_kernel((original as *const u8).add(offset) as *const u64) }
            .unwrap_or(0);
    if waited_on != 0 { waited_on } else { original }
}

#[tracepoint(category = "block", name = "block_bio_queue")]
pub fn block_bio_queue(ctx: TracePointContext) -> u32 {
    if let (Ok(dev), Ok(sector)) = (field!(&ctx, bio_queue_dev), field!(&ctx, bio_queue_sector)) {
        on_bio_queue(dev, sector);
    }
    0
}

#[inline(always)]
fn on_bio_queue(dev: u32, sector: u64) {
    let key = InflightRequestKey::new(dev, sector);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // block_bio_queue runs in the submitter's context (submit_bio), so the current task is
    // the process, or the kernel thread (writeback, journal), that asked for the I/O.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    super::sched::note_io_queued(tgid, now);
    let Some(slot) = claim_slot(key, now) else {
        return;
    };
    // Filled in place: no request built on the stack and copied (every instruction counts on
    // a path taken for each bio).
    // SAFETY: pointer from a successful lookup of an array slot; the helpers write 8 and 16
    // bytes into it.
    unsafe {
        let request = &mut (*slot).request;
        request.queued_ns = now;
        request.issued_ns = 0;
        request.cgroup_id = bpf_get_current_cgroup_id();
        request.tgid = tgid;
        if bpf_get_current_comm(request.comm.as_mut_ptr().cast(), 16) != 0 {
            request.comm[0] = 0;
        }
    }
}

/// A bio too large for the device is split: the front becomes a new bio chained to the
/// original (its `bi_private`), the original continues at `new_sector`. The BTF probe counts
/// one more part for the I/O; the classic one copies the submitter and queue time to a
/// request key at `new_sector`, so the second request is timed from when the application
/// queued it too.
#[btf_tracepoint(function = "block_split")]
pub fn block_split_btf(ctx: BtfTracePointContext) -> i32 {
    let split: *const u8 = ctx.arg(0);
    let original: *const u8 = member!(split, bio_private);
    let Some(original) = address_of(original, AddressSlot::Split) else {
        return 0;
    };
    let key = key_of_original(original);
    if let Some(slot) = find_in(&INFLIGHT_IOS, slots_for(key), &key) {
        // SAFETY: pointer from a successful lookup; atomic against a part completing on
        // another CPU.
        add32(unsafe { &raw mut (*slot).parts }, 1);
    }
    0
}

#[tracepoint(category = "block", name = "block_split")]
pub fn block_split(ctx: TracePointContext) -> u32 {
    if let (Ok(dev), Ok(sector), Ok(new_sector)) = (
        field!(&ctx, split_dev),
        field!(&ctx, split_sector),
        field!(&ctx, split_new_sector),
    ) {
        on_split(dev, sector, new_sector);
    }
    0
}

#[inline(always)]
fn on_split(dev: u32, sector: u64, new_sector: u64) {
    let key = InflightRequestKey::new(dev, sector);
    let Some(slot) = find_request(&key) else {
        return;
    };
    // SAFETY: copied out at once.
    let request = unsafe { (*slot).request };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    place_request(InflightRequestKey::new(dev, new_sector), request, now);
}

/// The whole disk a request is for, encoded as the classic tracepoints do
/// (`disk_devt(rq->q->disk)`, MINORBITS 20); 0 when the queue has no disk.
#[inline(always)]
fn request_dev(request: *const u8) -> u32 {
    let queue: *const u8 = member!(request, request_queue);
    let disk: *const u8 = member!(queue, queue_disk);
    if disk.is_null() {
        return 0;
    }
    let major: u32 = member!(disk, disk_major);
    let first_minor: u32 = member!(disk, disk_first_minor);
    major << 20 | first_minor
}

#[btf_tracepoint(function = "block_rq_issue")]
pub fn block_rq_issue_btf(ctx: BtfTracePointContext) -> i32 {
    let request: *const u8 = ctx.arg(0);
    let key = InflightRequestKey::new(request_dev(request), member!(request, request_sector));
    // The BTF probes time the application's bios in their own table: the request table holds
    // only issue times, so there is nothing to look up first.
    // SAFETY: plain helper call.
    place_issued(key, unsafe { bpf_ktime_get_ns() });
    0
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn block_rq_issue(ctx: TracePointContext) -> u32 {
    if let (Ok(dev), Ok(sector)) = (field!(&ctx, rq_issue_dev), field!(&ctx, rq_issue_sector)) {
        on_rq_issue(dev, sector);
    }
    0
}

#[inline(always)]
fn on_rq_issue(dev: u32, sector: u64) {
    let key = InflightRequestKey::new(dev, sector);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match find_request(&key) {
        // SAFETY: pointer from a successful lookup; a racing writer can only change timestamps.
        Some(slot) => unsafe { (*slot).request.issued_ns = now },
        // Issued without a queue event (e.g. a flush the block layer generated): the device
        // time is still measurable, the submitter is not known.
        None => place_issued(key, now),
    }
}

/// A request issued at `now`, with no queue time.
#[inline(always)]
fn place_issued(key: InflightRequestKey, now: u64) {
    let request = InflightRequest {
        issued_ns: now,
        ..InflightRequest::default()
    };
    place_request(key, request, now);
}

/// One completed request as both kinds of probe see it.
struct Completion {
    dev: u32,
    sector: u64,
    bytes: u64,
    failed: bool,
    operation: u8,
}

#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_rq_complete_btf(ctx: BtfTracePointContext) -> i32 {
    on_rq_complete_btf::<true>(ctx)
}

/// [`block_rq_complete_btf`] for kernels without `bpf_loop` (before 5.17): it follows the
/// first [`MAX_BIOS_PER_REQUEST`] bios of a request only.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_rq_complete_btf_inline(ctx: BtfTracePointContext) -> i32 {
    on_rq_complete_btf::<false>(ctx)
}

#[inline(always)]
fn on_rq_complete_btf<const LOOP: bool>(ctx: BtfTracePointContext) -> i32 {
    let request: *const u8 = ctx.arg(0);
    // blk_status_t is a u8; the argument slot is 64 bits wide.
    let status: u64 = ctx.arg(1);
    let bytes: u32 = ctx.arg(2);
    let cmd_flags: u32 = member!(request, request_cmd_flags);
    let dev = request_dev(request);
    let operation = IoOperation::from_req_op(cmd_flags) as u8;
    if let Ok((stats, now)) = on_rq_complete(Completion {
        dev,
        sector: member!(request, request_sector),
        // The classic tracepoint reports nr_bytes >> 9 sectors: the same rounding.
        bytes: (bytes as u64 >> 9) << 9,
        failed: status as u8 != 0,
        operation,
    }) {
        complete_ios::<LOOP>(request, bytes, dev, operation, stats, now);
    }
    0
}

/// The application I/Os whose parts this completion finishes: the request's bios, first to
/// last, as far as `bytes` covers them whole (a partial completion finishes the rest later).
#[inline(always)]
fn complete_ios<const LOOP: bool>(
    request: *const u8,
    bytes: u32,
    dev: u32,
    operation: u8,
    stats: *mut StorageDeviceStats,
    now: u64,
) {
    let mut bio: *const u8 = member!(request, request_bio);
    let mut left = bytes;
    // With bpf_loop to go on, only the first few bios inline: the verifier checks the loop's
    // callback once for every distinct state the inline walk can end in, and 32 inline
    // iterations end in too many (it gave up after a million instructions).
    let inline_bios = if LOOP {
        BIOS_BEFORE_LOOP
    } else {
        MAX_BIOS_PER_REQUEST
    };
    for _ in 0..inline_bios {
        if bio.is_null() {
            return;
        }
        let size: u32 = member!(bio, bio_size);
        if size > left {
            // A partial completion: the rest completes later.
            return;
        }
        left -= size;
        complete_part(bio, dev, operation, stats, now);
        bio = member!(bio, bio_next);
    }
    if bio.is_null() || left == 0 {
        return;
    }
    // A request merged from many small bios (batched sequential direct reads merge into
    // requests of 128 or more): the rest through bpf_loop, where the kernel has it.
    let Some(bio) = address_of(bio, AddressSlot::RequestComplete) else {
        return;
    };
    let mut walk = BioWalk {
        bio,
        now,
        left,
        dev,
        operation,
    };
    if LOOP {
        // SAFETY: the callback reads and updates `walk`, which outlives the call.
        unsafe {
            bpf_loop(
                MORE_BIOS_PER_REQUEST,
                complete_next_io as *mut core::ffi::c_void,
                (&raw mut walk).cast(),
                0,
            );
        }
    }
    // Bios beyond both walks (or beyond the inline one, on kernels without bpf_loop): their
    // I/Os age out of INFLIGHT_IOS untimed. Named in the debug log (removed by the verifier
    // otherwise).
    if level_enabled(Level::Debug) && walk.bio != 0 && walk.left > 0 {
        debug!(
            &(),
            target: "envelope::probes",
            "a request of {} bytes on device {}:{} has more bios than the probe follows: {} bytes of it complete untimed",
            bytes,
            dev >> 20,
            dev & 0xF_FFFF,
            walk.left
        );
    }
}

/// Bios a request may have past the [`BIOS_BEFORE_LOOP`] the completion follows inline,
/// walked with `bpf_loop` (Linux 5.17), whose callback the verifier checks once rather than
/// once per iteration. A request merged from page-sized bios has up to one per page: 1,024
/// is 4 MiB.
const MORE_BIOS_PER_REQUEST: u32 = 1024;

/// Bios followed inline, with typed loads, before [`MORE_BIOS_PER_REQUEST`] through bpf_loop:
/// a direct read is one bio, a large one split at the device a few.
const BIOS_BEFORE_LOOP: u32 = 4;

/// Where the inline walk stopped, for [`complete_next_io`] to go on from: `bpf_loop`'s
/// context, on the program's stack. The callback sees addresses as numbers, not typed
/// pointers, so it reads the bios with helpers.
#[repr(C)]
struct BioWalk {
    bio: u64,
    now: u64,
    left: u32,
    dev: u32,
    operation: u8,
}

/// One more bio of a long request (a `bpf_loop` callback: 0 goes on, 1 stops).
#[inline(never)]
extern "C" fn complete_next_io(_index: u64, context: *mut core::ffi::c_void) -> i64 {
    let walk = context as *mut BioWalk;
    // SAFETY: `context` is the BioWalk the caller passed to bpf_loop; the bio's members are
    // read with fault-tolerant helper reads.
    unsafe {
        let bio = (*walk).bio;
        if bio == 0 {
            return 1;
        }
        let at = |offset: usize| (bio as *const u8).add(offset);
        let Ok(size) =
            bpf_probe_read_kernel(at(super::shared::offset_of_member!(bio_size)) as *const u32)
        else {
            return 1;
        };
        if size > (*walk).left {
            // A partial completion: the rest completes later, nothing is left untimed.
            (*walk).left = 0;
            return 1;
        }
        (*walk).left -= size;
        let waited_on =
            bpf_probe_read_kernel(at(super::shared::offset_of_member!(bio_private)) as *const u64)
                .unwrap_or(0);
        let device_key = StorageDeviceKey {
            dev: (*walk).dev,
            operation: (*walk).operation,
            _padding: [0; 3],
        };
        if let Some(stats) = STORAGE_DEVICES.get_ptr_mut(&device_key) {
            let key = if waited_on != 0 { waited_on } else { bio };
            complete_io(
                key,
                waited_on,
                (*walk).dev,
                (*walk).operation,
                stats,
                (*walk).now,
            );
        }
        (*walk).bio =
            bpf_probe_read_kernel(at(super::shared::offset_of_member!(bio_next)) as *const u64)
                .unwrap_or(0);
    }
    0
}

/// One part of an application I/O is done: the bio it queued, or a part split from it.
/// The last part times it and charges it to its submitter.
#[inline(always)]
fn complete_part(
    bio: *const u8,
    dev: u32,
    operation: u8,
    stats: *mut StorageDeviceStats,
    now: u64,
) {
    // Keyed as block_bio_queue_btf keys it: by what the bio points to, or by itself. A split
    // part points to the bio it was cut from, keyed in turn the same way.
    let waited_on: *const u8 = member!(bio, bio_private);
    let Some(waited_on) = address_of(waited_on, AddressSlot::RequestComplete) else {
        return;
    };
    let key = if waited_on != 0 {
        waited_on
    } else {
        match address_of(bio, AddressSlot::RequestComplete) {
            Some(bio_address) => bio_address,
            None => return,
        }
    };
    complete_io(key, waited_on, dev, operation, stats, now);
}

/// The part of the I/O keyed `key` is done (`waited_on` is the bio's `bi_private`, for a
/// split part whose I/O is keyed by the bio it was cut from); the last part times the I/O.
#[inline(always)]
fn complete_io(
    key: u64,
    waited_on: u64,
    dev: u32,
    operation: u8,
    stats: *mut StorageDeviceStats,
    now: u64,
) {
    let (slot, key) = match find_in(&INFLIGHT_IOS, slots_for(key), &key) {
        Some(slot) => (slot, key),
        None if waited_on != 0 => {
            let key = key_of_original(waited_on);
            match find_in(&INFLIGHT_IOS, slots_for(key), &key) {
                Some(slot) => (slot, key),
                None => return,
            }
        }
        None => return,
    };
    // SAFETY: pointer from a successful lookup. The decrement is atomic (parts of one I/O
    // may complete on two CPUs, or nested on one); reading the count back is not (a fetching
    // add needs BPF atomics of Linux 5.12, the probes run on 5.8), so the slot's key is
    // checked and cleared at once: only a second last part landing within those few
    // instructions could time the I/O twice.
    let io = unsafe {
        add32(&raw mut (*slot).parts, u32::MAX);
        if core::ptr::read_volatile(&raw const (*slot).parts) != 0 || (*slot).key != key {
            return;
        }
        let io = *slot;
        (*slot).key = 0;
        io
    };
    let latency_ns = now.wrapping_sub(io.queued_ns);
    if latency_ns >= STALE_REQUEST_NS {
        return;
    }
    // SAFETY: this CPU's slot of a per-CPU value.
    add_sample(unsafe { &raw mut (*stats).queued_to_complete }, latency_ns);
    charge_process(
        io.tgid,
        io.cgroup_id,
        &io.comm,
        dev,
        operation,
        io.bytes,
        latency_ns,
    );
}

#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    let _ = try_block_rq_complete(&ctx);
    0
}

#[inline(always)]
fn try_block_rq_complete(ctx: &TracePointContext) -> Result<(), i64> {
    let nr_sector: u32 = field!(ctx, rq_complete_nr_sector)?;
    let error: i32 = field!(ctx, rq_complete_error)?;
    let rwbs: [u8; 8] = field!(ctx, rq_complete_rwbs)?;
    on_rq_complete(Completion {
        dev: field!(ctx, rq_complete_dev)?,
        sector: field!(ctx, rq_complete_sector)?,
        bytes: (nr_sector as u64) << 9,
        failed: error != 0,
        operation: IoOperation::from_rwbs(&rwbs) as u8,
    })?;
    Ok(())
}

/// Device-level accounting of a completed request; returns its device's stats and the time,
/// for the BTF probe to finish application I/Os with.
#[inline(always)]
fn on_rq_complete(completion: Completion) -> Result<(*mut StorageDeviceStats, u64), i64> {
    let Completion {
        dev,
        sector,
        bytes,
        failed,
        operation,
    } = completion;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };

    let key = InflightRequestKey::new(dev, sector);
    // SAFETY: the request is copied out, then its slot freed.
    let request = find_request(&key).map(|slot| unsafe {
        let request = (*slot).request;
        (*slot).key.dev = 0;
        request
    });

    let device_key = StorageDeviceKey {
        dev,
        operation,
        _padding: [0; 3],
    };
    let stats = get_or_insert!(STORAGE_DEVICES, &device_key, ZERO_DEVICE_STATS.get(0)).ok_or(0)?;
    let mut timed = false;
    if let Some(request) = request {
        if request.issued_ns != 0 && now.wrapping_sub(request.issued_ns) < STALE_REQUEST_NS {
            // SAFETY: this CPU's slot of a per-CPU value.
            add_sample(
                unsafe { &raw mut (*stats).issued_to_complete },
                now - request.issued_ns,
            );
            timed = true;
        }
        let mut queued_latency_ns = 0;
        if request.queued_ns != 0 && now.wrapping_sub(request.queued_ns) < STALE_REQUEST_NS {
            queued_latency_ns = now - request.queued_ns;
            // SAFETY: as above.
            add_sample(
                unsafe { &raw mut (*stats).queued_to_complete },
                queued_latency_ns,
            );
            timed = true;
        }
        // Only the classic probes queue requests by sector (the BTF ones charge each
        // application I/O when its last part completes, in `complete_part`).
        if timed && request.queued_ns != 0 {
            charge_process(
                request.tgid,
                request.cgroup_id,
                &request.comm,
                dev,
                operation,
                bytes,
                queued_latency_ns,
            );
        }
    }
    // SAFETY: this CPU's slot of a per-CPU value.
    unsafe {
        let counters = &raw mut (*stats).counters;
        add(&raw mut (*counters).completed_requests, 1);
        add(&raw mut (*counters).completed_bytes, bytes);
        if failed {
            add(&raw mut (*counters).errors, 1);
        }
        if !timed {
            add(&raw mut (*counters).untimed_completions, 1);
        }
    }
    Ok((stats, now))
}

#[inline(always)]
fn charge_process(
    tgid: u32,
    cgroup_id: u64,
    comm: &[u8; 16],
    dev: u32,
    operation: u8,
    bytes: u64,
    latency_ns: u64,
) {
    let key = ProcessIoKey {
        tgid,
        dev,
        cgroup_id,
        operation,
        _padding: [0; 7],
    };
    if let Some(stats) = get_or_insert!(PROCESS_IO, &key, Some(&ZERO_PROCESS_IO)) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe {
            add(&raw mut (*stats).completed_requests, 1);
            add(&raw mut (*stats).completed_bytes, bytes);
            add(&raw mut (*stats).latency_sum_ns, latency_ns);
            (*stats).comm = *comm;
        }
    }
}
