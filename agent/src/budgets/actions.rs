//! Actions on breach transitions, as policy from the configuration: run a command (argv, no
//! shell, with a timeout, the breach in environment variables) or POST the breach as JSON to
//! a webhook. Rate limited per budget, a bounded number in flight; each runs as a task of its
//! own so it never blocks or crashes the agent; the outcome is returned for the log.
use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tokio::io::AsyncReadExt as _;

use serde::Serialize;

use crate::budgets::BreachEvent;
pub use crate::config::Action;

/// How an action went.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum ActionOutcome {
    /// The command exited (with its code) or the webhook answered (with its HTTP status).
    Done {
        code: i32,
        output: String,
    },
    TimedOut {
        after_ms: u64,
    },
    Failed {
        error: String,
    },
    /// Skipped: the budget's last action ran less than the minimum interval ago.
    RateLimited,
}

/// Environment variables a command action receives.
pub fn breach_environment(event: &BreachEvent, workload: &str) -> Vec<(String, String)> {
    vec![
        ("ENVELOPE_BUDGET".into(), event.budget.clone()),
        ("ENVELOPE_WORKLOAD".into(), workload.to_string()),
        ("ENVELOPE_STATUS".into(), event.status.name().into()),
        ("ENVELOPE_BREACH_ID".into(), event.breach_id.clone()),
        (
            "ENVELOPE_OBSERVED".into(),
            event.observed.map_or_else(String::new, |v| v.to_string()),
        ),
        ("ENVELOPE_THRESHOLD".into(), event.threshold.to_string()),
        ("ENVELOPE_REASON".into(), event.reason.clone()),
        (
            "ENVELOPE_CAUSE".into(),
            event
                .cause
                .as_ref()
                .map_or_else(String::new, |c| c.summary.clone()),
        ),
        (
            "ENVELOPE_BOTTLENECK".into(),
            event
                .cause
                .as_ref()
                .map_or_else(String::new, |c| c.bottleneck.name().to_string()),
        ),
        (
            "ENVELOPE_SOURCE".into(),
            event.source.clone().unwrap_or_default(),
        ),
        (
            "ENVELOPE_STAGE".into(),
            event
                .stage
                .as_ref()
                .map_or_else(String::new, |s| s.stage.clone()),
        ),
        (
            "ENVELOPE_STAGE_OBSERVED".into(),
            event
                .stage
                .as_ref()
                .and_then(|s| s.observed)
                .map_or_else(String::new, |v| v.to_string()),
        ),
        (
            "ENVELOPE_STAGE_ALLOCATION".into(),
            event
                .stage
                .as_ref()
                .map_or_else(String::new, |s| s.allocation.to_string()),
        ),
    ]
}

/// Output kept from a command, so a chatty one cannot fill the log (the rest is read and
/// dropped, so the command never blocks on a full pipe).
const MAX_OUTPUT_BYTES: usize = 1024;

/// Actions running at once (each holds a process or a connection against the unit's
/// TasksMax); more wait their turn, in order.
pub const MAX_ACTIONS_IN_FLIGHT: usize = 4;

/// Actions waiting for a turn; past this they are skipped with a log line rather than queued
/// without bound. An envelope whose stages all fire in one window queues, not drops.
pub const MAX_ACTIONS_WAITING: usize = 16;

/// Turns to run an action: [`MAX_ACTIONS_IN_FLIGHT`] at once, [`MAX_ACTIONS_WAITING`] queued.
struct Turns {
    running: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
    max_running: usize,
    max_waiting: usize,
}

/// One place in the queue, given back however the wait ends (a turn, or the task dropped).
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Turns {
    fn new(max_running: usize, max_waiting: usize) -> Self {
        Self {
            running: Arc::new(tokio::sync::Semaphore::new(max_running)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            max_running,
            max_waiting,
        }
    }

    /// A turn, after those that started waiting before (the semaphore is fair); None when
    /// the queue is full.
    async fn take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering;
        if let Ok(turn) = self.running.clone().try_acquire_owned() {
            return Some(turn);
        }
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < self.max_waiting).then_some(waiting + 1)
            })
            .ok()?;
        let _place = Waiting(&self.waiting);
        self.running.clone().acquire_owned().await.ok()
    }
}

/// The agent's own variables a command inherits; nothing else of its environment (which may
/// hold OTLP credentials) reaches an action.
const INHERITED_VARIABLES: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];

/// Reads a stream to its end, keeping the first `MAX_OUTPUT_BYTES`.
async fn read_capped(mut stream: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(read) = stream.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        let room = MAX_OUTPUT_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..read.min(room)]);
    }
    kept
}

/// Runs argv (no shell) in a process group of its own with only `environment` and
/// [`INHERITED_VARIABLES`]; at `timeout` the whole group is killed (grandchildren included).
pub async fn run_command(
    argv: &[String],
    environment: &[(String, String)],
    timeout: Duration,
) -> ActionOutcome {
    let Some((program, arguments)) = argv.split_first() else {
        return ActionOutcome::Failed {
            error: "empty command".into(),
        };
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(arguments)
        .env_clear()
        .envs(
            INHERITED_VARIABLES
                .iter()
                .filter_map(|name| Some((name, std::env::var_os(name)?))),
        )
        .envs(environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return ActionOutcome::Failed {
                error: format!("cannot start {program}: {error}"),
            };
        }
    };
    let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
    let reading = child
        .stdout
        .take()
        .map(|stdout| tokio::spawn(read_capped(stdout)));
    let started = Instant::now();
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            // A grandchild may keep the pipe open: take what came within a moment, then end
            // the action's process group so nothing it left behind holds the pipe (or a task).
            let output = match reading {
                Some(mut reading) => {
                    match tokio::time::timeout(Duration::from_millis(500), &mut reading).await {
                        Ok(output) => output.unwrap_or_default(),
                        Err(_) => {
                            reading.abort();
                            if let Some(group) = group {
                                let _ = nix::sys::signal::killpg(
                                    group,
                                    nix::sys::signal::Signal::SIGKILL,
                                );
                            }
                            Vec::new()
                        }
                    }
                }
                None => Vec::new(),
            };
            ActionOutcome::Done {
                code: status.code().unwrap_or(-1),
                output: String::from_utf8_lossy(&output).into_owned(),
            }
        }
        Ok(Err(error)) => ActionOutcome::Failed {
            error: error.to_string(),
        },
        Err(_) => {
            if let Some(group) = group {
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
            if let Some(reading) = reading {
                reading.abort();
            }
            ActionOutcome::TimedOut {
                after_ms: started.elapsed().as_millis() as u64,
            }
        }
    }
}

/// Addresses a webhook may not reach unless its action says `allow_link_local = true`:
/// link-local ranges, where clouds serve instance metadata and credentials (169.254.169.254,
/// fd00:ec2::254), and Alibaba's metadata address.
pub fn forbidden_target(ip: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let v4 = match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    if let Some(v4) = v4 {
        return v4.is_link_local() || v4 == Ipv4Addr::new(100, 100, 100, 200);
    }
    let IpAddr::V6(v6) = ip else { return false };
    (v6.segments()[0] & 0xffc0) == 0xfe80
        || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
}

/// Resolves the webhook's host once, refuses forbidden addresses, and pins the connection to
/// the address that was checked (a second lookup could answer differently).
async fn checked_client(
    url: &str,
    timeout: Duration,
    allow_link_local: bool,
) -> Result<reqwest::Client, String> {
    let parsed = url::Url::parse(url).map_err(|error| format!("not a URL: {error}"))?;
    let host = parsed.host_str().ok_or("the URL has no host")?.to_string();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<std::net::SocketAddr> = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![std::net::SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(timeout, tokio::net::lookup_host((bare, port)))
            .await
            .map_err(|_| format!("resolving {host} timed out"))?
            .map_err(|error| format!("cannot resolve {host}: {error}"))?
            .collect(),
    };
    let Some(address) = addresses.first().copied() else {
        return Err(format!("{host} resolves to no address"));
    };
    if !allow_link_local && let Some(bad) = addresses.iter().find(|a| forbidden_target(a.ip())) {
        return Err(format!(
            "refused: {host} is {}, a link-local or cloud-metadata address; set allow_link_local = true on this action if that is intended",
            bad.ip()
        ));
    }
    reqwest::Client::builder()
        // No redirects: a POST must not turn into a GET to another host, nor carry its
        // headers there.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("envelope/", env!("CARGO_PKG_VERSION")))
        .resolve(bare, address)
        .build()
        .map_err(|error| format!("cannot set up the HTTP client: {error}"))
}

/// POSTs `body` as JSON to `url` with `headers`.
pub async fn post_webhook(
    url: &str,
    headers: &[(String, String)],
    allow_link_local: bool,
    body: &serde_json::Value,
    timeout: Duration,
) -> ActionOutcome {
    let client = match checked_client(url, timeout, allow_link_local).await {
        Ok(client) => client,
        Err(error) => return ActionOutcome::Failed { error },
    };
    let mut request = client.post(url).timeout(timeout).json(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    match request.send().await {
        Ok(response) => ActionOutcome::Done {
            code: i32::from(response.status().as_u16()),
            output: String::new(),
        },
        // reqwest's message names the URL; show it without credentials.
        Err(error) => ActionOutcome::Failed {
            error: format!(
                "{}: {}",
                crate::config::redacted_url(url),
                error.without_url()
            ),
        },
    }
}

/// At most one action run per budget per `min_interval`.
#[derive(Debug)]
pub struct RateLimiter {
    min_interval: Duration,
    last_run: HashMap<String, Instant>,
}

impl RateLimiter {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            last_run: HashMap::new(),
        }
    }

    /// A new minimum interval (a reload), keeping when each budget last acted.
    pub fn set_min_interval(&mut self, min_interval: Duration) {
        self.min_interval = min_interval;
    }

    /// True (and remembered) when the budget may act now.
    pub fn allow(&mut self, budget: &str, now: Instant) -> bool {
        match self.last_run.get(budget) {
            Some(last) if now.duration_since(*last) < self.min_interval => false,
            _ => {
                self.last_run.insert(budget.to_string(), now);
                true
            }
        }
    }
}

/// Runs `action` for `event` as a task; the handle yields the outcome. At most
/// [`MAX_ACTIONS_IN_FLIGHT`] run at once and [`MAX_ACTIONS_WAITING`] wait: past that the
/// action is skipped and says so.
pub fn spawn(
    action: Action,
    event: BreachEvent,
    workload: String,
) -> tokio::task::JoinHandle<ActionOutcome> {
    static TURNS: OnceLock<Arc<Turns>> = OnceLock::new();
    let turns = TURNS
        .get_or_init(|| Arc::new(Turns::new(MAX_ACTIONS_IN_FLIGHT, MAX_ACTIONS_WAITING)))
        .clone();
    tokio::spawn(run_in_turn(turns, action, event, workload))
}

async fn run_in_turn(
    turns: Arc<Turns>,
    action: Action,
    event: BreachEvent,
    workload: String,
) -> ActionOutcome {
    let Some(_turn) = turns.take().await else {
        return ActionOutcome::Failed {
            error: format!(
                "skipped: {} actions are running and {} more waiting (slow commands or webhooks?)",
                turns.max_running, turns.max_waiting
            ),
        };
    };
    match action {
        Action::Command { argv, timeout } => {
            run_command(&argv, &breach_environment(&event, &workload), timeout).await
        }
        Action::Webhook {
            url,
            timeout,
            headers,
            allow_link_local,
        } => {
            let body = serde_json::json!({ "workload": workload, "event": event });
            post_webhook(&url, &headers, allow_link_local, &body, timeout).await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::TcpListener,
    };

    use super::*;
    use crate::model::vocabulary::BreachStatus;

    fn event() -> BreachEvent {
        BreachEvent {
            budget: "storage p95".into(),
            status: BreachStatus::Firing,
            breach_id: "storage p95@1800000000".into(),
            observed: Some(84.0),
            threshold: 10.0,
            burn_rates: vec![(3600, 20.0, 30.0)],
            reason: "burn rate 20 over 1h and 30 over 5m reached 14.4".into(),
            cause: None,
            source: Some("engine, vllm".into()),
            stage: None,
        }
    }

    /// Two run, two wait and run after them, in order; the fifth is skipped and says why.
    #[tokio::test]
    async fn actions_past_the_running_bound_wait_and_past_the_queue_are_skipped() {
        let turns = Arc::new(Turns::new(2, 2));
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("order");
        let started = std::time::Instant::now();
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let action = Action::Command {
                    argv: [
                        "sh",
                        "-c",
                        &format!("sleep 0.3; echo {i} >> {}", log.display()),
                    ]
                    .map(String::from)
                    .to_vec(),
                    timeout: Duration::from_secs(10),
                };
                // The test's runtime has one thread: the tasks ask for turns in this order.
                tokio::spawn(run_in_turn(
                    turns.clone(),
                    action,
                    event(),
                    "trainer".into(),
                ))
            })
            .collect();
        let mut outcomes = Vec::new();
        for handle in handles {
            outcomes.push(handle.await.unwrap());
        }
        for outcome in &outcomes[..4] {
            assert!(
                matches!(outcome, ActionOutcome::Done { code: 0, .. }),
                "{outcome:?}"
            );
        }
        let ActionOutcome::Failed { error } = &outcomes[4] else {
            panic!("the fifth should be skipped: {:?}", outcomes[4])
        };
        assert!(
            error.contains("2 actions are running and 2 more waiting"),
            "{error}"
        );
        let order = std::fs::read_to_string(&log).unwrap();
        let mut lines: Vec<&str> = order.lines().collect();
        // The first two ran together, then the two queued ones.
        lines[..2].sort();
        lines[2..].sort();
        assert_eq!(lines, ["0", "1", "2", "3"]);
        assert!(
            started.elapsed() >= Duration::from_millis(600),
            "the queued ones waited for a turn"
        );
        assert_eq!(turns.waiting.load(std::sync::atomic::Ordering::Acquire), 0);
    }

    /// A waiting action whose task is dropped (the runtime shutting down) gives its place
    /// back: the queue does not fill with the dead.
    #[tokio::test]
    async fn a_dropped_waiter_gives_its_place_back() {
        let turns = Arc::new(Turns::new(1, 1));
        let held = turns.take().await.expect("the one running turn");
        let waiter = tokio::spawn({
            let turns = turns.clone();
            async move { turns.take().await.is_some() }
        });
        while turns.waiting.load(std::sync::atomic::Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(turns.waiting.load(std::sync::atomic::Ordering::Acquire), 0);
        drop(held);
        assert!(turns.take().await.is_some());
    }

    #[tokio::test]
    async fn commands_get_the_breach_in_their_environment_and_no_shell() {
        let outcome = spawn(
            Action::Command {
                // printenv with names, not `env`: the output is capped at MAX_OUTPUT_BYTES and
                // a CI environment alone can exceed it.
                argv: [
                    "printenv",
                    "ENVELOPE_BUDGET",
                    "ENVELOPE_WORKLOAD",
                    "ENVELOPE_STATUS",
                    "ENVELOPE_BREACH_ID",
                    "ENVELOPE_OBSERVED",
                    "ENVELOPE_THRESHOLD",
                ]
                .map(String::from)
                .to_vec(),
                timeout: Duration::from_secs(5),
            },
            event(),
            "trainer".into(),
        )
        .await
        .unwrap();
        let ActionOutcome::Done { code, output } = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(code, 0, "{output}");
        assert_eq!(
            output,
            "storage p95\ntrainer\nfiring\nstorage p95@1800000000\n84\n10\n"
        );
        // No shell: a `;` is just an argument.
        let outcome = run_command(
            &["echo".into(), "a;".into(), "exit 3".into()],
            &[],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            outcome,
            ActionOutcome::Done {
                code: 0,
                output: "a; exit 3\n".into()
            }
        );
    }

    #[tokio::test]
    async fn a_hanging_command_is_killed_at_its_timeout() {
        let started = Instant::now();
        let outcome = run_command(
            &["sleep".into(), "30".into()],
            &[],
            Duration::from_millis(200),
        )
        .await;
        assert!(
            matches!(outcome, ActionOutcome::TimedOut { after_ms } if after_ms >= 200),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let outcome =
            run_command(&["/nonexistent/pager".into()], &[], Duration::from_secs(1)).await;
        assert!(
            matches!(outcome, ActionOutcome::Failed { ref error } if error.contains("cannot start")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_command_inherits_only_path_and_locale_and_its_group_dies_at_the_timeout() {
        if std::env::var_os("HOME").is_some() {
            let outcome = run_command(
                &["printenv".into(), "HOME".into()],
                &[],
                Duration::from_secs(5),
            )
            .await;
            assert_eq!(
                outcome,
                ActionOutcome::Done {
                    code: 1,
                    output: String::new()
                }
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let started = Instant::now();
        let outcome = run_command(
            &["sh".into(), "-c".into(), script],
            &[],
            Duration::from_millis(300),
        )
        .await;
        assert!(
            matches!(outcome, ActionOutcome::TimedOut { .. }),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let grandchild = std::fs::read_to_string(&pid_file).unwrap();
        // Killed with its group: gone, or a zombie waiting for its new parent to reap it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", grandchild.trim()));
            let dead = state.as_ref().map_or(true, |stat| stat.contains(") Z "));
            if dead {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "grandchild still running: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A chatty command does not stall on a full pipe; its output is capped.
        let outcome = run_command(
            &[
                "sh".into(),
                "-c".into(),
                "head -c 1000000 /dev/zero | tr '\\0' x".into(),
            ],
            &[],
            Duration::from_secs(10),
        )
        .await;
        let ActionOutcome::Done { code, output } = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!((code, output.len()), (0, MAX_OUTPUT_BYTES));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn webhooks_receive_the_breach_as_json() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            let mut authorization = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.to_ascii_lowercase().starts_with("authorization:") {
                    authorization = line["authorization:".len()..].trim().to_string();
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; length];
            std::io::Read::read_exact(&mut reader, &mut body).unwrap();
            reader
                .get_mut()
                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            (String::from_utf8(body).unwrap(), authorization)
        });
        let outcome = spawn(
            Action::Webhook {
                url,
                timeout: Duration::from_secs(5),
                headers: vec![("authorization".into(), "Bearer s3cret".into())],
                allow_link_local: false,
            },
            event(),
            "trainer".into(),
        )
        .await
        .unwrap();
        assert_eq!(
            outcome,
            ActionOutcome::Done {
                code: 204,
                output: String::new()
            }
        );
        let (body, authorization) = server.join().unwrap();
        assert_eq!(authorization, "Bearer s3cret");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["workload"], "trainer");
        assert_eq!(body["event"]["breach_id"], "storage p95@1800000000");
        assert_eq!(body["event"]["status"], "firing");
        assert_eq!(body["event"]["observed"], 84.0);
    }

    #[tokio::test]
    async fn an_unreachable_webhook_fails_without_hanging() {
        // A port that was free a moment ago: connection refused.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let outcome = post_webhook(
            &format!("http://user:pw@127.0.0.1:{port}/?token=t0ken"),
            &[],
            false,
            &serde_json::json!({}),
            Duration::from_secs(2),
        )
        .await;
        let ActionOutcome::Failed { error } = outcome else {
            panic!("{outcome:?}")
        };
        // The error names the webhook without its credentials.
        assert!(!error.contains("pw") && !error.contains("t0ken"), "{error}");
        assert!(error.contains("127.0.0.1"), "{error}");
    }

    /// A redirect is not followed: the POST (and its headers) never reach the other host.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_webhook_redirect_is_not_followed() {
        let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = format!("http://{}/stolen", elsewhere.local_addr().unwrap());
        elsewhere.set_nonblocking(true).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut request);
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
            );
            stream.write_all(answer.as_bytes()).unwrap();
        });
        let outcome = post_webhook(
            &url,
            &[("authorization".into(), "Bearer s3cret".into())],
            false,
            &serde_json::json!({}),
            Duration::from_secs(5),
        )
        .await;
        server.join().unwrap();
        assert_eq!(
            outcome,
            ActionOutcome::Done {
                code: 307,
                output: String::new()
            }
        );
        assert!(elsewhere.accept().is_err(), "the redirect was followed");
    }

    #[tokio::test]
    async fn metadata_and_link_local_targets_are_refused_unless_allowed() {
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[fe80::1]:8080/hook",
            "http://[::ffff:169.254.169.254]/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
        ] {
            let outcome = post_webhook(
                url,
                &[],
                false,
                &serde_json::json!({}),
                Duration::from_secs(2),
            )
            .await;
            let ActionOutcome::Failed { error } = &outcome else {
                panic!("{url}: {outcome:?}")
            };
            assert!(error.starts_with("refused: "), "{url}: {error}");
            assert!(error.contains("allow_link_local = true"), "{error}");
        }
        // Allowed explicitly: it is tried (whatever answers, or fails to, it is not refused).
        let outcome = post_webhook(
            "http://169.254.0.1:9/",
            &[],
            true,
            &serde_json::json!({}),
            Duration::from_millis(300),
        )
        .await;
        if let ActionOutcome::Failed { error } = &outcome {
            assert!(!error.starts_with("refused: "), "{error}");
        }
        assert!(!forbidden_target("10.0.0.7".parse().unwrap()));
        assert!(!forbidden_target("2001:db8::1".parse().unwrap()));
        assert!(!forbidden_target("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn actions_are_rate_limited_per_budget() {
        let mut limiter = RateLimiter::new(Duration::from_secs(300));
        let t0 = Instant::now();
        assert!(limiter.allow("a", t0));
        assert!(!limiter.allow("a", t0 + Duration::from_secs(10)));
        assert!(limiter.allow("b", t0 + Duration::from_secs(10)));
        assert!(limiter.allow("a", t0 + Duration::from_secs(301)));
    }
}
