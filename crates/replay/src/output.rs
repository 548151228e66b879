//! The replay loop: read, range-filter, decode, event-filter, write.

use crate::bounds::rfc3339_ms;
use crate::select::{SelectError, Selection};
use crate::{Format, ReaderError, ReplayArgs, resolve_topic};
use events::avro::{self, ContainerWriter, DecodeError, EncodeError};
use events::{Envelope, TopicKind, json};
use runtime::progress::Progress;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use streaming::dlq;
use streaming::reader::{Record, TopicReader};

/// Records fetched per batch.
const BATCH: usize = 2000;
/// Undecodable messages warned about one by one; beyond that only counted.
const WARN_MAX: u64 = 20;

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error("cannot open topic {topic}")]
    OpenTopic {
        topic: String,
        #[source]
        source: Box<ReaderError>,
    },
    /// Reading a topic failed after it was opened.
    // (A ReaderError is large: boxed, so every Result here stays small.)
    #[error(transparent)]
    Read(Box<ReaderError>),
    /// `--strict`, and a message does not decode.
    #[error("undecodable message at {at} ({}): {error}", error.kind())]
    Undecodable { at: String, error: DecodeError },
    /// An event could not be re-encoded with the current schema (Avro
    /// output).
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Csv(#[from] csv::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Writing the output (or the Avro container around it).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "refusing to write a binary Avro file to a terminal: use --out FILE or redirect stdout"
    )]
    AvroToTerminal,
    #[error("removing the stale {}", path.display())]
    RemoveStale {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {}", path.display())]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot rename to {}", path.display())]
    Rename {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing to stdout")]
    Stdout(#[source] std::io::Error),
}

impl From<ReaderError> for ReplayError {
    fn from(e: ReaderError) -> ReplayError {
        ReplayError::Read(Box::new(e))
    }
}

/// What a replay read, kept and skipped.
#[derive(Debug, Default)]
pub struct Summary {
    pub read: u64,
    pub out_of_range: u64,
    pub undecodable: u64,
    pub undecodable_by_kind: BTreeMap<&'static str, u64>,
    pub filtered: u64,
    pub written: u64,
}

impl Summary {
    pub fn print(&self) {
        let mut line = format!(
            "replay: {} events written; {} messages read, {} outside the range, {} filtered out, {} undecodable skipped",
            self.written, self.read, self.out_of_range, self.filtered, self.undecodable
        );
        if !self.undecodable_by_kind.is_empty() {
            let kinds: Vec<String> = self
                .undecodable_by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            line.push_str(&format!(" ({})", kinds.join(", ")));
        }
        eprintln!("{line}");
    }
}

/// The fixed CSV columns.
pub const CSV_COLUMNS: [&str; 16] = [
    "topic",
    "partition",
    "offset",
    "timestamp",
    "event_id",
    "event_type",
    "payment_id",
    "occurred_at",
    "correlation_id",
    "causation_id",
    "producer",
    "schema_version",
    "order_id",
    "amount_minor",
    "currency",
    "data",
];

enum Sink<'a> {
    Jsonl(&'a mut (dyn Write + Send)),
    Csv(Box<csv::Writer<&'a mut (dyn Write + Send)>>),
    Avro(ContainerWriter<&'a mut (dyn Write + Send)>),
}

impl Sink<'_> {
    fn write(&mut self, rec: &Record, env: &Envelope) -> Result<(), ReplayError> {
        match self {
            Sink::Jsonl(w) => {
                let mut v = json::envelope(env);
                if let Value::Object(m) = &mut v {
                    add_position(m, rec);
                }
                serde_json::to_writer(&mut **w, &v)?;
                w.write_all(b"\n")?;
            }
            Sink::Csv(w) => {
                let payload = json::payload(&env.event);
                let (order, amount, currency) = order_and_amount(&payload);
                w.write_record([
                    rec.topic.clone(),
                    rec.partition.to_string(),
                    rec.offset.to_string(),
                    rec.timestamp_ms.map(rfc3339_ms).unwrap_or_default(),
                    env.event_id.to_string(),
                    env.event_type().as_str().to_owned(),
                    env.payment_id.map(|p| p.to_string()).unwrap_or_default(),
                    env.occurred_at.to_string(),
                    env.correlation_id.to_string(),
                    env.causation_id.map(|c| c.to_string()).unwrap_or_default(),
                    csv_text(&env.producer),
                    env.schema_version.to_string(),
                    order,
                    amount,
                    currency,
                    payload.to_string(),
                ])?;
            }
            Sink::Avro(w) => {
                // The container declares the current schema: an event
                // written with an older version is re-encoded.
                w.append(&avro::current_body(&rec.payload, env)?)?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ReplayError> {
        match self {
            Sink::Jsonl(w) => w.flush()?,
            Sink::Csv(mut w) => w.flush()?,
            Sink::Avro(w) => {
                w.finish()?;
            }
        }
        Ok(())
    }
}

/// topic, partition, offset, record timestamp; and for dead letters what
/// the `dlq.*` headers say.
fn add_position(m: &mut Map<String, Value>, rec: &Record) {
    m.insert("topic".into(), rec.topic.clone().into());
    m.insert("partition".into(), rec.partition.into());
    m.insert("offset".into(), rec.offset.into());
    m.insert(
        "timestamp".into(),
        rec.timestamp_ms
            .map(rfc3339_ms)
            .map_or(Value::Null, Value::from),
    );
    m.insert(
        "timestamp_ms".into(),
        rec.timestamp_ms.map_or(Value::Null, Value::from),
    );
    let dlq_headers: Map<String, Value> = rec
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("dlq."))
        .map(|(k, _)| {
            (
                k.trim_start_matches("dlq.").to_owned(),
                rec.header(k).map_or(Value::Null, Value::from),
            )
        })
        .collect();
    if !dlq_headers.is_empty() {
        m.insert("dlq".into(), Value::Object(dlq_headers));
    }
}

/// The order id and amount of an event about one order (for a payment
/// request: when it has exactly one order).
fn order_and_amount(payload: &Value) -> (String, String, String) {
    let one = match payload.get("orders").and_then(Value::as_array) {
        Some(orders) if orders.len() == 1 => &orders[0],
        Some(_) => return Default::default(),
        None => payload,
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let amount = one.get("amount").or_else(|| one.get("adjustment"));
    (
        text(one.get("order_id")),
        text(amount.and_then(|a| a.get("amount_minor"))),
        text(amount.and_then(|a| a.get("currency"))),
    )
}

pub async fn run(
    kafka: &streaming::KafkaConfig,
    args: &ReplayArgs,
    out: &mut (dyn Write + Send),
) -> Result<Summary, ReplayError> {
    let mut sel = Selection::parse(args)?;
    let mut seen = std::collections::HashSet::new();
    let mut topics: Vec<String> = args
        .topics
        .iter()
        .map(|t| resolve_topic(kafka, t))
        .filter(|t| seen.insert(t.clone()))
        .collect();
    if sel.follows_orders() {
        // PaymentRequested first: the seller filter learns orders from them.
        let topology = kafka.topology();
        topics.sort_by_key(|t| {
            !matches!(
                topology.kind_of(t),
                Some(TopicKind::Payments | TopicKind::Inbound)
            )
        });
    }
    // Every reader is opened (its end offsets fixed) before reading starts,
    // so the replay is one consistent cut of all its topics; the topics are
    // then read one after the other.
    let mut readers = Vec::with_capacity(topics.len());
    for t in &topics {
        readers.push(
            TopicReader::open(kafka, std::slice::from_ref(t), sel.start, sel.end, None)
                .await
                .map_err(|source| ReplayError::OpenTopic {
                    topic: t.clone(),
                    source: Box::new(source),
                })?,
        );
    }
    let progress = Progress::new("replay", readers.iter().map(TopicReader::total).sum());
    let mut sink = match args.format {
        Format::Jsonl => Sink::Jsonl(out),
        Format::Csv => {
            let mut w = csv::WriterBuilder::new()
                .terminator(csv::Terminator::CRLF)
                .from_writer(out);
            w.write_record(CSV_COLUMNS)?;
            Sink::Csv(Box::new(w))
        }
        Format::Avro => Sink::Avro(ContainerWriter::new(out, avro::ENVELOPE_SCHEMA_JSON)?),
    };
    let mut s = Summary::default();
    for mut reader in readers {
        while let Some(batch) = reader.next_batch(BATCH).await? {
            let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            s.read += n;
            for rec in &batch {
                if !sel.in_time_range(rec.timestamp_ms) {
                    s.out_of_range += 1;
                    continue;
                }
                let env = match avro::decode(&rec.payload) {
                    Ok(env) => env,
                    Err(e) => {
                        let at = format!("{}/{}@{}", rec.topic, rec.partition, rec.offset);
                        if args.strict {
                            return Err(ReplayError::Undecodable { at, error: e });
                        }
                        s.undecodable += 1;
                        *s.undecodable_by_kind.entry(e.kind()).or_default() += 1;
                        if s.undecodable <= WARN_MAX {
                            let dlq_kind = rec
                                .header(dlq::H_ERROR_KIND)
                                .map(|k| format!(", a dead letter of kind {k}"))
                                .unwrap_or_default();
                            eprintln!(
                                "warning: skipping undecodable message at {at}{dlq_kind} ({}): {e}",
                                e.kind()
                            );
                        } else if s.undecodable == WARN_MAX + 1 {
                            eprintln!(
                                "warning: more undecodable messages; only counted from here on (see the summary)"
                            );
                        }
                        continue;
                    }
                };
                sel.learn(&env);
                if !sel.matches(&env) {
                    s.filtered += 1;
                    continue;
                }
                sink.write(rec, &env)?;
                s.written += 1;
            }
            progress.inc(n);
        }
    }
    sink.finish()?;
    progress.finish();
    Ok(s)
}

/// A free-text CSV cell that a spreadsheet will not run as a formula: the
/// `producer` field comes from whoever produced to the inbound topic
/// (review L3). A leading `=`, `+`, `-`, `@`, tab or CR gets a `'` in front
/// (OWASP's CSV-injection rule); other text is unchanged.
fn csv_text(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn csv_text_cannot_start_a_formula() {
        assert_eq!(super::csv_text("order-service"), "order-service");
        for evil in ["=HYPERLINK(\"x\")", "+1", "-1+1", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(super::csv_text(evil), format!("'{evil}"), "{evil}");
        }
    }

    #[test]
    fn csv_order_and_amount_columns() {
        let one = json!({"order_id": "o1", "amount": {"amount_minor": 1050, "currency": "EUR"}});
        assert_eq!(
            order_and_amount(&one),
            ("o1".into(), "1050".into(), "EUR".into())
        );
        let req = json!({"orders": [one.clone()]});
        assert_eq!(order_and_amount(&req), order_and_amount(&one));
        let two = json!({"orders": [one.clone(), one]});
        assert_eq!(order_and_amount(&two), Default::default());
        assert_eq!(
            order_and_amount(&json!({"rule_set": "x"})),
            Default::default()
        );
    }
}
