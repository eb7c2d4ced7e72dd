//! The probes' rare diagnostic events (aya-log): a live in-flight entry evicted from a full
//! slot pair, today. The programs write them to a ring buffer only at the level this module
//! picks at load time; at the default level that level is 0 (nothing), a read-only global the
//! verifier treats as a constant, so the logging branches are removed from the loaded
//! programs and cost the probes nothing. With `RUST_LOG=envelope::probes=debug` (or `-vv`)
//! they are kept, and each event reaches the agent's log at debug level.
use aya::Ebpf;
use aya_log::EbpfLogger;

/// The log target of the probes' events; enable it to make the probes write them.
pub const TARGET: &str = "envelope::probes";

/// aya-log's read-only global holding the programs' level (aya_log::LEVEL).
pub const LEVEL_GLOBAL: &str = aya_log::LEVEL;

/// aya-log's ring buffer, shrunk to one page when nothing is written to it.
pub const RING_BUFFER: &str = "AYA_LOGS";
pub const UNUSED_RING_BUFFER_BYTES: u32 = 4096;

/// The level the programs log at: debug when the agent's log shows [`TARGET`] at debug,
/// else 0, which no event reaches.
pub fn level() -> u8 {
    if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        aya_log::Level::Debug as u8
    } else {
        0
    }
}

/// Hands every event from the probes to the agent's log, at debug level whatever level the
/// probe wrote (the events are diagnostics, not the agent's own warnings).
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: TARGET, "probe: {}", record.args());
    }

    fn flush(&self) {}
}

/// The reading end of the probes' ring buffer, when they write to it.
pub struct ProbeLog {
    logger: EbpfLogger<ToTracing>,
}

impl ProbeLog {
    /// Takes the ring buffer from `ebpf` when `level` lets events through; None otherwise, or
    /// when the object has no ring buffer (said once at debug level).
    pub fn open(ebpf: &mut Ebpf, level: u8) -> Option<Self> {
        if level == 0 {
            return None;
        }
        match EbpfLogger::init_with_logger(ebpf, ToTracing) {
            Ok(logger) => Some(Self { logger }),
            Err(error) => {
                tracing::debug!(target: TARGET, "the probes' events cannot be read: {error}");
                None
            }
        }
    }

    /// Forwards what the probes wrote since the last call. The ring buffer holds 128 KiB
    /// (about a thousand events); past that the probes drop events rather than wait.
    pub fn forward(&mut self) {
        self.logger.flush();
    }
}
