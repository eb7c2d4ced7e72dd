//! Summarises one window of kernel counters per device, process and peer: the figures the
//! report and (later) attribution and exporters consume. Units are in the field names.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use agent_common::{
    comm_to_string,
    network::{PeerCounters, PeerKey, peer_address},
    requests::{RequestCounters, RequestKey, role},
    storage::{IoOperation, LatencyStage, StorageCounters, split_dev},
};
use serde::Serialize;

use crate::model::{
    Histogram, KernelSnapshot,
    process::{ProcessKind, SystemNames},
    snapshot::Counters,
};

/// Quantiles of one latency distribution, in milliseconds; None when nothing was measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencyQuantilesMs {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    pub samples: u64,
}

impl LatencyQuantilesMs {
    pub fn of(histogram: &Histogram) -> Self {
        Self {
            p50_ms: histogram.quantile_ms(0.50).map(round_ms),
            p95_ms: histogram.quantile_ms(0.95).map(round_ms),
            p99_ms: histogram.quantile_ms(0.99).map(round_ms),
            mean_ms: histogram.mean_ns().map(|ns| round_ms(ns / 1e6)),
            samples: histogram.count(),
        }
    }
}

/// Milliseconds to the microsecond: finer digits are noise.
fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StorageOperationSummary {
    pub operation: &'static str,
    pub ops: u64,
    pub bytes: u64,
    /// Queued into the block layer -> completion.
    pub latency: LatencyQuantilesMs,
    /// Issued to the device -> completion.
    pub device_latency: LatencyQuantilesMs,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StorageDeviceSummary {
    pub device: String,
    pub major: u32,
    pub minor: u32,
    pub ops: u64,
    pub bytes: u64,
    pub iops: f64,
    pub throughput_bytes_per_s: f64,
    pub errors: u64,
    /// Queued -> complete, all directions.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// Issued -> complete (the device alone), all directions.
    pub device_p50_ms: Option<f64>,
    pub device_p95_ms: Option<f64>,
    pub device_p99_ms: Option<f64>,
    /// Share of the mean wait spent queued before the device saw the request (0..1).
    pub queue_share: Option<f64>,
    pub operations: Vec<StorageOperationSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessIoSummary {
    pub pid: u32,
    pub name: String,
    pub kind: ProcessKind,
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    pub ops: u64,
    pub bytes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub mean_latency_ms: Option<f64>,
    pub devices: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StorageSummary {
    pub devices: Vec<StorageDeviceSummary>,
    pub processes: Vec<ProcessIoSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerProcess {
    pub pid: u32,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerSummary {
    /// "addr:port", IPv6 as "[addr]:port".
    pub peer: String,
    pub address: String,
    pub port: u16,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p95_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub rtt_samples: u64,
    pub retransmits: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub connect_p50_ms: Option<f64>,
    pub connect_p95_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    /// Local processes seen using this peer (where the kernel gave a process context).
    pub processes: Vec<PeerProcess>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NetworkSummary {
    pub peers: Vec<PeerSummary>,
}

/// Requests of one server port or one upstream, in a window. Latency runs from the first
/// byte of a request to the last byte of its response, as the serving side moved them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestFigures {
    /// Requests answered in the window (their last response byte was in it).
    pub requests: u64,
    pub rate_per_s: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Request start -> first response byte (time to first token, for a streamed answer).
    pub first_byte_p50_ms: Option<f64>,
    pub first_byte_p95_ms: Option<f64>,
    pub first_byte_p99_ms: Option<f64>,
    /// Received and sent by the process in these requests.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Connections first seen in the window.
    pub connections: u64,
    /// Requests that ended without a response (connection closed first, one-way streams),
    /// and every exchange on a multiplexed connection.
    pub untimed: u64,
    /// Connections first seen in the window whose first bytes opened HTTP/2 (h2c, gRPC
    /// without TLS): requests interleave there, so they are counted in `untimed`, not timed.
    pub multiplexed_connections: u64,
}

/// A process serving requests on a local port.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerRequests {
    /// The workload the process belongs to (filled once workloads are known).
    pub workload: Option<String>,
    /// 0 for the row that sums the ports beyond the list's length (`name` "other").
    pub pid: u32,
    pub name: String,
    pub port: u16,
    #[serde(flatten)]
    pub figures: RequestFigures,
}

/// A process's requests to one upstream (remote endpoint).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientRequests {
    pub workload: Option<String>,
    pub pid: u32,
    pub name: String,
    /// "addr:port", or "other" for the row that sums the upstreams beyond the list.
    pub peer: String,
    #[serde(flatten)]
    pub figures: RequestFigures,
    /// The smoothed round-trip time to that peer in the window (all its sockets). On
    /// request/response traffic it includes the peer's delayed ACKs (up to 40 ms).
    pub rtt_p95_ms: Option<f64>,
    /// The path's round trip: the mean, over the timed requests, of their connection's lowest
    /// RTT sample (`tcp_sock.rtt_min`), which no delayed ACK inflates. What the network
    /// costs a request per round trip; the rest of its time is the upstream's work or the
    /// transfer.
    pub path_rtt_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestsSummary {
    /// Whether the kernel times requests here (false: no BTF socket probes; the lists stay
    /// empty).
    pub timed: bool,
    /// Most requests first.
    pub servers: Vec<ServerRequests>,
    pub clients: Vec<ClientRequests>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WindowSummary {
    pub storage: StorageSummary,
    pub network: NetworkSummary,
    pub requests: RequestsSummary,
}

/// Summarises a window. `top` bounds the process and peer lists.
pub fn summarize_window(
    delta: &KernelSnapshot,
    duration: Duration,
    names: &dyn SystemNames,
    top: usize,
) -> WindowSummary {
    WindowSummary {
        storage: StorageSummary {
            devices: summarize_devices(delta, duration, names),
            processes: summarize_processes(delta, names, top),
        },
        network: NetworkSummary {
            peers: summarize_peers(delta, names, top),
        },
        requests: summarize_requests(delta, duration, names, top),
    }
}

/// One aggregation's window: latency and first-byte histograms and counts.
#[derive(Clone, Default)]
struct RequestWindow {
    latency: Histogram,
    first_byte: Histogram,
    counters: RequestCounters,
}

impl RequestWindow {
    fn add(&mut self, other: &RequestWindow) {
        self.latency.add(&other.latency);
        self.first_byte.add(&other.first_byte);
        self.counters.add(&other.counters);
    }

    fn figures(&self, seconds: f64) -> RequestFigures {
        let latency = LatencyQuantilesMs::of(&self.latency);
        let first_byte = LatencyQuantilesMs::of(&self.first_byte);
        RequestFigures {
            requests: self.counters.requests,
            rate_per_s: (self.counters.requests as f64 / seconds * 1000.0).round() / 1000.0,
            p50_ms: latency.p50_ms,
            p95_ms: latency.p95_ms,
            p99_ms: latency.p99_ms,
            first_byte_p50_ms: first_byte.p50_ms,
            first_byte_p95_ms: first_byte.p95_ms,
            first_byte_p99_ms: first_byte.p99_ms,
            bytes_in: self.counters.bytes_in,
            bytes_out: self.counters.bytes_out,
            connections: self.counters.connections,
            untimed: self.counters.untimed,
            multiplexed_connections: self.counters.multiplexed_connections,
        }
    }

    fn is_empty(&self) -> bool {
        self.counters == RequestCounters::default() && self.latency.count() == 0
    }
}

/// The window's requests per server port and per upstream, per process, most requests
/// first; the rows beyond `top` summed into one "other" row, so a node with thousands of
/// upstreams reports a bounded list that still adds up.
fn summarize_requests(
    delta: &KernelSnapshot,
    duration: Duration,
    names: &dyn SystemNames,
    top: usize,
) -> RequestsSummary {
    let mut windows: BTreeMap<RequestKey, RequestWindow> = BTreeMap::new();
    for (key, histogram) in &delta.request_latency {
        windows.entry(*key).or_default().latency.add(histogram);
    }
    for (key, histogram) in &delta.request_first_byte {
        windows.entry(*key).or_default().first_byte.add(histogram);
    }
    for (key, counters) in &delta.request_counters {
        windows.entry(*key).or_default().counters.add(counters);
    }
    let seconds = duration.as_secs_f64().max(1e-9);
    let mut ranked: Vec<(RequestKey, RequestWindow)> = windows
        .into_iter()
        .filter(|(key, window)| key.tgid != 0 && !window.is_empty())
        .collect();
    ranked.sort_by(|(a_key, a), (b_key, b)| {
        b.counters
            .requests
            .cmp(&a.counters.requests)
            .then(b.counters.untimed.cmp(&a.counters.untimed))
            .then(a_key.cmp(b_key))
    });
    let name_of = |tgid: u32| {
        let name = names.process(tgid, "").name;
        if name.is_empty() {
            "exited".to_string()
        } else {
            name
        }
    };
    let mut summary = RequestsSummary {
        timed: true,
        ..RequestsSummary::default()
    };
    let (mut other_servers, mut other_clients) = (RequestWindow::default(), None::<RequestWindow>);
    for (key, window) in ranked {
        if key.role == u32::from(role::SERVER) {
            if summary.servers.len() < top {
                summary.servers.push(ServerRequests {
                    workload: None,
                    pid: key.tgid,
                    name: name_of(key.tgid),
                    port: key.port,
                    figures: window.figures(seconds),
                });
            } else {
                other_servers.add(&window);
            }
        } else if summary.clients.len() < top {
            let peer = peer_address(key.family, &key.address).map_or_else(
                || "?".to_string(),
                |ip| SocketAddr::new(ip, key.port).to_string(),
            );
            let rtt_p95_ms = delta
                .peer_rtt
                .iter()
                .filter(|(peer_key, _)| {
                    peer_key.address == key.address
                        && peer_key.family == key.family
                        && peer_key.port == key.port
                })
                .fold(Histogram::default(), |mut all, (_, histogram)| {
                    all.add(histogram);
                    all
                })
                .quantile_ms(0.95)
                .map(round_ms);
            let counters = &window.counters;
            let path_rtt_ms = (counters.path_rtt_samples > 0).then(|| {
                round_ms(counters.path_rtt_sum_us as f64 / counters.path_rtt_samples as f64 / 1e3)
            });
            summary.clients.push(ClientRequests {
                workload: None,
                pid: key.tgid,
                name: name_of(key.tgid),
                peer,
                figures: window.figures(seconds),
                rtt_p95_ms,
                path_rtt_ms,
            });
        } else {
            other_clients
                .get_or_insert_with(RequestWindow::default)
                .add(&window);
        }
    }
    if !other_servers.is_empty() {
        summary.servers.push(ServerRequests {
            workload: None,
            pid: 0,
            name: "other".to_string(),
            port: 0,
            figures: other_servers.figures(seconds),
        });
    }
    if let Some(other) = other_clients {
        summary.clients.push(ClientRequests {
            workload: None,
            pid: 0,
            name: "other".to_string(),
            peer: "other".to_string(),
            figures: other.figures(seconds),
            rtt_p95_ms: None,
            path_rtt_ms: None,
        });
    }
    summary
}

fn device_name(dev: u32, names: &dyn SystemNames) -> String {
    let (major, minor) = split_dev(dev);
    names
        .block_device_name(major, minor)
        .unwrap_or_else(|| format!("{major}:{minor}"))
}

fn summarize_devices(
    delta: &KernelSnapshot,
    duration: Duration,
    names: &dyn SystemNames,
) -> Vec<StorageDeviceSummary> {
    #[derive(Default)]
    struct Device {
        counters: BTreeMap<u8, StorageCounters>,
        queued: BTreeMap<u8, Histogram>,
        issued: BTreeMap<u8, Histogram>,
    }
    let mut devices: BTreeMap<u32, Device> = BTreeMap::new();
    for (key, counters) in &delta.storage_counters {
        devices
            .entry(key.dev)
            .or_default()
            .counters
            .insert(key.operation, *counters);
    }
    for (key, histogram) in &delta.storage_latency {
        let device = devices.entry(key.dev).or_default();
        let by_stage = match LatencyStage::from_u8(key.stage) {
            LatencyStage::QueuedToComplete => &mut device.queued,
            LatencyStage::IssuedToComplete => &mut device.issued,
        };
        by_stage.entry(key.operation).or_default().add(histogram);
    }

    let seconds = duration.as_secs_f64().max(1e-9);
    let mut summaries: Vec<StorageDeviceSummary> = devices
        .into_iter()
        .filter_map(|(dev, device)| {
            let mut total = StorageCounters::default();
            let mut queued_all = Histogram::default();
            let mut issued_all = Histogram::default();
            let mut operations = Vec::new();
            for operation in IoOperation::ALL {
                let code = operation as u8;
                let counters = device.counters.get(&code).copied().unwrap_or_default();
                let queued = device.queued.get(&code).cloned().unwrap_or_default();
                let issued = device.issued.get(&code).cloned().unwrap_or_default();
                total.add(&counters);
                queued_all.add(&queued);
                issued_all.add(&issued);
                if counters.completed_requests > 0 || queued.count() > 0 {
                    operations.push(StorageOperationSummary {
                        operation: operation.name(),
                        ops: counters.completed_requests,
                        bytes: counters.completed_bytes,
                        latency: LatencyQuantilesMs::of(&queued),
                        device_latency: LatencyQuantilesMs::of(&issued),
                    });
                }
            }
            if total.completed_requests == 0 {
                return None;
            }
            let (major, minor) = split_dev(dev);
            let queued = LatencyQuantilesMs::of(&queued_all);
            let issued = LatencyQuantilesMs::of(&issued_all);
            let queue_share = match (queued_all.mean_ns(), issued_all.mean_ns()) {
                (Some(total_wait), Some(device_time)) if total_wait > 0.0 => {
                    Some(((total_wait - device_time) / total_wait).clamp(0.0, 1.0))
                }
                _ => None,
            };
            Some(StorageDeviceSummary {
                device: device_name(dev, names),
                major,
                minor,
                ops: total.completed_requests,
                bytes: total.completed_bytes,
                iops: total.completed_requests as f64 / seconds,
                throughput_bytes_per_s: total.completed_bytes as f64 / seconds,
                errors: total.errors,
                p50_ms: queued.p50_ms,
                p95_ms: queued.p95_ms,
                p99_ms: queued.p99_ms,
                mean_ms: queued.mean_ms,
                device_p50_ms: issued.p50_ms,
                device_p95_ms: issued.p95_ms,
                device_p99_ms: issued.p99_ms,
                queue_share,
                operations,
            })
        })
        .collect();
    summaries.sort_by(|a, b| b.ops.cmp(&a.ops).then_with(|| a.device.cmp(&b.device)));
    summaries
}

fn summarize_processes(
    delta: &KernelSnapshot,
    names: &dyn SystemNames,
    top: usize,
) -> Vec<ProcessIoSummary> {
    struct Process {
        comm: [u8; 16],
        ops: u64,
        bytes: u64,
        read_bytes: u64,
        write_bytes: u64,
        latency_sum_ns: u64,
        devices: BTreeSet<u32>,
    }
    let mut processes: BTreeMap<(u32, u64), Process> = BTreeMap::new();
    for (key, stats) in &delta.process_io {
        if stats.completed_requests == 0 {
            continue;
        }
        let process = processes
            .entry((key.tgid, key.cgroup_id))
            .or_insert(Process {
                comm: stats.comm,
                ops: 0,
                bytes: 0,
                read_bytes: 0,
                write_bytes: 0,
                latency_sum_ns: 0,
                devices: BTreeSet::new(),
            });
        process.ops += stats.completed_requests;
        process.bytes += stats.completed_bytes;
        process.latency_sum_ns += stats.latency_sum_ns;
        match IoOperation::from_u8(key.operation) {
            IoOperation::Read => process.read_bytes += stats.completed_bytes,
            IoOperation::Write => process.write_bytes += stats.completed_bytes,
            _ => {}
        }
        process.devices.insert(key.dev);
    }
    let mut ranked: Vec<_> = processes.into_iter().collect();
    ranked.sort_by(|(_, a), (_, b)| b.bytes.cmp(&a.bytes).then(b.ops.cmp(&a.ops)));
    ranked
        .into_iter()
        .take(top)
        .map(|((tgid, cgroup_id), process)| {
            let identity = names.process(tgid, &comm_to_string(&process.comm));
            ProcessIoSummary {
                pid: tgid,
                name: identity.name,
                kind: identity.kind,
                cgroup: identity.cgroup,
                cgroup_id,
                ops: process.ops,
                bytes: process.bytes,
                read_bytes: process.read_bytes,
                write_bytes: process.write_bytes,
                mean_latency_ms: (process.ops > 0)
                    .then(|| round_ms(process.latency_sum_ns as f64 / process.ops as f64 / 1e6)),
                devices: process
                    .devices
                    .iter()
                    .map(|dev| device_name(*dev, names))
                    .collect(),
            }
        })
        .collect()
}

fn summarize_peers(
    delta: &KernelSnapshot,
    names: &dyn SystemNames,
    top: usize,
) -> Vec<PeerSummary> {
    #[derive(Default)]
    struct Peer {
        rtt: Histogram,
        connect: Histogram,
        counters: PeerCounters,
        tgids: BTreeSet<u32>,
    }
    let mut peers: BTreeMap<SocketAddr, Peer> = BTreeMap::new();
    fn peer_for<'a>(
        peers: &'a mut BTreeMap<SocketAddr, Peer>,
        key: &PeerKey,
    ) -> Option<&'a mut Peer> {
        let ip = peer_address(key.family, &key.address)?;
        let peer = peers.entry(SocketAddr::new(ip, key.port)).or_default();
        if key.tgid != 0 {
            peer.tgids.insert(key.tgid);
        }
        Some(peer)
    }
    for (key, histogram) in &delta.peer_rtt {
        if let Some(peer) = peer_for(&mut peers, key) {
            peer.rtt.add(histogram);
        }
    }
    for (key, histogram) in &delta.peer_connect_latency {
        if let Some(peer) = peer_for(&mut peers, key) {
            peer.connect.add(histogram);
        }
    }
    for (key, counters) in &delta.peer_counters {
        if let Some(peer) = peer_for(&mut peers, key) {
            peer.counters.add(counters);
        }
    }
    let mut summaries: Vec<PeerSummary> = peers
        .into_iter()
        .filter(|(_, peer)| {
            peer.rtt.count() > 0
                || peer.counters.retransmits > 0
                || peer.counters.connects_established > 0
                || peer.counters.connects_failed > 0
        })
        .map(|(address, peer)| {
            let rtt = LatencyQuantilesMs::of(&peer.rtt);
            let connect = LatencyQuantilesMs::of(&peer.connect);
            PeerSummary {
                peer: address.to_string(),
                address: address.ip().to_string(),
                port: address.port(),
                rtt_p50_ms: rtt.p50_ms,
                rtt_p95_ms: rtt.p95_ms,
                rtt_p99_ms: rtt.p99_ms,
                rtt_samples: peer.rtt.count(),
                retransmits: peer.counters.retransmits,
                connects: peer.counters.connects_established,
                connect_failures: peer.counters.connects_failed,
                connect_p50_ms: connect.p50_ms,
                connect_p95_ms: connect.p95_ms,
                connect_p99_ms: connect.p99_ms,
                processes: peer
                    .tgids
                    .iter()
                    .map(|&pid| {
                        // The kernel keeps no name for socket owners: one gone by now has none.
                        let name = names.process(pid, "").name;
                        let name = if name.is_empty() {
                            "exited".to_string()
                        } else {
                            name
                        };
                        PeerProcess { pid, name }
                    })
                    .collect(),
            }
        })
        .collect();
    // Slowest first; peers without RTT samples (only connects or retransmits) after them.
    summaries.sort_by(|a, b| {
        b.rtt_p95_ms
            .unwrap_or(-1.0)
            .total_cmp(&a.rtt_p95_ms.unwrap_or(-1.0))
            .then(b.retransmits.cmp(&a.retransmits))
            .then(b.connects.cmp(&a.connects))
    });
    summaries.truncate(top);
    summaries
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use agent_common::network::{AF_INET, AF_INET6};
    use agent_common::storage::{
        ProcessIoKey, ProcessIoStats, StorageDeviceKey, StorageLatencyKey,
    };

    use super::*;
    use crate::host::system::ProcessIdentity;

    struct FakeSystem;
    impl SystemNames for FakeSystem {
        fn block_device_name(&self, major: u32, minor: u32) -> Option<String> {
            (major == 254 && minor == 0).then(|| "vda".to_string())
        }
        fn process(&self, tgid: u32, comm: &str) -> ProcessIdentity {
            ProcessIdentity {
                name: if comm.is_empty() {
                    format!("proc{tgid}")
                } else {
                    comm.to_string()
                },
                kind: if tgid == 0 {
                    ProcessKind::Unattributed
                } else {
                    ProcessKind::Process
                },
                cgroup: None,
                executable: None,
            }
        }
    }

    const VDA: u32 = 254 << 20;

    fn comm(name: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..name.len()].copy_from_slice(name.as_bytes());
        out
    }

    fn storage_window() -> KernelSnapshot {
        let mut delta = KernelSnapshot::default();
        let read = IoOperation::Read as u8;
        let write = IoOperation::Write as u8;
        delta.storage_counters.insert(
            StorageDeviceKey {
                dev: VDA,
                operation: read,
                _padding: [0; 3],
            },
            StorageCounters {
                completed_requests: 100,
                completed_bytes: 409_600,
                errors: 0,
                untimed_completions: 0,
            },
        );
        delta.storage_counters.insert(
            StorageDeviceKey {
                dev: VDA,
                operation: write,
                _padding: [0; 3],
            },
            StorageCounters {
                completed_requests: 20,
                completed_bytes: 81_920,
                errors: 1,
                untimed_completions: 0,
            },
        );
        // Reads wait 1 ms in total, of which the device takes 0.25 ms; writes 10 ms / 10 ms.
        let latency = |operation, stage: LatencyStage, value_ns, n| {
            (
                StorageLatencyKey {
                    dev: VDA,
                    operation,
                    stage: stage as u8,
                    _padding: [0; 2],
                },
                Histogram::from_samples_ns(std::iter::repeat_n(value_ns, n)),
            )
        };
        delta.storage_latency.extend([
            latency(read, LatencyStage::QueuedToComplete, 1_000_000, 100),
            latency(read, LatencyStage::IssuedToComplete, 250_000, 100),
            latency(write, LatencyStage::QueuedToComplete, 10_000_000, 20),
            latency(write, LatencyStage::IssuedToComplete, 10_000_000, 20),
        ]);
        delta.process_io.insert(
            ProcessIoKey {
                tgid: 4121,
                dev: VDA,
                cgroup_id: 7,
                operation: read,
                _padding: [0; 7],
            },
            ProcessIoStats {
                completed_requests: 100,
                completed_bytes: 409_600,
                latency_sum_ns: 100_000_000,
                comm: comm("trainer"),
            },
        );
        delta.process_io.insert(
            ProcessIoKey {
                tgid: 0,
                dev: VDA,
                cgroup_id: 0,
                operation: write,
                _padding: [0; 7],
            },
            ProcessIoStats {
                completed_requests: 20,
                completed_bytes: 81_920,
                latency_sum_ns: 200_000_000,
                comm: [0; 16],
            },
        );
        delta
    }

    #[test]
    fn device_summary_combines_directions_and_stages() {
        let summary = summarize_window(&storage_window(), Duration::from_secs(10), &FakeSystem, 10);
        let [vda] = summary.storage.devices.as_slice() else {
            panic!("one device expected")
        };
        assert_eq!(vda.device, "vda");
        assert_eq!((vda.major, vda.minor), (254, 0));
        assert_eq!(vda.ops, 120);
        assert_eq!(vda.bytes, 491_520);
        assert_eq!(vda.errors, 1);
        assert!((vda.iops - 12.0).abs() < 1e-9);
        assert!((vda.throughput_bytes_per_s - 49_152.0).abs() < 1e-9);
        // 100 of 120 samples at 1 ms: P50 ~1 ms; P95 and P99 in the 10 ms writes.
        assert!((vda.p50_ms.unwrap() - 1.0).abs() < 0.0625);
        assert!((vda.p95_ms.unwrap() - 10.0).abs() < 0.625);
        assert!((vda.device_p50_ms.unwrap() - 0.25).abs() < 0.016);
        // Mean wait (100 x 1 + 20 x 10) / 120 = 2.5 ms; device (25 + 200) / 120 = 1.875 ms.
        assert_eq!(vda.mean_ms, Some(2.5));
        assert!((vda.queue_share.unwrap() - 0.25).abs() < 1e-9);
        let read = &vda.operations[0];
        assert_eq!(
            (read.operation, read.ops, read.bytes),
            ("read", 100, 409_600)
        );
        assert_eq!(vda.operations[1].operation, "write");
    }

    #[test]
    fn processes_are_ranked_by_bytes_with_the_kernel_labelled() {
        let summary = summarize_window(&storage_window(), Duration::from_secs(10), &FakeSystem, 10);
        let processes = &summary.storage.processes;
        assert_eq!(processes.len(), 2);
        assert_eq!(
            (processes[0].pid, processes[0].name.as_str()),
            (4121, "trainer")
        );
        assert_eq!(processes[0].read_bytes, 409_600);
        assert_eq!(processes[0].mean_latency_ms, Some(1.0));
        assert_eq!(processes[0].devices, vec!["vda".to_string()]);
        assert_eq!(processes[1].kind, ProcessKind::Unattributed);
        assert_eq!(processes[1].write_bytes, 81_920);
        let top_one = summarize_window(&storage_window(), Duration::from_secs(10), &FakeSystem, 1);
        assert_eq!(top_one.storage.processes.len(), 1);
    }

    fn peer(address: [u8; 16], family: u16, port: u16, tgid: u32) -> PeerKey {
        PeerKey {
            address,
            family,
            port,
            tgid,
        }
    }

    #[test]
    fn peers_merge_processes_and_sort_slowest_first() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 0, 0, 7]);
        let v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).octets();
        let mapped = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        let mut delta = KernelSnapshot::default();
        delta.peer_rtt.insert(
            peer(v4, AF_INET, 443, 10),
            Histogram::from_samples_ns([50_000_000; 10]),
        );
        delta.peer_rtt.insert(
            peer(v4, AF_INET, 443, 11),
            Histogram::from_samples_ns([50_000_000; 10]),
        );
        delta.peer_rtt.insert(
            peer(v6, AF_INET6, 8080, 0),
            Histogram::from_samples_ns([200_000; 5]),
        );
        delta.peer_counters.insert(
            peer(mapped, AF_INET6, 9000, 12),
            PeerCounters {
                retransmits: 0,
                connects_established: 0,
                connects_failed: 3,
            },
        );
        delta.peer_counters.insert(
            peer(v4, AF_INET, 443, 10),
            PeerCounters {
                retransmits: 4,
                connects_established: 2,
                connects_failed: 0,
            },
        );
        delta.peer_connect_latency.insert(
            peer(v4, AF_INET, 443, 10),
            Histogram::from_samples_ns([1_000_000, 1_000_000]),
        );
        let peers = summarize_window(&delta, Duration::from_secs(1), &FakeSystem, 10)
            .network
            .peers;
        assert_eq!(peers.len(), 3);
        assert_eq!(peers[0].peer, "10.0.0.7:443");
        assert_eq!(peers[0].rtt_samples, 20);
        assert!((peers[0].rtt_p95_ms.unwrap() - 50.0).abs() < 50.0 / 16.0);
        assert_eq!((peers[0].retransmits, peers[0].connects), (4, 2));
        assert!((peers[0].connect_p50_ms.unwrap() - 1.0).abs() < 1.0 / 16.0);
        assert_eq!(
            peers[0].processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
            vec![10, 11]
        );
        assert_eq!(peers[1].peer, "[fd00::2]:8080");
        assert!(peers[1].processes.is_empty());
        assert_eq!(peers[2].peer, "127.0.0.1:9000");
        assert_eq!(peers[2].connect_failures, 3);
        assert_eq!(peers[2].rtt_p95_ms, None);
    }

    fn request_key(role: u8, tgid: u32, address: [u8; 16], port: u16) -> RequestKey {
        RequestKey {
            address,
            family: if role == agent_common::requests::role::SERVER {
                0
            } else {
                AF_INET
            },
            port,
            tgid,
            role: u32::from(role),
        }
    }

    #[test]
    fn requests_rank_by_count_sum_the_rest_into_other_and_carry_the_upstreams_rtt() {
        use agent_common::requests::{RequestCounters, role};
        let mut upstream = [0u8; 16];
        upstream[..4].copy_from_slice(&[10, 0, 0, 7]);
        let mut delta = KernelSnapshot::default();
        let counters = |requests, untimed| RequestCounters {
            requests,
            untimed,
            bytes_in: requests * 100,
            bytes_out: requests * 1000,
            connections: 1,
            path_rtt_sum_us: requests * 150,
            path_rtt_samples: requests,
            multiplexed_connections: untimed.min(1),
        };
        // Three server ports of one process; the list keeps two and sums the third.
        for (port, requests, latency_ms) in [(8000u16, 100u64, 20u64), (8001, 50, 5), (9000, 10, 1)]
        {
            let key = request_key(role::SERVER, 42, [0; 16], port);
            delta.request_counters.insert(key, counters(requests, 0));
            delta.request_latency.insert(
                key,
                Histogram::from_samples_ns(vec![latency_ms * 1_000_000; requests as usize]),
            );
            delta.request_first_byte.insert(
                key,
                Histogram::from_samples_ns(vec![1_000_000; requests as usize]),
            );
        }
        let client = request_key(role::CLIENT, 42, upstream, 6333);
        delta.request_counters.insert(client, counters(40, 2));
        delta
            .request_latency
            .insert(client, Histogram::from_samples_ns(vec![300_000_000; 40]));
        // Its RTT comes from the peer maps, for every process that talks to it.
        delta.peer_rtt.insert(
            peer(upstream, AF_INET, 6333, 0),
            Histogram::from_samples_ns([200_000; 10]),
        );
        // A process that only had a connection counted and nothing else is still listed;
        // pid 0 (never keyed) is not.
        delta
            .request_counters
            .insert(request_key(role::SERVER, 0, [0; 16], 1), counters(5, 0));
        let requests = summarize_window(&delta, Duration::from_secs(10), &FakeSystem, 2).requests;
        let ports: Vec<(u32, u16, u64)> = requests
            .servers
            .iter()
            .map(|s| (s.pid, s.port, s.figures.requests))
            .collect();
        assert_eq!(ports, vec![(42, 8000, 100), (42, 8001, 50), (0, 0, 10)]);
        assert_eq!(requests.servers[2].name, "other");
        let first = &requests.servers[0].figures;
        assert!(
            (first.p95_ms.unwrap() - 20.0).abs() <= 20.0 / 16.0,
            "{first:?}"
        );
        assert!((first.first_byte_p50_ms.unwrap() - 1.0).abs() <= 1.0 / 16.0);
        assert_eq!(
            (first.rate_per_s, first.bytes_in, first.bytes_out),
            (10.0, 10_000, 100_000)
        );
        assert_eq!(requests.clients.len(), 1);
        let made = &requests.clients[0];
        assert_eq!(made.peer, "10.0.0.7:6333");
        assert_eq!(made.figures.untimed, 2);
        assert_eq!(made.figures.multiplexed_connections, 1);
        assert_eq!(requests.servers[0].figures.multiplexed_connections, 0);
        assert_eq!(made.figures.first_byte_p95_ms, None, "absent, not 0");
        assert!((made.rtt_p95_ms.unwrap() - 0.2).abs() <= 0.2 / 16.0);
        assert_eq!(made.path_rtt_ms, Some(0.15));
    }
}
