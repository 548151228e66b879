//! The Avro spec's Parsing Canonical Form and CRC-64-AVRO (Rabin)
//! fingerprint, written from the spec rather than taken from the
//! `apache-avro` crate: the crate keeps `{"type":"string"}` for primitives
//! that carry a logical type, where the spec's [PRIMITIVES] rule (and
//! fastavro, and the Java reference) write `"string"`, so its fingerprints
//! would not match any other implementation's.

use serde_json::Value as Json;

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Why a schema could not be put into canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Avro schema: {0}")]
pub struct SchemaError(pub String);

/// The Parsing Canonical Form of a schema given as JSON text.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String, SchemaError> {
    let json: Json = serde_json::from_str(schema_json).map_err(|e| SchemaError(e.to_string()))?;
    let mut out = String::with_capacity(schema_json.len());
    write_schema(&json, None, &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO of the bytes (the spec's `fingerprint64`).
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    let mut fp = CRC64_EMPTY;
    for &b in bytes {
        fp = (fp >> 8) ^ CRC64_TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

/// Fingerprint of a schema given as JSON text: CRC-64-AVRO of its Parsing
/// Canonical Form. On the wire it is written little-endian.
pub fn fingerprint(schema_json: &str) -> Result<u64, SchemaError> {
    Ok(crc64_avro(parsing_canonical_form(schema_json)?.as_bytes()))
}

const CRC64_EMPTY: u64 = 0xc15d_213a_a4d7_a795;

static CRC64_TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut j = 0;
        while j < 8 {
            fp = (fp >> 1) ^ (CRC64_EMPTY & (0u64.wrapping_sub(fp & 1)));
            j += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
};

fn fullname(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_owned(),
    }
}

fn namespace_of(fullname: &str) -> Option<&str> {
    fullname.rsplit_once('.').map(|(ns, _)| ns)
}

fn push_str_literal(s: &str, out: &mut String) {
    // serde_json escapes only what JSON requires and leaves UTF-8 as is,
    // which is the [STRINGS] rule.
    out.push_str(&serde_json::to_string(s).expect("strings serialise"));
}

fn write_schema(json: &Json, ns: Option<&str>, out: &mut String) -> Result<(), SchemaError> {
    match json {
        Json::String(s) if PRIMITIVES.contains(&s.as_str()) => push_str_literal(s, out),
        Json::String(name) => push_str_literal(&fullname(name, ns), out),
        Json::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_schema(b, ns, out)?;
            }
            out.push(']');
        }
        Json::Object(obj) => {
            let ty = obj
                .get("type")
                .ok_or_else(|| SchemaError("object without \"type\"".into()))?;
            let ty_str = match ty {
                Json::String(s) => s.as_str(),
                // {"type": {...}} or {"type": [...]}: the attribute holds a schema.
                other => return write_schema(other, ns, out),
            };
            match ty_str {
                p if PRIMITIVES.contains(&p) => push_str_literal(p, out),
                "record" | "error" | "enum" | "fixed" => {
                    let name = obj
                        .get("name")
                        .and_then(Json::as_str)
                        .ok_or_else(|| SchemaError(format!("{ty_str} without a name")))?;
                    let own_ns = obj.get("namespace").and_then(Json::as_str).or(ns);
                    let full = fullname(name, own_ns);
                    out.push_str("{\"name\":");
                    push_str_literal(&full, out);
                    out.push_str(",\"type\":");
                    push_str_literal(ty_str, out);
                    match ty_str {
                        "enum" => {
                            let symbols =
                                obj.get("symbols").and_then(Json::as_array).ok_or_else(|| {
                                    SchemaError(format!("enum {full} without symbols"))
                                })?;
                            out.push_str(",\"symbols\":[");
                            for (i, s) in symbols.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let s = s.as_str().ok_or_else(|| {
                                    SchemaError(format!("enum {full}: symbol not a string"))
                                })?;
                                push_str_literal(s, out);
                            }
                            out.push(']');
                        }
                        "fixed" => {
                            let size = obj.get("size").and_then(Json::as_u64).ok_or_else(|| {
                                SchemaError(format!("fixed {full} without an integer size"))
                            })?;
                            out.push_str(&format!(",\"size\":{size}"));
                        }
                        _ => {
                            let fields =
                                obj.get("fields").and_then(Json::as_array).ok_or_else(|| {
                                    SchemaError(format!("record {full} without fields"))
                                })?;
                            let inner_ns = namespace_of(&full);
                            out.push_str(",\"fields\":[");
                            for (i, f) in fields.iter().enumerate() {
                                if i > 0 {
                                    out.push(',');
                                }
                                let fname =
                                    f.get("name").and_then(Json::as_str).ok_or_else(|| {
                                        SchemaError(format!("record {full}: field without a name"))
                                    })?;
                                let ftype = f.get("type").ok_or_else(|| {
                                    SchemaError(format!("field {full}.{fname} without a type"))
                                })?;
                                out.push_str("{\"name\":");
                                push_str_literal(fname, out);
                                out.push_str(",\"type\":");
                                write_schema(ftype, inner_ns, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                    }
                    out.push('}');
                }
                "array" => {
                    let items = obj
                        .get("items")
                        .ok_or_else(|| SchemaError("array without items".into()))?;
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write_schema(items, ns, out)?;
                    out.push('}');
                }
                "map" => {
                    let values = obj
                        .get("values")
                        .ok_or_else(|| SchemaError("map without values".into()))?;
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write_schema(values, ns, out)?;
                    out.push('}');
                }
                // A reference to a named type spelled as {"type": "Name"}.
                name => push_str_literal(&fullname(name, ns), out),
            }
        }
        other => return Err(SchemaError(format!("not a schema: {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_schema_matches_the_spec() {
        // The spec's value for "null"; its single-object header is
        // c3 01 8a 8f 25 cc e7 24 dd 63.
        assert_eq!(fingerprint("\"null\"").unwrap(), 0x63dd_24e7_cc25_8f8a);
        assert_eq!(
            fingerprint("\"null\"").unwrap().to_le_bytes(),
            [0x8a, 0x8f, 0x25, 0xcc, 0xe7, 0x24, 0xdd, 0x63]
        );
    }

    #[test]
    fn logical_types_reduce_to_their_primitive() {
        assert_eq!(
            parsing_canonical_form(r#"{"type":"string","logicalType":"uuid"}"#).unwrap(),
            r#""string""#
        );
        assert_eq!(
            parsing_canonical_form(r#"{"type":"long","logicalType":"timestamp-micros"}"#).unwrap(),
            r#""long""#
        );
    }

    #[test]
    fn strips_orders_and_qualifies_names() {
        let schema = r#"{
            "doc": "x", "fields": [
                {"type": {"type": "enum", "symbols": ["A", "B"], "name": "E"}, "name": "e", "default": "A"},
                {"name": "again", "type": "E"},
                {"name": "other", "type": {"type": "fixed", "name": "x.F", "size": 4}}
            ],
            "namespace": "ns", "type": "record", "name": "R"
        }"#;
        assert_eq!(
            parsing_canonical_form(schema).unwrap(),
            r#"{"name":"ns.R","type":"record","fields":[{"name":"e","type":{"name":"ns.E","type":"enum","symbols":["A","B"]}},{"name":"again","type":"ns.E"},{"name":"other","type":{"name":"x.F","type":"fixed","size":4}}]}"#
        );
    }
}
