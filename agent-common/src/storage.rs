//! Block I/O: keys and values of the storage maps.

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

/// Key of `STORAGE_LATENCY`: one histogram per device, direction and stage.
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

/// Key of `STORAGE_COUNTERS`: per device and direction.
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

/// What is known about a request between queueing and completion. Lives in an LRU map, so
/// a completion the probes miss can never leak an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
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
