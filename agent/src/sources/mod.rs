//! Sources: where measurements come from (eBPF maps, /proc and /sys). Everything that
//! touches the kernel sits here, at the edge.
pub mod gpu;
pub mod probes;
pub mod system;
pub mod tracefs;
