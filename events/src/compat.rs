//! The compatibility gate: the schemas of every released version of the
//! events are kept in `events/schemas/v<N>.json` (snapshots of the AsyncAPI
//! document's schemas), and a change that a consumer on either side of a
//! rolling upgrade could not read fails the tests.
//!
//! The rule, compared with each snapshot (transitively, like a Schema
//! Registry's `FULL_TRANSITIVE`, which is `BACKWARD_TRANSITIVE` and its
//! forward twin):
//! - an event type of a release stays (its consumers may still meet it);
//! - a field stays of the same type and format;
//! - a required field stays, and stays required (older readers need it);
//! - a new field is optional (newer readers meet older events without it);
//! - an enumeration keeps its values and gains none (the services read
//!   enumerations strictly; a new value is a new event type's job);
//! - adding an optional field or a new event type is always fine.

use serde_json::{Map, Value};

/// Where the snapshot of release `version`'s schemas lives, relative to
/// the `events` crate.
pub fn snapshot_path(version: u32) -> String {
    format!("schemas/v{version}.json")
}

/// The schemas of this build (the AsyncAPI document's `components.schemas`).
pub fn snapshot() -> Value {
    crate::asyncapi::document()["components"]["schemas"].clone()
}

/// [`snapshot`] as committed: pretty JSON with a final newline.
pub fn snapshot_text() -> String {
    let mut text = serde_json::to_string_pretty(&snapshot()).unwrap_or_default();
    text.push('\n');
    text
}

/// How deep `$ref`s are followed (the schemas are not recursive).
const MAX_DEPTH: usize = 32;

/// What would break between the schemas of a release (`old`) and this
/// build's (`new`), one line each; empty when compatible. Both are maps of
/// schema name to schema; each message value (`…Envelope`) of `old` is
/// compared with its namesake, following `#/components/schemas/…` refs.
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<String> {
    let empty = Map::new();
    let (old_map, new_map) = (
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
    );
    let mut out = Vec::new();
    for (name, old_schema) in old_map.iter().filter(|(n, _)| n.ends_with("Envelope")) {
        let event = name.trim_end_matches("Envelope");
        match new_map.get(name) {
            None => out.push(format!("{event}: the event type was removed")),
            Some(new_schema) => Compare {
                old: old_map,
                new: new_map,
                out: &mut out,
            }
            .schema(event, old_schema, new_schema, 0),
        }
    }
    out
}

struct Compare<'a> {
    old: &'a Map<String, Value>,
    new: &'a Map<String, Value>,
    out: &'a mut Vec<String>,
}

/// The schema a `$ref` points to, or the schema itself.
fn resolve<'v>(root: &'v Map<String, Value>, schema: &'v Value) -> &'v Value {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .and_then(|name| root.get(name))
        .unwrap_or(schema)
}

/// The `type` keyword as a sorted list (`"string"` and `["string"]` alike).
fn types(schema: &Value) -> Vec<String> {
    let mut t: Vec<String> = match &schema["type"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    t.sort();
    t
}

fn required(schema: &Value) -> Vec<&str> {
    schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

impl Compare<'_> {
    fn schema(&mut self, path: &str, old: &Value, new: &Value, depth: usize) {
        if depth > MAX_DEPTH {
            self.out
                .push(format!("{path}: schemas nested too deep to compare"));
            return;
        }
        let (old, new) = (resolve(self.old, old), resolve(self.new, new));
        let (ot, nt) = (types(old), types(new));
        if ot != nt {
            self.out
                .push(format!("{path}: type changed from {ot:?} to {nt:?}"));
            return;
        }
        for keyword in ["format", "const"] {
            if old.get(keyword) != new.get(keyword) {
                self.out.push(format!(
                    "{path}: {keyword} changed from {} to {}",
                    old.get(keyword).unwrap_or(&Value::Null),
                    new.get(keyword).unwrap_or(&Value::Null)
                ));
            }
        }
        self.enumeration(path, old, new);
        for keyword in ["allOf", "oneOf", "anyOf"] {
            match (old.get(keyword), new.get(keyword)) {
                (None, None) => {}
                (Some(Value::Array(o)), Some(Value::Array(n))) if o.len() == n.len() => {
                    for (i, (o, n)) in o.iter().zip(n).enumerate() {
                        self.schema(&format!("{path}.{keyword}[{i}]"), o, n, depth + 1);
                    }
                }
                _ => self.out.push(format!("{path}: {keyword} changed")),
            }
        }
        if let (Some(o), Some(n)) = (old.get("items"), new.get("items")) {
            self.schema(&format!("{path}[]"), o, n, depth + 1);
        }
        self.properties(path, old, new, depth);
    }

    fn enumeration(&mut self, path: &str, old: &Value, new: &Value) {
        let values = |s: &Value| -> Vec<Value> {
            s.get("enum")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let (o, n) = (values(old), values(new));
        for v in o.iter().filter(|v| !n.contains(v)) {
            self.out
                .push(format!("{path}: enumeration value {v} removed"));
        }
        if !o.is_empty() {
            for v in n.iter().filter(|v| !o.contains(v)) {
                self.out.push(format!(
                    "{path}: enumeration value {v} added (older readers reject it)"
                ));
            }
        }
    }

    fn properties(&mut self, path: &str, old: &Value, new: &Value, depth: usize) {
        let empty = Map::new();
        let op = old["properties"].as_object().unwrap_or(&empty);
        let np = new["properties"].as_object().unwrap_or(&empty);
        let (or, nr) = (required(old), required(new));
        for (name, o) in op {
            let at = format!("{path}.{name}");
            match np.get(name) {
                Some(n) => self.schema(&at, o, n, depth + 1),
                None if or.contains(&name.as_str()) => self
                    .out
                    .push(format!("{at}: required field removed (or renamed)")),
                None => {}
            }
            if or.contains(&name.as_str()) && np.contains_key(name) && !nr.contains(&name.as_str())
            {
                self.out
                    .push(format!("{at}: no longer required (older readers need it)"));
            }
        }
        for name in nr.iter().filter(|n| !or.contains(n)) {
            let at = format!("{path}.{name}");
            if op.contains_key(*name) {
                self.out
                    .push(format!("{at}: became required (older events may lack it)"));
            } else {
                self.out.push(format!(
                    "{at}: new required field (older events lack it; make it optional)"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every released snapshot against this build.
    #[test]
    fn this_build_reads_and_is_read_by_every_released_version() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut checked = 0;
        for version in 1..=crate::SCHEMA_VERSION {
            let path = dir.join(snapshot_path(version));
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let old: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let breaks = breaking_changes(&old, &snapshot());
            assert!(
                breaks.is_empty(),
                "incompatible with release {version} ({}):\n{}",
                path.display(),
                breaks.join("\n")
            );
            checked += 1;
        }
        assert_eq!(checked, crate::SCHEMA_VERSION);
    }

    /// One event type, `Thing`, whose data has `id` (required), `note`
    /// (optional) and `state` (an enumeration).
    fn release() -> Value {
        json!({
            "ThingEnvelope": {
                "type": "object",
                "required": ["event_type", "data"],
                "properties": {
                    "event_type": {"type": "string", "const": "Thing"},
                    "data": {"$ref": "#/components/schemas/Thing"},
                },
            },
            "Thing": {
                "type": "object",
                "required": ["id", "state"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "note": {"type": "string"},
                    "state": {"$ref": "#/components/schemas/State"},
                    "lines": {"type": "array", "items": {"type": "integer"}},
                },
            },
            "State": {"type": "string", "enum": ["open", "closed"]},
        })
    }

    /// A change to [`release`].
    type Edit = Box<dyn FnOnce(&mut Value)>;

    fn changed(edit: impl FnOnce(&mut Value)) -> Vec<String> {
        let mut new = release();
        edit(&mut new);
        breaking_changes(&release(), &new)
    }

    #[test]
    fn additions_of_optional_fields_and_event_types_pass() {
        assert_eq!(
            breaking_changes(&release(), &release()),
            Vec::<String>::new()
        );
        assert_eq!(
            changed(|s| {
                s["Thing"]["properties"]["colour"] = json!({"type": "string"});
                s["OtherEnvelope"] = json!({"type": "object"});
                // An optional field may go: older readers do without it.
                s["Thing"]["properties"]
                    .as_object_mut()
                    .map(|p| p.remove("note"));
            }),
            Vec::<String>::new()
        );
    }

    #[test]
    fn removals_renames_type_changes_and_enumeration_changes_fail() {
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s: &mut Value| {
                    s.as_object_mut().map(|m| m.remove("ThingEnvelope"));
                }),
                "Thing: the event type was removed",
            ),
            (
                Box::new(|s: &mut Value| {
                    let id = s["Thing"]["properties"]["id"].take();
                    s["Thing"]["properties"]["thing_id"] = id;
                    s["Thing"]["properties"]
                        .as_object_mut()
                        .map(|p| p.remove("id"));
                    s["Thing"]["required"] = json!(["thing_id", "state"]);
                }),
                "Thing.data.id: required field removed (or renamed)",
            ),
            (
                Box::new(|s: &mut Value| s["Thing"]["properties"]["id"]["type"] = json!("integer")),
                "Thing.data.id: type changed from [\"string\"] to [\"integer\"]",
            ),
            (
                Box::new(|s: &mut Value| {
                    s["Thing"]["properties"]["lines"]["items"]["type"] = json!("string")
                }),
                "Thing.data.lines[]: type changed",
            ),
            (
                Box::new(|s: &mut Value| s["State"]["enum"] = json!(["open"])),
                "Thing.data.state: enumeration value \"closed\" removed",
            ),
            (
                Box::new(|s: &mut Value| s["State"]["enum"] = json!(["open", "closed", "lost"])),
                "Thing.data.state: enumeration value \"lost\" added",
            ),
            (
                Box::new(|s: &mut Value| s["Thing"]["required"] = json!(["id", "state", "note"])),
                "Thing.data.note: became required",
            ),
            (
                Box::new(|s: &mut Value| {
                    s["Thing"]["properties"]["size"] = json!({"type": "integer"});
                    s["Thing"]["required"] = json!(["id", "state", "size"]);
                }),
                "Thing.data.size: new required field",
            ),
            (
                Box::new(|s: &mut Value| s["Thing"]["required"] = json!(["state"])),
                "Thing.data.id: no longer required",
            ),
        ];
        for (edit, want) in cases {
            let breaks = changed(edit);
            assert!(
                breaks.iter().any(|b| b.starts_with(want)),
                "want {want:?}, got {breaks:?}"
            );
        }
    }
}
