//! Offsets of the kernel struct members the BTF-enabled raw tracepoints (`tp_btf`) read.
//!
//! A raw tracepoint hands its program the kernel's own arguments (a `struct request *`, a
//! `struct sock *`...) instead of a trace record, so the probes read struct members. Rust eBPF
//! has no CO-RE, so userspace looks the members up in the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`) at start-up and writes them into this global; a probe whose
//! members are missing there is attached as a classic tracepoint instead. The defaults are
//! Linux 6.18 on x86-64; a test compares them with the live BTF.

/// Byte offsets of struct members, from the start of their struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BtfOffsets {
    /// `struct bio`: `bi_iter.bi_sector`, `bi_iter.bi_size` (bytes left), `bi_next` (the
    /// next bio of a request), `bi_private` (what its submitter waits on; a split part's
    /// original).
    pub bio_sector: u16,
    pub bio_size: u16,
    pub bio_next: u16,
    pub bio_private: u16,
    /// `struct bio`: `bi_end_io` (the function its submitter's completion runs), and `struct
    /// iomap_dio`: `size` (bytes the direct I/O has queued so far, this bio's included).
    /// Together they tell a direct I/O's next bio from a new I/O at a reused address (see
    /// `IOMAP_DIO_BIO_END_IO_GLOBAL`). Optional: 0 where the kernel BTF lacks either, and
    /// the probes then fall back on where the bio starts.
    pub bio_end_io: u16,
    pub iomap_dio_size: u16,
    /// `struct request`: `q` (pointer), `__sector`, `cmd_flags`, `bio` (its first bio).
    pub request_queue: u16,
    pub request_sector: u16,
    pub request_cmd_flags: u16,
    pub request_bio: u16,
    /// `struct request_queue`: `disk` (pointer).
    pub queue_disk: u16,
    /// `struct gendisk`: `major`, `first_minor`.
    pub disk_major: u16,
    pub disk_first_minor: u16,
    /// `struct sock` (its `__sk_common`): `skc_family`, `skc_dport`, `skc_daddr`,
    /// `skc_v6_daddr`, `skc_num` (the local port, host order); and `sk_protocol`.
    pub sock_family: u16,
    pub sock_dport: u16,
    pub sock_daddr: u16,
    pub sock_v6_daddr: u16,
    pub sock_num: u16,
    pub sock_protocol: u16,
    /// `struct tcp_sock`: `srtt_us` (smoothed RTT in microseconds, shifted left by 3);
    /// `rtt_min` (a `struct minmax`: the connection's lowest RTT sample of the last 5 minutes
    /// is the value of its first sample, at +4).
    pub tcp_srtt_us: u16,
    pub tcp_rtt_min: u16,
    /// `struct task_struct`: `pid`, `tgid`, `exit_state`.
    pub task_pid: u16,
    pub task_tgid: u16,
    pub task_exit_state: u16,
}

impl BtfOffsets {
    /// Linux 6.18 on x86-64.
    pub const LINUX_6_18: BtfOffsets = BtfOffsets {
        bio_sector: 32,
        bio_size: 40,
        bio_next: 0,
        bio_private: 64,
        bio_end_io: 56,
        iomap_dio_size: 24,
        request_queue: 0,
        request_sector: 48,
        request_cmd_flags: 24,
        request_bio: 56,
        queue_disk: 104,
        disk_major: 0,
        disk_first_minor: 4,
        sock_family: 16,
        sock_dport: 12,
        sock_daddr: 0,
        sock_v6_daddr: 56,
        sock_num: 14,
        sock_protocol: 532,
        tcp_srtt_us: 1680,
        tcp_rtt_min: 1496,
        task_pid: 1264,
        task_tgid: 1268,
        task_exit_state: 1160,
    };
}

/// The low bits of `request.cmd_flags` (and `bio.bi_opf`) that hold the operation
/// (`REQ_OP_BITS` = 8, `enum req_op`), a kernel ABI used by every block tracer.
pub const REQ_OP_MASK: u32 = 0xff;
pub mod req_op {
    pub const READ: u32 = 0;
    pub const WRITE: u32 = 1;
    pub const FLUSH: u32 = 2;
    pub const DISCARD: u32 = 3;
}
