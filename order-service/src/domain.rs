//! The `POST /orders` body, parsed into domain types at the edge.

use events::{
    CustomerId, DomainError, LineItem, Money, Quantity, Sku, MAX_ITEMS_PER_ORDER,
    MAX_UNIT_PRICE_MINOR,
};
use serde::{Deserialize, Serialize};

/// The body as it arrives. Field types are loose on purpose so that every
/// rule is checked here and reported with the field that broke it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOrderRequest {
    pub customer_id: String,
    pub items: Vec<ItemRequest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemRequest {
    pub sku: String,
    pub quantity: i64,
    pub unit_price: String,
}

/// A valid order, ready to store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewOrder {
    pub customer_id: CustomerId,
    pub items: Vec<LineItem>,
    pub total: Money,
}

impl NewOrder {
    /// Checks every rule; the error names the offending field.
    pub fn parse(req: CreateOrderRequest) -> Result<Self, String> {
        let field = |name: String| move |e: DomainError| format!("{name}: {e}");
        let customer_id =
            CustomerId::parse(req.customer_id).map_err(field("customer_id".into()))?;
        if req.items.is_empty() {
            return Err("items: an order needs at least one item".into());
        }
        if req.items.len() > MAX_ITEMS_PER_ORDER {
            return Err(format!(
                "items: at most {MAX_ITEMS_PER_ORDER} items per order, got {}",
                req.items.len()
            ));
        }
        let mut items = Vec::with_capacity(req.items.len());
        let mut total = Money::ZERO;
        for (i, item) in req.items.into_iter().enumerate() {
            let sku = Sku::parse(item.sku).map_err(field(format!("items[{i}].sku")))?;
            let quantity =
                Quantity::new(item.quantity).map_err(field(format!("items[{i}].quantity")))?;
            let unit_price = Money::parse_decimal(&item.unit_price)
                .map_err(field(format!("items[{i}].unit_price")))?;
            if unit_price.minor() <= 0 {
                return Err(format!("items[{i}].unit_price: must be greater than 0"));
            }
            if unit_price.minor() > MAX_UNIT_PRICE_MINOR {
                return Err(format!(
                    "items[{i}].unit_price: at most {}",
                    Money::from_minor(MAX_UNIT_PRICE_MINOR)
                ));
            }
            let line = LineItem {
                sku,
                quantity,
                unit_price,
            };
            total = line
                .line_total()
                .and_then(|t| total.checked_add(t))
                .ok_or_else(|| "items: order total is too large".to_owned())?;
            items.push(line);
        }
        Ok(Self {
            customer_id,
            items,
            total,
        })
    }

    /// A stable text form of the order, to tell a retry from a different
    /// request under the same idempotency key.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: serde_json::Value) -> CreateOrderRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn valid_order_totals_in_minor_units() {
        let order = NewOrder::parse(req(serde_json::json!({
            "customer_id": "c-42",
            "items": [
                {"sku": "SKU-1", "quantity": 2, "unit_price": "29.99"},
                {"sku": "SKU-2", "quantity": 1, "unit_price": "0.5"}
            ]
        })))
        .unwrap();
        assert_eq!(order.total, Money::from_minor(6048));
        assert_eq!(order.items.len(), 2);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases = [
            (
                serde_json::json!({"customer_id": "", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}),
                "customer_id",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": []}),
                "items",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "", "quantity": 1, "unit_price": "1"}]}),
                "items[0].sku",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 0, "unit_price": "1"}]}),
                "items[0].quantity",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1000000, "unit_price": "1"}]}),
                "items[0].quantity",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "0"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "-1.00"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.001"}]}),
                "items[0].unit_price",
            ),
            (
                serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}, {"sku": "B", "quantity": -2, "unit_price": "1"}]}),
                "items[1].quantity",
            ),
        ];
        for (body, field) in cases {
            let err = NewOrder::parse(req(body.clone())).unwrap_err();
            assert!(err.starts_with(field), "{body} → {err}");
        }
    }

    #[test]
    fn too_many_items_are_refused() {
        let items: Vec<_> = (0..=MAX_ITEMS_PER_ORDER)
            .map(|i| serde_json::json!({"sku": format!("S{i}"), "quantity": 1, "unit_price": "1"}))
            .collect();
        let err = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": items})))
            .unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }

    #[test]
    fn fingerprint_tells_bodies_apart() {
        let a = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1"}]}))).unwrap();
        let b = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 2, "unit_price": "1"}]}))).unwrap();
        let a2 = NewOrder::parse(req(serde_json::json!({"customer_id": "c", "items": [{"sku": "A", "quantity": 1, "unit_price": "1.00"}]}))).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a2.fingerprint());
    }
}

/// Where an order's saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Failed,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 3] = [Self::Pending, Self::Confirmed, Self::Failed];

    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Confirmed => "CONFIRMED",
            Self::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

#[cfg(test)]
mod status_tests {
    use super::OrderStatus;

    #[test]
    fn statuses_round_trip_and_nothing_else_parses() {
        for st in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(OrderStatus::parse("pending"), None);
        assert_eq!(OrderStatus::parse("CANCELLED"), None);
    }
}
