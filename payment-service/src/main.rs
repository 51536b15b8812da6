use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    saga_runtime::run_service(
        payment_service::SERVICE,
        payment_service::DEFAULT_PORT,
        |config| async move {
            let settings = payment_service::Settings::from_env()?;
            payment_service::build(config, settings).await
        },
    )
    .await
}
