//! payment-service as a saga participant: read and lock what a batch
//! touches, decide in arrival order with the rules of [`crate::domain`],
//! write once.

use events::{EventType, Money};
use saga_runtime::{Handler, Step};
use sqlx::PgConnection;

use crate::store;
use crate::Settings;

/// The simulated payment gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub settings: Settings,
}

impl Gateway {
    /// Why a charge of `amount` is declined, if it is.
    pub fn decline_reason(&self, amount: Money) -> Option<String> {
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
    fn accepts(&self, kind: EventType) -> bool {
        kind.consumed_by(events::Service::Payment)
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        steps: &mut [Step<'_>],
    ) -> Result<(), sqlx::Error> {
        let ids = Step::order_ids(steps);
        let mut book = store::lock(conn, &ids).await?;
        let decline = |amount| self.decline_reason(amount);
        for step in steps.iter_mut() {
            let span = step.span().clone();
            let _entered = span.enter();
            match book.react(step.envelope(), &decline) {
                Ok(Some(event)) => step.emit(event),
                Ok(None) => {}
                Err(why) => step.refuse(why),
            }
        }
        store::save(conn, &book).await
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
