//! The stock rules, as pure functions over what a batch has locked:
//! reserve every item of a paid order or none, never oversell, and give a
//! reservation back once when its payment is refunded.

use std::collections::{BTreeMap, HashMap};

use events::{
    Event, InventoryOutOfStock, InventoryReleased, InventoryReserved, LineItem, ReservedLine,
    Shortage, Sku,
};
use uuid::Uuid;

events::named_enum! {
    /// What inventory did for an order, as stored.
    pub enum ReservationStatus: "reservation status" {
        /// The units are taken from `available` and counted in `reserved`.
        Reserved => "RESERVED",
        /// Out of stock: nothing was taken.
        Rejected => "REJECTED",
        /// Taken, then given back after the payment was refunded.
        Released => "RELEASED",
        /// The refund came before any reservation: nothing will be taken.
        Void => "VOID",
    }
}

impl ReservationStatus {
    /// As `GET /reservations` shows it; `None` for orders inventory never
    /// held stock for.
    pub fn shown(self) -> Option<&'static str> {
        match self {
            Self::Reserved => Some("HELD"),
            Self::Released => Some("RELEASED"),
            Self::Rejected | Self::Void => None,
        }
    }
}

/// An order's reservation as the batch knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub status: ReservationStatus,
    /// The paid order's lines (empty for `Void`).
    pub items: Vec<LineItem>,
    /// Not in the table yet (decided by this batch).
    pub new: bool,
    /// Status changed by this batch.
    pub changed: bool,
}

/// What a batch has read and locked, and what it changed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stock {
    /// Units available per locked SKU (absent: unknown SKU, none).
    pub on_hand: BTreeMap<String, i64>,
    /// Reservations of the batch's orders, by order ID.
    pub reservations: HashMap<Uuid, Reservation>,
    /// Net change of `available` per SKU (`reserved` moves the other way).
    pub moved: BTreeMap<String, i64>,
}

impl Stock {
    /// `PaymentSucceeded`: reserve every item or none. `Ok(None)`: the order
    /// went through inventory before (or was refunded first). `Err`: the
    /// event cannot be applied, and nothing changed.
    pub fn reserve(&mut self, order_id: Uuid, items: &[LineItem]) -> Result<Option<Event>, String> {
        let wanted = merge(items)?;
        if let Some(r) = self.reservations.get(&order_id) {
            tracing::warn!(
                status = r.status.as_str(),
                "order already went through inventory; not reserving again"
            );
            return Ok(None);
        }
        let (status, event) = match shortages(&wanted, &self.on_hand)? {
            Some(shortages) => (
                ReservationStatus::Rejected,
                Event::InventoryOutOfStock(InventoryOutOfStock { shortages }),
            ),
            None => {
                self.move_units(&wanted, -1);
                (
                    ReservationStatus::Reserved,
                    Event::InventoryReserved(InventoryReserved {
                        items: lines(&wanted)?,
                    }),
                )
            }
        };
        self.reservations.insert(
            order_id,
            Reservation {
                status,
                items: items.to_vec(),
                new: true,
                changed: false,
            },
        );
        Ok(Some(event))
    }

    /// `PaymentRefunded`: a held reservation goes back to `available` once
    /// and `InventoryReleased` goes out. A refund for an order inventory
    /// never reserved changes nothing it shows, but is remembered, so that
    /// a `PaymentSucceeded` seen later takes nothing.
    pub fn release(&mut self, order_id: Uuid) -> Result<Option<Event>, String> {
        let Some(r) = self.reservations.get_mut(&order_id) else {
            tracing::info!("refund for an order inventory never reserved; nothing to release");
            self.reservations.insert(
                order_id,
                Reservation {
                    status: ReservationStatus::Void,
                    items: Vec::new(),
                    new: true,
                    changed: false,
                },
            );
            return Ok(None);
        };
        if r.status != ReservationStatus::Reserved {
            return Ok(None);
        }
        r.status = ReservationStatus::Released;
        r.changed = true;
        let wanted = merge(&r.items)?;
        self.move_units(&wanted, 1);
        tracing::info!("reservation released");
        Ok(Some(Event::InventoryReleased(InventoryReleased {
            items: lines(&wanted)?,
        })))
    }

    /// SKUs a release of these reservations would touch.
    pub fn held_skus(&self) -> impl Iterator<Item = &Sku> {
        self.reservations
            .values()
            .filter(|r| r.status == ReservationStatus::Reserved)
            .flat_map(|r| r.items.iter().map(|i| &i.sku))
    }

    /// Moves `wanted` out of (`sign` −1) or back into (+1) `available`.
    fn move_units(&mut self, wanted: &BTreeMap<String, i64>, sign: i64) {
        for (sku, qty) in wanted {
            *self.on_hand.entry(sku.clone()).or_default() += sign * qty;
            *self.moved.entry(sku.clone()).or_default() += sign * qty;
        }
    }
}

/// Sums the lines of each SKU, in SKU order (the lock order).
pub fn merge(items: &[LineItem]) -> Result<BTreeMap<String, i64>, String> {
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for item in items {
        *wanted.entry(item.sku.to_string()).or_default() += i64::from(item.quantity.get());
    }
    if wanted.is_empty() {
        return Err("payment carries no items".into());
    }
    Ok(wanted)
}

/// What is missing for `wanted`, if anything.
fn shortages(
    wanted: &BTreeMap<String, i64>,
    on_hand: &BTreeMap<String, i64>,
) -> Result<Option<Vec<Shortage>>, String> {
    let mut short = Vec::new();
    for (s, &qty) in wanted {
        let available = on_hand.get(s).copied().unwrap_or(0);
        if available < qty {
            short.push(Shortage {
                sku: sku(s)?,
                requested: u32::try_from(qty).unwrap_or(u32::MAX),
                available,
            });
        }
    }
    Ok((!short.is_empty()).then_some(short))
}

fn lines(wanted: &BTreeMap<String, i64>) -> Result<Vec<ReservedLine>, String> {
    wanted
        .iter()
        .map(|(s, &qty)| {
            Ok(ReservedLine {
                sku: sku(s)?,
                quantity: u32::try_from(qty).map_err(|e| e.to_string())?,
            })
        })
        .collect()
}

fn sku(s: &str) -> Result<Sku, String> {
    Sku::parse(s).map_err(|e| e.to_string())
}

/// What a `PUT /products/{sku}` does, decided from the product as it is
/// (read under a row lock) and the version the caller sent.
#[derive(Debug, PartialEq, Eq)]
pub enum PutPlan {
    /// No such product and no version: create it; the ledger books its
    /// units.
    Create,
    /// The caller's version is the product's: set it; the ledger books the
    /// change of units.
    Update { delta: i64 },
    /// The product exists and the caller sent no version: a blind write
    /// would overwrite what reservations did meanwhile.
    VersionRequired { current: i64 },
    /// The caller's version is not the product's (`None`: no product).
    Stale { current: Option<i64> },
}

/// `current` is the product's `(available, version)`, if it exists.
pub fn plan_put(current: Option<(i64, i64)>, expected: Option<i64>, available: i64) -> PutPlan {
    match (current, expected) {
        (None, None) => PutPlan::Create,
        (None, Some(_)) => PutPlan::Stale { current: None },
        (Some((_, version)), None) => PutPlan::VersionRequired { current: version },
        (Some((_, version)), Some(e)) if version != e => PutPlan::Stale {
            current: Some(version),
        },
        (Some((was, _)), Some(_)) => PutPlan::Update {
            delta: available - was,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{Money, Quantity};

    fn item(sku: &str, qty: i64) -> LineItem {
        LineItem {
            sku: Sku::parse(sku).unwrap(),
            quantity: Quantity::new(qty).unwrap(),
            unit_price: Money::from_minor(100),
        }
    }

    fn stock(levels: &[(&str, i64)]) -> Stock {
        Stock {
            on_hand: levels.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            ..Stock::default()
        }
    }

    #[test]
    fn reserves_all_or_nothing_and_never_twice() {
        let mut s = stock(&[("A", 3), ("B", 1)]);
        let (o1, o2) = (Uuid::now_v7(), Uuid::now_v7());
        let Ok(Some(Event::InventoryReserved(r))) =
            s.reserve(o1, &[item("A", 2), item("B", 1), item("A", 1)])
        else {
            panic!("expected a reservation");
        };
        assert_eq!(r.items.len(), 2);
        assert_eq!(
            s.on_hand,
            BTreeMap::from([("A".into(), 0), ("B".into(), 0)])
        );
        assert!(matches!(
            s.reserve(o2, &[item("A", 1)]),
            Ok(Some(Event::InventoryOutOfStock(_)))
        ));
        assert_eq!(
            s.moved,
            BTreeMap::from([("A".into(), -3), ("B".into(), -1)])
        );
        assert_eq!(s.reserve(o1, &[item("A", 1)]), Ok(None));
        assert!(s.reserve(Uuid::now_v7(), &[]).is_err());
    }

    #[test]
    fn a_refund_releases_a_reservation_once() {
        let mut s = stock(&[("A", 5)]);
        let o = Uuid::now_v7();
        s.reserve(o, &[item("A", 2)]).unwrap();
        let Ok(Some(Event::InventoryReleased(r))) = s.release(o) else {
            panic!("expected a release");
        };
        assert_eq!((r.items[0].sku.as_str(), r.items[0].quantity), ("A", 2));
        assert_eq!(s.on_hand["A"], 5);
        assert_eq!(s.moved["A"], 0);
        assert_eq!(s.release(o), Ok(None), "released twice");
        assert_eq!(s.on_hand["A"], 5);
        assert_eq!(s.reservations[&o].status, ReservationStatus::Released);
    }

    #[test]
    fn a_refund_of_a_rejected_order_releases_nothing() {
        let mut s = stock(&[("A", 1)]);
        let o = Uuid::now_v7();
        s.reserve(o, &[item("A", 2)]).unwrap();
        let before = s.clone();
        assert_eq!(s.release(o), Ok(None));
        assert_eq!(s, before);
    }

    #[test]
    fn a_refund_before_any_reservation_means_nothing_is_ever_taken() {
        let mut s = stock(&[("A", 5)]);
        let o = Uuid::now_v7();
        assert_eq!(s.release(o), Ok(None));
        assert!(s.moved.is_empty());
        assert_eq!(s.reservations[&o].status, ReservationStatus::Void);
        // Its PaymentSucceeded, redriven later: nothing reserved.
        assert_eq!(s.reserve(o, &[item("A", 1)]), Ok(None));
        assert_eq!(s.on_hand["A"], 5);
    }

    #[test]
    fn statuses_round_trip_and_show() {
        for &st in ReservationStatus::ALL {
            assert_eq!(ReservationStatus::try_from(st.as_str().to_owned()), Ok(st));
        }
        assert_eq!(ReservationStatus::Reserved.shown(), Some("HELD"));
        assert_eq!(ReservationStatus::Released.shown(), Some("RELEASED"));
        assert_eq!(ReservationStatus::Void.shown(), None);
    }

    #[test]
    fn a_put_creates_without_a_version_and_sets_only_with_the_current_one() {
        assert_eq!(plan_put(None, None, 7), PutPlan::Create);
        assert_eq!(plan_put(None, Some(1), 7), PutPlan::Stale { current: None });
        assert_eq!(
            plan_put(Some((7, 2)), None, 1_000),
            PutPlan::VersionRequired { current: 2 }
        );
        assert_eq!(
            plan_put(Some((7, 2)), Some(1), 1_000),
            PutPlan::Stale { current: Some(2) }
        );
        assert_eq!(
            plan_put(Some((7, 2)), Some(2), 1_000),
            PutPlan::Update { delta: 993 }
        );
        assert_eq!(
            plan_put(Some((7, 2)), Some(2), 3),
            PutPlan::Update { delta: -4 }
        );
    }
}
