//! The configured serving engines, scraped at each window's end: all at once, the window
//! waiting for them until one deadline (`ScrapeLimits::grace`), each window the increase
//! since the scrape before.
use std::time::Duration;

use crate::{
    analysis::engines::{EngineSummary, summarize_engine},
    config::{EngineEndpointConfig, redacted_url},
    engines::scrape::{EngineEndpoint, ScrapeLimits, Scraped},
    model::engine::EngineScrape,
};

struct Reader {
    config: EngineEndpointConfig,
    endpoint: EngineEndpoint,
    /// The last fresh scrape: the start of the next window.
    previous: Option<EngineScrape>,
}

#[derive(Default)]
pub struct EngineReaders {
    readers: Vec<Reader>,
}

impl EngineReaders {
    /// Follows the configuration (a reload may add, change or drop endpoints); endpoints
    /// that stay keep their last scrape.
    pub fn configure(&mut self, configs: &[EngineEndpointConfig], timeout: Duration) {
        let mut kept: Vec<Reader> = Vec::with_capacity(configs.len());
        for config in configs {
            let limits = ScrapeLimits {
                timeout,
                ..ScrapeLimits::default()
            };
            match self
                .readers
                .iter()
                .position(|r| r.config == *config && r.endpoint.limits() == limits)
            {
                Some(i) => kept.push(self.readers.swap_remove(i)),
                None => kept.push(Reader {
                    config: config.clone(),
                    endpoint: EngineEndpoint::new(
                        config.workload.clone(),
                        config.url.clone(),
                        config.engine.clone(),
                        limits,
                    ),
                    previous: None,
                }),
            }
        }
        self.readers = kept;
    }

    /// The scrapes a window starts from, for endpoints that have none yet; waits up to the
    /// scrape timeout (at start-up, so the first window has a start).
    pub async fn start(&mut self) {
        let Some(timeout) = self
            .readers
            .iter()
            .map(|r| r.endpoint.limits().timeout)
            .max()
        else {
            return;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut missing: Vec<&mut Reader> = self
            .readers
            .iter_mut()
            .filter(|r| r.previous.is_none())
            .collect();
        for reader in missing.iter_mut() {
            reader.endpoint.start();
        }
        for reader in missing {
            if let Scraped::Fresh(scrape) = reader.endpoint.collect(deadline).await {
                reader.previous = Some(scrape);
            }
        }
    }

    /// Every engine's window ending now.
    pub async fn window(&mut self) -> Vec<EngineSummary> {
        let Some(grace) = self.readers.iter().map(|r| r.endpoint.limits().grace).max() else {
            return Vec::new();
        };
        for reader in &mut self.readers {
            reader.endpoint.start();
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut summaries = Vec::with_capacity(self.readers.len());
        for reader in &mut self.readers {
            let url = redacted_url(&reader.config.url);
            let workload = &reader.config.workload;
            match (
                reader.endpoint.collect(deadline).await,
                &reader.endpoint.catalogue,
            ) {
                // A fresh scrape always has its catalogue (named, or recognised from it).
                (Scraped::Fresh(scrape), Some(catalogue)) => {
                    summaries.push(summarize_engine(
                        workload,
                        &url,
                        catalogue,
                        reader.previous.as_ref(),
                        &scrape,
                    ));
                    reader.previous = Some(scrape);
                }
                (Scraped::Fresh(_), None) => summaries.push(EngineSummary::stale(
                    workload,
                    &url,
                    None,
                    "the engine was not recognised".to_string(),
                )),
                (Scraped::Stale(reason), _) => summaries.push(EngineSummary::stale(
                    workload,
                    &url,
                    reader.endpoint.engine(),
                    reason,
                )),
            }
        }
        summaries
    }
}
