//! One trace per order, exported over OTLP/gRPC
//! (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`).
//!
//! A tonic OTLP trace service runs inside the test. Its own test binary (and
//! process), so the exporter is configured before telemetry starts.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use saga_tests::otlp::{self, Spans};
use saga_tests::System;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

struct Collector(Spans);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        otlp::record(&self.0, request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the gRPC receiver and points the exporter at it.
async fn receiver() -> anyhow::Result<Spans> {
    let spans = Spans::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let service = TraceServiceServer::new(Collector(spans.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    otlp::export_to(&format!("http://{addr}"), "grpc");
    Ok(spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_order_is_one_connected_trace_over_grpc() -> anyhow::Result<()> {
    let spans = receiver().await?;
    let sys = System::start().await?;
    otlp::check_order_traces(&sys, &spans).await?;
    sys.shutdown().await
}
