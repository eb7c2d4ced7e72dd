//! OTLP export: breach events as log lines and records (`events`), the metric series built from each window (`metrics`) and the protocol
//! (`otlp`: gRPC or HTTP/protobuf, with a queue for breach events); the same series as a
//! Prometheus scrape endpoint (`prometheus`).
pub mod events;
pub mod metrics;
pub mod otlp;
pub mod prometheus;
