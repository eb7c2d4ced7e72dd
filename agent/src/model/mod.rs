//! The data every stage shares, and nothing else: plain types with no I/O. `kernel/` and
//! `host/` produce them, `analysis/` and `budgets/` read them, `export/` and `report/` show
//! them. This module imports no other module of the crate.
pub mod engine;
pub mod gpu;
pub mod histogram;
pub mod process;
pub mod snapshot;
pub mod units;
pub mod vocabulary;

pub use histogram::Histogram;
pub use snapshot::KernelSnapshot;
