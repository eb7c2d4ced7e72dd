//! Types shared by the kernel probes (`agent-ebpf`) and the userspace agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding, because the same bytes are written
//! by eBPF programs and read back by userspace through map syscalls. Pure arithmetic (the
//! histogram bucketing) also lives here so that kernel and userspace can never disagree on it.
#![cfg_attr(not(test), no_std)]

#[cfg(all(feature = "user", not(test)))]
extern crate alloc;
#[cfg(test)]
extern crate std as alloc;

pub mod btf;
pub mod cuda;
pub mod histogram;
pub mod network;
pub mod requests;
pub mod sched;
pub mod storage;
pub mod tracepoint;

/// Names of the eBPF maps, shared so a rename cannot silently break the userspace reader.
pub mod map_names {
    pub const STORAGE_DEVICES: &str = "STORAGE_DEVICES";
    pub const PROCESS_IO: &str = "PROCESS_IO";
    pub const INFLIGHT_REQUESTS: &str = "INFLIGHT_REQUESTS";
    pub const INFLIGHT_IOS: &str = "INFLIGHT_IOS";
    pub const PEER_RTT: &str = "PEER_RTT";
    pub const PEER_CONNECT_LATENCY: &str = "PEER_CONNECT_LATENCY";
    pub const PEER_COUNTERS: &str = "PEER_COUNTERS";
    pub const CONNECTS_IN_FLIGHT: &str = "CONNECTS_IN_FLIGHT";
    pub const SOCKETS: &str = "SOCKETS";
    pub const REQUEST_LATENCY: &str = "REQUEST_LATENCY";
    pub const REQUEST_FIRST_BYTE: &str = "REQUEST_FIRST_BYTE";
    pub const REQUEST_COUNTERS: &str = "REQUEST_COUNTERS";
    pub const REQUEST_TIMING: &str = "REQUEST_TIMING";
    pub const LISTENING_PORTS: &str = "LISTENING_PORTS";
    pub const TRACKED_PROCESSES: &str = "TRACKED_PROCESSES";
    pub const THREAD_STATES: &str = "THREAD_STATES";
    pub const THREAD_SYSCALLS: &str = "THREAD_SYSCALLS";
    pub const TIME_BY_PROCESS: &str = "TIME_BY_PROCESS";
    pub const CUDA_CALLS: &str = "CUDA_CALLS";
    pub const OPEN_CUDA_CALLS: &str = "OPEN_CUDA_CALLS";
    pub const CUDA_BLOCKING_LATENCY: &str = "CUDA_BLOCKING_LATENCY";
}

/// Turns a NUL-padded kernel command name (`comm`) into a string (userspace only).
#[cfg(any(feature = "user", test))]
pub fn comm_to_string(comm: &[u8; 16]) -> alloc::string::String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    alloc::string::String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn comm_stops_at_nul() {
        let mut comm = [0u8; 16];
        comm[..3].copy_from_slice(b"fio");
        assert_eq!(super::comm_to_string(&comm), "fio");
        assert_eq!(super::comm_to_string(&[b'a'; 16]), "a".repeat(16));
    }
}

/// Name of the global variable that carries tracepoint field offsets into the programs.
pub const TRACEPOINT_OFFSETS_GLOBAL: &str = "TRACEPOINT_OFFSETS";

/// Name of the global variable that carries kernel struct member offsets (from BTF).
pub const BTF_OFFSETS_GLOBAL: &str = "BTF_OFFSETS";

/// Name of the global variable that carries the address of the kernel's
/// `iomap_dio_bio_end_io` (from /proc/kallsyms; 0 where unknown): a bio that ends there is
/// part of a file system's direct I/O (ext4, XFS, btrfs), whose `struct iomap_dio` counts the
/// bytes it has queued.
pub const IOMAP_DIO_BIO_END_IO_GLOBAL: &str = "IOMAP_DIO_BIO_END_IO";

#[cfg(feature = "user")]
mod pod {
    use super::{
        btf::*, cuda::*, histogram::*, network::*, requests::*, sched::*, storage::*, tracepoint::*,
    };
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and carry
    // explicit padding fields, so every byte pattern is a valid value.
    unsafe impl aya::Pod for LatencyHistogram {}
    unsafe impl aya::Pod for StorageLatencyKey {}
    unsafe impl aya::Pod for StorageDeviceKey {}
    unsafe impl aya::Pod for StorageCounters {}
    unsafe impl aya::Pod for StorageDeviceStats {}
    unsafe impl aya::Pod for ProcessIoKey {}
    unsafe impl aya::Pod for ProcessIoStats {}
    unsafe impl aya::Pod for InflightRequestKey {}
    unsafe impl aya::Pod for InflightRequest {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for PeerCounters {}
    unsafe impl aya::Pod for SocketState {}
    unsafe impl aya::Pod for RequestKey {}
    unsafe impl aya::Pod for RequestCounters {}
    unsafe impl aya::Pod for ConnectStart {}
    unsafe impl aya::Pod for TracepointOffsets {}
    unsafe impl aya::Pod for BtfOffsets {}
    unsafe impl aya::Pod for ThreadState {}
    unsafe impl aya::Pod for ProcessTime {}
    unsafe impl aya::Pod for TrackedProcess {}
    unsafe impl aya::Pod for CudaCallKey {}
    unsafe impl aya::Pod for CudaCallCounters {}
    unsafe impl aya::Pod for OpenCall {}
}
