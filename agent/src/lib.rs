//! envelope: an eBPF GPU and host profiling agent.
//!
//! Data flows one way, one module per stage:
//! `sources` (eBPF maps, /proc, /sys) -> `aggregation` (windows, histograms) -> `report`
//! (terminal, JSON). `preflight` runs before anything is loaded; `diagnose` wires the stages
//! together for the one-off command; `install` puts the binary, the systemd unit and the
//! default configuration in place.
pub mod actions;
pub mod aggregation;
pub mod attribution;
pub mod budgets;
pub mod cli;
pub mod config;
pub mod config_archive;
pub mod daemon;
pub mod diagnose;
pub mod exporters;
pub mod install;
pub mod pipeline;
pub mod preflight;
pub mod report;
pub mod sources;
