use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    saga_runtime::run_service(
        inventory_service::SERVICE,
        inventory_service::DEFAULT_PORT,
        |config| async move {
            let settings = inventory_service::Settings::from_env()?;
            inventory_service::build(config, settings).await
        },
    )
    .await
}
