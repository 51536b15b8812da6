//! order-service: takes orders over HTTP, starts the saga with `OrderCreated`
//! and ends it — CONFIRMED on `InventoryReserved`, FAILED on `PaymentFailed`
//! or `InventoryOutOfStock`.

mod domain;
mod handler;
mod intake;
mod routes;
mod store;

use saga_runtime::{App, Infra, ServiceConfig};

pub use domain::NewOrder;
pub use handler::OrderSaga;

pub const SERVICE: &str = "order-service";
pub const DEFAULT_PORT: u16 = 3000;

/// Topics whose events end or annotate the saga.
pub const SUBSCRIBES: &[&str] = &[
    events::topics::PAYMENT_EVENTS,
    events::topics::INVENTORY_EVENTS,
];

/// Builds the service (database, broker, HTTP) ready to run.
pub async fn build(config: ServiceConfig) -> anyhow::Result<App> {
    let infra = Infra::connect(config, sqlx::migrate!("./migrations")).await?;
    let router = routes::router(routes::AppState {
        pool: infra.pool.clone(),
        intake: intake::Intake::start(infra.pool.clone(), infra.outbox.clone()),
    });
    let handler = OrderSaga;
    App::new(infra, router, Some((SUBSCRIBES, handler))).await
}
