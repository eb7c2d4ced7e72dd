//! The human form of a report, for a terminal: every line fits [`WIDTH`] columns. Prose
//! (the verdict, its evidence, reasons) wraps at word boundaries with a hanging indent;
//! tables are laid out by comfy-table, which wraps a long cell (a kernel thread's name, an
//! IPv6 peer, a list of processes) inside its column instead of pushing the others out of line.
use std::fmt::Write as _;

use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Table, Width, presets};

use super::DiagnoseReport;
pub use crate::model::units::{format_bytes, format_ms};
use crate::{
    analysis::window::LatencyQuantilesMs,
    model::{process::ProcessKind, vocabulary::Bound},
};

/// Columns every line of the report fits in.
pub const WIDTH: usize = 100;

/// Indent of tables and evidence under their heading.
const INDENT: &str = "  ";

/// `text` wrapped at [`WIDTH`]: the first line after `first`, the rest after `rest`.
fn wrapped(out: &mut String, first: &str, rest: &str, text: &str) {
    let options = textwrap::Options::new(WIDTH)
        .initial_indent(first)
        .subsequent_indent(rest)
        .break_words(true);
    for line in textwrap::wrap(text, options) {
        let _ = writeln!(out, "{line}");
    }
}

/// A table without borders, right-aligned where `right[i]`, no wider than the page; long
/// cells wrap inside their column. Column widths come from the content.
fn table(header: &[&str], right: &[bool], rows: Vec<Vec<String>>) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width((WIDTH - INDENT.len()) as u16)
        .set_header(header.to_vec());
    for row in rows {
        table.add_row(row);
    }
    for (index, right) in right.iter().enumerate() {
        if let Some(column) = table.column_mut(index) {
            column.set_padding((0, 1));
            if *right {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
    }
    table
}

/// Keeps a column at least `width` wide (names should not be squeezed into slivers).
fn at_least(table: &mut Table, index: usize, width: u16) {
    if let Some(column) = table.column_mut(index) {
        column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(width)));
    }
}

fn write_table(out: &mut String, table: &Table) {
    for line in table.lines() {
        let _ = writeln!(out, "{INDENT}{}", line.trim_end());
    }
}

fn quantiles(q: &LatencyQuantilesMs) -> [String; 3] {
    [
        format_ms(q.p50_ms),
        format_ms(q.p95_ms),
        format_ms(q.p99_ms),
    ]
}

fn percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "n/a".to_string(), |f| format!("{:.0}%", f * 100.0))
}

pub fn render(report: &DiagnoseReport) -> String {
    let mut out = String::new();
    wrapped(
        &mut out,
        "Bottleneck: ",
        INDENT,
        &format!(
            "{} (confidence {:.0}%)",
            report.verdict.summary,
            report.verdict.confidence * 100.0
        ),
    );
    for line in &report.verdict.evidence {
        wrapped(&mut out, INDENT, "    ", line);
    }
    if report.workloads.len() > 1 {
        let _ = writeln!(out, "Workloads (most held back first):");
        let rows = report
            .workloads
            .iter()
            .map(|workload| {
                let time = &workload.time;
                vec![
                    workload.name.clone(),
                    workload.verdict.bottleneck.name().to_string(),
                    percent(Some(time.on_cpu)),
                    percent(Some(time.waiting_for_cpu)),
                    percent(Some(time.storage)),
                    percent(Some(time.network)),
                    percent(Some(time.gpu)),
                    percent(Some(time.other_sleep)),
                    workload.verdict.note.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let mut workloads = table(
            &[
                "workload", "verdict", "cpu", "wait", "storage", "network", "gpu", "sleep", "",
            ],
            &[false, false, true, true, true, true, true, true, false],
            rows,
        );
        at_least(&mut workloads, 0, 24);
        write_table(&mut out, &workloads);
    }
    if !report.budgets.is_empty() {
        let _ = writeln!(out, "Budgets (this window):");
        let rows = report
            .budgets
            .iter()
            .flat_map(|budget| {
                let comparison = match budget.bound {
                    Bound::Ceiling => "<=",
                    Bound::Floor => ">=",
                };
                // An envelope's stages under it: what each spent of its allocation.
                let stages = budget.stages.iter().map(move |stage| {
                    vec![
                        format!("  stage {}", stage.stage),
                        String::new(),
                        String::new(),
                        stage
                            .observed
                            .map_or_else(|| "-".to_string(), |v| format!("{v}")),
                        format!("{comparison} {}", stage.allocation),
                        match stage.observed {
                            Some(v) if v > stage.allocation => "over",
                            Some(_) => "ok",
                            None => "no data",
                        }
                        .to_string(),
                    ]
                });
                std::iter::once(vec![
                    budget.name.clone(),
                    budget.metric.name().to_string(),
                    budget.workload.clone(),
                    budget
                        .observed
                        .map_or_else(|| "-".to_string(), |v| format!("{v}")),
                    format!("{comparison} {}", budget.threshold),
                    match budget.good {
                        Some(true) => "ok",
                        Some(false) => "BREACHED",
                        None => "no data",
                    }
                    .to_string(),
                ])
                .chain(stages)
            })
            .collect();
        let mut budgets = table(
            &["budget", "metric", "workload", "observed", "budget", ""],
            &[false, false, false, true, false, false],
            rows,
        );
        at_least(&mut budgets, 0, 12);
        write_table(&mut out, &budgets);
    }
    out.push('\n');
    wrapped(
        &mut out,
        "",
        INDENT,
        &format!(
            "envelope {} on {} (kernel {}), {:.1} s window{}",
            report.envelope_version,
            report.host,
            report.kernel,
            report.duration_s,
            if report.interrupted {
                " (interrupted early)"
            } else {
                ""
            }
        ),
    );
    let attached = report.probes.iter().filter(|p| p.attached).count();
    if attached < report.probes.len() {
        // The reasons were logged once at start-up; here only what is missing from the page.
        let missing: Vec<&str> = report
            .probes
            .iter()
            .filter(|p| !p.attached)
            .map(|p| p.feeds)
            .collect();
        wrapped(
            &mut out,
            "",
            INDENT,
            &format!(
                "probes: {attached} of {} attached; missing: {}",
                report.probes.len(),
                missing.join(", ")
            ),
        );
    }
    let missed: Vec<String> = report
        .probes
        .iter()
        .filter(|p| p.missed_events > 0)
        .map(|p| format!("{} {}", p.tracepoint, p.missed_events))
        .collect();
    if !missed.is_empty() {
        // Only classic tracepoints skip events while another probe runs on their CPU.
        wrapped(
            &mut out,
            "",
            INDENT,
            &format!(
                "warning: probes missed events, so the counts below are short by as many: {}. \
                 Classic tracepoints skip an event while another probe runs on the same CPU; \
                 a kernel with BTF (CONFIG_DEBUG_INFO_BTF) avoids it",
                missed.join(", ")
            ),
        );
    }
    render_storage(&mut out, report);
    render_gpu(&mut out, report);
    render_network(&mut out, report);
    render_requests(&mut out, report);
    render_engines(&mut out, report);
    out
}

/// The serving engines' own view: what their `/metrics` say about the window.
fn render_engines(out: &mut String, report: &DiagnoseReport) {
    if report.engines.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nEngines (their own /metrics, over the window)");
    let mut notes = Vec::new();
    let rows = report
        .engines
        .iter()
        .map(|engine| {
            let name = engine.engine.map_or("?", |kind| kind.as_str());
            if let Some(reason) = &engine.stale {
                notes.push(format!("{}: stale, {reason}", engine.workload));
            } else if engine.restarted {
                notes.push(format!(
                    "{}: the engine restarted; counted from then",
                    engine.workload
                ));
            }
            let count = |n: Option<u64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
            let e2e = match (engine.e2e_p95_ms, engine.e2e_mean_ms) {
                (Some(p95), _) => format_ms(Some(p95)),
                (None, Some(mean)) => format!("{} mean", format_ms(Some(mean))),
                (None, None) => format_ms(None),
            };
            vec![
                engine.workload.clone(),
                name.to_string(),
                count(engine.requests),
                engine
                    .rate_per_s
                    .map_or_else(|| "-".to_string(), |r| format!("{r:.1}")),
                e2e,
                format_ms(engine.ttft_p95_ms),
                format_ms(engine.tpot_p95_ms.or(engine.tpot_mean_ms)),
                format_ms(engine.queue_p95_ms.or(engine.queue_mean_ms)),
                count(engine.generation_tokens),
                percent(engine.prefix_cache_hit_rate),
                percent(engine.kv_cache_usage),
                match (engine.running, engine.waiting) {
                    (None, None) => "-".to_string(),
                    (r, w) => format!(
                        "{}/{}",
                        r.map_or("-".to_string(), |r| format!("{r:.0}")),
                        w.map_or("-".to_string(), |w| format!("{w:.0}"))
                    ),
                },
            ]
        })
        .collect();
    let mut table = table(
        &[
            "workload",
            "engine",
            "reqs",
            "/s",
            "E2E P95",
            "TTFT P95",
            "TPOT P95",
            "queue P95",
            "gen tok",
            "cache",
            "KV",
            "run/wait",
        ],
        &[
            false, false, true, true, true, true, true, true, true, true, true, true,
        ],
        rows,
    );
    at_least(&mut table, 0, 12);
    write_table(out, &table);
    for note in notes {
        wrapped(out, INDENT, "    ", &note);
    }
}

fn render_storage(out: &mut String, report: &DiagnoseReport) {
    let _ = writeln!(
        out,
        "\nStorage (latency: queued -> complete | device only, P50 P95 P99)"
    );
    if report.window.storage.devices.is_empty() {
        let _ = writeln!(out, "{INDENT}no block I/O completed in the window");
    } else {
        let mut rows = Vec::new();
        for device in &report.window.storage.devices {
            rows.push(vec![
                device.device.clone(),
                format!("{:.0}", device.iops),
                format!("{}/s", format_bytes(device.throughput_bytes_per_s)),
                format_ms(device.p50_ms),
                format_ms(device.p95_ms),
                format_ms(device.p99_ms),
                "|".to_string(),
                format_ms(device.device_p50_ms),
                format_ms(device.device_p95_ms),
                format_ms(device.device_p99_ms),
            ]);
            for operation in &device.operations {
                let [p50, p95, p99] = quantiles(&operation.latency);
                let [d50, d95, d99] = quantiles(&operation.device_latency);
                rows.push(vec![
                    format!("  {}", operation.operation),
                    format!("{} ops", operation.ops),
                    format_bytes(operation.bytes as f64),
                    p50,
                    p95,
                    p99,
                    "|".to_string(),
                    d50,
                    d95,
                    d99,
                ]);
            }
        }
        let mut devices = table(
            &[
                "device",
                "IOPS",
                "throughput",
                "P50",
                "P95",
                "P99",
                "|",
                "P50",
                "P95",
                "P99",
            ],
            &[false, true, true, true, true, true, false, true, true, true],
            rows,
        );
        at_least(&mut devices, 0, 14);
        write_table(out, &devices);
        for device in &report.window.storage.devices {
            if device.errors > 0 {
                let _ = writeln!(
                    out,
                    "{INDENT}{}: {} I/O errors",
                    device.device, device.errors
                );
            }
            if let Some(share) = device.queue_share {
                wrapped(
                    out,
                    INDENT,
                    "    ",
                    &format!(
                        "{}: {:.0}% of the mean wait is queueing before the device",
                        device.device,
                        share * 100.0
                    ),
                );
            }
        }
    }

    if !report.window.storage.processes.is_empty() {
        let _ = writeln!(out, "\nTop processes by I/O");
        let rows = report
            .window
            .storage
            .processes
            .iter()
            .map(|process| {
                let name = match process.kind {
                    ProcessKind::KernelThread => format!("[kernel] {}", process.name),
                    _ => process.name.clone(),
                };
                vec![
                    process.pid.to_string(),
                    name,
                    process.ops.to_string(),
                    format_bytes(process.bytes as f64),
                    format_ms(process.mean_latency_ms),
                    process.devices.join(","),
                ]
            })
            .collect();
        let mut processes = table(
            &["pid", "name", "ops", "bytes", "mean wait", "devices"],
            &[true, false, true, true, true, false],
            rows,
        );
        at_least(&mut processes, 1, 24);
        write_table(out, &processes);
    }
}

fn render_network(out: &mut String, report: &DiagnoseReport) {
    let _ = writeln!(out, "\nNetwork peers (TCP, slowest first)");
    if report.window.network.peers.is_empty() {
        let _ = writeln!(out, "{INDENT}no TCP activity seen in the window");
        return;
    }
    let rows = report
        .window
        .network
        .peers
        .iter()
        .map(|peer| {
            let processes: Vec<String> = peer
                .processes
                .iter()
                .map(|p| format!("{}({})", p.name, p.pid))
                .collect();
            vec![
                peer.peer.clone(),
                format_ms(peer.rtt_p50_ms),
                format_ms(peer.rtt_p95_ms),
                format_ms(peer.rtt_p99_ms),
                peer.retransmits.to_string(),
                peer.connects.to_string(),
                peer.connect_failures.to_string(),
                format_ms(peer.connect_p95_ms),
                processes.join(" "),
            ]
        })
        .collect();
    let mut peers = table(
        &[
            "peer",
            "RTT P50",
            "P95",
            "P99",
            "retrans",
            "connects",
            "failed",
            "conn P95",
            "processes",
        ],
        &[false, true, true, true, true, true, true, true, false],
        rows,
    );
    // An IPv4 peer with its port stays on one line; a long IPv6 one wraps in its column.
    at_least(&mut peers, 0, 23);
    write_table(out, &peers);
}

fn render_requests(out: &mut String, report: &DiagnoseReport) {
    let requests = &report.window.requests;
    let _ = writeln!(
        out,
        "\nRequests (first request byte -> last response byte, timed in the kernel)"
    );
    if !requests.timed {
        let _ = writeln!(
            out,
            "{INDENT}not timed: the socket probes are classic tracepoints here (no kernel BTF)"
        );
        return;
    }
    if requests.servers.is_empty() && requests.clients.is_empty() {
        let _ = writeln!(out, "{INDENT}no request answered in the window");
        return;
    }
    let who = |pid: u32, name: &str| {
        if pid == 0 {
            name.to_string()
        } else {
            format!("{name}({pid})")
        }
    };
    let figures = |f: &crate::analysis::window::RequestFigures| {
        vec![
            f.requests.to_string(),
            format!("{:.1}", f.rate_per_s),
            format_ms(f.p50_ms),
            format_ms(f.p95_ms),
            format_ms(f.p99_ms),
            format_ms(f.first_byte_p95_ms),
            f.untimed.to_string(),
        ]
    };
    let headings = ["reqs", "/s", "P50", "P95", "P99", "TTFB P95", "untimed"];
    if !requests.servers.is_empty() {
        let rows = requests
            .servers
            .iter()
            .map(|server| {
                let mut row = vec![format!(":{}", server.port)];
                row.extend(figures(&server.figures));
                row.push(who(server.pid, &server.name));
                row
            })
            .collect();
        let mut columns = vec!["served on"];
        columns.extend(headings);
        columns.push("process");
        let mut table = table(
            &columns,
            &[false, true, true, true, true, true, true, true, false],
            rows,
        );
        at_least(&mut table, 8, 16);
        write_table(out, &table);
    }
    if !requests.clients.is_empty() {
        let rows = requests
            .clients
            .iter()
            .map(|client| {
                let mut row = vec![client.peer.clone()];
                row.extend(figures(&client.figures));
                row.push(format_ms(client.path_rtt_ms));
                row.push(who(client.pid, &client.name));
                row
            })
            .collect();
        let mut columns = vec!["made to"];
        columns.extend(headings);
        columns.extend(["path RTT", "process"]);
        let mut table = table(
            &columns,
            &[false, true, true, true, true, true, true, true, true, false],
            rows,
        );
        at_least(&mut table, 0, 21);
        at_least(&mut table, 8, 8);
        at_least(&mut table, 9, 16);
        write_table(out, &table);
    }
    let _ = writeln!(
        out,
        "{INDENT}TTFB: to the first response byte. path RTT: the connections' lowest round \
         trip,\n{INDENT}the network's part of each exchange; the rest is the peer's work."
    );
}

fn render_gpu(out: &mut String, report: &DiagnoseReport) {
    let gpu = &report.gpu;
    if !gpu.available {
        wrapped(
            out,
            "\nGPU: not measured: ",
            INDENT,
            gpu.reason.as_deref().unwrap_or("unknown reason"),
        );
        // Processes the CUDA probes saw are listed all the same.
        render_gpu_processes(out, gpu);
        render_cuda_probes(out, report);
        return;
    }
    let _ = writeln!(
        out,
        "\nGPU (driver {})",
        gpu.driver_version.as_deref().unwrap_or("unknown")
    );
    let rows = gpu
        .devices
        .iter()
        .map(|device| {
            let memory = match (device.memory_used_bytes, device.memory_total_bytes) {
                (Some(used), Some(total)) => format!(
                    "{} / {}",
                    format_bytes(used as f64),
                    format_bytes(total as f64)
                ),
                _ => "n/a".to_string(),
            };
            let reasons: Vec<&str> = device
                .throttle_reasons
                .iter()
                .copied()
                .filter(|r| *r != "idle")
                .collect();
            vec![
                device.index.to_string(),
                device.name.clone(),
                percent(device.utilization),
                memory,
                device
                    .power_w
                    .map_or_else(|| "n/a".to_string(), |w| format!("{w:.0} W")),
                device
                    .temperature_c
                    .map_or_else(|| "n/a".to_string(), |c| format!("{c} C")),
                if reasons.is_empty() {
                    "-".to_string()
                } else {
                    reasons.join(", ")
                },
            ]
        })
        .collect();
    let mut devices = table(
        &[
            "gpu",
            "name",
            "util",
            "memory used / total",
            "power",
            "temp",
            "throttle reasons",
        ],
        &[true, false, true, true, true, true, false],
        rows,
    );
    at_least(&mut devices, 1, 12);
    write_table(out, &devices);
    for device in gpu.devices.iter().filter(|d| !d.unsupported.is_empty()) {
        wrapped(
            out,
            INDENT,
            "    ",
            &format!(
                "GPU {} does not support: {}",
                device.index,
                device.unsupported.join(", ")
            ),
        );
    }
    for stale in &gpu.stale {
        wrapped(
            out,
            INDENT,
            "    ",
            &format!("GPU {} is stale: {}", stale.index, stale.reason),
        );
    }
    render_gpu_processes(out, gpu);
    render_cuda_probes(out, report);
}

/// Which CUDA libraries the opt-in probes are on, when they are on.
fn render_cuda_probes(out: &mut String, report: &DiagnoseReport) {
    let cuda = &report.cuda_probes;
    if cuda.mode == crate::model::gpu::CudaProbes::Off {
        return;
    }
    let libraries: Vec<String> = cuda
        .libraries
        .iter()
        .map(|library| {
            let state = match (&library.problem, library.detached) {
                (Some(problem), _) => format!("not probed: {problem}"),
                (None, true) => format!("{} functions, detached", library.functions_attached),
                (None, false) => format!("{} functions", library.functions_attached),
            };
            format!("{} ({}, {state})", library.path, library.library)
        })
        .collect();
    let text = match (&cuda.problem, libraries.is_empty()) {
        (Some(problem), _) => problem.clone(),
        (None, true) => "no process mapped libcudart or libcuda during the window".to_string(),
        (None, false) => libraries.join("; "),
    };
    wrapped(
        out,
        &format!("{INDENT}CUDA probes ({}): ", cuda.mode.name()),
        INDENT,
        &text,
    );
}

fn render_gpu_processes(out: &mut String, gpu: &crate::analysis::gpu::GpuSummary) {
    if !gpu.processes.is_empty() {
        let _ = writeln!(out, "{INDENT}Top GPU processes");
        // The CUDA probes' columns, when they saw any process call.
        let cuda = gpu.processes.iter().any(|process| process.cuda.is_some());
        let rows = gpu
            .processes
            .iter()
            .map(|process| {
                let mut row = vec![
                    process.pid.to_string(),
                    process.name.clone(),
                    process
                        .gpu_index
                        .map_or_else(|| "-".to_string(), |index| index.to_string()),
                    process
                        .memory_bytes
                        .map_or_else(|| "n/a".to_string(), |b| format_bytes(b as f64)),
                    percent(process.sm_utilization),
                ];
                if cuda {
                    let calls = process.cuda.as_ref();
                    let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".into());
                    row.push(or_dash(calls.map(|c| format!("{:.2} s", c.sync_s))));
                    row.push(or_dash(calls.map(|c| format_bytes(c.h2d_bytes as f64))));
                    row.push(or_dash(calls.map(|c| format_bytes(c.d2h_bytes as f64))));
                }
                row
            })
            .collect();
        let (headers, right): (&[&str], &[bool]) = if cuda {
            (
                &[
                    "pid",
                    "name",
                    "gpu",
                    "memory",
                    "SM",
                    "CUDA sync",
                    "to GPU",
                    "from GPU",
                ],
                &[true, false, true, true, true, true, true, true],
            )
        } else {
            (
                &["pid", "name", "gpu", "memory", "SM"],
                &[true, false, true, true, true],
            )
        };
        let mut processes = table(headers, right, rows);
        at_least(&mut processes, 1, 16);
        write_table(out, &processes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::{
            attribution::{TimeShares, Verdict},
            engines::EngineSummary,
            gpu::{GpuDeviceSummary, GpuSummary},
            window::{
                ClientRequests, NetworkSummary, PeerProcess, PeerSummary, ProcessIoSummary,
                RequestFigures, RequestsSummary, ServerRequests, StorageDeviceSummary,
                StorageOperationSummary, StorageSummary, WindowSummary,
            },
        },
        budgets::BudgetResult,
        kernel::probes::{ProbeKind, ProbeStatus},
        model::{
            engine::EngineKind,
            vocabulary::{Bottleneck, BudgetMetric},
        },
        report::{JSON_SCHEMA_VERSION, WorkloadReport},
    };

    #[test]
    fn durations_and_sizes_read_naturally() {
        assert_eq!(format_ms(None), "-");
        assert_eq!(format_ms(Some(0.085)), "85 us");
        assert_eq!(format_ms(Some(84.0)), "84.00 ms");
        assert_eq!(format_ms(Some(1500.0)), "1500 ms");
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(4096.0), "4.0 KiB");
        assert_eq!(format_bytes(1.5 * 1024.0 * 1024.0 * 1024.0), "1.5 GiB");
    }

    fn quantiles(ms: f64) -> LatencyQuantilesMs {
        LatencyQuantilesMs {
            p50_ms: Some(ms),
            p95_ms: Some(ms * 3.0),
            p99_ms: Some(ms * 9.0),
            mean_ms: Some(ms),
            samples: 1000,
        }
    }

    fn device(name: &str) -> StorageDeviceSummary {
        StorageDeviceSummary {
            device: name.into(),
            major: 259,
            minor: 1,
            ops: 123_456,
            bytes: 98_765_432_109,
            iops: 123_456.0,
            throughput_bytes_per_s: 3.5e9,
            errors: 7,
            p50_ms: Some(0.085),
            p95_ms: Some(1234.5),
            p99_ms: Some(98_765.0),
            mean_ms: Some(1.0),
            device_p50_ms: Some(0.05),
            device_p95_ms: Some(12.5),
            device_p99_ms: Some(99.9),
            queue_share: Some(0.43),
            operations: vec![StorageOperationSummary {
                operation: "discard",
                ops: 123_456_789,
                bytes: 9_876_543_210_987,
                latency: quantiles(12.0),
                device_latency: quantiles(0.5),
            }],
        }
    }

    fn peer(peer: &str) -> PeerSummary {
        PeerSummary {
            peer: peer.into(),
            address: peer.into(),
            port: 65_535,
            rtt_p50_ms: Some(0.2),
            rtt_p95_ms: Some(2500.0),
            rtt_p99_ms: Some(99_999.0),
            rtt_samples: 10,
            retransmits: 1_234_567,
            connects: 9_999_999,
            connect_failures: 123_456,
            connect_p50_ms: Some(1.0),
            connect_p95_ms: Some(3000.0),
            connect_p99_ms: Some(3000.0),
            processes: (0..6)
                .map(|i| PeerProcess {
                    pid: 4_000_000 + i,
                    name: "python3-worker-with-a-long-name".into(),
                })
                .collect(),
        }
    }

    fn verdict(bottleneck: Bottleneck, summary: &str, note: Option<&str>) -> Verdict {
        Verdict {
            bottleneck,
            confidence: 0.87,
            workload: Some("w".into()),
            pid: Some(4_194_304),
            summary: summary.into(),
            evidence: vec![
                "time: 8% on CPU, 2% waiting for a CPU, 89% blocked on storage, 0% on the network, 0% waiting on the GPU, 0% other sleep, in a window of 10.0 s and more words to make it long".into(),
            ],
            share: 0.89,
            note: note.map(String::from),
        }
    }

    fn report() -> DiagnoseReport {
        let long_kthread = "kworker/u256:17-events_power_efficient_unbound_with_a_very_long_suffix";
        DiagnoseReport {
            schema_version: JSON_SCHEMA_VERSION,
            envelope_version: "0.1.0",
            host: "a-node-with-a-rather-long-host-name.cluster.example.internal".into(),
            kernel: "6.18.44-fc-v657-with-a-long-local-version-string".into(),
            started_at: "2026-11-29T12:00:00Z".into(),
            duration_s: 10.0,
            interrupted: true,
            probes: (0..14)
                .map(|i| ProbeStatus {
                    tracepoint: format!("block:probe_{i}"),
                    feeds: "storage latency per device and the submitting process",
                    attached: i % 2 == 0,
                    kind: ProbeKind::Btf,
                    missed_events: if i == 2 { 581 } else { 0 },
                    runs: None,
                    problem: None,
                    btf_problem: None,
                    program: None,
                })
                .collect(),
            warnings: Vec::new(),
            window: WindowSummary {
                storage: StorageSummary {
                    devices: (0..12)
                        .map(|i| device(&format!("nvme{i}n1p{i}-with-a-long-dm-name")))
                        .collect(),
                    processes: vec![ProcessIoSummary {
                        pid: 4_194_303,
                        name: long_kthread.into(),
                        kind: ProcessKind::KernelThread,
                        cgroup: None,
                        cgroup_id: 1,
                        ops: 123_456_789,
                        bytes: 9_876_543_210,
                        read_bytes: 0,
                        write_bytes: 9_876_543_210,
                        mean_latency_ms: Some(12.0),
                        devices: (0..12).map(|i| format!("nvme{i}n1")).collect(),
                    }],
                },
                network: NetworkSummary {
                    peers: vec![
                        peer("[2001:db8:1234:5678:9abc:def0:1234:5678]:65535"),
                        peer("10.0.0.7:443"),
                    ],
                },
                requests: RequestsSummary {
                    timed: true,
                    servers: vec![ServerRequests {
                        workload: Some("inference".into()),
                        pid: 4_194_303,
                        name: "a-very-long-python-program-name".into(),
                        port: 65535,
                        figures: RequestFigures {
                            requests: 123_456_789,
                            rate_per_s: 12345.6,
                            p50_ms: Some(12.5),
                            p95_ms: Some(1234.5),
                            p99_ms: Some(33_000.0),
                            first_byte_p95_ms: Some(250.0),
                            untimed: 3,
                            ..RequestFigures::default()
                        },
                    }],
                    clients: vec![ClientRequests {
                        workload: None,
                        pid: 7,
                        name: "gateway".into(),
                        peer: "[2001:db8:1234:5678:9abc:def0:1234:5678]:65535".into(),
                        figures: RequestFigures::default(),
                        rtt_p95_ms: Some(0.2),
                        path_rtt_ms: Some(0.1),
                    }],
                },
            },
            gpu: GpuSummary {
                available: false,
                reason: Some("no NVML library (libnvidia-ml.so.1: libnvidia-ml.so.1: cannot open shared object file: No such file or directory); no NVIDIA driver here? If it is installed off the usual paths, pass --nvml-lib /path/to/libnvidia-ml.so.1".into()),
                ..GpuSummary::default()
            },
            verdict: verdict(
                Bottleneck::Storage,
                &format!("storage - {long_kthread} (pid 4194303) spent 89% of its active time blocked on nvme0n1p0-with-a-long-dm-name, P95 1234 ms"),
                None,
            ),
            workloads: vec![
                WorkloadReport {
                    name: format!("container:{}", "3f4e5d6c7b8a"),
                    pids: vec![1],
                    verdict: verdict(Bottleneck::Storage, "storage", None),
                    time: TimeShares {
                        storage: 0.89,
                        ..TimeShares::default()
                    },
                },
                WorkloadReport {
                    name: long_kthread.into(),
                    pids: vec![2],
                    verdict: verdict(
                        Bottleneck::None,
                        "none",
                        Some("too little activity to judge"),
                    ),
                    time: TimeShares {
                        on_cpu: 0.8,
                        waiting_for_cpu: 0.19,
                        ..TimeShares::default()
                    },
                },
            ],
            budgets: vec![BudgetResult {
                name: "inference storage P95 during model load from the shared volume".into(),
                workload: "inference".into(),
                metric: BudgetMetric::NetworkRttP95Ms,
                bound: Bound::Ceiling,
                threshold: 1500.0,
                observed: None,
                good: None,
                no_data: true,
                source: None,
                stages: vec![],
                requests_within: None,
                requests_beyond: None,
            }],
            engines: vec![
                EngineSummary {
                    workload: "a-long-generation-workload-name".into(),
                    url: "http://127.0.0.1:8000/metrics".into(),
                    engine: Some(EngineKind::Vllm),
                    requests: Some(12_345),
                    rate_per_s: Some(1234.5),
                    e2e_p95_ms: Some(1_500.0),
                    ttft_p95_ms: Some(612.0),
                    tpot_p95_ms: Some(45.0),
                    queue_p95_ms: Some(20.0),
                    generation_tokens: Some(987_654_321),
                    prefix_cache_hit_rate: Some(0.72),
                    kv_cache_usage: Some(0.9),
                    running: Some(256.0),
                    waiting: Some(1024.0),
                    ..EngineSummary::default()
                },
                EngineSummary::stale(
                    "vision",
                    "http://127.0.0.1:8002/metrics",
                    Some(EngineKind::Triton),
                    "no complete answer within 2s".into(),
                ),
            ],
            cuda_probes: Default::default(),
        }
    }

    /// A cell as a reader follows it down its column: the token starting with `start`, then
    /// the token at the same column on each following line, while there is one.
    fn wrapped_cell(text: &str, start: &str) -> String {
        let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
        let token = |line: &[char], at: usize| -> String {
            line.iter().skip(at).take_while(|c| **c != ' ').collect()
        };
        for (index, line) in lines.iter().enumerate() {
            let text_line: String = line.iter().collect();
            let Some(byte_at) = text_line.find(start) else {
                continue;
            };
            let at = text_line[..byte_at].chars().count();
            let mut cell = token(line, at);
            for next in &lines[index + 1..] {
                let starts_here = next.get(at).is_some_and(|c| *c != ' ')
                    && (at == 0 || next.get(at - 1) == Some(&' '));
                if !starts_here {
                    break;
                }
                cell.push_str(&token(next, at));
            }
            return cell;
        }
        String::new()
    }

    fn assert_fits(text: &str) {
        for line in text.lines() {
            assert!(
                line.chars().count() <= WIDTH,
                "{} columns:\n{line}\nin:\n{text}",
                line.chars().count()
            );
        }
    }

    #[test]
    fn every_line_fits_100_columns_with_long_names_ipv6_peers_and_many_devices() {
        let text = render(&report());
        assert_fits(&text);
        // Nothing was cut: long names and IPv6 peers wrap inside their column, in order.
        assert_eq!(
            wrapped_cell(&text, "[2001:db8"),
            "[2001:db8:1234:5678:9abc:def0:1234:5678]:65535",
            "{text}"
        );
        assert_eq!(
            wrapped_cell(&text, "nvme11n1p"),
            "nvme11n1p11-with-a-long-dm-name",
            "{text}"
        );
        assert_eq!(
            wrapped_cell(&text, "kworker/u256:1"),
            "kworker/u256:17-events_power_efficient_unbound_with_a_very_long_suffix",
            "{text}"
        );
        let joined: String = text.split_whitespace().collect();
        assert!(
            joined.contains("--nvml-lib/path/to/libnvidia-ml.so.1"),
            "{text}"
        );
        assert!(
            text.contains("GPU: not measured: no NVML library"),
            "{text}"
        );
        // Column alignment: every row of the peer table starts its RTT column at one place.
        assert!(text.contains("10.0.0.7:443"), "{text}");
        // The engines' own figures, and why one has none.
        assert!(text.contains("612 ms") && text.contains("72%"), "{text}");
        let joined_words = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            joined_words.contains("vision: stale, no complete answer within 2s"),
            "{text}"
        );
    }

    #[test]
    fn missed_events_are_a_warning_that_names_the_probe_and_the_count() {
        let text = render(&report());
        let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            joined.contains("warning: probes missed events, so the counts below are short by as many: block:probe_2 581."),
            "{text}"
        );
        let mut quiet = report();
        quiet.probes.iter_mut().for_each(|p| p.missed_events = 0);
        assert!(!render(&quiet).contains("missed events"));
    }

    #[test]
    fn a_workload_judged_none_for_too_little_activity_says_so_in_its_row() {
        let text = render(&report());
        let row = text
            .lines()
            .find(|line| line.contains("too little activity"))
            .unwrap_or_else(|| panic!("no note in:\n{text}"));
        assert!(row.contains("none"), "{row}");
        assert!(row.contains("80%"), "{row}");
        assert!(row.contains("19%"), "{row}");
    }

    #[test]
    fn a_gpu_table_fits_too() {
        let mut report = report();
        report.gpu = GpuSummary {
            available: true,
            reason: None,
            driver_version: Some("575.57.08".into()),
            devices: (0..8)
                .map(|index| GpuDeviceSummary {
                    index,
                    name: "NVIDIA H200 NVL with a very long marketing name".into(),
                    utilization: Some(0.97),
                    memory_used_bytes: Some(140 << 30),
                    memory_total_bytes: Some(141 << 30),
                    power_w: Some(699.0),
                    temperature_c: Some(83),
                    throttle_reasons: vec![
                        "sw_power_cap",
                        "hw_thermal_slowdown",
                        "hw_power_brake_slowdown",
                    ],
                    unsupported: vec![
                        "pcie_tx_kib_per_s",
                        "pcie_rx_kib_per_s",
                        "ecc_corrected_errors",
                        "ecc_uncorrected_errors",
                        "mig_enabled",
                    ],
                    ..GpuDeviceSummary::default()
                })
                .collect(),
            ..GpuSummary::default()
        };
        let text = render(&report);
        assert_fits(&text);
        assert!(text.contains("GPU (driver 575.57.08)"), "{text}");
    }
}
