//! Paginated listings, the same in every service: `limit` (1 to 500,
//! default 50) and an `after` cursor (the last order ID of the previous
//! page), newest order first. Order IDs are UUIDv7, so their order is the
//! order they were created in, and every service lists by the same key:
//! a tool can walk the three services' listings side by side.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use crate::http::ApiError;

/// Most rows one page may hold.
pub const MAX_LIMIT: i64 = 500;
pub const DEFAULT_LIMIT: i64 = 50;

/// The query string of a listing, every parameter once. Parameters a
/// listing does not know are refused, so a typo is not silently ignored.
#[derive(Debug, Default)]
pub struct ListQuery {
    params: BTreeMap<String, String>,
}

impl<S: Send + Sync> FromRequestParts<S> for ListQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(pairs): Query<Vec<(String, String)>> = Query::from_request_parts(parts, state)
            .await
            .map_err(|e: QueryRejection| ApiError::bad_request(e.body_text()))?;
        let mut params = BTreeMap::new();
        for (k, v) in pairs {
            if params.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad_request(format!(
                    "query parameter {k} given twice"
                )));
            }
        }
        Ok(Self { params })
    }
}

/// Where a page starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    /// Only order IDs below this one (the previous page's last).
    pub after: Option<Uuid>,
}

impl ListQuery {
    /// Checks that only `known` parameters (besides `limit` and `after`)
    /// were given, and reads the page.
    pub fn page(&self, known: &[&str]) -> Result<Page, ApiError> {
        if let Some(unknown) = self
            .params
            .keys()
            .find(|k| !matches!(k.as_str(), "limit" | "after") && !known.contains(&k.as_str()))
        {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {unknown}"
            )));
        }
        let limit = match self.get("limit") {
            None => DEFAULT_LIMIT,
            Some(raw) => match raw.parse::<i64>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "limit must be a whole number from 1 to {MAX_LIMIT}, got {raw:?}"
                    )))
                }
            },
        };
        let after = self.uuid("after")?;
        Ok(Page { limit, after })
    }

    /// A parameter's raw value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// A UUID parameter.
    pub fn uuid(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        self.get(name)
            .map(|raw| {
                raw.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "{name} must be an order ID (a UUID), got {raw:?}"
                    ))
                })
            })
            .transpose()
    }

    /// An RFC 3339 time parameter.
    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.get(name)
            .map(|raw| {
                DateTime::parse_from_rfc3339(raw)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "{name} must be an RFC 3339 time such as 2026-12-01T10:00:00Z, got {raw:?}"
                        ))
                    })
            })
            .transpose()
    }
}

/// The paging parameters of every listing, for the API description.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Rows per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500, example = 50)]
    pub limit: Option<i64>,
    /// The previous page's `next`: only orders older than this one.
    pub after: Option<Uuid>,
}

/// The `next` of a listing's answer (`{"<rows>": [...], "next": …}`): the
/// last row's order ID when the page is full (there may be more), `None`
/// (`null`) at the end.
pub fn next_cursor(page: Page, rows: usize, last: Option<Uuid>) -> Option<String> {
    (rows as i64 == page.limit)
        .then(|| last.map(|id| id.to_string()))
        .flatten()
}

/// A listing's page as the services answer it: each row shown as `T`
/// (`show`), in the rows' order, and the cursor of the next page from the
/// last row's order ID ([`next_cursor`]).
pub fn one_page<'a, R, T>(
    page: Page,
    rows: &'a [R],
    order_id: impl Fn(&'a R) -> Uuid,
    show: impl Fn(&'a R) -> T,
) -> (Vec<T>, Option<String>) {
    let next = next_cursor(page, rows.len(), rows.last().map(order_id));
    (rows.iter().map(show).collect(), next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> ListQuery {
        ListQuery {
            params: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn a_full_page_points_at_its_last_row_and_a_short_one_ends() {
        let ids: Vec<Uuid> = (1..=3u128).map(Uuid::from_u128).collect();
        let page = |limit| Page { limit, after: None };
        let (shown, next) = one_page(page(3), &ids, |id| *id, |id| id.as_u128());
        assert_eq!(shown, [1, 2, 3]);
        assert_eq!(next, Some(ids[2].to_string()));
        let (shown, next) = one_page(page(4), &ids, |id| *id, |id| id.as_u128());
        assert_eq!(shown, [1, 2, 3]);
        assert_eq!(next, None);
    }

    #[test]
    fn limit_and_cursor_are_checked() {
        assert_eq!(
            query(&[]).page(&[]).ok(),
            Some(Page {
                limit: DEFAULT_LIMIT,
                after: None
            })
        );
        let id = Uuid::now_v7();
        let page = query(&[("limit", "500"), ("after", &id.to_string())])
            .page(&[])
            .ok();
        assert_eq!(
            page,
            Some(Page {
                limit: 500,
                after: Some(id)
            })
        );
        for bad in ["0", "501", "-1", "ten", ""] {
            assert!(query(&[("limit", bad)]).page(&[]).is_err(), "{bad}");
        }
        assert!(query(&[("after", "nope")]).page(&[]).is_err());
        assert!(query(&[("statu", "PENDING")]).page(&["status"]).is_err());
        assert!(query(&[("status", "PENDING")]).page(&["status"]).is_ok());
    }

    #[test]
    fn next_is_the_last_id_of_a_full_page_only() {
        let page = Page {
            limit: 2,
            after: None,
        };
        let a = Uuid::now_v7();
        assert_eq!(next_cursor(page, 2, Some(a)), Some(a.to_string()));
        assert_eq!(next_cursor(page, 1, Some(a)), None);
        assert_eq!(next_cursor(page, 0, None), None);
    }
}
