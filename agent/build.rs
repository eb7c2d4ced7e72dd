//! Builds the kernel probes (agent-ebpf) for the bpf target and leaves the object in OUT_DIR,
//! where `kernel::probes` embeds it. `cargo xtask build-ebpf` is the documented way to run
//! this with its prerequisites set up; AYA_BUILD_SKIP=1 skips it (an empty object is
//! embedded, and the agent then says the probes were not built).
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("envelope-probes");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(&object, [])?;
        return Ok(());
    }
    let ebpf_package = aya_build::Package {
        name: "agent-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], aya_build::Toolchain::Nightly).map_err(|error| {
        anyhow::anyhow!(
            "building the eBPF probes failed: {error:#}\n\
             Run `cargo xtask build-ebpf`: it installs what is missing (rust-src for nightly, \
             bpf-linker) and says what it does."
        )
    })
}
