//! Serving engines as their own `/metrics` endpoints describe them: which engine a scrape is
//! from (by its metric names), which of its series carry which figure, and a scrape as plain
//! series. The names are the engines' own (see `../shared/notes/engines.md` for sources);
//! `engines/` fetches and parses, `analysis/engines.rs` turns two scrapes into a window.
use serde::Serialize;

/// An engine family, recognised by its metric names or named in the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Vllm,
    Sglang,
    Tgi,
    Triton,
    Llamacpp,
    /// Names given by the user (`request_histogram`, `ttft_histogram`, ...).
    Generic,
}

impl EngineKind {
    pub const RECOGNISED: [EngineKind; 5] = [
        EngineKind::Vllm,
        EngineKind::Sglang,
        EngineKind::Tgi,
        EngineKind::Triton,
        EngineKind::Llamacpp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Tgi => "tgi",
            EngineKind::Triton => "triton",
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::Generic => "generic",
        }
    }

    pub fn parse(name: &str) -> Option<EngineKind> {
        Self::RECOGNISED
            .into_iter()
            .chain([EngineKind::Generic])
            .find(|kind| kind.as_str() == name)
    }

    /// The prefix every metric of the family starts with.
    fn prefix(self) -> &'static str {
        match self {
            EngineKind::Vllm => "vllm:",
            EngineKind::Sglang => "sglang:",
            EngineKind::Tgi => "tgi_",
            EngineKind::Triton => "nv_inference_",
            EngineKind::Llamacpp => "llamacpp:",
            EngineKind::Generic => "",
        }
    }

    /// The family whose prefix most series carry; None when no series has one.
    pub fn recognise<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<EngineKind> {
        let mut counts = [0usize; 5];
        for name in names {
            for (i, kind) in Self::RECOGNISED.iter().enumerate() {
                if name.starts_with(kind.prefix()) {
                    counts[i] += 1;
                }
            }
        }
        let (best, count) = counts.iter().enumerate().max_by_key(|(_, c)| **c)?;
        (*count > 0).then_some(Self::RECOGNISED[best])
    }
}

/// Which engine a configured endpoint is: recognised from its names, or named.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineChoice {
    Recognise,
    Named(EngineKind),
    Generic(GenericNames),
}

/// A histogram family and the seconds one unit of its `le` bounds and sum stands for.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramName {
    pub name: String,
    pub seconds_per_unit: f64,
}

/// A mean from two counters: total time (`sum`, in `seconds_per_unit`) over a count.
#[derive(Clone, Debug, PartialEq)]
pub struct MeanNames {
    pub sum: String,
    pub count: String,
    pub seconds_per_unit: f64,
}

/// Where an engine keeps each figure. Every list holds candidates, the first one the scrape
/// has wins (engines renamed metrics across versions).
#[derive(Clone, Debug, PartialEq)]
pub struct Catalogue {
    pub engine: EngineKind,
    pub e2e: Vec<HistogramName>,
    pub ttft: Vec<HistogramName>,
    /// Time per output token: a per-request mean where the engine has one, else the time
    /// between tokens.
    pub tpot: Vec<HistogramName>,
    pub queue: Vec<HistogramName>,
    /// Means where the engine has no histogram (Triton's cumulative microseconds,
    /// llama.cpp's slot seconds).
    pub e2e_mean: Option<MeanNames>,
    pub queue_mean: Option<MeanNames>,
    pub tpot_mean: Option<MeanNames>,
    /// Finished requests (counters); without one, the e2e histogram's count.
    pub requests: Vec<String>,
    pub prompt_tokens: Vec<String>,
    pub generation_tokens: Vec<String>,
    /// Prefix-cache hits over lookups (both counters, in tokens).
    pub cache_hits: Vec<String>,
    pub cache_queries: Vec<String>,
    /// Engines that only export a hit-rate gauge (vLLM v0).
    pub cache_hit_rate: Vec<String>,
    /// Gauges.
    pub kv_cache_usage: Vec<String>,
    pub running: Vec<String>,
    pub waiting: Vec<String>,
    /// The label that names the model, if the engine has one.
    pub model_label: Option<&'static str>,
}

/// The names a user gives for an engine envelope does not know (`engine = "generic"`):
/// histograms in seconds, counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenericNames {
    pub request_histogram: Option<String>,
    pub ttft_histogram: Option<String>,
    pub tpot_histogram: Option<String>,
    pub queue_histogram: Option<String>,
    pub prompt_tokens_counter: Option<String>,
    pub generation_tokens_counter: Option<String>,
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|name| name.to_string()).collect()
}

fn seconds(list: &[&str]) -> Vec<HistogramName> {
    list.iter()
        .map(|name| HistogramName {
            name: name.to_string(),
            seconds_per_unit: 1.0,
        })
        .collect()
}

impl Catalogue {
    fn empty(engine: EngineKind) -> Self {
        Catalogue {
            engine,
            e2e: Vec::new(),
            ttft: Vec::new(),
            tpot: Vec::new(),
            queue: Vec::new(),
            e2e_mean: None,
            queue_mean: None,
            tpot_mean: None,
            requests: Vec::new(),
            prompt_tokens: Vec::new(),
            generation_tokens: Vec::new(),
            cache_hits: Vec::new(),
            cache_queries: Vec::new(),
            cache_hit_rate: Vec::new(),
            kv_cache_usage: Vec::new(),
            running: Vec::new(),
            waiting: Vec::new(),
            model_label: None,
        }
    }

    /// A recognised engine's names (v1 names before the older ones they replaced).
    pub fn of(engine: EngineKind) -> Catalogue {
        let mut c = Catalogue::empty(engine);
        match engine {
            EngineKind::Vllm => {
                c.e2e = seconds(&["vllm:e2e_request_latency_seconds"]);
                c.ttft = seconds(&["vllm:time_to_first_token_seconds"]);
                c.tpot = seconds(&[
                    "vllm:request_time_per_output_token_seconds",
                    "vllm:time_per_output_token_seconds",
                    "vllm:inter_token_latency_seconds",
                ]);
                c.queue = seconds(&["vllm:request_queue_time_seconds"]);
                c.requests = names(&["vllm:request_success_total"]);
                c.prompt_tokens = names(&["vllm:prompt_tokens_total"]);
                c.generation_tokens = names(&["vllm:generation_tokens_total"]);
                c.cache_hits = names(&[
                    "vllm:prefix_cache_hits_total",
                    "vllm:gpu_prefix_cache_hits_total",
                ]);
                c.cache_queries = names(&[
                    "vllm:prefix_cache_queries_total",
                    "vllm:gpu_prefix_cache_queries_total",
                ]);
                c.cache_hit_rate = names(&["vllm:gpu_prefix_cache_hit_rate"]);
                c.kv_cache_usage =
                    names(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]);
                c.running = names(&["vllm:num_requests_running"]);
                c.waiting = names(&["vllm:num_requests_waiting"]);
                c.model_label = Some("model_name");
            }
            EngineKind::Sglang => {
                c.e2e = seconds(&["sglang:e2e_request_latency_seconds"]);
                c.ttft = seconds(&["sglang:time_to_first_token_seconds"]);
                c.tpot = seconds(&[
                    "sglang:time_per_output_token_seconds",
                    "sglang:inter_token_latency_seconds",
                ]);
                c.queue = seconds(&["sglang:queue_time_seconds"]);
                c.requests = names(&["sglang:num_requests_total"]);
                c.prompt_tokens = names(&["sglang:prompt_tokens_total"]);
                c.generation_tokens = names(&["sglang:generation_tokens_total"]);
                // `sglang:cache_hit_rate` is the last prefill batch's only: the window's rate
                // is cached over prompt tokens.
                c.cache_hits = names(&["sglang:cached_tokens_total"]);
                c.cache_queries = names(&["sglang:prompt_tokens_total"]);
                c.kv_cache_usage = names(&["sglang:token_usage"]);
                c.running = names(&["sglang:num_running_reqs"]);
                c.waiting = names(&["sglang:num_queue_reqs"]);
                c.model_label = Some("model_name");
            }
            EngineKind::Tgi => {
                c.e2e = seconds(&["tgi_request_duration"]);
                c.tpot = seconds(&["tgi_request_mean_time_per_token_duration"]);
                c.queue = seconds(&["tgi_request_queue_duration"]);
                c.requests = names(&["tgi_request_success"]);
                c.prompt_tokens = names(&["tgi_request_input_length_sum"]);
                c.generation_tokens = names(&["tgi_request_generated_tokens_sum"]);
                c.running = names(&["tgi_batch_current_size"]);
                c.waiting = names(&["tgi_queue_size"]);
            }
            EngineKind::Triton => {
                c.ttft = vec![HistogramName {
                    name: "nv_inference_first_response_histogram_ms".to_string(),
                    seconds_per_unit: 1e-3,
                }];
                c.e2e_mean = Some(MeanNames {
                    sum: "nv_inference_request_duration_us".to_string(),
                    count: "nv_inference_request_success".to_string(),
                    seconds_per_unit: 1e-6,
                });
                c.queue_mean = Some(MeanNames {
                    sum: "nv_inference_queue_duration_us".to_string(),
                    count: "nv_inference_request_success".to_string(),
                    seconds_per_unit: 1e-6,
                });
                c.requests = names(&["nv_inference_request_success"]);
                c.waiting = names(&["nv_inference_pending_request_count"]);
                c.model_label = Some("model");
            }
            EngineKind::Llamacpp => {
                c.tpot_mean = Some(MeanNames {
                    sum: "llamacpp:tokens_predicted_seconds_total".to_string(),
                    count: "llamacpp:tokens_predicted_total".to_string(),
                    seconds_per_unit: 1.0,
                });
                c.prompt_tokens = names(&["llamacpp:prompt_tokens_total"]);
                c.generation_tokens = names(&["llamacpp:tokens_predicted_total"]);
                c.running = names(&["llamacpp:requests_processing"]);
                c.waiting = names(&["llamacpp:requests_deferred"]);
            }
            EngineKind::Generic => {}
        }
        c
    }

    /// The user's names for an engine envelope does not know.
    pub fn generic(given: &GenericNames) -> Catalogue {
        let mut c = Catalogue::empty(EngineKind::Generic);
        let histogram = |name: &Option<String>| -> Vec<HistogramName> {
            name.as_deref().map(|n| seconds(&[n])).unwrap_or_default()
        };
        c.e2e = histogram(&given.request_histogram);
        c.ttft = histogram(&given.ttft_histogram);
        c.tpot = histogram(&given.tpot_histogram);
        c.queue = histogram(&given.queue_histogram);
        c.prompt_tokens = given.prompt_tokens_counter.iter().cloned().collect();
        c.generation_tokens = given.generation_tokens_counter.iter().cloned().collect();
        c
    }

    /// Every series name this catalogue reads (histograms as their `_bucket`, `_sum` and
    /// `_count` series): what a scrape keeps of an exposition.
    pub fn series_names(&self) -> Vec<String> {
        let mut all = Vec::new();
        for histogram in [&self.e2e, &self.ttft, &self.tpot, &self.queue]
            .into_iter()
            .flatten()
        {
            for suffix in ["_bucket", "_sum", "_count"] {
                all.push(format!("{}{suffix}", histogram.name));
            }
        }
        for mean in [&self.e2e_mean, &self.queue_mean, &self.tpot_mean]
            .into_iter()
            .flatten()
        {
            all.push(mean.sum.clone());
            all.push(mean.count.clone());
        }
        for list in [
            &self.requests,
            &self.prompt_tokens,
            &self.generation_tokens,
            &self.cache_hits,
            &self.cache_queries,
            &self.cache_hit_rate,
            &self.kv_cache_usage,
            &self.running,
            &self.waiting,
        ] {
            all.extend(list.iter().cloned());
        }
        all.sort();
        all.dedup();
        all
    }
}

/// One series of a scrape: its full name, its labels (as exposed, `le` included) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Series {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(label, _)| label == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What one scrape kept: the series the catalogue reads, when it was taken (seconds on a
/// monotonic clock, for rates), and how many lines could not be parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineScrape {
    pub at_s: f64,
    pub series: Vec<Series>,
    pub unreadable_lines: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_are_recognised_by_the_prefix_most_of_their_series_carry() {
        assert_eq!(
            EngineKind::recognise([
                "vllm:num_requests_running",
                "vllm:e2e_request_latency_seconds_bucket",
                "process_cpu_seconds_total"
            ]),
            Some(EngineKind::Vllm)
        );
        assert_eq!(
            EngineKind::recognise(["nv_inference_request_success", "nv_gpu_utilization"]),
            Some(EngineKind::Triton)
        );
        assert_eq!(EngineKind::recognise(["up", "go_goroutines"]), None);
        assert_eq!(EngineKind::parse("llamacpp"), Some(EngineKind::Llamacpp));
        assert_eq!(EngineKind::parse("ollama"), None);
    }

    #[test]
    fn a_catalogue_reads_histograms_through_their_bucket_sum_and_count_series() {
        let tgi = Catalogue::of(EngineKind::Tgi).series_names();
        assert!(tgi.contains(&"tgi_request_duration_bucket".to_string()));
        assert!(tgi.contains(&"tgi_request_duration_count".to_string()));
        assert!(tgi.contains(&"tgi_request_input_length_sum".to_string()));
        let generic = Catalogue::generic(&GenericNames {
            request_histogram: Some("app_request_seconds".into()),
            ..GenericNames::default()
        });
        assert_eq!(
            generic.series_names(),
            vec![
                "app_request_seconds_bucket".to_string(),
                "app_request_seconds_count".to_string(),
                "app_request_seconds_sum".to_string(),
            ]
        );
    }
}
