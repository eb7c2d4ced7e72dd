//! The configuration parachute: every configuration that loaded successfully is archived
//! under the state directory; `envelope config history` lists them and `envelope config
//! rollback [ID]` puts one back, byte for byte.
use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

/// Default state directory (systemd's StateDirectory=envelope).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/envelope";

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

/// Archived configurations, oldest first.
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
            let bytes = entry.metadata().ok()?.len();
            Some(ArchivedConfig { id, path, bytes })
        })
        .collect();
    archived.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(archived)
}

/// Archives the configuration file that just loaded, as a known good one to roll back to. A
/// failure is logged, never fatal: the agent must run with a configuration it could read.
pub fn archive_loaded(state_dir: &Path, config_path: &Path) {
    let archived = std::fs::read(config_path)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| archive(state_dir, &bytes, SystemTime::now()));
    if let Err(error) = archived {
        tracing::warn!(
            "could not archive {} under {}: {error:#}",
            config_path.display(),
            state_dir.display()
        );
    }
}

/// Archives `content` unless it is the newest archive already. Returns its id.
pub fn archive(state_dir: &Path, content: &[u8], now: SystemTime) -> anyhow::Result<String> {
    let hash = short_hash(content);
    let existing = history(state_dir)?;
    if let Some(newest) = existing.last()
        && newest.id.ends_with(&hash)
        && fs::read(&newest.path).is_ok_and(|old| old == content)
    {
        return Ok(newest.id.clone());
    }
    let stamp = humantime::format_rfc3339_seconds(now)
        .to_string()
        .replace([':', '-'], "");
    let id = format!("{stamp}-{hash}");
    let dir = history_dir(state_dir);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_atomically(&dir.join(format!("{id}.toml")), content)?;
    Ok(id)
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomically(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    crate::files::write_atomically(path, content, None)
        .with_context(|| format!("cannot replace {}", path.display()))
}

/// Puts an archived configuration back at `config_path`. Without `id`: the last known good
/// one, i.e. the newest archive that differs from what the file holds now. Returns the id.
pub fn rollback(state_dir: &Path, id: Option<&str>, config_path: &Path) -> anyhow::Result<String> {
    let archived = history(state_dir)?;
    if archived.is_empty() {
        bail!(
            "no archived configuration under {}: envelope archives each configuration it loads successfully",
            history_dir(state_dir).display()
        );
    }
    let current = fs::read(config_path).ok();
    let chosen = match id {
        Some(id) => archived
            .iter()
            .find(|entry| entry.id == id || entry.id.starts_with(id))
            .with_context(|| {
                format!("no archived configuration {id:?}; `envelope config history` lists them")
            })?,
        None => archived
            .iter()
            .rev()
            .find(|entry| fs::read(&entry.path).ok() != current)
            .with_context(
                || "every archived configuration equals the current one: nothing to roll back to",
            )?,
    };
    let content =
        fs::read(&chosen.path).with_context(|| format!("cannot read {}", chosen.path.display()))?;
    write_atomically(config_path, &content)?;
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
        let second = b"# second\r\n\xc3\xa9 kept as is\n".to_vec();
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
        assert_eq!(
            rollback(&state, Some(&id_first[..10]), &config).unwrap(),
            id_first
        );
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
}
