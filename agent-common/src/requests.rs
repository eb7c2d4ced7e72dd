//! Requests and responses on TCP connections, timed in the kernel from the lengths of the
//! sends and receives the application makes (`sock:sock_send_length`,
//! `sock:sock_recv_length`), with no look at the bytes.
//!
//! One state machine per socket. A server socket's request starts with the first bytes it
//! receives after the previous response (or the connection's start); its first response byte
//! is the first send after that; it ends with the last send before the next request arrives,
//! the peer's end of stream, or the connection's close. A client socket is the mirror image
//! (request sent -> response received). That fits HTTP/1.x keep-alive, streamed responses
//! (chunked, SSE), Redis, Postgres simple queries and most RPC over dedicated connections.
//! Multiplexed protocols (HTTP/2, gRPC) interleave requests on one connection: a connection
//! whose first bytes open HTTP/2 ([`opens_http2`], the only look at the bytes, once per
//! connection) counts its exchanges as untimed instead of timing them wrong. Pure, so the
//! rules are unit-tested here and run unchanged in the kernel.

/// Which end of the conversation a socket is.
pub mod role {
    /// Not known yet: decided at the first send or receive.
    pub const UNKNOWN: u8 = 0;
    /// Accepted from a listening socket: it receives requests and sends responses.
    pub const SERVER: u8 = 1;
    /// Opened with connect(): it sends requests and receives responses.
    pub const CLIENT: u8 = 2;
}

/// Where a socket's current request is.
pub mod phase {
    /// No request open: the last one was answered, or none came yet.
    pub const IDLE: u8 = 0;
    /// The request's bytes are moving (a server receiving, a client sending); no response yet.
    pub const ASKING: u8 = 1;
    /// The response's bytes are moving; the request ends when the asking side speaks again.
    pub const ANSWERING: u8 = 2;
}

/// What requests are aggregated by: for a server its local port, for a client the remote
/// endpoint; and the process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// Client: the server's address (IPv4 in the first 4 bytes). Server: zero.
    pub address: [u8; 16],
    /// Client: `AF_INET` or `AF_INET6`. Server: 0 (IPv4 and IPv6 clients of a port together).
    pub family: u16,
    /// Server: the local (listening) port. Client: the remote port. Host order.
    pub port: u16,
    pub tgid: u32,
    /// `role::SERVER` or `role::CLIENT`.
    pub role: u32,
}

/// Counts per [`RequestKey`], per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounters {
    /// Requests answered and timed (also the count of the latency histograms).
    pub requests: u64,
    /// Requests that ended without a response (the connection closed first, or a stream
    /// that never turns round), and responses to requests that started before the probes.
    pub untimed: u64,
    /// Bytes the process received and sent on these connections, in timed requests.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Connections seen for the first time.
    pub connections: u64,
    /// The connection's lowest RTT sample (`tcp_sock.rtt_min`, the path's round trip without
    /// the delayed ACKs that inflate the smoothed RTT of request/response traffic), summed
    /// over the timed requests that read it, in microseconds, and how many did.
    pub path_rtt_sum_us: u64,
    pub path_rtt_samples: u64,
    /// Connections whose first bytes opened HTTP/2 (h2c, gRPC without TLS): their exchanges
    /// count as `untimed`.
    pub multiplexed_connections: u64,
}

/// Per socket (key: its kernel address), in an LRU map: who owns it, which end it is, and
/// the request in progress. Also what the RTT probe reads to name a socket's process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    pub cgroup_id: u64,
    /// When the request in progress started (its first asking byte), bpf_ktime_get_ns.
    pub request_started_ns: u64,
    /// When its first and latest response bytes moved.
    pub first_answer_ns: u64,
    pub last_answer_ns: u64,
    /// This request's bytes so far, received and sent.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// `key.tgid` is the owning process (0: not seen in process context yet).
    pub key: RequestKey,
    /// `role::*`.
    pub role: u8,
    /// `phase::*`.
    pub phase: u8,
    /// 1 while this socket counts in its process's `TrackedProcess::awaiting_responses`.
    pub counted_waiting: u8,
    /// 1 once `key` names the aggregation (the first send or receive in process context).
    pub keyed: u8,
    /// `protocol::*`: what the connection's first bytes said.
    pub protocol: u8,
    /// Explicit, so no byte of a value written to a map is undefined.
    pub _reserved: [u8; 7],
}

/// [`SocketState::protocol`].
pub mod protocol {
    /// The first bytes were not looked at yet.
    pub const UNCHECKED: u8 = 0;
    /// Taking turns, as far as the first bytes tell (or they could not be read).
    pub const TURNS: u8 = 1;
    /// HTTP/2: requests interleave, so exchanges are counted, not timed.
    pub const MULTIPLEXED: u8 = 2;
}

/// How many of a connection's first bytes [`opens_http2`] looks at.
pub const FIRST_BYTES: usize = 16;

/// Whether the first bytes a connection carried in one direction (`valid` of them) open
/// HTTP/2: the client's connection preface (`PRI * HTTP/2.0\r\n`, RFC 9113 section 3.4) or a
/// server's first frame, SETTINGS on stream 0 (24-bit length a multiple of 6, type 4, no
/// flags). MySQL's greeting (sequence byte 0 where the type would be), SMTP's and other
/// servers that speak first do not match. Word compares, which the verifier handles as
/// well as a loop.
#[inline(always)]
pub fn opens_http2(first: &[u8; FIRST_BYTES], valid: usize) -> bool {
    const PREFACE: [u8; FIRST_BYTES] = *b"PRI * HTTP/2.0\r\n";
    let word = |at: usize| {
        u64::from_be_bytes([
            first[at],
            first[at + 1],
            first[at + 2],
            first[at + 3],
            first[at + 4],
            first[at + 5],
            first[at + 6],
            first[at + 7],
        ])
    };
    let preface = |at: usize| {
        u64::from_be_bytes([
            PREFACE[at],
            PREFACE[at + 1],
            PREFACE[at + 2],
            PREFACE[at + 3],
            PREFACE[at + 4],
            PREFACE[at + 5],
            PREFACE[at + 6],
            PREFACE[at + 7],
        ])
    };
    if valid >= FIRST_BYTES && word(0) == preface(0) && word(8) == preface(8) {
        return true;
    }
    const SETTINGS_FRAME_HEADER: usize = 9;
    if valid < SETTINGS_FRAME_HEADER {
        return false;
    }
    let length = u32::from_be_bytes([0, first[0], first[1], first[2]]);
    let frame_type = first[3];
    let flags = first[4];
    let stream = u32::from_be_bytes([first[5], first[6], first[7], first[8]]);
    frame_type == 4 && flags == 0 && stream == 0 && length.is_multiple_of(6) && length <= 16_384
}

/// Which way bytes moved, from the application's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Received,
    Sent,
}

/// What became of the request in progress after an event: every field is defined on every
/// path (an enum's unused payload is undefined, and the verifier refuses a program that
/// copies undefined registers, which LLVM does with them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ended {
    /// `ended::*`.
    pub outcome: u8,
    /// Request start -> last response byte, and -> first response byte (when timed).
    pub latency_ns: u64,
    pub first_byte_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// [`Ended::outcome`].
pub mod ended {
    /// Still in progress (or there was none).
    pub const NOTHING: u8 = 0;
    /// Answered, and timed.
    pub const TIMED: u8 = 1;
    /// Ended without a response.
    pub const UNTIMED: u8 = 2;
}

impl Ended {
    pub const NOTHING: Ended = Ended::of(ended::NOTHING);
    pub const UNTIMED: Ended = Ended::of(ended::UNTIMED);

    const fn of(outcome: u8) -> Self {
        Self {
            outcome,
            latency_ns: 0,
            first_byte_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}

/// MSG_PEEK in a receive's flags: the bytes stay queued and will be received again.
pub const MSG_PEEK: i32 = 2;

impl SocketState {
    /// A socket first seen now, with its role if the state change that created it told.
    pub const fn new(role: u8) -> Self {
        Self {
            cgroup_id: 0,
            request_started_ns: 0,
            first_answer_ns: 0,
            last_answer_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
            key: RequestKey {
                address: [0; 16],
                family: 0,
                port: 0,
                tgid: 0,
                role: 0,
            },
            role,
            phase: phase::IDLE,
            counted_waiting: 0,
            keyed: 0,
            protocol: protocol::UNCHECKED,
            _reserved: [0; 7],
        }
    }

    /// The application moved `bytes` (> 0) now. Returns the request this ends, when the
    /// asking side speaks again after a response. `clock` is read only when a time is kept:
    /// a stream of request bytes (an upload, a bulk sender) reads it once.
    #[inline(always)]
    pub fn on_data(&mut self, direction: Direction, bytes: u64, clock: impl Fn() -> u64) -> Ended {
        let asking = match direction {
            Direction::Received => self.role == role::SERVER,
            Direction::Sent => self.role == role::CLIENT,
        };
        if asking {
            let ended = if self.phase == phase::ANSWERING {
                self.end()
            } else {
                Ended::NOTHING
            };
            if self.phase == phase::IDLE {
                self.phase = phase::ASKING;
                self.request_started_ns = clock();
                self.bytes_in = 0;
                self.bytes_out = 0;
            }
            self.count(direction, bytes);
            return ended;
        }
        if self.phase == phase::ASKING {
            let now = clock();
            self.phase = phase::ANSWERING;
            self.first_answer_ns = now;
            self.last_answer_ns = now;
            self.count(direction, bytes);
        } else if self.phase == phase::ANSWERING {
            self.last_answer_ns = clock();
            self.count(direction, bytes);
        }
        // A response with no request seen (one that started before the probes, or a server
        // that speaks first) is not a request: nothing to time.
        Ended::NOTHING
    }

    #[inline(always)]
    fn count(&mut self, direction: Direction, bytes: u64) {
        match direction {
            Direction::Received => self.bytes_in += bytes,
            Direction::Sent => self.bytes_out += bytes,
        }
    }

    /// The request in progress ends: its response is complete (the asking side spoke again,
    /// the peer ended its stream, the connection closes), or it never got one. On a
    /// multiplexed connection every exchange is untimed: its turns are not its requests.
    #[inline(always)]
    pub fn end(&mut self) -> Ended {
        let ended = match self.phase {
            phase::ANSWERING if self.protocol == protocol::MULTIPLEXED => Ended::UNTIMED,
            phase::ANSWERING => Ended {
                outcome: ended::TIMED,
                latency_ns: self.last_answer_ns.saturating_sub(self.request_started_ns),
                first_byte_ns: self.first_answer_ns.saturating_sub(self.request_started_ns),
                bytes_in: self.bytes_in,
                bytes_out: self.bytes_out,
            },
            phase::ASKING => Ended::UNTIMED,
            _ => Ended::NOTHING,
        };
        self.phase = phase::IDLE;
        ended
    }

    /// A client with a request sent and no response byte yet: its process is waiting on
    /// the network (or on the upstream behind it).
    #[inline(always)]
    pub const fn awaits_response(&self) -> bool {
        self.role == role::CLIENT && self.phase == phase::ASKING
    }
}

/// Which end a connection is when the probes did not see it open (it predates them): a
/// server's if its local port is one a socket listens on (userspace keeps that set, from
/// every network namespace's `/proc/net/tcp`); before userspace has filled it, the side with
/// the lower port is taken for the server, as listening ports are low and ephemeral ports
/// high on most configurations (a server on an ephemeral port would be misread).
#[inline(always)]
pub const fn role_from_ports(local_port: u16, remote_port: u16, listening: Option<bool>) -> u8 {
    match listening {
        Some(true) => role::SERVER,
        Some(false) => role::CLIENT,
        None if local_port < remote_port => role::SERVER,
        None => role::CLIENT,
    }
}

/// Bits of the `REQUEST_TIMING` switch userspace sets at load.
pub mod request_timing {
    /// Both socket probes run as BTF programs: requests are timed.
    pub const TIMED: u32 = 1;
    /// The system call ABI is known (x86-64): the probes may read a connection's first
    /// bytes from the user buffer to tell HTTP/2.
    pub const FIRST_BYTES_READABLE: u32 = 2;
}

/// The key `LISTENING_PORTS` holds once userspace has filled it (port 0 never listens).
pub const LISTENING_PORTS_FILLED: u16 = 0;

/// The aggregation a socket's requests go to.
#[inline(always)]
pub const fn request_key(
    role: u8,
    tgid: u32,
    local_port: u16,
    family: u16,
    remote_address: [u8; 16],
    remote_port: u16,
) -> RequestKey {
    if role == role::SERVER {
        RequestKey {
            address: [0; 16],
            family: 0,
            port: local_port,
            tgid,
            role: role::SERVER as u32,
        }
    } else {
        RequestKey {
            address: remote_address,
            family,
            port: remote_port,
            tgid,
            role: role::CLIENT as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Direction::*, *};

    fn timed(ended: Ended) -> (u64, u64, u64, u64) {
        assert_eq!(ended.outcome, ended::TIMED, "{ended:?}");
        (
            ended.latency_ns,
            ended.first_byte_ns,
            ended.bytes_in,
            ended.bytes_out,
        )
    }

    #[test]
    fn a_keep_alive_server_times_each_request_from_its_first_byte_to_its_last_response_byte() {
        let mut socket = SocketState::new(role::SERVER);
        // Request in two reads, response in three writes (a streamed body).
        assert_eq!(socket.on_data(Received, 100, || 1_000), Ended::NOTHING);
        assert_eq!(socket.on_data(Received, 20, || 1_100), Ended::NOTHING);
        assert!(
            !socket.awaits_response(),
            "a server never waits on its own clients"
        );
        assert_eq!(socket.on_data(Sent, 50, || 5_000), Ended::NOTHING);
        assert_eq!(socket.on_data(Sent, 500, || 7_000), Ended::NOTHING);
        assert_eq!(socket.on_data(Sent, 5, || 9_000), Ended::NOTHING);
        // The next request ends the previous one at its last send.
        let ended = socket.on_data(Received, 80, || 20_000);
        assert_eq!(timed(ended), (8_000, 4_000, 120, 555));
        socket.on_data(Sent, 10, || 20_500);
        // The client hangs up (end of stream read as 0 bytes): the second request ends.
        assert_eq!(timed(socket.end()), (500, 500, 80, 10));
        assert_eq!(socket.end(), Ended::NOTHING, "nothing left to end");
    }

    #[test]
    fn a_client_times_from_its_request_to_the_last_response_byte_and_waits_only_before_the_first() {
        let mut socket = SocketState::new(role::CLIENT);
        socket.on_data(Sent, 300, || 1_000);
        assert!(socket.awaits_response());
        socket.on_data(Received, 1_000, || 301_000);
        assert!(!socket.awaits_response(), "the response is flowing");
        socket.on_data(Received, 1_000, || 302_000);
        let ended = socket.on_data(Sent, 300, || 900_000);
        assert_eq!(timed(ended), (301_000, 300_000, 2_000, 300));
        assert!(socket.awaits_response());
    }

    #[test]
    fn requests_without_responses_are_untimed_and_responses_without_requests_are_ignored() {
        let mut server = SocketState::new(role::SERVER);
        // Bytes sent before any request was seen: a connection older than the probes.
        assert_eq!(server.on_data(Sent, 10, || 1), Ended::NOTHING);
        assert_eq!(server.phase, phase::IDLE);
        server.on_data(Received, 10, || 2);
        assert_eq!(server.end(), Ended::UNTIMED);
        // A client that only ever sends (an upload, a bulk stream) waits the whole time.
        let mut uploader = SocketState::new(role::CLIENT);
        for at in 0..10 {
            uploader.on_data(Sent, 65_536, || at);
        }
        assert!(uploader.awaits_response());
        assert_eq!(uploader.end(), Ended::UNTIMED);
    }

    #[test]
    fn a_stream_of_request_bytes_reads_the_clock_once_and_a_response_at_every_send() {
        let reads = core::cell::Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            reads.get() * 1_000
        };
        let mut uploader = SocketState::new(role::CLIENT);
        for _ in 0..100 {
            uploader.on_data(Sent, 1_000, clock);
        }
        assert_eq!(reads.get(), 1, "only the request's start is timed");
        for _ in 0..3 {
            uploader.on_data(Received, 10, clock);
        }
        assert_eq!(reads.get(), 4, "every response byte may be the last");
        assert_eq!(timed(uploader.end()), (3_000, 1_000, 30, 100_000));
    }

    fn first(bytes: &[u8]) -> [u8; FIRST_BYTES] {
        let mut first = [0xAA; FIRST_BYTES];
        let n = bytes.len().min(FIRST_BYTES);
        first[..n].copy_from_slice(&bytes[..n]);
        first
    }

    #[test]
    fn http2_is_recognised_by_its_preface_or_first_settings_frame_and_nothing_else_is() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert!(opens_http2(&first(preface), preface.len()));
        assert!(
            !opens_http2(&first(preface), 15),
            "a short read of the preface is not enough to tell"
        );
        // A server's SETTINGS with three settings (18 bytes), and an empty one.
        let settings = [0, 0, 18, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100, 0];
        assert!(opens_http2(&settings, 27));
        assert!(opens_http2(&first(&[0, 0, 0, 4, 0, 0, 0, 0, 0]), 9));
        for (what, bytes) in [
            ("HTTP/1.1", &b"GET / HTTP/1.1\r\nHost: x\r\n"[..]),
            ("a response", b"HTTP/1.1 200 OK\r\n"),
            ("SMTP greeting", b"220 mail ESMTP\r\n"),
            // length 74, sequence 0, protocol 10, "8.0.3"...
            (
                "MySQL greeting",
                &[
                    74, 0, 0, 0, 10, b'8', b'.', b'0', b'.', b'3', 0, 1, 2, 3, 4, 5,
                ],
            ),
            ("Redis", b"*1\r\n$4\r\nPING\r\n"),
            (
                "TLS ClientHello",
                &[0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3, 0, 0, 0, 0, 0],
            ),
            ("SETTINGS ACK", &[0, 0, 0, 4, 1, 0, 0, 0, 0]),
            ("SETTINGS on a stream", &[0, 0, 6, 4, 0, 0, 0, 0, 1]),
            (
                "a length not of 6-byte settings",
                &[0, 0, 7, 4, 0, 0, 0, 0, 0],
            ),
        ] {
            assert!(!opens_http2(&first(bytes), bytes.len()), "{what}");
        }
        assert!(
            !opens_http2(&first(&[0, 0, 0, 4, 0, 0, 0, 0]), 8),
            "too short"
        );
    }

    #[test]
    fn a_multiplexed_connection_counts_its_exchanges_untimed_and_still_waits_on_requests() {
        let mut client = SocketState::new(role::CLIENT);
        client.protocol = protocol::MULTIPLEXED;
        client.on_data(Sent, 24, || 1_000);
        assert!(client.awaits_response());
        client.on_data(Received, 100, || 2_000);
        assert_eq!(client.on_data(Sent, 50, || 3_000), Ended::UNTIMED);
        client.on_data(Received, 100, || 4_000);
        assert_eq!(client.end(), Ended::UNTIMED);
    }

    #[test]
    fn servers_group_by_local_port_and_clients_by_remote_endpoint() {
        let remote = [10, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let server = request_key(role::SERVER, 42, 8000, 2, remote, 51_000);
        assert_eq!(
            (server.port, server.family, server.address),
            (8000, 0, [0; 16])
        );
        let client = request_key(role::CLIENT, 42, 51_000, 2, remote, 6333);
        assert_eq!(
            (client.port, client.family, client.address),
            (6333, 2, remote)
        );
        assert_eq!(role_from_ports(8000, 51_000, None), role::SERVER);
        assert_eq!(role_from_ports(51_000, 6333, None), role::CLIENT);
        // What listens decides, when known: a server on an ephemeral port, its client on a
        // lower one.
        assert_eq!(role_from_ports(42_506, 33_000, Some(true)), role::SERVER);
        assert_eq!(role_from_ports(8000, 51_000, Some(false)), role::CLIENT);
    }
}
