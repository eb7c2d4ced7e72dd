//! The kernel side: what it supports (preflight), where tracefs is and how tracepoints are
//! laid out (tracefs), and the probes themselves (load, attach, track processes, read maps
//! into [`crate::model::KernelSnapshot`]s).
pub mod btf;
pub mod cuda;
pub mod preflight;
pub mod probe_log;
pub mod probes;
pub mod symbols;
pub mod tracefs;
pub mod verifier;
