//! The checkout saga end to end: real PostgreSQL, real broker, three services.

use saga_tests::{System, Which};
use serde_json::json;

fn history_types(order: &serde_json::Value) -> Vec<String> {
    order["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| e["event_type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn happy_path_confirms_the_order_and_reserves_stock() -> anyhow::Result<()> {
    let sys = System::start().await?;
    sys.stock("SKU-H", 10).await?;
    let (status, headers, body) = sys
        .post_order(
            &json!({"customer_id": "c-42", "items": [{"sku": "SKU-H", "quantity": 2, "unit_price": "29.99"}]}),
            &[("X-Correlation-ID", "corr-happy-1")],
        )
        .await?;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "PENDING");
    assert_eq!(body["correlation_id"], "corr-happy-1");
    let id = body["order_id"].as_str().expect("order_id").to_owned();
    assert_eq!(headers["x-correlation-id"], "corr-happy-1");
    assert_eq!(headers["location"], format!("/orders/{id}").as_str());

    let order = sys.wait_terminal(&id).await?;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["failure_reason"], serde_json::Value::Null);
    assert_eq!(order["total"], "59.98");
    assert_eq!(order["customer_id"], "c-42");
    assert_eq!(order["correlation_id"], "corr-happy-1");
    assert_eq!(order["items"][0]["sku"], "SKU-H");
    assert_eq!(
        history_types(&order),
        [
            "OrderCreated",
            "PaymentSucceeded",
            "InventoryReserved",
            "OrderConfirmed"
        ]
    );

    let (status, payment) = sys
        .get_json(Which::Payment, &format!("/payments/{id}"))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(payment["status"], "CHARGED");
    assert_eq!(payment["amount"], "59.98");

    let product = sys.product("SKU-H").await?;
    assert_eq!(product["available"], 8);
    assert_eq!(product["reserved"], 2);

    // Every event of the order is keyed by its ID and carries the headers.
    let created = sys.read_topic(&sys.topic("order-events")).await?;
    let mine: Vec<_> = created
        .iter()
        .filter(|m| m.key.as_deref() == Some(id.as_str()))
        .collect();
    assert_eq!(mine.len(), 2, "OrderCreated and OrderConfirmed");
    for m in mine {
        assert_eq!(m.header("correlation_id"), Some("corr-happy-1"));
        assert!(m
            .header("traceparent")
            .is_some_and(|t| t.starts_with("00-")));
        assert!(m.header("event_type").is_some());
    }
    sys.shutdown().await
}
