//! Block I/O: keys and values of the storage maps.

use crate::histogram::LatencyHistogram;

/// (major, minor) of the kernel's dev_t as block tracepoints encode it (`MINORBITS` = 20).
pub const fn split_dev(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & 0xF_FFFF)
}

/// Direction of a block request, decoded in the kernel from the tracepoint's `rwbs` string.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IoOperation {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    Other = 4,
}

impl IoOperation {
    pub const ALL: [IoOperation; 5] = [
        IoOperation::Read,
        IoOperation::Write,
        IoOperation::Flush,
        IoOperation::Discard,
        IoOperation::Other,
    ];

    /// Decodes the kernel's `rwbs` flags (see `blk_fill_rwbs`): an optional leading `F`
    /// (pre-flush), then the operation letter `R`, `W`, `D` (discard), `F` (flush) or `N`,
    /// then modifiers. A pre-flush write ("FWS") is a write; "F" or "FF" alone is a flush.
    #[inline(always)]
    pub const fn from_rwbs(rwbs: &[u8; 8]) -> IoOperation {
        let mut i = 0;
        while i < 4 {
            match rwbs[i] {
                b'R' => return IoOperation::Read,
                b'W' => return IoOperation::Write,
                b'D' => return IoOperation::Discard,
                0 => break,
                _ => {}
            }
            i += 1;
        }
        if rwbs[0] == b'F' {
            IoOperation::Flush
        } else {
            IoOperation::Other
        }
    }

    /// Decodes the operation in the low bits of a request's `cmd_flags` (`enum req_op`), what
    /// the BTF probes read where the classic tracepoints print `rwbs`. Agrees with
    /// [`from_rwbs`](Self::from_rwbs) for every operation `blk_fill_rwbs` names: secure erase
    /// (5) is a discard, as its "DE" is.
    #[inline(always)]
    pub const fn from_req_op(cmd_flags: u32) -> IoOperation {
        match cmd_flags & crate::btf::REQ_OP_MASK {
            crate::btf::req_op::READ => IoOperation::Read,
            crate::btf::req_op::WRITE => IoOperation::Write,
            crate::btf::req_op::FLUSH => IoOperation::Flush,
            crate::btf::req_op::DISCARD | 5 => IoOperation::Discard,
            _ => IoOperation::Other,
        }
    }

    pub const fn from_u8(value: u8) -> IoOperation {
        match value {
            0 => IoOperation::Read,
            1 => IoOperation::Write,
            2 => IoOperation::Flush,
            3 => IoOperation::Discard,
            _ => IoOperation::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
            IoOperation::Flush => "flush",
            IoOperation::Discard => "discard",
            IoOperation::Other => "other",
        }
    }
}

/// Which part of a request's life a latency sample covers.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LatencyStage {
    /// Bio queued into the block layer (`block_bio_queue`) to completion: what the
    /// application waits for, including time spent in the scheduler queue.
    QueuedToComplete = 0,
    /// Request issued to the driver (`block_rq_issue`) to completion: the device alone.
    IssuedToComplete = 1,
}

impl LatencyStage {
    pub const fn from_u8(value: u8) -> LatencyStage {
        match value {
            0 => LatencyStage::QueuedToComplete,
            _ => LatencyStage::IssuedToComplete,
        }
    }
}

/// One histogram per device, direction and stage, as userspace splits `STORAGE_DEVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorageLatencyKey {
    /// Kernel `dev_t` as the block tracepoints encode it: major << 20 | minor.
    pub dev: u32,
    pub operation: u8,
    pub stage: u8,
    pub _padding: [u8; 2],
}

impl StorageLatencyKey {
    pub const fn new(dev: u32, operation: u8, stage: LatencyStage) -> Self {
        Self {
            dev,
            operation,
            stage: stage as u8,
            _padding: [0; 2],
        }
    }
}

/// Value of `STORAGE_DEVICES`, per CPU: everything a completion updates, in one value so a
/// completion needs one map lookup.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StorageDeviceStats {
    pub counters: StorageCounters,
    /// `LatencyStage::QueuedToComplete`.
    pub queued_to_complete: LatencyHistogram,
    /// `LatencyStage::IssuedToComplete`.
    pub issued_to_complete: LatencyHistogram,
}

/// Key of `STORAGE_DEVICES`: per device and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorageDeviceKey {
    pub dev: u32,
    pub operation: u8,
    pub _padding: [u8; 3],
}

/// Completed requests on one device and direction, counted at completion whether or not the
/// request's start was seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StorageCounters {
    pub completed_requests: u64,
    pub completed_bytes: u64,
    /// Completions that carried a non-zero error code.
    pub errors: u64,
    /// Completions whose issue was never seen (started before the probes, or the in-flight
    /// map evicted them): counted here, but not timed.
    pub untimed_completions: u64,
}

/// Key of `INFLIGHT_REQUESTS`: the block tracepoints identify a request by device and start
/// sector (there is no request pointer in their format).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InflightRequestKey {
    pub dev: u32,
    pub _padding: u32,
    pub sector: u64,
}

impl InflightRequestKey {
    pub const fn new(dev: u32, sector: u64) -> Self {
        Self {
            dev,
            _padding: 0,
            sector,
        }
    }
}

/// What is known about a request between queueing and completion.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightRequest {
    /// 0 when the bio was not seen being queued (only issued).
    pub queued_ns: u64,
    /// 0 until the request is issued to the driver.
    pub issued_ns: u64,
    /// cgroup v2 id of the task that queued the request.
    pub cgroup_id: u64,
    /// Process (thread group) that queued it; 0 when unknown.
    pub tgid: u32,
    pub _padding: u32,
    pub comm: [u8; 16],
}

/// Slots in `INFLIGHT_REQUESTS`, a power of two, of 64 bytes each.
///
/// Requests in flight live in a fixed table, not a hash map: a request may sit in one of two
/// slots picked by hashing its key, found again by comparing keys. Array slots are reached
/// without a helper call, where a hash map's insert and delete per request (allocation, LRU
/// lists, locks) were most of the storage probes' cost. A request the probes never see
/// complete (merged bios, a missed completion) is simply overwritten later, so nothing leaks.
/// With both slots taken by live requests, the older one gives way and its completion is
/// counted as untimed: with random sectors, to about 1 request in 1,200 at 1,000 requests in
/// flight, 5.6% at 8,000 (unit-tested). 2 MiB: a larger table costs every request more in
/// cache and TLB misses (65,536 slots: +90 ns per bio on the benchmark VM).
pub const INFLIGHT_SLOTS: u32 = 1 << 15;

/// One slot of `INFLIGHT_REQUESTS`; `key.dev == 0` marks it free (no block device has
/// major and minor 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightSlot {
    pub key: InflightRequestKey,
    pub request: InflightRequest,
}

impl Default for InflightRequestKey {
    fn default() -> Self {
        Self::new(0, 0)
    }
}

/// An entry of a table of things in flight (requests, application I/Os): found by comparing
/// keys in one of two slots, reusable once free or stale.
pub trait InflightEntry {
    type Key;
    /// The table's map name, for the probes' diagnostic events.
    const TABLE: &'static str;
    /// Whether this slot holds the entry with `key` (never true for a free slot).
    fn holds(&self, key: &Self::Key) -> bool;
    /// Whether the slot is free.
    fn is_free(&self) -> bool;
    /// When the entry started (0 when unknown).
    fn started_ns(&self) -> u64;

    /// Free, or holding an entry too old to be real (its completion was missed).
    fn is_reusable(&self, now_ns: u64) -> bool {
        self.is_free() || now_ns.wrapping_sub(self.started_ns()) >= STALE_REQUEST_NS
    }
}

impl InflightEntry for InflightSlot {
    type Key = InflightRequestKey;
    const TABLE: &'static str = crate::map_names::INFLIGHT_REQUESTS;

    fn holds(&self, key: &InflightRequestKey) -> bool {
        self.key.dev == key.dev && self.key.sector == key.sector && key.dev != 0
    }

    fn is_free(&self) -> bool {
        self.key.dev == 0
    }

    fn started_ns(&self) -> u64 {
        if self.request.queued_ns != 0 {
            self.request.queued_ns
        } else {
            self.request.issued_ns
        }
    }
}

/// The two slots of a table of `INFLIGHT_SLOTS` an entry whose key hashes to `value` may live
/// in (always two different ones).
#[inline(always)]
pub fn slots_for(value: u64) -> [u32; 2] {
    // Fibonacci hashing: the high bits of the product mix every bit of the value, so
    // sequential sectors (and slab-aligned pointers) spread over the table.
    let mixed = value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mask = INFLIGHT_SLOTS - 1;
    let first = (mixed >> 48) as u32 & mask;
    let second = (mixed >> 24) as u32 & mask;
    [first, if second == first { first ^ 1 } else { second }]
}

/// The two slots a request with `key` may live in (always two different ones).
#[inline(always)]
pub fn candidate_slots(key: &InflightRequestKey) -> [u32; 2] {
    slots_for(key.sector ^ ((key.dev as u64) << 40))
}

/// Which of its two candidate slots (0 or 1) an entry with `key` goes to: the first if it
/// holds the key (the sector was queued again) or is reusable, else the second if it holds
/// the key or is reusable, else the one whose entry started earlier (most likely lost: a
/// merged bio or a missed completion).
#[inline(always)]
pub fn choose_slot<E: InflightEntry>(key: &E::Key, first: &E, second: &E, now_ns: u64) -> usize {
    if first_slot_will_do(key, first, now_ns) {
        0
    } else if second.holds(key)
        || second.is_reusable(now_ns)
        || second.started_ns() < first.started_ns()
    {
        1
    } else {
        0
    }
}

/// The first half of `choose_slot`, so the probes touch the second slot (a likely cache and
/// TLB miss) only when the first is taken. Lookups try the first slot first too, so a copy
/// of the key left in the second slot is never found before this one.
#[inline(always)]
pub fn first_slot_will_do<E: InflightEntry>(key: &E::Key, first: &E, now_ns: u64) -> bool {
    first.holds(key) || first.is_reusable(now_ns)
}

/// An I/O as the application issued it, followed by pointers (BTF raw tracepoints only; the
/// classic tracepoints carry none). It is keyed by what its submitter waits on: the bios'
/// `bi_private` (a direct I/O's `dio`, which every bio of one read or write points to), or the
/// bio itself where that is empty. The block layer may split a bio into several requests (a
/// device's `max_sectors_kb` or `max_segments`): each split part points to the bio it was cut
/// from (`bi_private`, set by `bio_chain`). Or merge bios into one request: the completion
/// walks the request's bios. The submitter waits until the last part completes, so that is
/// when the I/O is timed and charged, once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightIo {
    /// The key's address; 0 marks a free slot.
    pub key: u64,
    /// When its first bio was queued.
    pub queued_ns: u64,
    /// cgroup v2 id of the task that queued it.
    pub cgroup_id: u64,
    /// Bytes the application asked for: its bios' sizes when queued, before any split.
    pub bytes: u64,
    /// Process (thread group) that queued it.
    pub tgid: u32,
    /// When its latest bio was queued, in units of 1,024 ns after `queued_ns`.
    pub last_bio_after: u32,
    /// Parts not yet completed: one per bio queued, plus one per split.
    pub parts: u32,
    /// The sector right after its latest bio, low 32 bits: where its next bio starts.
    pub next_sector: u32,
    /// Command name at queue time.
    pub comm: [u8; 16],
}

/// How long after an I/O's latest bio another bio with its key may still belong to it, and
/// how long after its first. A submitter queues the bios of one I/O back to back, but waits
/// between them when the device's tags run out (a 4 MiB read cut into 16 requests at queue
/// depth 32).
pub const JOIN_GAP_NS: u64 = 100_000_000;
pub const JOIN_SPAN_NS: u64 = 1_000_000_000;

/// An I/O of fewer bytes so far takes no further bio. The block layer fills a direct I/O's
/// bios up to 256 pages (1 MiB) before it starts another, so a small first bio was the whole
/// I/O: an entry of 4 KiB is a finished read whose completion was missed, and a sequential
/// reader's next read, allocated at the same address and starting right where it ended,
/// must not join it (its bytes would be charged twice to one read).
pub const JOIN_MIN_BYTES: u64 = 64 << 10;

impl InflightIo {
    /// Whether a bio with this entry's key, starting at `sector` and queued by `tgid` at
    /// `now_ns`, is one more bio of the same I/O: it continues where the latest one ended,
    /// from the same process, soon after. Otherwise the entry is a finished I/O whose last
    /// completion was missed, its key's memory now reused by a new I/O (a freed `dio`
    /// allocated again), which must not join it: a random read starts elsewhere, and the
    /// time limits bound how long a sequential reader's missed completion can hold on.
    #[inline(always)]
    pub fn takes_another_bio(&self, tgid: u32, sector: u64, now_ns: u64) -> bool {
        let latest = self
            .queued_ns
            .wrapping_add((self.last_bio_after as u64) << 10);
        self.tgid == tgid
            && self.bytes >= JOIN_MIN_BYTES
            && self.next_sector == sector as u32
            && now_ns.wrapping_sub(latest) < JOIN_GAP_NS
            && now_ns.wrapping_sub(self.queued_ns) < JOIN_SPAN_NS
    }

    /// The sector after a bio of `bytes` starting at `sector`, as `next_sector` holds it.
    #[inline(always)]
    pub const fn sector_after(sector: u64, bytes: u32) -> u32 {
        sector.wrapping_add((bytes >> 9) as u64) as u32
    }

    /// When a bio joining at `now_ns` was queued, as `last_bio_after` holds it.
    #[inline(always)]
    pub fn bio_after(&self, now_ns: u64) -> u32 {
        (now_ns.wrapping_sub(self.queued_ns) >> 10) as u32
    }
}

impl InflightEntry for InflightIo {
    type Key = u64;
    const TABLE: &'static str = crate::map_names::INFLIGHT_IOS;

    fn holds(&self, key: &u64) -> bool {
        self.key == *key && *key != 0
    }

    fn is_free(&self) -> bool {
        self.key == 0
    }

    fn started_ns(&self) -> u64 {
        self.queued_ns
    }
}

/// Bios of one request the completion probe follows (`request.bio`, then `bi_next`). Direct
/// and large reads have one or a few; a request merged from more small bios than this times
/// only the first ones (the rest age out of the table untimed).
pub const MAX_BIOS_PER_REQUEST: u32 = 32;

/// Key of `PROCESS_IO`: block I/O charged to the process that queued it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessIoKey {
    pub tgid: u32,
    pub dev: u32,
    pub cgroup_id: u64,
    pub operation: u8,
    pub _padding: [u8; 7],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessIoStats {
    pub completed_requests: u64,
    pub completed_bytes: u64,
    /// Sum of queued-to-complete latency, for the mean wait per request.
    pub latency_sum_ns: u64,
    /// Command name at queue time; the process may be gone when userspace reads this.
    pub comm: [u8; 16],
}

/// Completions later than this after their start are treated as a reused sector of a missed
/// completion, not as a real latency.
pub const STALE_REQUEST_NS: u64 = 120 * 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(dev: u32, sector: u64, queued_ns: u64) -> InflightSlot {
        InflightSlot {
            key: InflightRequestKey::new(dev, sector),
            request: InflightRequest {
                queued_ns,
                ..Default::default()
            },
        }
    }

    #[test]
    fn candidate_slots_are_two_different_slots_in_the_table() {
        let mut used = std::collections::HashSet::new();
        for sector in (0..100_000u64).map(|i| i * 8) {
            let [first, second] = candidate_slots(&InflightRequestKey::new(0xfd00000, sector));
            assert_ne!(first, second);
            assert!(first < INFLIGHT_SLOTS && second < INFLIGHT_SLOTS);
            used.insert(first);
        }
        // Sequential 4 KiB sectors spread over the table instead of clustering.
        assert!(
            used.len() > (INFLIGHT_SLOTS as usize) * 3 / 4,
            "{} slots used",
            used.len()
        );
        assert_ne!(
            candidate_slots(&InflightRequestKey::new(1, 8)),
            candidate_slots(&InflightRequestKey::new(2, 8))
        );
    }

    #[test]
    fn a_request_takes_its_own_slot_then_a_free_one_then_the_older_one() {
        let key = InflightRequestKey::new(7, 4096);
        let now = 1_000_000_000_000;
        let free = InflightSlot::default();
        let busy_old = slot(7, 8, now - 5_000_000);
        let busy_new = slot(7, 16, now - 1_000);
        let same = slot(7, 4096, now - 2_000);
        assert_eq!(choose_slot(&key, &busy_new, &same, now), 1);
        assert_eq!(choose_slot(&key, &same, &free, now), 0);
        assert_eq!(choose_slot(&key, &free, &busy_new, now), 0);
        assert_eq!(choose_slot(&key, &busy_new, &free, now), 1);
        assert_eq!(choose_slot(&key, &busy_new, &busy_old, now), 1);
        assert_eq!(choose_slot(&key, &busy_old, &busy_new, now), 0);
        // A request older than the staleness cut is as good as free.
        let stale = slot(7, 24, now - STALE_REQUEST_NS);
        assert_eq!(choose_slot(&key, &busy_new, &stale, now), 1);
        // Slots compare whole keys: another device's request at the same sector is not ours.
        assert!(!slot(8, 4096, now).holds(&key));
        assert!(!InflightSlot::default().holds(&InflightRequestKey::new(0, 0)));
    }

    /// Requests completing in order `in_flight` behind their queueing: how many of `total`
    /// completions find their request displaced.
    fn displaced(in_flight: u64, total: u64) -> u64 {
        let mut table = vec![InflightSlot::default(); INFLIGHT_SLOTS as usize];
        let mut lost = 0;
        // Random sectors (a 64-bit mix of the index), as random reads over a large device.
        let key = |i: u64| {
            let mut x = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            InflightRequestKey::new(0x800010, (x ^ (x >> 31)) % (1 << 40) * 8)
        };
        for i in 0..total + in_flight {
            let now = 1_000_000 + i * 1000;
            if i < total {
                let [a, b] = candidate_slots(&key(i));
                let which = choose_slot(&key(i), &table[a as usize], &table[b as usize], now);
                table[[a, b][which] as usize] = slot(key(i).dev, key(i).sector, now);
            }
            if i >= in_flight {
                let done = key(i - in_flight);
                let found = candidate_slots(&done)
                    .into_iter()
                    .find(|&index| table[index as usize].holds(&done));
                match found {
                    Some(index) => table[index as usize] = InflightSlot::default(),
                    None => lost += 1,
                }
            }
        }
        lost
    }

    #[test]
    fn deep_queues_rarely_displace_each_other() {
        let total = 200_000;
        let at_1k = displaced(1_000, total);
        let at_8k = displaced(8_000, total);
        eprintln!("displaced: {at_1k} at 1,000 in flight, {at_8k} at 8,000, of {total}");
        assert!(
            at_1k * 1_000 <= total,
            "{at_1k} of {total} at 1,000 in flight"
        );
        assert!(at_8k * 10 <= total, "{at_8k} of {total} at 8,000 in flight");
    }

    #[test]
    fn bios_queued_back_to_back_join_one_io_and_a_stale_entry_takes_none() {
        let start = 5_000_000_000;
        let sector = 1_000_000;
        let mut io = InflightIo {
            key: 0xffff_8881_0000_1000,
            queued_ns: start,
            tgid: 42,
            parts: 1,
            bytes: 1 << 20,
            next_sector: InflightIo::sector_after(sector, 1 << 20),
            ..InflightIo::default()
        };
        let next = sector + 2048;
        // The next bio of the same read, 80 us later, from the same process, where the
        // first ended: joins.
        assert!(io.takes_another_bio(42, next, start + 80_000));
        // Not from another sector (a new random read at the reused address) or process.
        assert!(!io.takes_another_bio(42, next + 8, start + 80_000));
        assert!(!io.takes_another_bio(43, next, start + 80_000));
        io.last_bio_after = io.bio_after(start + 80_000);
        io.next_sector = InflightIo::sector_after(next, 1 << 20);
        let next = next + 2048;
        // Gaps count from the latest bio, not the first.
        assert!(io.takes_another_bio(42, next, start + 80_000 + JOIN_GAP_NS - 2_000));
        assert!(!io.takes_another_bio(42, next, start + 80_000 + JOIN_GAP_NS + 2_000));
        // However regular the bios, an I/O stops taking more once it spans JOIN_SPAN_NS.
        io.last_bio_after = io.bio_after(start + JOIN_SPAN_NS - 10_000_000);
        assert!(io.takes_another_bio(42, next, start + JOIN_SPAN_NS - 5_000_000));
        assert!(!io.takes_another_bio(42, next, start + JOIN_SPAN_NS + 5_000_000));
        // Sectors past 2^32 compare by their low bits.
        let high = (7u64 << 32) + 100;
        io.next_sector = InflightIo::sector_after(high, 4096);
        assert!(io.takes_another_bio(42, high + 8, start + JOIN_SPAN_NS - 5_000_000));
        // A 4 KiB read whose completion was missed, and the next sequential read at its
        // reused address right after it: a new I/O, not a part of the old one.
        let stale = InflightIo {
            bytes: 4096,
            next_sector: InflightIo::sector_after(sector, 4096),
            ..io
        };
        assert!(!stale.takes_another_bio(42, sector + 8, start + 80_000));
    }

    fn rwbs(text: &str) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..text.len()].copy_from_slice(text.as_bytes());
        out
    }

    #[test]
    fn rwbs_decodes_every_direction() {
        assert_eq!(IoOperation::from_rwbs(&rwbs("R")), IoOperation::Read);
        assert_eq!(IoOperation::from_rwbs(&rwbs("RA")), IoOperation::Read);
        assert_eq!(IoOperation::from_rwbs(&rwbs("WS")), IoOperation::Write);
        assert_eq!(IoOperation::from_rwbs(&rwbs("FWS")), IoOperation::Write);
        assert_eq!(IoOperation::from_rwbs(&rwbs("WFS")), IoOperation::Write);
        assert_eq!(IoOperation::from_rwbs(&rwbs("FF")), IoOperation::Flush);
        assert_eq!(IoOperation::from_rwbs(&rwbs("F")), IoOperation::Flush);
        assert_eq!(IoOperation::from_rwbs(&rwbs("D")), IoOperation::Discard);
        assert_eq!(IoOperation::from_rwbs(&rwbs("DE")), IoOperation::Discard);
        // The same operations from cmd_flags (op in the low 8 bits, flags above).
        assert_eq!(IoOperation::from_req_op(0), IoOperation::Read);
        assert_eq!(IoOperation::from_req_op(1 | 1 << 11), IoOperation::Write);
        assert_eq!(IoOperation::from_req_op(2), IoOperation::Flush);
        assert_eq!(IoOperation::from_req_op(3), IoOperation::Discard);
        assert_eq!(IoOperation::from_req_op(5), IoOperation::Discard);
        assert_eq!(IoOperation::from_req_op(9), IoOperation::Other);
        assert_eq!(IoOperation::from_rwbs(&rwbs("N")), IoOperation::Other);
        assert_eq!(IoOperation::from_rwbs(&rwbs("")), IoOperation::Other);
    }

    #[test]
    fn operation_round_trips_through_u8() {
        for op in IoOperation::ALL {
            assert_eq!(IoOperation::from_u8(op as u8), op);
        }
    }
}
