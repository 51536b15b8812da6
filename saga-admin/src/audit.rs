//! The books audit: reads the three services through their HTTP APIs (each
//! keeps its own database) and checks that every order's end state agrees
//! across them, and that every SKU's units are accounted for.
//!
//! It walks `GET /orders`, `GET /payments` and `GET /reservations` side by
//! side, one page of each at a time: all three list by order ID, newest
//! first, so the three streams merge like sorted files and nothing is held
//! beyond a page per service, whatever the number of orders.
//!
//! Per order ([`judge`]):
//! - `CONFIRMED` ⇒ payment `CHARGED` for the order's total, and its items
//!   reserved;
//! - `FAILED`/`payment_declined` ⇒ payment `DECLINED`, nothing reserved;
//! - `FAILED`/`out_of_stock` ⇒ payment `REFUNDED`, nothing reserved;
//! - `CANCELLED`/`cancelled` or `FAILED`/`deadline_exceeded` ⇒ payment
//!   `REFUNDED`, `DECLINED` or none, nothing reserved (a reservation made
//!   before the cancellation is `RELEASED`);
//! - `PENDING` ⇒ younger than `pending_older_than`;
//! - no payment or reservation without its order.
//!
//! Per SKU: `available + reserved` equals `stocked`, the sum of every
//! catalog write (inventory-service's stock ledger).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where the services are and what to tolerate.
#[derive(Debug, Clone)]
pub struct Options {
    pub order_url: String,
    pub payment_url: String,
    pub inventory_url: String,
    pub pending_older_than: Duration,
    /// Orders changed more recently than this are not judged (in flight).
    pub settle: Duration,
    pub page_size: u16,
    /// Sent as `Authorization: Bearer …` (an operator's token, scope
    /// `saga:admin`, when the services run with authentication on).
    pub token: Option<String>,
}

/// Why the audit could not run.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Token(#[from] crate::token::TokenError),
    #[error("{url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: unexpected answer: {why}")]
    BadAnswer { url: String, why: String },
}

/// One thing that does not add up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// `order` or `sku`.
    pub kind: &'static str,
    /// The order ID or the SKU.
    pub id: String,
    pub problem: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.id, self.problem)
    }
}

/// The totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub orders: u64,
    pub in_flight: u64,
    pub skus: u64,
    pub violations: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Line {
    pub sku: String,
    pub quantity: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Order {
    pub order_id: Uuid,
    pub status: String,
    pub failure_reason: Option<String>,
    pub items: Vec<Line>,
    pub total: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Payment {
    pub order_id: Uuid,
    pub status: String,
    pub amount: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reservation {
    pub order_id: Uuid,
    pub status: String,
    pub items: Vec<Line>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Product {
    pub sku: String,
    pub available: i64,
    pub reserved: i64,
    pub stocked: i64,
}

/// What [`judge`] makes of one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Changed too recently to judge: compensations may be on their way.
    InFlight,
    Wrong(Vec<String>),
}

/// Judges one order ID from what each service holds for it. `now` and the
/// options' ages decide what is stuck and what is still in flight.
pub fn judge(
    order: Option<&Order>,
    payment: Option<&Payment>,
    reservation: Option<&Reservation>,
    now: DateTime<Utc>,
    options: &Options,
) -> Verdict {
    let Some(order) = order else {
        let mut wrong = Vec::new();
        if let Some(p) = payment {
            wrong.push(format!(
                "payment {} for an order order-service does not know",
                p.status
            ));
        }
        if reservation.is_some() {
            wrong.push("stock held for an order order-service does not know".to_owned());
        }
        return Verdict::Wrong(wrong);
    };
    let age = |t: DateTime<Utc>| (now - t).to_std().unwrap_or_default();
    if order.status == "PENDING" {
        return if age(order.created_at) > options.pending_older_than {
            Verdict::Wrong(vec![format!(
                "PENDING for {} (more than {})",
                humantime::format_duration(Duration::from_secs(age(order.created_at).as_secs())),
                humantime::format_duration(options.pending_older_than)
            )])
        } else {
            Verdict::InFlight
        };
    }
    let mut wrong = Vec::new();
    let paid = payment.map(|p| p.status.as_str());
    let held = reservation.filter(|r| r.status == "HELD");
    let nothing_held = |state: &str, wrong: &mut Vec<String>| {
        if held.is_some() {
            wrong.push(format!("{state} but stock is held for it"));
        }
    };
    match (order.status.as_str(), order.failure_reason.as_deref()) {
        ("CONFIRMED", _) => {
            if paid != Some("CHARGED") {
                wrong.push(format!(
                    "CONFIRMED but payment is {}",
                    paid.unwrap_or("missing")
                ));
            }
            match held {
                None => wrong.push("CONFIRMED but no stock is held for it".to_owned()),
                Some(r) if units(&r.items) != units(&order.items) => wrong.push(format!(
                    "CONFIRMED but the stock held ({:?}) is not what was ordered ({:?})",
                    units(&r.items),
                    units(&order.items)
                )),
                Some(_) => {}
            }
            if let Some(p) = payment {
                if p.amount != order.total {
                    wrong.push(format!(
                        "charged {} for an order of {}",
                        p.amount, order.total
                    ));
                }
            }
        }
        ("FAILED", Some("payment_declined")) => {
            if paid != Some("DECLINED") {
                wrong.push(format!(
                    "FAILED/payment_declined but payment is {}",
                    paid.unwrap_or("missing")
                ));
            }
            nothing_held("FAILED/payment_declined", &mut wrong);
        }
        ("FAILED", Some("out_of_stock")) => {
            if paid != Some("REFUNDED") {
                wrong.push(format!(
                    "FAILED/out_of_stock but payment is {}",
                    paid.unwrap_or("missing")
                ));
            }
            nothing_held("FAILED/out_of_stock", &mut wrong);
        }
        (status @ ("CANCELLED" | "FAILED"), Some(reason @ ("cancelled" | "deadline_exceeded")))
            if (status == "CANCELLED") == (reason == "cancelled") =>
        {
            let state = format!("{status}/{reason}");
            if let Some(p @ "CHARGED") = paid {
                wrong.push(format!("{state} but payment is {p} (not refunded)"));
            }
            nothing_held(&state, &mut wrong);
        }
        (status, reason) => wrong.push(format!(
            "unknown end state {status}/{}",
            reason.unwrap_or("-")
        )),
    }
    if let Some(r) = reservation {
        if !matches!(r.status.as_str(), "HELD" | "RELEASED") {
            wrong.push(format!("reservation in unknown state {}", r.status));
        }
    }
    if wrong.is_empty() {
        Verdict::Fine
    } else if age(order.updated_at) < options.settle {
        Verdict::InFlight
    } else {
        Verdict::Wrong(wrong)
    }
}

/// Units per SKU.
fn units(lines: &[Line]) -> BTreeMap<&str, i64> {
    let mut m = BTreeMap::new();
    for l in lines {
        *m.entry(l.sku.as_str()).or_default() += l.quantity;
    }
    m
}

/// Judges one product's books.
pub fn judge_product(p: &Product) -> Option<String> {
    (p.available + p.reserved != p.stocked).then(|| {
        format!(
            "available {} + reserved {} = {}, but {} units were put in through the catalog",
            p.available,
            p.reserved,
            p.available + p.reserved,
            p.stocked
        )
    })
}

/// Runs the audit, calling `found` for each violation as it is found.
pub async fn run(
    options: &Options,
    mut found: impl FnMut(&Violation),
) -> Result<Report, AuditError> {
    let http = crate::token::http_client(options.token.as_deref())?;
    let now = Utc::now();
    let mut report = Report::default();
    let mut report_violation = |v: Violation, report: &mut Report| {
        report.violations += 1;
        found(&v);
    };
    let limit = options.page_size;
    let mut orders: Pager<Order> = Pager::new(&http, &options.order_url, "orders", limit, None);
    // Orders created while the audit runs are above the first page; their
    // payments and reservations must not be read either.
    let top = orders.peek_id().await?;
    let bound = top.map(|id| Uuid::from_u128(id.as_u128().saturating_add(1)));
    let mut payments: Pager<Payment> =
        Pager::new(&http, &options.payment_url, "payments", limit, bound);
    let mut reservations: Pager<Reservation> =
        Pager::new(&http, &options.inventory_url, "reservations", limit, bound);
    loop {
        let ids = [
            orders.peek_id().await?,
            payments.peek_id().await?,
            reservations.peek_id().await?,
        ];
        // Newest first: the largest ID of the three heads is next.
        let Some(id) = ids.into_iter().flatten().max() else {
            break;
        };
        let order = orders.pop_if(id);
        let payment = payments.pop_if(id);
        let reservation = reservations.pop_if(id);
        if order.is_some() {
            report.orders += 1;
        }
        match judge(
            order.as_ref(),
            payment.as_ref(),
            reservation.as_ref(),
            now,
            options,
        ) {
            Verdict::Fine => {}
            Verdict::InFlight => report.in_flight += u64::from(order.is_some()),
            Verdict::Wrong(problems) => {
                for problem in problems {
                    report_violation(
                        Violation {
                            kind: "order",
                            id: id.to_string(),
                            problem,
                        },
                        &mut report,
                    );
                }
            }
        }
    }
    let url = format!("{}/products", options.inventory_url.trim_end_matches('/'));
    #[derive(Deserialize)]
    struct Products {
        products: Vec<Product>,
    }
    let products: Products = get_json(&http, &url).await?;
    for p in &products.products {
        report.skus += 1;
        if let Some(problem) = judge_product(p) {
            report_violation(
                Violation {
                    kind: "sku",
                    id: p.sku.clone(),
                    problem,
                },
                &mut report,
            );
        }
    }
    Ok(report)
}

async fn get_json<T: DeserializeOwned>(http: &reqwest::Client, url: &str) -> Result<T, AuditError> {
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|source| AuditError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
    let status = resp.status();
    let body = resp
        .text()
        .await
        .map_err(|source| AuditError::Unreachable {
            url: url.to_owned(),
            source,
        })?;
    if !status.is_success() {
        return Err(AuditError::Refused {
            url: url.to_owned(),
            status: status.as_u16(),
            body,
        });
    }
    serde_json::from_str(&body).map_err(|e| AuditError::BadAnswer {
        url: url.to_owned(),
        why: e.to_string(),
    })
}

/// One service's listing, a page at a time.
struct Pager<'c, T> {
    http: &'c reqwest::Client,
    url: String,
    key: &'static str,
    limit: u16,
    after: Option<Uuid>,
    buffer: VecDeque<T>,
    done: bool,
}

trait Keyed {
    fn order_id(&self) -> Uuid;
}

impl Keyed for Order {
    fn order_id(&self) -> Uuid {
        self.order_id
    }
}

impl Keyed for Payment {
    fn order_id(&self) -> Uuid {
        self.order_id
    }
}

impl Keyed for Reservation {
    fn order_id(&self) -> Uuid {
        self.order_id
    }
}

impl<'c, T: Keyed + DeserializeOwned> Pager<'c, T> {
    fn new(
        http: &'c reqwest::Client,
        base: &str,
        key: &'static str,
        limit: u16,
        after: Option<Uuid>,
    ) -> Self {
        Self {
            http,
            url: format!("{}/{key}", base.trim_end_matches('/')),
            key,
            limit,
            after,
            buffer: VecDeque::new(),
            done: false,
        }
    }

    /// The next row's order ID, fetching a page when needed.
    async fn peek_id(&mut self) -> Result<Option<Uuid>, AuditError> {
        if self.buffer.is_empty() && !self.done {
            self.fetch().await?;
        }
        Ok(self.buffer.front().map(Keyed::order_id))
    }

    /// Takes the next row if it is about `id`.
    fn pop_if(&mut self, id: Uuid) -> Option<T> {
        if self.buffer.front().map(Keyed::order_id) == Some(id) {
            self.buffer.pop_front()
        } else {
            None
        }
    }

    async fn fetch(&mut self) -> Result<(), AuditError> {
        let mut url = format!("{}?limit={}", self.url, self.limit);
        if let Some(after) = self.after {
            url.push_str(&format!("&after={after}"));
        }
        let page: serde_json::Value = get_json(self.http, &url).await?;
        let rows = page
            .get(self.key)
            .cloned()
            .ok_or_else(|| AuditError::BadAnswer {
                url: url.clone(),
                why: format!("no {:?} list", self.key),
            })?;
        let rows: Vec<T> = serde_json::from_value(rows).map_err(|e| AuditError::BadAnswer {
            url: url.clone(),
            why: e.to_string(),
        })?;
        if let Some(last) = rows.last() {
            let last = last.order_id();
            if self.after.is_some_and(|a| last >= a) {
                return Err(AuditError::BadAnswer {
                    url,
                    why: "the listing did not move past its cursor".to_owned(),
                });
            }
            self.after = Some(last);
        }
        self.done = page.get("next").is_none_or(serde_json::Value::is_null);
        self.buffer.extend(rows);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            order_url: String::new(),
            payment_url: String::new(),
            inventory_url: String::new(),
            pending_older_than: Duration::from_secs(120),
            settle: Duration::from_secs(10),
            page_size: 500,
            token: None,
        }
    }

    fn line(sku: &str, quantity: i64) -> Line {
        Line {
            sku: sku.into(),
            quantity,
        }
    }

    fn order(status: &str, reason: Option<&str>, age_secs: i64) -> Order {
        let at = Utc::now() - chrono::Duration::seconds(age_secs);
        Order {
            order_id: Uuid::now_v7(),
            status: status.into(),
            failure_reason: reason.map(str::to_owned),
            items: vec![line("SKU-1", 2), line("SKU-2", 1)],
            total: "30.00".into(),
            created_at: at,
            updated_at: at,
        }
    }

    fn payment(o: &Order, status: &str) -> Payment {
        Payment {
            order_id: o.order_id,
            status: status.into(),
            amount: o.total.clone(),
        }
    }

    fn held(o: &Order) -> Reservation {
        Reservation {
            order_id: o.order_id,
            status: "HELD".into(),
            items: vec![line("SKU-2", 1), line("SKU-1", 1), line("SKU-1", 1)],
        }
    }

    fn wrong(v: Verdict) -> Vec<String> {
        match v {
            Verdict::Wrong(w) => w,
            other => panic!("expected violations, got {other:?}"),
        }
    }

    #[test]
    fn each_end_state_agrees_with_payment_and_stock() {
        let now = Utc::now();
        let o = &options();
        let c = order("CONFIRMED", None, 60);
        assert_eq!(
            judge(
                Some(&c),
                Some(&payment(&c, "CHARGED")),
                Some(&held(&c)),
                now,
                o
            ),
            Verdict::Fine
        );
        let d = order("FAILED", Some("payment_declined"), 60);
        assert_eq!(
            judge(Some(&d), Some(&payment(&d, "DECLINED")), None, now, o),
            Verdict::Fine
        );
        let s = order("FAILED", Some("out_of_stock"), 60);
        assert_eq!(
            judge(Some(&s), Some(&payment(&s, "REFUNDED")), None, now, o),
            Verdict::Fine
        );
    }

    #[test]
    fn disagreements_are_violations() {
        let now = Utc::now();
        let o = &options();
        let c = order("CONFIRMED", None, 60);
        assert_eq!(
            wrong(judge(Some(&c), Some(&payment(&c, "CHARGED")), None, now, o)).len(),
            1
        );
        assert_eq!(
            wrong(judge(Some(&c), None, Some(&held(&c)), now, o)).len(),
            1
        );
        let mut short = held(&c);
        short.items.pop();
        assert_eq!(
            wrong(judge(
                Some(&c),
                Some(&payment(&c, "CHARGED")),
                Some(&short),
                now,
                o
            ))
            .len(),
            1
        );
        let mut overcharged = payment(&c, "CHARGED");
        overcharged.amount = "31.00".into();
        assert_eq!(
            wrong(judge(Some(&c), Some(&overcharged), Some(&held(&c)), now, o)).len(),
            1
        );
        // Money taken, nothing reserved, order failed: no refund.
        let s = order("FAILED", Some("out_of_stock"), 60);
        assert_eq!(
            wrong(judge(Some(&s), Some(&payment(&s, "CHARGED")), None, now, o)).len(),
            1
        );
        let d = order("FAILED", Some("payment_declined"), 60);
        assert_eq!(
            wrong(judge(
                Some(&d),
                Some(&payment(&d, "DECLINED")),
                Some(&held(&d)),
                now,
                o
            ))
            .len(),
            1
        );
        // A payment or a reservation for an order nobody knows.
        assert_eq!(
            wrong(judge(
                None,
                Some(&payment(&c, "CHARGED")),
                Some(&held(&c)),
                now,
                o
            ))
            .len(),
            2
        );
    }

    #[test]
    fn cancelled_and_expired_orders_hold_nothing_and_keep_no_charge() {
        let now = Utc::now();
        let o = &options();
        for (status, reason) in [("CANCELLED", "cancelled"), ("FAILED", "deadline_exceeded")] {
            let x = order(status, Some(reason), 60);
            let mut released = held(&x);
            released.status = "RELEASED".into();
            for (paid, reservation) in [
                (Some("REFUNDED"), Some(&released)),
                (Some("REFUNDED"), None),
                (Some("DECLINED"), None),
                (None, None),
            ] {
                let p = paid.map(|st| payment(&x, st));
                assert_eq!(
                    judge(Some(&x), p.as_ref(), reservation, now, o),
                    Verdict::Fine,
                    "{status}/{reason} {paid:?}"
                );
            }
            // Still charged, or stock still held: the compensation is missing.
            assert_eq!(
                wrong(judge(Some(&x), Some(&payment(&x, "CHARGED")), None, now, o)).len(),
                1
            );
            assert_eq!(
                wrong(judge(
                    Some(&x),
                    Some(&payment(&x, "REFUNDED")),
                    Some(&held(&x)),
                    now,
                    o
                ))
                .len(),
                1
            );
        }
        // A reason that does not go with the status.
        let odd = order("CANCELLED", Some("deadline_exceeded"), 60);
        assert_eq!(wrong(judge(Some(&odd), None, None, now, o)).len(), 1);
        // A confirmed order whose reservation was released is short.
        let c = order("CONFIRMED", None, 60);
        let mut released = held(&c);
        released.status = "RELEASED".into();
        assert_eq!(
            wrong(judge(
                Some(&c),
                Some(&payment(&c, "CHARGED")),
                Some(&released),
                now,
                o
            ))
            .len(),
            1
        );
    }

    #[test]
    fn pending_is_stuck_only_past_its_age_and_recent_changes_are_in_flight() {
        let now = Utc::now();
        let o = &options();
        assert_eq!(
            judge(Some(&order("PENDING", None, 5)), None, None, now, o),
            Verdict::InFlight
        );
        assert_eq!(
            wrong(judge(
                Some(&order("PENDING", None, 121)),
                None,
                None,
                now,
                o
            ))
            .len(),
            1
        );
        // Failed a second ago: the refund may be on its way.
        let s = order("FAILED", Some("out_of_stock"), 1);
        assert_eq!(
            judge(Some(&s), Some(&payment(&s, "CHARGED")), None, now, o),
            Verdict::InFlight
        );
    }

    #[test]
    fn a_product_balances_when_its_units_are_all_accounted_for() {
        let p = |available, reserved, stocked| Product {
            sku: "SKU-1".into(),
            available,
            reserved,
            stocked,
        };
        assert_eq!(judge_product(&p(990, 10, 1000)), None);
        assert!(judge_product(&p(990, 11, 1000)).is_some());
        assert!(judge_product(&p(989, 10, 1000)).is_some());
    }
}
