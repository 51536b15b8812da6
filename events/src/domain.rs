//! Domain newtypes. Each is parsed once where data enters the system (HTTP
//! body, Kafka message, database row) and is valid from then on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Most line items one order may carry.
pub const MAX_ITEMS_PER_ORDER: usize = 100;
/// Most units of one SKU one line may ask for.
pub const MAX_QUANTITY: u32 = 1_000;
/// Highest unit price accepted: 1,000,000.00 in minor units.
pub const MAX_UNIT_PRICE_MINOR: i64 = 100_000_000;

const MAX_SKU_LEN: usize = 64;
const MAX_CUSTOMER_ID_LEN: usize = 128;
const MAX_CORRELATION_ID_LEN: usize = 128;

/// Why a value was rejected. The message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is too long ({len} characters, at most {max})")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} may only contain {allowed}")]
    BadCharacters {
        field: &'static str,
        allowed: &'static str,
    },
    #[error("{field} must be a UUID")]
    NotUuid { field: &'static str },
    #[error("quantity must be between 1 and {MAX_QUANTITY}, got {0}")]
    QuantityOutOfRange(i64),
    #[error("{0}")]
    BadAmount(String),
    #[error("unknown {field} {value:?}")]
    Unknown { field: &'static str, value: String },
}

/// Identity of an order, and the Kafka message key of every event about it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid, example = "019a8f5e-7c1d-7e3a-9b2f-4d5e6f708192")]
pub struct OrderId(Uuid);

impl OrderId {
    /// A new, time-ordered ID (UUIDv7 keeps the primary-key index append-only).
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for OrderId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for OrderId {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(Self)
            .map_err(|_| DomainError::NotUuid { field: "order_id" })
    }
}

/// Checks a free-form identifier: non-empty, bounded, printable ASCII subset.
fn check_token(
    field: &'static str,
    value: &str,
    max: usize,
    allowed_extra: &[char],
    allowed: &'static str,
) -> Result<(), DomainError> {
    if value.is_empty() {
        return Err(DomainError::Empty { field });
    }
    let len = value.chars().count();
    if len > max {
        return Err(DomainError::TooLong { field, len, max });
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || allowed_extra.contains(&c))
    {
        return Err(DomainError::BadCharacters { field, allowed });
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident, $field:literal, $max:expr, $extra:expr, $allowed:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, DomainError> {
                let value = value.into();
                check_token($field, &value, $max, $extra, $allowed)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = DomainError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("1 to ", stringify!($max), " characters: ", $allowed, ".")))
                    .min_length(Some(1))
                    .max_length(Some($max))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

string_newtype!(
    /// Stock-keeping unit, e.g. `SKU-1`.
    Sku,
    "sku",
    MAX_SKU_LEN,
    &['-', '_', '.'],
    "letters, digits, '-', '_' and '.'"
);

string_newtype!(
    /// The customer placing the order, e.g. `c-42`.
    CustomerId,
    "customer_id",
    MAX_CUSTOMER_ID_LEN,
    &['-', '_', '.', '@', ':'],
    "letters, digits, '-', '_', '.', '@' and ':'"
);

string_newtype!(
    /// Follows one order through every service, log line and span; the tag to
    /// search for in Jaeger.
    CorrelationId,
    "correlation_id",
    MAX_CORRELATION_ID_LEN,
    &['-', '_', '.', ':'],
    "letters, digits, '-', '_', '.' and ':'"
);

impl CorrelationId {
    /// A fresh random correlation ID.
    pub fn generate() -> Self {
        Self(Uuid::new_v4().to_string())
    }
}

/// Units of one SKU on one order line: 1 ..= [`MAX_QUANTITY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = u32, minimum = 1, maximum = 1000, example = 2)]
pub struct Quantity(u32);

impl Quantity {
    pub fn new(value: i64) -> Result<Self, DomainError> {
        if (1..=i64::from(MAX_QUANTITY)).contains(&value) {
            // The range check above makes the conversion lossless.
            Ok(Self(value as u32))
        } else {
            Err(DomainError::QuantityOutOfRange(value))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        Self::new(v).map_err(serde::de::Error::custom)
    }
}

/// An amount of money in minor units (cents). Single currency.
///
/// On the wire it is a decimal string with exactly two decimals (`"29.99"`),
/// so no consumer is tempted to read it into a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Money(i64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn from_minor(minor: i64) -> Self {
        Self(minor)
    }

    pub fn minor(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }

    pub fn checked_mul(self, factor: u32) -> Option<Money> {
        self.0.checked_mul(i64::from(factor)).map(Money)
    }

    /// Parses a decimal string such as `29.99`, `5`, `0.5` or `-3.10`.
    /// At most two decimals; no exponent, no thousands separators.
    pub fn parse_decimal(s: &str) -> Result<Self, DomainError> {
        let bad = |why: &str| DomainError::BadAmount(format!("{s:?} is not a valid amount: {why}"));
        let trimmed = s.trim();
        let (negative, digits) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let (whole, frac) = match digits.split_once('.') {
            Some((w, f)) => (w, f),
            None => (digits, ""),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "expected digits, optionally followed by '.' and up to 2 decimals",
            ));
        }
        if digits.contains('.') && frac.is_empty() {
            return Err(bad("expected digits after '.'"));
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("expected digits after '.'"));
        }
        if frac.len() > 2 {
            return Err(bad("at most 2 decimal places (amounts are in whole cents)"));
        }
        let whole: i64 = whole.parse().map_err(|_| bad("too large"))?;
        let frac_minor: i64 = match frac.len() {
            0 => 0,
            1 => i64::from(frac.as_bytes()[0] - b'0') * 10,
            _ => frac.parse().map_err(|_| bad("bad decimals"))?,
        };
        let minor = whole
            .checked_mul(100)
            .and_then(|m| m.checked_add(frac_minor))
            .ok_or_else(|| bad("too large"))?;
        Ok(Self(if negative { -minor } else { minor }))
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

impl FromStr for Money {
    type Err = DomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_decimal(s)
    }
}

impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "An amount as a decimal string with at most two decimals (answers always \
                 show two), never a JSON number.",
            ))
            .pattern(Some(r"^-?[0-9]+(\.[0-9]{1,2})?$"))
            .examples(["29.99"])
            .into()
    }
}

impl utoipa::ToSchema for Money {}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Only strings: a JSON number would invite float rounding upstream.
        let s = String::deserialize(d)?;
        Money::parse_decimal(&s).map_err(serde::de::Error::custom)
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LineItem {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price: Money,
}

impl LineItem {
    /// `unit_price × quantity`, or `None` on overflow.
    pub fn line_total(&self) -> Option<Money> {
        self.unit_price.checked_mul(self.quantity.get())
    }
}

crate::named_enum! {
    /// Why an order ended FAILED or CANCELLED (its `failure_reason`).
    pub enum FailureReason: "failure_reason" {
        PaymentDeclined => "payment_declined",
        OutOfStock => "out_of_stock",
        /// Still PENDING when its deadline passed (the order is FAILED).
        DeadlineExceeded => "deadline_exceeded",
        /// The customer cancelled it (the order is CANCELLED).
        Cancelled => "cancelled",
    }
}

crate::named_enum! {
    /// Why an `OrderCancelled` was emitted.
    pub enum CancelReason: "cancel reason" {
        /// `POST /orders/{id}/cancel`.
        Customer => "customer",
        /// The order was still PENDING when `ORDER_DEADLINE_SECS` passed.
        Deadline => "deadline",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_parses_decimal_strings_into_minor_units() {
        let cases = [
            ("29.99", 2999),
            ("5", 500),
            ("0.5", 50),
            ("0.05", 5),
            ("1000.00", 100_000),
            ("-3.10", -310),
            (" 7.25 ", 725),
        ];
        for (text, minor) in cases {
            assert_eq!(
                Money::parse_decimal(text),
                Ok(Money::from_minor(minor)),
                "{text}"
            );
        }
    }

    #[test]
    fn money_rejects_sub_cent_and_garbage() {
        for text in [
            "1.999",
            "",
            ".5",
            "5.",
            "1e3",
            "1,000.00",
            "abc",
            "--1",
            "+1",
            "1.2.3",
            "99999999999999999999",
        ] {
            assert!(
                Money::parse_decimal(text).is_err(),
                "{text:?} should be rejected"
            );
        }
    }

    #[test]
    fn money_displays_with_two_decimals() {
        assert_eq!(Money::from_minor(2999).to_string(), "29.99");
        assert_eq!(Money::from_minor(5).to_string(), "0.05");
        assert_eq!(Money::from_minor(-310).to_string(), "-3.10");
        assert_eq!(Money::ZERO.to_string(), "0.00");
    }

    #[test]
    fn money_round_trips_as_a_json_string_and_refuses_numbers() {
        let json = serde_json::to_string(&Money::from_minor(5998)).unwrap();
        assert_eq!(json, "\"59.98\"");
        assert_eq!(
            serde_json::from_str::<Money>(&json).unwrap(),
            Money::from_minor(5998)
        );
        assert!(serde_json::from_str::<Money>("59.98").is_err());
    }

    #[test]
    fn money_arithmetic_reports_overflow() {
        assert_eq!(
            Money::from_minor(i64::MAX).checked_add(Money::from_minor(1)),
            None
        );
        assert_eq!(Money::from_minor(i64::MAX / 2).checked_mul(3), None);
        assert_eq!(
            Money::from_minor(250).checked_mul(4),
            Some(Money::from_minor(1000))
        );
    }

    #[test]
    fn quantity_bounds() {
        assert!(Quantity::new(0).is_err());
        assert!(Quantity::new(-1).is_err());
        assert!(Quantity::new(i64::from(MAX_QUANTITY) + 1).is_err());
        assert_eq!(Quantity::new(1).map(Quantity::get), Ok(1));
        assert_eq!(Quantity::new(1000).map(Quantity::get), Ok(1000));
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert!(serde_json::from_str::<Quantity>("2.5").is_err());
    }

    #[test]
    fn sku_and_ids_validate() {
        assert!(Sku::parse("SKU-1").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("has space").is_err());
        assert!(Sku::parse("x".repeat(65)).is_err());
        assert!(CustomerId::parse("alice@example.com").is_ok());
        assert!(CustomerId::parse("").is_err());
        assert!(CorrelationId::parse("req-1:abc").is_ok());
        assert!(CorrelationId::parse("a\nb").is_err());
        assert!(CorrelationId::generate().as_str().len() == 36);
        assert!(serde_json::from_str::<Sku>("\"bad sku\"").is_err());
    }

    #[test]
    fn order_id_parses_and_displays() {
        let id = OrderId::new();
        assert_eq!(id.to_string().parse::<OrderId>(), Ok(id));
        assert!("not-a-uuid".parse::<OrderId>().is_err());
    }

    #[test]
    fn line_total_multiplies() {
        let item = LineItem {
            sku: Sku::parse("A").unwrap(),
            quantity: Quantity::new(3).unwrap(),
            unit_price: Money::parse_decimal("19.99").unwrap(),
        };
        assert_eq!(item.line_total(), Some(Money::from_minor(5997)));
    }

    #[test]
    fn failure_reason_names() {
        assert_eq!(FailureReason::PaymentDeclined.as_str(), "payment_declined");
        assert_eq!(
            "out_of_stock".parse::<FailureReason>(),
            Ok(FailureReason::OutOfStock)
        );
        for &r in FailureReason::ALL {
            assert_eq!(r.as_str().parse::<FailureReason>(), Ok(r));
        }
        assert!("CANCELLED".parse::<FailureReason>().is_err());
        assert_eq!(
            serde_json::to_string(&FailureReason::OutOfStock).unwrap(),
            "\"out_of_stock\""
        );
    }
}
