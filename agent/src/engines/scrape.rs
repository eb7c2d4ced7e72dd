//! One engine endpoint per configured workload, scraped at each window's end. The request
//! runs on its own task: the window waits for it at most `grace` (a local endpoint answers in
//! milliseconds), and an answer that comes later, within the timeout, becomes the start of the
//! next window instead of being lost.
use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

use super::exposition;
use crate::model::engine::{Catalogue, EngineChoice, EngineKind, EngineScrape};

/// Bounds on one scrape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScrapeLimits {
    /// The whole request, connect to last byte.
    pub timeout: Duration,
    /// Bodies larger than this are refused (a misconfigured URL can point at anything).
    pub max_bytes: usize,
    /// How long a window's end waits for its scrape.
    pub grace: Duration,
}

impl Default for ScrapeLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            max_bytes: 8 << 20,
            grace: Duration::from_millis(250),
        }
    }
}

/// What a window's end got from an endpoint.
#[derive(Debug)]
pub enum Scraped {
    Fresh(EngineScrape),
    /// Why there is no scrape this time, in one line.
    Stale(String),
}

/// One engine's endpoint and the scrape in flight.
pub struct EngineEndpoint {
    pub workload: String,
    pub url: String,
    /// Set once known (named, or recognised from the first scrape that has engine metrics).
    pub catalogue: Option<Catalogue>,
    limits: ScrapeLimits,
    client: reqwest::Client,
    in_flight: Option<JoinHandle<Result<(String, Instant), String>>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    epoch: Instant,
}

/// Every series name some recognised engine reads: what is kept before the engine is known.
fn recognisable_names() -> HashSet<String> {
    EngineKind::RECOGNISED
        .into_iter()
        .flat_map(|kind| Catalogue::of(kind).series_names())
        .collect()
}

/// Fetches `url`'s body as text, within the limits; the error is one line for the user.
async fn fetch(
    client: reqwest::Client,
    url: String,
    limits: ScrapeLimits,
) -> Result<String, String> {
    let exchange = async {
        let mut response = client
            .get(&url)
            .header(reqwest::header::ACCEPT, "text/plain;version=0.0.4")
            .send()
            .await
            .map_err(|error| describe(&error))?;
        if !response.status().is_success() {
            return Err(format!("the endpoint answered HTTP {}", response.status()));
        }
        let too_large = || format!("the response is larger than {} MiB", limits.max_bytes >> 20);
        if response
            .content_length()
            .is_some_and(|length| length > limits.max_bytes as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|error| describe(&error))? {
            if body.len() + chunk.len() > limits.max_bytes {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| "the response is not text (not UTF-8)".to_string())
    };
    match tokio::time::timeout(limits.timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no complete answer within {}",
            humantime::format_duration(limits.timeout)
        )),
    }
}

/// reqwest's error in one line: for a refused or unreachable endpoint, the OS's reason
/// ("cannot connect: Connection refused (os error 111)"); otherwise the error and its causes.
fn describe(error: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    if error.is_connect() {
        let reason = causes.last().cloned().unwrap_or_else(|| error.to_string());
        return format!("cannot connect: {reason}");
    }
    std::iter::once(error.to_string())
        .chain(causes)
        .collect::<Vec<_>>()
        .join(": ")
}

impl EngineEndpoint {
    pub fn new(workload: String, url: String, choice: EngineChoice, limits: ScrapeLimits) -> Self {
        let catalogue = match &choice {
            EngineChoice::Recognise => None,
            EngineChoice::Named(kind) => Some(Catalogue::of(*kind)),
            EngineChoice::Generic(names) => Some(Catalogue::generic(names)),
        };
        Self {
            workload,
            url,
            catalogue,
            limits,
            client: reqwest::Client::new(),
            in_flight: None,
            failures: 0,
            retry_at: None,
            last_error: String::new(),
            epoch: Instant::now(),
        }
    }

    pub fn engine(&self) -> Option<EngineKind> {
        self.catalogue.as_ref().map(|c| c.engine)
    }

    /// Starts a scrape unless one is running or the endpoint is backing off.
    pub fn start(&mut self) {
        if self.in_flight.is_some() || self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let (client, url, limits) = (self.client.clone(), self.url.clone(), self.limits);
        self.in_flight = Some(tokio::spawn(async move {
            let text = fetch(client, url, limits).await?;
            Ok((text, Instant::now()))
        }));
    }

    /// The scrape started by [`start`](Self::start), waiting for it until `deadline`; one
    /// still running then is kept and collected by the next call.
    pub async fn collect(&mut self, deadline: tokio::time::Instant) -> Scraped {
        let Some(handle) = self.in_flight.as_mut() else {
            let left = self.retry_at.map_or(0, |at| {
                at.saturating_duration_since(Instant::now()).as_secs()
            });
            return Scraped::Stale(format!("{}; retrying in {left} s", self.last_error));
        };
        let outcome = match tokio::time::timeout_at(deadline, handle).await {
            Err(_) => {
                return Scraped::Stale(format!(
                    "no answer within {} ms (still waiting, up to {})",
                    self.limits.grace.as_millis(),
                    humantime::format_duration(self.limits.timeout)
                ));
            }
            Ok(Err(_)) => Err("the scrape task failed".to_string()),
            Ok(Ok(result)) => result,
        };
        self.in_flight = None;
        match outcome.and_then(|(text, at)| self.parse(&text, at)) {
            Ok(scrape) => {
                self.failures = 0;
                self.retry_at = None;
                Scraped::Fresh(scrape)
            }
            Err(reason) => {
                self.failures += 1;
                // 1, 2, 4 ... 32, then 60 s between attempts.
                let backoff = Duration::from_secs(1 << (self.failures - 1).min(6))
                    .min(Duration::from_secs(60));
                self.retry_at = Some(Instant::now() + backoff);
                self.last_error = reason.clone();
                Scraped::Stale(reason)
            }
        }
    }

    pub fn limits(&self) -> ScrapeLimits {
        self.limits
    }

    /// Keeps what the catalogue reads (recognising the engine on the first scrape that
    /// shows one).
    fn parse(&mut self, text: &str, at: Instant) -> Result<EngineScrape, String> {
        let wanted: HashSet<String> = match &self.catalogue {
            Some(catalogue) => catalogue.series_names().into_iter().collect(),
            None => recognisable_names(),
        };
        let parsed = exposition::parse(text, &wanted);
        if self.catalogue.is_none() {
            let Some(kind) = EngineKind::recognise(parsed.series.iter().map(|s| s.name.as_str()))
            else {
                return Err(
                    "no serving-engine metrics in the response (vLLM, SGLang, TGI, Triton, \
                     llama.cpp); is this the engine's /metrics, or name the metrics with \
                     engine = \"generic\"?"
                        .to_string(),
                );
            };
            self.catalogue = Some(Catalogue::of(kind));
        }
        if parsed.series.is_empty() {
            let engine = self.engine().map_or("the engine", EngineKind::as_str);
            return Err(if parsed.unreadable_lines > 0 {
                format!(
                    "{} lines of {engine}'s metrics could not be parsed",
                    parsed.unreadable_lines
                )
            } else {
                format!(
                    "none of {engine}'s metrics in the response (is the URL still its /metrics?)"
                )
            });
        }
        Ok(EngineScrape {
            at_s: at.duration_since(self.epoch).as_secs_f64(),
            series: parsed.series,
            unreadable_lines: parsed.unreadable_lines,
        })
    }
}
