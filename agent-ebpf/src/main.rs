//! envelope's kernel probes. Every probe aggregates in the kernel (per-CPU histograms and
//! counters); nothing is sent to userspace per event. Userspace reads the maps at its own
//! interval.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values (see probes/shared.rs `add`): the BPF target has no
// compare-and-swap, so `AtomicU64::fetch_add` is not offered, but the instruction exists.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod probes;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The programs call GPL-only helpers; the kernel refuses them without a GPL-compatible licence.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("envelope-probes is an eBPF object: build it with `cargo xtask build-ebpf`.");
}
