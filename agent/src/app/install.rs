//! `envelope install` / `envelope uninstall`: the binary, the hardened systemd unit and the
//! default configuration, placed under a root directory ("/" or a staging tree), then the
//! service enabled when systemd runs the machine. Planning is pure (what goes where, with
//! which mode); applying it reports what it did, file by file, so running it twice changes
//! nothing the second time.
use std::{
    fs,
    io::Read as _,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The unit, as shipped in `systemd/envelope.service`.
pub const UNIT: &str = include_str!("../../../systemd/envelope.service");
/// The annotated default configuration, `systemd/envelope.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../systemd/envelope.toml");

/// Where each file goes, relative to the root. The Debian package (`[package.metadata.deb]`
/// in agent/Cargo.toml) installs the same paths; a test keeps the two in step.
pub const BINARY_PATH: &str = "usr/bin/envelope";
pub const UNIT_PATH: &str = "lib/systemd/system/envelope.service";
pub const CONFIG_DIR: &str = "etc/envelope";
pub const CONFIG_PATH: &str = "etc/envelope/envelope.toml";
/// Budget state and the configuration archive (the unit's StateDirectory=).
pub const STATE_DIR: &str = "var/lib/envelope";
/// Where systemd keeps a DynamicUser= service's state; /var/lib/envelope then links to it.
pub const PRIVATE_STATE_DIR: &str = "var/lib/private/envelope";
pub const SERVICE: &str = "envelope.service";

/// What goes into one installed file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file on disk (the running binary).
    File(PathBuf),
    /// Text built into envelope (the unit, the default configuration).
    Embedded(&'static str),
}

/// One file `install` places.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedFile {
    /// Relative to the root, e.g. "usr/bin/envelope".
    pub path: &'static str,
    pub source: Source,
    pub mode: u32,
    /// False for the configuration: an existing one is the operator's and is never replaced.
    pub replace: bool,
}

/// Every file `install` places, in order.
pub fn planned_files(binary: &Path) -> Vec<PlannedFile> {
    vec![
        PlannedFile {
            path: BINARY_PATH,
            source: Source::File(binary.to_path_buf()),
            mode: 0o755,
            replace: true,
        },
        PlannedFile {
            path: UNIT_PATH,
            source: Source::Embedded(UNIT),
            mode: 0o644,
            replace: true,
        },
        // Readable by all: the service runs as a dynamic user, which no group names in advance.
        PlannedFile {
            path: CONFIG_PATH,
            source: Source::Embedded(DEFAULT_CONFIG),
            mode: 0o644,
            replace: false,
        },
    ]
}

/// What happened to one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
    /// The configuration already existed and was left as it is.
    Kept,
    Removed,
    Absent,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Kept => "kept: differs from the default, yours, not overwritten",
            Outcome::Removed => "removed",
            Outcome::Absent => "not present",
        })
    }
}

/// One line of the report: a path as the operator will see it, and what happened to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub path: PathBuf,
    pub outcome: Outcome,
}

#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// "/" for a real install; anything else stages the files there and runs no systemctl.
    pub root: PathBuf,
    /// The binary to install (normally the running one).
    pub binary: PathBuf,
}

#[derive(Clone, Debug)]
pub struct UninstallOptions {
    pub root: PathBuf,
    /// Also remove the configuration and the state directory.
    pub purge: bool,
}

/// Whether systemd manages this machine (sd_booted(3)).
pub fn systemd_is_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn is_real_root(root: &Path) -> bool {
    root == Path::new("/")
}

/// `root/relative`, refusing (in a staging tree) a path that leaves the tree: `..` in the
/// root, or a symbolic link among the directories leading to the file, which could point
/// anywhere (`DIR/etc/envelope -> /etc`). The file itself may be a link: it is replaced or
/// removed, never followed. On "/", the system's own links (merged /usr) are trusted.
fn beneath(root: &Path, relative: &str) -> anyhow::Result<PathBuf> {
    if is_real_root(root) {
        return Ok(root.join(relative));
    }
    if root
        .components()
        .any(|component| component == std::path::Component::ParentDir)
    {
        bail!(
            "--root {} contains `..`; give the staging directory's path without it",
            root.display()
        );
    }
    let mut directory = root.to_path_buf();
    let components: Vec<&str> = relative.split('/').filter(|c| !c.is_empty()).collect();
    for component in &components[..components.len().saturating_sub(1)] {
        directory.push(component);
        if directory
            .symlink_metadata()
            .is_ok_and(|metadata| metadata.file_type().is_symlink())
        {
            bail!(
                "{} is a symbolic link: --root refuses links inside the staging tree (it could \
                 point outside it); remove it or stage into a fresh directory",
                directory.display()
            );
        }
    }
    Ok(root.join(relative))
}

/// Refuses a real install or uninstall without root, saying what to do instead.
fn require_root(root: &Path, command: &str) -> anyhow::Result<()> {
    if is_real_root(root) && !nix::unistd::geteuid().is_root() {
        bail!(
            "`envelope {command}` writes to /usr/bin, /lib/systemd/system and /etc: run it as \
             root (`sudo envelope {command}`) or pass --root DIR to work on a staging tree"
        );
    }
    Ok(())
}

/// Whether two files hold the same bytes, without reading either whole into memory.
fn same_contents(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut a, mut b) = (fs::File::open(a)?, fs::File::open(b)?);
    if a.metadata()?.len() != b.metadata()?.len() {
        return Ok(false);
    }
    let (mut left, mut right) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let read = a.read(&mut left)?;
        if read == 0 {
            return Ok(true);
        }
        b.read_exact(&mut right[..read])?;
        if left[..read] != right[..read] {
            return Ok(false);
        }
    }
}

/// Writes `file` into place through a temporary file and a rename, so a running binary is
/// never overwritten in place and a crash leaves the old file or the new one.
fn place(file: &PlannedFile, target: &Path) -> anyhow::Result<()> {
    let parent = target.parent().expect("installed paths have a parent");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let written = match &file.source {
        Source::File(path) => fs::File::open(path)
            .and_then(|mut source| crate::files::write_from(target, &mut source, Some(file.mode))),
        Source::Embedded(text) => {
            crate::files::write_atomically(target, text.as_bytes(), Some(file.mode))
        }
    };
    written.with_context(|| format!("cannot write {}", target.display()))
}

/// Places one planned file and says what happened.
fn install_file(root: &Path, file: &PlannedFile) -> anyhow::Result<Outcome> {
    let target = beneath(root, file.path)?;
    if !target.exists() {
        place(file, &target)?;
        return Ok(Outcome::Created);
    }
    let same = match &file.source {
        Source::File(path) => same_contents(path, &target).with_context(|| {
            format!(
                "cannot compare {} with {}",
                path.display(),
                target.display()
            )
        })?,
        Source::Embedded(text) => fs::read(&target).is_ok_and(|bytes| bytes == text.as_bytes()),
    };
    if !file.replace {
        return Ok(if same {
            Outcome::Unchanged
        } else {
            Outcome::Kept
        });
    }
    let mode_right = fs::metadata(&target)
        .is_ok_and(|metadata| metadata.permissions().mode() & 0o7777 == file.mode);
    if same && mode_right {
        return Ok(Outcome::Unchanged);
    }
    place(file, &target)?;
    Ok(Outcome::Updated)
}

/// The state directory, unless it exists already (as a directory, or as systemd's link to
/// /var/lib/private/envelope once the dynamic-user service has run).
fn create_state_dir(root: &Path) -> anyhow::Result<Outcome> {
    let state = beneath(root, STATE_DIR)?;
    if state.symlink_metadata().is_ok() || beneath(root, PRIVATE_STATE_DIR)?.exists() {
        return Ok(Outcome::Unchanged);
    }
    // The standard directories above it (var/, var/lib/) as every system has them: 0755.
    if let Some(parent) = state.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::DirBuilder::new()
        .mode(0o750)
        .create(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    Ok(Outcome::Created)
}

/// Runs systemctl, returning its failure as an error that shows its output.
fn systemctl(arguments: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("systemctl")
        .args(arguments)
        .output()
        .context("cannot run systemctl")?;
    if !output.status.success() {
        bail!(
            "`systemctl {}` failed: {}",
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The report of an install: one line per path, then what systemd did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub steps: Vec<Step>,
    /// systemctl commands run, or why none ran.
    pub service: Vec<String>,
}

/// Installs into `options.root`. On "/" with systemd running, reloads systemd and enables and
/// starts the service (restarting it when the binary or the unit changed).
pub fn install(options: &InstallOptions) -> anyhow::Result<Report> {
    require_root(&options.root, "install")?;
    if !options.binary.is_file() {
        bail!(
            "cannot find the envelope binary to install at {}",
            options.binary.display()
        );
    }
    let mut report = Report::default();
    let mut changed = false;
    for file in planned_files(&options.binary) {
        let outcome = install_file(&options.root, &file)?;
        changed |= matches!(outcome, Outcome::Created | Outcome::Updated) && file.replace;
        report.steps.push(Step {
            path: options.root.join(file.path),
            outcome,
        });
    }
    report.steps.push(Step {
        path: options.root.join(STATE_DIR),
        outcome: create_state_dir(&options.root)?,
    });
    if !is_real_root(&options.root) {
        report
            .service
            .push("staging tree (--root): systemctl not run".to_string());
    } else if !systemd_is_running() {
        report.service.push(
            "systemd is not running on this machine (no /run/systemd/system): systemctl not \
             run; start envelope yourself: envelope run --config /etc/envelope/envelope.toml"
                .to_string(),
        );
    } else {
        systemctl(&["daemon-reload"])?;
        report.service.push("systemctl daemon-reload".to_string());
        systemctl(&["enable", "--now", SERVICE])?;
        report
            .service
            .push(format!("systemctl enable --now {SERVICE}"));
        if changed {
            // enable --now leaves a running service on the old binary or unit.
            systemctl(&["try-restart", SERVICE])?;
            report
                .service
                .push(format!("systemctl try-restart {SERVICE}"));
        }
    }
    Ok(report)
}

/// Removes what `install` added: the binary and the unit; the configuration and the state
/// too with `purge`. Stops and disables the service first on a systemd machine. In a staging
/// tree, directories left empty are removed as well, so the tree is as it was.
pub fn uninstall(options: &UninstallOptions) -> anyhow::Result<Report> {
    require_root(&options.root, "uninstall")?;
    let root = &options.root;
    let mut report = Report::default();
    let real = is_real_root(root);
    if real && systemd_is_running() && root.join(UNIT_PATH).exists() {
        systemctl(&["disable", "--now", SERVICE])?;
        report
            .service
            .push(format!("systemctl disable --now {SERVICE}"));
    }
    let mut paths = vec![BINARY_PATH, UNIT_PATH];
    if options.purge {
        paths.extend([CONFIG_PATH, STATE_DIR, PRIVATE_STATE_DIR]);
    }
    for relative in paths {
        let path = beneath(root, relative)?;
        let outcome = remove(&path)?;
        if outcome == Outcome::Removed && !real {
            prune_empty_parents(root, &path);
        }
        report.steps.push(Step { path, outcome });
    }
    if options.purge {
        // The configuration directory holds only what install put there (and `envelope
        // config rollback` files); remove it when nothing else is left.
        let directory = beneath(root, CONFIG_DIR)?;
        if directory
            .symlink_metadata()
            .is_ok_and(|metadata| metadata.is_dir())
            && fs::remove_dir(&directory).is_ok()
        {
            if !real {
                prune_empty_parents(root, &directory);
            }
            report.steps.push(Step {
                path: directory,
                outcome: Outcome::Removed,
            });
        }
    }
    if real && systemd_is_running() {
        systemctl(&["daemon-reload"])?;
        report.service.push("systemctl daemon-reload".to_string());
    }
    Ok(report)
}

/// Removes a file, a symbolic link or a whole directory.
fn remove(path: &Path) -> anyhow::Result<Outcome> {
    let Ok(metadata) = path.symlink_metadata() else {
        return Ok(Outcome::Absent);
    };
    if metadata.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(Outcome::Removed)
}

/// Removes the empty directories between `path` and `root` (staging trees only).
fn prune_empty_parents(root: &Path, path: &Path) {
    let mut directory = path.parent();
    while let Some(current) = directory {
        if current == root || !current.starts_with(root) || fs::remove_dir(current).is_err() {
            break;
        }
        directory = current.parent();
    }
}

/// The install report as the operator reads it, with next steps.
pub fn render_install(report: &Report, root: &Path) -> String {
    let mut text = String::from("envelope install:\n");
    for step in &report.steps {
        text += &format!("  {:<50} {}\n", step.path.display(), step.outcome);
    }
    for line in &report.service {
        text += &format!("  {line}\n");
    }
    let config = root.join(CONFIG_PATH);
    text += &format!(
        "\nNext steps:\n\
         \x20 - edit {config}: name your workloads and budgets; `envelope check --config {config}` validates it\n\
         \x20 - point it at your OpenTelemetry collector: [export] endpoint in that file, or\n\
         \x20   OTEL_EXPORTER_OTLP_ENDPOINT through `systemctl edit envelope` ([Service] Environment=...)\n\
         \x20 - apply a changed configuration: systemctl reload envelope\n\
         \x20 - logs: journalctl -u envelope -f\n",
        config = config.display()
    );
    text
}

/// The uninstall report.
pub fn render_uninstall(report: &Report, purge: bool) -> String {
    let mut text = String::from("envelope uninstall:\n");
    for line in &report.service {
        text += &format!("  {line}\n");
    }
    for step in &report.steps {
        text += &format!("  {:<50} {}\n", step.path.display(), step.outcome);
    }
    if !purge {
        text += &format!(
            "  kept the configuration (/{CONFIG_DIR}) and the state (/{STATE_DIR}); \
             `envelope uninstall --purge` removes them too\n"
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_places_binary_unit_and_config() {
        let plan = planned_files(Path::new("/tmp/envelope"));
        let paths: Vec<_> = plan.iter().map(|file| (file.path, file.mode)).collect();
        assert_eq!(
            paths,
            [
                (BINARY_PATH, 0o755),
                (UNIT_PATH, 0o644),
                (CONFIG_PATH, 0o644)
            ]
        );
        let config = plan.iter().find(|file| file.path == CONFIG_PATH).unwrap();
        assert!(
            !config.replace,
            "an existing configuration is never replaced"
        );
    }

    #[test]
    fn the_unit_runs_the_installed_binary_on_the_installed_config() {
        let exec_start = UNIT
            .lines()
            .find_map(|line| line.strip_prefix("ExecStart="))
            .unwrap();
        assert_eq!(
            exec_start,
            format!("/{BINARY_PATH} run --config /{CONFIG_PATH}")
        );
        assert!(UNIT.contains("StateDirectory=envelope"));
        crate::config::parse_config(CONFIG_PATH, DEFAULT_CONFIG)
            .expect("the default configuration loads");
    }

    #[test]
    fn empty_parents_are_pruned_up_to_the_root_only() {
        let root = std::env::temp_dir().join(format!("envelope-prune-{}", std::process::id()));
        let deep = root.join("a/b/c");
        fs::create_dir_all(&deep).unwrap();
        fs::write(root.join("a/keep"), "").unwrap();
        prune_empty_parents(&root, &deep.join("file"));
        assert!(!root.join("a/b").exists());
        assert!(root.join("a/keep").exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
