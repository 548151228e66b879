//! What `dlq list|show|redrive` print: tab-separated text or one JSON
//! document on stdout, errors of a redrive on stderr. Text that comes from
//! a dead letter is made safe for a terminal ([`printable`]).

use super::execute::{Outcome, Produced, Tally};
use super::info::{DeadLetterInfo, position_str};
use super::plan::{Plan, Planned};
use crate::RedriveArgs;
use crate::bounds::rfc3339_ms;
use crate::store::Redrive;
use events::json;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use streaming::reader::Record;

/// The error kind, or `-`.
fn kind(i: &DeadLetterInfo) -> &str {
    i.error_kind.as_deref().unwrap_or("-")
}

/// `topic/partition@offset` of the original message, `?` where unknown.
fn origin(i: &DeadLetterInfo) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    format!(
        "{}/{}@{}",
        i.original_topic.as_deref().unwrap_or("?"),
        opt(i.original_partition.map(|p| p.to_string())),
        opt(i.original_offset.map(|o| o.to_string()))
    )
}

/// `EventType event_id`, or `(undecodable)`.
fn event(i: &DeadLetterInfo) -> String {
    match (&i.event_type, &i.event_id) {
        (Some(t), Some(id)) => format!("{t} {id}"),
        _ => "(undecodable)".into(),
    }
}

/// Dead letters by error kind.
pub(super) fn counts(infos: &[DeadLetterInfo]) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for i in infos {
        *counts.entry(kind(i).to_owned()).or_default() += 1;
    }
    counts
}

/// `dlq list --json`.
pub(super) fn list_json(
    out: &mut (dyn Write + Send),
    topic: &str,
    infos: &[DeadLetterInfo],
) -> std::io::Result<()> {
    let v = json!({"topic": topic, "dead_letters": infos, "counts": counts(infos), "total": infos.len()});
    serde_json::to_writer_pretty(&mut *out, &v)?;
    writeln!(out)?;
    Ok(())
}

/// `dlq list`: one line each, then the counts by kind.
pub(super) fn list_text(
    out: &mut (dyn Write + Send),
    infos: &[DeadLetterInfo],
) -> std::io::Result<()> {
    writeln!(
        out,
        "POSITION\tKIND\tGROUP\tORIGIN\tFAILED_AT\tEVENT\tREASON"
    )?;
    for i in infos {
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            i.position,
            kind(i),
            i.consumer_group.as_deref().unwrap_or("-"),
            origin(i),
            i.failed_at.as_deref().unwrap_or("-"),
            event(i),
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
    for (k, n) in &counts(infos) {
        writeln!(out, "  {k}\t{n}")?;
    }
    writeln!(out, "  total\t{}", infos.len())?;
    Ok(())
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

/// `dlq show --json`.
pub(super) fn show_json(
    out: &mut (dyn Write + Send),
    rec: &Record,
    info: &DeadLetterInfo,
    decoded: &Result<events::Envelope, events::avro::DecodeError>,
) -> std::io::Result<()> {
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
    Ok(())
}

/// `dlq show`: key, headers, then the event as JSON or a hex dump.
pub(super) fn show_text(
    out: &mut (dyn Write + Send),
    rec: &Record,
    info: &DeadLetterInfo,
    decoded: &Result<events::Envelope, events::avro::DecodeError>,
) -> std::io::Result<()> {
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
            serde_json::to_writer_pretty(&mut *out, &json::envelope(env))?;
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
    Ok(())
}

fn opt_num(v: Option<i64>) -> String {
    v.map_or("?".into(), |n| n.to_string())
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

/// What the plan does with a dead letter, in words.
pub(super) fn plan_label(plan: &Plan, force: bool) -> String {
    let again = if force {
        "; --force: produce again"
    } else {
        "; skipped (--force to produce again)"
    };
    match plan {
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

/// `dlq redrive` before it executes: the plan, one line each.
pub(super) fn plan_text(
    out: &mut (dyn Write + Send),
    topic: &str,
    planned: &[Planned<'_>],
    args: &RedriveArgs,
) -> std::io::Result<()> {
    let (execute, force) = (args.execute, args.force);
    let to_produce = planned
        .iter()
        .filter(|p| p.plan.will_produce(force))
        .count();
    writeln!(
        out,
        "{} plan for {} dead letters of {topic}: {to_produce} to produce",
        if execute { "redrive" } else { "dry run:" },
        planned.len()
    )?;
    for p in planned {
        writeln!(
            out,
            "{}\t{}\t{} -> {}\t{}\t{}",
            p.info.position,
            kind(&p.info),
            origin(&p.info),
            p.info.original_topic.as_deref().unwrap_or("?"),
            event(&p.info),
            plan_label(&p.plan, force)
        )?;
    }
    Ok(())
}

/// One executed dead letter: errors to stderr; unless `json`, what was
/// produced (or claimed by another redrive) to `out`.
pub(super) fn step_text(
    out: &mut (dyn Write + Send),
    p: &Planned<'_>,
    outcome: &Outcome,
    json: bool,
) -> std::io::Result<()> {
    let position = &p.info.position;
    match outcome {
        Outcome::Skipped { .. } => {}
        Outcome::ClaimedByAnother => {
            if !json {
                writeln!(
                    out,
                    "{position}: claimed by another redrive meanwhile; skipped"
                )?;
            }
        }
        Outcome::Produced(a) => {
            if !json {
                writeln!(
                    out,
                    "{position}: produced to {} partition {} offset {}",
                    a.topic, a.partition, a.offset
                )?;
            }
        }
        Outcome::ProducedNotRecorded { at: a, error } => eprintln!(
            "error: {position} was produced to {} partition {} offset {} but recording it failed: {error} \
             (consumers deduplicate by event id)",
            a.topic, a.partition, a.offset
        ),
        Outcome::Failed { error, released } => {
            eprintln!("error: {position}: {error}; nothing was produced");
            if !released {
                eprintln!(
                    "warning: {position}: another redrive took the claim over meanwhile; its record is left as it is"
                );
            }
        }
        Outcome::InDoubt { error } => eprintln!(
            "error: {position}: {error}; it may have been produced all the same, so it stays in doubt: \
             later redrives report it and produce it again only with --force \
             (consumers deduplicate by event id)"
        ),
    }
    Ok(())
}

fn produced_json(a: &Produced) -> Value {
    json!({"topic": a.topic, "partition": a.partition, "offset": a.offset})
}

/// One executed dead letter in `dlq redrive --json`'s `results`.
pub(super) fn result_json(p: &Planned<'_>, outcome: &Outcome) -> Value {
    let mut result = json!({"position": p.info.position, "plan": p.plan.status()});
    match outcome {
        Outcome::Skipped { recorded_with } => {
            result["result"] = "skipped".into();
            if let Some((primary, recorded)) = recorded_with {
                result["recorded_with"] = primary.as_str().into();
                result["recorded"] = (*recorded).into();
            }
        }
        Outcome::ClaimedByAnother => result["result"] = "claimed_by_another_redrive".into(),
        Outcome::Produced(a) => {
            result["produced"] = produced_json(a);
            result["result"] = "produced".into();
        }
        Outcome::ProducedNotRecorded { at, error } => {
            result["produced"] = produced_json(at);
            result["result"] = "produced_not_recorded".into();
            result["error"] = error.as_str().into();
        }
        Outcome::Failed { error, .. } => {
            result["result"] = "failed".into();
            result["error"] = error.as_str().into();
        }
        Outcome::InDoubt { error } => {
            result["result"] = "in_doubt".into();
            result["error"] = error.as_str().into();
        }
    }
    result
}

/// `dlq redrive --json`: the plan, the results (with --execute) and the
/// counts.
pub(super) fn redrive_json(
    out: &mut (dyn Write + Send),
    topic: &str,
    planned: &[Planned<'_>],
    args: &RedriveArgs,
    results: Vec<Value>,
    tally: Tally,
    invalid: usize,
) -> std::io::Result<()> {
    let (execute, force) = (args.execute, args.force);
    let v = json!({
        "topic": topic,
        "dry_run": !execute,
        "dead_letters": planned.iter().map(|p| json!({
            "dead_letter": p.info,
            "redriven_from": p.from.map(position_str),
            "plan": p.plan.status(),
            "detail": plan_label(&p.plan, force),
            "will_produce": p.plan.will_produce(force),
        })).collect::<Vec<_>>(),
        "results": results,
        "produced": tally.produced,
        "skipped": tally.skipped,
        "failed": tally.failed,
        "in_doubt": tally.in_doubt,
        "invalid": invalid,
    });
    serde_json::to_writer_pretty(&mut *out, &v)?;
    writeln!(out)?;
    Ok(())
}

/// `dlq redrive`'s last line.
pub(super) fn redrive_summary_text(
    out: &mut (dyn Write + Send),
    execute: bool,
    tally: Tally,
    invalid: usize,
) -> std::io::Result<()> {
    let Tally {
        produced,
        skipped,
        failed,
        in_doubt,
    } = tally;
    if execute {
        writeln!(
            out,
            "redriven {produced}, skipped {skipped}, failed {failed} (of which in doubt {in_doubt}), cannot redrive {invalid}"
        )?;
    } else {
        writeln!(out, "dry run: nothing produced; pass --execute to redrive")?;
    }
    Ok(())
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
mod tests {
    use super::*;

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

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("ok"), "ok");
        assert_eq!(printable("a\u{1b}[2Jb\u{7}"), "a\\u{1b}[2Jb\\u{7}");
        assert_eq!(printable("é"), "é");
    }
}
