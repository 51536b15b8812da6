//! payment-service: charges an order on `OrderCreated` (simulated gateway)
//! and refunds it on `InventoryOutOfStock`.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use events::{Envelope, Event, Money, PaymentFailed, PaymentRefunded, PaymentSucceeded};
use saga_runtime::config::{self, ConfigError};
use saga_runtime::listing::{self, ListQuery};
use saga_runtime::{ApiError, App, Handler, Infra, ServiceConfig, Step};
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
        .route("/payments", get(list_payments))
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
    let order_id = saga_runtime::http::parse_order_id(&id)?;
    let row: Option<PaymentRow> = sqlx::query_as(
        "SELECT order_id, payment_id, amount_minor, status, decline_reason, correlation_id, created_at, updated_at
         FROM payments WHERE order_id = $1",
    )
    .bind(order_id.as_uuid())
    .fetch_optional(&pool)
    .await?;
    let p = row.ok_or_else(|| ApiError::not_found(format!("no payment for order {order_id}")))?;
    Ok(Json(payment_json(&p)))
}

/// `GET /payments`: newest order first, paginated (see
/// [`saga_runtime::listing`]).
async fn list_payments(
    State(pool): State<PgPool>,
    query: ListQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = query.page(&[])?;
    let rows: Vec<PaymentRow> = sqlx::query_as(
        "SELECT order_id, payment_id, amount_minor, status, decline_reason, correlation_id, created_at, updated_at
         FROM payments WHERE ($1::uuid IS NULL OR order_id < $1)
         ORDER BY order_id DESC LIMIT $2",
    )
    .bind(page.after)
    .bind(page.limit)
    .fetch_all(&pool)
    .await?;
    let rows = rows.iter().map(|p| (p.order_id, payment_json(p))).collect();
    Ok(Json(listing::page_body("payments", page, rows)))
}

fn payment_json(p: &PaymentRow) -> serde_json::Value {
    json!({
        "order_id": p.order_id,
        "payment_id": p.payment_id,
        "status": p.status,
        "amount": Money::from_minor(p.amount_minor),
        "decline_reason": p.decline_reason,
        "correlation_id": p.correlation_id,
        "created_at": p.created_at,
        "updated_at": p.updated_at,
    })
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

/// A payment as the batch sees it: read (locked) from the table or made by
/// an earlier step of the same batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Payment {
    pub payment_id: Uuid,
    pub amount: Money,
    pub status: PaymentStatus,
    pub decline_reason: Option<String>,
    pub correlation_id: String,
    /// Not in the table yet (inserted by this batch).
    pub new: bool,
    /// Status changed by this batch.
    pub changed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Charged,
    Declined,
    Refunded,
}

impl PaymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charged => "CHARGED",
            Self::Declined => "DECLINED",
            Self::Refunded => "REFUNDED",
        }
    }

    fn parse(s: &str) -> Result<Self, sqlx::Error> {
        match s {
            "CHARGED" => Ok(Self::Charged),
            "DECLINED" => Ok(Self::Declined),
            "REFUNDED" => Ok(Self::Refunded),
            other => Err(sqlx::Error::Decode(
                format!("unknown payment status {other:?}").into(),
            )),
        }
    }
}

impl Gateway {
    /// What `env` does to the payments known so far: charge (or decline) a
    /// new order once, refund a charged one once. `Err`: the event cannot be
    /// applied, and nothing changed.
    pub fn react(
        &self,
        payments: &mut HashMap<Uuid, Payment>,
        env: &Envelope,
    ) -> Result<Option<Event>, String> {
        let id = env.order_id.as_uuid();
        match &env.event {
            Event::OrderCreated(order) => {
                if payments.contains_key(&id) {
                    // Charged (or declined) before under another event ID.
                    tracing::warn!("order already has a payment; not charging twice");
                    return Ok(None);
                }
                let amount = order.total;
                let declined = self.decline_reason(amount);
                let payment_id = Uuid::now_v7();
                let status = if declined.is_some() {
                    PaymentStatus::Declined
                } else {
                    PaymentStatus::Charged
                };
                payments.insert(
                    id,
                    Payment {
                        payment_id,
                        amount,
                        status,
                        decline_reason: declined.clone(),
                        correlation_id: env.correlation_id.to_string(),
                        new: true,
                        changed: false,
                    },
                );
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
            Event::InventoryOutOfStock(_) => {
                let Some(p) = payments.get_mut(&id) else {
                    return Err(format!("no payment for order {} to refund", env.order_id));
                };
                match p.status {
                    PaymentStatus::Charged => {
                        p.status = PaymentStatus::Refunded;
                        p.changed = true;
                        tracing::info!(amount = %p.amount, "payment refunded");
                        Ok(Some(Event::PaymentRefunded(PaymentRefunded {
                            payment_id: p.payment_id,
                            amount: p.amount,
                            reason: "out of stock".to_owned(),
                        })))
                    }
                    PaymentStatus::Refunded => Ok(None),
                    other => Err(format!(
                        "cannot refund a payment in state {}",
                        other.as_str()
                    )),
                }
            }
            _ => Ok(None),
        }
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
        steps: &mut [Step<'_>],
    ) -> Result<(), sqlx::Error> {
        // Read: the batch's existing payments, locked in order ID order.
        let ids = Step::order_ids(steps);
        let rows: Vec<(Uuid, Uuid, i64, String, Option<String>, String)> = sqlx::query_as(
            "SELECT order_id, payment_id, amount_minor, status, decline_reason, correlation_id
             FROM payments WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
        let mut payments = HashMap::with_capacity(ids.len());
        for (order_id, payment_id, amount, status, decline_reason, correlation_id) in rows {
            let payment = Payment {
                payment_id,
                amount: Money::from_minor(amount),
                status: PaymentStatus::parse(&status)?,
                decline_reason,
                correlation_id,
                new: false,
                changed: false,
            };
            payments.insert(order_id, payment);
        }
        // Decide, in arrival order.
        for step in steps.iter_mut() {
            let span = step.span().clone();
            let _entered = span.enter();
            match self.react(&mut payments, step.envelope()) {
                Ok(Some(event)) => step.emit(event),
                Ok(None) => {}
                Err(why) => step.refuse(why),
            }
        }
        // Write: new payments and changed statuses, one statement. A payment
        // another consumer inserted meanwhile (during a rebalance) violates
        // the key, and the batch is retried, now seeing it.
        let mut new = Columns::default();
        let (mut changed_ids, mut changed_status) = (Vec::new(), Vec::new());
        for (order_id, p) in &payments {
            if p.new {
                new.order_ids.push(*order_id);
                new.payment_ids.push(p.payment_id);
                new.amounts.push(p.amount.minor());
                new.statuses.push(p.status.as_str());
                new.reasons.push(p.decline_reason.as_deref());
                new.correlations.push(p.correlation_id.as_str());
            } else if p.changed {
                changed_ids.push(*order_id);
                changed_status.push(p.status.as_str());
            }
        }
        if new.order_ids.is_empty() && changed_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "WITH changed AS (
                 UPDATE payments p SET status = c.status, updated_at = now()
                 FROM unnest($7::uuid[], $8::text[]) AS c(order_id, status)
                 WHERE p.order_id = c.order_id)
             INSERT INTO payments (order_id, payment_id, amount_minor, status, decline_reason, correlation_id)
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[])",
        )
        .bind(&new.order_ids)
        .bind(&new.payment_ids)
        .bind(&new.amounts)
        .bind(&new.statuses)
        .bind(&new.reasons)
        .bind(&new.correlations)
        .bind(&changed_ids)
        .bind(&changed_status)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// New payments as the column arrays `unnest` takes.
#[derive(Default)]
struct Columns<'p> {
    order_ids: Vec<Uuid>,
    payment_ids: Vec<Uuid>,
    amounts: Vec<i64>,
    statuses: Vec<&'static str>,
    reasons: Vec<Option<&'p str>>,
    correlations: Vec<&'p str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::OrderId;

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

    fn created(total_minor: i64) -> Envelope {
        let order = events::OrderCreated {
            customer_id: events::CustomerId::parse("c-1").unwrap(),
            items: vec![],
            total: Money::from_minor(total_minor),
        };
        Envelope::new(
            OrderId::new(),
            events::CorrelationId::generate(),
            Event::OrderCreated(order),
        )
    }

    fn out_of_stock(of: &Envelope) -> Envelope {
        Envelope::caused_by(
            of,
            Event::InventoryOutOfStock(events::InventoryOutOfStock { shortages: vec![] }),
        )
    }

    #[test]
    fn charges_once_and_refunds_once_within_one_batch() {
        let g = Gateway {
            settings: Settings::default(),
        };
        let mut payments = HashMap::new();
        let order = created(2_999);
        assert!(matches!(
            g.react(&mut payments, &order),
            Ok(Some(Event::PaymentSucceeded(_)))
        ));
        // The same order again (another event ID): not charged twice.
        assert_eq!(g.react(&mut payments, &order), Ok(None));
        let oos = out_of_stock(&order);
        assert!(matches!(
            g.react(&mut payments, &oos),
            Ok(Some(Event::PaymentRefunded(_)))
        ));
        assert_eq!(g.react(&mut payments, &oos), Ok(None));
        let p = &payments[&order.order_id.as_uuid()];
        assert_eq!((p.status, p.new), (PaymentStatus::Refunded, true));
    }

    #[test]
    fn refusing_a_refund_changes_nothing() {
        let g = Gateway {
            settings: Settings::default(),
        };
        let mut payments = HashMap::new();
        let unknown = out_of_stock(&created(100));
        let why = g.react(&mut payments, &unknown).unwrap_err();
        assert!(why.contains("no payment for order"), "{why}");
        assert!(payments.is_empty());
        let declined = created(100_001);
        assert!(matches!(
            g.react(&mut payments, &declined),
            Ok(Some(Event::PaymentFailed(_)))
        ));
        let why = g
            .react(&mut payments, &out_of_stock(&declined))
            .unwrap_err();
        assert!(why.contains("DECLINED"), "{why}");
        let p = &payments[&declined.order_id.as_uuid()];
        assert_eq!((p.status, p.changed), (PaymentStatus::Declined, false));
    }
}
