//! The commands, wired from the stages: `step` (the window step shared by `diagnose` and
//! `run`), `diagnose`, `daemon` (`run`) and `install`.
pub mod daemon;
pub mod diagnose;
pub mod engines;
pub mod install;
pub mod step;
