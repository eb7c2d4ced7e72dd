//! The host outside the kernel probes: process and device names from /proc and /sys, and
//! GPUs through NVML. Produces `model` types.
pub mod gpu;
pub mod system;
