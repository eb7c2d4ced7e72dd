//! Files written whole or not at all: a uniquely named temporary file beside the target
//! (created with O_EXCL by `tempfile`, so a planted file or link there is never followed or
//! reused, and concurrent writers never share one), synced, given its mode, then renamed
//! over the target. Used for budget state, configuration archives and rollbacks, and
//! `install`. Imports nothing else from the crate.
use std::{
    io::{self, Read, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

/// Replaces `target` with `content` in one rename; `mode` (e.g. 0o644) or tempfile's 0600.
pub fn write_atomically(target: &Path, content: &[u8], mode: Option<u32>) -> io::Result<()> {
    write_from(target, &mut &content[..], mode)
}

/// Replaces `target` with `content`, keeping the mode and owner the file has (0644 and the
/// caller's for a new one): a rollback must not turn 0640 root:envelope into 0600 or 0644.
pub fn replace_keeping_attributes(target: &Path, content: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // Following a link: the attributes of the file the configuration is.
    let existing = std::fs::metadata(target).ok();
    let mode = existing
        .as_ref()
        .map_or(0o644, |metadata| metadata.permissions().mode() & 0o7777);
    let owner = existing.map(|metadata| (metadata.uid(), metadata.gid()));
    write_with(target, &mut &content[..], Some(mode), owner)
}

/// The same, copying from a reader (e.g. the running binary, which must never be written in
/// place).
pub fn write_from(target: &Path, source: &mut dyn Read, mode: Option<u32>) -> io::Result<()> {
    write_with(target, source, mode, None)
}

fn write_with(
    target: &Path,
    source: &mut dyn Read,
    mode: Option<u32>,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let directory = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let mut temporary = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(directory)?;
    io::copy(source, temporary.as_file_mut())?;
    temporary.as_file_mut().flush()?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(temporary.as_file(), Some(uid), Some(gid))?;
    }
    if let Some(mode) = mode {
        temporary
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    temporary.as_file().sync_all()?;
    // On failure the temporary file is removed when `temporary` drops.
    temporary.persist(target).map_err(|error| error.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writers_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.json");
        std::thread::scope(|scope| {
            for i in 0..16 {
                let target = target.clone();
                scope.spawn(move || {
                    write_atomically(&target, format!("{i:04}").as_bytes(), Some(0o640)).unwrap()
                });
            }
        });
        let content = std::fs::read_to_string(&target).unwrap();
        assert_eq!(content.len(), 4);
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // Nothing left behind but the target.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_planted_link_at_a_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "secret").unwrap();
        let target = dir.path().join("config.toml");
        // The old fixed temporary names.
        std::os::unix::fs::symlink(&victim, dir.path().join("config.toml.partial")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".config.toml.partial")).unwrap();
        write_atomically(&target, b"new", None).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "secret");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert!(!target.symlink_metadata().unwrap().file_type().is_symlink());
    }
}
