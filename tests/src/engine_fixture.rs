//! A stand-in for a serving engine's `/metrics` endpoint: a real HTTP/1.1 server on
//! loopback whose n-th answer a test scripts (an exposition that grows, a reset, a slow or
//! huge or garbled answer), and expositions written from each engine family's documented
//! metric names (`../shared/notes/engines.md`).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// What the endpoint answers to one scrape.
pub enum Answer {
    Text(String),
    /// The text after a delay.
    Slow(Duration, String),
    /// `bytes` of comment, with a Content-Length or (false) streamed until the connection
    /// closes.
    Huge {
        bytes: usize,
        length: bool,
    },
    Status(u16),
}

/// An endpoint answering its n-th request (from 0) with `script(n)`.
pub struct MetricsEndpoint {
    pub address: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl MetricsEndpoint {
    pub fn start(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let script = Arc::new(script);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                std::thread::spawn(move || answer(stream, script(n)));
            }
        });
        Self { address, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.address)
    }

    /// Scrapes answered or in progress.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn answer(mut stream: std::net::TcpStream, answer: Answer) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let (status, body) = match answer {
        Answer::Text(text) => (200, text.into_bytes()),
        Answer::Slow(delay, text) => {
            std::thread::sleep(delay);
            (200, text.into_bytes())
        }
        Answer::Huge { bytes, length } => {
            // The head at once, the body a MiB at a time (nothing to build first).
            let head = if length {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n")
            } else {
                "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string()
            };
            let _ = stream.write_all(head.as_bytes());
            let chunk = vec![b'#'; 1 << 20];
            for _ in 0..bytes >> 20 {
                if stream.write_all(&chunk).is_err() {
                    return; // the reader gave up, as it should
                }
            }
            return;
        }
        Answer::Status(status) => (status, b"error\n".to_vec()),
    };
    let _ = stream.write_all(
        format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let _ = stream.write_all(&body);
}

/// A Prometheus histogram family: `# TYPE`, cumulative buckets (the last one +Inf), sum and
/// count, with `labels` (`key="value",` form, may be empty).
pub fn histogram(
    name: &str,
    labels: &str,
    bounds: &[&str],
    cumulative: &[u64],
    sum: f64,
) -> String {
    let mut text = format!("# HELP {name} A histogram.\n# TYPE {name} histogram\n");
    for (bound, count) in bounds.iter().chain(["+Inf"].iter()).zip(cumulative) {
        text.push_str(&format!(
            "{name}_bucket{{{labels}le=\"{bound}\"}} {count}.0\n"
        ));
    }
    let total = cumulative.last().copied().unwrap_or(0);
    let trimmed = labels.trim_end_matches(',');
    let braces = if trimmed.is_empty() {
        String::new()
    } else {
        format!("{{{trimmed}}}")
    };
    text.push_str(&format!(
        "{name}_sum{braces} {sum}\n{name}_count{braces} {total}.0\n"
    ));
    text
}

/// A counter or gauge sample line with its `# TYPE`.
pub fn sample(kind: &str, name: &str, labels: &str, value: f64) -> String {
    let trimmed = labels.trim_end_matches(',');
    let braces = if trimmed.is_empty() {
        String::new()
    } else {
        format!("{{{trimmed}}}")
    };
    format!("# TYPE {name} {kind}\n{name}{braces} {value}\n")
}

pub const VLLM_LABELS: &str = "engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\",";
pub const E2E_BOUNDS: [&str; 6] = ["0.3", "0.5", "0.8", "1.0", "1.5", "2.0"];
pub const TTFT_BOUNDS: [&str; 5] = ["0.1", "0.25", "0.5", "0.75", "1.0"];

/// vLLM v1's /metrics after `base` + `n` rounds of traffic. Each round of 100 requests puts
/// (end to end) 10 in (0.3, 0.5], 30 in (0.5, 0.8], 40 in (0.8, 1], 15 in (1, 1.5], 5 in
/// (1.5, 2]; (first token) 20 <= 0.1, 50 in (0.1, 0.25], 25 in (0.25, 0.5], 5 in
/// (0.5, 0.75]; 5,000 prompt tokens of which 3,000 hit the prefix cache, 20,000 generated.
pub fn vllm(n: u64) -> String {
    let base = 7; // counts before the first scrape: the window must subtract them
    let e2e: Vec<u64> = [0, 10, 40, 80, 95, 100, 100]
        .iter()
        .map(|c| c * n + base)
        .collect();
    let ttft: Vec<u64> = [20, 70, 95, 100, 100, 100]
        .iter()
        .map(|c| c * n + base)
        .collect();
    let mut text = String::new();
    text.push_str(&histogram(
        "vllm:e2e_request_latency_seconds",
        VLLM_LABELS,
        &E2E_BOUNDS,
        &e2e,
        86.5 * n as f64,
    ));
    text.push_str(&histogram(
        "vllm:time_to_first_token_seconds",
        VLLM_LABELS,
        &TTFT_BOUNDS,
        &ttft,
        20.0 * n as f64,
    ));
    for (name, per_round) in [
        ("vllm:request_success_total", 100.0),
        ("vllm:prompt_tokens_total", 5000.0),
        ("vllm:generation_tokens_total", 20000.0),
        ("vllm:prefix_cache_queries_total", 5000.0),
        ("vllm:prefix_cache_hits_total", 3000.0),
    ] {
        let labels = if name == "vllm:request_success_total" {
            format!("{VLLM_LABELS}finished_reason=\"stop\",")
        } else {
            VLLM_LABELS.to_string()
        };
        text.push_str(&sample(
            "counter",
            name,
            &labels,
            per_round * n as f64 + base as f64,
        ));
    }
    text.push_str(&sample(
        "gauge",
        "vllm:kv_cache_usage_perc",
        VLLM_LABELS,
        0.42,
    ));
    text.push_str(&sample(
        "gauge",
        "vllm:num_requests_running",
        VLLM_LABELS,
        7.0,
    ));
    text.push_str(&sample(
        "gauge",
        "vllm:num_requests_waiting",
        VLLM_LABELS,
        3.0,
    ));
    // What else a real vLLM exposes, which the reader must skip.
    text.push_str("# HELP python_gc_objects_collected_total Objects collected during gc\n");
    text.push_str("python_gc_objects_collected_total{generation=\"0\"} 12345.0\n");
    text.push_str(&sample(
        "gauge",
        "vllm:cache_config_info",
        "block_size=\"16\",",
        1.0,
    ));
    text
}
