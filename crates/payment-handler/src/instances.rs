//! Which handler instance holds an Idempotency-Key, and whether it is
//! alive.
//!
//! Every handler process has an instance id; the owner token of each key it
//! claims starts with it (`<instance>.<random>`), and the process writes a
//! heartbeat every second to `handler_instances`. A retry that finds the key
//! in flight takes it over at once when the holder's heartbeat is older
//! than [`DEAD_AFTER_MS`] (the holder was killed; its restart, or any other
//! instance, answers within seconds instead of after the lease), and waits
//! otherwise: the lease stays the guard against a live but slow holder. A
//! takeover is as safe as one after the lease: it is a compare-and-set on
//! the owner and the stored events, a decided key is re-appended and never
//! decided again, and the old owner's later writes fail on its token.

use std::sync::OnceLock;
use std::time::Duration;
use storage::{Db, with_pool};

/// A holder silent this long is dead.
pub const DEAD_AFTER_MS: i64 = 5_000;
/// How often a running handler writes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// This process's instance id (one per process: every handler started in
/// it heartbeats for it).
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::now_v7().simple().to_string())
}

/// A new owner token of this instance.
pub fn new_owner_token() -> String {
    format!("{}.{}", instance_id(), uuid::Uuid::new_v4().simple())
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

/// Records that this instance is alive now.
pub async fn heartbeat(db: &Db) -> Result<(), sqlx::Error> {
    let now = now_ms();
    with_pool!(db, p => sqlx::query(
        "INSERT INTO handler_instances (instance_id, heartbeat_ms) VALUES ($1, $2) \
         ON CONFLICT (instance_id) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms",
    ).bind(instance_id()).bind(now).execute(p).await?.rows_affected());
    Ok(())
}

/// Marks this instance stopped (a clean shutdown): keys it still holds
/// can be taken over at once.
pub async fn stopped(db: &Db) -> Result<(), sqlx::Error> {
    with_pool!(db, p => sqlx::query("UPDATE handler_instances SET heartbeat_ms = 0 WHERE instance_id = $1")
        .bind(instance_id()).execute(p).await?.rows_affected());
    Ok(())
}

/// Whether the instance that issued `owner` is known to be dead. Tokens
/// without an instance (from before this table) and instances never seen
/// are not: their keys wait out the lease as before.
pub async fn holder_is_dead(db: &Db, owner: Option<&str>) -> Result<bool, sqlx::Error> {
    let Some((instance, _)) = owner.and_then(|o| o.split_once('.')) else {
        return Ok(false);
    };
    let beat: Option<i64> = with_pool!(db, p => sqlx::query_scalar(
        "SELECT heartbeat_ms FROM handler_instances WHERE instance_id = $1",
    ).bind(instance).fetch_optional(p).await?);
    Ok(beat.is_some_and(|b| b < now_ms() - DEAD_AFTER_MS))
}

/// Writes the heartbeat every second until `shutdown`, then marks the
/// instance stopped. Failures are logged and retried (a database outage
/// makes the instance look dead to others, which only lets them take keys
/// over safely).
pub async fn run_heartbeat(db: Db, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        if let Err(e) = heartbeat(&db).await {
            tracing::warn!(error = %e, "writing the instance heartbeat failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
        }
    }
    if let Err(e) = stopped(&db).await {
        tracing::warn!(error = %e, "marking the instance stopped failed");
    }
}
