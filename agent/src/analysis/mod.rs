//! Pure functions from one window's data to what it means: per-device, per-process and
//! per-peer summaries (`window`), GPU summaries (`gpu`), workloads and their verdicts
//! (`attribution`). No I/O here except through the `SystemNames` trait.
pub mod attribution;
pub mod cuda;
pub mod engines;
pub mod gpu;
pub mod window;
