//! One module per probe family; `shared` holds what they have in common.
pub mod cuda;
pub mod network;
pub mod sched;
mod shared;
pub mod storage;
