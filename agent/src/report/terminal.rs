//! The human form of a report.
use std::fmt::Write as _;

use super::DiagnoseReport;
pub use crate::model::units::{format_bytes, format_ms};
use crate::{analysis::window::LatencyQuantilesMs, model::process::ProcessKind};

fn quantiles(q: &LatencyQuantilesMs) -> String {
    format!(
        "{:>9} {:>9} {:>9}",
        format_ms(q.p50_ms),
        format_ms(q.p95_ms),
        format_ms(q.p99_ms)
    )
}

pub fn render(report: &DiagnoseReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Bottleneck: {} (confidence {:.0}%)",
        report.verdict.summary,
        report.verdict.confidence * 100.0
    );
    for line in &report.verdict.evidence {
        let _ = writeln!(out, "  {line}");
    }
    if report.workloads.len() > 1 {
        let _ = writeln!(out, "Workloads (most held back first):");
        for workload in &report.workloads {
            let _ = writeln!(
                out,
                "  {:<24} {:<8} cpu {:>4} wait-cpu {:>4} storage {:>4} network {:>4} gpu {:>4} sleep {:>4}",
                workload.name,
                workload.verdict.bottleneck.name(),
                percent(Some(workload.time.on_cpu)),
                percent(Some(workload.time.waiting_for_cpu)),
                percent(Some(workload.time.storage)),
                percent(Some(workload.time.network)),
                percent(Some(workload.time.gpu)),
                percent(Some(workload.time.other_sleep)),
            );
        }
    }
    if !report.budgets.is_empty() {
        let _ = writeln!(out, "Budgets (this window):");
        for budget in &report.budgets {
            let comparison = match budget.bound {
                crate::budgets::Bound::Ceiling => "<=",
                crate::budgets::Bound::Floor => ">=",
            };
            let verdict = match budget.good {
                Some(true) => "ok",
                Some(false) => "BREACHED",
                None => "no data",
            };
            let observed = budget
                .observed
                .map_or_else(|| "-".to_string(), |v| format!("{v}"));
            let _ = writeln!(
                out,
                "  {:<32} {:<20} {} {observed} (budget {comparison} {}) {verdict}",
                budget.name, budget.metric, budget.workload, budget.threshold
            );
        }
    }
    out.push('\n');
    let _ = writeln!(
        out,
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
        let _ = writeln!(
            out,
            "probes: {attached} of {} attached; missing: {}",
            report.probes.len(),
            missing.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\nStorage (latency: queued -> complete | device only, P50 P95 P99)"
    );
    if report.window.storage.devices.is_empty() {
        let _ = writeln!(out, "  no block I/O completed in the window");
    } else {
        let _ = writeln!(
            out,
            "  {:<10} {:>8} {:>11} {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9}",
            "device", "IOPS", "throughput", "P50", "P95", "P99", "P50", "P95", "P99"
        );
        for device in &report.window.storage.devices {
            let _ = writeln!(
                out,
                "  {:<10} {:>8.0} {:>9}/s {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9}",
                device.device,
                device.iops,
                format_bytes(device.throughput_bytes_per_s),
                format_ms(device.p50_ms),
                format_ms(device.p95_ms),
                format_ms(device.p99_ms),
                format_ms(device.device_p50_ms),
                format_ms(device.device_p95_ms),
                format_ms(device.device_p99_ms),
            );
            for operation in &device.operations {
                let _ = writeln!(
                    out,
                    "    {:<8} {:>8} ops {:>10}  {} | {}",
                    operation.operation,
                    operation.ops,
                    format_bytes(operation.bytes as f64),
                    quantiles(&operation.latency),
                    quantiles(&operation.device_latency),
                );
            }
            if device.errors > 0 {
                let _ = writeln!(out, "    {} I/O errors", device.errors);
            }
            if let Some(share) = device.queue_share {
                let _ = writeln!(
                    out,
                    "    {:.0}% of the mean wait is queueing before the device",
                    share * 100.0
                );
            }
        }
    }

    if !report.window.storage.processes.is_empty() {
        let _ = writeln!(out, "\nTop processes by I/O");
        let _ = writeln!(
            out,
            "  {:>7}  {:<24} {:>8} {:>10} {:>10}  devices",
            "pid", "name", "ops", "bytes", "mean wait"
        );
        for process in &report.window.storage.processes {
            let name = match process.kind {
                ProcessKind::KernelThread => format!("[kernel] {}", process.name),
                _ => process.name.clone(),
            };
            let _ = writeln!(
                out,
                "  {:>7}  {:<24} {:>8} {:>10} {:>10}  {}",
                process.pid,
                name,
                process.ops,
                format_bytes(process.bytes as f64),
                format_ms(process.mean_latency_ms),
                process.devices.join(",")
            );
        }
    }

    render_gpu(&mut out, report);

    let _ = writeln!(out, "\nNetwork peers (TCP, slowest first)");
    if report.window.network.peers.is_empty() {
        let _ = writeln!(out, "  no TCP activity seen in the window");
    } else {
        let _ = writeln!(
            out,
            "  {:<28} {:>9} {:>9} {:>9} {:>7} {:>8} {:>6} {:>9}  processes",
            "peer", "RTT P50", "P95", "P99", "retrans", "connects", "failed", "conn P95"
        );
        for peer in &report.window.network.peers {
            let processes: Vec<String> = peer
                .processes
                .iter()
                .map(|p| format!("{}({})", p.name, p.pid))
                .collect();
            let _ = writeln!(
                out,
                "  {:<28} {:>9} {:>9} {:>9} {:>7} {:>8} {:>6} {:>9}  {}",
                peer.peer,
                format_ms(peer.rtt_p50_ms),
                format_ms(peer.rtt_p95_ms),
                format_ms(peer.rtt_p99_ms),
                peer.retransmits,
                peer.connects,
                peer.connect_failures,
                format_ms(peer.connect_p95_ms),
                processes.join(" ")
            );
        }
    }
    out
}

fn percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "n/a".to_string(), |f| format!("{:.0}%", f * 100.0))
}

fn render_gpu(out: &mut String, report: &DiagnoseReport) {
    let gpu = &report.gpu;
    if !gpu.available {
        let _ = writeln!(
            out,
            "\nGPU: not measured: {}",
            gpu.reason.as_deref().unwrap_or("unknown reason")
        );
        return;
    }
    let _ = writeln!(
        out,
        "\nGPU (driver {})",
        gpu.driver_version.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        out,
        "  {:>3}  {:<24} {:>5} {:>23} {:>7} {:>5}  throttle reasons",
        "gpu", "name", "util", "memory used / total", "power", "temp"
    );
    for device in &gpu.devices {
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
        let _ = writeln!(
            out,
            "  {:>3}  {:<24} {:>5} {:>23} {:>7} {:>5}  {}",
            device.index,
            device.name,
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
                reasons.join(",")
            }
        );
        if !device.unsupported.is_empty() {
            let _ = writeln!(
                out,
                "       not supported here: {}",
                device.unsupported.join(", ")
            );
        }
    }
    for stale in &gpu.stale {
        let _ = writeln!(out, "  GPU {} is stale: {}", stale.index, stale.reason);
    }
    if !gpu.processes.is_empty() {
        let _ = writeln!(out, "  Top GPU processes");
        let _ = writeln!(
            out,
            "  {:>7}  {:<24} {:>3} {:>10} {:>5}",
            "pid", "name", "gpu", "memory", "SM"
        );
        for process in &gpu.processes {
            let _ = writeln!(
                out,
                "  {:>7}  {:<24} {:>3} {:>10} {:>5}",
                process.pid,
                process.name,
                process.gpu_index,
                process
                    .memory_bytes
                    .map_or_else(|| "n/a".to_string(), |b| format_bytes(b as f64)),
                percent(process.sm_utilization)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
