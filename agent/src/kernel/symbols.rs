//! Kernel function addresses (`/proc/kallsyms`), for probes that recognise a kernel object by
//! the function it points to: a bio whose completion is `iomap_dio_bio_end_io` belongs to a
//! file system's direct I/O.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
};

/// Where the kernel lists its symbols. Addresses read as 0 to a reader without CAP_SYSLOG
/// (`kernel.kptr_restrict`), as to the agent run unprivileged.
pub const KALLSYMS: &str = "/proc/kallsyms";

/// The address of the kernel text symbol `name` (not a module's) in a kallsyms file; None
/// where it is missing, hidden (listed as 0) or the file cannot be read.
pub fn text_symbol_address(kallsyms: &Path, name: &str) -> Option<u64> {
    let file = std::fs::File::open(kallsyms).ok()?;
    // About 200,000 lines: read line by line rather than held whole (10 MB).
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| text_symbol_in_line(&line, name))
}

/// `line` is "ADDRESS TYPE NAME [MODULE]"; the address when it names text symbol `name` of
/// the kernel itself.
fn text_symbol_in_line(line: &str, name: &str) -> Option<u64> {
    let mut fields = line.split_ascii_whitespace();
    let (address, kind, symbol) = (fields.next()?, fields.next()?, fields.next()?);
    if symbol != name || !matches!(kind, "T" | "t") || fields.next().is_some() {
        return None;
    }
    u64::from_str_radix(address, 16)
        .ok()
        .filter(|&address| address != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_symbol_is_found_and_hidden_or_module_or_data_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kallsyms");
        std::fs::write(
            &path,
            "ffffffff81762560 T __traceiter_iomap_dio_complete\n\
             ffffffff817686a0 t __pfx_iomap_dio_bio_end_io\n\
             ffffffff817686b0 T iomap_dio_bio_end_io\n\
             ffffffffc0a01000 t ext4_helper\t[ext4]\n\
             ffffffff82206e88 D some_data\n",
        )
        .unwrap();
        assert_eq!(
            text_symbol_address(&path, "iomap_dio_bio_end_io"),
            Some(0xffff_ffff_8176_86b0)
        );
        assert_eq!(text_symbol_address(&path, "iomap_dio_bio_end"), None);
        assert_eq!(
            text_symbol_address(&path, "ext4_helper"),
            None,
            "a module's"
        );
        assert_eq!(text_symbol_address(&path, "some_data"), None, "not text");
        std::fs::write(&path, "0000000000000000 T iomap_dio_bio_end_io\n").unwrap();
        assert_eq!(
            text_symbol_address(&path, "iomap_dio_bio_end_io"),
            None,
            "hidden by kptr_restrict"
        );
        assert_eq!(
            text_symbol_address(&dir.path().join("missing"), "iomap_dio_bio_end_io"),
            None
        );
    }
}
