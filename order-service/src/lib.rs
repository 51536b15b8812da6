//! order-service: takes orders over HTTP, starts the saga with `OrderCreated`
//! and ends it: CONFIRMED on `InventoryReserved`, FAILED on `PaymentFailed`
//! or `InventoryOutOfStock`, CANCELLED on the customer's request, FAILED
//! (`deadline_exceeded`) when still PENDING at its deadline. Cancellation
//! and deadline emit `OrderCancelled`, on which the others compensate.

mod deadlines;
mod domain;
mod ending;
mod handler;
mod intake;
mod outcomes;
mod routes;
mod store;

use std::time::Duration;

use saga_runtime::config::{self, ConfigError};
use saga_runtime::{App, Infra, ServiceConfig};

pub use domain::{NewOrder, OrderState, OrderStatus};
pub use handler::OrderSaga;

pub const SERVICE: &str = "order-service";
pub const DEFAULT_PORT: u16 = 3000;

/// Topics whose events end or annotate the saga.
pub const SUBSCRIBES: &[&str] = &[
    events::topics::PAYMENT_EVENTS,
    events::topics::INVENTORY_EVENTS,
];

/// order-service's own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `ORDER_DEADLINE_SECS`: an order still PENDING this long after its
    /// creation fails with `deadline_exceeded` (whole seconds, at least 1,
    /// default 60).
    pub deadline: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(60),
        }
    }
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let secs: u64 = config::parsed_with("ORDER_DEADLINE_SECS", 60, |s| {
            if *s >= 1 {
                Ok(())
            } else {
                Err("must be at least 1 (whole seconds)".into())
            }
        })?;
        Ok(Self {
            deadline: Duration::from_secs(secs),
        })
    }
}

/// Builds the service (database, broker, HTTP, deadlines) ready to run.
pub async fn build(config: ServiceConfig, settings: Settings) -> anyhow::Result<App> {
    let infra = Infra::connect(config, sqlx::migrate!("./migrations")).await?;
    let router = routes::router(routes::AppState {
        pool: infra.pool.clone(),
        outbox: infra.outbox.clone(),
        intake: intake::Intake::start(infra.pool.clone(), infra.outbox.clone()),
    });
    let (pool, outbox) = (infra.pool.clone(), infra.outbox.clone());
    let app = App::new(
        infra,
        router,
        saga_runtime::api_info!(),
        Some((SUBSCRIBES, OrderSaga)),
    )
    .await?;
    Ok(app.with_task(move |shutdown| deadlines::run(pool, outbox, settings.deadline, shutdown)))
}
