//! Serving engines' own `/metrics` endpoints: fetched over HTTP with a timeout and a size
//! cap, parsed, and kept as plain scrapes (`model::engine`). A slow, failing, oversized or
//! garbled endpoint makes that engine stale with a one-line reason and is retried with
//! backoff; it never fails the window.
pub mod exposition;
pub mod scrape;
