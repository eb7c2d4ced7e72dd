//! Command-line interface. Parsing is separate from running so it can be tested.
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "envelope",
    version,
    about = "eBPF GPU and host profiling agent: what holds this node back, model, storage or network?",
    propagate_version = true
)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure storage and network latency for a while and report what you see (needs root
    /// or CAP_BPF + CAP_PERFMON).
    Diagnose(DiagnoseArgs),
    /// Run continuously (the systemd service): attribution and budgets every window, OTLP
    /// export, breach events and actions. SIGHUP reloads the configuration.
    Run(RunArgs),
    /// The archive of configurations that loaded successfully: list, or roll back.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Install as a hardened systemd service: the binary to /usr/bin/envelope, the unit to
    /// /lib/systemd/system/envelope.service, the default configuration to
    /// /etc/envelope/envelope.toml (never over an existing one); then enable and start it.
    Install {
        /// Stage the files under DIR instead of / (no systemctl), e.g. to build an image.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: std::path::PathBuf,
    },
    /// Stop and remove what `install` added; the configuration and state stay unless --purge.
    Uninstall {
        /// Work on the staging tree DIR instead of / (no systemctl).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: std::path::PathBuf,
        /// Also remove /etc/envelope and the state in /var/lib/envelope.
        #[arg(long)]
        purge: bool,
    },
    /// Internal: reads the kernel's BTF and prints what the probes need from it (JSON), in a
    /// process of its own so the parse's memory (about 60 MB) never counts against the agent.
    #[command(hide = true, name = "btf-offsets")]
    BtfOffsets {
        #[arg(long, value_name = "FILE")]
        path: std::path::PathBuf,
    },
    /// Validate a configuration file: errors with line and column and a hint; exit 1 if bad.
    Check {
        /// The configuration to check.
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/etc/envelope/envelope.toml"
        )]
        config: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// List archived configurations, oldest first.
    History {
        #[arg(long, value_name = "DIR", default_value = crate::config::archive::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
    },
    /// Restore an archived configuration byte for byte (default: the last known good one).
    Rollback {
        /// Archive id (or a prefix of it) from `envelope config history`.
        id: Option<String>,
        /// The configuration file to restore.
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/etc/envelope/envelope.toml"
        )]
        config: std::path::PathBuf,
        #[arg(long, value_name = "DIR", default_value = crate::config::archive::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML; see README.md "Configuration"). Without it: node-level
    /// measurement and export with the defaults and OTEL_EXPORTER_OTLP_* variables.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Where budget state and the configuration archive live (overrides [agent] state_dir).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Evaluation window (overrides [agent] window), 500ms to 1h, e.g. "10s".
    #[arg(long, value_parser = parse_window)]
    pub window: Option<Duration>,
    /// NVML library to use (overrides [agent] nvml_lib).
    #[arg(long, value_name = "PATH")]
    pub nvml_lib: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct DiagnoseArgs {
    /// How long to measure: "10s", "500ms", "2m", or plain seconds.
    #[arg(long, short, default_value = "10s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub duration: Duration,
    /// Print one JSON object (schema in README.md) instead of the readable report.
    #[arg(long)]
    pub json: bool,
    /// How many processes and network peers to list.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    pub top: u16,
    /// NVML library to use, for drivers installed off the usual paths (default: the
    /// driver's libnvidia-ml.so.1 through the dynamic loader).
    #[arg(long, value_name = "PATH")]
    pub nvml_lib: Option<std::path::PathBuf>,
    /// Configuration file naming workloads (TOML; see README.md "Configuration").
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Where configurations that load successfully are archived (overrides [agent]
    /// state_dir; default /var/lib/envelope).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Judge only the workload of this name (see the workloads list of a plain run).
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// Judge only the workload this process belongs to.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// How often GPUs are read during the window (overrides [agent] gpu_interval; default 2s).
    #[arg(long, value_parser = parse_duration, allow_hyphen_values = true)]
    pub gpu_interval: Option<Duration>,
    /// Count CUDA calls with uprobes on libcudart/libcuda (overrides [gpu] cuda_probes):
    /// "sync" (synchronisations, copies, allocations), "sync+launch" (kernel launches too,
    /// a few microseconds each) or "off" (default).
    #[arg(long, value_name = "MODE", value_parser = parse_cuda_probes)]
    pub cuda_probes: Option<crate::model::gpu::CudaProbes>,
}

/// `--cuda-probes`: one of the modes `[gpu] cuda_probes` takes.
pub fn parse_cuda_probes(text: &str) -> Result<crate::model::gpu::CudaProbes, String> {
    crate::model::gpu::CudaProbes::parse(text).ok_or_else(|| {
        format!(
            "{text:?} is not a mode; use one of {}",
            crate::model::gpu::CudaProbes::NAMES.join(", ")
        )
    })
}

/// `--window`: a duration within the bounds `[agent] window` has.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    crate::config::check_window(parse_duration(text)?)
}

/// Parses a positive duration: humantime syntax ("10s", "1m30s") or plain seconds ("2.5").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.starts_with('-') {
        return Err(format!(
            "`{text}` is negative; give a positive duration such as 10s"
        ));
    }
    let duration = match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() => Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("`{text}` is not a usable number of seconds"))?,
        _ => humantime::parse_duration(text).map_err(|error| {
            format!("`{text}` is not a duration ({error}); use e.g. 10s, 500ms, 2m")
        })?,
    };
    if duration.is_zero() {
        return Err("the duration must be greater than zero, e.g. 10s".to_string());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn durations_parse_in_every_accepted_form() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn bad_durations_explain_themselves() {
        assert!(
            parse_duration("0s")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(
            parse_duration("0")
                .unwrap_err()
                .contains("greater than zero")
        );
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(
            parse_duration("ten")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(
            parse_duration("nan")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn diagnose_flags_parse() {
        let cli = Cli::try_parse_from([
            "envelope",
            "diagnose",
            "--duration",
            "2s",
            "--json",
            "--top",
            "3",
            "--gpu-interval",
            "250ms",
        ])
        .unwrap();
        let Command::Diagnose(args) = cli.command else {
            panic!("diagnose expected")
        };
        assert_eq!(args.duration, Duration::from_secs(2));
        assert!(args.json);
        assert_eq!(args.top, 3);
        assert_eq!(args.gpu_interval, Some(Duration::from_millis(250)));
    }

    #[test]
    fn install_and_uninstall_flags_parse() {
        let cli = Cli::try_parse_from(["envelope", "install"]).unwrap();
        assert!(
            matches!(cli.command, Command::Install { root } if root == std::path::Path::new("/"))
        );
        let cli =
            Cli::try_parse_from(["envelope", "uninstall", "--root", "/tmp/x", "--purge"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Uninstall { root, purge: true } if root == std::path::Path::new("/tmp/x")
        ));
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for argv in [
            vec!["envelope", "diagnose", "--bogus"],
            vec!["envelope", "diagnose", "--duration", "-5s"],
            vec!["envelope", "diagnose", "--duration", "0"],
            vec!["envelope", "diagnose", "--top", "0"],
            vec!["envelope", "diagnose", "--gpu-interval", "0s"],
            vec!["envelope"],
        ] {
            let error = Cli::try_parse_from(&argv).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{argv:?}");
        }
    }
}
