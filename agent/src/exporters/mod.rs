//! Exporters: what leaves the agent continuously. `metrics` decides what is exported (pure),
//! `otlp` sends it, with breach events, to an OpenTelemetry collector or database.
pub mod metrics;
pub mod otlp;
