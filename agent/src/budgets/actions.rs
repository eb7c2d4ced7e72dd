//! Actions on breach transitions, as policy from the configuration: run a command (argv, no
//! shell, with a timeout, the breach in environment variables) or POST the breach as JSON to
//! a webhook. Rate limited per budget; each runs on a thread of its own so it never blocks
//! or crashes the agent; the outcome is returned for the log.
use std::{
    collections::HashMap,
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

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
        ("ENVELOPE_OBSERVED".into(), event.observed.to_string()),
        ("ENVELOPE_THRESHOLD".into(), event.threshold.to_string()),
    ]
}

/// Output kept from a command, so a chatty one cannot fill the log.
const MAX_OUTPUT_BYTES: usize = 1024;

/// Runs argv (no shell) with `environment`, killing it after `timeout`.
pub fn run_command(
    argv: &[String],
    environment: &[(String, String)],
    timeout: Duration,
) -> ActionOutcome {
    let Some((program, arguments)) = argv.split_first() else {
        return ActionOutcome::Failed {
            error: "empty command".into(),
        };
    };
    let mut child = match Command::new(program)
        .args(arguments)
        .envs(environment.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            return ActionOutcome::Failed {
                error: format!("cannot start {program}: {error}"),
            };
        }
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut output = Vec::new();
                if let Some(stdout) = child.stdout.as_mut() {
                    let _ = stdout
                        .take(MAX_OUTPUT_BYTES as u64)
                        .read_to_end(&mut output);
                }
                return ActionOutcome::Done {
                    code: status.code().unwrap_or(-1),
                    output: String::from_utf8_lossy(&output).into_owned(),
                };
            }
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return ActionOutcome::TimedOut {
                    after_ms: started.elapsed().as_millis() as u64,
                };
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(error) => {
                return ActionOutcome::Failed {
                    error: error.to_string(),
                };
            }
        }
    }
}

/// POSTs `body` as JSON to `url`.
pub fn post_webhook(url: &str, body: &serde_json::Value, timeout: Duration) -> ActionOutcome {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    match agent.post(url).send_json(body) {
        Ok(response) => ActionOutcome::Done {
            code: i32::from(response.status()),
            output: String::new(),
        },
        Err(ureq::Error::Status(code, _)) => ActionOutcome::Done {
            code: i32::from(code),
            output: String::new(),
        },
        Err(error) => ActionOutcome::Failed {
            error: error.to_string(),
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

/// Runs `action` for `event` on its own thread; the handle yields the outcome.
pub fn spawn(
    action: Action,
    event: BreachEvent,
    workload: String,
) -> std::thread::JoinHandle<ActionOutcome> {
    std::thread::spawn(move || match action {
        Action::Command { argv, timeout } => {
            run_command(&argv, &breach_environment(&event, &workload), timeout)
        }
        Action::Webhook { url, timeout } => {
            let body = serde_json::json!({ "workload": workload, "event": event });
            post_webhook(&url, &body, timeout)
        }
    })
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
            observed: 84.0,
            threshold: 10.0,
            burn_rates: vec![(3600, 20.0, 30.0)],
        }
    }

    #[test]
    fn commands_get_the_breach_in_their_environment_and_no_shell() {
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
        .join()
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
        );
        assert_eq!(
            outcome,
            ActionOutcome::Done {
                code: 0,
                output: "a; exit 3\n".into()
            }
        );
    }

    #[test]
    fn a_hanging_command_is_killed_at_its_timeout() {
        let started = Instant::now();
        let outcome = run_command(
            &["sleep".into(), "30".into()],
            &[],
            Duration::from_millis(200),
        );
        assert!(
            matches!(outcome, ActionOutcome::TimedOut { after_ms } if after_ms >= 200),
            "{outcome:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let outcome = run_command(&["/nonexistent/pager".into()], &[], Duration::from_secs(1));
        assert!(
            matches!(outcome, ActionOutcome::Failed { ref error } if error.contains("cannot start")),
            "{outcome:?}"
        );
    }

    #[test]
    fn webhooks_receive_the_breach_as_json() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
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
            String::from_utf8(body).unwrap()
        });
        let outcome = spawn(
            Action::Webhook {
                url,
                timeout: Duration::from_secs(5),
            },
            event(),
            "trainer".into(),
        )
        .join()
        .unwrap();
        assert_eq!(
            outcome,
            ActionOutcome::Done {
                code: 204,
                output: String::new()
            }
        );
        let body: serde_json::Value = serde_json::from_str(&server.join().unwrap()).unwrap();
        assert_eq!(body["workload"], "trainer");
        assert_eq!(body["event"]["breach_id"], "storage p95@1800000000");
        assert_eq!(body["event"]["status"], "firing");
        assert_eq!(body["event"]["observed"], 84.0);
    }

    #[test]
    fn an_unreachable_webhook_fails_without_hanging() {
        // A port that was free a moment ago: connection refused.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let outcome = post_webhook(
            &format!("http://127.0.0.1:{port}/"),
            &serde_json::json!({}),
            Duration::from_secs(2),
        );
        assert!(
            matches!(outcome, ActionOutcome::Failed { .. }),
            "{outcome:?}"
        );
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
