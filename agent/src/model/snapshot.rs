//! What the probes have counted since they were loaded ([`KernelSnapshot`], produced by
//! `kernel::probes`), and the difference of two snapshots: what happened in a window.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
};

use super::Histogram;
use agent_common::{
    cuda::{CudaCallCounters, CudaCallKey},
    network::{PeerCounters, PeerKey},
    requests::{RequestCounters, RequestKey},
    sched::ProcessTime,
    storage::{ProcessIoKey, ProcessIoStats, StorageCounters, StorageDeviceKey, StorageLatencyKey},
};

/// Everything the probes have counted since they were loaded, merged across CPUs.
#[derive(Clone, Debug, Default)]
pub struct KernelSnapshot {
    pub storage_latency: HashMap<StorageLatencyKey, Histogram>,
    pub storage_counters: HashMap<StorageDeviceKey, StorageCounters>,
    pub process_io: HashMap<ProcessIoKey, ProcessIoStats>,
    pub peer_rtt: HashMap<PeerKey, Histogram>,
    pub peer_connect_latency: HashMap<PeerKey, Histogram>,
    pub peer_counters: HashMap<PeerKey, PeerCounters>,
    /// Per server port or upstream, per process: request latency (first request byte ->
    /// last response byte), time to the first response byte, counts.
    pub request_latency: HashMap<RequestKey, Histogram>,
    pub request_first_byte: HashMap<RequestKey, Histogram>,
    pub request_counters: HashMap<RequestKey, RequestCounters>,
    /// Per tracked process (tgid): nanoseconds by activity, including intervals still open
    /// when the snapshot was taken.
    pub process_time: HashMap<u32, ProcessTime>,
    /// CUDA calls (opt-in uprobes): per process, function and copy direction.
    pub cuda_calls: HashMap<CudaCallKey, CudaCallCounters>,
    /// Per process: durations of its blocking CUDA calls (synchronisations, synchronous
    /// copies).
    pub cuda_blocking_latency: HashMap<u32, Histogram>,
    /// Per probe ("category:name" of its tracepoint): events the kernel skipped for it, since
    /// it was attached (its program's `recursion_misses`).
    pub missed_events: BTreeMap<String, u64>,
}

/// Per-CPU values that add up, and that can be subtracted to get a window's share.
pub trait Counters: Sized + Clone {
    fn add(&mut self, other: &Self);
    /// `self - earlier`, or None when a field went down (the entry was evicted and reborn).
    fn checked_since(&self, earlier: &Self) -> Option<Self>;
}

impl Counters for StorageCounters {
    fn add(&mut self, other: &Self) {
        self.completed_requests += other.completed_requests;
        self.completed_bytes += other.completed_bytes;
        self.errors += other.errors;
        self.untimed_completions += other.untimed_completions;
    }

    fn checked_since(&self, earlier: &Self) -> Option<Self> {
        Some(StorageCounters {
            completed_requests: self
                .completed_requests
                .checked_sub(earlier.completed_requests)?,
            completed_bytes: self.completed_bytes.checked_sub(earlier.completed_bytes)?,
            errors: self.errors.checked_sub(earlier.errors)?,
            untimed_completions: self
                .untimed_completions
                .checked_sub(earlier.untimed_completions)?,
        })
    }
}

impl Counters for ProcessIoStats {
    fn add(&mut self, other: &Self) {
        self.completed_requests += other.completed_requests;
        self.completed_bytes += other.completed_bytes;
        self.latency_sum_ns += other.latency_sum_ns;
        if self.comm[0] == 0 {
            self.comm = other.comm;
        }
    }

    fn checked_since(&self, earlier: &Self) -> Option<Self> {
        Some(ProcessIoStats {
            completed_requests: self
                .completed_requests
                .checked_sub(earlier.completed_requests)?,
            completed_bytes: self.completed_bytes.checked_sub(earlier.completed_bytes)?,
            latency_sum_ns: self.latency_sum_ns.checked_sub(earlier.latency_sum_ns)?,
            comm: self.comm,
        })
    }
}

impl Counters for PeerCounters {
    fn add(&mut self, other: &Self) {
        self.retransmits += other.retransmits;
        self.connects_established += other.connects_established;
        self.connects_failed += other.connects_failed;
    }

    fn checked_since(&self, earlier: &Self) -> Option<Self> {
        Some(PeerCounters {
            retransmits: self.retransmits.checked_sub(earlier.retransmits)?,
            connects_established: self
                .connects_established
                .checked_sub(earlier.connects_established)?,
            connects_failed: self.connects_failed.checked_sub(earlier.connects_failed)?,
        })
    }
}

impl Counters for RequestCounters {
    fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        self.untimed += other.untimed;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.connections += other.connections;
        self.path_rtt_sum_us += other.path_rtt_sum_us;
        self.path_rtt_samples += other.path_rtt_samples;
        self.multiplexed_connections += other.multiplexed_connections;
    }

    fn checked_since(&self, earlier: &Self) -> Option<Self> {
        Some(RequestCounters {
            requests: self.requests.checked_sub(earlier.requests)?,
            untimed: self.untimed.checked_sub(earlier.untimed)?,
            bytes_in: self.bytes_in.checked_sub(earlier.bytes_in)?,
            bytes_out: self.bytes_out.checked_sub(earlier.bytes_out)?,
            connections: self.connections.checked_sub(earlier.connections)?,
            path_rtt_sum_us: self.path_rtt_sum_us.checked_sub(earlier.path_rtt_sum_us)?,
            path_rtt_samples: self
                .path_rtt_samples
                .checked_sub(earlier.path_rtt_samples)?,
            multiplexed_connections: self
                .multiplexed_connections
                .checked_sub(earlier.multiplexed_connections)?,
        })
    }
}

impl Counters for ProcessTime {
    fn add(&mut self, other: &Self) {
        for (total, value) in self.ns.iter_mut().zip(other.ns.iter()) {
            *total += value;
        }
        if self.comm[0] == 0 {
            self.comm = other.comm;
        }
    }

    fn checked_since(&self, earlier: &Self) -> Option<Self> {
        let mut delta = ProcessTime {
            comm: self.comm,
            ..ProcessTime::default()
        };
        for ((out, now), before) in delta
            .ns
            .iter_mut()
            .zip(self.ns.iter())
            .zip(earlier.ns.iter())
        {
            *out = now.checked_sub(*before)?;
        }
        Some(delta)
    }
}

impl Counters for CudaCallCounters {
    fn add(&mut self, other: &Self) {
        self.calls += other.calls;
        self.ns += other.ns;
        self.bytes += other.bytes;
        self.failures += other.failures;
    }

    fn checked_since(&self, earlier: &Self) -> Option<Self> {
        Some(CudaCallCounters {
            calls: self.calls.checked_sub(earlier.calls)?,
            ns: self.ns.checked_sub(earlier.ns)?,
            bytes: self.bytes.checked_sub(earlier.bytes)?,
            failures: self.failures.checked_sub(earlier.failures)?,
        })
    }
}

/// Sums the per-CPU copies of one map value.
pub fn merge_per_cpu<V: Counters>(per_cpu: &[V]) -> Option<V> {
    let (first, rest) = per_cpu.split_first()?;
    let mut total = first.clone();
    for value in rest {
        total.add(value);
    }
    Some(total)
}

fn counters_since<K: Eq + Hash + Copy, V: Counters>(
    now: &HashMap<K, V>,
    earlier: &HashMap<K, V>,
) -> HashMap<K, V> {
    now.iter()
        .map(|(key, value)| {
            let delta = match earlier.get(key) {
                Some(before) => value.checked_since(before).unwrap_or_else(|| value.clone()),
                None => value.clone(),
            };
            (*key, delta)
        })
        .collect()
}

fn histograms_since<K: Eq + Hash + Copy>(
    now: &HashMap<K, Histogram>,
    earlier: &HashMap<K, Histogram>,
) -> HashMap<K, Histogram> {
    now.iter()
        .map(|(key, histogram)| {
            let delta = match earlier.get(key) {
                Some(before) => histogram.delta_since(before),
                None => histogram.clone(),
            };
            (*key, delta)
        })
        .collect()
}

impl KernelSnapshot {
    /// What the probes counted between `earlier` and `self`.
    pub fn since(&self, earlier: &KernelSnapshot) -> KernelSnapshot {
        KernelSnapshot {
            storage_latency: histograms_since(&self.storage_latency, &earlier.storage_latency),
            storage_counters: counters_since(&self.storage_counters, &earlier.storage_counters),
            process_io: counters_since(&self.process_io, &earlier.process_io),
            peer_rtt: histograms_since(&self.peer_rtt, &earlier.peer_rtt),
            peer_connect_latency: histograms_since(
                &self.peer_connect_latency,
                &earlier.peer_connect_latency,
            ),
            peer_counters: counters_since(&self.peer_counters, &earlier.peer_counters),
            request_latency: histograms_since(&self.request_latency, &earlier.request_latency),
            request_first_byte: histograms_since(
                &self.request_first_byte,
                &earlier.request_first_byte,
            ),
            request_counters: counters_since(&self.request_counters, &earlier.request_counters),
            process_time: counters_since(&self.process_time, &earlier.process_time),
            cuda_calls: counters_since(&self.cuda_calls, &earlier.cuda_calls),
            cuda_blocking_latency: histograms_since(
                &self.cuda_blocking_latency,
                &earlier.cuda_blocking_latency,
            ),
            missed_events: self
                .missed_events
                .iter()
                .map(|(probe, count)| {
                    let before = earlier.missed_events.get(probe).copied().unwrap_or(0);
                    (probe.clone(), count.saturating_sub(before))
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(dev: u32) -> StorageDeviceKey {
        StorageDeviceKey {
            dev,
            operation: 0,
            _padding: [0; 3],
        }
    }

    fn counters(requests: u64, bytes: u64) -> StorageCounters {
        StorageCounters {
            completed_requests: requests,
            completed_bytes: bytes,
            errors: 0,
            untimed_completions: 0,
        }
    }

    #[test]
    fn per_cpu_counters_sum() {
        let merged =
            merge_per_cpu(&[counters(2, 8192), counters(3, 4096), counters(0, 0)]).unwrap();
        assert_eq!(merged, counters(5, 12288));
        assert_eq!(merge_per_cpu::<StorageCounters>(&[]), None);
    }

    #[test]
    fn snapshot_delta_subtracts_and_keeps_new_and_reborn_keys() {
        let mut earlier = KernelSnapshot::default();
        earlier
            .storage_counters
            .insert(device(1), counters(10, 40960));
        earlier
            .storage_counters
            .insert(device(2), counters(50, 1000));
        let mut now = KernelSnapshot::default();
        now.storage_counters.insert(device(1), counters(15, 61440));
        now.storage_counters.insert(device(2), counters(3, 300)); // evicted and recreated
        now.storage_counters.insert(device(3), counters(1, 512)); // new
        let delta = now.since(&earlier);
        assert_eq!(delta.storage_counters[&device(1)], counters(5, 20480));
        assert_eq!(delta.storage_counters[&device(2)], counters(3, 300));
        assert_eq!(delta.storage_counters[&device(3)], counters(1, 512));
    }
}
