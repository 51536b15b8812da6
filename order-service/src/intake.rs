//! Group commit for `POST /orders`.
//!
//! Every accepted order is one row in `orders`, one in `order_history` and
//! one `OrderCreated` in the outbox, committed together. Written one request
//! at a time that is five round trips and one WAL flush per order, and under
//! load those requests took most of PostgreSQL's CPU and every pooled
//! connection. Here one writer task takes all the requests waiting at that
//! moment and writes them in one statement (one round trip, one implicit
//! transaction), whatever their number.
//!
//! Each request still gets its own answer: inserted, or its Idempotency-Key
//! was taken. If a batch fails for any reason but a database outage, its
//! requests are written again one by one, so one bad row cannot fail the
//! others.

use std::collections::HashSet;

use events::Envelope;
use saga_runtime::{ApiError, Outbox};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::store::{self, NewRow};

/// Most orders committed in one transaction.
const MAX_BATCH: usize = 256;
/// Requests waiting for the writer before new ones wait to get in line.
const QUEUE: usize = 4 * MAX_BATCH;

/// One order to write, with what the outbox needs.
pub struct Pending {
    pub row: NewRow,
    pub created: Envelope,
    /// Trace context of the request, stored with the outbox row.
    pub traceparent: Option<String>,
}

/// An order and where its answer goes.
type Queued = (Pending, oneshot::Sender<Result<bool, ApiError>>);

/// The handle request handlers submit orders through.
#[derive(Clone)]
pub struct Intake {
    tx: mpsc::Sender<Queued>,
}

impl Intake {
    /// Starts the writer task; it ends once every `Intake` clone is dropped
    /// (after the HTTP server stops) and the queue is drained.
    pub fn start(pool: PgPool, outbox: Outbox) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, outbox, rx));
        Self { tx }
    }

    /// Writes `pending` in the next group commit. `Ok(false)`: its
    /// Idempotency-Key is taken (nothing was written).
    pub async fn submit(&self, pending: Pending) -> Result<bool, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((pending, reply))
            .await
            .map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the service is shutting down; try again",
    )
}

async fn run(pool: PgPool, outbox: Outbox, mut rx: mpsc::Receiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let pending: Vec<&Pending> = batch.iter().map(|(p, _)| p).collect();
        match write(&pool, &outbox, &pending).await {
            Ok(inserted) => {
                for (p, reply) in batch.drain(..) {
                    // The requester may have gone (client disconnected); its
                    // order stands, like any commit whose answer was lost.
                    let _ = reply.send(Ok(inserted.contains(&p.row.id)));
                }
            }
            Err(e) if batch.len() > 1 && !saga_runtime::db::is_transient(&e) => {
                tracing::warn!(error = %e, orders = batch.len(), "group commit failed; writing its orders one by one");
                for (p, reply) in batch.drain(..) {
                    let one = write(&pool, &outbox, &[&p]).await;
                    let _ = reply.send(
                        one.map(|inserted| inserted.contains(&p.row.id))
                            .map_err(ApiError::from),
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %e, orders = batch.len(), "writing orders failed");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(ApiError::from_db(&e)));
                }
            }
        }
    }
}

/// One statement, so one round trip and one implicit transaction: the
/// orders whose key is free, their history and their `OrderCreated` events.
/// Returns the IDs inserted.
async fn write(
    pool: &PgPool,
    outbox: &Outbox,
    pending: &[&Pending],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let rows: Vec<&NewRow> = pending.iter().map(|p| &p.row).collect();
    let history: Vec<&Envelope> = pending.iter().map(|p| &p.created).collect();
    let traced: Vec<(&Envelope, Option<&str>)> = pending
        .iter()
        .map(|p| (&p.created, p.traceparent.as_deref()))
        .collect();
    let events = outbox.prepare(&traced)?;
    let created = store::create(pool, &rows, &history, &events).await?;
    outbox.committed(events.staged(created.events));
    Ok(created.orders)
}
