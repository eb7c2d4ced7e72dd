//! Where each tracked process's threads spend their time: on a CPU, waiting for one, or
//! asleep for storage, network, the GPU or something else. Filtered in the kernel to the
//! processes userspace tracks (one hash lookup per context switch otherwise), accumulated
//! per process in per-CPU maps.
use agent_common::requests::request_timing;
use agent_common::sched::{
    NetworkWait, ProcessTime, RECENT_ACTIVITY_NS, ThreadState, TrackedProcess, activity,
    activity_in_gpu_call, classify_switch_out, gpu_call, gpu_call_units, needs_syscall,
    reported_switch_state, tracked,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap},
    programs::{BtfTracePointContext, TracePointContext},
};

use super::shared::{add, field, get_or_insert, member};

/// tgid -> flags (userspace) and when it last queued I/O / used a socket (the probes).
#[map]
static TRACKED_PROCESSES: HashMap<u32, TrackedProcess> = HashMap::with_max_entries(32768, 0);

/// Thread id -> what it is doing since when.
#[map]
static THREAD_STATES: LruHashMap<u32, ThreadState> = LruHashMap::with_max_entries(65536, 0);

/// Thread id -> the system call it entered last (the one it sleeps in, when it sleeps).
/// Only the fallback path (`sched_switch_by_map` + `sys_enter`) fills it.
#[map]
static THREAD_SYSCALLS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65536, 0);

/// Element 0 holds `request_timing::*` bits: TIMED once userspace has both socket probes
/// running as BTF programs, the ones that time requests (network.rs): waits for a response
/// are then told from idle waits.
#[map]
static REQUEST_TIMING: Array<u32> = Array::with_max_entries(1, 0);

/// Whether requests are timed (see [`REQUEST_TIMING`]).
#[inline(always)]
fn requests_timed() -> bool {
    REQUEST_TIMING
        .get(0)
        .is_some_and(|on| *on & request_timing::TIMED != 0)
}

/// Whether the socket probes may read a connection's first bytes from the system call's
/// user buffer (to tell HTTP/2): userspace says so where it knows the system call ABI.
#[inline(always)]
pub fn first_bytes_readable() -> bool {
    REQUEST_TIMING
        .get(0)
        .is_some_and(|on| *on & request_timing::FIRST_BYTES_READABLE != 0)
}

#[map]
static TIME_BY_PROCESS: LruPerCpuHashMap<u32, ProcessTime> =
    LruPerCpuHashMap::with_max_entries(8192, 0);

const ZERO_TIME: ProcessTime = ProcessTime {
    ns: [0; activity::COUNT],
    comm: [0; 16],
};

/// Overwrites the value in place when the key exists: an LRU map's insert allocates and links
/// a new node every time, which on hot paths (every system call) costs several times more.
#[inline(always)]
fn store(map: &LruHashMap<u32, u64>, key: u32, value: u64) {
    match map.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; a plain 8-byte store.
        Some(slot) => unsafe { *slot = value },
        None => {
            let _ = map.insert(&key, &value, 0);
        }
    }
}

/// The tracked process's record, to read and stamp in place; None for untracked processes.
#[inline(always)]
pub fn tracked_process(tgid: u32) -> Option<*mut TrackedProcess> {
    TRACKED_PROCESSES.get_ptr_mut(&tgid)
}

/// Called by the storage probe when `tgid` queues block I/O.
#[inline(always)]
pub fn note_io_queued(tgid: u32, now: u64) {
    if let Some(process) = tracked_process(tgid) {
        // SAFETY: pointer from a successful lookup; a plain 8-byte store.
        unsafe { (*process).last_io_queued_ns = now };
    }
}

/// Called by the network probe when `tgid` sends or receives on a TCP socket;
/// `reading_response`: the socket is a client's with a request open (see
/// `TrackedProcess::reading_thread`). The clock is read only for tracked processes.
#[inline(always)]
pub fn note_socket_activity(tgid: u32, reading_response: bool) {
    if let Some(process) = tracked_process(tgid) {
        let thread = bpf_get_current_pid_tgid() as u32;
        // SAFETY: plain helper call; pointer from a successful lookup, plain stores (the
        // reading thread only when it changes).
        unsafe {
            (*process).last_socket_activity_ns = bpf_ktime_get_ns();
            if reading_response {
                if (*process).reading_thread != thread {
                    (*process).reading_thread = thread;
                }
            } else if (*process).reading_thread == thread {
                (*process).reading_thread = 0;
            }
        }
    }
}

#[inline(always)]
fn recent(at: u64, now: u64) -> bool {
    at != 0 && now.wrapping_sub(at) < RECENT_ACTIVITY_NS
}

#[inline(always)]
fn account(tgid: u32, what: u32, ns: u64) {
    if let Some(time) = get_or_insert!(TIME_BY_PROCESS, &tgid, Some(&ZERO_TIME)) {
        let index = what as usize;
        if index < activity::COUNT {
            // SAFETY: this CPU's slot of a per-CPU value; index checked.
            unsafe { add(&raw mut (*time).ns[index], ns) };
        }
    }
}

/// Closes the thread's current interval and starts `next` at `now`.
#[inline(always)]
fn transition(state: *mut ThreadState, next: u32, now: u64) {
    // SAFETY: pointer from a successful lookup; a racing update only misplaces one interval.
    unsafe {
        account(
            (*state).tgid,
            (*state).activity,
            now.wrapping_sub((*state).since_ns),
        );
        (*state).activity = next;
        (*state).since_ns = now;
    }
}

/// Offset of `orig_ax` in x86-64's `struct pt_regs` (a user-visible ABI: ptrace's layout).
const PT_REGS_ORIG_AX: usize = 15 * 8;

/// The system call the current thread is in, from its saved registers: no per-syscall probe
/// is needed. Needs BTF and `bpf_task_pt_regs` (Linux 5.15); the loader falls back to
/// `sched_switch_by_map` where the verifier refuses this.
#[inline(always)]
fn syscall_from_registers() -> u64 {
    // SAFETY: helper calls; the read goes through bpf_probe_read_kernel.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8;
        if regs.is_null() {
            return u64::MAX;
        }
        bpf_probe_read_kernel(regs.add(PT_REGS_ORIG_AX) as *const u64).unwrap_or(u64::MAX)
    }
}

// Every probe comes twice, a BTF raw tracepoint and the classic tracepoint (see storage.rs);
// both hand the same fields to one handler.

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
    // (bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int
    // prev_state); `prev` is the current task.
    let preempted: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u32 = ctx.arg(3);
    let _ = on_switch(
        || {
            let exit_state: u32 = member!(prev, task_exit_state);
            Ok(reported_switch_state(
                preempted as u8 != 0,
                prev_state,
                exit_state,
            ))
        },
        || Ok(member!(next, task_pid)),
        |_| syscall_from_registers(),
    );
    0
}

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let _ = on_switch(
        || {
            // `long` in the record; typed here, or inference would pick `!` for the read.
            let state: i64 = field!(&ctx, switch_prev_state)?;
            Ok(state as u64)
        },
        || Ok(field!(&ctx, switch_next_pid)?),
        |_| syscall_from_registers(),
    );
    0
}

/// The fallback for kernels without `bpf_task_pt_regs`: the system call `sys_enter` noted.
#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch_by_map(ctx: TracePointContext) -> u32 {
    let _ = on_switch(
        || {
            // `long` in the record; typed here, or inference would pick `!` for the read.
            let state: i64 = field!(&ctx, switch_prev_state)?;
            Ok(state as u64)
        },
        || Ok(field!(&ctx, switch_next_pid)?),
        |thread| {
            // SAFETY: copied out at once.
            unsafe { THREAD_SYSCALLS.get(&thread) }
                .copied()
                .unwrap_or(u64::MAX)
        },
    );
    0
}

/// A context switch: the current thread leaves the CPU (in the state `prev_state` gives, as
/// the classic tracepoint reports it), the thread `next_pid` gets it. The fields are read
/// only when a tracked thread is involved.
#[inline(always)]
fn on_switch(
    prev_state: impl Fn() -> Result<u64, i64>,
    next_pid: impl Fn() -> Result<i32, i64>,
    current_syscall: impl Fn(u32) -> u64,
) -> Result<(), i64> {
    // sched_switch runs in the context of the thread leaving the CPU. The clock is read only
    // when a tracked thread is involved: most switches on a node are not.
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let mut now = 0;
    if let Some(process) = tracked_process(tgid) {
        // SAFETY: plain helper call.
        now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: pointer from a successful lookup; copied out at once.
        let process = unsafe { *process };
        let prev = pid_tgid as u32;
        let task_state = prev_state()?;
        let syscall = if needs_syscall(task_state) {
            current_syscall(prev)
        } else {
            u64::MAX
        };
        let thread = THREAD_STATES.get_ptr_mut(&prev);
        let recent_socket = recent(process.last_socket_activity_ns, now);
        // Only the sleeps whose system call matters need to know about requests.
        let network = if !needs_syscall(task_state) {
            NetworkWait::NONE
        } else if requests_timed() {
            NetworkWait::from_requests(
                recent_socket,
                process.awaiting_responses > 0,
                process.reading_thread == prev,
            )
        } else {
            NetworkWait::from_recent_socket(recent_socket)
        };
        let next_activity = classify_switch_out(
            task_state,
            syscall,
            recent(process.last_io_queued_ns, now),
            network,
            process.flags & tracked::GPU_USER != 0,
        );
        match thread {
            Some(state) if next_activity == activity::EXITED => {
                transition(state, activity::OTHER_SLEEP, now);
                let _ = THREAD_STATES.remove(&prev);
            }
            None if next_activity == activity::EXITED => {}
            // SAFETY: pointer from a successful lookup; plain loads and stores.
            Some(state) => unsafe {
                if (*state).in_gpu_call(now) {
                    transition(state, activity_in_gpu_call(next_activity), now);
                    (*state).gpu_call = gpu_call::OFF_CPU;
                } else {
                    transition(state, next_activity, now);
                    (*state).gpu_call = gpu_call::NONE;
                }
            },
            None => {
                let state = ThreadState::new(now, tgid, next_activity);
                let _ = THREAD_STATES.insert(&prev, &state, 0);
            }
        }
    }
    let next = next_pid()?;
    if next != 0 {
        if let Some(state) = THREAD_STATES.get_ptr_mut(&(next as u32)) {
            if now == 0 {
                // SAFETY: plain helper call.
                now = unsafe { bpf_ktime_get_ns() };
            }
            // SAFETY: pointer from a successful lookup; plain loads and stores.
            unsafe {
                if (*state).in_gpu_call(now) {
                    transition(state, activity::GPU, now);
                    (*state).gpu_call = gpu_call::RUNNING;
                } else {
                    transition(state, activity::ON_CPU, now);
                    (*state).gpu_call = gpu_call::NONE;
                }
            }
        }
    }
    Ok(())
}

/// When `thread` last got a CPU, if it is running now (none for a thread the probes have
/// not seen switch).
#[inline(always)]
pub fn on_cpu_since(thread: u32) -> Option<u64> {
    // SAFETY: copied out at once.
    let state = unsafe { THREAD_STATES.get(&thread) }.copied()?;
    (state.activity == activity::ON_CPU).then_some(state.since_ns)
}

/// The current thread (of a tracked process) enters a CUDA call that waits on the GPU: from
/// now until [`leave_gpu_call`] its time is the GPU's, spinning or asleep (see
/// `agent_common::sched::gpu_call`).
#[inline(always)]
pub fn enter_gpu_call(thread: u32, tgid: u32, now: u64) {
    match THREAD_STATES.get_ptr_mut(&thread) {
        Some(state) => {
            transition(state, activity::GPU, now);
            // SAFETY: pointer from a successful lookup; plain stores.
            unsafe {
                (*state).gpu_call = gpu_call::RUNNING;
                (*state).gpu_call_since = gpu_call_units(now);
            }
        }
        None => {
            let mut state = ThreadState::new(now, tgid, activity::GPU);
            state.gpu_call = gpu_call::RUNNING;
            state.gpu_call_since = gpu_call_units(now);
            let _ = THREAD_STATES.insert(&thread, &state, 0);
        }
    }
}

/// The current thread returns from the call [`enter_gpu_call`] saw it enter: it runs again.
#[inline(always)]
pub fn leave_gpu_call(thread: u32, now: u64) {
    if let Some(state) = THREAD_STATES.get_ptr_mut(&thread) {
        // SAFETY: pointer from a successful lookup; plain loads and stores.
        unsafe {
            if (*state).gpu_call != gpu_call::NONE {
                transition(state, activity::ON_CPU, now);
                (*state).gpu_call = gpu_call::NONE;
            }
        }
    }
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup_btf(ctx: BtfTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    on_wakeup(member!(task, task_pid));
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new_btf(ctx: BtfTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    on_wakeup(member!(task, task_pid));
    0
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    if let Ok(pid) = field!(&ctx, wakeup_pid) {
        on_wakeup(pid);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
    if let Ok(pid) = field!(&ctx, wakeup_pid) {
        on_wakeup(pid);
    }
    0
}

/// A sleeping thread became runnable: its sleep ends, its wait for a CPU begins.
#[inline(always)]
fn on_wakeup(pid: i32) {
    if let Some(state) = THREAD_STATES.get_ptr_mut(&(pid as u32)) {
        // SAFETY: pointer from a successful lookup. A thread running inside a blocking CUDA
        // call is charged to the GPU too, but it is on a CPU: a wakeup racing its sleep
        // (woken before it switched out) does not make it wait for one.
        let asleep = unsafe {
            (*state).activity >= activity::STORAGE && (*state).gpu_call != gpu_call::RUNNING
        };
        if asleep {
            // SAFETY: plain helper call.
            transition(state, activity::WAITING_FOR_CPU, unsafe {
                bpf_ktime_get_ns()
            });
        }
    }
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit_btf(_ctx: BtfTracePointContext) -> i32 {
    on_exit();
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    on_exit();
    0
}

/// The current thread exits.
#[inline(always)]
fn on_exit() {
    let pid_tgid = bpf_get_current_pid_tgid();
    let thread = pid_tgid as u32;
    if let Some(state) = THREAD_STATES.get_ptr_mut(&thread) {
        // SAFETY: plain helper call. The thread's last interval ends here.
        transition(state, activity::OTHER_SLEEP, unsafe { bpf_ktime_get_ns() });
        let _ = THREAD_STATES.remove(&thread);
        // The process's name after exec (a shell's child becomes "dd"), kept for after the
        // exit: userspace names live processes from /proc. Written here, once per exiting
        // thread, rather than at every context switch: the main thread's name wins, another
        // thread's only while none is set.
        let tgid = (pid_tgid >> 32) as u32;
        if let (Some(time), Ok(comm)) = (TIME_BY_PROCESS.get_ptr_mut(&tgid), bpf_get_current_comm())
        {
            // SAFETY: this CPU's slot of a per-CPU value.
            unsafe {
                if thread == tgid || (*time).comm[0] == 0 {
                    (*time).comm = comm;
                }
            }
        }
    }
    let _ = THREAD_SYSCALLS.remove(&thread);
    // The process is gone when its leader exits: its tracking entry goes with it. Children
    // tracked at fork are in no userspace set, so nothing else would remove them, and under
    // process churn the map filled up and stopped admitting new processes (the soak test
    // found it). A leader that exits before its other threads is tracked again by the next
    // userspace refresh (every second). Any other thread's own entry goes too: the classic
    // fork probe cannot tell a new thread from a new process and tracks both, and no process
    // has a live thread's id as its own.
    let _ = TRACKED_PROCESSES.remove(&thread);
}

/// A tracked process's children are tracked from their first instant, with its flags, so
/// short-lived workers are not missed between userspace's refreshes of the tracked set.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork_btf(ctx: BtfTracePointContext) -> i32 {
    let child: *const u8 = ctx.arg(1);
    let pid: i32 = member!(child, task_pid);
    let tgid: i32 = member!(child, task_tgid);
    // The tracepoint fires for new threads too (clone with CLONE_THREAD): those belong to a
    // process already tracked by its tgid and need no entry of their own.
    if pid == tgid {
        on_fork(|| Ok(pid));
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    on_fork(|| Ok(field!(&ctx, fork_child_pid)?));
    0
}

/// The current process forked `child_pid`; read only when the parent is tracked. The classic
/// record does not say whether the child is a thread of the parent's (no tgid): there a new
/// thread gets an entry under its thread id too, removed when the thread exits (`on_exit`).
#[inline(always)]
fn on_fork(child_pid: impl Fn() -> Result<i32, i64>) {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: copied out at once.
    if let Some(flags) = unsafe { TRACKED_PROCESSES.get(&parent) }.map(|parent| parent.flags) {
        if let Ok(child) = child_pid() {
            let _ = TRACKED_PROCESSES.insert(&(child as u32), &TrackedProcess::new(flags), 0);
        }
    }
}

/// Fallback only (see `sched_switch_by_map`): fires on every system call of the node.
#[tracepoint(category = "raw_syscalls", name = "sys_enter")]
pub fn sys_enter(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked_process((pid_tgid >> 32) as u32).is_some() {
        let id: Result<i64, _> = field!(&ctx, sys_enter_id);
        if let Ok(id) = id {
            store(&THREAD_SYSCALLS, pid_tgid as u32, id as u64);
        }
    }
    0
}
