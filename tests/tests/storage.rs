//! Storage probes against direct I/O the test issues itself (root only).
use std::{
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    process::Command,
    time::{Duration, Instant},
};

use agent_common::storage::{IoOperation, StorageCounters};
use envelope::analysis::window::{StorageOperationSummary, WindowSummary};
use integration_tests::{
    AlignedBuffer, ScratchFile, load_probes, root_or_skip, tool_or_skip, window_since,
};

const BLOCK: usize = 4096;

/// Direct reads (or writes) of one block at pseudo-random offsets; returns each call's time.
fn direct_io(file: &ScratchFile, operations: usize, write: bool) -> Vec<Duration> {
    let blocks = std::fs::metadata(&file.path).unwrap().len() as usize / BLOCK;
    direct_io_in(file, operations, write, 0..blocks, 0x9E37_79B9_7F4A_7C15)
}

/// [`direct_io`] within a range of blocks, from a seed: concurrent readers given disjoint
/// ranges never have the same sector in flight twice (the probes match a completion to its
/// start by device and sector, so two in flight at once are one request to them).
fn direct_io_in(
    file: &ScratchFile,
    operations: usize,
    write: bool,
    blocks: std::ops::Range<usize>,
    seed: u64,
) -> Vec<Duration> {
    direct_io_with(&open_direct(file, write), operations, write, blocks, seed)
}

fn open_direct(file: &ScratchFile, write: bool) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(&file.path)
        .expect("open O_DIRECT")
}

/// [`direct_io_in`] on a file already open with O_DIRECT.
fn direct_io_with(
    handle: &std::fs::File,
    operations: usize,
    write: bool,
    blocks: std::ops::Range<usize>,
    seed: u64,
) -> Vec<Duration> {
    let mut buffer = AlignedBuffer::new(BLOCK);
    let mut seed = seed;
    (0..operations)
        .map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let block = blocks.start + (seed >> 33) as usize % blocks.len();
            let offset = (block * BLOCK) as u64;
            let started = Instant::now();
            if write {
                handle
                    .write_all_at(buffer.as_mut_slice(), offset)
                    .expect("pwrite");
            } else {
                handle
                    .read_exact_at(buffer.as_mut_slice(), offset)
                    .expect("pread");
            }
            started.elapsed()
        })
        .collect()
}

fn mean(durations: &[Duration]) -> f64 {
    durations.iter().map(Duration::as_secs_f64).sum::<f64>() / durations.len() as f64 * 1e3
}

/// The test's own I/O as the probes charged it: (ops, bytes, mean queued->complete ms).
fn charged_to_me(
    delta: &envelope::model::KernelSnapshot,
    operation: IoOperation,
) -> (u64, u64, f64) {
    let me = std::process::id();
    let (mut ops, mut bytes, mut latency_ns) = (0, 0, 0);
    for (key, stats) in &delta.process_io {
        if key.tgid == me && key.operation == operation as u8 {
            ops += stats.completed_requests;
            bytes += stats.completed_bytes;
            latency_ns += stats.latency_sum_ns;
        }
    }
    (
        ops,
        bytes,
        if ops > 0 {
            latency_ns as f64 / ops as f64 / 1e6
        } else {
            0.0
        },
    )
}

/// The read row of the device `file` lives on.
fn read_row(summary: &WindowSummary, file: &ScratchFile) -> StorageOperationSummary {
    let (major, minor) = file.device();
    let device = summary
        .storage
        .devices
        .iter()
        .find(|d| (d.major, d.minor) == (major, minor))
        .unwrap_or_else(|| {
            panic!(
                "device {major}:{minor} missing from {:?}",
                summary.storage.devices
            )
        });
    device
        .operations
        .iter()
        .find(|o| o.operation == "read")
        .expect("read row")
        .clone()
}

#[test]
fn direct_reads_are_counted_exactly_and_timed_like_the_caller_sees_them() {
    if !root_or_skip("direct_reads_are_counted_exactly") {
        return;
    }
    // Probes first: loading them also makes this the only test doing I/O, and writing the
    // scratch file is I/O of this process too.
    let probes = load_probes();
    let file = ScratchFile::create(64 << 20);
    let missed_before = missed_events(&probes);
    let disk_before = disk_completions(&file);
    let before = probes.snapshot().unwrap();
    const READS: usize = 500;
    let timings = direct_io(&file, READS, false);
    let (delta, summary) = window_since(&probes, &before, Duration::from_secs(1));
    // On BTF raw tracepoints none; on classic ones each read whose queue or completion event
    // was skipped (and reported) may be missing from the counts below, never more. Nor a read
    // the kernel completed without firing the tracepoint at all (counted independently).
    let missed = block_events_missed(&probes, &missed_before) as usize
        + completions_never_traced(&file, disk_before, &delta, IoOperation::Read) as usize;
    let expected = READS.saturating_sub(missed);

    let (ops, bytes, kernel_mean_ms) = charged_to_me(&delta, IoOperation::Read);
    // Exactly our reads; a filesystem metadata read (extent lookup) issued in our context
    // would be ours too, hence the small allowance above, never below.
    assert!(
        (expected as u64..=READS as u64 + 4).contains(&ops),
        "{ops} reads charged to this process, {READS} issued, {missed} block events missed or never traced; this process's entries: {:?}; device counters: {:?}",
        delta
            .process_io
            .iter()
            .filter(|(k, _)| k.tgid == std::process::id())
            .collect::<Vec<_>>(),
        delta.storage_counters
    );
    assert_eq!(bytes % BLOCK as u64, 0);
    assert!(
        (expected * BLOCK) as u64 <= bytes && bytes <= ((READS + 4) * BLOCK) as u64,
        "{bytes} bytes charged to this process, {} issued",
        READS * BLOCK
    );

    // The kernel's queued->complete time is part of each pread: never longer than what the
    // caller measured around the syscall, and most of it (the rest is syscall entry, page
    // pinning and the wake-up after the interrupt).
    let user_mean_ms = mean(&timings);
    assert!(
        kernel_mean_ms <= user_mean_ms,
        "kernel mean {kernel_mean_ms:.3} ms > caller's {user_mean_ms:.3} ms"
    );
    assert!(
        kernel_mean_ms >= 0.3 * user_mean_ms,
        "kernel mean {kernel_mean_ms:.3} ms, caller's {user_mean_ms:.3} ms"
    );

    // The device the file lives on reports at least these reads, with quantiles.
    let reads = read_row(&summary, &file);
    assert!(reads.ops >= expected as u64);
    assert!(reads.bytes >= (expected * BLOCK) as u64);
    let p50 = reads.latency.p50_ms.expect("read p50");
    let device_p50 = reads.device_latency.p50_ms.expect("device read p50");
    assert!(
        device_p50 <= p50 * 1.0625,
        "device-only p50 {device_p50} above queued p50 {p50}"
    );
    let mut sorted = timings.clone();
    sorted.sort();
    let user_p50_ms = sorted[sorted.len() / 2].as_secs_f64() * 1e3;
    assert!(
        p50 <= user_p50_ms * 1.0625,
        "kernel p50 {p50} ms above the caller's {user_p50_ms} ms"
    );

    // The process table names us.
    let me = summary
        .storage
        .processes
        .iter()
        .find(|p| p.pid == std::process::id())
        .expect("this process listed");
    assert!(
        ((expected * BLOCK) as u64..=(READS * BLOCK) as u64).contains(&me.read_bytes),
        "{} bytes read by this process, {} issued, {missed} block events missed",
        me.read_bytes,
        READS * BLOCK
    );
}

/// Events the probes skipped so far (the kernel's recursion_misses), per probe.
fn missed_events(probes: &envelope::kernel::probes::KernelProbes) -> Vec<(String, u64)> {
    probes
        .statuses()
        .into_iter()
        .map(|status| (status.tracepoint, status.missed_events))
        .collect()
}
/// Events the block probes skipped since `before` (a `missed_events` reading): none on BTF
/// raw tracepoints, and on classic ones each is reported, so a count may be short by it.
fn block_events_missed(
    probes: &envelope::kernel::probes::KernelProbes,
    before: &[(String, u64)],
) -> u64 {
    missed_events(probes)
        .iter()
        .zip(before)
        .filter(|((name, _), _)| name.starts_with("block:"))
        .map(|((_, after), (_, before))| after - before)
        .sum()
}

/// (reads, writes) the kernel's own accounting counts as completed on the device `file` lives
/// on (/sys/dev/block/M:m/stat), independent of any tracepoint.
fn disk_completions(file: &ScratchFile) -> (u64, u64) {
    let (major, minor) = file.device();
    let stat =
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).unwrap_or_default();
    let fields: Vec<u64> = stat
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    (
        fields.first().copied().unwrap_or(0),
        fields.get(4).copied().unwrap_or(0),
    )
}

/// Completions of `operation` on the device that the kernel counted but the block_rq_complete
/// tracepoint never delivered to any probe (the skip the ignored QD32 test documents), in a
/// window that started with `disk_before` (a `disk_completions` reading).
fn completions_never_traced(
    file: &ScratchFile,
    disk_before: (u64, u64),
    delta: &envelope::model::KernelSnapshot,
    operation: IoOperation,
) -> u64 {
    let disk_after = disk_completions(file);
    let counted = match operation {
        IoOperation::Read => disk_after.0 - disk_before.0,
        _ => disk_after.1 - disk_before.1,
    };
    let (major, minor) = file.device();
    let seen: u64 = delta
        .storage_counters
        .iter()
        .filter(|(key, _)| {
            agent_common::storage::split_dev(key.dev) == (major, minor)
                && key.operation == operation as u8
        })
        .map(|(_, counters)| counters.completed_requests)
        .sum();
    counted.saturating_sub(seen)
}

/// What one window of queue-depth-32 reads beside TCP traffic showed.
struct DepthWindow {
    reads: u64,
    delta: envelope::model::KernelSnapshot,
    /// The kernel's own count of reads completed on the device in the window
    /// (/sys/dev/block/M:m/stat), independent of any tracepoint.
    disk_reads: u64,
}

/// 32 threads of 4 KiB random direct reads (queue depth 32), each in its own part of the file
/// (two reads of one sector in flight at once would be one request to the probes), while TCP
/// ping-pong on loopback keeps the network and scheduler probes busy on the same CPUs.
/// Asserts that no probe missed an event. None when the probes are not all BTF raw
/// tracepoints (printed).
fn reads_at_queue_depth_32(test: &str) -> Option<DepthWindow> {
    if !root_or_skip(test) {
        return None;
    }
    let probes = load_probes();
    let classic: Vec<String> = probes
        .statuses()
        .into_iter()
        .filter(|s| s.kind != envelope::kernel::probes::ProbeKind::Btf)
        .map(|s| s.tracepoint)
        .collect();
    if !classic.is_empty() {
        eprintln!(
            "skipped {test}: classic tracepoints ({}) miss events by design (and report them); \
             this test is about the BTF probes (kernel without BTF, or ENVELOPE_PROBES=tracepoint)",
            classic.join(", ")
        );
        return None;
    }
    let file = ScratchFile::create(64 << 20);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let address = listener.local_addr().unwrap();
            let echo = std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let mut buffer = [0u8; 64];
                while stream.read_exact(&mut buffer).is_ok() {
                    if stream.write_all(&buffer).is_err() {
                        break;
                    }
                }
            });
            let mut client = std::net::TcpStream::connect(address).unwrap();
            client.set_nodelay(true).unwrap();
            let mut buffer = [7u8; 64];
            let mut round_trips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.write_all(&buffer).unwrap();
                client.read_exact(&mut buffer).unwrap();
                round_trips += 1;
            }
            drop(client);
            echo.join().unwrap();
            round_trips
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let missed_before = missed_events(&probes);
    let (major, minor) = file.device();
    let disk_reads = || -> u64 {
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat"))
            .ok()
            .and_then(|stat| stat.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    const THREADS: usize = 32;
    const READS_PER_THREAD: usize = 400;
    let blocks_per_thread = (64 << 20) / BLOCK / THREADS;
    // The readers start, open the file and wait; the window covers only their reads.
    let start = std::sync::Barrier::new(THREADS + 1);
    let done = std::sync::Barrier::new(THREADS + 1);
    let mut window = None;
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (file, start, done) = (&file, &start, &done);
            let blocks = thread * blocks_per_thread..(thread + 1) * blocks_per_thread;
            scope.spawn(move || {
                let handle = open_direct(file, false);
                start.wait();
                direct_io_with(
                    &handle,
                    READS_PER_THREAD,
                    false,
                    blocks,
                    0x5EED + thread as u64,
                );
                done.wait();
            });
        }
        let disk_before = disk_reads();
        let before = probes.snapshot().unwrap();
        start.wait();
        done.wait();
        let (delta, _) = window_since(&probes, &before, Duration::from_secs(1));
        window = Some((delta, disk_reads() - disk_before));
    });
    let (delta, disk_reads) = window.unwrap();
    let missed_after = missed_events(&probes);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let round_trips = traffic.join().unwrap();
    assert!(
        round_trips > 1000,
        "only {round_trips} TCP round trips beside the reads"
    );
    let missed: Vec<(String, u64)> = missed_after
        .iter()
        .zip(&missed_before)
        .map(|((name, after), (_, before))| (name.clone(), after - before))
        .filter(|(_, count)| *count > 0)
        .collect();
    assert!(missed.is_empty(), "probes missed events: {missed:?}");
    Some(DepthWindow {
        reads: (THREADS * READS_PER_THREAD) as u64,
        delta,
        disk_reads,
    })
}

/// On classic tracepoints a block completion arriving while another probe ran on its CPU was
/// skipped (22 to 614 of these 12,800 reads, reported as missed events); BTF raw tracepoints
/// guard recursion per program, so no probe misses one. What the probes saw is consistent:
/// every read completion they saw was timed and charged to its submitter, 4 KiB each.
#[test]
fn no_probe_misses_events_at_queue_depth_32_beside_tcp_traffic() {
    let Some(window) = reads_at_queue_depth_32("no_probe_misses_events_at_queue_depth_32") else {
        return;
    };
    let (ops, bytes, _) = charged_to_me(&window.delta, IoOperation::Read);
    let seen: StorageCounters = window
        .delta
        .storage_counters
        .iter()
        .filter(|(key, _)| key.operation == IoOperation::Read as u8)
        .fold(StorageCounters::default(), |mut total, (_, counters)| {
            total.completed_requests += counters.completed_requests;
            total.untimed_completions += counters.untimed_completions;
            total
        });
    assert_eq!(bytes, ops * BLOCK as u64, "{ops} reads charged");
    assert!(
        ops <= window.reads + 4,
        "{ops} reads charged, {} issued",
        window.reads
    );
    // Every read completion the tracepoint delivered was matched to its start and charged to
    // the process that queued it (this one, or another reader on the machine). One may be
    // untimed: where no BPF program runs for a block_bio_queue, as for some block_rq_complete
    // on the test VM (see the ignored test below), that read's completion has no start to match.
    let charged_to_anyone: u64 = window
        .delta
        .process_io
        .iter()
        .filter(|(key, _)| key.operation == IoOperation::Read as u8)
        .map(|(_, stats)| stats.completed_requests)
        .sum();
    assert_eq!(
        charged_to_anyone + seen.untimed_completions,
        seen.completed_requests,
        "read completions seen and charged disagree"
    );
    assert!(
        seen.untimed_completions <= 1,
        "{} of {} read completions untimed; {ops} charged to this process",
        seen.untimed_completions,
        seen.completed_requests
    );
    assert!(ops > 0);
}

/// Every read issued is seen, byte for byte. Not in CI: on the 6.18.44 Firecracker VM this
/// project runs on, about 1 window in 10 no BPF program runs for 3 to 770 of the 12,800
/// completions that /sys/block/vda/stat counts. ftrace records every one of them
/// (`events/block/block_rq_complete`, same count as the disk stats), and each missed one was
/// completed in a soft interrupt on top of one of the sandbox's own processes (its init,
/// `/process_api`, pid 1, or the command backend `memfd:sealed-*`). For those, envelope's BTF
/// and classic programs and a bpftrace one all stay silent, and none counts a recursion miss
/// (run counts with kernel.bpf_stats_enabled=1 fall short by the same number). It is a
/// property of this VM, not of the probes.
/// Run it with `cargo test -p integration-tests --test storage -- --ignored`.
#[test]
#[ignore = "on the test VM no BPF program runs for some completions (see the doc comment)"]
fn every_read_at_queue_depth_32_is_seen_byte_for_byte() {
    let Some(window) = reads_at_queue_depth_32("every_read_at_queue_depth_32_is_seen") else {
        return;
    };
    let (ops, bytes, _) = charged_to_me(&window.delta, IoOperation::Read);
    assert!(
        (window.reads..=window.reads + 4).contains(&ops),
        "{ops} reads charged to this process, {} issued, {} completed per the kernel's disk stats",
        window.reads,
        window.disk_reads
    );
    assert_eq!(bytes, ops * BLOCK as u64);
}

#[test]
fn direct_writes_are_counted_as_writes() {
    if !root_or_skip("direct_writes_are_counted_as_writes") {
        return;
    }
    // Probes first: loading them also makes this the only test doing I/O, and writing the
    // scratch file is I/O of this process too.
    let probes = load_probes();
    let file = ScratchFile::create(16 << 20);
    let missed_before = missed_events(&probes);
    let disk_before = disk_completions(&file);
    let before = probes.snapshot().unwrap();
    const WRITES: usize = 200;
    direct_io(&file, WRITES, true);
    let (delta, _) = window_since(&probes, &before, Duration::from_secs(1));
    let (ops, bytes, mean_ms) = charged_to_me(&delta, IoOperation::Write);
    // Exact on BTF raw tracepoints; on classic ones short by at most the events they
    // reported missing, and by writes the kernel completed without firing the tracepoint.
    let missed = block_events_missed(&probes, &missed_before)
        + completions_never_traced(&file, disk_before, &delta, IoOperation::Write);
    let expected = (WRITES as u64).saturating_sub(missed);
    assert!(
        (expected..=WRITES as u64).contains(&ops),
        "{ops} writes charged, {WRITES} issued, {missed} block events missed or never traced"
    );
    assert_eq!(bytes, ops * BLOCK as u64);
    assert!(mean_ms > 0.0);
    let (reads, _, _) = charged_to_me(&delta, IoOperation::Read);
    assert_eq!(reads, 0, "overwrites of written blocks read nothing");
}

/// fio's executable, the libraries it links and the files it reads as it starts and ends,
/// locked in memory for the rest of the test process (about 80 MB). A page of them missing
/// from the page cache inside a measured window is read from the disk under test and charged
/// to fio beside its reads: a fresh-clone CI run charged fio one 8 KiB read beside its 4 KiB
/// ones. Reading the files in first is not enough on the test VM, which evicts page cache
/// with 20 GB free (a page of a library read whole was gone 20 s later): fio then read 4 to
/// 28 KiB of its libraries in 5 of 10 runs of the large-read test, and with those locked, a
/// block of `/etc/ld.so.cache` in 3 of 10 (found with bpftrace on
/// `filemap:mm_filemap_add_to_page_cache`, as were the other two files listed). Locked pages
/// stay. Where locking fails (no CAP_IPC_LOCK), says so and goes on with the pages read in.
fn fio_in_memory() {
    static LOCKED: std::sync::Once = std::sync::Once::new();
    LOCKED.call_once(|| {
        let found = Command::new("sh").args(["-c", "command -v fio"]).output();
        let Some(fio) = found
            .ok()
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
            .filter(|path| path.starts_with('/'))
        else {
            return;
        };
        let linked = Command::new("ldd").arg(&fio).output();
        let libraries = linked
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default();
        let read_by_fio = ["/etc/ld.so.cache", "/etc/locale.alias", "/etc/localtime"];
        let paths: Vec<String> = std::iter::once(fio)
            .chain(read_by_fio.map(str::to_string))
            .chain(
                libraries
                    .lines()
                    .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')))
                    .map(str::to_string),
            )
            .collect();
        for path in paths {
            if let Err(why) = lock_in_memory(&path) {
                eprintln!("note: {path} is read in but not locked in memory ({why})");
                let _ = std::fs::read(&path);
            }
        }
    });
}

/// Maps the file at `path` and locks its pages in memory for the rest of the process; a
/// file that is not there is nothing to lock.
fn lock_in_memory(path: &str) -> std::io::Result<()> {
    let file = match std::fs::File::open(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        opened => opened?,
    };
    let length = file.metadata()?.len() as usize;
    if length == 0 {
        return Ok(());
    }
    // SAFETY: a read-only shared mapping of a file opened here, never unmapped: the pages
    // stay locked until the process exits, and nothing reads through the pointer.
    unsafe {
        let address = libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        );
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        if libc::mlock(address, length) != 0 {
            let error = std::io::Error::last_os_error();
            libc::munmap(address, length);
            return Err(error);
        }
    }
    Ok(())
}

/// fio on `file` with `args`, its JSON report on stdout. --thread: the reads come from fio's
/// own process, the one spawned here, so they are charged to its pid.
fn spawn_fio(file: &ScratchFile, args: &[&str]) -> std::process::Child {
    fio_in_memory();
    Command::new("fio")
        .args(args)
        .args(["--thread", "--output-format=json"])
        .arg(format!("--filename={}", file.path.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fio")
}

/// fio's `figure` ("clat_ns": completion, "lat_ns": total) at `percentile` ("95.000000"), in
/// milliseconds, from its read figures `read` (`--output-format=json`).
fn fio_percentile_ms(read: &serde_json::Value, figure: &str, percentile: &str) -> f64 {
    read[figure]["percentile"][percentile]
        .as_f64()
        .expect("fio percentile")
        / 1e6
}

/// Asserts that each of envelope's read latency quantiles named in `bounds` ("P50", "P95",
/// "P99") lies within its fractions below and above fio's completion-latency percentile of
/// the same rank (`read`: fio's read figures).
fn assert_percentiles_near_fio(
    label: &str,
    reads: &StorageOperationSummary,
    read: &serde_json::Value,
    bounds: &[(&str, f64, f64)],
) {
    for &(name, below, above) in bounds {
        let (envelope_ms, percentile) = match name {
            "P50" => (reads.latency.p50_ms, "50.000000"),
            "P95" => (reads.latency.p95_ms, "95.000000"),
            _ => (reads.latency.p99_ms, "99.000000"),
        };
        let envelope_ms = envelope_ms.expect("read latency quantile");
        let fio_ms = fio_percentile_ms(read, "clat_ns", percentile);
        let error = (envelope_ms - fio_ms) / fio_ms;
        assert!(
            (-below..=above).contains(&error),
            "{label} {name} differs by {:+.1}% (allowed -{:.0}% to +{:.0}%): envelope \
             {envelope_ms:.3} ms, fio {fio_ms:.3} ms",
            error * 100.0,
            below * 100.0,
            above * 100.0
        );
    }
}

/// The read figures of fio's first job (`--output-format=json`), after checking it succeeded.
fn fio_reads(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("fio JSON");
    report["jobs"][0]["read"].clone()
}

/// The acceptance check: under a saturating random-read load, the device P95 agrees with
/// fio's own completion-latency P95. 512 KiB blocks keep the load device-bound (on a small VM,
/// 4 KiB reads make fio CPU-bound, and its figures then include its own reaping delays) and
/// are never split into two requests (1 MiB ones can be, when the buffer is fragmented).
#[test]
fn p95_agrees_with_fio_under_saturating_random_reads() {
    if !root_or_skip("p95_agrees_with_fio") || !tool_or_skip("p95_agrees_with_fio", "fio") {
        return;
    }
    // Probes first: loading them also makes this the only test doing I/O, and writing the
    // scratch file is I/O of this process too.
    let probes = load_probes();
    let file = ScratchFile::create(1 << 30);
    let before = probes.snapshot().unwrap();
    let started = Instant::now();
    // Without fio's map of blocks read: at the end of each pass over the file it would wait
    // for all reads in flight at once and stamp them with the last one's completion (see the
    // large-read test). spawn_fio locks its code in memory: its page faults add no reads.
    let output = spawn_fio(
        &file,
        &[
            "--name=envelope-test",
            "--rw=randread",
            "--norandommap",
            "--bs=512k",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=32",
            "--runtime=6",
            "--time_based",
        ],
    )
    .wait_with_output()
    .expect("run fio");
    let (_, summary) = window_since(&probes, &before, started.elapsed());
    let read = &fio_reads(&output);
    let fio_p95_ms = fio_percentile_ms(read, "clat_ns", "95.000000");
    let fio_ios = read["total_ios"].as_u64().expect("fio total_ios");

    let reads = read_row(&summary, &file);
    let envelope_p95_ms = reads.latency.p95_ms.expect("p95");
    eprintln!(
        "fio: {fio_ios} reads, clat P95 {fio_p95_ms:.3} ms; envelope: {} reads, P95 {envelope_p95_ms:.3} ms (device only {:?} ms)",
        reads.ops, reads.device_latency.p95_ms
    );
    // Requests, not application reads: two adjacent reads in flight can merge into one
    // request, so envelope may count slightly fewer.
    assert!(
        reads.ops as f64 >= fio_ios as f64 * 0.9,
        "envelope saw {} read requests, fio issued {fio_ios} reads",
        reads.ops
    );
    let error = (envelope_p95_ms - fio_p95_ms).abs() / fio_p95_ms;
    assert!(
        error <= 0.10,
        "P95 differs by {:.1}%: envelope {envelope_p95_ms:.3} ms, fio {fio_p95_ms:.3} ms",
        error * 100.0
    );
}

/// What the probes charged to process `pid` for `operation` on `device` (ops, bytes).
fn charged_to(
    delta: &envelope::model::KernelSnapshot,
    pid: u32,
    device: (u32, u32),
    operation: IoOperation,
) -> (u64, u64) {
    delta
        .process_io
        .iter()
        .filter(|(key, _)| {
            key.tgid == pid
                && key.operation == operation as u8
                && agent_common::storage::split_dev(key.dev) == device
        })
        .fold((0, 0), |(ops, bytes), (_, stats)| {
            (
                ops + stats.completed_requests,
                bytes + stats.completed_bytes,
            )
        })
}

/// Whether every block probe runs as a BTF raw tracepoint (the only kind that can follow an
/// application I/O through splits and merges); prints why not.
fn block_probes_are_btf(probes: &envelope::kernel::probes::KernelProbes, test: &str) -> bool {
    let classic: Vec<String> = probes
        .statuses()
        .into_iter()
        .filter(|s| {
            s.tracepoint.starts_with("block:") && s.kind != envelope::kernel::probes::ProbeKind::Btf
        })
        .map(|s| s.tracepoint)
        .collect();
    if !classic.is_empty() {
        eprintln!(
            "skipped {test}: the block probes are classic tracepoints ({}), which time device \
             requests, not the application's I/Os (kernel without BTF, or ENVELOPE_PROBES=tracepoint)",
            classic.join(", ")
        );
    }
    classic.is_empty()
}

/// A setting of a disk's request queue (a file in its `queue` folder in sysfs) changed while
/// this lives; the old value is put back when dropped.
struct DiskQueueSetting {
    path: std::path::PathBuf,
    previous: String,
}

/// The `queue` folder in sysfs of the whole disk `device` (major, minor) is, or is a
/// partition of.
fn disk_queue(device: (u32, u32)) -> std::path::PathBuf {
    let node = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", device.0, device.1))
        .expect("device in sysfs");
    let disk = if node.join("partition").exists() {
        node.parent().expect("partition's disk").to_path_buf()
    } else {
        node
    };
    disk.join("queue")
}

impl DiskQueueSetting {
    /// Writes `value` to `name` for the whole disk `device` (major, minor) is, or is a
    /// partition of.
    fn set(device: (u32, u32), name: &str, value: &str) -> Self {
        let path = disk_queue(device).join(name);
        let previous = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
        std::fs::write(&path, value)
            .unwrap_or_else(|error| panic!("write {value} to {}: {error}", path.display()));
        Self { path, previous }
    }

    /// Lowers the disk's largest request to `kib`.
    fn max_request_kib(device: (u32, u32), kib: u32) -> Self {
        Self::set(device, "max_sectors_kb", &kib.to_string())
    }

    /// No bio joins another in one request (`nomerges` 2): each request then holds the bios
    /// of one I/O only.
    fn no_merges(device: (u32, u32)) -> Self {
        Self::set(device, "nomerges", "2")
    }
}

impl Drop for DiskQueueSetting {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.previous.trim());
    }
}

/// Large direct reads reach the device as several requests when they exceed its limits
/// (here `max_sectors_kb` is lowered to a quarter of the read: four requests each), and a
/// read larger than one bio holds (256 pages, the 4 MiB reads) is queued as several bios. The
/// application waits for its whole read: each read fio issued is one sample, timed from its
/// first bio queued to its last part completed, and charged to fio once with its full size;
/// nothing is charged to "no submitting process". fio's own completion percentiles are the
/// reference. fio issues a fixed number of reads, and the reads charged to it equal them,
/// each with its whole size, less one for each request that completed where no BPF program
/// runs on the test VM (see `every_read_at_queue_depth_32_is_seen_byte_for_byte`); merges are
/// off, so that a request holds one read's bios.
#[test]
fn large_reads_are_timed_and_charged_as_the_application_issued_them() {
    const TEST: &str = "large_reads_are_timed_and_charged_as_the_application_issued_them";
    if !root_or_skip(TEST) || !tool_or_skip(TEST, "fio") {
        return;
    }
    let probes = load_probes();
    if !block_probes_are_btf(&probes, TEST) {
        return;
    }
    let file = ScratchFile::create(1 << 30);
    let device = file.device();
    let nr_requests: u64 = std::fs::read_to_string(disk_queue(device).join("nr_requests"))
        .expect("read nr_requests")
        .trim()
        .parse()
        .expect("nr_requests is a number");
    let fio = |block_size: &str, in_flight: u64, extra: &[&str]| {
        let iodepth = format!("--iodepth={in_flight}");
        let bs = format!("--bs={block_size}");
        // Reads only, as randrw at 100% reads: unlike randread, fio then fills its buffers
        // before the first read. A buffer's first read otherwise faults its pages in while
        // the kernel pins them, bio by bio: 8 to 64 ms for 4 MiB on the test VM (one slow
        // io_submit per buffer, none with the buffers filled): time fio counts as the read's
        // and that is not storage time (in a fresh-clone CI run, fio's P99 4 MiB reads). It
        // can also let the read's first bios complete before its next is queued (two
        // samples, README blind spots).
        // --norandommap: with its map of blocks read, fio reaches the end of the file every
        // pass (256 reads of 4 MiB, 0.8 s) and then waits for every read in flight at once,
        // stamping all of them with the last one's completion: 15 reads a pass, up to 45 ms
        // late by fio's clock (envelope's per-read times beside fio's per-read log: the same
        // start, envelope's end earlier, by 3 ms more for each earlier completion). Over
        // 8 GiB that was 6% of the reads, and fio's P99 read up to 17% above envelope's.
        let mut args = vec!["--name=envelope-large-reads", "--direct=1"];
        args.extend(["--rw=randrw", "--rwmixread=100", "--norandommap"]);
        args.extend(["--ioengine=libaio", &iodepth, &bs]);
        args.extend(extra);
        spawn_fio(&file, &args)
    };
    // A first short run outside the window: what fio reads besides its code and libraries
    // (locked in memory by `fio_in_memory`) is then in the page cache as well.
    let warm_up = fio("1m", 32, &["--io_size=8m"])
        .wait_with_output()
        .expect("fio warm-up");
    assert!(warm_up.status.success(), "fio warm-up failed");
    // The largest request lowered so that every read is split: 1 MiB reads in four requests
    // of 256 KiB, 4 MiB reads in about eight. A 4 MiB read is queued as one to four bios (a
    // bio holds 256 runs of contiguous pages: 1 MiB of scattered pages, up to 3 MB seen), and
    // a bio of more runs than one virtio-blk request takes (254) is cut in two whatever the
    // size limit. Both keep about 128 requests in flight (fio's queue
    // depth, the third number), half the requests the device's scheduler hands out
    // (`nr_requests`, 256). At 32 reads of 4 MiB they were all taken: the submitter then
    // slept for one before queueing its next reads' bios, time fio counts and the block
    // layer cannot see (README, blind spots), and a fresh-clone CI run read P95 10.5% below
    // fio's.
    for (block_size, read_bytes, in_flight, max_request_kib) in
        [("1m", 1u64 << 20, 32, 256), ("4m", 4 << 20, 16, 1024)]
    {
        let _limit = DiskQueueSetting::max_request_kib(device, max_request_kib);
        // Merges are common here (1,271 in one run of both phases), and one may join the end
        // of one read to the start of the next: such a request, completed where no probe
        // runs, would leave two reads unfinished where the count below allows one (see the
        // extents test).
        let _no_merges = DiskQueueSetting::no_merges(device);
        let disk_before = disk_completions(&file);
        let before = probes.snapshot().unwrap();
        let started = Instant::now();
        // 8 GiB: about 8 s on the test VM, 8,192 and 2,048 reads (20 beyond the 4 MiB P99). A
        // fixed amount rather than a time, so that fio counts every read it issued.
        let child = fio(block_size, in_flight, &["--io_size=8g"]);
        let fio_pid = child.id();
        let output = child.wait_with_output().expect("fio output");
        let (delta, summary) = window_since(&probes, &before, started.elapsed());
        let read = &fio_reads(&output);
        let fio_ios = read["total_ios"].as_u64().expect("fio total_ios");
        let fio_bytes = read["io_bytes"].as_u64().expect("fio io_bytes");
        let fio_ms = |percentile: &str| fio_percentile_ms(read, "clat_ns", percentile);

        let (ops, bytes) = charged_to(&delta, fio_pid, device, IoOperation::Read);
        // Each request completed where no probe saw it (the disk's own count against the
        // probes') leaves at most one read unfinished, never charged.
        let never_traced = completions_never_traced(&file, disk_before, &delta, IoOperation::Read);
        let reads = read_row(&summary, &file);
        // Exact means, fio's reads only on both sides (the percentiles are the device's).
        let fio_mean_ms = read["clat_ns"]["mean"].as_f64().expect("fio mean") / 1e6;
        let charged_latency_ns: u64 = delta
            .process_io
            .iter()
            .filter(|(key, _)| key.tgid == fio_pid && key.operation == IoOperation::Read as u8)
            .map(|(_, stats)| stats.latency_sum_ns)
            .sum();
        let mean_ms = charged_latency_ns as f64 / ops.max(1) as f64 / 1e6;
        eprintln!(
            "{block_size}: fio {fio_ios} reads, {fio_bytes} bytes, P50/P95/P99 \
             {:.2}/{:.2}/{:.2} ms, mean {fio_mean_ms:.2} ms; envelope: {ops} reads, {bytes} \
             bytes charged to fio, mean {mean_ms:.2} ms, {} device requests ({never_traced} \
             never traced), P50/P95/P99 {:?}/{:?}/{:?} ms",
            fio_ms("50.000000"),
            fio_ms("95.000000"),
            fio_ms("99.000000"),
            reads.ops,
            reads.latency.p50_ms,
            reads.latency.p95_ms,
            reads.latency.p99_ms,
        );
        // Every read was split (fewer requests where adjacent parts merged), and the parts
        // joined again.
        assert!(
            reads.ops >= ops * 3,
            "{} device requests for {ops} reads of {block_size} charged: were they not split?",
            reads.ops
        );
        // The condition the comparison with fio rests on: requests enough for every read in
        // flight, so that no submitter waits for one out of the block layer's sight. Three
        // quarters of them at most: the count is an average, and 32 reads of 4 MiB, 232 of 256
        // on average, ran the device out.
        let requests_per_read = reads.ops as f64 / ops.max(1) as f64;
        assert!(
            requests_per_read * in_flight as f64 <= nr_requests as f64 * 0.75,
            "{requests_per_read:.1} requests per {block_size} read at queue depth {in_flight} \
             take more than the device's {nr_requests} requests: lower the test's queue depth"
        );
        assert_eq!(
            fio_ios,
            (8u64 << 30) / read_bytes,
            "fio's reads of {block_size}"
        );
        // Each request no probe saw complete leaves at most one read unfinished, never
        // charged. Nothing else: neither a read counted twice nor anything fio read through
        // the page cache (its code is locked in memory first, see `fio_in_memory`).
        let lost = never_traced.min(fio_ios);
        assert!(
            (fio_ios - lost..=fio_ios).contains(&ops),
            "{ops} reads of {block_size} charged to fio (pid {fio_pid}), fio issued {fio_ios}, \
             {never_traced} completions never traced"
        );
        assert_eq!(
            bytes,
            ops * read_bytes,
            "{ops} reads of {block_size} charged to fio, fio read {fio_bytes} bytes"
        );
        let unattributed: Vec<_> = delta
            .process_io
            .iter()
            .filter(|(key, stats)| key.tgid == 0 && stats.completed_requests > 0)
            .collect();
        assert!(
            unattributed.is_empty(),
            "charged to no submitting process: {unattributed:?}"
        );
        assert_percentiles_near_fio(
            block_size,
            &reads,
            read,
            &[
                ("P50", 0.10, 0.10),
                ("P95", 0.10, 0.10),
                ("P99", 0.10, 0.10),
            ],
        );
    }
}

/// A 16 MiB file whose second half lies elsewhere on the disk than its first, and the first
/// block of the second half; None (printed) where the file system cannot move a file's blocks
/// (the test is for ext4). The second half's blocks are swapped with another file's
/// (`EXT4_IOC_MOVE_EXT`, what e4defrag uses): a file system allocating a new file places it
/// as it sees fit, often in one piece.
fn file_in_two_places(test: &str) -> Option<(ScratchFile, usize)> {
    #[repr(C)]
    struct MoveExtent {
        reserved: u32,
        donor_fd: u32,
        orig_start: u64,
        donor_start: u64,
        len: u64,
        moved_len: u64,
    }
    const EXT4_IOC_MOVE_EXT: libc::c_ulong = 0xC028_660F;
    const HALF_BLOCKS: usize = (8 << 20) / BLOCK;
    let file = ScratchFile::create(16 << 20);
    let donor = ScratchFile::create(8 << 20);
    let open = |file: &ScratchFile| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file.path)
            .expect("open scratch file")
    };
    let (original, donor_file) = (open(&file), open(&donor));
    // Out of the page cache first: with the freshly written pages cached, ext4 refused
    // (EBUSY).
    for handle in [&original, &donor_file] {
        // SAFETY: plain system call on an open file.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(handle),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
    let mut request = MoveExtent {
        reserved: 0,
        donor_fd: std::os::fd::AsRawFd::as_raw_fd(&donor_file) as u32,
        orig_start: HALF_BLOCKS as u64,
        donor_start: 0,
        len: HALF_BLOCKS as u64,
        moved_len: 0,
    };
    // SAFETY: EXT4_IOC_MOVE_EXT with a struct move_extent, both files open read-write.
    let result = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&original),
            EXT4_IOC_MOVE_EXT,
            &raw mut request,
        )
    };
    if result != 0 {
        eprintln!(
            "skipped {test}: cannot move the scratch file's blocks (EXT4_IOC_MOVE_EXT: {}; \
             the test needs ext4)",
            std::io::Error::last_os_error()
        );
        return None;
    }
    assert_eq!(request.moved_len, HALF_BLOCKS as u64, "blocks moved");
    drop((original, donor_file, donor));
    let sectors = block_sectors(&file);
    let step = (BLOCK >> 9) as u64;
    assert_ne!(
        sectors[HALF_BLOCKS],
        sectors[HALF_BLOCKS - 1] + step,
        "the moved half follows the first on the disk"
    );
    Some((file, HALF_BLOCKS))
}

/// A direct read spanning two extents of its file is queued as bios that do not follow on
/// on the disk (here a first one of 16 KiB, the rest elsewhere): each read fio issued is
/// still one sample with its whole size. fio reads one 2 MiB block across the jump, 4,096
/// times at queue depth 16; counts, bytes and completion percentiles against fio's.
///
/// 4,096 reads, because fio ends a job by waiting for all its reads in flight at once and
/// stamps them with the last one's completion: up to 15 reads late by up to a read's time.
/// Of 512 reads that was 3% of the samples, and a fresh-clone CI run read fio's P95 11.6%
/// above envelope's (the P50s 0.1% apart); of 4,096, under 0.4%.
#[test]
fn a_read_spanning_two_extents_of_its_file_is_one_sample() {
    const TEST: &str = "a_read_spanning_two_extents_of_its_file_is_one_sample";
    const READ_BYTES: u64 = 2 << 20;
    const READS: u64 = 4096;
    if !root_or_skip(TEST) || !tool_or_skip(TEST, "fio") {
        return;
    }
    let probes = load_probes();
    if !block_probes_are_btf(&probes, TEST) {
        return;
    }
    let Some((file, jump)) = file_in_two_places(TEST) else {
        return;
    };
    let offset = format!("--offset={}", (jump - 4) * BLOCK);
    let fio = |reads: u64| {
        let io_size = format!("--io_size={}", reads * READ_BYTES);
        let mut args = vec!["--name=envelope-two-extents", "--direct=1"];
        // Buffers filled before the first read, and no end of the region that fio waits at
        // (see the large-read test): every read at the one offset, 16 in flight.
        args.extend(["--rw=randrw", "--rwmixread=100", "--norandommap"]);
        args.push("--ioengine=libaio");
        args.extend(["--iodepth=16", "--bs=2m", "--size=2m", &offset, &io_size]);
        spawn_fio(&file, &args)
    };
    let warm_up = fio(16).wait_with_output().expect("fio warm-up");
    assert!(warm_up.status.success(), "fio warm-up failed");
    // Every read covers the same sectors, so one read's second bio ends where another's third
    // starts, and the block layer may merge the two into one request. A request completed
    // where no probe runs (the test VM's, see below) then leaves two reads unfinished, not
    // one: 1 run in 8 charged fio one read fewer than the count below allows. Without merges,
    // each request holds one read's bios, and 12 runs of 12 lost exactly one read per
    // completion never traced.
    let _no_merges = DiskQueueSetting::no_merges(file.device());
    let disk_before = disk_completions(&file);
    let before = probes.snapshot().unwrap();
    let started = Instant::now();
    let child = fio(READS);
    let fio_pid = child.id();
    let output = child.wait_with_output().expect("fio output");
    let (delta, summary) = window_since(&probes, &before, started.elapsed());
    let read = fio_reads(&output);
    let fio_ios = read["total_ios"].as_u64().expect("fio total_ios");
    let fio_ms = |percentile: &str| fio_percentile_ms(&read, "clat_ns", percentile);
    let (ops, bytes) = charged_to(&delta, fio_pid, file.device(), IoOperation::Read);
    let never_traced = completions_never_traced(&file, disk_before, &delta, IoOperation::Read);
    let reads = read_row(&summary, &file);
    eprintln!(
        "jump at block {jump}; fio {fio_ios} reads, P50/P95 {:.2}/{:.2} ms; envelope: {ops} \
         reads, {bytes} bytes charged to fio, {} device requests ({never_traced} never \
         traced), P50/P95 {:?}/{:?} ms",
        fio_ms("50.000000"),
        fio_ms("95.000000"),
        reads.ops,
        reads.latency.p50_ms,
        reads.latency.p95_ms,
    );
    assert_eq!(fio_ios, READS, "fio's reads");
    // Every read fio issued, less one for each completion no probe saw (the test VM's,
    // see `every_read_at_queue_depth_32_is_seen_byte_for_byte`); each whole.
    assert!(
        (fio_ios - never_traced.min(fio_ios)..=fio_ios).contains(&ops),
        "{ops} reads charged to fio (pid {fio_pid}), fio issued {fio_ios}, {never_traced} \
         completions never traced"
    );
    assert_eq!(bytes, ops * READ_BYTES, "{ops} reads charged");
    assert_percentiles_near_fio(
        "2m",
        &reads,
        &read,
        &[("P50", 0.10, 0.10), ("P95", 0.10, 0.10)],
    );
}

/// The disk sector (512 bytes) where each 4 KiB block of `file` starts, from the file
/// system's extent map (FIEMAP): what the block probes see as a request's sector.
fn block_sectors(file: &ScratchFile) -> Vec<u64> {
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Extent {
        logical: u64,
        physical: u64,
        length: u64,
        _reserved64: [u64; 2],
        flags: u32,
        _reserved: [u32; 3],
    }
    #[repr(C)]
    struct Map {
        start: u64,
        length: u64,
        flags: u32,
        mapped_extents: u32,
        extent_count: u32,
        _reserved: u32,
        extents: [Extent; 64],
    }
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_LAST: u32 = 1;
    let handle = std::fs::File::open(&file.path).expect("open scratch file");
    let size = handle.metadata().expect("stat").len();
    let mut sectors = vec![0u64; size as usize / BLOCK];
    let mut start = 0;
    loop {
        let mut map = Map {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: 64,
            _reserved: 0,
            extents: [Extent::default(); 64],
        };
        // SAFETY: FS_IOC_FIEMAP with a struct fiemap followed by room for extent_count extents.
        let result = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&handle),
                FS_IOC_FIEMAP,
                &raw mut map,
            )
        };
        assert_eq!(result, 0, "FIEMAP: {}", std::io::Error::last_os_error());
        let extents = &map.extents[..map.mapped_extents as usize];
        for extent in extents {
            for offset in (0..extent.length).step_by(BLOCK) {
                let block = ((extent.logical + offset) as usize) / BLOCK;
                if let Some(sector) = sectors.get_mut(block) {
                    *sector = (extent.physical + offset) >> 9;
                }
            }
        }
        match extents.last() {
            Some(last) if last.flags & FIEMAP_EXTENT_LAST == 0 => {
                start = last.logical + last.length
            }
            _ => break,
        }
    }
    assert!(
        sectors.iter().all(|&sector| sector != 0),
        "every block of the scratch file is mapped"
    );
    sectors
}

/// Three blocks of `file` whose requests collide in `INFLIGHT_REQUESTS`: the third's two
/// candidate slots are the first's and the second's first choices. Returns the blocks and
/// the third's two slots.
fn colliding_blocks(file: &ScratchFile) -> Option<([usize; 3], [u32; 2])> {
    use agent_common::storage::{InflightRequestKey, candidate_slots};
    let ((major, minor), start) = request_device(file)?;
    let dev = major << 20 | minor;
    let slots: Vec<[u32; 2]> = block_sectors(file)
        .into_iter()
        .map(|sector| candidate_slots(&InflightRequestKey::new(dev, start + sector)))
        .collect();
    let mut first_choice = std::collections::HashMap::new();
    for (block, [first, _]) in slots.iter().enumerate() {
        first_choice.entry(*first).or_insert(block);
    }
    let found = slots
        .iter()
        .enumerate()
        .find_map(|(third, &[a, b])| {
            let (&one, &two) = (first_choice.get(&a)?, first_choice.get(&b)?);
            (one != third && two != third && one != two).then_some(([one, two, third], [a, b]))
        })
        .expect("three colliding blocks in the scratch file");
    Some(found)
}

/// The disk whose requests carry `file`'s blocks, and where the file system starts on it
/// (sectors): the whole disk and the partition's start for a partition; None where the file
/// system is on no plain disk (a stacked device, or btrfs's anonymous device numbers).
fn request_device(file: &ScratchFile) -> Option<((u32, u32), u64)> {
    let (major, minor) = file.device();
    let node = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    if node.join("dm").exists() || node.join("md").exists() {
        return None;
    }
    if !node.join("partition").exists() {
        return Some(((major, minor), 0));
    }
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).ok();
    let start: u64 = read(node.join("start"))?.trim().parse().ok()?;
    let disk = read(node.parent()?.join("dev"))?;
    let (disk_major, disk_minor) = disk.trim().split_once(':')?;
    Some(((disk_major.parse().ok()?, disk_minor.parse().ok()?), start))
}

/// One run of `envelope diagnose` while three threads read `blocks` of `file` over and over
/// for `seconds`, once the probes are attached. Returns the agent's log lines and the
/// loaded `block_rq_issue` program's size in bytes after the verifier (bpftool).
fn diagnose_under_colliding_reads(
    file: &ScratchFile,
    blocks: [usize; 3],
    rust_log: &str,
) -> (Vec<String>, u64) {
    use std::io::BufRead as _;
    let mut agent = Command::new(integration_tests::envelope_binary())
        .args(["diagnose", "--json", "--duration", "8s"])
        .env("RUST_LOG", rust_log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start envelope");
    let (lines_sender, lines) = std::sync::mpsc::channel();
    let stderr = agent.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_sender.send(line);
        }
    });
    let mut log = Vec::new();
    while !log
        .iter()
        .any(|line: &String| line.contains("probes attached"))
    {
        log.push(
            lines
                .recv_timeout(Duration::from_secs(30))
                .expect("envelope says its probes are attached"),
        );
    }
    // The newest program named block_rq_issue* (the kernel keeps 15 characters of a name;
    // newer bpftool shows the full one from BTF): the BTF or the classic one, whichever the
    // agent attached.
    let output = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .expect("run bpftool");
    let programs: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bpftool's JSON");
    let program_bytes = programs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|program| {
            program["name"]
                .as_str()
                .is_some_and(|name| name.starts_with("block_rq_issue"))
        })
        .max_by_key(|program| program["id"].as_u64())
        .and_then(|program| program["bytes_xlated"].as_u64())
        .expect("bpftool shows the loaded block_rq_issue program");
    let handle = open_direct(file, false);
    let until = Instant::now() + Duration::from_secs(2);
    std::thread::scope(|scope| {
        for block in blocks {
            let handle = &handle;
            scope.spawn(move || {
                let mut buffer = AlignedBuffer::new(BLOCK);
                while Instant::now() < until {
                    handle
                        .read_exact_at(buffer.as_mut_slice(), (block * BLOCK) as u64)
                        .expect("pread");
                }
            });
        }
    });
    let status = agent.wait().expect("envelope exits");
    reader.join().expect("stderr reader");
    log.extend(lines.try_iter());
    assert!(
        status.code().is_some_and(|code| code == 0 || code == 3),
        "envelope: {status}\n{}",
        log.join("\n")
    );
    (log, program_bytes)
}

/// The probes' rare events reach the agent's log through aya-log, and only when asked for.
/// Three threads read blocks whose requests share two slots of the in-flight table, so the
/// third often finds both taken by live requests and evicts the older: with
/// `RUST_LOG=envelope::probes=debug` each eviction is a debug line naming the table and one of
/// those two slots. At the default level no line appears, and the verifier has removed the
/// logging branch: the loaded program is smaller than with the level on.
#[test]
fn evicted_requests_are_named_in_the_debug_log_only_when_asked() {
    if !root_or_skip("evicted_requests_are_named_in_the_debug_log_only_when_asked")
        || !tool_or_skip(
            "evicted_requests_are_named_in_the_debug_log_only_when_asked",
            "bpftool",
        )
    {
        return;
    }
    let _exclusive = integration_tests::exclusive_traffic();
    let file = ScratchFile::create(64 << 20);
    let Some((blocks, [a, b])) = colliding_blocks(&file) else {
        eprintln!(
            "skipped evicted_requests_are_named_in_the_debug_log_only_when_asked: the scratch \
             file is on no plain disk or partition, so its blocks' request sectors are unknown"
        );
        return;
    };
    let attached = "envelope::kernel::probes=debug";

    let (log, bytes_with_log) = diagnose_under_colliding_reads(
        &file,
        blocks,
        &format!("{attached},envelope::probes=debug"),
    );
    let evictions: Vec<&String> = log
        .iter()
        .filter(|line| line.contains(" evicted: "))
        .collect();
    let ours = evictions
        .iter()
        .filter(|line| {
            line.contains(&format!("INFLIGHT_REQUESTS slot {a} evicted"))
                || line.contains(&format!("INFLIGHT_REQUESTS slot {b} evicted"))
        })
        .count();
    assert!(
        ours >= 1,
        "no eviction of slot {a} or {b} in the debug log ({} others):\n{}",
        evictions.len(),
        log.join("\n")
    );
    assert!(
        evictions
            .iter()
            .all(|line| line.contains("will complete untimed")),
        "{evictions:#?}"
    );
    eprintln!("for example: {}", evictions[0]);

    let (log, bytes_without_log) = diagnose_under_colliding_reads(&file, blocks, attached);
    let evictions: Vec<&String> = log
        .iter()
        .filter(|line| line.contains(" evicted: "))
        .collect();
    assert!(
        evictions.is_empty(),
        "events at the default level: {evictions:#?}"
    );
    assert!(
        bytes_without_log < bytes_with_log,
        "the logging branch stayed in the loaded program: {bytes_without_log} bytes at the \
         default level, {bytes_with_log} with debug"
    );
    eprintln!(
        "{ours} evictions of slots {a}/{b} logged; block_rq_issue {bytes_without_log} bytes \
         loaded at the default level, {bytes_with_log} with debug"
    );
}

/// One window of batched sequential 4 KiB direct reads (libaio, 128 submitted and reaped at
/// once): the block layer merges each batch into requests of up to the device's
/// `max_sectors_kb`, one bio per read.
struct MergedReads {
    fio_ios: u64,
    /// Reads and bytes charged to fio.
    charged: (u64, u64),
    /// Reads charged to anyone on the device.
    charged_to_all: u64,
    /// The device's read row (requests, bytes, per-read latency samples).
    reads: StorageOperationSummary,
    never_traced: u64,
    fio: serde_json::Value,
}

fn merged_small_reads(
    probes: &envelope::kernel::probes::KernelProbes,
    file: &ScratchFile,
) -> MergedReads {
    let fio = |extra: &[&str]| {
        let mut args = vec!["--name=envelope-merged-reads", "--rw=read", "--bs=4k"];
        args.extend(["--direct=1", "--ioengine=libaio", "--iodepth=128"]);
        args.extend([
            "--iodepth_batch_submit=128",
            "--iodepth_batch_complete_min=128",
            "--lat_percentiles=1",
        ]);
        args.extend(extra);
        spawn_fio(file, &args)
    };
    // fio's own code into the page cache first (its page faults would be charged to it).
    let warm_up = fio(&["--io_size=8m"])
        .wait_with_output()
        .expect("fio warm-up");
    assert!(warm_up.status.success(), "fio warm-up failed");
    let disk_before = disk_completions(file);
    let before = probes.snapshot().unwrap();
    let started = Instant::now();
    let child = fio(&["--runtime=3", "--time_based"]);
    let fio_pid = child.id();
    let output = child.wait_with_output().expect("fio output");
    let (delta, summary) = window_since(probes, &before, started.elapsed());
    let read = fio_reads(&output);
    let fio_ios = read["total_ios"].as_u64().expect("fio total_ios");
    let charged_to_all = delta
        .process_io
        .iter()
        .filter(|(key, _)| {
            key.operation == IoOperation::Read as u8
                && agent_common::storage::split_dev(key.dev) == file.device()
        })
        .map(|(_, stats)| stats.completed_requests)
        .sum();
    MergedReads {
        fio_ios,
        charged: charged_to(&delta, fio_pid, file.device(), IoOperation::Read),
        charged_to_all,
        reads: read_row(&summary, file),
        never_traced: completions_never_traced(file, disk_before, &delta, IoOperation::Read),
        fio: read,
    }
}

/// Reads merged into long requests are each one sample, charged to their submitter: fio's
/// batches of 128 sequential 4 KiB reads reach the device as requests of 128 bios, past the
/// first few the completion probe follows inline; bpf_loop follows the rest. Counted
/// against fio's own reads and latency percentiles. The control loads the completion
/// program made for kernels without bpf_loop, which follows 32 bios: there most of the same
/// reads go uncharged, which shows the load does build requests longer than that.
#[test]
fn reads_merged_into_long_requests_are_each_timed_and_charged() {
    const TEST: &str = "reads_merged_into_long_requests_are_each_timed_and_charged";
    if !root_or_skip(TEST) || !tool_or_skip(TEST, "fio") {
        return;
    }
    if !envelope::kernel::btf::kernel_has_bpf_loop() {
        eprintln!("skipped {TEST}: this kernel has no bpf_loop (Linux 5.17)");
        return;
    }
    // The default programs whatever the environment says (ENVELOPE_NO_BPF_LOOP=1 would load
    // the control's).
    let probes =
        integration_tests::load_probes_with(&envelope::kernel::probes::ProbeOptions::default());
    if !block_probes_are_btf(&probes, TEST) {
        return;
    }
    let file = ScratchFile::create(256 << 20);
    let MergedReads {
        fio_ios,
        charged: (ops, bytes),
        charged_to_all,
        reads,
        never_traced,
        fio,
    } = merged_small_reads(&probes, &file);
    let fio_ms = |figure: &str, percentile: &str| fio_percentile_ms(&fio, figure, percentile);
    let request_kib = reads.bytes / reads.ops.max(1) / 1024;
    eprintln!(
        "fio {fio_ios} reads, P50/P95 completion {:.3}/{:.3} ms, total {:.3}/{:.3} ms; \
         envelope: {ops} reads and {bytes} bytes charged to fio, {} device requests of \
         {request_kib} KiB on average ({never_traced} never traced), P50/P95 {:?}/{:?} ms",
        fio_ms("clat_ns", "50.000000"),
        fio_ms("clat_ns", "95.000000"),
        fio_ms("lat_ns", "50.000000"),
        fio_ms("lat_ns", "95.000000"),
        reads.ops,
        reads.latency.p50_ms,
        reads.latency.p95_ms,
    );
    assert!(
        request_kib > 32 * 4,
        "device requests of {request_kib} KiB: the reads did not merge past 32 bios"
    );
    // Below fio's count by the reads in requests no probe saw complete (up to 128 each), and
    // by reads whose entry was evicted from INFLIGHT_IOS while in flight: with 128 in flight
    // in 32,768 slots, both candidate slots are taken about once in (32768 / 256)^2 = 16,384
    // reads. Above by the batch still in flight when fio's time ran out.
    let lost = never_traced * 128 + fio_ios / 10_000;
    assert!(
        (fio_ios.saturating_sub(lost)..=fio_ios + 128).contains(&ops),
        "{ops} reads charged to fio, fio issued {fio_ios}, {never_traced} requests never traced"
    );
    assert_eq!(bytes, ops * BLOCK as u64, "4 KiB charged per read");
    assert_eq!(
        reads.latency.samples, charged_to_all,
        "one latency sample per read charged"
    );
    // fio's two figures for a read bracket envelope's. Its completion latency starts when
    // io_submit has returned for the whole batch of 128 (envelope's sample starts earlier,
    // when the read's bio is queued inside that call: about 200 us of a 0.5 ms read on the
    // test VM); its total latency starts before io_submit is called. Both end when fio has
    // reaped the batch, just after its last read completed (one request or a few, merged).
    for (name, envelope_ms, percentile) in [
        ("P50", reads.latency.p50_ms, "50.000000"),
        ("P95", reads.latency.p95_ms, "95.000000"),
    ] {
        let envelope_ms = envelope_ms.expect("read latency quantile");
        let (completion_ms, total_ms) =
            (fio_ms("clat_ns", percentile), fio_ms("lat_ns", percentile));
        assert!(
            (completion_ms * 0.9..=total_ms * 1.1).contains(&envelope_ms),
            "{name} {envelope_ms:.3} ms outside fio's completion and total latency \
             ({completion_ms:.3} and {total_ms:.3} ms, less and more 10%)"
        );
    }
    drop(probes);

    let inline_only =
        integration_tests::load_probes_with(&envelope::kernel::probes::ProbeOptions {
            without_bpf_loop: true,
            ..Default::default()
        });
    let MergedReads {
        fio_ios,
        charged: (ops, _),
        ..
    } = merged_small_reads(&inline_only, &file);
    eprintln!("without bpf_loop: fio {fio_ios} reads, {ops} charged to fio");
    assert!(
        ops < fio_ios / 2,
        "without bpf_loop {ops} of fio's {fio_ios} reads were charged: the requests were not \
         longer than 32 bios"
    );
}
