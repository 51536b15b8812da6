use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    saga_runtime::run_service(
        order_service::SERVICE,
        order_service::DEFAULT_PORT,
        order_service::build,
    )
    .await
}
