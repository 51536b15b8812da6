//! payment-service: charges an order on `OrderCreated` (simulated gateway)
//! and refunds it on `InventoryOutOfStock`.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use events::{Envelope, Event, Money, OrderId, PaymentFailed, PaymentRefunded, PaymentSucceeded};
use saga_runtime::config::{self, ConfigError};
use saga_runtime::{ApiError, App, HandleError, Handler, Infra, ServiceConfig};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

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
            failure_rate: config::parsed_with("PAYMENT_FAILURE_RATE", d.failure_rate, |r| {
                if (0.0..=1.0).contains(r) {
                    Ok(())
                } else {
                    Err("must be between 0 and 1".into())
                }
            })?,
        })
    }
}

pub async fn build(config: ServiceConfig, settings: Settings) -> anyhow::Result<App> {
    let infra = Infra::connect(config, sqlx::migrate!("./migrations")).await?;
    let router = Router::new()
        .route("/payments/{order_id}", get(get_payment))
        .with_state(infra.pool.clone());
    App::new(infra, router, Some((SUBSCRIBES, Gateway { settings }))).await
}

#[derive(sqlx::FromRow)]
struct PaymentRow {
    order_id: Uuid,
    payment_id: Uuid,
    amount_minor: i64,
    status: String,
    decline_reason: Option<String>,
    correlation_id: String,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

async fn get_payment(
    State(pool): State<PgPool>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let order_id: OrderId = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not an order ID (a UUID)")))?;
    let row: Option<PaymentRow> = sqlx::query_as(
        "SELECT order_id, payment_id, amount_minor, status, decline_reason, correlation_id, created_at, updated_at
         FROM payments WHERE order_id = $1",
    )
    .bind(order_id.as_uuid())
    .fetch_optional(&pool)
    .await?;
    let p = row.ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
    Ok(Json(json!({
        "order_id": p.order_id,
        "payment_id": p.payment_id,
        "status": p.status,
        "amount": Money::from_minor(p.amount_minor),
        "decline_reason": p.decline_reason,
        "correlation_id": p.correlation_id,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    })))
}

/// The simulated payment gateway, as a saga participant.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub settings: Settings,
}

impl Gateway {
    /// Why a charge of `amount` is declined, if it is.
    fn decline_reason(&self, amount: Money) -> Option<String> {
        if amount > self.settings.limit {
            return Some(format!(
                "amount {amount} exceeds the payment limit of {}",
                self.settings.limit
            ));
        }
        if self.settings.failure_rate > 0.0 && rand::random::<f64>() < self.settings.failure_rate {
            return Some("declined by the card issuer (simulated failure)".to_owned());
        }
        None
    }
}

impl Handler for Gateway {
    fn accepts(&self, event: &Event) -> bool {
        matches!(
            event,
            Event::OrderCreated(_) | Event::InventoryOutOfStock(_)
        )
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        env: &Envelope,
    ) -> Result<Vec<Envelope>, HandleError> {
        let event = match &env.event {
            Event::OrderCreated(order) => charge(self, conn, env, order).await?,
            Event::InventoryOutOfStock(_) => refund(conn, env).await?,
            _ => None,
        };
        Ok(event
            .map(|e| Envelope::caused_by(env, e))
            .into_iter()
            .collect())
    }
}

async fn charge(
    gateway: &Gateway,
    conn: &mut PgConnection,
    env: &Envelope,
    order: &events::OrderCreated,
) -> Result<Option<Event>, HandleError> {
    let amount = order.total;
    let declined = gateway.decline_reason(amount);
    let payment_id = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO payments (order_id, payment_id, amount_minor, status, decline_reason, correlation_id)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(env.order_id.as_uuid())
    .bind(payment_id)
    .bind(amount.minor())
    .bind(if declined.is_some() { "DECLINED" } else { "CHARGED" })
    .bind(declined.as_deref())
    .bind(env.correlation_id.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        // The order was already charged (or declined) under another event ID.
        tracing::warn!("order already has a payment; not charging twice");
        return Ok(None);
    }
    Ok(Some(match declined {
        Some(reason) => {
            tracing::info!(amount = %amount, reason = %reason, "payment declined");
            Event::PaymentFailed(PaymentFailed { amount, reason })
        }
        None => {
            tracing::info!(amount = %amount, "payment charged");
            Event::PaymentSucceeded(PaymentSucceeded {
                payment_id,
                amount,
                items: order.items.clone(),
            })
        }
    }))
}

async fn refund(conn: &mut PgConnection, env: &Envelope) -> Result<Option<Event>, HandleError> {
    let row: Option<(Uuid, i64, String)> = sqlx::query_as(
        "SELECT payment_id, amount_minor, status FROM payments WHERE order_id = $1 FOR UPDATE",
    )
    .bind(env.order_id.as_uuid())
    .fetch_optional(&mut *conn)
    .await?;
    let Some((payment_id, amount_minor, status)) = row else {
        return Err(HandleError::Permanent(format!(
            "no payment for order {} to refund",
            env.order_id
        )));
    };
    match status.as_str() {
        "CHARGED" => {
            sqlx::query(
                "UPDATE payments SET status = 'REFUNDED', updated_at = now() WHERE order_id = $1",
            )
            .bind(env.order_id.as_uuid())
            .execute(&mut *conn)
            .await?;
            let amount = Money::from_minor(amount_minor);
            tracing::info!(amount = %amount, "payment refunded");
            Ok(Some(Event::PaymentRefunded(PaymentRefunded {
                payment_id,
                amount,
                reason: "out of stock".to_owned(),
            })))
        }
        "REFUNDED" => Ok(None),
        other => Err(HandleError::Permanent(format!(
            "cannot refund a payment in state {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_declines_only_above_it() {
        let g = Gateway {
            settings: Settings::default(),
        };
        assert!(g.decline_reason(Money::from_minor(100_000)).is_none());
        let why = g.decline_reason(Money::from_minor(100_001)).unwrap();
        assert!(why.contains("1000.01") && why.contains("1000.00"), "{why}");
    }

    #[test]
    fn failure_rate_one_declines_everything_and_zero_nothing() {
        let always = Gateway {
            settings: Settings {
                failure_rate: 1.0,
                ..Settings::default()
            },
        };
        let never = Gateway {
            settings: Settings::default(),
        };
        for _ in 0..100 {
            assert!(always.decline_reason(Money::from_minor(100)).is_some());
            assert!(never.decline_reason(Money::from_minor(100)).is_none());
        }
    }
}
