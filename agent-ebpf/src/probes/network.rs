//! TCP: passive round-trip time per remote endpoint (`tcp:tcp_probe`, the kernel's own
//! smoothed RTT), retransmits (`tcp:tcp_retransmit_skb`), connect latency and failures
//! (`sock:inet_sock_set_state`), and which process owns each socket, learned where the
//! kernel runs in that process's context (connect, send, receive).
use agent_common::{
    histogram::LatencyHistogram,
    network::{
        AF_INET, AF_INET6, ConnectStart, IPPROTO_TCP, PeerCounters, PeerKey, SocketOwner, tcp_state,
    },
};
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{LruHashMap, LruPerCpuHashMap},
    programs::TracePointContext,
};

use super::shared::{compiled_offset, field, field_at, get_or_insert, offset, record_latency};

/// Bounded by LRU: peers that stop talking age out. Userspace may resize at load time.
#[map]
static PEER_RTT: LruPerCpuHashMap<PeerKey, LatencyHistogram> =
    LruPerCpuHashMap::with_max_entries(512, 0);

#[map]
static PEER_CONNECT_LATENCY: LruPerCpuHashMap<PeerKey, LatencyHistogram> =
    LruPerCpuHashMap::with_max_entries(512, 0);

#[map]
static PEER_COUNTERS: LruPerCpuHashMap<PeerKey, PeerCounters> =
    LruPerCpuHashMap::with_max_entries(1024, 0);

/// Socket address -> start of an active open.
#[map]
static CONNECTS_IN_FLIGHT: LruHashMap<u64, ConnectStart> = LruHashMap::with_max_entries(4096, 0);

/// Socket address -> owning process.
#[map]
static SOCKET_OWNERS: LruHashMap<u64, SocketOwner> = LruHashMap::with_max_entries(16384, 0);

const ZERO_COUNTERS: PeerCounters = PeerCounters {
    retransmits: 0,
    connects_established: 0,
    connects_failed: 0,
};

/// Reads an IPv4 or IPv6 address into a peer key's 16-byte form. Each address is given as
/// (live offset, compiled offset), see `field!`.
#[inline(always)]
fn read_address(
    ctx: &TracePointContext,
    family: u16,
    v4: (usize, usize),
    v6: (usize, usize),
) -> Result<[u8; 16], i64> {
    let mut address = [0u8; 16];
    if family == AF_INET {
        let v4: [u8; 4] = field_at!(ctx, v4.0, v4.1)?;
        address[0] = v4[0];
        address[1] = v4[1];
        address[2] = v4[2];
        address[3] = v4[3];
    } else if family == AF_INET6 {
        address = field_at!(ctx, v6.0, v6.1)?;
    } else {
        return Err(0);
    }
    Ok(address)
}

#[inline(always)]
fn owner_tgid(socket: u64) -> u32 {
    // SAFETY: the value is copied out at once.
    unsafe { SOCKET_OWNERS.get(&socket) }.map_or(0, |owner| owner.tgid)
}

#[inline(always)]
fn remember_owner(socket: u64, tgid: u32) {
    // SAFETY: the value is copied out at once.
    if let Some(owner) = unsafe { SOCKET_OWNERS.get(&socket) } {
        if owner.tgid == tgid {
            return; // the common case: a lookup, no write
        }
    }
    let owner = SocketOwner {
        // SAFETY: plain helper call.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid,
        _padding: 0,
    };
    let _ = SOCKET_OWNERS.insert(&socket, &owner, 0);
}

#[tracepoint(category = "tcp", name = "tcp_probe")]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_probe(&ctx);
    0
}

#[inline(always)]
fn try_tcp_probe(ctx: &TracePointContext) -> Result<(), i64> {
    let srtt_us: u32 = field!(ctx, tcp_probe_srtt)?;
    if srtt_us == 0 {
        return Ok(()); // no RTT sample on this socket yet
    }
    let family: u16 = field!(ctx, tcp_probe_family)?;
    // daddr is a sockaddr_in (address at +4) or sockaddr_in6 (address at +8).
    let (live, compiled) = (offset!(tcp_probe_daddr), compiled_offset!(tcp_probe_daddr));
    let address = read_address(
        ctx,
        family,
        (live + 4, compiled + 4),
        (live + 8, compiled + 8),
    )?;
    let port: u16 = field!(ctx, tcp_probe_dport)?;
    let socket: u64 = field!(ctx, tcp_probe_skaddr)?;
    let key = PeerKey {
        address,
        family,
        port,
        tgid: owner_tgid(socket),
    };
    record_latency!(PEER_RTT, &key, srtt_us as u64 * 1000);
    // The histogram's count is the number of RTT samples: no counter lookup per ACK.
    Ok(())
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_retransmit_skb(&ctx);
    0
}

#[inline(always)]
fn try_tcp_retransmit_skb(ctx: &TracePointContext) -> Result<(), i64> {
    let family: u16 = field!(ctx, retransmit_family)?;
    let address = read_address(
        ctx,
        family,
        (
            offset!(retransmit_daddr),
            compiled_offset!(retransmit_daddr),
        ),
        (
            offset!(retransmit_daddr_v6),
            compiled_offset!(retransmit_daddr_v6),
        ),
    )?;
    let port: u16 = field!(ctx, retransmit_dport)?;
    let socket: u64 = field!(ctx, retransmit_skaddr)?;
    let key = PeerKey {
        address,
        family,
        port,
        tgid: owner_tgid(socket),
    };
    if let Some(counters) = get_or_insert!(PEER_COUNTERS, &key, Some(&ZERO_COUNTERS)) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe { (*counters).retransmits += 1 };
    }
    Ok(())
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

#[inline(always)]
fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = field!(ctx, set_state_protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let old_state: i32 = field!(ctx, set_state_oldstate)?;
    let new_state: i32 = field!(ctx, set_state_newstate)?;
    let socket: u64 = field!(ctx, set_state_skaddr)?;

    if new_state == tcp_state::SYN_SENT {
        // connect() runs in the caller's context: the owner and the start time are known here.
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let start = ConnectStart {
            // SAFETY: plain helper call.
            started_ns: unsafe { bpf_ktime_get_ns() },
            tgid,
            _padding: 0,
        };
        let _ = CONNECTS_IN_FLIGHT.insert(&socket, &start, 0);
        remember_owner(socket, tgid);
        return Ok(());
    }

    if old_state == tcp_state::SYN_SENT {
        // SAFETY: copied out at once.
        let Some(start) = (unsafe { CONNECTS_IN_FLIGHT.get(&socket) }).copied() else {
            return Ok(());
        };
        let _ = CONNECTS_IN_FLIGHT.remove(&socket);
        let family: u16 = field!(ctx, set_state_family)?;
        let address = read_address(
            ctx,
            family,
            (offset!(set_state_daddr), compiled_offset!(set_state_daddr)),
            (
                offset!(set_state_daddr_v6),
                compiled_offset!(set_state_daddr_v6),
            ),
        )?;
        let port: u16 = field!(ctx, set_state_dport)?;
        let key = PeerKey {
            address,
            family,
            port,
            tgid: start.tgid,
        };
        let established = new_state == tcp_state::ESTABLISHED;
        if established {
            // SAFETY: plain helper call.
            let now = unsafe { bpf_ktime_get_ns() };
            record_latency!(
                PEER_CONNECT_LATENCY,
                &key,
                now.wrapping_sub(start.started_ns)
            );
        }
        if let Some(counters) = get_or_insert!(PEER_COUNTERS, &key, Some(&ZERO_COUNTERS)) {
            // SAFETY: this CPU's slot of a per-CPU value.
            unsafe {
                if established {
                    (*counters).connects_established += 1;
                } else if new_state == tcp_state::CLOSE {
                    (*counters).connects_failed += 1;
                }
            }
        }
    }

    if new_state == tcp_state::CLOSE {
        let _ = SOCKET_OWNERS.remove(&socket);
    }
    Ok(())
}

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    let _ = try_sock_length(&ctx);
    0
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    let _ = try_sock_length(&ctx);
    0
}

/// send/recv syscalls run in the owner's context: this is how accepted (server-side) sockets
/// get an owner.
#[inline(always)]
fn try_sock_length(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = field!(ctx, sock_length_protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let socket: u64 = field!(ctx, sock_length_sk)?;
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    remember_owner(socket, tgid);
    super::sched::note_socket_activity(tgid);
    Ok(())
}
