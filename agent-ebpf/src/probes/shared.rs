//! Helpers shared by the probe families: tracepoint offsets, kernel struct member reads,
//! histogram recording, context.
use agent_common::{
    btf::BtfOffsets,
    histogram::{HISTOGRAM_BUCKETS, LatencyHistogram, bucket_index},
    tracepoint::TracepointOffsets,
};
use aya_ebpf::{EbpfContext, macros::map, maps::PerCpuArray, programs::TracePointContext};

/// Field offsets, overwritten by userspace at load time from the live format files.
#[unsafe(no_mangle)]
pub static TRACEPOINT_OFFSETS: TracepointOffsets = TracepointOffsets::LINUX_6_18;

/// Reads one offset. The volatile read stops the compiler from folding the default value in:
/// userspace rewrites the global in the object's .rodata before loading.
macro_rules! offset {
    ($field:ident) => {
        $crate::probes::shared::read_offset(core::ptr::addr_of!(
            $crate::probes::shared::TRACEPOINT_OFFSETS.$field
        ))
    };
}
pub(crate) use offset;

#[inline(always)]
pub fn read_offset(field: *const u16) -> usize {
    // SAFETY: `field` points into a static that lives as long as the program.
    unsafe { core::ptr::read_volatile(field) as usize }
}

/// Reads one tracepoint field: `let dev: u32 = field!(ctx, rq_issue_dev)?;`.
///
/// When the live offset is the one this object was compiled for, the field is a direct load
/// from the context at an immediate offset, which the verifier accepts for tracepoint
/// programs; otherwise (another kernel's layout) it goes through `bpf_probe_read_kernel` at the
/// live offset (also where userspace sets `force_helper_reads`, to test that path). Both
/// branches are verified, so one object serves every layout, and the common case avoids a
/// helper call per field: on the benchmark VM a helper call costs as much as
/// the rest of a small probe (BENCHMARKS.md).
macro_rules! field {
    ($ctx:expr, $field:ident) => {
        $crate::probes::shared::field_at!(
            $ctx,
            $crate::probes::shared::offset!($field),
            $crate::probes::shared::compiled_offset!($field)
        )
    };
}
pub(crate) use field;

/// The offset of a field in the layout this object was compiled for.
macro_rules! compiled_offset {
    ($field:ident) => {
        agent_common::tracepoint::TracepointOffsets::LINUX_6_18.$field as usize
    };
}
pub(crate) use compiled_offset;

/// [`field!`] for a field at a live offset with the offset it has in the compiled layout
/// (for members inside a field, such as the address inside a sockaddr).
macro_rules! field_at {
    ($ctx:expr, $live:expr, $compiled:expr) => {
        // SAFETY: offsets come from the tracepoint's own format file; the direct load is
        // checked by the verifier, the other path fails cleanly through the helper.
        unsafe { $crate::probes::shared::read_ctx($ctx, $live, $compiled) }
    };
}
pub(crate) use field_at;

/// See [`field!`]. Inlined into each probe, so `compiled` is a constant there.
///
/// # Safety
/// `live` must be the offset of a field of type `T` in the tracepoint's record, and so
/// must `compiled` in the layout the object was compiled for.
#[inline(always)]
pub unsafe fn read_ctx<T: Copy>(
    ctx: &TracePointContext,
    live: usize,
    compiled: usize,
) -> Result<T, i32> {
    if live == compiled
        && read_offset(core::ptr::addr_of!(TRACEPOINT_OFFSETS.force_helper_reads)) == 0
    {
        let field = unsafe { (ctx.as_ptr() as *const u8).add(compiled) } as *const T;
        if compiled % core::mem::align_of::<T>() == 0 {
            // SAFETY: inside the record (the verifier checks it), aligned for T. Volatile:
            // exactly one load of the field's width, the access the verifier checks.
            Ok(unsafe { field.read_volatile() })
        } else {
            // SAFETY: as above; byte loads for a field the compiler cannot prove aligned.
            Ok(unsafe { field.read_unaligned() })
        }
    } else {
        unsafe { ctx.read_at(live) }
    }
}

/// Kernel struct member offsets for the BTF raw tracepoints, overwritten by userspace at load
/// time from the running kernel's BTF.
#[unsafe(no_mangle)]
pub static BTF_OFFSETS: BtfOffsets = BtfOffsets::LINUX_6_18;

/// Reads a kernel struct member through a pointer a BTF raw tracepoint was given (or one read
/// from such a member): `let sector: u64 = member!(bio, bio_sector);`.
///
/// A plain load: the offset is a constant to the verifier (read-only data, frozen before the
/// programs load), which checks the access against the kernel's BTF and turns it into a
/// fault-tolerant load (a NULL or stale pointer reads as zero). No helper call per field,
/// unlike the classic tracepoints' fallback path.
macro_rules! member {
    ($pointer:expr, $field:ident) => {
        $crate::probes::shared::read_member(
            $pointer,
            $crate::probes::shared::offset_of_member!($field),
        )
    };
}
pub(crate) use member;

/// The live offset of a member, from [`BTF_OFFSETS`].
macro_rules! offset_of_member {
    ($field:ident) => {
        $crate::probes::shared::read_offset(core::ptr::addr_of!(
            $crate::probes::shared::BTF_OFFSETS.$field
        ))
    };
}
pub(crate) use offset_of_member;

/// See [`member!`].
#[inline(always)]
pub fn read_member<T: Copy>(pointer: *const u8, offset: usize) -> T {
    // SAFETY: `pointer` is a BTF-typed kernel pointer and `offset` a member's offset in its
    // type, both checked by the verifier; the load cannot fault (see `member!`).
    unsafe { core::ptr::read_volatile(pointer.add(offset) as *const T) }
}

/// Where [`address_of`] turns a kernel pointer into a number: one slot per program that
/// uses it (see [`AddressSlot`]).
#[map]
static ADDRESS_SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

/// Which program calls [`address_of`]. A raw tracepoint program never nests on itself (the
/// kernel's per-program recursion guard), but two programs may nest on one CPU (a completion
/// in an interrupt while a bio is queued): each has its own slot, so neither can overwrite
/// the other's address between its store and its load.
#[repr(u32)]
pub enum AddressSlot {
    BioQueue = 0,
    Split = 1,
    RequestComplete = 2,
}

/// The address a BTF-typed kernel pointer holds, as a number to hash and compare (a key).
///
/// The verifier refuses arithmetic on such pointers (`ptr as u64` is no conversion to it),
/// but lets a privileged program store one in a map and read the value back as a plain
/// number. The same goes for a `void *` member (`bio.bi_private`), which it types as memory
/// of unknown size.
#[inline(always)]
pub fn address_of(pointer: *const u8, slot: AddressSlot) -> Option<u64> {
    let scratch = ADDRESS_SCRATCH.get_ptr_mut(slot as u32)?;
    // SAFETY: this CPU's slot of a per-CPU array, only this program's; volatile, so the
    // value is stored and loaded, not forwarded as the pointer it is.
    unsafe {
        core::ptr::write_volatile(scratch, pointer as u64);
        Some(core::ptr::read_volatile(scratch))
    }
}

/// A zeroed histogram to insert from: 4 KiB does not fit on the 512-byte eBPF stack.
#[map]
static ZERO_HISTOGRAM: PerCpuArray<LatencyHistogram> = PerCpuArray::with_max_entries(1, 0);

/// Insert only if absent, so two CPUs racing to create a key do not clobber each other.
pub const BPF_NOEXIST: u64 = 1;

/// Returns a pointer to the zeroed histogram, for inserting a new key.
#[inline(always)]
pub fn zero_histogram() -> Option<&'static LatencyHistogram> {
    ZERO_HISTOGRAM.get(0)
}

/// Adds `value` to a counter in a map value, atomically (one `lock add` instruction).
///
/// Per-CPU values are not enough on their own: BTF raw tracepoints may nest on one CPU (a
/// block completion in a hard interrupt arriving while another completion's program runs in
/// a soft interrupt), and a plain read-modify-write interrupted between its load and store
/// loses the inner update. Classic tracepoints never nested, they skipped the inner event
/// instead (the missed events this design removes). On a value only this CPU writes the
/// locked add costs a few nanoseconds.
#[inline(always)]
pub fn add(counter: *mut u64, value: u64) {
    // SAFETY: `counter` points into a map value from a successful lookup.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, value,
        );
    }
}

/// [`add`] for a 32-bit counter (a 4-byte `lock add`).
#[inline(always)]
pub fn add32(counter: *mut u32, value: u32) {
    // SAFETY: `counter` points into a map value from a successful lookup.
    unsafe {
        core::intrinsics::atomic_xadd::<u32, u32, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, value,
        );
    }
}

/// Adds one sample to a histogram that lives in a per-CPU map value.
#[inline(always)]
pub fn add_sample(histogram: *mut LatencyHistogram, value_ns: u64) {
    let index = bucket_index(value_ns);
    // SAFETY: the pointer comes from a successful map lookup and is this CPU's slot.
    unsafe {
        if index < HISTOGRAM_BUCKETS {
            add(&raw mut (*histogram).buckets[index], 1);
        }
        add(&raw mut (*histogram).count, 1);
        add(&raw mut (*histogram).sum_ns, value_ns);
    }
}

/// Finds the value for `$key` in a per-CPU hash map, inserting a copy of `$zero` (an
/// `Option<&V>`) first when missing. `$zero` is evaluated only for a new key: for values too
/// large for the stack it is itself a lookup, and every lookup counts on a hot path.
macro_rules! get_or_insert {
    ($map:expr, $key:expr, $zero:expr) => {
        match $map.get_ptr_mut($key) {
            Some(value) => Some(value),
            None => match $zero {
                Some(zero) => {
                    let _ = $map.insert($key, zero, $crate::probes::shared::BPF_NOEXIST);
                    $map.get_ptr_mut($key)
                }
                None => None,
            },
        }
    };
}
pub(crate) use get_or_insert;

/// Records `value_ns` into the histogram of `$key` in `$map`.
macro_rules! record_latency {
    ($map:expr, $key:expr, $value_ns:expr) => {
        if let Some(histogram) = $crate::probes::shared::get_or_insert!(
            $map,
            $key,
            $crate::probes::shared::zero_histogram()
        ) {
            $crate::probes::shared::add_sample(histogram, $value_ns);
        }
    };
}
pub(crate) use record_latency;
