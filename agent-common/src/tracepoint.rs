//! Field offsets of the tracepoints the probes read.
//!
//! Rust eBPF has no CO-RE, and tracepoint layouts change between kernels, so userspace reads
//! `/sys/kernel/tracing/events/<category>/<name>/format` at start-up and hands the offsets to
//! the programs in one global. The defaults are the layout of Linux 6.18 (x86-64); a test
//! compares them with the live format files.

/// Offsets (bytes from the start of the tracepoint record) of every field a probe reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointOffsets {
    // block:block_bio_queue
    pub bio_queue_dev: u16,
    pub bio_queue_sector: u16,
    pub bio_queue_rwbs: u16,
    // block:block_split
    pub split_dev: u16,
    pub split_sector: u16,
    pub split_new_sector: u16,
    // block:block_rq_issue
    pub rq_issue_dev: u16,
    pub rq_issue_sector: u16,
    pub rq_issue_rwbs: u16,
    // block:block_rq_complete
    pub rq_complete_dev: u16,
    pub rq_complete_sector: u16,
    pub rq_complete_nr_sector: u16,
    pub rq_complete_error: u16,
    pub rq_complete_rwbs: u16,
    // tcp:tcp_probe
    pub tcp_probe_daddr: u16,
    pub tcp_probe_dport: u16,
    pub tcp_probe_family: u16,
    pub tcp_probe_srtt: u16,
    pub tcp_probe_skaddr: u16,
    // sock:inet_sock_set_state
    pub set_state_skaddr: u16,
    pub set_state_oldstate: u16,
    pub set_state_newstate: u16,
    pub set_state_dport: u16,
    pub set_state_family: u16,
    pub set_state_protocol: u16,
    pub set_state_daddr: u16,
    pub set_state_daddr_v6: u16,
    // tcp:tcp_retransmit_skb
    pub retransmit_skaddr: u16,
    pub retransmit_dport: u16,
    pub retransmit_family: u16,
    pub retransmit_daddr: u16,
    pub retransmit_daddr_v6: u16,
    // sock:sock_send_length / sock:sock_recv_length (same layout)
    pub sock_length_sk: u16,
    pub sock_length_protocol: u16,
    // sched:sched_switch
    pub switch_prev_pid: u16,
    pub switch_prev_state: u16,
    pub switch_next_pid: u16,
    // sched:sched_wakeup (and sched_wakeup_new, same layout)
    pub wakeup_pid: u16,
    // raw_syscalls:sys_enter
    pub sys_enter_id: u16,
    // sched:sched_process_fork
    pub fork_child_pid: u16,
    /// Not an offset: non-zero makes the probes read every field through
    /// `bpf_probe_read_kernel` even where the layout is the compiled one (the path other
    /// kernels' layouts take), so that path can be tested on this kernel.
    pub force_helper_reads: u16,
}

impl TracepointOffsets {
    /// Layout of Linux 6.18 on x86-64.
    pub const LINUX_6_18: TracepointOffsets = TracepointOffsets {
        bio_queue_dev: 8,
        bio_queue_sector: 16,
        bio_queue_rwbs: 28,
        split_dev: 8,
        split_sector: 16,
        split_new_sector: 24,
        rq_issue_dev: 8,
        rq_issue_sector: 16,
        rq_issue_rwbs: 34,
        rq_complete_dev: 8,
        rq_complete_sector: 16,
        rq_complete_nr_sector: 24,
        rq_complete_error: 28,
        rq_complete_rwbs: 34,
        tcp_probe_daddr: 36,
        tcp_probe_dport: 66,
        tcp_probe_family: 68,
        tcp_probe_srtt: 100,
        tcp_probe_skaddr: 128,
        set_state_skaddr: 8,
        set_state_oldstate: 16,
        set_state_newstate: 20,
        set_state_dport: 26,
        set_state_family: 28,
        set_state_protocol: 30,
        set_state_daddr: 36,
        set_state_daddr_v6: 56,
        retransmit_skaddr: 16,
        retransmit_dport: 30,
        retransmit_family: 32,
        retransmit_daddr: 38,
        retransmit_daddr_v6: 58,
        sock_length_sk: 8,
        sock_length_protocol: 18,
        switch_prev_pid: 24,
        switch_prev_state: 32,
        switch_next_pid: 56,
        wakeup_pid: 24,
        sys_enter_id: 8,
        fork_child_pid: 20,
        force_helper_reads: 0,
    };
}
