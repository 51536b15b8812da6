//! inventory-service: reserves stock on `PaymentSucceeded`, all items of an
//! order or none, never oversells, and releases a reservation when its
//! payment is refunded (`PaymentRefunded` after a cancellation or deadline).

mod domain;
mod handler;
mod routes;
mod store;

use saga_runtime::config::{self, ConfigError};
use saga_runtime::{App, Infra, ServiceConfig};

pub use domain::{ReservationStatus, Stock};
pub use handler::Reserver;
pub use store::{seed_if_empty as seed_demo_catalog, DEMO_CATALOG};

pub const SERVICE: &str = "inventory-service";
pub const DEFAULT_PORT: u16 = 3002;
pub const SUBSCRIBES: &[&str] = &[events::topics::PAYMENT_EVENTS];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// `SEED_DEMO_CATALOG`: load [`DEMO_CATALOG`] when the catalog is empty (default true).
    pub seed_demo_catalog: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            seed_demo_catalog: true,
        }
    }
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            seed_demo_catalog: config::parsed("SEED_DEMO_CATALOG", true)?,
        })
    }
}

pub async fn build(config: ServiceConfig, settings: Settings) -> anyhow::Result<App> {
    let infra = Infra::connect(config, sqlx::migrate!("./migrations")).await?;
    if settings.seed_demo_catalog {
        store::seed_if_empty(&infra.pool).await?;
    }
    let router = routes::router(infra.pool.clone());
    App::new(
        infra,
        router,
        saga_runtime::api_info!(),
        Some((SUBSCRIBES, Reserver)),
    )
    .await
}
