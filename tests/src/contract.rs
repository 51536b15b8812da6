//! The services' API descriptions as a contract: every answer the tests get
//! through the harness is checked against the service's own
//! `/openapi.json` (its status must be documented for the route and
//! method, and its JSON body must validate against the documented schema).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// The OpenAPI 3.1 schema published by the OpenAPI Initiative
/// (<https://spec.openapis.org/oas/3.1/schema/2022-10-07>).
pub const OPENAPI_3_1_SCHEMA: &str = include_str!("../schemas/openapi-3.1.schema.json");

/// One service's document, with its compiled response schemas.
pub struct Contract {
    doc: Value,
    validators: Mutex<HashMap<(String, String, String), std::sync::Arc<jsonschema::Validator>>>,
    /// `METHOD template` of each operation an answer was checked for.
    seen: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Contract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contract").finish_non_exhaustive()
    }
}

impl Contract {
    pub fn new(doc: Value) -> Self {
        Self {
            doc,
            validators: Mutex::new(HashMap::new()),
            seen: Mutex::new(BTreeSet::new()),
        }
    }

    /// Fetches `base/openapi.json`.
    pub async fn fetch(http: &reqwest::Client, base: &str) -> anyhow::Result<Self> {
        let resp = http
            .get(format!("{base}/openapi.json"))
            .send()
            .await
            .context("GET /openapi.json")?;
        if !resp.status().is_success() {
            bail!("GET /openapi.json answered {}", resp.status());
        }
        Ok(Self::new(
            resp.json().await.context("/openapi.json is not JSON")?,
        ))
    }

    pub fn document(&self) -> &Value {
        &self.doc
    }

    /// Every documented operation, as `METHOD template`.
    pub fn operations(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(paths) = self.doc["paths"].as_object() {
            for (template, item) in paths {
                for method in ["get", "put", "post", "delete", "patch"] {
                    if item.get(method).is_some() {
                        out.insert(format!("{} {template}", method.to_uppercase()));
                    }
                }
            }
        }
        out
    }

    /// The operations answers were checked for so far.
    pub fn seen(&self) -> BTreeSet<String> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The documented path template that `path` (without its query) is an
    /// instance of: literal segments must match, `{x}` takes any one.
    pub fn template(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        let paths = self.doc["paths"].as_object()?;
        let mut best: Option<(usize, &String)> = None;
        for template in paths.keys() {
            let t: Vec<&str> = template.split('/').collect();
            if t.len() != segments.len() {
                continue;
            }
            let mut literal = 0;
            let matches = t.iter().zip(&segments).all(|(t, s)| {
                if t.starts_with('{') && t.ends_with('}') {
                    !s.is_empty()
                } else {
                    literal += 1;
                    t == s
                }
            });
            if matches && best.is_none_or(|(n, _)| literal > n) {
                best = Some((literal, template));
            }
        }
        best.map(|(_, t)| t.clone())
    }

    /// Checks one answer: `method path` answered `status` with `body`
    /// (`Value::Null` when it had none or it was not JSON).
    pub fn check(&self, method: &str, path: &str, status: u16, body: &Value) -> anyhow::Result<()> {
        let method = method.to_lowercase();
        let Some(template) = self.template(path) else {
            // An undocumented route may only get the JSON 404/405 fallback.
            if matches!(status, 404 | 405) {
                return self.validate_against(
                    ("fallback".into(), method, status.to_string()),
                    &json!({"$ref": "#/components/schemas/ErrorBody"}),
                    body,
                );
            }
            bail!(
                "{} {path} answered {status} but the route is not documented",
                method.to_uppercase()
            );
        };
        let op = &self.doc["paths"][&template][&method];
        if op.is_null() {
            if status == 405 {
                return Ok(());
            }
            bail!(
                "{} {template} is not documented (answered {status})",
                method.to_uppercase()
            );
        }
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(format!("{} {template}", method.to_uppercase()));
        let code = status.to_string();
        let mut response = op["responses"]
            .get(&code)
            .or_else(|| op["responses"].get("default"))
            .with_context(|| {
                format!(
                    "{} {template} answered {status}, which its document does not list (it lists {})",
                    method.to_uppercase(),
                    op["responses"]
                        .as_object()
                        .map(|r| r.keys().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                )
            })?;
        if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
            response = self.resolve(reference)?;
        }
        let Some(schema) = response["content"]
            .as_object()
            .and_then(|c| c.get("application/json"))
            .map(|c| &c["schema"])
        else {
            return Ok(());
        };
        self.validate_against((template.clone(), method.clone(), code), schema, body)
            .with_context(|| format!("{} {path} → {status}", method.to_uppercase()))
    }

    fn resolve(&self, reference: &str) -> anyhow::Result<&Value> {
        let pointer = reference
            .strip_prefix('#')
            .with_context(|| format!("external $ref {reference}"))?;
        self.doc
            .pointer(pointer)
            .with_context(|| format!("dangling $ref {reference}"))
    }

    fn validate_against(
        &self,
        key: (String, String, String),
        schema: &Value,
        body: &Value,
    ) -> anyhow::Result<()> {
        let validator = {
            let mut cache = self
                .validators
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match cache.get(&key) {
                Some(v) => v.clone(),
                None => {
                    // The response schema, with the document's components
                    // beside it so that `#/components/…` references resolve.
                    let root = json!({
                        "$schema": "https://json-schema.org/draft/2020-12/schema",
                        "components": self.doc["components"],
                        "allOf": [schema],
                    });
                    let v = std::sync::Arc::new(
                        jsonschema::draft202012::options()
                            .should_validate_formats(true)
                            .build(&root)
                            .map_err(|e| {
                                anyhow::anyhow!("the documented schema does not compile: {e}")
                            })?,
                    );
                    cache.insert(key, v.clone());
                    v
                }
            }
        };
        if let Some(errors) = errors(&validator, body) {
            bail!("the body does not match its documented schema: {errors}\nbody: {body}");
        }
        Ok(())
    }
}

/// What `validator` finds wrong with `instance`, each with where, or `None`.
pub fn errors(validator: &jsonschema::Validator, instance: &Value) -> Option<String> {
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    (!errors.is_empty()).then(|| errors.join("; "))
}

/// Checks that `doc` is a valid OpenAPI 3.1 document: it validates
/// against the OpenAPI Initiative's schema, each of its component schemas
/// is a valid JSON Schema (2020-12), every `$ref` resolves, and operation
/// IDs are unique.
pub fn validate_document(doc: &Value) -> anyhow::Result<()> {
    let schema: Value = serde_json::from_str(OPENAPI_3_1_SCHEMA)?;
    let validator = jsonschema::draft202012::new(&schema)
        .map_err(|e| anyhow::anyhow!("the OpenAPI 3.1 schema does not compile: {e}"))?;
    if let Some(errors) = errors(&validator, doc) {
        bail!("not a valid OpenAPI 3.1 document: {errors}");
    }
    if let Some(schemas) = doc["components"]["schemas"].as_object() {
        for (name, s) in schemas {
            jsonschema::meta::validate(s).map_err(|e| {
                anyhow::anyhow!("components.schemas.{name} is not a valid JSON Schema: {e}")
            })?;
        }
    }
    let mut refs = Vec::new();
    collect_refs(doc, &mut refs);
    for r in refs {
        let pointer = r
            .strip_prefix('#')
            .with_context(|| format!("external $ref {r}"))?;
        if doc.pointer(pointer).is_none() {
            bail!("dangling $ref {r}");
        }
    }
    let mut ids = BTreeSet::new();
    if let Some(paths) = doc["paths"].as_object() {
        for item in paths.values() {
            for op in item.as_object().into_iter().flat_map(|o| o.values()) {
                if let Some(id) = op["operationId"].as_str() {
                    if !ids.insert(id.to_owned()) {
                        bail!("operationId {id} is used twice");
                    }
                }
            }
        }
    }
    Ok(())
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Contract {
        Contract::new(json!({
            "openapi": "3.1.0",
            "paths": {
                "/orders/{id}": {"get": {"responses": {
                    "200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
                    "404": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                }}},
                "/orders/{id}/cancel": {"post": {"responses": {"202": {"description": "ok"}}}}
            },
            "components": {"schemas": {
                "Thing": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
                "ErrorBody": {"type": "object", "required": ["error"]}
            }}
        }))
    }

    #[test]
    fn answers_are_checked_against_their_documented_schema() {
        let c = doc();
        assert_eq!(c.template("/orders/abc").as_deref(), Some("/orders/{id}"));
        assert_eq!(
            c.template("/orders/abc/cancel?x=1").as_deref(),
            Some("/orders/{id}/cancel")
        );
        assert!(c.check("GET", "/orders/1", 200, &json!({"n": 1})).is_ok());
        assert!(c
            .check("GET", "/orders/1", 200, &json!({"n": "1"}))
            .is_err());
        assert!(c
            .check("GET", "/orders/1", 404, &json!({"error": {}}))
            .is_ok());
        assert!(
            c.check("GET", "/orders/1", 500, &json!({"error": {}}))
                .is_err(),
            "undocumented status"
        );
        assert!(c.check("GET", "/nope", 404, &json!({"error": {}})).is_ok());
        assert!(c.check("GET", "/nope", 200, &json!({})).is_err());
        assert_eq!(c.seen().len(), 1);
    }

    #[test]
    fn the_document_validator_refuses_broken_documents() {
        let ok = json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {}});
        assert!(validate_document(&ok).is_ok());
        let no_info = json!({"openapi": "3.1.0", "paths": {}});
        assert!(validate_document(&no_info).is_err());
        let dangling = json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "paths": {"/x": {"get": {"responses": {"200": {"description": "d",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Nope"}}}}}}}}});
        assert!(validate_document(&dangling).is_err());
        let bad_schema = json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {},
            "components": {"schemas": {"X": {"type": "no-such-type"}}}});
        assert!(validate_document(&bad_schema).is_err());
    }
}
