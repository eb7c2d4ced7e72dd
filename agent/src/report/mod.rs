//! Exporters for one-off reports: a readable terminal page and one JSON object.
pub mod json;
pub mod terminal;

use serde::Serialize;

use crate::{
    analysis::{
        attribution::{TimeShares, Verdict},
        engines::EngineSummary,
        gpu::GpuSummary,
        window::WindowSummary,
    },
    kernel::probes::ProbeStatus,
};

/// Bumped when a field changes meaning or disappears (adding fields does not bump it).
pub const JSON_SCHEMA_VERSION: u32 = 1;

/// Everything `envelope diagnose` found. Serialised as the documented JSON object.
#[derive(Clone, Debug, Serialize)]
pub struct DiagnoseReport {
    pub schema_version: u32,
    pub envelope_version: &'static str,
    pub host: String,
    pub kernel: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// Length of the measured window (shorter than asked for when interrupted).
    pub duration_s: f64,
    pub interrupted: bool,
    pub probes: Vec<ProbeStatus>,
    pub warnings: Vec<String>,
    #[serde(flatten)]
    pub window: WindowSummary,
    pub gpu: GpuSummary,
    /// The node's bottleneck: the workload losing the largest share of its time.
    pub verdict: Verdict,
    pub workloads: Vec<WorkloadReport>,
    /// Every configured budget, evaluated on this window.
    pub budgets: Vec<crate::budgets::BudgetResult>,
    /// The serving engines' own figures, one per workload with a `metrics_url`.
    pub engines: Vec<EngineSummary>,
    /// The opt-in CUDA uprobes: their mode and the libraries they found.
    pub cuda_probes: CudaProbesReport,
}

/// `cuda_probes` in the JSON report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CudaProbesReport {
    pub mode: crate::model::gpu::CudaProbes,
    /// Each CUDA library file a process mapped, attached or not (with the reason).
    pub libraries: Vec<crate::kernel::cuda::CudaLibraryStatus>,
    /// Why the probes cannot run on this kernel, when they cannot.
    pub problem: Option<String>,
}

/// One workload's verdict and where its time went (fractions summing to 1).
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadReport {
    pub name: String,
    pub pids: Vec<u32>,
    #[serde(flatten)]
    pub verdict: Verdict,
    pub time: TimeShares,
}
