//! What the CUDA uprobes counted in a window, per process: time blocked in synchronisation,
//! copies per direction, allocations, launches, and the functions that took the time.
use std::collections::BTreeMap;

use agent_common::cuda::{CudaCallCounters, FUNCTIONS, call, direction};
use serde::Serialize;

use crate::model::{Histogram, KernelSnapshot};

/// One function's share of a process's CUDA calls in a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CudaFunctionSummary {
    pub function: &'static str,
    pub calls: u64,
    /// Time inside it, entry to return.
    pub seconds: f64,
    pub bytes: u64,
    pub failures: u64,
}

impl CudaFunctionSummary {
    /// Whether the calling thread waits on the GPU inside it (a synchronisation or a
    /// synchronous copy), rather than launching, allocating or queueing.
    pub fn blocks(&self) -> bool {
        FUNCTIONS
            .iter()
            .find(|f| f.symbol == self.function)
            .is_some_and(|f| call::blocks(f.call))
    }
}

/// A process's CUDA calls in one window (JSON `gpu.processes[].cuda`). Times are seconds
/// summed over its threads, entry to return. Copy times are the time blocked on copies:
/// synchronous copies, and synchronisations that begin right after an asynchronous copy on
/// the same thread (PyTorch's blocking `.to("cuda")`; see `SYNC_AFTER_COPY_NS`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CudaActivity {
    /// In synchronisation calls (cudaStreamSynchronize, cuCtxSynchronize...), those waiting
    /// for a copy left out.
    pub sync_s: f64,
    pub sync_calls: u64,
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    /// Device to device on one GPU.
    pub d2d_bytes: u64,
    /// Between two GPUs.
    pub peer_bytes: u64,
    /// Copies whose direction the call does not say (cudaMemcpyDefault, cuMemcpy).
    pub other_copy_bytes: u64,
    pub h2d_s: f64,
    pub d2h_s: f64,
    pub d2d_s: f64,
    pub peer_s: f64,
    pub other_copy_s: f64,
    pub alloc_bytes: u64,
    pub alloc_calls: u64,
    pub alloc_failures: u64,
    /// Calls of any kind that returned an error.
    pub failures: u64,
    /// Kernel launches; null unless `cuda_probes = "sync+launch"`.
    pub launches: Option<u64>,
    /// P95 of its blocking calls (synchronisations and synchronous copies).
    pub blocking_p95_ms: Option<f64>,
    /// The functions that took the most time, most first (at most 5).
    pub functions: Vec<CudaFunctionSummary>,
}

impl CudaActivity {
    /// Time blocked on the GPU: synchronisations and synchronous copies.
    pub fn blocking_s(&self) -> f64 {
        self.sync_s + self.h2d_s + self.d2h_s + self.d2d_s + self.peer_s + self.other_copy_s
    }

    /// Adds another process's activity (a workload's processes).
    pub fn add(&mut self, other: &CudaActivity) {
        self.sync_s += other.sync_s;
        self.sync_calls += other.sync_calls;
        self.h2d_bytes += other.h2d_bytes;
        self.d2h_bytes += other.d2h_bytes;
        self.d2d_bytes += other.d2d_bytes;
        self.peer_bytes += other.peer_bytes;
        self.other_copy_bytes += other.other_copy_bytes;
        self.h2d_s += other.h2d_s;
        self.d2h_s += other.d2h_s;
        self.d2d_s += other.d2d_s;
        self.peer_s += other.peer_s;
        self.other_copy_s += other.other_copy_s;
        self.alloc_bytes += other.alloc_bytes;
        self.alloc_calls += other.alloc_calls;
        self.alloc_failures += other.alloc_failures;
        self.failures += other.failures;
        self.launches = match (self.launches, other.launches) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        for function in &other.functions {
            match self
                .functions
                .iter_mut()
                .find(|f| f.function == function.function)
            {
                Some(known) => {
                    known.calls += function.calls;
                    known.seconds += function.seconds;
                    known.bytes += function.bytes;
                    known.failures += function.failures;
                }
                None => self.functions.push(function.clone()),
            }
        }
        sort_functions(&mut self.functions);
        // A P95 does not add; the workload keeps the worst of its processes'.
        self.blocking_p95_ms = match (self.blocking_p95_ms, other.blocking_p95_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

fn sort_functions(functions: &mut Vec<CudaFunctionSummary>) {
    functions.sort_by(|a, b| {
        b.seconds
            .total_cmp(&a.seconds)
            .then(b.calls.cmp(&a.calls))
            .then(a.function.cmp(b.function))
    });
    functions.truncate(5);
}

/// Per process, from a window's delta of the CUDA maps. `launches_counted`: the mode probes
/// launches (otherwise `launches` is null, not 0).
pub fn cuda_by_process(
    delta: &KernelSnapshot,
    launches_counted: bool,
) -> BTreeMap<u32, CudaActivity> {
    let mut by_process: BTreeMap<u32, (CudaActivity, BTreeMap<u8, CudaCallCounters>)> =
        BTreeMap::new();
    for (key, counters) in &delta.cuda_calls {
        let Some(function) = FUNCTIONS.get(key.function as usize) else {
            continue;
        };
        if counters.calls == 0 {
            continue;
        }
        let (activity, functions) = by_process.entry(key.tgid).or_default();
        let seconds = counters.ns as f64 / 1e9;
        let (copy_bytes, copy_s) = match key.direction {
            direction::HOST_TO_DEVICE => (&mut activity.h2d_bytes, &mut activity.h2d_s),
            direction::DEVICE_TO_HOST => (&mut activity.d2h_bytes, &mut activity.d2h_s),
            direction::DEVICE_TO_DEVICE => (&mut activity.d2d_bytes, &mut activity.d2d_s),
            direction::PEER => (&mut activity.peer_bytes, &mut activity.peer_s),
            _ => (&mut activity.other_copy_bytes, &mut activity.other_copy_s),
        };
        match function.call {
            // A synchronisation right after an asynchronous copy waits for that copy.
            call::SYNC if key.direction != direction::OTHER => *copy_s += seconds,
            call::SYNC => {
                activity.sync_s += seconds;
                activity.sync_calls += counters.calls;
            }
            call::COPY | call::COPY_ASYNC => {
                *copy_bytes += counters.bytes;
                if function.call == call::COPY {
                    *copy_s += seconds;
                }
            }
            call::ALLOC => {
                activity.alloc_bytes += counters.bytes;
                activity.alloc_calls += counters.calls;
                activity.alloc_failures += counters.failures;
            }
            call::LAUNCH => {
                *activity.launches.get_or_insert(0) += counters.calls;
            }
            _ => {}
        }
        activity.failures += counters.failures;
        let total = functions.entry(key.function).or_default();
        total.calls += counters.calls;
        total.ns += counters.ns;
        total.bytes += counters.bytes;
        total.failures += counters.failures;
    }
    by_process
        .into_iter()
        .map(|(tgid, (mut activity, functions))| {
            if launches_counted && activity.launches.is_none() {
                activity.launches = Some(0);
            }
            activity.functions = functions
                .into_iter()
                .map(|(index, counters)| CudaFunctionSummary {
                    function: FUNCTIONS[index as usize].symbol,
                    calls: counters.calls,
                    seconds: counters.ns as f64 / 1e9,
                    bytes: counters.bytes,
                    failures: counters.failures,
                })
                .collect();
            sort_functions(&mut activity.functions);
            activity.blocking_p95_ms = delta
                .cuda_blocking_latency
                .get(&tgid)
                .and_then(|histogram: &Histogram| histogram.quantile_ms(0.95));
            (tgid, activity)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use agent_common::cuda::{CudaCallCounters, CudaCallKey, FUNCTIONS, direction};

    use super::*;

    fn key(tgid: u32, symbol: &str, to: u8) -> CudaCallKey {
        CudaCallKey {
            tgid,
            function: FUNCTIONS.iter().position(|f| f.symbol == symbol).unwrap() as u8,
            direction: to,
            _padding: [0; 2],
        }
    }

    fn counters(calls: u64, ms: u64, bytes: u64, failures: u64) -> CudaCallCounters {
        CudaCallCounters {
            calls,
            ns: ms * 1_000_000,
            bytes,
            failures,
        }
    }

    #[test]
    fn calls_sum_by_kind_and_direction_and_name_their_functions() {
        let mut delta = KernelSnapshot::default();
        let other = direction::OTHER;
        delta.cuda_calls.insert(
            key(7, "cudaStreamSynchronize", other),
            counters(100, 2000, 0, 0),
        );
        delta
            .cuda_calls
            .insert(key(7, "cuCtxSynchronize", other), counters(5, 500, 0, 0));
        delta.cuda_calls.insert(
            key(7, "cudaMemcpy", direction::HOST_TO_DEVICE),
            counters(10, 100, 1 << 30, 0),
        );
        // An asynchronous copy: bytes, no blocked time.
        delta.cuda_calls.insert(
            key(7, "cudaMemcpyAsync", direction::DEVICE_TO_HOST),
            counters(4, 1, 4096, 0),
        );
        delta
            .cuda_calls
            .insert(key(7, "cudaMalloc", other), counters(3, 1, 8192, 1));
        delta
            .cuda_calls
            .insert(key(8, "cuLaunchKernel", other), counters(50, 1, 0, 0));
        // PyTorch's blocking .to("cuda"): the synchronisation after an asynchronous copy
        // is time blocked on the copy, not synchronisation.
        delta.cuda_calls.insert(
            key(7, "cudaStreamSynchronize", direction::HOST_TO_DEVICE),
            counters(20, 300, 0, 0),
        );
        delta.cuda_calls.insert(
            key(7, "cudaMemcpyPeer", direction::PEER),
            counters(2, 10, 1 << 20, 0),
        );
        let by_process = cuda_by_process(&delta, false);
        let seven = &by_process[&7];
        assert_eq!(seven.sync_calls, 105);
        assert!((seven.sync_s - 2.5).abs() < 1e-9);
        assert_eq!((seven.h2d_bytes, seven.d2h_bytes), (1 << 30, 4096));
        assert!((seven.h2d_s - 0.4).abs() < 1e-9 && seven.d2h_s == 0.0);
        assert_eq!((seven.peer_bytes, seven.d2d_bytes), (1 << 20, 0));
        assert!((seven.peer_s - 0.01).abs() < 1e-9);
        assert_eq!(
            (
                seven.alloc_bytes,
                seven.alloc_calls,
                seven.alloc_failures,
                seven.failures
            ),
            (8192, 3, 1, 1)
        );
        assert_eq!(seven.launches, None);
        assert_eq!(seven.functions[0].function, "cudaStreamSynchronize");
        assert_eq!(seven.functions[1].function, "cuCtxSynchronize");
        assert!((seven.blocking_s() - 2.91).abs() < 1e-9);
        // Launches were probed for process 8 even in a mode that does not count them for
        // others: what the kernel counted is reported.
        assert_eq!(by_process[&8].launches, Some(50));
        assert_eq!(cuda_by_process(&delta, true)[&7].launches, Some(0));
        let mut workload = seven.clone();
        workload.add(&by_process[&8]);
        assert_eq!(workload.launches, Some(50));
        assert_eq!(workload.sync_calls, 105);
    }
}
