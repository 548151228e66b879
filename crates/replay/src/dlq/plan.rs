//! What a redrive does with each dead letter, decided from the dead
//! letters and the redrive records alone: which are selected, which are
//! produced (at most one per original message and run), which are skipped
//! and why. No I/O: `mod.rs` reads, `execute.rs` produces, `render.rs`
//! prints.

use super::DlqError;
use super::H_REDRIVEN_FROM;
use super::info::{DeadLetterInfo, position_str};
use crate::DlqFilter;
use crate::store::{Origin, Redrive};
use std::collections::{HashMap, HashSet};
use streaming::dlq as h;
use streaming::reader::Record;

/// The dead letters a redrive looks at, in position order, each with
/// whether --group/--kind match it. With `every` (--all) only the matching
/// ones; positions named instead are all kept (once each), a named one
/// that does not match to be reported as skipped by the filter, and one
/// that is not in the topic is an error.
pub(super) fn select<'a>(
    all: &'a [Record],
    wanted: &[(i32, i64)],
    every: bool,
    filter: &DlqFilter,
    topic: &str,
) -> Result<Vec<(&'a Record, bool)>, DlqError> {
    let by_pos: HashMap<(i32, i64), &Record> =
        all.iter().map(|r| ((r.partition, r.offset), r)).collect();
    let mut selected: Vec<(&Record, bool)> = if every {
        all.iter()
            .filter(|r| DeadLetterInfo::of(r).matches(filter))
            .map(|r| (r, true))
            .collect()
    } else {
        let mut v = Vec::new();
        for p in wanted {
            let r = by_pos.get(p).ok_or_else(|| DlqError::NotInTopic {
                topic: topic.to_owned(),
                partition: p.0,
                offset: p.1,
            })?;
            if !v
                .iter()
                .any(|(x, _): &(&Record, bool)| x.partition == p.0 && x.offset == p.1)
            {
                v.push((*r, DeadLetterInfo::of(r).matches(filter)));
            }
        }
        v
    };
    // Position order, so the first dead letter of a message is the one
    // produced and a redriven copy comes after the dead letter it is a
    // copy of (same key, so the same dead-letter partition).
    selected.sort_by_key(|(r, _)| (r.partition, r.offset));
    Ok(selected)
}

/// What a redrive will do (or did) with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
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

impl Plan {
    /// A stable name, for JSON.
    pub(super) fn status(&self) -> &'static str {
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

    /// Whether a run (with or without --force) produces it.
    pub(super) fn will_produce(&self, force: bool) -> bool {
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

/// Where the dead letter's message came from, as a redrive record names it.
pub(super) fn origin(info: &DeadLetterInfo) -> Option<Origin> {
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
pub(super) struct Planned<'a> {
    pub(super) rec: &'a Record,
    pub(super) info: DeadLetterInfo,
    pub(super) pos: (i64, i64),
    pub(super) from: Option<(i64, i64)>,
    pub(super) plan: Plan,
}

/// Plans every selected dead letter, then keeps at most one per original
/// message among those to produce (the first by position): the others
/// are [`Plan::SameMessage`], and redriven copies of a dead letter this
/// run produces are [`Plan::CopyOfThisRun`].
pub(super) fn plan_all<'a>(
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

#[cfg(test)]
mod tests {
    use super::*;

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

    fn positions(s: &[(&Record, bool)]) -> Vec<((i32, i64), bool)> {
        s.iter()
            .map(|(r, m)| ((r.partition, r.offset), *m))
            .collect()
    }

    #[test]
    fn selection_keeps_named_positions_once_in_order_even_when_filtered_out() {
        let recs = [
            dead_letter(1, 4, "ledger", 5, None),
            dead_letter(0, 7, "wallet", 6, None),
            dead_letter(0, 2, "ledger", 8, None),
        ];
        let ledger = DlqFilter {
            group: Some("ledger".into()),
            kind: None,
        };
        // --all: only the matching ones, in position order.
        let s = select(&recs, &[], true, &ledger, "x.dlq").unwrap();
        assert_eq!(positions(&s), [((0, 2), true), ((1, 4), true)]);
        // Named: each once, in position order; the one the filter does not
        // match is kept, to be reported as such.
        let s = select(&recs, &[(1, 4), (0, 7), (1, 4)], false, &ledger, "x.dlq").unwrap();
        assert_eq!(positions(&s), [((0, 7), false), ((1, 4), true)]);
        let p = plan_all("x.dlq", s, &HashMap::new(), false);
        assert_eq!(statuses(&p), ["filtered_out", "produce"]);
        // A named position that is not in the topic is an error, not a skip.
        let e = select(&recs, &[(0, 2), (0, 3)], false, &ledger, "x.dlq").unwrap_err();
        assert_eq!(e.to_string(), "no dead letter at 0:3 in x.dlq");
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
}
