//! envelope: an eBPF GPU and host profiling agent.
//!
//! Data flows one way; the folders are the stages, and a module imports only from the ones
//! listed before it (`cargo test` checks there is no import cycle):
//!
//! - `files`: atomic file writes, used wherever the agent writes a file.
//! - `model`: the shared types and vocabulary (snapshots, samples, bottleneck classes,
//!   budget metrics). No I/O, no imports from the rest of the crate.
//! - `kernel`: preflight, tracefs, loading the probes and reading their maps.
//! - `host`: /proc and /sys names, NVML.
//! - `engines`: serving engines' own `/metrics` endpoints, scraped and parsed.
//! - `config`: the configuration file, checked into typed settings; its archive.
//! - `analysis`: pure functions from a window's data to summaries, workloads and verdicts.
//! - `budgets`: evaluating budgets on a window, breach state, actions.
//! - `export` (OTLP) and `report` (terminal, JSON): presentation.
//! - `app`: wiring. `step` is the window step `diagnose` and `run` share; `diagnose`,
//!   `daemon` and `install` are the commands.
pub mod files;
pub mod model;

pub mod engines;
pub mod host;
pub mod kernel;

pub mod config;

pub mod analysis;
pub mod budgets;

pub mod export;
pub mod report;

pub mod app;
pub mod cli;
