//! Where each tracked process's threads spend their time, from the scheduler tracepoints.

/// What a thread is doing since `ThreadState::since_ns`. Also the index into
/// `ProcessTime::ns`.
pub mod activity {
    pub const ON_CPU: u32 = 0;
    pub const WAITING_FOR_CPU: u32 = 1;
    pub const STORAGE: u32 = 2;
    pub const NETWORK: u32 = 3;
    pub const GPU: u32 = 4;
    pub const OTHER_SLEEP: u32 = 5;
    pub const COUNT: usize = 6;
    /// Not an activity: the thread is gone (its final switch-out), forget it.
    pub const EXITED: u32 = u32::MAX;
}

/// Flags in `TRACKED_PROCESSES` values, set by userspace.
pub mod tracked {
    /// Account this process's time.
    pub const TRACKED: u32 = 1;
    /// The process has a GPU context (from NVML): its ioctl/poll sleeps wait on the GPU.
    pub const GPU_USER: u32 = 2;
}

/// A tracked process (key: tgid). Userspace writes `flags`; the probes stamp the times, in
/// place, so the hot paths need one lookup for "is it tracked" and "what did it do lately".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedProcess {
    /// `tracked::*`.
    pub flags: u32,
    /// Its client sockets with a request sent and no response byte yet (see
    /// `requests::SocketState::awaits_response`): while there are any, its waits for events
    /// are waits on the network.
    pub awaiting_responses: u32,
    /// When it last queued block I/O (bpf_ktime_get_ns), 0 for never.
    pub last_io_queued_ns: u64,
    /// When it last sent or received on a TCP socket, 0 for never.
    pub last_socket_activity_ns: u64,
    /// The thread whose last send or receive was on a client socket with a request open (a
    /// response awaited or arriving), 0 for none: a read it blocks in next waits for that
    /// response. One per process, kept where the probes already look (no lookup per
    /// thread); several threads reading responses at once are covered by
    /// `awaiting_responses` until their first response byte.
    pub reading_thread: u32,
    pub _padding: u32,
}

impl TrackedProcess {
    pub const fn new(flags: u32) -> Self {
        Self {
            flags,
            awaiting_responses: 0,
            last_io_queued_ns: 0,
            last_socket_activity_ns: 0,
            reading_thread: 0,
            _padding: 0,
        }
    }
}

/// Per thread (key: thread id), in an LRU map so exited threads age out.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadState {
    pub since_ns: u64,
    pub tgid: u32,
    /// One of `activity::*`.
    pub activity: u32,
    /// `gpu_call::*`: whether the thread is inside a CUDA call that waits on the GPU (seen
    /// by the opt-in CUDA uprobes), and whether it is on a CPU meanwhile.
    pub gpu_call: u32,
    /// When the call began, in units of 2^20 ns (about a millisecond; wraps after 52 days):
    /// a call whose return was never seen (the probes detached while it ran) stops counting
    /// as GPU wait after [`GPU_CALL_STALE_UNITS`].
    pub gpu_call_since: u32,
}

/// [`ThreadState::gpu_call_since`] of a call starting at `now_ns`.
#[inline(always)]
pub const fn gpu_call_units(now_ns: u64) -> u32 {
    (now_ns >> 20) as u32
}

/// 60 s in units of 2^20 ns: as long as a blocking CUDA call is believed to last.
pub const GPU_CALL_STALE_UNITS: u32 = 57_220;

impl ThreadState {
    /// Whether the thread is inside a blocking CUDA call at `now_ns` (a call begun more than
    /// a minute ago is taken to have ended unseen).
    #[inline(always)]
    pub const fn in_gpu_call(&self, now_ns: u64) -> bool {
        self.gpu_call != gpu_call::NONE
            && gpu_call_units(now_ns).wrapping_sub(self.gpu_call_since) < GPU_CALL_STALE_UNITS
    }
}

/// Values of `ThreadState::gpu_call`. A thread inside a blocking CUDA call (a
/// synchronisation, a synchronous copy) waits on the GPU whatever it does meanwhile: CUDA
/// spins on a CPU, then yields or sleeps in an ioctl. Its time is charged to `activity::GPU`,
/// except waiting for a CPU, which is the CPU's.
pub mod gpu_call {
    pub const NONE: u32 = 0;
    /// In the call and on a CPU.
    pub const RUNNING: u32 = 1;
    /// In the call and off the CPU (asleep, or preempted).
    pub const OFF_CPU: u32 = 2;
}

impl ThreadState {
    pub const fn new(since_ns: u64, tgid: u32, activity: u32) -> Self {
        Self {
            since_ns,
            tgid,
            activity,
            gpu_call: gpu_call::NONE,
            gpu_call_since: 0,
        }
    }
}

/// What a thread inside a blocking CUDA call is doing once it leaves the CPU: waiting for a
/// CPU stays that, an exit stays that, every sleep is the GPU's.
#[inline(always)]
pub const fn activity_in_gpu_call(classified: u32) -> u32 {
    match classified {
        activity::WAITING_FOR_CPU | activity::EXITED => classified,
        _ => activity::GPU,
    }
}

/// Per process (key: tgid), per CPU: nanoseconds by activity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessTime {
    pub ns: [u64; activity::COUNT],
    /// Command name at the last switch-out, to name the process after it has exited.
    pub comm: [u8; 16],
}

/// Task state bits as sched_switch reports them (TASK_REPORT; 0 is running).
pub const TASK_INTERRUPTIBLE: u64 = 0x1;
pub const TASK_UNINTERRUPTIBLE: u64 = 0x2;
pub const EXIT_DEAD: u64 = 0x10;
pub const EXIT_ZOMBIE: u64 = 0x20;
/// What sched_switch reports for a task that was preempted (TASK_REPORT_MAX).
pub const PREEMPTED: u64 = 0x100;

/// The task state a classic `sched_switch` tracepoint reports, from what the raw tracepoint
/// gets: whether the task was preempted, the `prev_state` it is leaving in and its
/// `exit_state` (the kernel's `__trace_sched_switch_state`). The states of `TASK_REPORT`
/// (0x7f) reduce to their highest bit; an idle kernel thread (`TASK_IDLE`: uninterruptible
/// and no-load) reports 0x80, a sleeping lock on PREEMPT_RT (`TASK_RTLOCK_WAIT`) reports
/// uninterruptible.
#[inline(always)]
pub const fn reported_switch_state(preempted: bool, prev_state: u32, exit_state: u32) -> u64 {
    const TASK_REPORT: u32 = 0x7f;
    const TASK_NOLOAD: u32 = 0x400;
    const TASK_RTLOCK_WAIT: u32 = 0x1000;
    if preempted {
        return PREEMPTED;
    }
    let mut state = (prev_state | exit_state) & TASK_REPORT;
    if prev_state == TASK_UNINTERRUPTIBLE as u32 | TASK_NOLOAD {
        state = TASK_REPORT + 1;
    }
    if prev_state & TASK_RTLOCK_WAIT != 0 {
        state = TASK_UNINTERRUPTIBLE as u32;
    }
    if state == 0 {
        return 0;
    }
    1u64 << (31 - state.leading_zeros())
}

/// How recent I/O or socket activity must be to explain a sleep.
pub const RECENT_ACTIVITY_NS: u64 = 2_000_000_000;

/// x86-64 system call numbers the sleep classification looks at.
pub mod syscall {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const POLL: u64 = 7;
    pub const IOCTL: u64 = 16;
    pub const SELECT: u64 = 23;
    pub const CONNECT: u64 = 42;
    pub const ACCEPT: u64 = 43;
    pub const SENDTO: u64 = 44;
    pub const RECVFROM: u64 = 45;
    pub const SENDMSG: u64 = 46;
    pub const RECVMSG: u64 = 47;
    pub const IO_GETEVENTS: u64 = 208;
    pub const EPOLL_WAIT: u64 = 232;
    pub const PSELECT6: u64 = 270;
    pub const PPOLL: u64 = 271;
    pub const EPOLL_PWAIT: u64 = 281;
    pub const ACCEPT4: u64 = 288;
    pub const RECVMMSG: u64 = 299;
    pub const SENDMMSG: u64 = 307;
    pub const IO_URING_ENTER: u64 = 426;
    pub const EPOLL_PWAIT2: u64 = 441;
}

/// Whether `classify_switch_out` looks at the system call for this task state: only for an
/// interruptible sleep. The probe reads the system call (three helper calls) only then.
#[inline(always)]
pub const fn needs_syscall(task_state: u64) -> bool {
    task_state != 0
        && task_state & (PREEMPTED | EXIT_DEAD | EXIT_ZOMBIE | TASK_UNINTERRUPTIBLE) == 0
        && task_state & TASK_INTERRUPTIBLE != 0
}

/// Why a thread that just left the CPU is not running, from the kernel's own evidence:
/// its task state, the system call it is in, whether its process queued block I/O or used a
/// socket recently, and whether it has a GPU context. Pure, so it is unit-tested here and
/// runs unchanged in the kernel.
#[inline(always)]
pub const fn classify_switch_out(
    task_state: u64,
    syscall_id: u64,
    recent_io: bool,
    network: NetworkWait,
    gpu_user: bool,
) -> u32 {
    use syscall::*;
    if task_state == 0 || task_state & PREEMPTED != 0 {
        return activity::WAITING_FOR_CPU; // preempted: still runnable
    }
    if task_state & (EXIT_DEAD | EXIT_ZOMBIE) != 0 {
        return activity::EXITED;
    }
    if task_state & (TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE) == 0 {
        return activity::OTHER_SLEEP; // stopped, traced, parked
    }
    let waits_for_events = matches!(
        syscall_id,
        POLL | SELECT | PSELECT6 | PPOLL | EPOLL_WAIT | EPOLL_PWAIT | EPOLL_PWAIT2
    );
    if task_state & TASK_UNINTERRUPTIBLE != 0 {
        // D state: block I/O (direct or page cache) if the process has I/O going.
        return if recent_io {
            activity::STORAGE
        } else {
            activity::OTHER_SLEEP
        };
    }
    match syscall_id {
        // Asynchronous I/O completions are waited for interruptibly.
        IO_GETEVENTS | IO_URING_ENTER if recent_io => activity::STORAGE,
        // A thread in accept() waits for the next client: idle, not held back by the network.
        ACCEPT | ACCEPT4 => activity::OTHER_SLEEP,
        // Blocked sending or connecting: the network (or the peer) cannot take more yet.
        CONNECT | SENDTO | SENDMSG | SENDMMSG => activity::NETWORK,
        WRITE if network.recent_socket => activity::NETWORK,
        // Blocked receiving: a wait for a response is the network's; a server waiting for
        // its next request is idle.
        RECVFROM | RECVMSG | RECVMMSG if network.awaiting_response || network.reading_response => {
            activity::NETWORK
        }
        READ if network.recent_socket
            && (network.awaiting_response || network.reading_response) =>
        {
            activity::NETWORK
        }
        // The NVIDIA driver blocks in ioctl (and poll) on its device files.
        IOCTL if gpu_user => activity::GPU,
        _ if waits_for_events && network.awaiting_response => activity::NETWORK,
        _ if waits_for_events && gpu_user => activity::GPU,
        _ => activity::OTHER_SLEEP,
    }
}

/// What the process and thread were doing on the network when the thread fell asleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkWait {
    /// The process sent or received on a TCP socket lately.
    pub recent_socket: bool,
    /// One of the process's client sockets has a request out and no response byte yet.
    pub awaiting_response: bool,
    /// The thread's last send or receive was on a client socket with a request open
    /// (`TrackedProcess::reading_thread`).
    pub reading_response: bool,
}

impl NetworkWait {
    /// Where requests are timed (`TrackedProcess::awaiting_responses`, `reading_thread`).
    pub const fn from_requests(
        recent_socket: bool,
        awaiting_response: bool,
        reading_response: bool,
    ) -> Self {
        Self {
            recent_socket,
            awaiting_response,
            reading_response,
        }
    }

    /// Where they are not (no kernel BTF for `struct sock`): any socket used lately explains
    /// a wait for events, and every blocked receive is the network's.
    pub const fn from_recent_socket(recent_socket: bool) -> Self {
        Self {
            recent_socket,
            awaiting_response: recent_socket,
            reading_response: true,
        }
    }

    pub const NONE: Self = Self::from_requests(false, false, false);
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_gpu_call_whose_return_was_never_seen_expires_after_a_minute() {
        use super::{ThreadState, activity, gpu_call, gpu_call_units};
        let start = 5_000_000_000_000u64;
        let mut state = ThreadState::new(start, 1, activity::GPU);
        assert!(!state.in_gpu_call(start));
        state.gpu_call = gpu_call::RUNNING;
        state.gpu_call_since = gpu_call_units(start);
        assert!(state.in_gpu_call(start + 59_000_000_000));
        assert!(!state.in_gpu_call(start + 61_000_000_000));
        // Across the units' wrap (52 days).
        let near_wrap = (u32::MAX as u64) << 20;
        state.gpu_call_since = gpu_call_units(near_wrap);
        assert!(state.in_gpu_call(near_wrap + 30_000_000_000));
    }

    #[test]
    fn inside_a_blocking_cuda_call_every_sleep_is_the_gpus_but_waiting_for_a_cpu_is_not() {
        use super::{activity, activity_in_gpu_call};
        for sleep in [
            activity::STORAGE,
            activity::NETWORK,
            activity::GPU,
            activity::OTHER_SLEEP,
        ] {
            assert_eq!(activity_in_gpu_call(sleep), activity::GPU);
        }
        assert_eq!(
            activity_in_gpu_call(activity::WAITING_FOR_CPU),
            activity::WAITING_FOR_CPU
        );
        assert_eq!(activity_in_gpu_call(activity::EXITED), activity::EXITED);
    }

    use super::{activity::*, syscall::*, *};

    #[test]
    fn raw_switch_states_read_like_the_classic_tracepoint_reports_them() {
        // (preempted, prev_state, exit_state) -> what sched:sched_switch prints.
        assert_eq!(reported_switch_state(true, 0x1, 0), PREEMPTED);
        assert_eq!(reported_switch_state(false, 0, 0), 0);
        assert_eq!(reported_switch_state(false, 0x1, 0), TASK_INTERRUPTIBLE);
        assert_eq!(reported_switch_state(false, 0x2, 0), TASK_UNINTERRUPTIBLE);
        // TASK_KILLABLE (wakekill | uninterruptible) is D.
        assert_eq!(reported_switch_state(false, 0x102, 0), TASK_UNINTERRUPTIBLE);
        // TASK_IDLE: not uninterruptible for the report.
        assert_eq!(reported_switch_state(false, 0x402, 0), 0x80);
        // The final switch of an exiting task: TASK_DEAD with its exit state.
        assert_eq!(reported_switch_state(false, 0x80, 0x20), EXIT_ZOMBIE);
        assert_eq!(reported_switch_state(false, 0x80, 0x10), EXIT_DEAD);
        // Stopped (__TASK_STOPPED 0x4) is reported as such, and is not a sleep we classify.
        assert_eq!(reported_switch_state(false, 0x4, 0), 0x4);
        assert_eq!(
            classify_switch_out(
                reported_switch_state(false, 0x80, 0x20),
                0,
                false,
                NetworkWait::NONE,
                false
            ),
            EXITED
        );
    }

    #[test]
    fn the_system_call_matters_only_when_it_is_needed() {
        let states = [
            0,
            TASK_INTERRUPTIBLE,
            TASK_UNINTERRUPTIBLE,
            TASK_INTERRUPTIBLE | PREEMPTED,
            EXIT_ZOMBIE,
            EXIT_DEAD,
            0x0004, // stopped
        ];
        let syscalls = [
            u64::MAX,
            READ,
            RECVFROM,
            IOCTL,
            EPOLL_WAIT,
            IO_GETEVENTS,
            CONNECT,
        ];
        for state in states {
            for flags in 0..8u8 {
                let (io, socket, gpu) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
                let verdicts: Vec<u32> = syscalls
                    .iter()
                    .map(|&id| {
                        classify_switch_out(
                            state,
                            id,
                            io,
                            NetworkWait::from_recent_socket(socket),
                            gpu,
                        )
                    })
                    .collect();
                if !needs_syscall(state) {
                    assert!(
                        verdicts.iter().all(|&v| v == verdicts[0]),
                        "state {state:#x}: {verdicts:?}"
                    );
                }
            }
        }
        assert!(needs_syscall(TASK_INTERRUPTIBLE));
        assert!(!needs_syscall(TASK_UNINTERRUPTIBLE));
    }

    #[test]
    fn preempted_threads_wait_for_a_cpu() {
        assert_eq!(
            classify_switch_out(0, READ, true, NetworkWait::from_recent_socket(true), true),
            WAITING_FOR_CPU
        );
        assert_eq!(
            classify_switch_out(
                0x100,
                READ,
                false,
                NetworkWait::from_recent_socket(false),
                false
            ),
            WAITING_FOR_CPU
        );
    }

    #[test]
    fn the_final_switch_of_a_dead_thread_ends_it() {
        assert_eq!(
            classify_switch_out(
                EXIT_DEAD,
                60,
                true,
                NetworkWait::from_recent_socket(true),
                true
            ),
            EXITED
        );
        assert_eq!(
            classify_switch_out(
                EXIT_ZOMBIE,
                60,
                false,
                NetworkWait::from_recent_socket(false),
                false
            ),
            EXITED
        );
        assert_eq!(
            classify_switch_out(0x4, 0, false, NetworkWait::from_recent_socket(false), false),
            OTHER_SLEEP
        ); // stopped
    }

    #[test]
    fn uninterruptible_sleep_with_io_is_storage() {
        assert_eq!(
            classify_switch_out(
                TASK_UNINTERRUPTIBLE,
                17,
                true,
                NetworkWait::from_recent_socket(false),
                false
            ),
            STORAGE
        );
        assert_eq!(
            classify_switch_out(
                TASK_UNINTERRUPTIBLE,
                17,
                false,
                NetworkWait::from_recent_socket(false),
                false
            ),
            OTHER_SLEEP
        );
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                IO_GETEVENTS,
                true,
                NetworkWait::from_recent_socket(false),
                false
            ),
            STORAGE
        );
    }

    #[test]
    fn socket_waits_are_network() {
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                RECVFROM,
                false,
                NetworkWait::from_recent_socket(false),
                false
            ),
            NETWORK
        );
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                EPOLL_WAIT,
                false,
                NetworkWait::from_recent_socket(true),
                false
            ),
            NETWORK
        );
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                READ,
                false,
                NetworkWait::from_recent_socket(true),
                false
            ),
            NETWORK
        );
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                EPOLL_WAIT,
                false,
                NetworkWait::from_recent_socket(false),
                false
            ),
            OTHER_SLEEP
        );
        // Where requests are timed: the same waits with nothing awaited are idle.
        let idle_server = NetworkWait::from_requests(true, false, false);
        for wait in [EPOLL_WAIT, READ, RECVFROM, POLL] {
            assert_eq!(
                classify_switch_out(TASK_INTERRUPTIBLE, wait, false, idle_server, false),
                OTHER_SLEEP,
                "syscall {wait}"
            );
        }
        let client_waiting = NetworkWait::from_requests(true, true, false);
        for wait in [EPOLL_WAIT, READ, RECVFROM, POLL] {
            assert_eq!(
                classify_switch_out(TASK_INTERRUPTIBLE, wait, false, client_waiting, false),
                NETWORK,
                "syscall {wait}"
            );
        }
        // A thread reading a response that has started (a download) waits on the network;
        // an event loop with only answered requests does not.
        let downloading = NetworkWait::from_requests(true, false, true);
        assert_eq!(
            classify_switch_out(TASK_INTERRUPTIBLE, RECVFROM, false, downloading, false),
            NETWORK
        );
        assert_eq!(
            classify_switch_out(TASK_INTERRUPTIBLE, EPOLL_WAIT, false, downloading, false),
            OTHER_SLEEP
        );
        // Blocked sends are the network's, requests or not.
        assert_eq!(
            classify_switch_out(TASK_INTERRUPTIBLE, SENDTO, false, NetworkWait::NONE, false),
            NETWORK
        );
        // A server waiting for its next client is idle, however busy its sockets were.
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                ACCEPT4,
                false,
                NetworkWait::from_recent_socket(true),
                false
            ),
            OTHER_SLEEP
        );
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                CONNECT,
                false,
                NetworkWait::from_recent_socket(false),
                false
            ),
            NETWORK
        );
    }

    #[test]
    fn driver_waits_of_gpu_users_are_gpu() {
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                IOCTL,
                false,
                NetworkWait::from_recent_socket(false),
                true
            ),
            GPU
        );
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                POLL,
                false,
                NetworkWait::from_recent_socket(false),
                true
            ),
            GPU
        );
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                IOCTL,
                false,
                NetworkWait::from_recent_socket(false),
                false
            ),
            OTHER_SLEEP
        );
        // futex (202) is a lock or condition variable: other sleep, even for GPU users.
        assert_eq!(
            classify_switch_out(
                TASK_INTERRUPTIBLE,
                202,
                false,
                NetworkWait::from_recent_socket(false),
                true
            ),
            OTHER_SLEEP
        );
    }
}
