//! Attribution: which of model, storage, network or CPU holds a workload back, and why.
//!
//! A pure function over plain data: where each workload's time went (from the scheduler
//! probes) plus the evidence gathered for it (its GPUs, the devices it read and wrote, the
//! peers it talked to). No I/O here; the rules are unit-tested on synthetic windows and
//! written out in README.md ("How it decides a bottleneck").
use serde::Serialize;

/// Where a workload's threads spent the window, in thread-nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TimeBreakdown {
    pub on_cpu_ns: u64,
    pub waiting_for_cpu_ns: u64,
    pub storage_ns: u64,
    pub network_ns: u64,
    pub gpu_ns: u64,
    pub other_sleep_ns: u64,
}

/// The same, as fractions of the workload's accounted time (they sum to 1, or are all 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeShares {
    pub on_cpu: f64,
    pub waiting_for_cpu: f64,
    pub storage: f64,
    pub network: f64,
    pub gpu: f64,
    pub other_sleep: f64,
}

impl TimeBreakdown {
    pub fn total_ns(&self) -> u64 {
        self.on_cpu_ns
            + self.waiting_for_cpu_ns
            + self.storage_ns
            + self.network_ns
            + self.gpu_ns
            + self.other_sleep_ns
    }

    pub fn add(&mut self, other: &TimeBreakdown) {
        self.on_cpu_ns += other.on_cpu_ns;
        self.waiting_for_cpu_ns += other.waiting_for_cpu_ns;
        self.storage_ns += other.storage_ns;
        self.network_ns += other.network_ns;
        self.gpu_ns += other.gpu_ns;
        self.other_sleep_ns += other.other_sleep_ns;
    }

    pub fn shares(&self) -> TimeShares {
        let total = self.total_ns();
        if total == 0 {
            return TimeShares::default();
        }
        let share = |ns: u64| ns as f64 / total as f64;
        TimeShares {
            on_cpu: share(self.on_cpu_ns),
            waiting_for_cpu: share(self.waiting_for_cpu_ns),
            storage: share(self.storage_ns),
            network: share(self.network_ns),
            gpu: share(self.gpu_ns),
            other_sleep: share(self.other_sleep_ns),
        }
    }
}

/// A GPU the workload has a context on.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GpuEvidence {
    pub index: u32,
    pub name: String,
    /// 0..1; None when the GPU does not report it.
    pub utilization: Option<f64>,
    pub throttle_reasons: Vec<String>,
}

/// A block device the workload queued I/O to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeviceEvidence {
    pub device: String,
    pub bytes: u64,
    /// Queued-to-complete P95 on the device in the window.
    pub p95_ms: Option<f64>,
    /// Share of the device's mean wait spent queued before the device (0..1).
    pub queue_share: Option<f64>,
}

/// A remote TCP endpoint the workload talked to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeerEvidence {
    pub peer: String,
    pub rtt_p95_ms: Option<f64>,
    pub retransmits: u64,
}

/// Everything known about one workload in one window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkloadWindow {
    pub name: String,
    pub pids: Vec<u32>,
    pub time: TimeBreakdown,
    /// Busiest first.
    pub gpus: Vec<GpuEvidence>,
    /// Most bytes first.
    pub devices: Vec<DeviceEvidence>,
    /// Slowest first.
    pub peers: Vec<PeerEvidence>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bottleneck {
    Model,
    Storage,
    Network,
    Cpu,
    None,
}

impl Bottleneck {
    pub fn name(self) -> &'static str {
        match self {
            Bottleneck::Model => "model",
            Bottleneck::Storage => "storage",
            Bottleneck::Network => "network",
            Bottleneck::Cpu => "cpu",
            Bottleneck::None => "none",
        }
    }
}

/// Thresholds of the rules; the defaults are what README.md documents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rules {
    /// A class must take at least this share of a workload's time to be its bottleneck.
    pub min_share: f64,
    /// A GPU this busy (0..1) is saturated: the model is the limit.
    pub gpu_saturated: f64,
    /// Running plus waiting for a CPU must reach this share for a CPU verdict.
    pub min_cpu_share: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            min_share: 0.20,
            gpu_saturated: 0.90,
            min_cpu_share: 0.50,
        }
    }
}

/// A workload's verdict and the numbers behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    pub bottleneck: Bottleneck,
    /// 0..1: how clearly the winning class beat the others.
    pub confidence: f64,
    pub workload: Option<String>,
    /// The workload's main process (lowest pid), for the one-line summary.
    pub pid: Option<u32>,
    /// The one line `diagnose` starts with, after "Bottleneck: ".
    pub summary: String,
    /// The numbers that decided it, one sentence each.
    pub evidence: Vec<String>,
    /// The share of time lost to the bottleneck class (for roll-up and sorting).
    pub share: f64,
}

fn percent(fraction: f64) -> String {
    format!("{:.0}%", fraction * 100.0)
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |ms| format!("{ms:.1} ms"))
}

/// (class, score) candidates, by the rules in README.md.
fn candidates(window: &WorkloadWindow, rules: &Rules) -> Vec<(Bottleneck, f64)> {
    let shares = window.time.shares();
    let cpu = shares.on_cpu + shares.waiting_for_cpu;
    let mut candidates = vec![
        (Bottleneck::Storage, shares.storage),
        (Bottleneck::Network, shares.network),
        (Bottleneck::Model, shares.gpu),
        (
            Bottleneck::Cpu,
            if cpu >= rules.min_cpu_share { cpu } else { 0.0 },
        ),
    ];
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    candidates
}

/// Decides one workload's bottleneck.
pub fn decide(window: &WorkloadWindow, rules: &Rules) -> Verdict {
    let shares = window.time.shares();
    let pid = window.pids.iter().min().copied();
    let who = match pid {
        Some(pid) => format!("{} (pid {pid})", window.name),
        None => window.name.clone(),
    };
    let mut evidence = vec![format!(
        "time: {} on CPU, {} waiting for a CPU, {} blocked on storage, {} on the network, {} waiting on the GPU, {} other sleep",
        percent(shares.on_cpu),
        percent(shares.waiting_for_cpu),
        percent(shares.storage),
        percent(shares.network),
        percent(shares.gpu),
        percent(shares.other_sleep)
    )];
    let verdict = |bottleneck, confidence: f64, summary: String, evidence, share| Verdict {
        bottleneck,
        confidence: (confidence.clamp(0.0, 1.0) * 100.0).round() / 100.0,
        workload: Some(window.name.clone()),
        pid,
        summary,
        evidence,
        share,
    };

    // Rule 1: a saturated GPU makes the model the limit, whatever the threads do meanwhile
    // (CUDA often spins on a CPU while it waits for the GPU).
    if let Some(gpu) = window
        .gpus
        .iter()
        .filter(|gpu| gpu.utilization.is_some_and(|u| u >= rules.gpu_saturated))
        .max_by(|a, b| {
            a.utilization
                .unwrap_or(0.0)
                .total_cmp(&b.utilization.unwrap_or(0.0))
        })
    {
        let utilization = gpu.utilization.unwrap_or(0.0);
        let throttled: Vec<&str> = gpu
            .throttle_reasons
            .iter()
            .map(String::as_str)
            .filter(|r| *r != "idle")
            .collect();
        let throttle_text = if throttled.is_empty() {
            String::new()
        } else {
            format!(", throttled: {}", throttled.join(", "))
        };
        evidence.push(format!(
            "GPU {} ({}) {} utilized{throttle_text}",
            gpu.index,
            gpu.name,
            percent(utilization)
        ));
        let confidence =
            0.5 + 0.5 * (utilization - rules.gpu_saturated) / (1.0 - rules.gpu_saturated).max(1e-9);
        let summary = format!(
            "model - {who} keeps GPU {} ({}) {} busy{throttle_text}",
            gpu.index,
            gpu.name,
            percent(utilization)
        );
        return verdict(
            Bottleneck::Model,
            confidence,
            summary,
            evidence,
            utilization.max(shares.gpu),
        );
    }

    // Rule 2: otherwise the class that took the largest share of the time, if it is large
    // enough; confidence grows with its margin over the runner-up and with its size.
    let ranked = candidates(window, rules);
    let (winner, score) = ranked[0];
    let runner_up = ranked[1].1;
    if score < rules.min_share {
        // The nearer the busiest class came to the threshold, the less sure "none" is.
        let confidence = 1.0 - score / rules.min_share;
        return verdict(
            Bottleneck::None,
            confidence,
            format!(
                "none - {who} is not held back ({} of its time was other sleep)",
                percent(shares.other_sleep)
            ),
            evidence,
            0.0,
        );
    }
    let confidence = (score - runner_up) / score * (score / 0.5).min(1.0);
    let summary = match winner {
        Bottleneck::Storage => {
            let device = window.devices.first();
            if let Some(device) = device {
                evidence.push(format!(
                    "{}: P95 {} queued-to-complete, {} of the wait queued before the device, {} bytes",
                    device.device,
                    ms(device.p95_ms),
                    device.queue_share.map_or("n/a".to_string(), percent),
                    device.bytes
                ));
            }
            format!(
                "storage - {who} spent {} of its time blocked on {}{}",
                percent(score),
                device.map_or("storage", |d| d.device.as_str()),
                device.map_or(String::new(), |d| format!(", P95 {}", ms(d.p95_ms)))
            )
        }
        Bottleneck::Network => {
            let peer = window.peers.first();
            if let Some(peer) = peer {
                evidence.push(format!(
                    "{}: RTT P95 {}, {} retransmits",
                    peer.peer,
                    ms(peer.rtt_p95_ms),
                    peer.retransmits
                ));
            }
            format!(
                "network - {who} spent {} of its time waiting on the network{}",
                percent(score),
                peer.map_or(String::new(), |p| format!(
                    ", slowest peer {} RTT P95 {}",
                    p.peer,
                    ms(p.rtt_p95_ms)
                ))
            )
        }
        Bottleneck::Model => {
            let gpu = window.gpus.first();
            if let Some(gpu) = gpu {
                evidence.push(format!(
                    "GPU {} ({}) {} utilized",
                    gpu.index,
                    gpu.name,
                    gpu.utilization.map_or("n/a".to_string(), percent)
                ));
            }
            format!(
                "model - {who} spent {} of its time waiting on the GPU",
                percent(score)
            )
        }
        Bottleneck::Cpu => format!(
            "cpu - {who} was running {} and waiting for a CPU {} of its time",
            percent(shares.on_cpu),
            percent(shares.waiting_for_cpu)
        ),
        Bottleneck::None => unreachable!("None is never a candidate"),
    };
    verdict(winner, confidence, summary, evidence, score)
}

/// The node's verdict: the workload losing the largest share of its time to a bottleneck;
/// "none" when no workload has one.
pub fn roll_up(verdicts: &[Verdict]) -> Verdict {
    let worst = verdicts
        .iter()
        .filter(|v| v.bottleneck != Bottleneck::None)
        .max_by(|a, b| {
            a.share
                .total_cmp(&b.share)
                .then(a.confidence.total_cmp(&b.confidence))
        });
    match worst {
        Some(verdict) => verdict.clone(),
        None => Verdict {
            bottleneck: Bottleneck::None,
            confidence: verdicts.iter().map(|v| v.confidence).fold(1.0, f64::min),
            workload: None,
            pid: None,
            summary: format!(
                "none - no workload is held back ({} workloads measured)",
                verdicts.len()
            ),
            evidence: Vec::new(),
            share: 0.0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn window(time: TimeBreakdown) -> WorkloadWindow {
        WorkloadWindow {
            name: "trainer".into(),
            pids: vec![4121, 4130],
            time,
            ..WorkloadWindow::default()
        }
    }

    #[test]
    fn shares_sum_to_one() {
        let time = TimeBreakdown {
            on_cpu_ns: 2 * SECOND,
            waiting_for_cpu_ns: SECOND,
            storage_ns: 3 * SECOND,
            network_ns: SECOND,
            gpu_ns: SECOND,
            other_sleep_ns: 2 * SECOND,
        };
        let shares = time.shares();
        let sum = shares.on_cpu
            + shares.waiting_for_cpu
            + shares.storage
            + shares.network
            + shares.gpu
            + shares.other_sleep;
        assert!((sum - 1.0).abs() < 1e-12);
        assert_eq!(shares.storage, 0.3);
        assert_eq!(TimeBreakdown::default().shares(), TimeShares::default());
    }

    #[test]
    fn heavy_direct_io_is_storage_and_names_the_device() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: SECOND,
            storage_ns: 63 * SECOND / 10,
            other_sleep_ns: 27 * SECOND / 10,
            ..Default::default()
        });
        w.devices = vec![DeviceEvidence {
            device: "vda".into(),
            bytes: 1 << 30,
            p95_ms: Some(84.0),
            queue_share: Some(0.4),
        }];
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Storage);
        assert_eq!(
            verdict.summary,
            "storage - trainer (pid 4121) spent 63% of its time blocked on vda, P95 84.0 ms"
        );
        assert!(
            verdict
                .evidence
                .iter()
                .any(|e| e.starts_with("vda: P95 84.0 ms"))
        );
        // Runner-up is other sleep's rivals: 0.1 on CPU -> cpu not a candidate (below 50%).
        assert_eq!(verdict.confidence, 1.0);
        assert_eq!(verdict.share, 0.63);
    }

    #[test]
    fn waiting_on_a_delayed_peer_is_network_and_names_the_peer() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: SECOND,
            network_ns: 7 * SECOND,
            storage_ns: SECOND,
            other_sleep_ns: SECOND,
            ..Default::default()
        });
        w.peers = vec![PeerEvidence {
            peer: "10.251.1.2:5201".into(),
            rtt_p95_ms: Some(120.0),
            retransmits: 3,
        }];
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Network);
        assert!(
            verdict
                .summary
                .contains("slowest peer 10.251.1.2:5201 RTT P95 120.0 ms"),
            "{}",
            verdict.summary
        );
        // Margin (0.7 - 0.1) / 0.7, size capped at 1.
        assert_eq!(verdict.confidence, 0.86);
    }

    #[test]
    fn a_saturated_gpu_is_model_even_when_the_cpu_spins() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: 10 * SECOND,
            ..Default::default()
        });
        w.gpus = vec![GpuEvidence {
            index: 0,
            name: "H100".into(),
            utilization: Some(0.97),
            throttle_reasons: vec!["idle".into(), "sw_power_cap".into()],
        }];
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Model);
        assert_eq!(
            verdict.summary,
            "model - trainer (pid 4121) keeps GPU 0 (H100) 97% busy, throttled: sw_power_cap"
        );
        assert_eq!(verdict.confidence, 0.85);
    }

    #[test]
    fn a_spinner_is_cpu() {
        let w = window(TimeBreakdown {
            on_cpu_ns: 6 * SECOND,
            waiting_for_cpu_ns: 3 * SECOND,
            other_sleep_ns: SECOND,
            ..Default::default()
        });
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::Cpu);
        assert_eq!(
            verdict.summary,
            "cpu - trainer (pid 4121) was running 60% and waiting for a CPU 30% of its time"
        );
    }

    #[test]
    fn an_idle_workload_is_none() {
        let w = window(TimeBreakdown {
            on_cpu_ns: SECOND / 10,
            storage_ns: SECOND / 10,
            other_sleep_ns: 98 * SECOND / 10,
            ..Default::default()
        });
        let verdict = decide(&w, &Rules::default());
        assert_eq!(verdict.bottleneck, Bottleneck::None);
        assert!(verdict.confidence > 0.9, "{}", verdict.confidence);
        assert!(
            verdict
                .summary
                .starts_with("none - trainer (pid 4121) is not held back")
        );
    }

    #[test]
    fn busy_but_unsaturated_gpu_with_little_waiting_is_not_model() {
        let mut w = window(TimeBreakdown {
            on_cpu_ns: SECOND,
            other_sleep_ns: 9 * SECOND,
            ..Default::default()
        });
        w.gpus = vec![GpuEvidence {
            index: 0,
            name: "T4".into(),
            utilization: Some(0.5),
            throttle_reasons: vec![],
        }];
        assert_eq!(decide(&w, &Rules::default()).bottleneck, Bottleneck::None);
    }

    #[test]
    fn the_node_takes_the_workload_losing_most() {
        let storage = Verdict {
            bottleneck: Bottleneck::Storage,
            confidence: 0.9,
            workload: Some("a".into()),
            pid: Some(1),
            summary: "s".into(),
            evidence: vec![],
            share: 0.4,
        };
        let network = Verdict {
            bottleneck: Bottleneck::Network,
            confidence: 0.5,
            workload: Some("b".into()),
            pid: Some(2),
            summary: "n".into(),
            evidence: vec![],
            share: 0.7,
        };
        let idle = Verdict {
            bottleneck: Bottleneck::None,
            confidence: 0.8,
            workload: Some("c".into()),
            pid: Some(3),
            summary: "i".into(),
            evidence: vec![],
            share: 0.0,
        };
        assert_eq!(
            roll_up(&[storage.clone(), network.clone(), idle.clone()]),
            network
        );
        let node = roll_up(&[idle.clone()]);
        assert_eq!(node.bottleneck, Bottleneck::None);
        assert_eq!(node.confidence, 0.8);
        assert_eq!(node.workload, None);
    }
}
