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
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{LruHashMap, LruPerCpuHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};

use super::shared::{
    add, compiled_offset, field, field_at, get_or_insert, member, offset, offset_of_member,
    record_latency,
};

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

// Every probe comes twice, a BTF raw tracepoint and the classic tracepoint (see storage.rs);
// both hand the same fields to one handler.

/// The remote end of a socket as the BTF probes read it from `struct sock` (what the classic
/// tracepoints copy into their records): family, address, port in host order.
#[inline(always)]
fn remote_end(socket: *const u8) -> Result<(u16, [u8; 16], u16), i64> {
    let family: u16 = member!(socket, sock_family);
    let mut address = [0u8; 16];
    if family == AF_INET {
        let v4: [u8; 4] = member!(socket, sock_daddr);
        address[0] = v4[0];
        address[1] = v4[1];
        address[2] = v4[2];
        address[3] = v4[3];
    } else if family == AF_INET6 {
        address = member!(socket, sock_v6_daddr);
    } else {
        return Err(0);
    }
    let port_network_order: u16 = member!(socket, sock_dport);
    Ok((family, address, u16::from_be(port_network_order)))
}

#[btf_tracepoint(function = "tcp_probe")]
pub fn tcp_probe_btf(ctx: BtfTracePointContext) -> i32 {
    let socket: *const u8 = ctx.arg(0);
    // tcp_sock keeps the smoothed RTT shifted left by 3; the classic record shifts it back.
    // The argument is typed `struct sock *`, so the verifier refuses a plain load past the
    // end of `struct sock`: this one member is read through the helper.
    let srtt_offset = offset_of_member!(tcp_srtt_us);
    // SAFETY: reads 4 bytes of kernel memory through the helper, which fails cleanly.
    let srtt_us_shifted: u32 =
        unsafe { bpf_probe_read_kernel(socket.add(srtt_offset) as *const u32) }.unwrap_or(0);
    let srtt_us = srtt_us_shifted >> 3;
    if srtt_us != 0 {
        if let Ok((family, address, port)) = remote_end(socket) {
            on_rtt_sample(socket as u64, family, address, port, srtt_us);
        }
    }
    0
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
    on_rtt_sample(socket, family, address, port, srtt_us);
    Ok(())
}

#[inline(always)]
fn on_rtt_sample(socket: u64, family: u16, address: [u8; 16], port: u16, srtt_us: u32) {
    let key = PeerKey {
        address,
        family,
        port,
        tgid: owner_tgid(socket),
    };
    record_latency!(PEER_RTT, &key, srtt_us as u64 * 1000);
    // The histogram's count is the number of RTT samples: no counter lookup per ACK.
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> i32 {
    let socket: *const u8 = ctx.arg(0);
    if let Ok((family, address, port)) = remote_end(socket) {
        on_retransmit(socket as u64, family, address, port);
    }
    0
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
    on_retransmit(socket, family, address, port);
    Ok(())
}

#[inline(always)]
fn on_retransmit(socket: u64, family: u16, address: [u8; 16], port: u16) {
    let key = PeerKey {
        address,
        family,
        port,
        tgid: owner_tgid(socket),
    };
    if let Some(counters) = get_or_insert!(PEER_COUNTERS, &key, Some(&ZERO_COUNTERS)) {
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe { add(&raw mut (*counters).retransmits, 1) };
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let socket: *const u8 = ctx.arg(0);
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    let protocol: u16 = member!(socket, sock_protocol);
    if protocol == IPPROTO_TCP {
        let _ = on_state_change(socket as u64, old_state, new_state, || remote_end(socket));
    }
    0
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
    on_state_change(socket, old_state, new_state, || {
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
        Ok((family, address, port))
    })
}

/// A TCP socket changed state. `remote_end` is read only when a connect finishes.
#[inline(always)]
fn on_state_change(
    socket: u64,
    old_state: i32,
    new_state: i32,
    remote_end: impl Fn() -> Result<(u16, [u8; 16], u16), i64>,
) -> Result<(), i64> {
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
        let (family, address, port) = remote_end()?;
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
                    add(&raw mut (*counters).connects_established, 1);
                } else if new_state == tcp_state::CLOSE {
                    add(&raw mut (*counters).connects_failed, 1);
                }
            }
        }
    }

    if new_state == tcp_state::CLOSE {
        let _ = SOCKET_OWNERS.remove(&socket);
    }
    Ok(())
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    on_socket_io(ctx.arg(0));
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> i32 {
    on_socket_io(ctx.arg(0));
    0
}

#[inline(always)]
fn on_socket_io(socket: *const u8) {
    let protocol: u16 = member!(socket, sock_protocol);
    if protocol == IPPROTO_TCP {
        note_socket_user(socket as u64);
    }
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

#[inline(always)]
fn try_sock_length(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = field!(ctx, sock_length_protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    note_socket_user(field!(ctx, sock_length_sk)?);
    Ok(())
}

/// send/recv syscalls run in the owner's context: this is how accepted (server-side) sockets
/// get an owner.
#[inline(always)]
fn note_socket_user(socket: u64) {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    remember_owner(socket, tgid);
    super::sched::note_socket_activity(tgid);
}
