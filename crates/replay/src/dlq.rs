//! `paystream dlq list|show|redrive`.

use crate::bounds::rfc3339_ms;
use crate::store::{self, Origin, Redrive};
use crate::{DlqFilter, ListArgs, RedriveArgs, ShowArgs};
use anyhow::Context as _;
use events::{TopicKind, avro, json};
use rdkafka::message::{Header, OwnedHeaders};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::ExitCode;
use streaming::producer::ProduceError;
use streaming::progress::Progress;
use streaming::reader::{End, Record, Start, TopicReader};
use streaming::{EventProducer, KafkaConfig, dlq as h};

/// Header naming the dead-letter position a redriven message came from
/// (`<dlq topic>:<partition>:<offset>`). Not a `dlq.*` header, so it stays
/// on the message if it is dead-lettered again.
pub const H_REDRIVEN_FROM: &str = "paystream.redriven_from";

/// What one dead letter says about itself.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterInfo {
    /// `PARTITION:OFFSET` in the dead-letter topic.
    pub position: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<String>,
    pub error_kind: Option<String>,
    pub reason: Option<String>,
    pub original_topic: Option<String>,
    pub original_partition: Option<i32>,
    pub original_offset: Option<i64>,
    pub consumer_group: Option<String>,
    pub failed_at: Option<String>,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub payment_id: Option<String>,
    /// Why the payload does not decode, when it does not.
    pub decode_error: Option<String>,
    /// A stub (`dlq.truncated`): the payload is only a prefix of the
    /// original, which stays at its origin; never redriven.
    pub truncated: bool,
}

impl DeadLetterInfo {
    pub fn of(rec: &Record) -> DeadLetterInfo {
        let s = |name: &str| rec.header(name).map(str::to_owned);
        let truncated = rec.header(h::H_TRUNCATED) == Some("true");
        let decoded = avro::decode(&rec.payload);
        let (event_id, event_type, payment_id, decode_error) = match &decoded {
            _ if truncated => (
                None,
                None,
                None,
                Some(format!(
                    "stub: the first {} of {} bytes (sha256 {})",
                    rec.payload.len(),
                    rec.header(h::H_ORIGINAL_SIZE).unwrap_or("?"),
                    rec.header(h::H_ORIGINAL_SHA256).unwrap_or("?")
                )),
            ),
            Ok(env) => (
                Some(env.event_id.to_string()),
                Some(env.event_type().as_str().to_owned()),
                env.payment_id.map(|p| p.to_string()),
                None,
            ),
            Err(e) => (None, None, None, Some(format!("{}: {e}", e.kind()))),
        };
        DeadLetterInfo {
            position: format!("{}:{}", rec.partition, rec.offset),
            partition: rec.partition,
            offset: rec.offset,
            timestamp: rec.timestamp_ms.map(rfc3339_ms),
            error_kind: s(h::H_ERROR_KIND),
            reason: s(h::H_REASON),
            original_topic: s(h::H_ORIGINAL_TOPIC),
            original_partition: rec
                .header(h::H_ORIGINAL_PARTITION)
                .and_then(|p| p.parse().ok()),
            original_offset: rec
                .header(h::H_ORIGINAL_OFFSET)
                .and_then(|p| p.parse().ok()),
            consumer_group: s(h::H_CONSUMER_GROUP),
            failed_at: s(h::H_FAILED_AT),
            event_id,
            event_type,
            payment_id,
            decode_error,
            truncated,
        }
    }

    fn kind(&self) -> &str {
        self.error_kind.as_deref().unwrap_or("-")
    }

    fn origin(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        format!(
            "{}/{}@{}",
            self.original_topic.as_deref().unwrap_or("?"),
            opt(self.original_partition.map(|p| p.to_string())),
            opt(self.original_offset.map(|o| o.to_string()))
        )
    }

    fn event(&self) -> String {
        match (&self.event_type, &self.event_id) {
            (Some(t), Some(id)) => format!("{t} {id}"),
            _ => "(undecodable)".into(),
        }
    }

    fn matches(&self, f: &DlqFilter) -> bool {
        f.group
            .as_ref()
            .is_none_or(|g| self.consumer_group.as_ref() == Some(g))
            && f.kind
                .as_ref()
                .is_none_or(|k| self.error_kind.as_ref() == Some(k))
    }
}

/// `PARTITION:OFFSET`.
pub fn parse_position(s: &str) -> anyhow::Result<(i32, i64)> {
    let bad = || anyhow::anyhow!("{s:?}: expected PARTITION:OFFSET, e.g. 3:1042");
    let (p, o) = s.trim().split_once(':').ok_or_else(bad)?;
    let p: i32 = p.parse().map_err(|_| bad())?;
    let o: i64 = o.parse().map_err(|_| bad())?;
    anyhow::ensure!(
        p >= 0 && o >= 0,
        "{s:?}: partition and offset cannot be negative"
    );
    Ok((p, o))
}

fn dlq_topic(kafka: &KafkaConfig) -> String {
    kafka.topology().name(TopicKind::DeadLetter)
}

/// Every message of the dead-letter topic, oldest first per partition.
async fn read_all(kafka: &KafkaConfig) -> anyhow::Result<Vec<Record>> {
    let topic = dlq_topic(kafka);
    let mut reader = TopicReader::open(
        kafka,
        std::slice::from_ref(&topic),
        Start::Beginning,
        End::Latest,
        None,
    )
    .await
    .with_context(|| format!("cannot open the dead-letter topic {topic}"))?;
    let progress = Progress::new("dead letters", reader.total());
    let mut out = Vec::new();
    while let Some(batch) = reader.next_batch(2000).await? {
        progress.inc(u64::try_from(batch.len()).unwrap_or(0));
        out.extend(batch);
    }
    progress.finish();
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

pub async fn list(
    kafka: &KafkaConfig,
    args: &ListArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let infos: Vec<DeadLetterInfo> = read_all(kafka)
        .await?
        .iter()
        .map(DeadLetterInfo::of)
        .filter(|i| i.matches(&args.filter))
        .collect();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for i in &infos {
        *counts.entry(i.kind().to_owned()).or_default() += 1;
    }
    if args.json {
        let v = json!({"topic": dlq_topic(kafka), "dead_letters": infos, "counts": counts, "total": infos.len()});
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "POSITION\tKIND\tGROUP\tORIGIN\tFAILED_AT\tEVENT\tREASON"
    )?;
    for i in &infos {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            i.position,
            i.kind(),
            i.consumer_group.as_deref().unwrap_or("-"),
            i.origin(),
            i.failed_at.as_deref().unwrap_or("-"),
            i.event(),
            printable(
                &i.reason
                    .as_deref()
                    .unwrap_or("-")
                    .replace(['\n', '\t'], " ")
            )
        )?;
    }
    writeln!(out)?;
    writeln!(out, "dead letters by kind:")?;
    for (k, n) in &counts {
        writeln!(out, "  {k}\t{n}")?;
    }
    writeln!(out, "  total\t{}", infos.len())?;
    Ok(ExitCode::SUCCESS)
}

/// Reads the one message at `pos` of the dead-letter topic.
async fn read_one(kafka: &KafkaConfig, pos: (i32, i64)) -> anyhow::Result<Record> {
    let topic = dlq_topic(kafka);
    let marks = streaming::reader::watermarks(kafka, &topic)?;
    let Some(&(_, lo, hi)) = marks.iter().find(|(p, _, _)| *p == pos.0) else {
        anyhow::bail!(
            "{topic} has no partition {} (partitions 0..{})",
            pos.0,
            marks.len()
        );
    };
    anyhow::ensure!(
        (lo..hi).contains(&pos.1),
        "no dead letter at {}:{}: partition {} of {topic} holds offsets {lo}..{hi} (end exclusive)",
        pos.0,
        pos.1,
        pos.0
    );
    let mut starts = BTreeMap::new();
    for (p, _, hi) in &marks {
        // Other partitions start at their end: nothing to read there.
        starts.insert((topic.clone(), *p), if *p == pos.0 { pos.1 } else { *hi });
    }
    let mut reader = TopicReader::open(
        kafka,
        std::slice::from_ref(&topic),
        Start::Beginning,
        End::Offset(pos.1 + 1),
        Some(&starts),
    )
    .await?;
    while let Some(batch) = reader.next_batch(16).await? {
        if let Some(r) = batch
            .into_iter()
            .find(|r| r.partition == pos.0 && r.offset == pos.1)
        {
            return Ok(r);
        }
    }
    anyhow::bail!("no dead letter at {}:{} (compacted away?)", pos.0, pos.1)
}

/// Classic hex dump: offset, 16 bytes in hex, printable ASCII.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if (0x20..0x7f).contains(&b) {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect();
        s.push_str(&format!(
            "{:08x}  {:<47}  |{ascii}|\n",
            i * 16,
            hex.join(" ")
        ));
    }
    s
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header_json(k: &str, v: Option<&[u8]>) -> Value {
    match v {
        None => json!({"key": k, "value": null}),
        Some(b) => match std::str::from_utf8(b) {
            Ok(t) => json!({"key": k, "value": t}),
            Err(_) => json!({"key": k, "value": null, "hex": to_hex(b)}),
        },
    }
}

pub async fn show(
    kafka: &KafkaConfig,
    args: &ShowArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    let pos = parse_position(&args.position)?;
    let rec = read_one(kafka, pos).await?;
    let info = DeadLetterInfo::of(&rec);
    let decoded = avro::decode(&rec.payload);
    if args.json {
        let v = json!({
            "topic": rec.topic,
            "position": info.position,
            "partition": rec.partition,
            "offset": rec.offset,
            "timestamp": info.timestamp,
            "key": rec.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "key_hex": rec.key.as_deref().map(to_hex),
            "headers": rec.headers.iter().map(|(k, v)| header_json(k, v.as_deref())).collect::<Vec<_>>(),
            "dead_letter": info,
            "event": decoded.as_ref().ok().map(json::envelope),
            "payload_hex": if decoded.is_err() { Some(to_hex(&rec.payload)) } else { None },
        });
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "dead letter {} {}", rec.topic, info.position)?;
    writeln!(
        out,
        "timestamp: {}",
        info.timestamp.as_deref().unwrap_or("-")
    )?;
    match rec.key.as_deref() {
        None => writeln!(out, "key: (none)")?,
        Some(k) => match std::str::from_utf8(k) {
            Ok(t) => writeln!(out, "key: {}", printable(t))?,
            Err(_) => writeln!(out, "key (hex): {}", to_hex(k))?,
        },
    }
    writeln!(out, "headers:")?;
    for (k, v) in &rec.headers {
        match v.as_deref() {
            None => writeln!(out, "  {}: (null)", printable(k))?,
            Some(b) => match std::str::from_utf8(b) {
                Ok(t) => writeln!(out, "  {}: {}", printable(k), printable(t))?,
                Err(_) => writeln!(out, "  {} (hex): {}", printable(k), to_hex(b))?,
            },
        }
    }
    match decoded {
        Ok(env) => {
            writeln!(out, "event:")?;
            serde_json::to_writer_pretty(&mut *out, &json::envelope(&env))?;
            writeln!(out)?;
        }
        Err(e) => {
            writeln!(
                out,
                "payload: {} bytes, not decodable ({}: {e})",
                rec.payload.len(),
                e.kind()
            )?;
            out.write_all(hex_dump(&rec.payload).as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a redrive will do (or did) with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// Never redriven: produce.
    Produce,
    /// Redriven before (produced, acknowledged; or recorded as redriven
    /// together with another dead letter of the same message).
    Done(Redrive),
    /// Claimed by an earlier redrive that never recorded the outcome: it
    /// may or may not have been produced.
    InDoubt(Redrive),
    /// A record exists for this position but describes another message
    /// (the dead-letter topic was recreated?).
    Mismatch(Redrive),
    /// No record of its own, but another dead letter of the same original
    /// message (topic, partition, offset) has one: redriven or in doubt.
    SameAsRecorded { position: String, record: Redrive },
    /// A redriven copy (header `paystream.redriven_from`) of a dead letter
    /// already redriven: the copy failed again.
    FailedAgain { from: String, record: Redrive },
    /// The same original message as the dead letter at `primary`, which
    /// this run produces: not produced again.
    SameMessage { primary: String },
    /// A redriven copy of the dead letter at `from`, which this run
    /// produces again: not produced.
    CopyOfThisRun { from: String },
    /// Named on the command line, but --group/--kind do not match it.
    Filtered,
    /// Cannot be redriven.
    Invalid(String),
}

fn opt_num(v: Option<i64>) -> String {
    v.map_or("?".into(), |n| n.to_string())
}

fn position_str(pos: (i64, i64)) -> String {
    format!("{}:{}", pos.0, pos.1)
}

fn record_summary(r: &Redrive) -> String {
    if r.produced() {
        format!(
            "redriven to partition {} offset {} at {}",
            opt_num(r.produced_partition),
            opt_num(r.produced_offset),
            r.produced_at.map_or("?".into(), |t| rfc3339_ms(t / 1000)),
        )
    } else {
        format!(
            "in doubt since {} (claimed, no outcome recorded)",
            rfc3339_ms(r.claimed_at / 1000)
        )
    }
}

impl Plan {
    fn label(&self, force: bool) -> String {
        let again = if force {
            "; --force: produce again"
        } else {
            "; skipped (--force to produce again)"
        };
        match self {
            Plan::Produce => "produce".into(),
            Plan::Done(r) => match r.same_as {
                Some(p) => format!(
                    "already redriven together with {} (same message), to partition {} offset {} at {}{again}",
                    position_str(p),
                    opt_num(r.produced_partition),
                    opt_num(r.produced_offset),
                    r.produced_at.map_or("?".into(), |t| rfc3339_ms(t / 1000)),
                ),
                None => format!(
                    "already redriven {}x, last to partition {} offset {} at {}{again}",
                    r.redrives,
                    opt_num(r.produced_partition),
                    opt_num(r.produced_offset),
                    r.produced_at.map_or("?".into(), |t| rfc3339_ms(t / 1000)),
                ),
            },
            Plan::InDoubt(r) => format!(
                "in doubt: a redrive claimed it at {} but recorded no outcome (it may have been produced; consumers deduplicate by event id){again}",
                rfc3339_ms(r.claimed_at / 1000)
            ),
            Plan::Mismatch(r) => format!(
                "a redrive record for this position names another message (from {}/{}@{}): was the dead-letter topic recreated?{again}",
                r.original_topic,
                opt_num(r.original_partition),
                opt_num(r.original_offset),
            ),
            Plan::SameAsRecorded { position, record } => format!(
                "same message as {position}, {}{again}",
                record_summary(record)
            ),
            Plan::FailedAgain { from, record } => format!(
                "a redriven copy of {from} ({}) that failed again{again}",
                record_summary(record)
            ),
            Plan::SameMessage { primary } => format!(
                "same message as {primary} (another consumer group's dead letter): produced once, with {primary}; skipped"
            ),
            Plan::CopyOfThisRun { from } => {
                format!("a redriven copy of {from}, which this run produces again; skipped")
            }
            Plan::Filtered => "skipped by filter: does not match --group/--kind".into(),
            Plan::Invalid(why) => format!("cannot redrive: {why}"),
        }
    }

    fn status(&self) -> &'static str {
        match self {
            Plan::Produce => "produce",
            Plan::Done(_) => "already_redriven",
            Plan::InDoubt(_) => "in_doubt",
            Plan::Mismatch(_) => "record_mismatch",
            Plan::SameAsRecorded { .. } => "same_message_recorded",
            Plan::FailedAgain { .. } => "failed_again",
            Plan::SameMessage { .. } => "same_message",
            Plan::CopyOfThisRun { .. } => "copy_of_this_run",
            Plan::Filtered => "filtered_out",
            Plan::Invalid(_) => "invalid",
        }
    }

    fn will_produce(&self, force: bool) -> bool {
        match self {
            Plan::Produce => true,
            Plan::Done(_)
            | Plan::InDoubt(_)
            | Plan::Mismatch(_)
            | Plan::SameAsRecorded { .. }
            | Plan::FailedAgain { .. } => force,
            Plan::SameMessage { .. }
            | Plan::CopyOfThisRun { .. }
            | Plan::Filtered
            | Plan::Invalid(_) => false,
        }
    }
}

fn origin(info: &DeadLetterInfo) -> Option<Origin> {
    Some(Origin {
        topic: info.original_topic.clone()?,
        partition: info.original_partition.map(i64::from),
        offset: info.original_offset,
        event_id: info.event_id.clone(),
    })
}

/// The original message a dead letter stands for: (topic, partition,
/// offset), when its headers say all three.
type OriginKey = (String, i64, i64);

fn origin_key(o: &Origin) -> Option<OriginKey> {
    Some((o.topic.clone(), o.partition?, o.offset?))
}

/// The dead-letter position a redriven copy came from, when its
/// `paystream.redriven_from` header names this dead-letter topic.
fn redriven_from(rec: &Record, dlq_topic: &str) -> Option<(i64, i64)> {
    let v = rec.header(H_REDRIVEN_FROM)?;
    let mut it = v.rsplitn(3, ':');
    let offset: i64 = it.next()?.parse().ok()?;
    let partition: i64 = it.next()?.parse().ok()?;
    (it.next()? == dlq_topic).then_some((partition, offset))
}

/// The plan from the records alone (before this run's deduplication).
fn plan_one(
    dlq_topic: &str,
    info: &DeadLetterInfo,
    from: Option<(i64, i64)>,
    records: &HashMap<(i64, i64), Redrive>,
    by_origin: &HashMap<OriginKey, Vec<(i64, i64)>>,
) -> Plan {
    if info.truncated {
        return Plan::Invalid(
            "a stub (dlq.truncated) holds only a prefix of the original message, which is at its original position"
                .into(),
        );
    }
    let Some(o) = origin(info) else {
        return Plan::Invalid(format!("no {} header", h::H_ORIGINAL_TOPIC));
    };
    if o.topic.is_empty() || o.topic == dlq_topic {
        return Plan::Invalid(format!(
            "original topic {:?} is not a topic to redrive to",
            o.topic
        ));
    }
    // Only back to a topic this deployment's consumers read (its headers
    // come from whoever produced the dead letter; review L9).
    let prefix = dlq_topic
        .strip_suffix(events::TopicKind::DeadLetter.suffix())
        .unwrap_or("");
    let allowed = [
        events::TopicKind::Inbound,
        events::TopicKind::Payments,
        events::TopicKind::Reconciliation,
    ]
    .map(|k| format!("{prefix}{}", k.suffix()));
    if !allowed.contains(&o.topic) {
        return Plan::Invalid(format!(
            "original topic {:?} is not one of this deployment's consumed topics ({})",
            o.topic,
            allowed.join(", ")
        ));
    }
    let pos = (i64::from(info.partition), info.offset);
    if let Some(r) = records.get(&pos) {
        return if r.original_topic != o.topic
            || r.original_partition != o.partition
            || r.original_offset != o.offset
        {
            Plan::Mismatch(r.clone())
        } else if r.produced() {
            Plan::Done(r.clone())
        } else {
            Plan::InDoubt(r.clone())
        };
    }
    // Another dead letter of the same message (another group's) with a
    // record: a produced one first, then the lowest position.
    if let Some(key) = origin_key(&o)
        && let Some((p, r)) = by_origin
            .get(&key)
            .into_iter()
            .flatten()
            .filter(|p| **p != pos)
            .filter_map(|p| records.get(p).map(|r| (*p, r)))
            .min_by_key(|(p, r)| (!r.produced(), *p))
    {
        return Plan::SameAsRecorded {
            position: position_str(p),
            record: r.clone(),
        };
    }
    if let Some(f) = from
        && let Some(r) = records.get(&f)
    {
        return Plan::FailedAgain {
            from: position_str(f),
            record: r.clone(),
        };
    }
    Plan::Produce
}

/// One selected dead letter and what to do with it.
#[derive(Debug)]
struct Planned<'a> {
    rec: &'a Record,
    info: DeadLetterInfo,
    pos: (i64, i64),
    from: Option<(i64, i64)>,
    plan: Plan,
}

/// Plans every selected dead letter, then keeps at most one per original
/// message among those to produce (the first by position): the others
/// are [`Plan::SameMessage`], and redriven copies of a dead letter this
/// run produces are [`Plan::CopyOfThisRun`].
fn plan_all<'a>(
    dlq_topic: &str,
    selected: Vec<(&'a Record, bool)>,
    records: &HashMap<(i64, i64), Redrive>,
    force: bool,
) -> Vec<Planned<'a>> {
    let mut by_origin: HashMap<OriginKey, Vec<(i64, i64)>> = HashMap::new();
    for (pos, r) in records {
        if let (Some(p), Some(o)) = (r.original_partition, r.original_offset) {
            by_origin
                .entry((r.original_topic.clone(), p, o))
                .or_default()
                .push(*pos);
        }
    }
    let mut taken_origins: HashMap<OriginKey, String> = HashMap::new();
    let mut taken_positions: HashSet<(i64, i64)> = HashSet::new();
    selected
        .into_iter()
        .map(|(rec, matches)| {
            let info = DeadLetterInfo::of(rec);
            let pos = (i64::from(info.partition), info.offset);
            let from = redriven_from(rec, dlq_topic);
            let mut plan = if matches {
                plan_one(dlq_topic, &info, from, records, &by_origin)
            } else {
                Plan::Filtered
            };
            if plan.will_produce(force) {
                let key = origin(&info).as_ref().and_then(origin_key);
                if let Some(f) = from
                    && taken_positions.contains(&f)
                {
                    plan = Plan::CopyOfThisRun {
                        from: position_str(f),
                    };
                } else if let Some(primary) = key.as_ref().and_then(|k| taken_origins.get(k)) {
                    plan = Plan::SameMessage {
                        primary: primary.clone(),
                    };
                } else {
                    if let Some(k) = key {
                        taken_origins.insert(k, info.position.clone());
                    }
                    taken_positions.insert(pos);
                }
            }
            Planned {
                rec,
                info,
                pos,
                from,
                plan,
            }
        })
        .collect()
}

/// The message to produce: original key and bytes, original headers
/// without `dlq.*` (and without an earlier redrive's marker), plus
/// [`H_REDRIVEN_FROM`].
fn redrive_headers(rec: &Record) -> OwnedHeaders {
    let from = format!("{}:{}:{}", rec.topic, rec.partition, rec.offset);
    let mut hs = OwnedHeaders::new_with_capacity(rec.headers.len() + 1);
    for (k, v) in &rec.headers {
        if k.starts_with("dlq.") || k == H_REDRIVEN_FROM {
            continue;
        }
        hs = hs.insert(Header {
            key: k,
            value: v.as_deref(),
        });
    }
    hs.insert(Header {
        key: H_REDRIVEN_FROM,
        value: Some(from.as_str()),
    })
}

/// Whether a failed produce certainly wrote nothing, so its claim can be
/// given back: errors raised before the message could reach a partition
/// leader (unknown topic or partition, too large, not authorized, local
/// queue full). Anything else, timeouts above all, may hide a write the
/// idempotent producer completed: the redrive stays in doubt.
pub fn certainly_not_written(e: &ProduceError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e {
        ProduceError::Create(_) | ProduceError::Encode(_) => true,
        ProduceError::NotAcknowledged { error, .. } => matches!(
            error.rdkafka_error_code(),
            Some(
                C::UnknownTopic
                    | C::UnknownPartition
                    | C::UnknownTopicOrPartition
                    | C::InvalidTopic
                    | C::MessageSizeTooLarge
                    | C::InvalidMessageSize
                    | C::TopicAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::QueueFull
            )
        ),
    }
}

fn now_micros() -> i64 {
    events::Timestamp::now().as_micros()
}

pub async fn redrive(
    kafka: &KafkaConfig,
    db_url: &str,
    args: &RedriveArgs,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.all || !args.positions.is_empty(),
        "name the dead letters to redrive (PARTITION:OFFSET ...) or pass --all"
    );
    let wanted: Vec<(i32, i64)> = args
        .positions
        .iter()
        .map(|p| parse_position(p))
        .collect::<anyhow::Result<_>>()?;
    let topic = dlq_topic(kafka);
    let all = read_all(kafka).await?;
    let by_pos: HashMap<(i32, i64), &Record> =
        all.iter().map(|r| ((r.partition, r.offset), r)).collect();
    // (dead letter, matches --group/--kind). With --all only the matching
    // ones are selected; a position named on the command line that does
    // not match is kept, to be reported as skipped by the filter.
    let mut selected: Vec<(&Record, bool)> = if args.all {
        all.iter()
            .filter(|r| DeadLetterInfo::of(r).matches(&args.filter))
            .map(|r| (r, true))
            .collect()
    } else {
        let mut v = Vec::new();
        for p in &wanted {
            let r = by_pos
                .get(p)
                .with_context(|| format!("no dead letter at {}:{} in {topic}", p.0, p.1))?;
            if !v
                .iter()
                .any(|(x, _): &(&Record, bool)| x.partition == p.0 && x.offset == p.1)
            {
                v.push((*r, DeadLetterInfo::of(r).matches(&args.filter)));
            }
        }
        v
    };
    // Position order, so the first dead letter of a message is the one
    // produced and a redriven copy comes after the dead letter it is a
    // copy of (same key, so the same dead-letter partition).
    selected.sort_by_key(|(r, _)| (r.partition, r.offset));

    let db = storage::Db::connect(db_url)
        .await
        .context("connecting to the database that records redrives")?;
    crate::migrate(&db)
        .await
        .context("migrating the redrive records")?;
    let records = store::load(&db, &topic).await?;
    let planned = plan_all(&topic, selected, &records, args.force);

    let to_produce = planned
        .iter()
        .filter(|p| p.plan.will_produce(args.force))
        .count();
    let invalid = planned
        .iter()
        .filter(|p| matches!(p.plan, Plan::Invalid(_)))
        .count();
    if !args.json {
        writeln!(
            out,
            "{} plan for {} dead letters of {topic}: {to_produce} to produce",
            if args.execute { "redrive" } else { "dry run:" },
            planned.len()
        )?;
        for p in &planned {
            writeln!(
                out,
                "{}\t{}\t{} -> {}\t{}\t{}",
                p.info.position,
                p.info.kind(),
                p.info.origin(),
                p.info.original_topic.as_deref().unwrap_or("?"),
                p.info.event(),
                p.plan.label(args.force)
            )?;
        }
    }

    let mut results: Vec<Value> = Vec::new();
    let (mut produced, mut skipped, mut failed, mut in_doubt) = (0u64, 0u64, 0u64, 0u64);
    if args.execute {
        let producer = if to_produce > 0 {
            Some(EventProducer::new(kafka, "paystream-dlq-redrive")?)
        } else {
            None
        };
        // Where each dead letter produced in this run went.
        let mut produced_at: HashMap<String, (i64, i64)> = HashMap::new();
        for p in &planned {
            let (rec, info, pos) = (p.rec, &p.info, p.pos);
            let mut result = json!({"position": info.position, "plan": p.plan.status()});
            if !p.plan.will_produce(args.force) {
                if !matches!(p.plan, Plan::Invalid(_)) {
                    skipped += 1;
                }
                result["result"] = "skipped".into();
                // Another group's dead letter of a message produced in
                // this run: recorded as redriven with it.
                if let Plan::SameMessage { primary } = &p.plan
                    && let Some(&at) = produced_at.get(primary)
                    && let Some(o) = origin(info)
                {
                    let primary_pos = parse_position(primary)?;
                    let recorded = store::record_same_as(
                        &db,
                        &topic,
                        pos,
                        &o,
                        now_micros(),
                        (i64::from(primary_pos.0), primary_pos.1),
                        at,
                    )
                    .await?;
                    result["recorded_with"] = primary.as_str().into();
                    result["recorded"] = recorded.into();
                }
                results.push(result);
                continue;
            }
            let (Some(producer), Some(o)) = (&producer, origin(info)) else {
                unreachable!(
                    "a producer exists when something is to be produced, and only valid dead letters are"
                )
            };
            let now = now_micros();
            let token = store::new_token();
            let previous = if matches!(p.plan, Plan::Produce) && !args.force {
                if !store::claim_new(&db, &topic, pos, &o, now, &token).await? {
                    skipped += 1;
                    result["result"] = "claimed_by_another_redrive".into();
                    if !args.json {
                        writeln!(
                            out,
                            "{}: claimed by another redrive meanwhile; skipped",
                            info.position
                        )?;
                    }
                    results.push(result);
                    continue;
                }
                None
            } else {
                store::claim_forced(&db, &topic, pos, &o, now, &token).await?
            };
            // The record timestamp stays the event's occurred_at, as on
            // every event message; unknown for undecodable bytes.
            let ts = avro::decode(&rec.payload)
                .ok()
                .map(|e| e.occurred_at.as_millis());
            // Always the bytes, even empty ones (never a null payload,
            // which a compacted topic would take for a tombstone).
            match producer
                .send_raw(
                    &o.topic,
                    rec.key.as_deref(),
                    Some(rec.payload.as_slice()),
                    redrive_headers(rec),
                    ts,
                )
                .await
            {
                Ok(a) => {
                    let at = (i64::from(a.partition), a.offset);
                    result["produced"] =
                        json!({"topic": a.topic, "partition": a.partition, "offset": a.offset});
                    match store::mark_produced(&db, &topic, pos, &token, now_micros(), at).await {
                        Ok(()) => {
                            produced += 1;
                            produced_at.insert(info.position.clone(), at);
                            result["result"] = "produced".into();
                            if !args.json {
                                writeln!(
                                    out,
                                    "{}: produced to {} partition {} offset {}",
                                    info.position, a.topic, a.partition, a.offset
                                )?;
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            result["result"] = "produced_not_recorded".into();
                            result["error"] = format!("{e:#}").into();
                            eprintln!(
                                "error: {} was produced to {} partition {} offset {} but recording it failed: {e:#} \
                                 (consumers deduplicate by event id)",
                                info.position, a.topic, a.partition, a.offset
                            );
                        }
                    }
                }
                Err(e) if certainly_not_written(&e) => {
                    failed += 1;
                    let released =
                        store::release(&db, &topic, pos, &token, previous.as_ref()).await?;
                    result["result"] = "failed".into();
                    result["error"] = e.to_string().into();
                    eprintln!("error: {}: {e}; nothing was produced", info.position);
                    if !released {
                        eprintln!(
                            "warning: {}: another redrive took the claim over meanwhile; its record is left as it is",
                            info.position
                        );
                    }
                }
                Err(e) => {
                    failed += 1;
                    in_doubt += 1;
                    result["result"] = "in_doubt".into();
                    result["error"] = e.to_string().into();
                    eprintln!(
                        "error: {}: {e}; it may have been produced all the same, so it stays in doubt: \
                         later redrives report it and produce it again only with --force \
                         (consumers deduplicate by event id)",
                        info.position
                    );
                }
            }
            results.push(result);
        }
    }
    if args.json {
        let v = json!({
            "topic": topic,
            "dry_run": !args.execute,
            "dead_letters": planned.iter().map(|p| json!({
                "dead_letter": p.info,
                "redriven_from": p.from.map(position_str),
                "plan": p.plan.status(),
                "detail": p.plan.label(args.force),
                "will_produce": p.plan.will_produce(args.force),
            })).collect::<Vec<_>>(),
            "results": results,
            "produced": produced,
            "skipped": skipped,
            "failed": failed,
            "in_doubt": in_doubt,
            "invalid": invalid,
        });
        serde_json::to_writer_pretty(&mut *out, &v)?;
        writeln!(out)?;
    } else if args.execute {
        writeln!(
            out,
            "redriven {produced}, skipped {skipped}, failed {failed} (of which in doubt {in_doubt}), cannot redrive {invalid}"
        )?;
    } else {
        writeln!(out, "dry run: nothing produced; pass --execute to redrive")?;
    }
    db.close().await;
    Ok(if failed > 0 || (args.execute && invalid > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse() {
        assert_eq!(parse_position("3:1042").unwrap(), (3, 1042));
        for bad in ["3", "a:1", "1:-2", "-1:0", ""] {
            assert!(parse_position(bad).is_err(), "{bad}");
        }
    }

    fn dead_letter(
        partition: i32,
        offset: i64,
        group: &str,
        origin_offset: i64,
        from: Option<&str>,
    ) -> Record {
        let mut headers: Vec<(String, Option<Vec<u8>>)> = vec![
            (h::H_ORIGINAL_TOPIC.into(), Some(b"x.payments".to_vec())),
            (h::H_ORIGINAL_PARTITION.into(), Some(b"0".to_vec())),
            (
                h::H_ORIGINAL_OFFSET.into(),
                Some(origin_offset.to_string().into_bytes()),
            ),
            (h::H_CONSUMER_GROUP.into(), Some(group.as_bytes().to_vec())),
            (h::H_ERROR_KIND.into(), Some(b"not_single_object".to_vec())),
        ];
        if let Some(f) = from {
            headers.push((H_REDRIVEN_FROM.into(), Some(f.as_bytes().to_vec())));
        }
        Record {
            topic: "x.dlq".into(),
            partition,
            offset,
            timestamp_ms: None,
            key: Some(b"k".to_vec()),
            payload: b"poison".to_vec(),
            headers,
        }
    }

    fn produced_record(origin_offset: i64) -> Redrive {
        Redrive {
            original_topic: "x.payments".into(),
            original_partition: Some(0),
            original_offset: Some(origin_offset),
            event_id: None,
            state: "produced".into(),
            claim_token: "t".into(),
            redrives: 1,
            claimed_at: 1,
            produced_at: Some(2),
            produced_partition: Some(0),
            produced_offset: Some(9),
            same_as: None,
        }
    }

    #[test]
    fn stubs_are_shown_as_such_and_never_redriven() {
        let mut stub = dead_letter(0, 0, "handler-inbound", 5, None);
        stub.headers.extend([
            (h::H_TRUNCATED.to_owned(), Some(b"true".to_vec())),
            (h::H_ORIGINAL_SIZE.to_owned(), Some(b"2000000".to_vec())),
            (h::H_ORIGINAL_SHA256.to_owned(), Some(b"ab12".to_vec())),
        ]);
        let info = DeadLetterInfo::of(&stub);
        assert!(info.truncated);
        assert_eq!(
            info.decode_error.as_deref(),
            Some("stub: the first 6 of 2000000 bytes (sha256 ab12)")
        );
        let p = plan_all("x.dlq", vec![(&stub, true)], &HashMap::new(), false);
        assert_eq!(statuses(&p), ["invalid"]);
        // The same dead letter without the stub header is redriven.
        let whole = dead_letter(0, 0, "handler-inbound", 5, None);
        let p = plan_all("x.dlq", vec![(&whole, true)], &HashMap::new(), false);
        assert_eq!(statuses(&p), ["produce"]);
    }

    #[test]
    fn dead_letters_go_back_only_to_this_deployments_consumed_topics() {
        // Headers come from whoever produced the dead letter (review L9).
        for (target, want) in [
            ("x.payments", "produce"),
            ("x.payments.inbound", "produce"),
            ("x.reconciliation", "produce"),
            ("x.dlq", "invalid"),
            ("y.payments", "invalid"),
            ("x.audit", "invalid"),
            ("__consumer_offsets", "invalid"),
        ] {
            let mut rec = dead_letter(0, 0, "ledger", 5, None);
            rec.headers[0].1 = Some(target.as_bytes().to_vec());
            let p = plan_all("x.dlq", vec![(&rec, true)], &HashMap::new(), false);
            assert_eq!(statuses(&p), [want], "{target}");
        }
    }

    fn statuses(p: &[Planned<'_>]) -> Vec<&'static str> {
        p.iter().map(|p| p.plan.status()).collect()
    }

    #[test]
    fn one_produce_per_original_message_and_run() {
        // Two groups' dead letters of payments/0@5, then the two dead
        // letters of its redriven copy (payments/0@9, redriven from 0:0).
        let recs = [
            dead_letter(0, 0, "ledger", 5, None),
            dead_letter(0, 1, "wallet", 5, None),
            dead_letter(0, 2, "ledger", 9, Some("x.dlq:0:0")),
            dead_letter(0, 3, "wallet", 9, Some("x.dlq:0:0")),
        ];
        let sel = || recs.iter().map(|r| (r, true)).collect::<Vec<_>>();
        let none = HashMap::new();
        // First run: 0:0 produced, 0:1 the same message, the copies'
        // dead letters copies of what this run produces.
        let p = plan_all("x.dlq", sel(), &none, false);
        assert_eq!(
            statuses(&p),
            [
                "produce",
                "same_message",
                "copy_of_this_run",
                "copy_of_this_run"
            ]
        );
        assert_eq!(p[2].from, Some((0, 0)));
        // Next run, 0:0 redriven and 0:1 recorded with it: nothing.
        let mut done = HashMap::new();
        done.insert((0, 0), produced_record(5));
        let p = plan_all("x.dlq", sel(), &done, false);
        assert_eq!(
            statuses(&p),
            [
                "already_redriven",
                "same_message_recorded",
                "failed_again",
                "failed_again"
            ]
        );
        assert!(p.iter().all(|p| !p.plan.will_produce(false)));
        // --force: still one produce per run.
        let p = plan_all("x.dlq", sel(), &done, true);
        assert_eq!(
            p.iter().filter(|p| p.plan.will_produce(true)).count(),
            1,
            "{:?}",
            statuses(&p)
        );
        // Filtered positions are reported, not dropped.
        let p = plan_all("x.dlq", vec![(&recs[1], false)], &none, false);
        assert_eq!(statuses(&p), ["filtered_out"]);
        // Another dead-letter topic's marker is not this one's.
        assert_eq!(
            redriven_from(&dead_letter(0, 2, "g", 9, Some("y.dlq:0:0")), "x.dlq"),
            None
        );
    }

    #[test]
    fn only_errors_that_wrote_nothing_release_a_claim() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode as C;
        let e = |c| ProduceError::NotAcknowledged {
            topic: "t".into(),
            error: KafkaError::MessageProduction(c),
        };
        for c in [
            C::MessageTimedOut,
            C::RequestTimedOut,
            C::BrokerTransportFailure,
            C::Fatal,
        ] {
            assert!(!certainly_not_written(&e(c)), "{c:?} may have been written");
        }
        assert!(!certainly_not_written(&ProduceError::NotAcknowledged {
            topic: "t".into(),
            error: KafkaError::Canceled,
        }));
        for c in [
            C::UnknownTopicOrPartition,
            C::MessageSizeTooLarge,
            C::QueueFull,
        ] {
            assert!(certainly_not_written(&e(c)), "{c:?}");
        }
    }

    #[test]
    fn hex_dump_shows_offsets_bytes_and_ascii() {
        let d = hex_dump(b"hello, not avro\x00\x01!");
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("00000000  68 65 6c 6c 6f"), "{d}");
        assert!(lines[0].ends_with("|hello, not avro.|"), "{d}");
        assert!(lines[1].starts_with("00000010  01 21"), "{d}");
        assert!(lines[1].ends_with("|.!|"), "{d}");
    }
}

/// Text from a dead letter (its key, headers and reason come from whoever
/// produced the original) made safe for a terminal: control characters,
/// escape sequences included, are shown escaped instead of interpreted
/// (review L3).
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("ok"), "ok");
        assert_eq!(printable("a\u{1b}[2Jb\u{7}"), "a\\u{1b}[2Jb\\u{7}");
        assert_eq!(printable("é"), "é");
    }
}
