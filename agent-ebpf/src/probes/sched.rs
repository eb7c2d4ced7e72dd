//! Where each tracked process's threads spend their time: on a CPU, waiting for one, or
//! asleep for storage, network, the GPU or something else. Filtered in the kernel to the
//! processes userspace tracks (one hash lookup per context switch otherwise), accumulated
//! per process in per-CPU maps.
use agent_common::sched::{
    ProcessTime, RECENT_ACTIVITY_NS, ThreadState, activity, classify_switch_out, tracked,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, LruPerCpuHashMap},
    programs::TracePointContext,
};

use super::shared::{get_or_insert, offset};

/// tgid -> `tracked::*` flags; written by userspace as processes come and go.
#[map]
static TRACKED_PROCESSES: HashMap<u32, u32> = HashMap::with_max_entries(32768, 0);

/// Thread id -> what it is doing since when.
#[map]
static THREAD_STATES: LruHashMap<u32, ThreadState> = LruHashMap::with_max_entries(65536, 0);

/// Thread id -> the system call it entered last (the one it sleeps in, when it sleeps).
/// Only the fallback path (`sched_switch_by_map` + `sys_enter`) fills it.
#[map]
static THREAD_SYSCALLS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65536, 0);

#[map]
static TIME_BY_PROCESS: LruPerCpuHashMap<u32, ProcessTime> =
    LruPerCpuHashMap::with_max_entries(8192, 0);

/// tgid -> when it last queued block I/O / last used a TCP socket.
#[map]
static LAST_IO_QUEUED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(8192, 0);
#[map]
static LAST_SOCKET_ACTIVITY: LruHashMap<u32, u64> = LruHashMap::with_max_entries(8192, 0);

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

#[inline(always)]
fn tracked_flags(tgid: u32) -> Option<u32> {
    // SAFETY: copied out at once.
    unsafe { TRACKED_PROCESSES.get(&tgid) }.copied()
}

/// Called by the storage probe when `tgid` queues block I/O.
#[inline(always)]
pub fn note_io_queued(tgid: u32, now: u64) {
    if tracked_flags(tgid).is_some() {
        store(&LAST_IO_QUEUED, tgid, now);
    }
}

/// Called by the network probe when `tgid` sends or receives on a TCP socket.
#[inline(always)]
pub fn note_socket_activity(tgid: u32, now: u64) {
    if tracked_flags(tgid).is_some() {
        store(&LAST_SOCKET_ACTIVITY, tgid, now);
    }
}

#[inline(always)]
fn recent(map: &LruHashMap<u32, u64>, tgid: u32, now: u64) -> bool {
    // SAFETY: copied out at once.
    unsafe { map.get(&tgid) }.is_some_and(|&at| now.wrapping_sub(at) < RECENT_ACTIVITY_NS)
}

#[inline(always)]
fn account(tgid: u32, what: u32, ns: u64) {
    if let Some(time) = get_or_insert!(TIME_BY_PROCESS, &tgid, &ZERO_TIME) {
        let index = what as usize;
        if index < activity::COUNT {
            // SAFETY: this CPU's slot of a per-CPU value; index checked.
            unsafe { (*time).ns[index] += ns };
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

#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    let _ = try_sched_switch(&ctx, |_| syscall_from_registers());
    0
}

/// The fallback for kernels without `bpf_task_pt_regs`: the system call `sys_enter` noted.
#[tracepoint(category = "sched", name = "sched_switch")]
pub fn sched_switch_by_map(ctx: TracePointContext) -> u32 {
    let _ = try_sched_switch(&ctx, |thread| {
        // SAFETY: copied out at once.
        unsafe { THREAD_SYSCALLS.get(&thread) }
            .copied()
            .unwrap_or(u64::MAX)
    });
    0
}

#[inline(always)]
fn try_sched_switch(
    ctx: &TracePointContext,
    current_syscall: impl Fn(u32) -> u64,
) -> Result<(), i64> {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // sched_switch runs in the context of the thread leaving the CPU.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(flags) = tracked_flags(tgid) {
        // SAFETY: offsets from the format file, reads through bpf_probe_read_kernel.
        let prev: i32 = unsafe { ctx.read_at(offset!(switch_prev_pid))? };
        let task_state: i64 = unsafe { ctx.read_at(offset!(switch_prev_state))? };
        let prev = prev as u32;
        let syscall = current_syscall(prev);
        let next_activity = classify_switch_out(
            task_state as u64,
            syscall,
            recent(&LAST_IO_QUEUED, tgid, now),
            recent(&LAST_SOCKET_ACTIVITY, tgid, now),
            flags & tracked::GPU_USER != 0,
        );
        match THREAD_STATES.get_ptr_mut(&prev) {
            Some(state) if next_activity == activity::EXITED => {
                transition(state, activity::OTHER_SLEEP, now);
                let _ = THREAD_STATES.remove(&prev);
            }
            None if next_activity == activity::EXITED => {}
            Some(state) => transition(state, next_activity, now),
            None => {
                let state = ThreadState {
                    since_ns: now,
                    tgid,
                    activity: next_activity,
                };
                let _ = THREAD_STATES.insert(&prev, &state, 0);
            }
        }
    }
    // SAFETY: as above.
    let next: i32 = unsafe { ctx.read_at(offset!(switch_next_pid))? };
    if next != 0 {
        if let Some(state) = THREAD_STATES.get_ptr_mut(&(next as u32)) {
            transition(state, activity::ON_CPU, now);
        }
    }
    Ok(())
}

#[tracepoint(category = "sched", name = "sched_wakeup")]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    let _ = try_sched_wakeup(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: TracePointContext) -> u32 {
    let _ = try_sched_wakeup(&ctx);
    0
}

/// A sleeping thread became runnable: its sleep ends, its wait for a CPU begins.
#[inline(always)]
fn try_sched_wakeup(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: see try_sched_switch.
    let pid: i32 = unsafe { ctx.read_at(offset!(wakeup_pid))? };
    if let Some(state) = THREAD_STATES.get_ptr_mut(&(pid as u32)) {
        // SAFETY: pointer from a successful lookup.
        let asleep = unsafe { (*state).activity } >= activity::STORAGE;
        if asleep {
            // SAFETY: plain helper call.
            transition(state, activity::WAITING_FOR_CPU, unsafe {
                bpf_ktime_get_ns()
            });
        }
    }
    Ok(())
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
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
    0
}

/// A tracked process's children are tracked from their first instant, with its flags, so
/// short-lived workers are not missed between userspace's refreshes of the tracked set.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(flags) = tracked_flags(parent) {
        // SAFETY: see try_sched_switch.
        if let Ok(child) = unsafe { ctx.read_at::<i32>(offset!(fork_child_pid)) } {
            let _ = TRACKED_PROCESSES.insert(&(child as u32), &flags, 0);
        }
    }
    0
}

/// Fallback only (see `sched_switch_by_map`): fires on every system call of the node.
#[tracepoint(category = "raw_syscalls", name = "sys_enter")]
pub fn sys_enter(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if tracked_flags((pid_tgid >> 32) as u32).is_some() {
        // SAFETY: see try_sched_switch.
        if let Ok(id) = unsafe { ctx.read_at::<i64>(offset!(sys_enter_id)) } {
            store(&THREAD_SYSCALLS, pid_tgid as u32, id as u64);
        }
    }
    0
}
