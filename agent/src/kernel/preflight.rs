//! Checks before loading anything: kernel version, privileges, BTF, tracefs. Each failure
//! says what is wrong and what to do; only what makes measuring impossible is fatal.
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::kernel::tracefs::{self, TracefsStatus};

/// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Oldest kernel with CAP_BPF/CAP_PERFMON and the tracepoints the probes use.
const MINIMUM_KERNEL: (u32, u32) = (5, 8);

#[derive(Clone, Debug, Serialize)]
pub struct PreflightReport {
    pub kernel_release: String,
    pub btf_available: bool,
    /// Where tracefs is, if this process can read it. Only classic tracepoints need it: with
    /// kernel BTF every probe runs as a BTF raw tracepoint, so the systemd unit grants no
    /// CAP_DAC_READ_SEARCH and tracefs (root-only) stays closed to it.
    pub tracefs: Option<PathBuf>,
    /// Problems that degrade envelope without stopping it, one sentence each.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "envelope needs root, or the capabilities CAP_BPF and CAP_PERFMON, to load its kernel \
         probes; this process lacks {missing}. Run it with sudo, as the systemd service \
         (`sudo envelope install`), or grant them once: \
         `sudo setcap cap_bpf,cap_perfmon+ep $(command -v envelope)`"
    )]
    NotPrivileged { missing: String },
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
}

/// Parses "6.18.44-fc-v657" into (6, 18).
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Effective capability bits from a /proc/PID/status text.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn has_capability(capabilities: u64, capability: u32) -> bool {
    capabilities & (1u64 << capability) != 0
}

/// Whether the capability set can load and attach tracepoint programs.
pub fn can_load_probes(capabilities: u64) -> bool {
    has_capability(capabilities, CAP_SYS_ADMIN)
        || (has_capability(capabilities, CAP_BPF) && has_capability(capabilities, CAP_PERFMON))
}

/// The probe-loading capabilities the set lacks, by name ("CAP_PERFMON"); empty when it can
/// load probes. CAP_DAC_READ_SEARCH, which only classic tracepoints (a kernel without BTF)
/// need, is checked by reading tracefs (see [`tracefs::find_or_mount`]), as a system may make
/// tracefs readable without it.
pub fn missing_probe_capabilities(capabilities: u64) -> Vec<&'static str> {
    if can_load_probes(capabilities) {
        return Vec::new();
    }
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(bit, _)| !has_capability(capabilities, *bit))
        .map(|(_, name)| name)
        .collect()
}

/// The effective capabilities of this process (0 when /proc cannot say).
pub fn own_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_capabilities(&status))
        .unwrap_or(0)
}

/// A warning when `executable = [...]` workload rules cannot see other users' processes:
/// /proc/PID/exe of a process of another user needs CAP_SYS_PTRACE, which the systemd unit
/// does not grant by default. `config_text` is the configuration file's TOML.
pub fn executable_rules_warning(config_text: &str, capabilities: u64) -> Option<String> {
    if has_capability(capabilities, CAP_SYS_PTRACE) {
        return None;
    }
    let config: toml::Value = toml::from_str(config_text).ok()?;
    let workloads: Vec<&str> = config
        .get("workload")?
        .as_array()?
        .iter()
        .filter(|workload| {
            workload
                .get("executable")
                .and_then(toml::Value::as_array)
                .is_some_and(|globs| !globs.is_empty())
        })
        .filter_map(|workload| workload.get("name")?.as_str())
        .collect();
    if workloads.is_empty() {
        return None;
    }
    Some(format!(
        "the `executable` rules of workload(s) {} match only this user's processes: reading \
         another user's /proc/PID/exe needs CAP_SYS_PTRACE. Add it if you rely on them \
         (`systemctl edit envelope`: AmbientCapabilities=CAP_SYS_PTRACE and \
         CapabilityBoundingSet=CAP_SYS_PTRACE), or match by process name or cgroup instead",
        workloads.join(", ")
    ))
}

/// Runs every check. Mounts tracefs when it is missing.
pub fn run() -> Result<PreflightReport, PreflightError> {
    let mut warnings = Vec::new();
    let kernel_release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    match parse_kernel_version(&kernel_release) {
        Some(version) if version < MINIMUM_KERNEL => warnings.push(format!(
            "kernel {kernel_release} is older than {}.{}: some probes may not load; \
             envelope is tested on 6.x",
            MINIMUM_KERNEL.0, MINIMUM_KERNEL.1
        )),
        None => warnings.push(format!(
            "could not read the kernel version ({kernel_release})"
        )),
        _ => {}
    }

    let missing = missing_probe_capabilities(own_capabilities());
    if !missing.is_empty() {
        return Err(PreflightError::NotPrivileged {
            missing: missing.join(" and "),
        });
    }

    let btf_available = Path::new("/sys/kernel/btf/vmlinux").exists();
    if !btf_available {
        warnings.push(
            "the kernel exposes no BTF (/sys/kernel/btf/vmlinux): the probes run as classic \
             tracepoints, which need tracefs (root, or CAP_DAC_READ_SEARCH) and skip events \
             while another probe runs on the same CPU; a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y avoids both"
                .to_string(),
        );
    }

    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (newer ones use memory cgroups):
    // lift it there so map creation does not fail with EPERM.
    // The systemd unit sets LimitMEMLOCK=infinity, and its system call filter refuses setrlimit.
    let mut memlock = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer to a local.
    let memlock_unlimited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut memlock) } == 0
        && memlock.rlim_cur == libc::RLIM_INFINITY;
    if !memlock_unlimited
        && parse_kernel_version(&kernel_release).is_some_and(|version| version < (5, 11))
    {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid pointer to a local.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
            warnings.push(
                "could not raise RLIMIT_MEMLOCK, which this kernel (before 5.11) charges eBPF \
                 maps to: if loading fails, run `ulimit -l unlimited` first or add \
                 LimitMEMLOCK=infinity to the service"
                    .to_string(),
            );
        }
    }

    // With kernel BTF the probes need no tracefs; without it they are classic tracepoints,
    // and an unreadable tracefs (root-only; CAP_DAC_READ_SEARCH opens it) is fatal.
    let tracefs = match tracefs::find_or_mount() {
        Ok(TracefsStatus::AlreadyMounted(path)) => Some(path),
        Ok(TracefsStatus::MountedByUs(path)) => {
            tracing::info!("mounted tracefs at {}", path.display());
            Some(path)
        }
        Err(error) if btf_available => {
            tracing::debug!(
                "tracefs is not usable ({error}); the probes run as BTF raw tracepoints, which \
                 do not need it, and a probe that cannot would have no classic fallback"
            );
            None
        }
        Err(error) => return Err(error.into()),
    };
    Ok(PreflightReport {
        kernel_release,
        btf_available,
        tracefs,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_kernel_version("garbage"), None);
        assert!(parse_kernel_version("5.4.0").unwrap() < MINIMUM_KERNEL);
        assert!(parse_kernel_version("5.15.0").unwrap() >= MINIMUM_KERNEL);
    }

    #[test]
    fn capabilities_decide_whether_probes_can_load() {
        let root = effective_capabilities("Name:\tx\nCapEff:\t000001ffffffffff\n").unwrap();
        assert!(can_load_probes(root));
        let bpf_and_perfmon = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert!(can_load_probes(bpf_and_perfmon));
        assert!(!can_load_probes(1 << CAP_BPF));
        assert!(!can_load_probes(0));
        assert_eq!(missing_probe_capabilities(1 << CAP_BPF), ["CAP_PERFMON"]);
        assert_eq!(missing_probe_capabilities(1 << CAP_PERFMON), ["CAP_BPF"]);
        assert_eq!(missing_probe_capabilities(0), ["CAP_BPF", "CAP_PERFMON"]);
        assert!(missing_probe_capabilities(bpf_and_perfmon).is_empty());
        assert!(missing_probe_capabilities(1 << CAP_SYS_ADMIN).is_empty());
        assert_eq!(effective_capabilities("CapEff:\t0000000000000000"), Some(0));
    }

    #[test]
    fn executable_rules_without_ptrace_are_warned_about() {
        let config = "[[workload]]\nname = \"trainer\"\nexecutable = [\"/opt/t/*\"]\n\
                      [[workload]]\nname = \"web\"\nprocess = [\"nginx\"]\n";
        let warning = executable_rules_warning(config, 1 << CAP_BPF).unwrap();
        assert!(
            warning.contains("trainer") && warning.contains("CAP_SYS_PTRACE"),
            "{warning}"
        );
        assert!(!warning.contains("web"), "{warning}");
        assert_eq!(executable_rules_warning(config, 1 << CAP_SYS_PTRACE), None);
        let names_only = "[[workload]]\nname = \"web\"\nprocess = [\"nginx\"]\n";
        assert_eq!(executable_rules_warning(names_only, 0), None);
    }
}
