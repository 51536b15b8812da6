//! The API description, generated from the handlers: OpenAPI 3.1 at
//! `GET /openapi.json` and Swagger UI at `GET /docs` (its assets are built
//! into the binary; nothing is fetched at build or run time); and the
//! event contract, AsyncAPI 3.0 at `GET /asyncapi.json`.
//!
//! Each service documents its routes with `#[utoipa::path]` and registers
//! them through `utoipa_axum::routes!`, so a route cannot be served without
//! being described. [`finish`] adds what every service shares: the bearer
//! security scheme, the 401 answer, the `traceparent` header.

use axum::Router;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder,
};
use utoipa::PartialSchema;
use utoipa_swagger_ui::SwaggerUi;

use crate::http::ErrorBody;

/// Name of the security scheme in the document.
pub const BEARER: &str = "bearer";
/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/openapi.json";
/// Where Swagger UI is served.
pub const DOCS_PATH: &str = "/docs";

/// What a service's document says about the service.
#[derive(Debug, Clone, Copy)]
pub struct ApiInfo {
    pub version: &'static str,
    pub description: &'static str,
}

/// The calling crate's [`ApiInfo`] (its `Cargo.toml` version and
/// description).
#[macro_export]
macro_rules! api_info {
    () => {
        $crate::api::ApiInfo {
            version: env!("CARGO_PKG_VERSION"),
            description: env!("CARGO_PKG_DESCRIPTION"),
        }
    };
}

/// Completes a service's document: title, version and description, the
/// shared security scheme and answers, the 503 of every operation that
/// needs the database (all but the probes), and, with authentication on
/// (`auth`), the bearer requirement and the 401 on every operation that
/// does not declare its own security (the probes declare none needed).
pub fn finish(api: &mut OpenApi, service: &str, about: ApiInfo, auth: bool) {
    api.info.title = service.to_owned();
    api.info.version = about.version.to_owned();
    api.info.license = None;
    api.info.contact = None;
    let access = if auth {
        "Authentication is **on**: every route but the probes needs \
         `Authorization: Bearer <JWT>`. A customer's token (its `sub` is the customer) \
         sees only its own orders; a token whose `scope` holds `saga:admin` is an operator's."
    } else {
        "Authentication is **off** on this instance: every route is open \
         (set `AUTH_JWKS_URL` or `AUTH_JWKS_FILE` to require bearer tokens)."
    };
    api.info.description = Some(format!(
        "{}\n\nEvery error answer is `{{\"error\": {{\"code\": …, \"message\": …}}}}`. \
         `/health`, `/ready` and `/metrics` are for the platform and always open.\n\n{access}",
        about.description
    ));
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "`Authorization: Bearer <JWT>`, signed (RS256, ES256, …) by a key of the \
                     service's JWK set, with its `iss` and `aud`. Needed only when the service \
                     runs with `AUTH_JWKS_URL` or `AUTH_JWKS_FILE`; the token's `sub` is the \
                     customer, and `scope` holding `saga:admin` makes an operator.",
                ))
                .build(),
        ),
    );
    components
        .schemas
        .insert("ErrorBody".to_owned(), ErrorBody::schema());
    components.responses.insert(
        "Unauthorized".to_owned(),
        RefOr::T(
            error_response(
                "The bearer token is missing, malformed, expired, wrongly signed, or for \
                 another issuer or audience",
            )
            .header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(utoipa::openapi::schema::Type::String)
                            .examples([crate::http::INVALID_TOKEN_CHALLENGE]),
                    ))
                    .description(Some("`Bearer error=\"invalid_token\"`"))
                    .build(),
            )
            .build(),
        ),
    );
    components.responses.insert(
        "Unavailable".to_owned(),
        RefOr::T(error_response("The database is unavailable; retry").build()),
    );
    let traceparent = ParameterBuilder::new()
        .name("traceparent")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "W3C trace context: the request's span continues the caller's trace",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String)
                .examples(["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]),
        ))
        .build();
    for item in api.paths.paths.values_mut() {
        for op in operations(item) {
            op.parameters
                .get_or_insert_with(Vec::new)
                .push(RefOr::T(traceparent.clone()));
            // The probes declare their own security (none needed) and
            // answers; every other operation reads or writes the database.
            if op.security.is_some() {
                continue;
            }
            op.responses
                .responses
                .entry("503".to_owned())
                .or_insert_with(|| RefOr::Ref(Ref::new("#/components/responses/Unavailable")));
            if auth {
                op.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                op.responses.responses.insert(
                    "401".to_owned(),
                    RefOr::Ref(Ref::new("#/components/responses/Unauthorized")),
                );
            }
        }
    }
}

/// A response whose body is the JSON error body.
fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build(),
    )
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// Where the event contract (AsyncAPI 3.0, [`events::asyncapi`]) is served.
pub const EVENTS_DOCUMENT_PATH: &str = "/asyncapi.json";

/// `GET /openapi.json`, Swagger UI at `GET /docs`, and the event contract
/// at `GET /asyncapi.json` (the whole saga's: what this service sends and
/// receives is read beside what the others do).
pub fn routes(api: OpenApi) -> Router {
    // Serialised once (70 kB), not per request.
    static EVENTS: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(events::asyncapi::document_text);
    Router::new()
        .merge(SwaggerUi::new(DOCS_PATH).url(DOCUMENT_PATH, api))
        .route(
            EVENTS_DOCUMENT_PATH,
            axum::routing::get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    EVENTS.as_str(),
                )
            }),
        )
}
