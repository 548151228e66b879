//! Executing a redrive plan: each dead letter to produce is claimed in the
//! redrive records, produced again to its original topic, and its outcome
//! recorded (or its claim given back when the produce certainly wrote
//! nothing). What happened to each is handed to the caller as it happens;
//! nothing here prints.

use super::info::parse_position;
use super::plan::{Plan, Planned, origin};
use super::{DlqError, H_REDRIVEN_FROM};
use crate::store;
use rdkafka::message::{Header, OwnedHeaders};
use std::collections::HashMap;
use storage::Db;
use streaming::producer::ProduceError;
use streaming::reader::Record;
use streaming::{EventProducer, KafkaConfig};

/// What became of one planned dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Not produced, as planned. Another group's dead letter of a message
    /// produced in this run is recorded as redriven with it: `recorded_with`
    /// names that dead letter and whether a record was written.
    Skipped {
        recorded_with: Option<(String, bool)>,
    },
    /// Another redrive claimed it between the plan and the claim.
    ClaimedByAnother,
    /// Produced and recorded.
    Produced(Produced),
    /// Produced, but recording it failed (`error`, with its causes).
    ProducedNotRecorded { at: Produced, error: String },
    /// Certainly not produced; its claim given back (`released`) unless
    /// another redrive had taken it over.
    Failed { error: String, released: bool },
    /// Perhaps produced: stays in doubt.
    InDoubt { error: String },
}

/// Where a redriven message went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Produced {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
}

/// The counts a redrive reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Tally {
    pub(super) produced: u64,
    /// Not produced, as planned or because another redrive claimed it
    /// (dead letters that cannot be redriven are counted apart).
    pub(super) skipped: u64,
    /// Not produced, not recorded, or perhaps produced.
    pub(super) failed: u64,
    /// Of the failed: perhaps produced.
    pub(super) in_doubt: u64,
}

impl Tally {
    pub(super) fn add(&mut self, plan: &Plan, outcome: &Outcome) {
        match outcome {
            Outcome::Skipped { .. } => {
                if !matches!(plan, Plan::Invalid(_)) {
                    self.skipped += 1;
                }
            }
            Outcome::ClaimedByAnother => self.skipped += 1,
            Outcome::Produced(_) => self.produced += 1,
            Outcome::ProducedNotRecorded { .. } | Outcome::Failed { .. } => self.failed += 1,
            Outcome::InDoubt { .. } => {
                self.failed += 1;
                self.in_doubt += 1;
            }
        }
    }
}

/// Runs the plan: claims, produces and records each dead letter it
/// produces, records with them the dead letters of the same messages, and
/// calls `step` with each planned dead letter's outcome, in plan order.
/// Stops at the first error of the redrive records (the database).
pub(super) async fn execute(
    kafka: &KafkaConfig,
    db: &Db,
    topic: &str,
    planned: &[Planned<'_>],
    force: bool,
    mut step: impl FnMut(&Planned<'_>, &Outcome) -> std::io::Result<()>,
) -> Result<(), DlqError> {
    let producer = if planned.iter().any(|p| p.plan.will_produce(force)) {
        Some(EventProducer::new(kafka, "paystream-dlq-redrive")?)
    } else {
        None
    };
    // Where each dead letter produced in this run went.
    let mut produced_at: HashMap<String, (i64, i64)> = HashMap::new();
    for p in planned {
        let (rec, info, pos) = (p.rec, &p.info, p.pos);
        if !p.plan.will_produce(force) {
            let mut recorded_with = None;
            // Another group's dead letter of a message produced in
            // this run: recorded as redriven with it.
            if let Plan::SameMessage { primary } = &p.plan
                && let Some(&at) = produced_at.get(primary)
                && let Some(o) = origin(info)
            {
                let primary_pos = parse_position(primary)?;
                let recorded = store::record_same_as(
                    db,
                    topic,
                    pos,
                    &o,
                    now_micros(),
                    (i64::from(primary_pos.0), primary_pos.1),
                    at,
                )
                .await?;
                recorded_with = Some((primary.clone(), recorded));
            }
            step(p, &Outcome::Skipped { recorded_with })?;
            continue;
        }
        let (Some(producer), Some(o)) = (&producer, origin(info)) else {
            unreachable!(
                "a producer exists when something is to be produced, and only valid dead letters are"
            )
        };
        let now = now_micros();
        let token = store::new_token();
        let previous = if matches!(p.plan, Plan::Produce) && !force {
            if !store::claim_new(db, topic, pos, &o, now, &token).await? {
                step(p, &Outcome::ClaimedByAnother)?;
                continue;
            }
            None
        } else {
            store::claim_forced(db, topic, pos, &o, now, &token).await?
        };
        // The record timestamp stays the event's occurred_at, as on
        // every event message; unknown for undecodable bytes.
        let ts = events::avro::decode(&rec.payload)
            .ok()
            .map(|e| e.occurred_at.as_millis());
        // Always the bytes, even empty ones (never a null payload,
        // which a compacted topic would take for a tombstone).
        let outcome = match producer
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
                let went = Produced {
                    topic: a.topic,
                    partition: a.partition,
                    offset: a.offset,
                };
                match store::mark_produced(db, topic, pos, &token, now_micros(), at).await {
                    Ok(()) => {
                        produced_at.insert(info.position.clone(), at);
                        Outcome::Produced(went)
                    }
                    Err(e) => Outcome::ProducedNotRecorded {
                        at: went,
                        error: with_causes(&e),
                    },
                }
            }
            Err(e) if certainly_not_written(&e) => {
                let released = store::release(db, topic, pos, &token, previous.as_ref()).await?;
                Outcome::Failed {
                    error: e.to_string(),
                    released,
                }
            }
            Err(e) => Outcome::InDoubt {
                error: e.to_string(),
            },
        };
        step(p, &outcome)?;
    }
    Ok(())
}

/// An error and its causes, `: `-separated (what `{:#}` shows of an
/// `anyhow` error).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_counts_doubt_as_failure_and_invalid_dead_letters_apart() {
        let mut t = Tally::default();
        let skipped = Outcome::Skipped {
            recorded_with: None,
        };
        t.add(&Plan::Invalid("no origin".into()), &skipped);
        assert_eq!(t, Tally::default(), "counted as invalid, not skipped");
        t.add(&Plan::Filtered, &skipped);
        t.add(&Plan::Produce, &Outcome::ClaimedByAnother);
        let at = Produced {
            topic: "x.payments".into(),
            partition: 0,
            offset: 9,
        };
        t.add(&Plan::Produce, &Outcome::Produced(at.clone()));
        t.add(
            &Plan::Produce,
            &Outcome::ProducedNotRecorded {
                at,
                error: "db".into(),
            },
        );
        t.add(
            &Plan::Produce,
            &Outcome::InDoubt {
                error: "timed out".into(),
            },
        );
        assert_eq!(
            t,
            Tally {
                produced: 1,
                skipped: 2,
                failed: 2,
                in_doubt: 1
            }
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
}
