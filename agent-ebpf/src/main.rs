//! envelope's kernel probes. Every probe aggregates in the kernel (per-CPU histograms and
//! counters); nothing is sent to userspace per event. Userspace reads the maps at its own
//! interval.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

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
