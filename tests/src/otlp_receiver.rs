//! An in-process OTLP gRPC receiver (the real protocol, opentelemetry-proto's server types):
//! the agent exports to it and tests look at what arrived. It can be stopped and started again
//! on the same port to play a collector outage.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
    },
    common::v1::{KeyValue, any_value},
    logs::v1::LogRecord,
    metrics::v1::{Metric, metric::Data},
};

#[derive(Clone, Default)]
struct Received {
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.logs.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

pub struct OtlpReceiver {
    pub address: SocketAddr,
    received: Received,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Listens on 127.0.0.1 on a free port.
    pub fn start() -> Self {
        Self::serve("127.0.0.1:0".parse().unwrap(), Received::default())
    }

    fn serve(address: SocketAddr, received: Received) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("receiver runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .expect("bind the OTLP receiver");
        let address = listener.local_addr().unwrap();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = received.clone();
        runtime.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(service.clone()))
                .add_service(LogsServiceServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .expect("OTLP receiver");
        });
        Self {
            address,
            received,
            runtime: Some(runtime),
            shutdown: Some(shutdown),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops listening (connections are refused), keeping what arrived.
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let again = Self::serve(self.address, self.received.clone());
        *self = again;
    }

    pub fn metric_requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.received.metrics.lock().unwrap().clone()
    }

    /// Every metric of every request, in arrival order.
    pub fn metrics(&self) -> Vec<Metric> {
        self.metric_requests()
            .into_iter()
            .flat_map(|r| r.resource_metrics)
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics)
            .collect()
    }

    /// The metric of that name from the latest request that had it.
    pub fn latest(&self, name: &str) -> Option<Metric> {
        self.metrics().into_iter().rev().find(|m| m.name == name)
    }

    pub fn log_records(&self) -> Vec<LogRecord> {
        self.received
            .logs
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| r.resource_logs.clone())
            .flat_map(|r| r.scope_logs)
            .flat_map(|s| s.log_records)
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A string attribute's value.
pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(value) => Some(value.as_str()),
            _ => None,
        }
    })
}

/// Number of data points of a metric (any kind).
pub fn point_count(metric: &Metric) -> usize {
    match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        _ => 0,
    }
}
