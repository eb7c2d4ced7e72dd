//! The `envelope` binary: parse flags, set up logging, run the command, map the outcome to
//! exit codes: 0 no bottleneck, 3 bottleneck found, 1 could not measure, 2 bad usage.
use std::process::ExitCode;

use clap::Parser as _;
use envelope::{
    app::{
        daemon,
        diagnose::{self, DiagnoseOptions},
    },
    cli::{Cli, Command, ConfigCommand},
    config::AgentSettings,
    model::vocabulary::Bottleneck,
    report,
};
use tracing_subscriber::EnvFilter;

/// `diagnose` found a bottleneck (0 means it found none), for scripts that gate on it.
const EXIT_BOTTLENECK_FOUND: u8 = 3;

/// Logs go to stderr, without colours unless it is a terminal and without timestamps (journald
/// adds its own). The daemon logs at info by default, one-off commands at warn.
fn init_logging(verbose: u8, daemon: bool) {
    let default = match verbose {
        0 if daemon => "info",
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
}

/// "1 workload", "2 workloads".
fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// `executable` workload rules cannot see other users' processes without CAP_SYS_PTRACE,
/// which the systemd unit leaves out: say so once rather than match nothing silently.
fn warn_about_unreadable_executables(config: &std::path::Path) {
    if nix::unistd::geteuid().is_root() {
        return;
    }
    let capabilities = envelope::kernel::preflight::own_capabilities();
    if let Some(warning) = std::fs::read_to_string(config)
        .ok()
        .and_then(|text| envelope::kernel::preflight::executable_rules_warning(&text, capabilities))
    {
        tracing::warn!("{warning}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // This binary answers `btf-offsets`: the probes may read the kernel's BTF in a child.
    envelope::kernel::btf::parse_in_child_process();
    init_logging(cli.verbose, matches!(cli.command, Command::Run(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Config(ConfigCommand::History { state_dir }) => {
                let archived = envelope::config::archive::history(&state_dir)?;
                if archived.is_empty() {
                    println!("no archived configuration under {}", state_dir.display());
                }
                for entry in archived {
                    println!(
                        "{}  {:>7} bytes  {}",
                        entry.id,
                        entry.bytes,
                        entry.path.display()
                    );
                }
                anyhow::Ok(ExitCode::SUCCESS)
            }
            Command::Config(ConfigCommand::Rollback {
                id,
                config,
                state_dir,
            }) => {
                let restored =
                    envelope::config::archive::rollback(&state_dir, id.as_deref(), &config)?;
                println!("restored {} from archive {restored}", config.display());
                anyhow::Ok(ExitCode::SUCCESS)
            }
            Command::Run(args) => {
                if let Some(path) = &args.config {
                    warn_about_unreadable_executables(path);
                }
                envelope::app::daemon::run(envelope::app::daemon::RunOptions {
                    config_path: args.config,
                    state_dir: args.state_dir,
                    window: args.window,
                    nvml_library: args.nvml_lib,
                })
                .await?;
                anyhow::Ok(ExitCode::SUCCESS)
            }
            Command::Install { root } => {
                let binary = std::env::current_exe()
                    .map_err(|error| anyhow::anyhow!("cannot find the running binary: {error}"))?;
                let report =
                    envelope::app::install::install(&envelope::app::install::InstallOptions {
                        root: root.clone(),
                        binary,
                    })?;
                print!("{}", envelope::app::install::render_install(&report, &root));
                anyhow::Ok(ExitCode::SUCCESS)
            }
            Command::Uninstall { root, purge } => {
                let report =
                    envelope::app::install::uninstall(&envelope::app::install::UninstallOptions {
                        root,
                        purge,
                    })?;
                print!(
                    "{}",
                    envelope::app::install::render_uninstall(&report, purge)
                );
                anyhow::Ok(ExitCode::SUCCESS)
            }
            Command::BtfOffsets { path } => {
                println!("{}", envelope::kernel::btf::inspect(&path).to_json());
                anyhow::Ok(ExitCode::SUCCESS)
            }
            Command::Check { config } => {
                let prepared = daemon::check(&config)?;
                let actions: usize = prepared
                    .config
                    .budgets
                    .iter()
                    .map(|b| b.actions.len())
                    .sum();
                println!(
                    "{}: ok ({}, {}, {}; export {})",
                    config.display(),
                    plural(prepared.config.budgets.len(), "budget"),
                    plural(prepared.config.workloads.len(), "workload"),
                    plural(actions, "action"),
                    prepared
                        .exporter
                        .as_ref()
                        .map_or("off".to_string(), |e| e.settings().metrics_url.clone())
                );
                anyhow::Ok(ExitCode::SUCCESS)
            }
            Command::Diagnose(args) => {
                let config = match &args.config {
                    Some(path) => {
                        let loaded = envelope::config::load(path)?;
                        warn_about_unreadable_executables(path);
                        loaded
                    }
                    None => envelope::config::LoadedConfig::default(),
                };
                // The command line over the file over the defaults, as for `run`.
                let agent: &AgentSettings = &config.agent;
                let state_dir = args
                    .state_dir
                    .clone()
                    .unwrap_or_else(|| agent.state_dir.clone());
                if let Some(path) = &args.config {
                    // Loaded: keep it as a known good configuration to roll back to.
                    envelope::config::archive::archive_loaded(&state_dir, path);
                }
                let options = DiagnoseOptions {
                    duration: args.duration,
                    top: usize::from(args.top),
                    nvml_library: args.nvml_lib.clone().or_else(|| agent.nvml_lib.clone()),
                    gpu_interval: args.gpu_interval.unwrap_or(agent.gpu_interval),
                    workload: args.workload,
                    pid: args.pid,
                    cuda_probes: args.cuda_probes.unwrap_or(config.gpu.cuda_probes),
                    config,
                };
                let report = diagnose::run(&options).await?;
                let text = if args.json {
                    report::json::render(&report)
                } else {
                    report::terminal::render(&report)
                };
                println!("{text}");
                let found = report.verdict.bottleneck != Bottleneck::None;
                anyhow::Ok(if found {
                    ExitCode::from(EXIT_BOTTLENECK_FOUND)
                } else {
                    ExitCode::SUCCESS
                })
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}
