use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    saga_runtime::run_service(
        order_service::SERVICE,
        order_service::DEFAULT_PORT,
        |config| async move {
            let settings = order_service::Settings::from_env()?;
            order_service::build(config, settings).await
        },
    )
    .await
}
