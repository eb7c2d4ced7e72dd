//! How the agent meets the kernel: tracepoint layouts, and probes that cannot attach.
use std::path::Path;

use agent_common::tracepoint::TracepointOffsets;
use envelope::kernel::{
    preflight,
    probes::{KernelProbes, ProbeKind, ProbeOptions},
    tracefs,
};

/// Every probe on its classic tracepoint, the path these tracefs tests are about.
fn classic() -> ProbeOptions {
    ProbeOptions {
        all_classic: true,
        ..ProbeOptions::default()
    }
}
use integration_tests::{root_or_skip, unique_name};

/// The built-in offsets are the fallback for a tracepoint whose format cannot be read; they
/// must be this kernel's layout. If this fails on a new kernel, the live offsets are still
/// used at run time: update `TracepointOffsets::LINUX_6_18` or add that kernel's layout.
#[test]
fn built_in_offsets_match_the_live_format_files() {
    if !root_or_skip("built_in_offsets_match_the_live_format_files") {
        return;
    }
    let report = preflight::run().expect("preflight");
    let (live, availability) = tracefs::read_offsets(report.tracefs.as_deref());
    for (spec, usable) in &availability {
        assert_eq!(
            *usable,
            Ok(()),
            "tracepoint {} unusable",
            spec.qualified_name()
        );
    }
    assert_eq!(live, TracepointOffsets::LINUX_6_18);
}

/// A kernel without one tracepoint loses that probe, not the agent: with tcp_probe's format
/// hidden (and the classic path forced), every other probe attaches and the missing one says
/// why.
#[test]
fn a_missing_tracepoint_turns_off_only_its_probe() {
    if !root_or_skip("a_missing_tracepoint_turns_off_only_its_probe") {
        return;
    }
    let report = preflight::run().expect("preflight");
    let live_root = report.tracefs.as_deref().expect("root reads tracefs");
    let fake_root = std::env::temp_dir().join(unique_name("envelope-tracefs-"));
    for spec in tracefs::TRACEPOINTS
        .iter()
        .filter(|spec| spec.name != "tcp_probe")
    {
        let relative = Path::new("events").join(spec.category).join(spec.name);
        std::fs::create_dir_all(fake_root.join(&relative)).unwrap();
        std::fs::copy(
            live_root.join(&relative).join("format"),
            fake_root.join(&relative).join("format"),
        )
        .unwrap();
    }
    let loaded = KernelProbes::load_with(Some(&fake_root), &classic());
    let _ = std::fs::remove_dir_all(&fake_root);
    let probes = loaded.expect("the agent still loads");
    for status in probes.statuses() {
        if status.tracepoint == "tcp:tcp_probe" {
            assert!(!status.attached);
            assert_eq!(
                status.problem.as_deref(),
                Some("this kernel has no such tracepoint")
            );
            assert_eq!(status.feeds, "TCP round-trip time");
        } else {
            assert!(
                status.attached,
                "{} should attach: {:?}",
                status.tracepoint, status.problem
            );
        }
    }
    assert!(probes.snapshot().is_ok(), "maps stay readable");
}

/// No tracepoint at all: a clear error, not a panic and not an empty report.
#[test]
fn no_usable_tracepoint_is_a_clear_error() {
    if !root_or_skip("no_usable_tracepoint_is_a_clear_error") {
        return;
    }
    preflight::run().expect("preflight");
    // A tracefs with no tracepoint in it.
    let empty_root = std::env::temp_dir().join(unique_name("envelope-tracefs-"));
    std::fs::create_dir_all(empty_root.join("events")).unwrap();
    let loaded = KernelProbes::load_with(Some(&empty_root), &classic());
    let _ = std::fs::remove_dir_all(&empty_root);
    let error = loaded.err().expect("must fail");
    let message = error.to_string();
    assert!(message.contains("no probe could attach"), "{message}");
    assert!(
        message.contains("block:block_rq_complete: this kernel has no such tracepoint"),
        "{message}"
    );
}

/// BTF raw tracepoints need no tracefs: with none at all, every probe attaches as `btf`, and
/// the maps read. Skipped on kernels without BTF.
#[test]
fn btf_probes_attach_without_tracefs() {
    if !root_or_skip("btf_probes_attach_without_tracefs") {
        return;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("skipped: this kernel has no BTF");
        return;
    }
    preflight::run().expect("preflight");
    let probes = KernelProbes::load_with(None, &ProbeOptions::default())
        .expect("BTF probes load without tracefs");
    for status in probes.statuses() {
        assert!(
            status.attached,
            "{}: {:?}",
            status.tracepoint, status.problem
        );
        assert_eq!(
            status.kind,
            ProbeKind::Btf,
            "{}: {:?}",
            status.tracepoint,
            status.btf_problem
        );
        assert_eq!(status.btf_problem, None);
    }
    assert_eq!(probes.statuses().len(), tracefs::TRACEPOINTS.len());
    assert!(probes.snapshot().is_ok());
}

/// The probes loaded with `tracepoint` kept classic by the caller; None (printed) without
/// root or kernel BTF.
fn load_keeping_classic(test: &str, tracepoint: &str) -> Option<KernelProbes> {
    if !root_or_skip(test) {
        return None;
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        eprintln!("skipped {test}: this kernel has no BTF");
        return None;
    }
    let report = preflight::run().expect("preflight");
    let options = ProbeOptions {
        classic: vec![tracepoint.to_string()],
        ..ProbeOptions::default()
    };
    Some(KernelProbes::load_with(report.tracefs.as_deref(), &options).expect("load"))
}

/// The choice is per probe: one kept classic, the rest BTF, all attached and sharing maps.
#[test]
fn one_probe_can_stay_classic_while_the_rest_are_btf() {
    let Some(probes) = load_keeping_classic(
        "one_probe_can_stay_classic_while_the_rest_are_btf",
        "tcp_probe",
    ) else {
        return;
    };
    for status in probes.statuses() {
        assert!(status.attached, "{}", status.tracepoint);
        if status.tracepoint == "tcp:tcp_probe" {
            assert_eq!(status.kind, ProbeKind::Tracepoint);
            assert_eq!(
                status.btf_problem.as_deref(),
                Some("kept classic by the caller")
            );
        } else {
            assert_eq!(status.kind, ProbeKind::Btf, "{}", status.tracepoint);
        }
    }
}

/// The block probes follow each bio by pointer from queue to completion, which only the BTF
/// programs can: keeping one classic keeps all four classic, and says which decided it.
#[test]
fn the_block_probes_are_all_of_one_kind() {
    let Some(probes) = load_keeping_classic("the_block_probes_are_all_of_one_kind", "block_split")
    else {
        return;
    };
    for status in probes.statuses() {
        assert!(status.attached, "{}", status.tracepoint);
        if status.tracepoint.starts_with("block:") {
            assert_eq!(status.kind, ProbeKind::Tracepoint, "{}", status.tracepoint);
            let why = status.btf_problem.as_deref().unwrap_or_default();
            if status.tracepoint == "block:block_split" {
                assert_eq!(why, "kept classic by the caller");
            } else {
                assert!(
                    why.starts_with(
                        "block_split is a classic tracepoint (kept classic by the caller)"
                    ),
                    "{}: {why}",
                    status.tracepoint
                );
            }
        } else if status.tracepoint.starts_with("tcp:") {
            assert_eq!(status.kind, ProbeKind::Btf, "{}", status.tracepoint);
        }
    }
}

/// The tracking entries of a tracked process's new threads and children, while they live and
/// after they exit, on one kind of probes. The tracked process is this test's.
fn tracking_entries_of_threads_and_children(options: &ProbeOptions) -> TrackingSeen {
    use agent_common::sched::tracked;
    let mut probes = integration_tests::load_probes_with(options);
    let me = std::process::id();
    probes
        .track_process(me, tracked::TRACKED)
        .expect("track this process");
    let threads = 16;
    let started = std::sync::Barrier::new(threads + 1);
    let finish = std::sync::Barrier::new(threads + 1);
    let (tids, while_alive, child_tracked) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() } as u32;
                    started.wait();
                    finish.wait();
                    tid
                })
            })
            .collect();
        started.wait();
        let mut child = std::process::Command::new("sleep")
            .arg("1")
            .spawn()
            .expect("spawn sleep");
        let seen = probes.tracked_in_kernel().expect("read tracked processes");
        let child_tracked = seen.contains(&child.id());
        finish.wait();
        let tids: Vec<u32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let _ = child.kill();
        let _ = child.wait();
        let while_alive = tids.iter().filter(|tid| seen.contains(tid)).count();
        (tids, while_alive, child_tracked)
    });
    // Joined threads may not have passed their exit probe yet (a join wakes when the thread
    // lets go of its memory, which some kernels do before tracing the exit): wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let (after, after_exit) = loop {
        let after = probes.tracked_in_kernel().expect("read tracked processes");
        let left = tids.iter().filter(|tid| after.contains(tid)).count();
        if left == 0 || std::time::Instant::now() >= deadline {
            break (after, left);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let fork_probe_kind = probes
        .statuses()
        .into_iter()
        .find(|status| status.tracepoint == "sched:sched_process_fork")
        .map(|status| status.kind);
    TrackingSeen {
        threads: tids.len(),
        while_alive,
        after_exit,
        child_tracked,
        me_tracked: after.contains(&me),
        fork_probe_kind,
    }
}

struct TrackingSeen {
    threads: usize,
    /// New threads with an entry of their own while they ran.
    while_alive: usize,
    /// Left after they exited.
    after_exit: usize,
    child_tracked: bool,
    me_tracked: bool,
    fork_probe_kind: Option<ProbeKind>,
}

/// A tracked process's children are tracked from fork; its new threads are not entries of
/// their own (they would fill the 32,768-entry map on a node whose thread pools churn: no
/// userspace refresh knows their ids). The BTF fork probe skips them; the classic one cannot
/// tell them apart (its record has no tgid), so there each thread's entry goes at its exit.
#[test]
fn new_threads_of_a_tracked_process_leave_no_tracking_entries() {
    if !root_or_skip("new_threads_of_a_tracked_process_leave_no_tracking_entries") {
        return;
    }
    let btf = tracking_entries_of_threads_and_children(&ProbeOptions::default());
    let classic = tracking_entries_of_threads_and_children(&classic());
    for (kind, seen) in [("btf", &btf), ("classic", &classic)] {
        assert!(
            seen.child_tracked,
            "{kind}: a child of a tracked process is tracked at fork"
        );
        assert!(
            seen.me_tracked,
            "{kind}: the tracked process keeps its entry"
        );
        assert_eq!(
            seen.after_exit, 0,
            "{kind}: {} of {} exited threads still have an entry",
            seen.after_exit, seen.threads
        );
    }
    if btf.fork_probe_kind != Some(ProbeKind::Btf) {
        eprintln!(
            "the fork probe is {:?} here (kernel without BTF?): the BTF check is skipped",
            btf.fork_probe_kind
        );
        return;
    }
    assert_eq!(
        btf.while_alive, 0,
        "BTF: {} of {} running threads have an entry",
        btf.while_alive, btf.threads
    );
    eprintln!(
        "threads with an entry while running: BTF {}, classic {} of {}",
        btf.while_alive, classic.while_alive, classic.threads
    );
}
