//! One module per probe family; `shared` holds what they have in common.
pub mod network;
mod shared;
pub mod storage;
