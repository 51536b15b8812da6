//! Ending orders outside the consumer: a customer's cancellation and the
//! deadline. Both lock the order, decide with the rules of
//! [`OrderState`], and commit the new status, the history and the
//! `OrderCancelled` event in one transaction.

use std::time::Duration;

use events::{CorrelationId, Envelope, Event, OrderId};
use saga_runtime::Outbox;
use sqlx::{PgPool, Postgres, Transaction};

use crate::domain::{NotCancellable, OrderState};
use crate::store;

/// What a cancellation request found.
#[derive(Debug)]
pub enum Cancelled {
    /// The order is CANCELLED now (or was already).
    Done,
    NotFound,
    NotCancellable(NotCancellable),
}

/// Cancels order `id` for its customer. `traceparent` links the event to
/// the request's trace.
pub async fn cancel(
    pool: &PgPool,
    outbox: &Outbox,
    id: OrderId,
    traceparent: Option<&str>,
) -> Result<Cancelled, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut orders = store::lock(&mut tx, &[id.as_uuid()]).await?;
    let Some(order) = orders.get_mut(&id.as_uuid()) else {
        return Ok(Cancelled::NotFound);
    };
    match order.cancel() {
        Err(why) => Ok(Cancelled::NotCancellable(why)),
        Ok(None) => Ok(Cancelled::Done),
        Ok(Some(event)) => {
            let ended = ended(order, event)?;
            commit(tx, outbox, &[(&*order, ended)], traceparent).await?;
            tracing::info!(order_id = %id, "order cancelled by its customer");
            Ok(Cancelled::Done)
        }
    }
}

/// Most orders one expiry transaction ends.
const EXPIRE_BATCH: i64 = 500;

/// Ends every order still PENDING `deadline` after its creation, both by
/// the database's clock (at most [`EXPIRE_BATCH`] per call); returns how
/// many it ended.
pub async fn expire_due(
    pool: &PgPool,
    outbox: &Outbox,
    deadline: Duration,
) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let now = store::db_now(&mut tx).await?;
    let cutoff = OrderState::due_cutoff(now, deadline);
    let mut orders = store::lock_due(&mut tx, cutoff, EXPIRE_BATCH).await?;
    let mut ended_now = Vec::with_capacity(orders.len());
    for order in orders.values_mut() {
        if let Some(event) = order.expire(now, deadline) {
            let env = ended(order, event)?;
            ended_now.push((&*order, env));
        }
    }
    if ended_now.is_empty() {
        return Ok(0);
    }
    let n = ended_now.len();
    commit(tx, outbox, &ended_now, None).await?;
    tracing::info!(
        orders = n,
        "orders past their deadline failed; compensation requested"
    );
    Ok(n)
}

/// The envelope of `event`, which ended `order`.
fn ended(order: &OrderState, event: Event) -> Result<Envelope, sqlx::Error> {
    let correlation = CorrelationId::parse(order.correlation_id.clone())
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Envelope::new(
        OrderId::from_uuid(order.order_id),
        correlation,
        event,
    ))
}

/// Writes the ended orders, their history and their events, commits, and
/// hands the events to the relay.
async fn commit(
    mut tx: Transaction<'_, Postgres>,
    outbox: &Outbox,
    ended: &[(&OrderState, Envelope)],
    traceparent: Option<&str>,
) -> Result<(), sqlx::Error> {
    let history: Vec<&Envelope> = ended.iter().map(|(_, e)| e).collect();
    store::save(&mut tx, ended.iter().map(|(o, _)| *o), &history).await?;
    let traced: Vec<(&Envelope, Option<&str>)> =
        history.iter().map(|e| (*e, traceparent)).collect();
    let staged = outbox.enqueue_traced(&mut tx, &traced).await?;
    tx.commit().await?;
    outbox.committed(staged);
    let emitted: Vec<Envelope> = ended.iter().map(|(_, e)| e.clone()).collect();
    crate::outcomes::record(&emitted);
    Ok(())
}
