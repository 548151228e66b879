//! Redrive records (`replay_redrives`, migration 5001): one row per
//! dead-letter position, claimed before producing and marked produced
//! after the acknowledgement, so a position is redriven once.
//!
//! Every claim writes a fresh random `claim_token`. Recording the produce
//! ([`mark_produced`]) and giving the claim back ([`release`]) only touch
//! the row while it still holds that token, so a redrive whose claim was
//! taken over meanwhile (a concurrent `--force`) can neither overwrite nor
//! delete the other redrive's record. A forced claim returns the row it
//! replaced, and a release restores exactly that row.

use std::collections::HashMap;
use storage::{Db, with_pool};

/// A redrive record that could not be read or written as asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error(
        "cannot claim {dlq_topic}:{partition}:{offset}: its redrive record kept changing ({attempts} attempts); is another redrive of it running?"
    )]
    ClaimContended {
        dlq_topic: String,
        partition: i64,
        offset: i64,
        attempts: u32,
    },
    #[error("recording the produce")]
    RecordProduce(#[source] sqlx::Error),
    #[error(
        "the claim on {dlq_topic}:{partition}:{offset} was taken over by another redrive (--force) meanwhile, so this produce is not recorded"
    )]
    ClaimTakenOver {
        dlq_topic: String,
        partition: i64,
        offset: i64,
    },
}

/// One dead letter's redrive record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redrive {
    pub original_topic: String,
    pub original_partition: Option<i64>,
    pub original_offset: Option<i64>,
    pub event_id: Option<String>,
    /// `producing` (claimed, outcome unknown) or `produced`.
    pub state: String,
    /// Token of the redrive that last claimed the row.
    pub claim_token: String,
    /// How many times this position was produced.
    pub redrives: i64,
    pub claimed_at: i64,
    pub produced_at: Option<i64>,
    pub produced_partition: Option<i64>,
    pub produced_offset: Option<i64>,
    /// Recorded as redriven together with the dead letter at this position
    /// (same original message, another consumer group's dead letter).
    pub same_as: Option<(i64, i64)>,
}

impl Redrive {
    pub fn produced(&self) -> bool {
        self.state == "produced"
    }
}

/// Where a dead letter came from, as its headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: Option<i64>,
    pub offset: Option<i64>,
    pub event_id: Option<String>,
}

/// A fresh claim token.
pub fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

type Row = (
    i64,
    i64,
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

const COLUMNS: &str = "dlq_partition, dlq_offset, original_topic, original_partition, original_offset, event_id, state, claim_token, redrives, claimed_at, produced_at, produced_partition, produced_offset, same_as_partition, same_as_offset";

fn from_row(r: Row) -> ((i64, i64), Redrive) {
    (
        (r.0, r.1),
        Redrive {
            original_topic: r.2,
            original_partition: r.3,
            original_offset: r.4,
            event_id: r.5,
            state: r.6,
            claim_token: r.7,
            redrives: r.8,
            claimed_at: r.9,
            produced_at: r.10,
            produced_partition: r.11,
            produced_offset: r.12,
            same_as: r.13.zip(r.14),
        },
    )
}

/// Every record of one dead-letter topic, by (partition, offset).
pub async fn load(db: &Db, dlq_topic: &str) -> sqlx::Result<HashMap<(i64, i64), Redrive>> {
    let sql = format!("SELECT {COLUMNS} FROM replay_redrives WHERE dlq_topic = $1");
    let rows: Vec<Row> =
        with_pool!(db, p => sqlx::query_as::<_, Row>(&sql).bind(dlq_topic).fetch_all(p).await)?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// The record of one position, if any.
pub async fn get(db: &Db, dlq_topic: &str, pos: (i64, i64)) -> sqlx::Result<Option<Redrive>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM replay_redrives WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3"
    );
    let row: Option<Row> = with_pool!(db, p => sqlx::query_as::<_, Row>(&sql)
        .bind(dlq_topic)
        .bind(pos.0)
        .bind(pos.1)
        .fetch_optional(p)
        .await)?;
    Ok(row.map(|r| from_row(r).1))
}

/// Binds `$1..$7` of a `replay_redrives` INSERT: the dead-lettered
/// position and where the record came from.
fn bind_origin<'q, DB>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    dlq_topic: &'q str,
    pos: (i64, i64),
    origin: &'q Origin,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<i64>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(dlq_topic)
        .bind(pos.0)
        .bind(pos.1)
        .bind(&origin.topic)
        .bind(origin.partition)
        .bind(origin.offset)
        .bind(origin.event_id.as_deref())
}

/// Claims a position never redriven: true if this call inserted the row
/// (false: another redrive claimed it first).
pub async fn claim_new(
    db: &Db,
    dlq_topic: &str,
    pos: (i64, i64),
    origin: &Origin,
    now: i64,
    token: &str,
) -> sqlx::Result<bool> {
    let sql = "INSERT INTO replay_redrives (dlq_topic, dlq_partition, dlq_offset, original_topic, original_partition, original_offset, event_id, state, claim_token, redrives, claimed_at) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, 'producing', $8, 0, $9) ON CONFLICT DO NOTHING";
    let n = with_pool!(db, p => bind_origin(sqlx::query(sql), dlq_topic, pos, origin)
        .bind(token)
        .bind(now)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

/// Claims a position whatever its record says (`--force`); the record
/// then describes this dead letter and holds `token`. Returns the row it
/// replaced (None: there was none), for [`release`].
///
/// A compare-and-swap on the previous row's (claim token, state), retried
/// when another redrive changed the row in between, so the previous row
/// returned is exactly the one replaced.
pub async fn claim_forced(
    db: &Db,
    dlq_topic: &str,
    pos: (i64, i64),
    origin: &Origin,
    now: i64,
    token: &str,
) -> Result<Option<Redrive>, StoreError> {
    const ATTEMPTS: u32 = 20;
    let upd = "UPDATE replay_redrives SET state = 'producing', claim_token = $1, claimed_at = $2, \
               original_topic = $3, original_partition = $4, original_offset = $5, event_id = $6, \
               same_as_partition = NULL, same_as_offset = NULL \
               WHERE dlq_topic = $7 AND dlq_partition = $8 AND dlq_offset = $9 AND claim_token = $10 AND state = $11";
    for _ in 0..ATTEMPTS {
        let previous = get(db, dlq_topic, pos).await?;
        match &previous {
            None => {
                if claim_new(db, dlq_topic, pos, origin, now, token).await? {
                    return Ok(None);
                }
            }
            Some(prev) => {
                let n = with_pool!(db, p => bind_claim(sqlx::query(upd)
                    .bind(token)
                    .bind(now)
                    .bind(&origin.topic)
                    .bind(origin.partition)
                    .bind(origin.offset)
                    .bind(origin.event_id.as_deref()), (dlq_topic, pos, prev.claim_token.as_str()))
                    .bind(&prev.state)
                    .execute(p)
                    .await
                    .map(|r| r.rows_affected()))?;
                if n == 1 {
                    return Ok(previous);
                }
            }
        }
    }
    Err(StoreError::ClaimContended {
        dlq_topic: dlq_topic.to_owned(),
        partition: pos.0,
        offset: pos.1,
        attempts: ATTEMPTS,
    })
}

/// Binds the last four parameters of a statement on a claimed position:
/// `dlq_topic = $n AND dlq_partition = $n+1 AND dlq_offset = $n+2 AND
/// claim_token = $n+3`.
fn bind_claim<'q, DB>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    (dlq_topic, pos, token): (&'q str, (i64, i64), &'q str),
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(dlq_topic).bind(pos.0).bind(pos.1).bind(token)
}

/// Records the acknowledged produce of the claim holding `token`. Fails
/// when the row no longer holds it (another redrive took the claim over
/// meanwhile): the produce then is recorded nowhere, and the caller must
/// say so.
pub async fn mark_produced(
    db: &Db,
    dlq_topic: &str,
    pos: (i64, i64),
    token: &str,
    now: i64,
    produced: (i64, i64),
) -> Result<(), StoreError> {
    let sql = "UPDATE replay_redrives SET state = 'produced', redrives = redrives + 1, produced_at = $1, \
               produced_partition = $2, produced_offset = $3 \
               WHERE dlq_topic = $4 AND dlq_partition = $5 AND dlq_offset = $6 AND claim_token = $7 AND state = 'producing'";
    let n = with_pool!(db, p => bind_claim(
            sqlx::query(sql).bind(now).bind(produced.0).bind(produced.1),
            (dlq_topic, pos, token),
        )
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
    .map_err(StoreError::RecordProduce)?;
    if n != 1 {
        return Err(StoreError::ClaimTakenOver {
            dlq_topic: dlq_topic.to_owned(),
            partition: pos.0,
            offset: pos.1,
        });
    }
    Ok(())
}

/// Gives a claim back after a produce that certainly wrote nothing:
/// restores exactly `previous` (the row [`claim_forced`] replaced), or
/// deletes the row when there was none. Only while the row still holds
/// `token`: false when another redrive took the claim over meanwhile (its
/// record is then left alone).
pub async fn release(
    db: &Db,
    dlq_topic: &str,
    pos: (i64, i64),
    token: &str,
    previous: Option<&Redrive>,
) -> sqlx::Result<bool> {
    let n = match previous {
        None => {
            let sql = "DELETE FROM replay_redrives WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3 \
                       AND claim_token = $4 AND state = 'producing'";
            with_pool!(db, p => bind_claim(sqlx::query(sql), (dlq_topic, pos, token))
                .execute(p)
                .await
                .map(|r| r.rows_affected()))?
        }
        Some(r) => {
            let sql = "UPDATE replay_redrives SET original_topic = $1, original_partition = $2, original_offset = $3, \
                       event_id = $4, state = $5, claim_token = $6, redrives = $7, claimed_at = $8, produced_at = $9, \
                       produced_partition = $10, produced_offset = $11, same_as_partition = $12, same_as_offset = $13 \
                       WHERE dlq_topic = $14 AND dlq_partition = $15 AND dlq_offset = $16 AND claim_token = $17 AND state = 'producing'";
            with_pool!(db, p => bind_claim(sqlx::query(sql)
                .bind(&r.original_topic)
                .bind(r.original_partition)
                .bind(r.original_offset)
                .bind(r.event_id.as_deref())
                .bind(&r.state)
                .bind(&r.claim_token)
                .bind(r.redrives)
                .bind(r.claimed_at)
                .bind(r.produced_at)
                .bind(r.produced_partition)
                .bind(r.produced_offset)
                .bind(r.same_as.map(|s| s.0))
                .bind(r.same_as.map(|s| s.1)), (dlq_topic, pos, token))
                .execute(p)
                .await
                .map(|r| r.rows_affected()))?
        }
    };
    Ok(n == 1)
}

/// Records a dead letter of the same original message as `primary` as
/// redriven together with it (produced at `produced`), so it is not
/// produced later either. A position that already has a record keeps it
/// (false).
pub async fn record_same_as(
    db: &Db,
    dlq_topic: &str,
    pos: (i64, i64),
    origin: &Origin,
    now: i64,
    primary: (i64, i64),
    produced: (i64, i64),
) -> sqlx::Result<bool> {
    let sql = "INSERT INTO replay_redrives (dlq_topic, dlq_partition, dlq_offset, original_topic, original_partition, original_offset, event_id, \
               state, claim_token, redrives, claimed_at, produced_at, produced_partition, produced_offset, same_as_partition, same_as_offset) \
               VALUES ($1, $2, $3, $4, $5, $6, $7, 'produced', $8, 0, $9, $10, $11, $12, $13, $14) ON CONFLICT DO NOTHING";
    let n = with_pool!(db, p => bind_origin(sqlx::query(sql), dlq_topic, pos, origin)
        .bind(new_token())
        .bind(now)
        .bind(now)
        .bind(produced.0)
        .bind(produced.1)
        .bind(primary.0)
        .bind(primary.1)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "t.dlq";
    const POS: (i64, i64) = (1, 7);

    fn origin(offset: i64) -> Origin {
        Origin {
            topic: "t.payments".into(),
            partition: Some(0),
            offset: Some(offset),
            event_id: Some("e-1".into()),
        }
    }

    async fn dbs() -> Vec<(Db, Option<tempfile::TempDir>)> {
        let pg = testkit::fresh_postgres().await.unwrap();
        let (lite, dir) = testkit::fresh_sqlite().await.unwrap();
        let mut v = vec![(pg, None), (lite, Some(dir))];
        for (db, _) in &mut v {
            crate::migrate(db).await.unwrap();
        }
        v
    }

    /// A fresh claim whose produce failed goes away; one that produced is
    /// recorded, and its token is required.
    #[tokio::test]
    async fn claim_release_and_mark_produced() {
        for (db, _dir) in dbs().await {
            let a = new_token();
            assert!(claim_new(&db, T, POS, &origin(5), 10, &a).await.unwrap());
            assert!(
                !claim_new(&db, T, POS, &origin(5), 11, &new_token())
                    .await
                    .unwrap(),
                "a second claim of the same position fails"
            );
            assert!(
                !release(&db, T, POS, "not-the-token", None).await.unwrap(),
                "a release needs the claim's token"
            );
            assert!(get(&db, T, POS).await.unwrap().is_some());
            assert!(release(&db, T, POS, &a, None).await.unwrap());
            assert_eq!(get(&db, T, POS).await.unwrap(), None);

            let b = new_token();
            assert!(claim_new(&db, T, POS, &origin(5), 20, &b).await.unwrap());
            let err = mark_produced(&db, T, POS, &a, 21, (0, 99))
                .await
                .unwrap_err();
            assert!(format!("{err:#}").contains("taken over"), "{err:#}");
            mark_produced(&db, T, POS, &b, 22, (0, 100)).await.unwrap();
            let r = get(&db, T, POS).await.unwrap().unwrap();
            assert!(r.produced());
            assert_eq!((r.redrives, r.produced_at), (1, Some(22)));
            assert_eq!(
                (r.produced_partition, r.produced_offset),
                (Some(0), Some(100))
            );
            // Recorded once: marking it again fails (no longer producing).
            assert!(mark_produced(&db, T, POS, &b, 23, (0, 101)).await.is_err());
            assert!(!release(&db, T, POS, &b, None).await.unwrap());
            assert!(get(&db, T, POS).await.unwrap().unwrap().produced());
        }
    }

    /// --force over a row that names another message, then a failed
    /// produce: the row is exactly what it was (finding: stale values
    /// marked as produced).
    #[tokio::test]
    async fn forced_claim_over_a_mismatch_is_restored_exactly() {
        for (db, _dir) in dbs().await {
            let a = new_token();
            assert!(claim_new(&db, T, POS, &origin(5), 10, &a).await.unwrap());
            mark_produced(&db, T, POS, &a, 11, (0, 50)).await.unwrap();
            let before = get(&db, T, POS).await.unwrap().unwrap();

            let f = new_token();
            let prev = claim_forced(&db, T, POS, &origin(6), 20, &f).await.unwrap();
            assert_eq!(prev.as_ref(), Some(&before));
            let claimed = get(&db, T, POS).await.unwrap().unwrap();
            assert_eq!(
                (claimed.original_offset, claimed.state.as_str()),
                (Some(6), "producing")
            );
            assert!(release(&db, T, POS, &f, prev.as_ref()).await.unwrap());
            assert_eq!(get(&db, T, POS).await.unwrap().unwrap(), before);

            // Forced again, produced this time: describes the new message.
            let g = new_token();
            let prev = claim_forced(&db, T, POS, &origin(6), 30, &g).await.unwrap();
            assert_eq!(prev.as_ref(), Some(&before));
            mark_produced(&db, T, POS, &g, 31, (0, 60)).await.unwrap();
            let r = get(&db, T, POS).await.unwrap().unwrap();
            assert_eq!((r.original_offset, r.redrives), (Some(6), 2));
            assert_eq!(r.produced_offset, Some(60));
        }
    }

    /// --force over a row in doubt, then a failed produce: still in doubt
    /// (the row is not deleted).
    #[tokio::test]
    async fn forced_claim_over_an_in_doubt_row_stays_in_doubt() {
        for (db, _dir) in dbs().await {
            let crashed = new_token();
            assert!(
                claim_new(&db, T, POS, &origin(5), 10, &crashed)
                    .await
                    .unwrap()
            );
            let in_doubt = get(&db, T, POS).await.unwrap().unwrap();
            assert!(!in_doubt.produced());

            let f = new_token();
            let prev = claim_forced(&db, T, POS, &origin(5), 20, &f).await.unwrap();
            assert_eq!(prev.as_ref(), Some(&in_doubt));
            assert!(release(&db, T, POS, &f, prev.as_ref()).await.unwrap());
            assert_eq!(get(&db, T, POS).await.unwrap(), Some(in_doubt.clone()));
            let load = load(&db, T).await.unwrap();
            assert_eq!(load.get(&POS), Some(&in_doubt));
        }
    }

    /// Operator A claims a new position, B forces it meanwhile: A's
    /// release and A's record both leave B's claim alone, B records its
    /// produce.
    #[tokio::test]
    async fn a_lost_claim_touches_nothing() {
        for (db, _dir) in dbs().await {
            let a = new_token();
            assert!(claim_new(&db, T, POS, &origin(5), 10, &a).await.unwrap());
            let b = new_token();
            let prev = claim_forced(&db, T, POS, &origin(5), 11, &b).await.unwrap();
            assert_eq!(prev.map(|r| r.claim_token), Some(a.clone()));

            assert!(
                !release(&db, T, POS, &a, None).await.unwrap(),
                "A's release does not delete B's claim"
            );
            let r = get(&db, T, POS).await.unwrap().unwrap();
            assert_eq!(
                (r.claim_token.as_str(), r.state.as_str()),
                (b.as_str(), "producing")
            );
            let err = mark_produced(&db, T, POS, &a, 12, (0, 1))
                .await
                .unwrap_err();
            assert!(format!("{err:#}").contains("taken over"), "{err:#}");

            mark_produced(&db, T, POS, &b, 13, (0, 2)).await.unwrap();
            let r = get(&db, T, POS).await.unwrap().unwrap();
            assert_eq!((r.state.as_str(), r.produced_offset), ("produced", Some(2)));
        }
    }

    /// Another group's dead letter of the same message, recorded with the
    /// one produced; an existing record is kept.
    #[tokio::test]
    async fn same_message_is_recorded_with_its_primary() {
        for (db, _dir) in dbs().await {
            let sib = (1, 8);
            assert!(
                record_same_as(&db, T, sib, &origin(5), 10, POS, (0, 70))
                    .await
                    .unwrap()
            );
            let r = get(&db, T, sib).await.unwrap().unwrap();
            assert!(r.produced());
            assert_eq!((r.same_as, r.produced_offset), (Some(POS), Some(70)));
            assert!(
                !record_same_as(&db, T, sib, &origin(5), 11, (1, 9), (0, 71))
                    .await
                    .unwrap()
            );
            assert_eq!(get(&db, T, sib).await.unwrap(), Some(r));
        }
    }
}
