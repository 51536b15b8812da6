//! payment-service: charges an order on `OrderCreated` (simulated gateway),
//! refunds it on `InventoryOutOfStock` or `OrderCancelled`, and never
//! charges an order it heard was cancelled.

mod domain;
mod handler;
mod routes;
mod store;

use events::Money;
use saga_runtime::config::{self, ConfigError};
use saga_runtime::{App, Infra, ServiceConfig};

pub use domain::{Book, Payment, PaymentStatus};
pub use handler::Gateway;

pub const SERVICE: &str = "payment-service";
pub const DEFAULT_PORT: u16 = 3001;
pub const SUBSCRIBES: &[&str] = &[
    events::topics::ORDER_EVENTS,
    events::topics::INVENTORY_EVENTS,
];

/// The simulated gateway's rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// `PAYMENT_LIMIT`: orders above this total are declined (default 1000.00).
    pub limit: Money,
    /// `PAYMENT_FAILURE_RATE`: share of other charges declined at random (0..1, default 0).
    pub failure_rate: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            limit: Money::from_minor(100_000),
            failure_rate: 0.0,
        }
    }
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            limit: config::parsed_with("PAYMENT_LIMIT", d.limit, |m| {
                if m.minor() >= 0 {
                    Ok(())
                } else {
                    Err("must not be negative".into())
                }
            })?,
            failure_rate: config::parsed_in("PAYMENT_FAILURE_RATE", d.failure_rate, 0.0..=1.0)?,
        })
    }
}

pub async fn build(config: ServiceConfig, settings: Settings) -> anyhow::Result<App> {
    let infra = Infra::connect(config, sqlx::migrate!("./migrations")).await?;
    let router = routes::router(infra.pool.clone());
    App::new(
        infra,
        router,
        saga_runtime::api_info!(),
        Some((SUBSCRIBES, Gateway { settings })),
    )
    .await
}
