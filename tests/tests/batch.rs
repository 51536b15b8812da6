//! The services' batch handlers, called directly on one batch in one
//! transaction of the service's real database: everything a batch can hold
//! for one order or one SKU is decided in arrival order, each step seeing
//! the earlier ones, and refused steps leave nothing behind.
//!
//! (The end-to-end tests cannot choose how the consumer splits messages
//! into batches; these can.)

use events::{
    CorrelationId, CustomerId, Envelope, Event, InventoryOutOfStock, InventoryReserved, LineItem,
    Money, OrderCreated, OrderId, PaymentSucceeded, Quantity, Shortage, Sku,
};
use saga_runtime::{Handler, Step};
use saga_tests::{System, Which};
use serde_json::json;
use sqlx::PgPool;

fn line(sku: &str, quantity: i64) -> LineItem {
    LineItem {
        sku: Sku::parse(sku).expect("valid SKU"),
        quantity: Quantity::new(quantity).expect("valid quantity"),
        unit_price: Money::from_minor(1_000),
    }
}

fn paid(order: OrderId, items: Vec<LineItem>) -> Envelope {
    let event = Event::PaymentSucceeded(PaymentSucceeded {
        payment_id: uuid::Uuid::now_v7(),
        amount: Money::from_minor(1_000),
        items,
    });
    Envelope::new(order, CorrelationId::generate(), event)
}

/// The same event under a new event ID (re-produced upstream).
fn again(e: &Envelope) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7(),
        ..e.clone()
    }
}

/// Runs `handler` on `batch` in one committed transaction; returns each
/// step's emitted event types, or `Err(reason)` for a refused step.
async fn run<H: Handler>(
    pool: &PgPool,
    handler: &H,
    batch: &[Envelope],
) -> anyhow::Result<Vec<Result<Vec<&'static str>, String>>> {
    let mut steps: Vec<Step<'_>> = batch
        .iter()
        .map(|e| Step::new(e, tracing::Span::none()))
        .collect();
    let mut tx = pool.begin().await?;
    handler.handle(&mut tx, &mut steps).await?;
    tx.commit().await?;
    Ok(steps
        .iter()
        .map(|s| match s.verdict() {
            Ok(out) => Ok(out.iter().map(Envelope::event_type).collect()),
            Err(why) => Err(why.to_owned()),
        })
        .collect())
}

#[tokio::test]
async fn inventory_decides_a_batch_in_order_against_the_stock_earlier_steps_left(
) -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-B1", 3).await?;
    sys.stock("SKU-B2", 10).await?;
    let (a, b, c, d) = (
        OrderId::new(),
        OrderId::new(),
        OrderId::new(),
        OrderId::new(),
    );
    let first = paid(
        a,
        vec![line("SKU-B1", 1), line("SKU-B2", 1), line("SKU-B1", 1)],
    );
    let batch = [
        first.clone(),
        paid(b, vec![line("SKU-B1", 2)]), // 1 left after a: out of stock
        again(&first),                    // a again: not reserved twice
        paid(c, vec![line("SKU-B1", 1), line("SKU-B2", 4)]), // the last unit
        paid(d, vec![]),                  // nothing to reserve: refused
    ];
    let verdicts = run(
        sys.db(Which::Inventory),
        &inventory_service::Reserver,
        &batch,
    )
    .await?;
    assert_eq!(verdicts[0], Ok(vec!["InventoryReserved"]));
    assert_eq!(verdicts[1], Ok(vec!["InventoryOutOfStock"]));
    assert_eq!(verdicts[2], Ok(vec![]));
    assert_eq!(verdicts[3], Ok(vec!["InventoryReserved"]));
    assert!(
        matches!(&verdicts[4], Err(why) if why.contains("no items")),
        "{:?}",
        verdicts[4]
    );

    assert_eq!(sys.stock_levels("SKU-B1").await?, (0, 3));
    assert_eq!(sys.stock_levels("SKU-B2").await?, (5, 5));
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT order_id, status FROM reservations ORDER BY created_at, status")
            .fetch_all(sys.db(Which::Inventory))
            .await?;
    let mut want = vec![
        (a.as_uuid(), "RESERVED".to_owned()),
        (b.as_uuid(), "REJECTED".to_owned()),
        (c.as_uuid(), "RESERVED".to_owned()),
    ];
    let mut got = rows;
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "one row per decided order, none for the refused one"
    );

    // The next batch sees what this one committed.
    let verdicts = run(
        sys.db(Which::Inventory),
        &inventory_service::Reserver,
        &[again(&first)],
    )
    .await?;
    assert_eq!(verdicts, vec![Ok(vec![])]);
    sys.shutdown().await
}

#[tokio::test]
async fn payment_charges_and_refunds_each_order_once_within_a_batch() -> anyhow::Result<()> {
    let sys = System::start().await?;
    let gateway = payment_service::Gateway {
        settings: saga_tests::PaymentSettings::default(),
    };
    let created = |total_minor| {
        let event = Event::OrderCreated(OrderCreated {
            customer_id: CustomerId::parse("batch-customer").expect("valid customer"),
            items: vec![line("SKU-1", 1)],
            total: Money::from_minor(total_minor),
        });
        Envelope::new(OrderId::new(), CorrelationId::generate(), event)
    };
    let out_of_stock = |of: &Envelope| {
        Envelope::caused_by(
            of,
            Event::InventoryOutOfStock(InventoryOutOfStock {
                shortages: vec![Shortage {
                    sku: Sku::parse("SKU-1").expect("valid SKU"),
                    requested: 1,
                    available: 0,
                }],
            }),
        )
    };
    let a = created(2_000);
    let declined = created(200_000);
    let stranger = created(2_000); // never charged
    let batch = [
        a.clone(),
        again(&a),
        out_of_stock(&a),
        out_of_stock(&a),
        declined.clone(),
        out_of_stock(&declined),
        out_of_stock(&stranger),
    ];
    let verdicts = run(sys.db(Which::Payment), &gateway, &batch).await?;
    assert_eq!(verdicts[0], Ok(vec!["PaymentSucceeded"]));
    assert_eq!(verdicts[1], Ok(vec![]), "charged twice");
    assert_eq!(verdicts[2], Ok(vec!["PaymentRefunded"]));
    assert_eq!(verdicts[3], Ok(vec![]), "refunded twice");
    assert_eq!(verdicts[4], Ok(vec!["PaymentFailed"]));
    assert!(
        matches!(&verdicts[5], Err(why) if why.contains("DECLINED")),
        "{:?}",
        verdicts[5]
    );
    assert!(
        matches!(&verdicts[6], Err(why) if why.contains("no payment")),
        "{:?}",
        verdicts[6]
    );

    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT order_id, status FROM payments ORDER BY order_id")
            .fetch_all(sys.db(Which::Payment))
            .await?;
    let mut want = vec![
        (a.order_id.as_uuid(), "REFUNDED".to_owned()),
        (declined.order_id.as_uuid(), "DECLINED".to_owned()),
    ];
    want.sort();
    assert_eq!(rows, want);

    // A payment charged by an earlier batch is refunded by a later one, once.
    let b = created(3_000);
    assert_eq!(
        run(sys.db(Which::Payment), &gateway, std::slice::from_ref(&b)).await?,
        vec![Ok(vec!["PaymentSucceeded"])]
    );
    let verdicts = run(
        sys.db(Which::Payment),
        &gateway,
        &[out_of_stock(&b), out_of_stock(&b)],
    )
    .await?;
    assert_eq!(verdicts, vec![Ok(vec!["PaymentRefunded"]), Ok(vec![])]);
    sys.shutdown().await
}

#[tokio::test]
async fn order_saga_ends_once_per_batch_and_records_every_event_in_order() -> anyhow::Result<()> {
    let mut sys = System::start().await?;
    // No payment service: the order stays PENDING until this test's batch.
    sys.stop(Which::Payment).await?;
    let id = sys
        .place(json!([{"sku": "SKU-1", "quantity": 2, "unit_price": "15.00"}]))
        .await?;
    let order_id: OrderId = id.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let created = Envelope::new(
        order_id,
        CorrelationId::generate(),
        Event::OrderCreated(OrderCreated {
            customer_id: CustomerId::parse("batch-customer").expect("valid customer"),
            items: vec![line("SKU-1", 2)],
            total: Money::from_minor(3_000),
        }),
    );
    let paid = Envelope::caused_by(
        &created,
        Event::PaymentSucceeded(PaymentSucceeded {
            payment_id: uuid::Uuid::now_v7(),
            amount: Money::from_minor(3_000),
            items: vec![line("SKU-1", 2)],
        }),
    );
    let reserved = Envelope::caused_by(
        &paid,
        Event::InventoryReserved(InventoryReserved { items: vec![] }),
    );
    let contradicting = Envelope::caused_by(
        &paid,
        Event::InventoryOutOfStock(InventoryOutOfStock { shortages: vec![] }),
    );
    let unknown = Envelope::new(
        OrderId::new(),
        CorrelationId::generate(),
        Event::InventoryReserved(InventoryReserved { items: vec![] }),
    );
    let batch = [
        paid,
        reserved.clone(),
        unknown,
        again(&reserved),
        contradicting,
    ];
    let verdicts = run(sys.db(Which::Order), &order_service::OrderSaga, &batch).await?;
    assert_eq!(verdicts[0], Ok(vec![]));
    assert_eq!(verdicts[1], Ok(vec!["OrderConfirmed"]));
    assert!(
        matches!(&verdicts[2], Err(why) if why.contains("does not exist")),
        "{:?}",
        verdicts[2]
    );
    assert_eq!(verdicts[3], Ok(vec![]), "confirmed twice");
    assert_eq!(verdicts[4], Ok(vec![]), "a finished order changed");

    let order = sys.order(&id).await?;
    assert_eq!(order["status"], "CONFIRMED");
    let history: Vec<String> = order["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| e["event_type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        history,
        [
            "OrderCreated",
            "PaymentSucceeded",
            "InventoryReserved",
            "OrderConfirmed",
            "InventoryReserved",
            "InventoryOutOfStock"
        ],
        "{order}"
    );
    sys.shutdown().await
}
