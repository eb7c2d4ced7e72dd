//! Running `envelope run` in tests: the daemon with its log collected, a read load, a scratch
//! directory, and waiting for a condition with a deadline.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{envelope_binary, unique_name};

/// Direct reads in a loop, by processes named `dd`: storage traffic the probes must see.
pub struct ReadLoad(Child);

impl ReadLoad {
    pub fn start(file: &Path) -> Self {
        Self(
            Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "while :; do dd if={} of=/dev/null bs=64k iflag=direct 2>/dev/null; done",
                        file.display()
                    ),
                ])
                .spawn()
                .expect("spawn the read load"),
        )
    }
}

impl Drop for ReadLoad {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-P", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon, with its stderr collected line by line; killed on drop.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// `envelope run --config CONFIG` plus `extra` arguments, with `environment` set.
    pub fn start(config: &Path, extra: &[&str]) -> Self {
        Self::start_with(config, extra, &[])
    }

    pub fn start_with(config: &Path, extra: &[&str], environment: &[(&str, &Path)]) -> Self {
        let mut command = Command::new(envelope_binary());
        for (name, value) in environment {
            command.env(name, value);
        }
        let mut child = command
            .args(["run", "--config"])
            .arg(config)
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start envelope run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("envelope: {line}");
                lines.lock().unwrap().push(line);
            }
        });
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)
            .expect("signal the daemon");
    }

    pub fn log_lines_with(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("daemon status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// SIGTERM and the exit code.
    pub fn stop(mut self) -> i32 {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the daemon did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Self {
        let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tmp"))
            .join(unique_name("daemon-"));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
