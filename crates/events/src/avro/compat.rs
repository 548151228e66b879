//! Schema evolution rules: a new schema must read everything written with
//! any earlier one (backward compatibility), so old events on the topics
//! never become unreadable.

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};

/// Why a schema cannot read data written with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompatError {
    #[error("{which} schema does not parse: {detail}")]
    Parse { which: &'static str, detail: String },
    #[error("not backward compatible: {0}")]
    Incompatible(String),
    #[error(
        "only partially compatible (some data written with the old schema would fail to resolve)"
    )]
    Partial,
}

/// Ok when a reader using `reader_json` can read every datum written with
/// `writer_json`.
pub fn check_backward(writer_json: &str, reader_json: &str) -> Result<(), CompatError> {
    let writer = Schema::parse_str(writer_json).map_err(|e| CompatError::Parse {
        which: "old (writer)",
        detail: e.to_string(),
    })?;
    let reader = Schema::parse_str(reader_json).map_err(|e| CompatError::Parse {
        which: "new (reader)",
        detail: e.to_string(),
    })?;
    match SchemaCompatibility::can_read(&writer, &reader) {
        Ok(Compatibility::Full) => Ok(()),
        Ok(Compatibility::Partial) => Err(CompatError::Partial),
        Err(e) => Err(CompatError::Incompatible(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::ENVELOPE_SCHEMA_JSON;
    use serde_json::{Value, json};

    fn envelope() -> Value {
        serde_json::from_str(ENVELOPE_SCHEMA_JSON).unwrap()
    }

    fn fields(v: &mut Value) -> &mut Vec<Value> {
        v["fields"].as_array_mut().unwrap()
    }

    #[test]
    fn identical_schema_is_compatible() {
        check_backward(ENVELOPE_SCHEMA_JSON, ENVELOPE_SCHEMA_JSON).unwrap();
    }

    #[test]
    fn adding_an_optional_field_with_default_is_compatible() {
        let mut new = envelope();
        fields(&mut new)
            .push(json!({"name": "tenant", "type": ["null", "string"], "default": null}));
        check_backward(ENVELOPE_SCHEMA_JSON, &new.to_string()).unwrap();
    }

    #[test]
    fn appending_an_event_type_is_compatible() {
        let mut new = envelope();
        let payload = fields(&mut new)
            .iter_mut()
            .find(|f| f["name"] == "payload")
            .unwrap();
        payload["type"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "record", "name": "SomethingNew", "fields": [{"name": "x", "type": "long"}]}));
        check_backward(ENVELOPE_SCHEMA_JSON, &new.to_string()).unwrap();
    }

    #[test]
    fn adding_a_required_field_breaks() {
        let mut new = envelope();
        fields(&mut new).push(json!({"name": "tenant", "type": "string"}));
        assert!(check_backward(ENVELOPE_SCHEMA_JSON, &new.to_string()).is_err());
    }

    #[test]
    fn changing_a_field_type_breaks() {
        let mut new = envelope();
        let f = fields(&mut new)
            .iter_mut()
            .find(|f| f["name"] == "schema_version")
            .unwrap();
        f["type"] = json!("string");
        assert!(check_backward(ENVELOPE_SCHEMA_JSON, &new.to_string()).is_err());
    }

    #[test]
    fn removing_an_event_type_breaks() {
        let mut new = envelope();
        let payload = fields(&mut new)
            .iter_mut()
            .find(|f| f["name"] == "payload")
            .unwrap();
        payload["type"].as_array_mut().unwrap().pop();
        assert!(check_backward(ENVELOPE_SCHEMA_JSON, &new.to_string()).is_err());
    }
}
