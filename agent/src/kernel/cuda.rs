//! The opt-in CUDA uprobes: finds the CUDA runtime and driver libraries tracked processes
//! have mapped (through `/proc/PID/maps`, opened through the process's own root, so a
//! library inside a container or a Python wheel is found), attaches the probes once per
//! library file, and detaches them when no process maps that file any more.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use agent_common::cuda::{FUNCTIONS, Library, cookie};
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use serde::Serialize;

use crate::model::gpu::CudaProbes;

/// The entry and return programs (agent-ebpf/src/probes/cuda.rs).
const ENTRY_PROGRAM: &str = "cuda_call";
const RETURN_PROGRAM: &str = "cuda_return";

/// How often a process's memory map is read again: Python imports torch (and with it the
/// CUDA libraries) whenever it gets to it, not at start.
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);

/// Which CUDA library a mapped file is, by its name: `libcudart.so`, `libcudart.so.12`,
/// `libcudart.so.12.4.127`; `libcuda.so`, `libcuda.so.1`, `libcuda.so.550.54.15`.
/// (`libcudadebugger.so`, `libcudart_static.a` and the like are neither.)
pub fn library_of(file_name: &str) -> Option<Library> {
    let versioned = |prefix: &str| {
        file_name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    };
    // Older PyTorch wheels bundle the runtime renamed with a hash: libcudart-9335f6a2.so.12.
    let hashed_runtime = file_name.starts_with("libcudart-") && file_name.contains(".so");
    if versioned("libcudart.so") || hashed_runtime {
        Some(Library::Runtime)
    } else if versioned("libcuda.so") {
        Some(Library::Driver)
    } else {
        None
    }
}

/// A CUDA library a process maps.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MappedLibrary {
    pub kind: LibraryKind,
    /// As the process sees it.
    pub path: String,
    /// Where to open it from outside the process (after `/proc/PID/`): `root` + path, or
    /// for a file deleted while mapped (a driver upgraded under a running job), its mapping
    /// in `map_files/`, the only name left to it.
    pub open_as: String,
}

/// The CUDA libraries in a `/proc/PID/maps` text, each once.
pub fn cuda_libraries_in_maps(maps: &str) -> BTreeSet<MappedLibrary> {
    let mut seen = BTreeSet::new();
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode path: the path is the sixth field and may
            // contain spaces.
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let path = fields.nth(4)?.trim_start();
            let (path, deleted) = match path.strip_suffix(" (deleted)") {
                Some(path) => (path, true),
                None => (path, false),
            };
            let name = path.rsplit('/').next()?;
            let kind = LibraryKind(library_of(name)?);
            if !path.starts_with('/') || !seen.insert(path.to_string()) {
                return None;
            }
            let open_as = if deleted {
                format!("map_files/{range}")
            } else {
                format!("root{path}")
            };
            Some(MappedLibrary {
                kind,
                path: path.to_string(),
                open_as,
            })
        })
        .collect()
}

/// [`Library`] with an order, to keep it in sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LibraryKind(pub Library);

impl LibraryKind {
    pub fn name(self) -> &'static str {
        match self.0 {
            Library::Runtime => "runtime",
            Library::Driver => "driver",
        }
    }
}

/// The runtime first: a process's libraries are attached in this order, so the runtime's
/// calls are probed before the driver calls they make, none of which then counts as a call
/// of its own (driver first, 53 of 45,000 copies were counted under the driver's name).
impl Ord for LibraryKind {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let rank = |kind: &Self| match kind.0 {
            Library::Runtime => 0,
            Library::Driver => 1,
        };
        rank(self).cmp(&rank(other))
    }
}

impl PartialOrd for LibraryKind {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One library file the probes were attached to, or could not be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CudaLibraryStatus {
    /// As the first process that mapped it sees it.
    pub path: String,
    /// "runtime" or "driver".
    pub library: &'static str,
    /// The process it was found in first.
    pub found_in_pid: u32,
    /// Functions probed (entry and return).
    pub functions_attached: usize,
    /// Why it is not probed, or only in part; None when every function it has is.
    pub problem: Option<String>,
    /// The probes were taken off it: no process maps it any more.
    pub detached: bool,
}

/// A library file, identified by device and inode (one file under many paths: a
/// container's root, a symlink).
type FileId = (u64, u64);

struct AttachedLibrary {
    status: CudaLibraryStatus,
    links: Vec<UProbeLink>,
    /// The live processes that map it, as of their last scan.
    mapped_by: HashSet<u32>,
    /// Attaching failed for a reason that may pass (not a missing symbol): try again then.
    retry_at: Option<Instant>,
}

/// How long a library whose attach failed waits before the next try.
const RETRY_INTERVAL: Duration = Duration::from_secs(30);

/// The CUDA probes' attachments.
#[derive(Default)]
pub struct CudaAttacher {
    mode: CudaProbes,
    libraries: BTreeMap<FileId, AttachedLibrary>,
    /// Libraries detached since the probes loaded, and paths that could not be opened, the
    /// latest [`DETACHED_KEPT`] of each, for the report.
    detached: Vec<CudaLibraryStatus>,
    unopened: Vec<CudaLibraryStatus>,
    /// When each process's memory map was read last.
    scanned: HashMap<u32, Instant>,
    /// The programs could not be loaded (reported once; nothing is attached).
    refused: Option<String>,
    loaded: bool,
}

impl CudaAttacher {
    /// Every library found so far, attached or not.
    pub fn libraries(&self) -> Vec<CudaLibraryStatus> {
        self.detached
            .iter()
            .chain(&self.unopened)
            .cloned()
            .chain(
                self.libraries
                    .values()
                    .map(|library| library.status.clone()),
            )
            .collect()
    }

    /// Why the probes cannot run on this kernel, when they cannot.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Brings the attachments in line with `mode` and the live processes `alive`: new
    /// processes' maps are read, known ones again every few seconds; new library files get
    /// the probes, files no live process maps lose them.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, alive: &HashSet<u32>, mode: CudaProbes) {
        if mode != self.mode {
            if !self.libraries.is_empty() {
                tracing::info!(
                    "CUDA probes now {}: detaching them from {} libraries to attach them again",
                    mode.name(),
                    self.libraries.len()
                );
            }
            let libraries = std::mem::take(&mut self.libraries);
            detach_in_background(libraries.into_values().flat_map(|l| l.links).collect());
            self.scanned.clear();
            self.mode = mode;
        }
        if mode == CudaProbes::Off || self.refused.is_some() {
            return;
        }
        self.scanned.retain(|pid, _| alive.contains(pid));
        let now = Instant::now();
        for &pid in alive {
            let due = self
                .scanned
                .get(&pid)
                .is_none_or(|last| now.duration_since(*last) >= RESCAN_INTERVAL);
            if !due {
                continue;
            }
            self.scanned.insert(pid, now);
            // Bytes, not text: one path that is not UTF-8 must not hide the others.
            let Ok(maps) = std::fs::read(format!("/proc/{pid}/maps")) else {
                continue; // exited, or not ours to read
            };
            let found = cuda_libraries_in_maps(&String::from_utf8_lossy(&maps));
            let mut files = HashSet::new();
            for library in found {
                // Opened from outside the process: through its root, the same file inside a
                // container's mount namespace.
                let target = PathBuf::from(format!("/proc/{pid}/{}", library.open_as));
                let metadata = match std::fs::metadata(&target) {
                    Ok(metadata) => metadata,
                    Err(error) => {
                        self.note_unopened(&library, pid, &error);
                        continue;
                    }
                };
                let id = (metadata.dev(), metadata.ino());
                files.insert(id);
                let due = match self.libraries.get(&id) {
                    None => true,
                    Some(known) => known.retry_at.is_some_and(|at| now >= at),
                };
                if due {
                    let attached = self.attach(ebpf, library.kind, &library.path, &target, pid);
                    if self.refused.is_some() {
                        return;
                    }
                    if let Some(old) = self.libraries.insert(id, attached) {
                        detach_in_background(old.links);
                    }
                }
            }
            for (id, library) in &mut self.libraries {
                if files.contains(id) {
                    library.mapped_by.insert(pid);
                } else {
                    library.mapped_by.remove(&pid);
                }
            }
        }
        let mut unmapped = Vec::new();
        for (id, library) in &mut self.libraries {
            library.mapped_by.retain(|pid| alive.contains(pid));
            if library.mapped_by.is_empty() {
                unmapped.push(*id);
            }
        }
        let mut links = Vec::new();
        for id in unmapped {
            let Some(library) = self.libraries.remove(&id) else {
                continue;
            };
            if !library.links.is_empty() {
                tracing::info!(
                    "CUDA probes detached from {}: no process maps it any more",
                    library.status.path
                );
            }
            links.extend(library.links);
            let mut status = library.status;
            status.detached = true;
            if self.detached.len() == DETACHED_KEPT {
                self.detached.remove(0);
            }
            self.detached.push(status);
        }
        detach_in_background(links);
    }

    /// A CUDA library a process maps that the agent cannot open: said once per path.
    fn note_unopened(&mut self, library: &MappedLibrary, pid: u32, error: &std::io::Error) {
        if self.unopened.iter().any(|known| known.path == library.path) {
            return;
        }
        let problem = format!(
            "cannot open it through /proc/{pid}/{}: {error}",
            library.open_as
        );
        tracing::warn!(
            "CUDA probes skip {} ({}, found in pid {pid}): {problem}",
            library.path,
            library.kind.name()
        );
        if self.unopened.len() == DETACHED_KEPT {
            self.unopened.remove(0);
        }
        self.unopened.push(CudaLibraryStatus {
            path: library.path.clone(),
            library: library.kind.name(),
            found_in_pid: pid,
            functions_attached: 0,
            problem: Some(problem),
            detached: false,
        });
    }

    fn load_programs(&mut self, ebpf: &mut Ebpf) -> Result<(), String> {
        if self.loaded {
            return Ok(());
        }
        for name in [ENTRY_PROGRAM, RETURN_PROGRAM] {
            let program: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("the eBPF object has no program {name}"))?
                .try_into()
                .map_err(|error| format!("{error}"))?;
            program.load().map_err(|error| {
                format!(
                    "{} (the CUDA probes need Linux 5.15 or later, for uprobe attach cookies)",
                    super::verifier::refused("the kernel refused the CUDA probes", name, &error)
                )
            })?;
        }
        self.loaded = true;
        Ok(())
    }

    fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        kind: LibraryKind,
        path: &str,
        through_root: &std::path::Path,
        pid: u32,
    ) -> AttachedLibrary {
        let mut status = CudaLibraryStatus {
            path: path.to_string(),
            library: kind.name(),
            found_in_pid: pid,
            functions_attached: 0,
            problem: None,
            detached: false,
        };
        let mut library = AttachedLibrary {
            status: status.clone(),
            links: Vec::new(),
            mapped_by: HashSet::from([pid]),
            retry_at: None,
        };
        if let Err(problem) = self.load_programs(ebpf) {
            tracing::warn!("{problem}; GPU waits stay inferred from ioctl and poll sleeps");
            self.refused = Some(problem.clone());
            library.status.problem = Some(problem);
            return library;
        }
        let mut missing = Vec::new();
        let mut failed = Vec::new();
        // Every return probe before any entry probe. Processes already run the library: a call
        // that entered with its entry probe on and its return probe not yet would stay open
        // for its thread, and the thread's later calls would count as nested in it (not at
        // all) until it went stale after a minute. A return with no entry seen is ignored.
        let mut returns = Vec::new();
        for (index, function) in FUNCTIONS.iter().enumerate() {
            if function.library != kind.0 || !self.mode.probes(function.call) {
                continue;
            }
            match attach_probe(
                ebpf,
                RETURN_PROGRAM,
                function.symbol,
                cookie(index),
                through_root,
            ) {
                Ok(link) => returns.push((index, link)),
                Err(AttachError::NoSymbol) => missing.push(function.symbol),
                Err(AttachError::Failed(why)) => failed.push(format!("{}: {why}", function.symbol)),
            }
        }
        for (index, exit) in returns {
            let symbol = FUNCTIONS[index].symbol;
            match attach_probe(ebpf, ENTRY_PROGRAM, symbol, cookie(index), through_root) {
                // In (entry, return) pairs, as `detach_all` takes them.
                Ok(entry) => library.links.extend([entry, exit]),
                Err(AttachError::NoSymbol) => missing.push(symbol),
                Err(AttachError::Failed(why)) => failed.push(format!("{symbol}: {why}")),
            }
        }
        status.functions_attached = library.links.len() / 2;
        if !failed.is_empty() {
            library.retry_at = Some(Instant::now() + RETRY_INTERVAL);
        }
        status.problem = if status.functions_attached == 0 {
            Some(format!(
                "none of the CUDA {} functions envelope probes is in it{}",
                kind.name(),
                failed
                    .first()
                    .map_or(String::new(), |first| format!(" ({first})"))
            ))
        } else if !failed.is_empty() {
            Some(format!(
                "{} functions could not be probed: {}",
                failed.len(),
                failed.join("; ")
            ))
        } else {
            None
        };
        match &status.problem {
            None => tracing::info!(
                "CUDA probes on {path} ({}, found in pid {pid}): {} functions ({} this version \
                 does not have)",
                kind.name(),
                status.functions_attached,
                missing.len()
            ),
            Some(problem) => tracing::warn!(
                "CUDA probes on {path} ({}, found in pid {pid}): {problem}{}",
                kind.name(),
                if library.retry_at.is_some() {
                    "; trying again in 30 s"
                } else {
                    ""
                }
            ),
        }
        library.status = status;
        library
    }
}

/// Detached libraries the report keeps.
const DETACHED_KEPT: usize = 32;

/// Removing a uprobe waits for the kernel to be sure no CPU is still in it (about 0.1 s
/// here, per link): 88 links one after another would stall the once-a-second refresh for
/// 9 s. They go on a thread of their own, each link on its own thread so the waits overlap.
fn detach_in_background(links: Vec<UProbeLink>) {
    if links.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("envelope-cuda-detach".into())
        .spawn(move || detach_all(links));
    if let Err(error) = spawned {
        tracing::debug!("no thread to detach the CUDA probes on ({error}): they go at exit");
    }
}

/// Threads that drop links at once.
const DETACH_THREADS: usize = 16;

/// Drops every link, on threads of their own so the kernel's waits overlap. Entry probes
/// go first (links come in entry, return pairs): a return probe removed before its entry
/// probe would leave a call that entered with no return seen.
fn detach_all(links: Vec<UProbeLink>) {
    let (entries, returns): (Vec<_>, Vec<_>) = links
        .into_iter()
        .enumerate()
        .partition(|(index, _)| index % 2 == 0);
    for group in [entries, returns] {
        let mut group: Vec<UProbeLink> = group.into_iter().map(|(_, link)| link).collect();
        while !group.is_empty() {
            let batch: Vec<UProbeLink> = group.drain(..group.len().min(DETACH_THREADS)).collect();
            std::thread::scope(|scope| {
                for link in batch {
                    // No thread to spare: the link was dropped with the failed closure.
                    let _ = std::thread::Builder::new()
                        .name("envelope-detach".into())
                        .spawn_scoped(scope, move || drop(link));
                }
            });
        }
    }
}

impl Drop for CudaAttacher {
    fn drop(&mut self) {
        let links: Vec<UProbeLink> = std::mem::take(&mut self.libraries)
            .into_values()
            .flat_map(|library| library.links)
            .collect();
        detach_all(links);
    }
}

/// Whether an attach failed because the library lacks the function (aya reports every
/// symbol lookup failure as `SymbolError`, an unreadable or unparseable file too; its cause
/// is private, so it is told by its text).
fn classify(error: &aya::programs::ProgramError) -> AttachError {
    use aya::programs::{ProgramError, uprobe::UProbeError};
    let text = format!("{error:#}");
    let source = match error {
        ProgramError::UProbeError(UProbeError::SymbolError { error, .. }) => error.to_string(),
        _ => return AttachError::Failed(text),
    };
    // Absent from the library (and from its debug file, where one is named).
    let missing = ["unknown symbol", "debuglink", "mismatched build IDs"];
    if missing.iter().any(|cause| source.contains(cause)) {
        AttachError::NoSymbol
    } else {
        AttachError::Failed(format!("{text}: {source}"))
    }
}

enum AttachError {
    /// The library does not export it (an older or newer version).
    NoSymbol,
    Failed(String),
}

/// One probe (`program_name`, the entry or the return program) on one function.
fn attach_probe(
    ebpf: &mut Ebpf,
    program_name: &str,
    symbol: &str,
    cookie: u64,
    target: &std::path::Path,
) -> Result<UProbeLink, AttachError> {
    let program: &mut UProbe = ebpf
        .program_mut(program_name)
        .ok_or_else(|| AttachError::Failed(format!("no program {program_name}")))?
        .try_into()
        .map_err(|error| AttachError::Failed(format!("{error}")))?;
    let point = UProbeAttachPoint {
        location: UProbeAttachLocation::Symbol(symbol),
        cookie: Some(cookie),
    };
    let link = program
        .attach(point, target, UProbeScope::AllProcesses)
        .map_err(|error| classify(&error))?;
    program
        .take_link(link)
        .map_err(|error| AttachError::Failed(format!("{error:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_told_by_name_with_any_version() {
        for runtime in [
            "libcudart.so",
            "libcudart.so.12",
            "libcudart.so.12.4.127",
            "libcudart-9335f6a2.so.12",
        ] {
            assert_eq!(library_of(runtime), Some(Library::Runtime), "{runtime}");
        }
        for driver in ["libcuda.so", "libcuda.so.1", "libcuda.so.550.54.15"] {
            assert_eq!(library_of(driver), Some(Library::Driver), "{driver}");
        }
        for neither in [
            "libcudadebugger.so.1",
            "libcudart_static.a",
            "libcuda.sox",
            "libcudart-static.a",
            "libcudnn.so.9",
            "libc.so.6",
        ] {
            assert_eq!(library_of(neither), None, "{neither}");
        }
    }

    #[test]
    fn maps_yield_each_cuda_library_once_with_its_full_path_runtimes_first() {
        let maps = "\
7f0000000000-7f0000001000 r--p 00000000 fd:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000001000-7f0000002000 r-xp 00001000 fd:01 5678 /opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12
7f0000002000-7f0000003000 r--p 00002000 fd:01 5678 /opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12
7f0000003000-7f0000004000 r-xp 00000000 fd:01 91 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
7f0000004000-7f0000005000 r-xp 00000000 fd:01 92                         /tmp/dir with space/libcuda.so.1
7f0000005000-7f0000006000 r-xp 00000000 fd:01 93 /tmp/old/libcudart.so.11.0 (deleted)
7f0000006000-7f0000007000 r--p 00001000 fd:01 93 /tmp/old/libcudart.so.11.0 (deleted)
7f0000007000-7f0000008000 rw-p 00000000 00:00 0 [heap]
7f0000008000-7f0000009000 rw-p 00000000 00:00 0
";
        let found: Vec<(&str, String, String)> = cuda_libraries_in_maps(maps)
            .into_iter()
            .map(|library| (library.kind.name(), library.path, library.open_as))
            .collect();
        let runtime =
            "/opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12";
        assert_eq!(
            found,
            vec![
                // Runtimes first, the order they are attached in.
                ("runtime", runtime.to_string(), format!("root{runtime}")),
                // Deleted while mapped: reached through its first mapping.
                (
                    "runtime",
                    "/tmp/old/libcudart.so.11.0".to_string(),
                    "map_files/7f0000005000-7f0000006000".to_string()
                ),
                (
                    "driver",
                    "/tmp/dir with space/libcuda.so.1".to_string(),
                    "root/tmp/dir with space/libcuda.so.1".to_string()
                ),
                (
                    "driver",
                    "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15".to_string(),
                    "root/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15".to_string()
                ),
            ]
        );
    }
}
