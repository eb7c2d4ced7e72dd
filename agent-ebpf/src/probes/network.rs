//! TCP: passive round-trip time per remote endpoint (`tcp:tcp_probe`, the kernel's own
//! smoothed RTT), retransmits (`tcp:tcp_retransmit_skb`), connect latency and failures
//! (`sock:inet_sock_set_state`), which process owns each socket, learned where the kernel
//! runs in that process's context (connect, send, receive), and the requests each socket
//! serves or makes (`agent_common::requests`), timed from the lengths of its sends and
//! receives.
use agent_common::{
    histogram::LatencyHistogram,
    network::{AF_INET, AF_INET6, ConnectStart, IPPROTO_TCP, PeerCounters, PeerKey, tcp_state},
    requests::{
        Direction, Ended, FIRST_BYTES, LISTENING_PORTS_FILLED, MSG_PEEK, RequestCounters,
        RequestKey, SocketState, ended, opens_http2, phase, protocol, request_key, role,
        role_from_ports,
    },
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task_btf,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, LruHashMap, LruPerCpuHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};

use super::shared::{
    BPF_NOEXIST, add, add32, compiled_offset, field, field_at, get_or_insert, member, offset,
    offset_of_member, record_latency,
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

/// Socket address -> owning process, role and the request in progress. Closed sockets are
/// removed; LRU for those whose close was not seen.
#[map]
static SOCKETS: LruHashMap<u64, SocketState> = LruHashMap::with_max_entries(16384, 0);

/// Request latency (first request byte -> last response byte) per server port or upstream,
/// per process. Bounded like the peer maps (userspace sizes them at load).
#[map]
static REQUEST_LATENCY: LruPerCpuHashMap<RequestKey, LatencyHistogram> =
    LruPerCpuHashMap::with_max_entries(512, 0);

/// Time to the first response byte, same keys.
#[map]
static REQUEST_FIRST_BYTE: LruPerCpuHashMap<RequestKey, LatencyHistogram> =
    LruPerCpuHashMap::with_max_entries(512, 0);

#[map]
static REQUEST_COUNTERS: LruPerCpuHashMap<RequestKey, RequestCounters> =
    LruPerCpuHashMap::with_max_entries(1024, 0);

/// Local ports sockets listen on (any namespace), from userspace; key 0 marks it filled.
#[map]
static LISTENING_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(8192, 0);

const ZERO_COUNTERS: PeerCounters = PeerCounters {
    retransmits: 0,
    connects_established: 0,
    connects_failed: 0,
};

const ZERO_REQUEST_COUNTERS: RequestCounters = RequestCounters {
    requests: 0,
    untimed: 0,
    bytes_in: 0,
    bytes_out: 0,
    connections: 0,
    path_rtt_sum_us: 0,
    path_rtt_samples: 0,
    multiplexed_connections: 0,
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
    unsafe { SOCKETS.get(&socket) }.map_or(0, |state| state.key.tgid)
}

/// The socket's state, created (with `role`) when missing.
#[inline(always)]
fn socket_state(socket: u64, role: u8) -> Option<*mut SocketState> {
    if let Some(state) = SOCKETS.get_ptr_mut(&socket) {
        return Some(state);
    }
    let _ = SOCKETS.insert(&socket, &SocketState::new(role), BPF_NOEXIST);
    SOCKETS.get_ptr_mut(&socket)
}

/// `tgid` (the current process) owns `state`'s socket.
#[inline(always)]
fn set_owner(state: *mut SocketState, tgid: u32) {
    // SAFETY: pointer from a successful lookup; plain stores.
    unsafe {
        if (*state).key.tgid == tgid {
            return; // the common case: a lookup, no write
        }
        // A socket handed to another process (fork, fd passing): its wait moves with it.
        stop_counting_wait(state);
        (*state).key.tgid = tgid;
        (*state).cgroup_id = bpf_get_current_cgroup_id();
    }
}

/// Keeps the owner's `awaiting_responses` equal to its client sockets with a request out
/// and no response byte (only tracked processes have the counter).
#[inline(always)]
fn sync_counted_wait(state: *mut SocketState) {
    // SAFETY: pointer from a successful lookup.
    let (awaits, counted, tgid) = unsafe {
        (
            (*state).awaits_response(),
            (*state).counted_waiting != 0,
            (*state).key.tgid,
        )
    };
    if awaits == counted {
        return;
    }
    if !awaits {
        stop_counting_wait(state);
    } else if let Some(process) = super::sched::tracked_process(tgid) {
        // SAFETY: pointers from successful lookups.
        unsafe {
            add32(&raw mut (*process).awaiting_responses, 1);
            (*state).counted_waiting = 1;
        }
    }
}

#[inline(always)]
fn stop_counting_wait(state: *mut SocketState) {
    // SAFETY: pointer from a successful lookup.
    unsafe {
        if (*state).counted_waiting == 0 {
            return;
        }
        (*state).counted_waiting = 0;
        if let Some(process) = super::sched::tracked_process((*state).key.tgid) {
            // A process tracked again by userspace after it counted starts at 0: never
            // below that. A decrement racing this check can at worst leave it at 0 late.
            if (*process).awaiting_responses > 0 {
                add32(&raw mut (*process).awaiting_responses, u32::MAX);
            }
        }
    }
}

/// The connection's lowest RTT sample in microseconds (0: none yet, or unreadable), read
/// through the helper: it lies past `struct sock`, where the verifier refuses a plain load.
#[inline(always)]
fn path_rtt_us(socket: *const u8) -> u32 {
    let offset = offset_of_member!(tcp_rtt_min) + 4; // rtt_min.s[0].v
    // SAFETY: reads 4 bytes of kernel memory through the helper, which fails cleanly.
    unsafe { bpf_probe_read_kernel(socket.add(offset) as *const u32) }.unwrap_or(0)
}

/// A request ended on the socket: into its server port's or upstream's aggregation, with
/// the path's round trip when `rtt_us` is known (not 0).
#[inline(always)]
fn record_request(key: &RequestKey, ended: &Ended, rtt_us: u32) {
    if ended.outcome == ended::NOTHING {
        return;
    }
    let Some(counters) = get_or_insert!(REQUEST_COUNTERS, key, Some(&ZERO_REQUEST_COUNTERS)) else {
        return;
    };
    if ended.outcome == ended::TIMED {
        record_latency!(REQUEST_LATENCY, key, ended.latency_ns);
        record_latency!(REQUEST_FIRST_BYTE, key, ended.first_byte_ns);
        // SAFETY: this CPU's slot of a per-CPU value.
        unsafe {
            add(&raw mut (*counters).requests, 1);
            add(&raw mut (*counters).bytes_in, ended.bytes_in);
            add(&raw mut (*counters).bytes_out, ended.bytes_out);
            if rtt_us != 0 {
                add(&raw mut (*counters).path_rtt_sum_us, u64::from(rtt_us));
                add(&raw mut (*counters).path_rtt_samples, 1);
            }
        }
    } else {
        // SAFETY: as above.
        unsafe { add(&raw mut (*counters).untimed, 1) };
    }
}

/// Ends the socket's request in progress (its connection closes, or its peer ended the
/// stream).
#[inline(always)]
fn end_request(state: *mut SocketState) {
    // SAFETY: pointer from a successful lookup.
    unsafe {
        let ended = (*state).end();
        stop_counting_wait(state);
        if (*state).keyed != 0 {
            record_request(&(*state).key, &ended, 0);
        }
    }
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
        // A new connection: whatever a reused socket address held (a close not seen) goes.
        if let Some(stale) = SOCKETS.get_ptr_mut(&socket) {
            stop_counting_wait(stale);
        }
        let _ = SOCKETS.insert(&socket, &SocketState::new(role::CLIENT), 0);
        if let Some(state) = SOCKETS.get_ptr_mut(&socket) {
            set_owner(state, tgid);
        }
        return Ok(());
    }

    if old_state == tcp_state::SYN_RECV && new_state == tcp_state::ESTABLISHED {
        // A passive open completes (in the soft interrupt of the client's last ACK): a server
        // socket, whose owner is known at its first receive.
        let fresh = SocketState::new(role::SERVER);
        let _ = SOCKETS.insert(&socket, &fresh, 0);
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

    // The application closed its end (FIN_WAIT1, in its close()) or the connection is gone:
    // the response in progress is complete. (A peer's FIN, CLOSE_WAIT, is not the end: the
    // application has yet to read what came before it, and its read of the end does it.)
    if new_state == tcp_state::FIN_WAIT1 || new_state == tcp_state::CLOSE {
        if let Some(state) = SOCKETS.get_ptr_mut(&socket) {
            end_request(state);
        }
    }
    if new_state == tcp_state::CLOSE {
        let _ = SOCKETS.remove(&socket);
    }
    Ok(())
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    on_socket_io_btf(&ctx, Direction::Sent);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length_btf(ctx: BtfTracePointContext) -> i32 {
    on_socket_io_btf(&ctx, Direction::Received);
    0
}

/// (struct sock *sk, int ret, int flags): `ret` is the bytes moved or -errno.
#[inline(always)]
fn on_socket_io_btf(ctx: &BtfTracePointContext, direction: Direction) {
    let socket: *const u8 = ctx.arg(0);
    let protocol: u16 = member!(socket, sock_protocol);
    if protocol != IPPROTO_TCP {
        return;
    }
    let bytes: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if direction == Direction::Received && flags & MSG_PEEK != 0 {
        return; // peeked bytes stay queued: they are received again
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(state) = socket_state(socket as u64, role::UNKNOWN) else {
        return;
    };
    set_owner(state, tgid);
    // SAFETY: pointer from a successful lookup; plain loads and stores. Two threads moving
    // data on one socket at once can mis-time one request, not corrupt anything.
    unsafe {
        if (*state).keyed == 0 {
            // The socket's first send or receive in process context: which end it is (when
            // its open was not seen) and where its requests are counted.
            let Ok((family, address, remote_port)) = remote_end(socket) else {
                return;
            };
            let local_port: u16 = member!(socket, sock_num);
            if (*state).role == role::UNKNOWN {
                // A connection older than the probes: which end it is follows from whether
                // its local port listens. Until userspace has said which ports do (a moment
                // after the probes attach), it waits: a guess from the ports alone is wrong
                // whenever both are ephemeral.
                // Lookups whose values are not read.
                if LISTENING_PORTS.get(&LISTENING_PORTS_FILLED).is_none() {
                    super::sched::note_socket_activity(tgid, false);
                    return;
                }
                let listening = LISTENING_PORTS.get(&local_port).is_some();
                (*state).role = role_from_ports(local_port, remote_port, Some(listening));
            }
            (*state).key = request_key(
                (*state).role,
                tgid,
                local_port,
                family,
                address,
                remote_port,
            );
            (*state).keyed = 1;
            if let Some(counters) = get_or_insert!(
                REQUEST_COUNTERS,
                &(*state).key,
                Some(&ZERO_REQUEST_COUNTERS)
            ) {
                add(&raw mut (*counters).connections, 1);
            }
        }
        if bytes > 0 && (*state).protocol == protocol::UNCHECKED {
            (*state).protocol = first_bytes_protocol(bytes as usize);
            if (*state).protocol == protocol::MULTIPLEXED
                && let Some(counters) = get_or_insert!(
                    REQUEST_COUNTERS,
                    &(*state).key,
                    Some(&ZERO_REQUEST_COUNTERS)
                )
            {
                add(&raw mut (*counters).multiplexed_connections, 1);
            }
        }
        // An error (EAGAIN from a non-blocking socket) moved nothing, but is activity.
        if bytes > 0 || (bytes == 0 && direction == Direction::Received) {
            let ended = if bytes > 0 {
                (*state).on_data(direction, bytes as u64, || bpf_ktime_get_ns())
            } else {
                (*state).end() // the peer ended its stream
            };
            sync_counted_wait(state);
            if ended.outcome == ended::TIMED {
                record_request(&(*state).key, &ended, path_rtt_us(socket));
            } else {
                record_request(&(*state).key, &ended, 0);
            }
        }
        let reading_response = (*state).role == role::CLIENT && (*state).phase != phase::IDLE;
        super::sched::note_socket_activity(tgid, reading_response);
    }
}

/// x86-64 system calls that move a socket's bytes through a user buffer, and where that
/// buffer is: the second argument is the buffer itself, an iovec array, or a msghdr.
mod syscall {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const READV: u64 = 19;
    pub const WRITEV: u64 = 20;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    /// `struct pt_regs` slots (8 bytes each): the second argument (rsi), the call (orig_ax).
    pub const REGS_SECOND_ARGUMENT: usize = 13;
    pub const REGS_SYSCALL: usize = 15;
    /// `struct user_msghdr.msg_iov`.
    pub const MSGHDR_IOV: usize = 16;
}

/// What the connection's first bytes say, read from the user buffer of the system call
/// moving them (`moved` bytes; the tracepoint fires after the copy, so they are there and
/// resident). Once per connection. `TURNS` when they cannot be read: io_uring, sendfile, a
/// kernel socket, another architecture (userspace leaves the switch off).
#[inline(always)]
fn first_bytes_protocol(moved: usize) -> u8 {
    if !super::sched::first_bytes_readable() {
        return protocol::TURNS;
    }
    // SAFETY: the helpers take the current task and read through checked copies.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u64;
        let Ok(call) = bpf_probe_read_kernel(regs.add(syscall::REGS_SYSCALL)) else {
            return protocol::TURNS;
        };
        let Ok(argument) = bpf_probe_read_kernel(regs.add(syscall::REGS_SECOND_ARGUMENT)) else {
            return protocol::TURNS;
        };
        let iovec = match call {
            syscall::READ | syscall::WRITE | syscall::SENDTO | syscall::RECVFROM => 0,
            syscall::READV | syscall::WRITEV => argument,
            syscall::SENDMSG | syscall::RECVMSG => {
                bpf_probe_read_user((argument as usize + syscall::MSGHDR_IOV) as *const u64)
                    .unwrap_or(0)
            }
            _ => return protocol::TURNS,
        };
        let (buffer, length) = if iovec == 0 {
            (argument, moved)
        } else {
            // The first iovec: {base, len}.
            let base = bpf_probe_read_user(iovec as *const u64).unwrap_or(0);
            let length = bpf_probe_read_user((iovec as usize + 8) as *const u64).unwrap_or(0);
            (base, moved.min(length as usize))
        };
        match bpf_probe_read_user(buffer as *const [u8; FIRST_BYTES]) {
            Ok(first) if opens_http2(&first, length) => protocol::MULTIPLEXED,
            _ => protocol::TURNS,
        }
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

/// The classic socket probes name each socket's owner and note activity; they do not time
/// requests (that reads `struct sock`, which only the BTF programs do cheaply).
#[inline(always)]
fn try_sock_length(ctx: &TracePointContext) -> Result<(), i64> {
    let protocol: u16 = field!(ctx, sock_length_protocol)?;
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let socket: u64 = field!(ctx, sock_length_sk)?;
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(state) = socket_state(socket, role::UNKNOWN) {
        set_owner(state, tgid);
    }
    super::sched::note_socket_activity(tgid, false);
    Ok(())
}
