//! The configuration parachute: every configuration that loaded successfully is archived
//! under the state directory; `envelope config history` lists them and `envelope config
//! rollback [ID]` puts one back, byte for byte.
//!
//! The state directory may be writable by the service while rollback runs as root, so
//! nothing in it is trusted: only regular files count as archives (a planted link is
//! refused, never followed), an archive must load before it is restored, a directory that is
//! world-writable or owned by another user is refused, temporary files are created O_EXCL
//! under unique names, and one lock serialises archiving and rollbacks. Archives are 0600
//! (they may hold `[export] headers` secrets); the newest [`MAX_ARCHIVES`] are kept, and of
//! those none older than [`MAX_ARCHIVE_AGE`] beyond the newest [`ALWAYS_KEPT`].
use std::{
    fs,
    io::Read as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

/// Default state directory (systemd's StateDirectory=envelope).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/envelope";

/// Archives kept; older ones are removed when a new one is written.
pub const MAX_ARCHIVES: usize = 100;

/// Archives older than this are removed when a new one is written...
pub const MAX_ARCHIVE_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// ...except the newest few: a node whose configuration has not changed in months keeps
/// something to roll back to.
pub const ALWAYS_KEPT: usize = 10;

fn history_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("config-history")
}

/// One archived configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedConfig {
    /// `<UTC time>-<first 12 hex of the SHA-256>`, sortable by time.
    pub id: String,
    pub path: PathBuf,
    pub bytes: u64,
}

fn short_hash(content: &[u8]) -> String {
    let digest = Sha256::digest(content);
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Refuses a state directory anyone may write into, or that belongs to a user other than
/// root, this process's user or envelope's service user (a planted archive would be trusted).
/// It may be a link only if root made it where only root writes: systemd's `DynamicUser=`
/// makes /var/lib/envelope a link to private/envelope.
fn check_state_directory(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let link = match fs::symlink_metadata(dir) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", dir.display())),
    };
    if link.file_type().is_symlink() {
        let parent_is_roots = dir
            .parent()
            .and_then(|parent| fs::metadata(parent).ok())
            .is_some_and(|parent| parent.uid() == 0 && parent.mode() & 0o022 == 0);
        if link.uid() != 0 || !parent_is_roots {
            bail!(
                "{} is a link that root did not make in a directory only root writes, so it \
                 cannot be trusted; remove it and let envelope (or systemd) create the directory",
                dir.display()
            );
        }
    }
    let metadata = fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    check_directory_metadata(dir, &metadata)
}

fn check_directory_metadata(dir: &Path, metadata: &fs::Metadata) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    if !metadata.is_dir() {
        bail!(
            "{} is not a directory (a file was put there); remove it and let envelope create the directory",
            dir.display()
        );
    }
    if metadata.permissions().mode() & 0o002 != 0 {
        bail!(
            "{} is writable by every user, so its archives cannot be trusted; `chmod o-w {}` (the service creates it 0750)",
            dir.display(),
            dir.display()
        );
    }
    let owner = metadata.uid();
    if !trusted_owner(owner, dir) {
        bail!(
            "{} belongs to uid {owner}, which is neither root, this user, nor envelope's service \
             user, so its archives cannot be trusted; give it to the user envelope runs as \
             (`chown`), or remove it and let envelope (or systemd) create it",
            dir.display()
        );
    }
    Ok(())
}

/// Root, this process's user, the `envelope` user, or (systemd's DynamicUser=) any owner of a
/// directory inside a root-only one such as /var/lib/private, which only root can place there.
fn trusted_owner(owner: u32, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    if owner == 0 || owner == nix::unistd::geteuid().as_raw() {
        return true;
    }
    if nix::unistd::User::from_name("envelope")
        .ok()
        .flatten()
        .is_some_and(|user| user.uid.as_raw() == owner)
    {
        return true;
    }
    fs::canonicalize(dir)
        .ok()
        .and_then(|real| fs::metadata(real.parent()?).ok())
        .is_some_and(|parent| parent.uid() == 0 && parent.mode() & 0o077 == 0)
}

/// Holds the archive's lock while alive: archiving and rollbacks run one at a time.
struct ArchiveLock(#[allow(dead_code)] nix::fcntl::Flock<fs::File>);

fn lock(state_dir: &Path) -> anyhow::Result<ArchiveLock> {
    let dir = history_dir(state_dir);
    check_state_directory(state_dir)?;
    fs::DirBuilder::new()
        .recursive(true)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // Opened without following a link (one planted there is refused, never chmod-ed), then
    // checked and restricted through the open directory.
    let history = fs::File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&dir)
        .with_context(|| {
            format!(
                "cannot open {} (a link there is refused: remove it)",
                dir.display()
            )
        })?;
    check_directory_metadata(&dir, &history.metadata()?)?;
    history
        .set_permissions(fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot restrict {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open the lock {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(ArchiveLock)
        .map_err(|(_, error)| anyhow::anyhow!("cannot lock {}: {error}", path.display()))
}

/// Archived configurations, oldest first: the regular files named `<id>.toml` (anything
/// else there, such as a planted link, is not an archive).
pub fn history(state_dir: &Path) -> anyhow::Result<Vec<ArchivedConfig>> {
    let dir = history_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut archived: Vec<ArchivedConfig> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let path = entry.path();
            let id = path
                .file_name()?
                .to_str()?
                .strip_suffix(".toml")?
                .to_string();
            // DirEntry::metadata does not follow links.
            let metadata = entry.metadata().ok()?;
            if !metadata.is_file() {
                tracing::warn!(
                    "ignoring {}: not a regular file (an archive is never a link)",
                    path.display()
                );
                return None;
            }
            Some(ArchivedConfig {
                id,
                path,
                bytes: metadata.len(),
            })
        })
        .collect();
    archived.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(archived)
}

/// Reads an archive without following a link, refusing anything but a regular file.
fn read_archive(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut file = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open the archive {} (a link is refused)",
                path.display()
            )
        })?;
    let metadata = file.metadata()?;
    if !metadata.is_file() || metadata.len() > super::MAX_CONFIG_BYTES {
        bail!(
            "{} is not a regular file of at most 1 MiB; it is not an archive envelope wrote",
            path.display()
        );
    }
    let mut content = Vec::new();
    file.read_to_end(&mut content)?;
    Ok(content)
}

/// Archives the configuration file that just loaded, as a known good one to roll back to. A
/// failure is logged, never fatal: the agent must run with a configuration it could read.
pub fn archive_loaded(state_dir: &Path, config_path: &Path) {
    let archived = super::read_text(config_path)
        .map_err(anyhow::Error::from)
        .and_then(|text| archive(state_dir, text.as_bytes(), SystemTime::now()));
    if let Err(error) = archived {
        tracing::warn!(
            "could not archive {} under {}: {error:#}",
            config_path.display(),
            state_dir.display()
        );
    }
}

/// Archives `content` (0600) unless it is the newest archive already, keeping the newest
/// [`MAX_ARCHIVES`]. Returns its id.
pub fn archive(state_dir: &Path, content: &[u8], now: SystemTime) -> anyhow::Result<String> {
    let _lock = lock(state_dir)?;
    let hash = short_hash(content);
    let existing = history(state_dir)?;
    if let Some(newest) = existing.last()
        && newest.id.ends_with(&hash)
        && read_archive(&newest.path).is_ok_and(|old| old == content)
    {
        return Ok(newest.id.clone());
    }
    let stamp = humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace([':', '-'], "");
    let id = format!("{stamp}-{hash}");
    let dir = history_dir(state_dir);
    let path = dir.join(format!("{id}.toml"));
    crate::files::write_atomically(&path, content, Some(0o600))
        .with_context(|| format!("cannot write {}", path.display()))?;
    let archived = history(state_dir)?;
    for old in expired(&archived, now) {
        if let Err(error) = fs::remove_file(&old.path) {
            tracing::warn!(
                "could not remove the old archive {}: {error}",
                old.path.display()
            );
        }
    }
    Ok(id)
}

/// The archives (oldest first) to remove at `now`: all but the newest [`MAX_ARCHIVES`], and
/// those older than [`MAX_ARCHIVE_AGE`] unless among the newest [`ALWAYS_KEPT`].
fn expired(archived: &[ArchivedConfig], now: SystemTime) -> &[ArchivedConfig] {
    let keep_at_least = archived.len().saturating_sub(ALWAYS_KEPT);
    let too_many = archived.len().saturating_sub(MAX_ARCHIVES);
    let too_old = archived[..keep_at_least]
        .iter()
        .take_while(|entry| {
            archived_at(&entry.id)
                .is_some_and(|at| now.duration_since(at).unwrap_or_default() > MAX_ARCHIVE_AGE)
        })
        .count();
    &archived[..too_many.max(too_old)]
}

/// When an archive was written, from its id (`20270115T080000Z-<hash>`).
fn archived_at(id: &str) -> Option<SystemTime> {
    let stamp = id.get(..16)?;
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        stamp.get(0..4)?,
        stamp.get(4..6)?,
        stamp.get(6..8)?,
        stamp.get(9..11)?,
        stamp.get(11..13)?,
        stamp.get(13..15)?
    );
    humantime::parse_rfc3339(&rfc3339).ok()
}

/// The archive `id` names: itself, or the one archive it is a prefix of.
fn find<'a>(archived: &'a [ArchivedConfig], id: &str) -> anyhow::Result<&'a ArchivedConfig> {
    if id.trim().is_empty() {
        bail!("an empty id names no archive; `envelope config history` lists them");
    }
    if let Some(exact) = archived.iter().find(|entry| entry.id == id) {
        return Ok(exact);
    }
    let matching: Vec<&ArchivedConfig> = archived
        .iter()
        .filter(|entry| entry.id.starts_with(id))
        .collect();
    match matching.as_slice() {
        [] => bail!("no archived configuration {id:?}; `envelope config history` lists them"),
        [only] => Ok(only),
        [first, .., last] => bail!(
            "{id:?} matches {} archives ({} ... {}); give more of the id",
            matching.len(),
            first.id,
            last.id
        ),
    }
}

/// The archive's text, if it is one `envelope` would load (it is checked as `check` would).
fn loadable(entry: &ArchivedConfig) -> anyhow::Result<Vec<u8>> {
    let content = read_archive(&entry.path)?;
    let text = std::str::from_utf8(&content)
        .with_context(|| format!("archive {} is not UTF-8 text", entry.id))?;
    super::parse_config(&entry.path.display().to_string(), text).map_err(|error| {
        anyhow::anyhow!(
            "archive {} does not load ({error}); pick another from `envelope config history`",
            entry.id
        )
    })?;
    Ok(content)
}

/// Puts an archived configuration back at `config_path`, keeping that file's mode and owner.
/// Without `id`: the last known good one, i.e. the newest archive that loads and differs from
/// what the file holds now. Returns the id.
pub fn rollback(state_dir: &Path, id: Option<&str>, config_path: &Path) -> anyhow::Result<String> {
    let _lock = lock(state_dir)?;
    let archived = history(state_dir)?;
    if archived.is_empty() {
        bail!(
            "no archived configuration under {}: envelope archives each configuration it loads successfully",
            history_dir(state_dir).display()
        );
    }
    let current = fs::read(config_path).ok();
    let (chosen, content) = match id {
        Some(id) => {
            let chosen = find(&archived, id)?;
            (chosen, loadable(chosen)?)
        }
        None => archived
            .iter()
            .rev()
            .filter(|entry| read_archive(&entry.path).ok() != current)
            .find_map(|entry| match loadable(entry) {
                Ok(content) => Some((entry, content)),
                Err(error) => {
                    tracing::warn!("skipping {error:#}");
                    None
                }
            })
            .with_context(|| {
                "no archive both loads and differs from the current configuration: nothing to roll back to"
            })?,
    };
    crate::files::replace_keeping_attributes(config_path, &content)
        .with_context(|| format!("cannot replace {}", config_path.display()))?;
    Ok(chosen.id.clone())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn temporary_state_dir(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("envelope-archive-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn archives_list_in_order_and_skip_repeats() {
        let state = temporary_state_dir("order");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = archive(&state, b"a = 1\n", t0).unwrap();
        let again = archive(&state, b"a = 1\n", t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(a, again, "an unchanged configuration is not archived twice");
        let b = archive(&state, b"a = 2\n", t0 + Duration::from_secs(10)).unwrap();
        let listed: Vec<String> = history(&state).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(listed, vec![a.clone(), b.clone()]);
        assert!(a.starts_with("20270115T"), "{a}");
        assert!(history(&temporary_state_dir("none")).unwrap().is_empty());
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn rollback_restores_byte_for_byte() {
        let state = temporary_state_dir("rollback");
        let config = state.join("envelope.toml");
        fs::create_dir_all(&state).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let first = b"# first\n[[workload]]\nname = \"a\"\nprocess = [\"x\"]\n".to_vec();
        let second =
            b"# second\r\n# \xc3\xa9 kept as is\r\n[agent]\r\nwindow = \"2s\"\r\n".to_vec();
        let id_first = archive(&state, &first, t0).unwrap();
        archive(&state, &second, t0 + Duration::from_secs(60)).unwrap();

        // A broken edit: rollback without an id restores the last good one.
        fs::write(&config, b"[[workload]\nbroken").unwrap();
        rollback(&state, None, &config).unwrap();
        assert_eq!(fs::read(&config).unwrap(), second);
        // Already at the newest: the one before it.
        rollback(&state, None, &config).unwrap();
        assert_eq!(fs::read(&config).unwrap(), first);
        // By id (or its prefix).
        fs::write(&config, b"x").unwrap();
        let unique = &id_first[..id_first.len() - 2];
        assert_eq!(rollback(&state, Some(unique), &config).unwrap(), id_first);
        // A prefix of both archives names neither.
        let error = rollback(&state, Some(&id_first[..10]), &config)
            .unwrap_err()
            .to_string();
        assert!(error.contains("matches 2 archives"), "{error}");
        assert_eq!(fs::read(&config).unwrap(), first);
        let error = rollback(&state, Some("nope"), &config)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no archived configuration \"nope\""),
            "{error}"
        );
        let _ = fs::remove_dir_all(&state);
    }

    const GOOD: &[u8] = b"[agent]\nwindow = \"2s\"\n";

    fn secret_victim(dir: &Path) -> PathBuf {
        let victim = dir.join("victim-secret");
        fs::write(&victim, b"[agent]\nwindow = \"3s\"\n# secret\n").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        victim
    }

    #[test]
    fn planted_links_are_never_followed() {
        let state = temporary_state_dir("links");
        let config = state.join("envelope.toml");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let id = archive(&state, GOOD, t0).unwrap();
        let victim = secret_victim(&state);
        // A link that sorts as the newest archive.
        std::os::unix::fs::symlink(
            &victim,
            history_dir(&state).join("29990101T000000Z-ffffffffffff.toml"),
        )
        .unwrap();
        // And the old fixed temporary name beside the configuration.
        std::os::unix::fs::symlink(&victim, state.join("envelope.toml.partial")).unwrap();
        fs::write(&config, b"broken [[").unwrap();
        assert_eq!(
            history(&state).unwrap().len(),
            1,
            "a link is not an archive"
        );
        assert_eq!(rollback(&state, None, &config).unwrap(), id);
        assert_eq!(fs::read(&config).unwrap(), GOOD);
        assert!(
            !fs::symlink_metadata(&config)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"[agent]\nwindow = \"3s\"\n# secret\n"
        );
        let error = rollback(&state, Some("2999"), &config)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no archived configuration \"2999\""),
            "{error}"
        );
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn a_damaged_archive_or_an_empty_id_is_refused() {
        let state = temporary_state_dir("damaged");
        let config = state.join("envelope.toml");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let good = archive(&state, GOOD, t0).unwrap();
        let damaged = archive(
            &state,
            b"THIS IS NOT TOML [[[",
            t0 + Duration::from_secs(60),
        )
        .unwrap();
        fs::write(&config, b"# current\n").unwrap();
        let error = rollback(&state, Some(&damaged), &config)
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not load"), "{error}");
        assert_eq!(
            fs::read(&config).unwrap(),
            b"# current\n",
            "nothing restored"
        );
        // Without an id, the newest archive that loads.
        assert_eq!(rollback(&state, None, &config).unwrap(), good);
        let error = rollback(&state, Some(""), &config).unwrap_err().to_string();
        assert!(error.contains("an empty id names no archive"), "{error}");
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn rollback_keeps_the_files_mode_and_archives_are_private_and_bounded() {
        let state = temporary_state_dir("modes");
        let config = state.join("envelope.toml");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let id = archive(&state, GOOD, t0).unwrap();
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&history_dir(&state).join(format!("{id}.toml"))), 0o600);
        fs::write(&config, b"# edited\n").unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o640)).unwrap();
        rollback(&state, None, &config).unwrap();
        assert_eq!(mode(&config), 0o640);
        for i in 1..=(MAX_ARCHIVES as u64 + 5) {
            archive(
                &state,
                format!("# {i}\n").as_bytes(),
                t0 + Duration::from_secs(i),
            )
            .unwrap();
        }
        let kept = history(&state).unwrap();
        assert_eq!(kept.len(), MAX_ARCHIVES);
        assert!(
            kept.last().unwrap().id.starts_with("20270115T0801"),
            "{:?}",
            kept.last()
        );
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn concurrent_rollbacks_all_succeed() {
        let state = temporary_state_dir("concurrent");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let id = archive(&state, GOOD, t0).unwrap();
        let config = state.join("envelope.toml");
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..60)
                .map(|_| scope.spawn(|| rollback(&state, Some(&id), &config)))
                .collect();
            for handle in handles {
                assert_eq!(handle.join().unwrap().unwrap(), id);
            }
        });
        assert_eq!(fs::read(&config).unwrap(), GOOD);
        let leftovers: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|name| name.to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn old_archives_expire_but_the_newest_few_stay() {
        let state = temporary_state_dir("age");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut ids = Vec::new();
        for i in 0..15u64 {
            let content = format!("# {i}\n");
            ids.push(archive(&state, content.as_bytes(), t0 + Duration::from_secs(i)).unwrap());
        }
        assert_eq!(archived_at(&ids[3]), Some(t0 + Duration::from_secs(3)));
        assert_eq!(
            history(&state).unwrap().len(),
            15,
            "all younger than the age"
        );
        // 100 days later one more: of the 15 old ones only the newest 9 stay with it.
        let later = t0 + Duration::from_secs(100 * 24 * 3600);
        let newest = archive(&state, b"# new\n", later).unwrap();
        let kept: Vec<String> = history(&state).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(kept.len(), ALWAYS_KEPT);
        assert_eq!(kept[0], ids[6]);
        assert_eq!(kept.last(), Some(&newest));
        let _ = fs::remove_dir_all(&state);
    }

    #[test]
    fn a_state_directory_owned_by_another_user_is_refused() {
        use std::os::unix::fs::chown;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: only root can give a directory to another user");
            return;
        }
        let state = temporary_state_dir("owner");
        fs::create_dir_all(&state).unwrap();
        chown(&state, Some(65534), Some(65534)).unwrap();
        let error = archive(&state, GOOD, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(error.contains("belongs to uid 65534"), "{error}");
        let config = state.join("envelope.toml");
        let error = rollback(&state, None, &config).unwrap_err().to_string();
        assert!(error.contains("belongs to uid 65534"), "{error}");
        let _ = fs::remove_dir_all(&state);
        // systemd's DynamicUser= layout: /var/lib/private (root, 0700)/envelope (the service's
        // uid). Only root can put a directory there, so its owner is the one systemd chose.
        let private = temporary_state_dir("private");
        let state = private.join("envelope");
        fs::create_dir_all(&state).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        chown(&state, Some(65534), Some(65534)).unwrap();
        assert!(archive(&state, GOOD, SystemTime::now()).is_ok());
        let _ = fs::remove_dir_all(&private);
    }

    /// systemd's `DynamicUser=` makes /var/lib/envelope a link to private/envelope: a link
    /// root made where only root writes is followed; any other link is refused.
    #[test]
    fn only_a_root_made_link_to_the_state_directory_is_followed() {
        use std::os::unix::fs::{chown, lchown, symlink};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: only root can make the DynamicUser= layout");
            return;
        }
        let lib = temporary_state_dir("lib");
        let private = lib.join("private");
        let real = private.join("envelope");
        fs::create_dir_all(&real).unwrap();
        fs::set_permissions(&lib, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
        chown(&real, Some(65534), Some(65534)).unwrap();
        let state = lib.join("envelope");
        symlink("private/envelope", &state).unwrap();
        let id = archive(&state, GOOD, SystemTime::now()).unwrap();
        assert_eq!(history(&state).unwrap()[0].id, id);
        let config = lib.join("envelope.toml");
        fs::write(&config, b"# edited\n").unwrap();
        assert_eq!(rollback(&state, None, &config).unwrap(), id);
        // The same link made by another user is refused.
        lchown(&state, Some(65534), Some(65534)).unwrap();
        let error = archive(&state, GOOD, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("is a link that root did not make"),
            "{error}"
        );
        // As is a root-made link in a directory everyone writes (/tmp).
        let in_tmp = temporary_state_dir("tmp-link");
        symlink(&real, &in_tmp).unwrap();
        let error = rollback(&in_tmp, None, &config).unwrap_err().to_string();
        assert!(
            error.contains("is a link that root did not make"),
            "{error}"
        );
        let _ = fs::remove_file(&in_tmp);
        let _ = fs::remove_dir_all(&lib);
    }

    /// A link planted as `config-history` is refused before anything is done through it (the
    /// directory's mode was once set through it: root's rollback made the target 0700).
    #[test]
    fn a_planted_history_link_is_refused_and_its_target_untouched() {
        let state = temporary_state_dir("history-link");
        let victim = temporary_state_dir("history-victim");
        fs::create_dir_all(&state).unwrap();
        fs::create_dir_all(&victim).unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&victim, history_dir(&state)).unwrap();
        let config = state.join("envelope.toml");
        let error = format!("{:#}", rollback(&state, None, &config).unwrap_err());
        assert!(error.contains("a link there is refused"), "{error}");
        let mode = fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        assert_eq!(
            fs::read_dir(&victim).unwrap().count(),
            0,
            "nothing written there"
        );
        let _ = fs::remove_dir_all(&state);
        let _ = fs::remove_dir_all(&victim);
    }

    #[test]
    fn a_world_writable_state_directory_is_refused() {
        let state = temporary_state_dir("open");
        fs::create_dir_all(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let error = archive(&state, GOOD, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(error.contains("is writable by every user"), "{error}");
        let _ = fs::remove_dir_all(&state);
    }
}
