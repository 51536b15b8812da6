//! Reading the environment: each variable once, a bad or missing value
//! one [`ConfigError`] line that names the variable and says why. Every
//! concern reads its own settings with these; [`crate::config`] gathers
//! them.

use std::ops::RangeInclusive;
use std::str::FromStr;

/// A configuration problem; `Display` is the one line shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is not set: {hint}")]
    Missing { var: String, hint: String },
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: String,
        value: String,
        reason: String,
    },
}

/// Reads a variable; unset and empty count as absent.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A required variable.
pub fn required(name: &str, hint: &str) -> Result<String, ConfigError> {
    var(name).ok_or_else(|| ConfigError::Missing {
        var: name.to_owned(),
        hint: hint.to_owned(),
    })
}

/// A variable parsed with `FromStr`, or `default` when unset.
pub fn parsed<T>(name: &str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e: T::Err| ConfigError::Invalid {
                var: name.to_owned(),
                value: raw.clone(),
                reason: e.to_string(),
            }),
    }
}

/// A yes/no switch: `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`);
/// unset is `false`.
pub fn flag(name: &str) -> Result<bool, ConfigError> {
    match var(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                var: name.to_owned(),
                value: v,
                reason: "expected true or false".to_owned(),
            }),
        },
    }
}

/// A variable checked by `check` after parsing.
pub fn parsed_with<T, F>(name: &str, default: T, check: F) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
    F: FnOnce(&T) -> Result<(), String>,
{
    let value = parsed(name, default)?;
    check(&value).map_err(|reason| ConfigError::Invalid {
        var: name.to_owned(),
        value: var(name).unwrap_or_default(),
        reason,
    })?;
    Ok(value)
}

/// Like [`parsed`], and the value must lie in `range` ("must be between
/// {start} and {end}" otherwise).
pub fn parsed_in<T>(name: &str, default: T, range: RangeInclusive<T>) -> Result<T, ConfigError>
where
    T: FromStr + PartialOrd + std::fmt::Display,
    T::Err: std::fmt::Display,
{
    parsed_with(name, default, |v| within(&range, v))
}

fn within<T: PartialOrd + std::fmt::Display>(
    range: &RangeInclusive<T>,
    value: &T,
) -> Result<(), String> {
    if range.contains(value) {
        Ok(())
    } else {
        Err(format!(
            "must be between {} and {}",
            range.start(),
            range.end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::within;

    #[test]
    fn a_value_outside_its_range_is_refused_with_the_bounds() {
        assert_eq!(within(&(1..=10), &1), Ok(()));
        assert_eq!(within(&(1..=10), &10), Ok(()));
        assert_eq!(
            within(&(1..=10), &11),
            Err("must be between 1 and 10".to_owned())
        );
        assert_eq!(
            within(&(0.0..=1.0), &f64::NAN),
            Err("must be between 0 and 1".to_owned())
        );
    }
}
