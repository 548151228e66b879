//! The handler's SQL: API clients, idempotency keys, the payment-status
//! projection and the velocity window. One SQL string per statement serves
//! PostgreSQL and SQLite (see `storage::with_pool!`).

use events::{ClientId, Envelope, Event, PaymentId};
use sha2::{Digest, Sha256};
use storage::BeginWrite;
use storage::{Db, with_pool};
use streaming::Outcome;

/// One set of migrations for both backends: the handler's SQL is written in
/// their common dialect (TEXT ids, BIGINT times, no backend-only types).
pub async fn migrate(db: &Db) -> Result<(), storage::StorageError> {
    let m = storage::component_migrator(sqlx::migrate!());
    db.migrate(&m, &m).await
}

pub fn now_ms() -> i64 {
    events::Timestamp::now().as_millis()
}

// ---------------------------------------------------------------- clients

/// A new API key, shown once: `psk_<key id>_<secret>`. Only the SHA-256 of
/// the secret is stored; the secret is 256 random bits, so a plain hash is
/// enough (no password stretching needed).
pub async fn create_client(db: &Db, client: &ClientId) -> Result<String, sqlx::Error> {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let mut key_id = [0u8; 8];
    rand::rng().fill_bytes(&mut key_id);
    let (secret, key_id) = (hex::encode(secret), hex::encode(key_id));
    let digest = hex::encode(Sha256::digest(secret.as_bytes()));
    let now = now_ms();
    with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        sqlx::query("INSERT INTO handler_clients (client_id, created_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(client.as_str()).bind(now).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO handler_api_keys (key_id, client_id, secret_sha256, created_ms) VALUES ($1, $2, $3, $4)")
            .bind(&key_id).bind(client.as_str()).bind(&digest).bind(now).execute(&mut *tx).await?;
        tx.commit().await?;
    });
    Ok(format!("psk_{key_id}_{secret}"))
}

/// `psk_<key id>_<secret>` → (key id, secret); `None` for anything else.
pub fn split_api_key(token: &str) -> Option<(&str, &str)> {
    token.strip_prefix("psk_")?.split_once('_')
}

/// Whether `secret` is the one whose SHA-256 (hex) is stored, compared in
/// constant time (no early exit on the first differing byte).
pub fn secret_matches(secret: &str, stored_sha256_hex: &str) -> bool {
    let given = hex::encode(Sha256::digest(secret.as_bytes()));
    runtime::secret::constant_time_eq(given.as_bytes(), stored_sha256_hex.as_bytes())
}

/// The client an API key belongs to, if the key is valid and not revoked.
pub async fn authenticate(db: &Db, token: &str) -> Result<Option<ClientId>, sqlx::Error> {
    let Some((key_id, secret)) = split_api_key(token) else {
        return Ok(None);
    };
    let row: Option<(String, String)> = with_pool!(db, p => sqlx::query_as(
        "SELECT client_id, secret_sha256 FROM handler_api_keys WHERE key_id = $1 AND revoked_ms IS NULL",
    ).bind(key_id).fetch_optional(p).await?);
    let Some((client, stored)) = row else {
        return Ok(None);
    };
    Ok(if secret_matches(secret, &stored) {
        ClientId::parse(&client).ok()
    } else {
        None
    })
}

/// The inbound signing key of an API key that is not revoked: (its client,
/// the SHA-256 of its secret, which is the HMAC key of inbound messages
/// signed with it; see `inbound::sign`).
pub async fn inbound_signing_key(
    db: &Db,
    key_id: &str,
) -> Result<Option<(String, [u8; 32])>, sqlx::Error> {
    let row: Option<(String, String)> = with_pool!(db, p => sqlx::query_as(
        "SELECT client_id, secret_sha256 FROM handler_api_keys WHERE key_id = $1 AND revoked_ms IS NULL",
    ).bind(key_id).fetch_optional(p).await?);
    Ok(row.and_then(|(client, digest)| {
        let bytes: [u8; 32] = hex::decode(digest).ok()?.try_into().ok()?;
        Some((client, bytes))
    }))
}

pub async fn client_exists(db: &Db, client: &ClientId) -> Result<bool, sqlx::Error> {
    let n: i64 = with_pool!(db, p => sqlx::query_scalar("SELECT count(*) FROM handler_clients WHERE client_id = $1")
        .bind(client.as_str()).fetch_one(p).await?);
    Ok(n > 0)
}

/// What an API key may do (column `handler_api_keys.role`, migration 1020).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// Acts for its client; reads only that client's data.
    Client,
    /// Ledger-wide reads and `/v1/ledger/verify` on the projections' API.
    Operator,
}

impl KeyRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyRole::Client => "client",
            KeyRole::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Option<KeyRole> {
        match s {
            "client" => Some(KeyRole::Client),
            "operator" => Some(KeyRole::Operator),
            _ => None,
        }
    }
}

/// Like [`create_client`], with the new key's role.
pub async fn create_client_with_role(
    db: &Db,
    client: &ClientId,
    role: KeyRole,
) -> Result<String, sqlx::Error> {
    let key = create_client(db, client).await?;
    let key_id = split_api_key(&key)
        .map(|(id, _)| id.to_owned())
        .expect("create_client returns psk_<key id>_<secret>");
    with_pool!(db, p => sqlx::query("UPDATE handler_api_keys SET role = $1 WHERE key_id = $2")
        .bind(role.as_str()).bind(&key_id).execute(p).await.map(drop)?);
    Ok(key)
}

/// One API key as `paystream clients list` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: String,
    pub client_id: String,
    pub role: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// Every API key, by client then creation.
pub async fn list_keys(db: &Db) -> Result<Vec<KeyInfo>, sqlx::Error> {
    let rows: Vec<(String, String, String, i64, Option<i64>)> = with_pool!(db, p => sqlx::query_as(
        "SELECT key_id, client_id, role, created_ms, revoked_ms FROM handler_api_keys ORDER BY client_id, created_ms, key_id",
    ).fetch_all(p).await?);
    Ok(rows
        .into_iter()
        .map(
            |(key_id, client_id, role, created_ms, revoked_ms)| KeyInfo {
                key_id,
                client_id,
                role,
                created_ms,
                revoked_ms,
            },
        )
        .collect())
}

/// Revokes one key (by its id, the part after `psk_`); returns whether a
/// key that was not yet revoked is revoked now.
pub async fn revoke_key(db: &Db, key_id: &str) -> Result<bool, sqlx::Error> {
    let n = with_pool!(db, p => sqlx::query("UPDATE handler_api_keys SET revoked_ms = $1 WHERE key_id = $2 AND revoked_ms IS NULL")
        .bind(now_ms()).bind(key_id).execute(p).await?.rows_affected());
    Ok(n > 0)
}

/// Revokes every key of `client` not yet revoked; returns how many.
pub async fn revoke_client_keys(db: &Db, client: &ClientId) -> Result<u64, sqlx::Error> {
    Ok(
        with_pool!(db, p => sqlx::query("UPDATE handler_api_keys SET revoked_ms = $1 WHERE client_id = $2 AND revoked_ms IS NULL")
        .bind(now_ms()).bind(client.as_str()).execute(p).await?.rows_affected()),
    )
}

// ------------------------------------------------------------ idempotency

/// What a new request with an Idempotency-Key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// This request owns the key (until its lease runs out): process it,
    /// then `idem_finish` or `idem_release` with this token. `pending` holds
    /// the events an earlier owner decided on and may have appended: a new
    /// owner re-appends exactly those and never decides again.
    Owned {
        token: String,
        pending: Option<String>,
    },
    /// The key finished before: answer with the stored response.
    Replay { status: u16, body: String },
    /// The key was used with a different request.
    Mismatch,
    /// The key's idempotency row is gone (past its retention) but the same
    /// request was decided under it before: answer with the current view of
    /// what it created (`kind` "payment" or "refund", `resource` its id),
    /// never decide again.
    Decided { kind: String, resource: String },
    /// Another request with this key is being processed right now.
    InFlight { retry_after_s: u64 },
}

#[derive(Debug, Clone, Copy)]
pub struct IdempotencyPolicy {
    /// How long a request may hold a key before a retry may take it over
    /// (the holder is presumed dead). Longer than any request can take.
    pub lease_ms: i64,
    /// How long a finished key is kept (and replayed).
    pub retention_ms: i64,
}

type IdemRow = (
    String,
    String,
    i64,
    Option<i32>,
    Option<String>,
    i64,
    Option<String>,
    Option<String>,
);

fn new_token() -> String {
    // `<instance>.<random>`: a retry can tell whether the holder is alive.
    crate::instances::new_owner_token()
}

pub async fn idem_begin(
    db: &Db,
    client: &ClientId,
    key: &str,
    fingerprint: &str,
    policy: IdempotencyPolicy,
) -> Result<Begin, sqlx::Error> {
    let now = now_ms();
    for _ in 0..3 {
        let token = new_token();
        let inserted = with_pool!(db, p => sqlx::query(
            "INSERT INTO handler_idempotency_keys (client_id, idem_key, request_sha256, state, lease_until_ms, created_ms, expires_ms, owner) \
             VALUES ($1, $2, $3, 'in_flight', $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(client.as_str()).bind(key).bind(fingerprint).bind(now + policy.lease_ms).bind(now).bind(now + policy.retention_ms).bind(&token)
        .execute(p).await?.rows_affected());
        if inserted == 1 {
            // A fresh row: the key is new, or its old row was reaped after
            // the retention. In the second case a decision was made under it
            // before and is kept for good: never decide again (H1).
            let decided: Option<(String, String, String)> = with_pool!(db, p => sqlx::query_as(
                "SELECT request_sha256, kind, resource_id FROM handler_request_fingerprints WHERE client_id = $1 AND idem_key = $2",
            ).bind(client.as_str()).bind(key).fetch_optional(p).await?);
            if let Some((fp, kind, resource)) = decided {
                with_pool!(db, p => sqlx::query(
                    "DELETE FROM handler_idempotency_keys WHERE client_id = $1 AND idem_key = $2 AND owner = $3 \
                     AND state = 'in_flight' AND pending_events IS NULL",
                ).bind(client.as_str()).bind(key).bind(&token).execute(p).await?.rows_affected());
                return Ok(if fp == fingerprint {
                    Begin::Decided { kind, resource }
                } else {
                    Begin::Mismatch
                });
            }
            return Ok(Begin::Owned {
                token,
                pending: None,
            });
        }
        let row: Option<IdemRow> = with_pool!(db, p => sqlx::query_as(
            "SELECT request_sha256, state, lease_until_ms, response_status, response_body, expires_ms, pending_events, owner \
             FROM handler_idempotency_keys WHERE client_id = $1 AND idem_key = $2",
        ).bind(client.as_str()).bind(key).fetch_optional(p).await?);
        let Some((fp, state, lease_until, status, body, expires, pending, old_owner)) = row else {
            continue; // reaped in between: insert again
        };
        if expires < now && (state == "done" || lease_until < now) {
            // Expired and nobody is working on it: it no longer counts. The
            // same condition as the reaper's, so a live request keeps its key.
            with_pool!(db, p => sqlx::query(
                "DELETE FROM handler_idempotency_keys WHERE client_id = $1 AND idem_key = $2 AND expires_ms < $3 \
                 AND (state = 'done' OR lease_until_ms < $3)",
            ).bind(client.as_str()).bind(key).bind(now).execute(p).await?.rows_affected());
            continue;
        }
        if fp != fingerprint {
            return Ok(Begin::Mismatch);
        }
        if state == "done" {
            let status = status.and_then(|s| u16::try_from(s).ok()).unwrap_or(500);
            return Ok(Begin::Replay {
                status,
                body: body.unwrap_or_default(),
            });
        }
        // A live holder keeps its key until the lease ends; a dead one
        // (killed: its instance's heartbeat stopped) loses it at once, so
        // its keys are answered within seconds of a restart.
        if lease_until > now && !crate::instances::holder_is_dead(db, old_owner.as_deref()).await? {
            // The holder is alive and heartbeating: come back soon.
            let secs = u64::try_from((lease_until - now + 999) / 1000)
                .unwrap_or(1)
                .clamp(1, 2);
            return Ok(Begin::InFlight {
                retry_after_s: secs,
            });
        }
        // The holder's lease ran out (it died, or gave up after appending):
        // take the key over, once, with a new token.
        let seen = Seen {
            lease_until,
            owner: old_owner,
            pending,
        };
        return Ok(
            match idem_take_over(db, client, key, policy, &seen).await? {
                Some(token) => {
                    tracing::warn!(client = %client, "idempotency key taken over: its holder's lease expired or the holder died");
                    Begin::Owned {
                        token,
                        pending: seen.pending,
                    }
                }
                None => Begin::InFlight { retry_after_s: 1 },
            },
        );
    }
    Ok(Begin::InFlight { retry_after_s: 1 })
}

/// What a request read of a key row it may take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub lease_until: i64,
    pub owner: Option<String>,
    pub pending: Option<String>,
}

/// The (lease, owner, decided events) of a key row, if it exists.
pub async fn idem_seen(db: &Db, client: &ClientId, key: &str) -> Result<Option<Seen>, sqlx::Error> {
    let row: Option<(i64, Option<String>, Option<String>)> = with_pool!(db, p => sqlx::query_as(
        "SELECT lease_until_ms, owner, pending_events FROM handler_idempotency_keys WHERE client_id = $1 AND idem_key = $2",
    ).bind(client.as_str()).bind(key).fetch_optional(p).await?);
    Ok(row.map(|(lease_until, owner, pending)| Seen {
        lease_until,
        owner,
        pending,
    }))
}

/// Takes an in-flight key over with a new token, only if the row is still
/// what `seen` read (L1): the same lease, the same holder and the same
/// decided events. Otherwise the old holder stored its decision in between,
/// and taking over with the stale `pending = None` would decide again.
/// Returns the new owner token if taken.
pub async fn idem_take_over(
    db: &Db,
    client: &ClientId,
    key: &str,
    policy: IdempotencyPolicy,
    seen: &Seen,
) -> Result<Option<String>, sqlx::Error> {
    let now = now_ms();
    let token = new_token();
    let took = with_pool!(db, p => sqlx::query(
        "UPDATE handler_idempotency_keys SET lease_until_ms = $1, owner = $2, expires_ms = $3 \
         WHERE client_id = $4 AND idem_key = $5 AND state = 'in_flight' AND lease_until_ms = $6 \
         AND owner IS NOT DISTINCT FROM $7 AND pending_events IS NOT DISTINCT FROM $8",
    ).bind(now + policy.lease_ms).bind(&token).bind(now + policy.lease_ms + policy.retention_ms)
    .bind(client.as_str()).bind(key).bind(seen.lease_until).bind(&seen.owner).bind(&seen.pending).execute(p).await?.rows_affected());
    Ok((took == 1).then_some(token))
}

/// The owner lost the key (its lease ran out and another request took it).
#[derive(Debug, thiserror::Error)]
pub enum IdemError {
    #[error("this request no longer owns its Idempotency-Key")]
    NotOwner,
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

fn owned(rows: u64) -> Result<(), IdemError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(IdemError::NotOwner)
    }
}

/// Keeps the request's fingerprint for good (`handler_request_fingerprints`)
/// once it decided something under its key, in the caller's transaction.
pub(crate) const KEEP_FINGERPRINT: &str = "INSERT INTO handler_request_fingerprints (client_id, idem_key, request_sha256, kind, resource_id, created_ms) \
     SELECT client_id, idem_key, request_sha256, $1, $2, $3 FROM handler_idempotency_keys \
     WHERE client_id = $4 AND idem_key = $5 AND owner = $6 AND state = 'in_flight' \
     ON CONFLICT DO NOTHING";

/// Records the events the owner decided on, before it appends them, and
/// keeps the request's fingerprint for as long as the payment exists.
pub async fn idem_store_pending(
    db: &Db,
    client: &ClientId,
    key: &str,
    token: &str,
    events: &str,
    payment: PaymentId,
) -> Result<(), IdemError> {
    with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        let n = sqlx::query(
            "UPDATE handler_idempotency_keys SET pending_events = $1 \
             WHERE client_id = $2 AND idem_key = $3 AND owner = $4 AND state = 'in_flight'",
        ).bind(events).bind(client.as_str()).bind(key).bind(token).execute(&mut *tx).await?.rows_affected();
        owned(n)?;
        sqlx::query(KEEP_FINGERPRINT).bind("payment").bind(payment.to_string()).bind(now_ms())
            .bind(client.as_str()).bind(key).bind(token).execute(&mut *tx).await?;
        tx.commit().await?;
    });
    Ok(())
}

/// Stores the final response; later requests with the key replay it.
pub async fn idem_finish(
    db: &Db,
    client: &ClientId,
    key: &str,
    token: &str,
    status: u16,
    body: &str,
) -> Result<(), IdemError> {
    owned(with_pool!(db, p => sqlx::query(
        "UPDATE handler_idempotency_keys SET state = 'done', response_status = $1, response_body = $2 \
         WHERE client_id = $3 AND idem_key = $4 AND owner = $5 AND state = 'in_flight'",
    ).bind(i32::from(status)).bind(body).bind(client.as_str()).bind(key).bind(token).execute(p).await?.rows_affected()))
}

/// Gives the key up after a failure that is not the client's (broker or
/// database unavailable). If nothing was decided yet the key is deleted and
/// a retry starts afresh; if events were decided (and maybe appended), the
/// lease ends now so a retry takes over at once and re-appends them.
pub async fn idem_release(
    db: &Db,
    client: &ClientId,
    key: &str,
    token: &str,
) -> Result<(), sqlx::Error> {
    with_pool!(db, p => {
        sqlx::query(
            "DELETE FROM handler_idempotency_keys WHERE client_id = $1 AND idem_key = $2 AND owner = $3 \
             AND state = 'in_flight' AND pending_events IS NULL",
        ).bind(client.as_str()).bind(key).bind(token).execute(p).await?;
        sqlx::query(
            "UPDATE handler_idempotency_keys SET lease_until_ms = 0 WHERE client_id = $1 AND idem_key = $2 AND owner = $3 AND state = 'in_flight'",
        ).bind(client.as_str()).bind(key).bind(token).execute(p).await?.rows_affected()
    });
    Ok(())
}

/// Atomically reserves `amount` of a succeeded order for a refund, records
/// the refund as requested, and stores the decided events under the key,
/// all in one transaction. `Ok(false)`: not enough left to refund.
#[allow(clippy::too_many_arguments)]
pub async fn reserve_refund(
    db: &Db,
    client: &ClientId,
    key: &str,
    token: &str,
    refund: &events::RefundRequested,
    payment: &str,
    occurred_us: i64,
    pending_events: &str,
) -> Result<bool, IdemError> {
    let amount = refund.amount.amount_minor();
    with_pool!(db, p => {
        let mut tx = p.begin_write().await.map_err(IdemError::Sql)?;
        // One statement: on PostgreSQL the row lock makes a concurrent
        // reservation re-check the condition; SQLite runs writers one at a time.
        let reserved = sqlx::query(
            "UPDATE handler_payment_orders SET reserved_minor = reserved_minor + $1 \
             WHERE order_id = $2 AND payment_id = $3 AND status = 'succeeded' AND amount_minor - reserved_minor >= $1",
        ).bind(amount).bind(refund.order_id.to_string()).bind(payment).execute(&mut *tx).await?.rows_affected();
        if reserved == 0 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO handler_refunds (refund_id, order_id, payment_id, amount_minor, currency, status, reason, created_us, updated_us) \
             VALUES ($1, $2, $3, $4, $5, 'requested', $6, $7, $7)",
        ).bind(refund.refund_id.to_string()).bind(refund.order_id.to_string()).bind(payment).bind(amount)
        .bind(refund.amount.currency().code()).bind(&refund.reason).bind(occurred_us).execute(&mut *tx).await?;
        let stored = sqlx::query(
            "UPDATE handler_idempotency_keys SET pending_events = $1 WHERE client_id = $2 AND idem_key = $3 AND owner = $4 AND state = 'in_flight'",
        ).bind(pending_events).bind(client.as_str()).bind(key).bind(token).execute(&mut *tx).await?.rows_affected();
        owned(stored)?;
        sqlx::query(KEEP_FINGERPRINT).bind("refund").bind(refund.refund_id.to_string()).bind(now_ms())
            .bind(client.as_str()).bind(key).bind(token).execute(&mut *tx).await?;
        tx.commit().await?;
    });
    Ok(true)
}

/// Keys whose owner decided (and maybe appended) events but neither
/// finished nor was retried: (client, key, pending events). Their events
/// are re-appended by the sweeper so nothing decided is ever lost.
pub async fn idem_abandoned(
    db: &Db,
    limit: i64,
) -> Result<Vec<(String, String, i64, String)>, sqlx::Error> {
    let now = now_ms();
    Ok(with_pool!(db, p => sqlx::query_as(
        "SELECT client_id, idem_key, lease_until_ms, pending_events FROM handler_idempotency_keys \
         WHERE state = 'in_flight' AND pending_events IS NOT NULL AND lease_until_ms >= 0 AND lease_until_ms < $1 \
         ORDER BY lease_until_ms LIMIT $2",
    ).bind(now).bind(limit).fetch_all(p).await?))
}

/// Marks an abandoned key's events as re-appended (lease -1: still open for
/// the client's retry to take over and answer, but not swept again).
pub async fn idem_mark_swept(
    db: &Db,
    client: &str,
    key: &str,
    lease_until: i64,
) -> Result<bool, sqlx::Error> {
    Ok(with_pool!(db, p => sqlx::query(
        "UPDATE handler_idempotency_keys SET lease_until_ms = -1 \
         WHERE client_id = $1 AND idem_key = $2 AND state = 'in_flight' AND lease_until_ms = $3",
    ).bind(client).bind(key).bind(lease_until).execute(p).await?.rows_affected() == 1))
}

/// Deletes expired keys; returns how many.
pub async fn idem_reap(db: &Db) -> Result<u64, sqlx::Error> {
    let now = now_ms();
    Ok(with_pool!(db, p => sqlx::query(
        "DELETE FROM handler_idempotency_keys WHERE expires_ms < $1 AND (state = 'done' OR lease_until_ms < $1) \
         AND (state = 'done' OR pending_events IS NULL OR lease_until_ms = -1)",
    ).bind(now).execute(p).await?.rows_affected()))
}

// ---------------------------------------------------------------- velocity

/// Counts a payment in its buyer's velocity window before its risk decision,
/// so concurrent payments of one buyer see each other (the check fails
/// closed: two racing payments at the limit may both be rejected, never
/// both approved). Idempotent per payment. Buyers are per client: the same
/// buyer id of two clients is two buyers.
pub async fn note_velocity(
    db: &Db,
    client: &ClientId,
    payment: PaymentId,
    buyer: &str,
    currency: &str,
    amount_minor: i64,
) -> Result<(), sqlx::Error> {
    with_pool!(db, p => sqlx::query(
        "INSERT INTO handler_risk_velocity (payment_id, client_id, buyer_id, currency, amount_minor, at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    ).bind(payment.to_string()).bind(client.as_str()).bind(buyer).bind(currency).bind(amount_minor).bind(now_ms()).execute(p).await?.rows_affected());
    Ok(())
}

/// Deletes the velocity rows older than `before_ms` (review L8): the
/// reaper passes now minus the risk rules' velocity window, so the table
/// holds one window of payments instead of growing forever. (A window made
/// longer at a restart counts only what is left until it fills again.)
pub async fn velocity_prune(db: &Db, before_ms: i64) -> Result<u64, sqlx::Error> {
    Ok(
        with_pool!(db, p => sqlx::query("DELETE FROM handler_risk_velocity WHERE at_ms < $1")
        .bind(before_ms).execute(p).await?.rows_affected()),
    )
}

/// (number of payments, sum in `currency`) of a client's buyer since
/// `since_ms`, not counting `exclude` (the payment being decided, on a
/// retry). The sum cannot overflow: it adds at most
/// `limits::VELOCITY_COUNT_MAX` amounts of at most `Money::MAX_MINOR` each
/// (the count rule, checked first, rejects any buyer with more payments).
pub async fn recent_activity(
    db: &Db,
    client: &ClientId,
    buyer: &str,
    currency: &str,
    since_ms: i64,
    exclude: PaymentId,
) -> Result<(i64, i64), sqlx::Error> {
    Ok(with_pool!(db, p => sqlx::query_as(RECENT_ACTIVITY)
        .bind(client.as_str()).bind(buyer).bind(currency).bind(since_ms).bind(exclude.to_string())
        .bind(events::Money::MAX_MINOR).bind(i64::from(crate::limits::VELOCITY_COUNT_MAX)).fetch_one(p).await?))
}

/// `recent_activity`'s query: $1 client, $2 buyer, $3 currency, $4 since,
/// $5 the payment excluded, $6 the amount cap, $7 the row limit.
pub(crate) const RECENT_ACTIVITY: &str = "SELECT (SELECT count(*) FROM handler_risk_velocity \
                 WHERE client_id = $1 AND buyer_id = $2 AND at_ms >= $4 AND payment_id <> $5), \
                (SELECT CAST(COALESCE(SUM(a), 0) AS BIGINT) FROM ( \
                   SELECT CASE WHEN amount_minor > $6 THEN $6 ELSE amount_minor END AS a FROM handler_risk_velocity \
                   WHERE client_id = $1 AND buyer_id = $2 AND currency = $3 AND at_ms >= $4 AND payment_id <> $5 LIMIT $7) v)";

// ------------------------------------------------------ status projection

/// Applies events to the payment-status projection in one transaction,
/// deduplicated by event id. Returns one outcome per event.
pub async fn apply_status(db: &Db, events: &[&Envelope]) -> Result<Vec<Outcome>, sqlx::Error> {
    apply_status_and_finish(db, events, &[])
        .await
        .map(|(outcomes, _)| outcomes)
}

/// A payment whose `PaymentRequested` and risk decision are both new in a
/// batch: its rows are inserted set-based, already in the state after the
/// risk decision (the same rows the per-event path writes in two steps).
pub(crate) fn decided_rows(
    requested: &Envelope,
    risk: &Envelope,
) -> Option<(
    crate::batch_sql::PaymentRow,
    Vec<crate::batch_sql::OrderRow>,
)> {
    use domain::payment::{PaymentState, apply};
    let Event::PaymentRequested(r) = &requested.event else {
        return None;
    };
    let payment = requested.payment_id?;
    if risk.payment_id != Some(payment) {
        return None;
    }
    let currency = r.orders.first()?.amount.currency().code().to_owned();
    let total = r
        .orders
        .iter()
        .try_fold(0i64, |acc, o| acc.checked_add(o.amount.amount_minor()))?;
    let PaymentState::Live(p) = apply(apply(PaymentState::New, requested), risk) else {
        return None;
    };
    let pid = payment.to_string();
    let (rule, reason) = p.rejection.clone().unzip();
    let row = crate::batch_sql::PaymentRow {
        payment: pid.clone(),
        client: r.client_id.as_str().to_owned(),
        buyer: r.buyer_id.as_str().to_owned(),
        status: p.status.as_str(),
        currency,
        total_minor: total,
        rejection_rule: rule,
        rejection_reason: reason,
        created_us: requested.occurred_at.as_micros(),
        updated_us: risk.occurred_at.as_micros(),
        at_ms: requested.occurred_at.as_millis(),
    };
    let orders = r
        .orders
        .iter()
        .zip(&p.orders)
        .enumerate()
        .map(|(i, (o, (_, status)))| crate::batch_sql::OrderRow {
            order: o.order_id.to_string(),
            payment: pid.clone(),
            position: i32::try_from(i).unwrap_or(i32::MAX),
            seller: o.seller_id.as_str().to_owned(),
            amount_minor: o.amount.amount_minor(),
            currency: o.amount.currency().code().to_owned(),
            status: status.as_str(),
        })
        .collect();
    Some((row, orders))
}

/// The status rows' statements for a `PaymentRequested`, `RiskApproved` or
/// `RiskRejected` applied on its own (not paired with its partner in the
/// batch), on `$tx` of either backend: expanded inside `with_pool!`, in
/// [`apply_status_and_finish`] and in the per-event reference
/// (`status_per_event`), which share them. Evaluates to the refusal, if
/// any; `None` when applied or when `$env` is another event.
macro_rules! apply_request_or_decision {
    ($tx:ident, $env:ident, $pid:ident, $at:ident) => {{
        use domain::payment::{OrderStatus, PaymentStatus};
        'arms: {
            match &$env.event {
                Event::PaymentRequested(r) => {
                    let currency = r.orders.first().map(|o| o.amount.currency().code().to_owned()).unwrap_or_default();
                    let total = r.orders.iter().try_fold(0i64, |acc, o| acc.checked_add(o.amount.amount_minor()));
                    let Some(total) = total else {
                        break 'arms Some(Outcome::rejected("invalid_amount", "orders' total overflows"));
                    };
                    sqlx::query("INSERT INTO handler_payments (payment_id, client_id, buyer_id, status, currency, total_minor, created_us, updated_us) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7) ON CONFLICT DO NOTHING")
                        .bind(&$pid).bind(r.client_id.as_str()).bind(r.buyer_id.as_str()).bind(PaymentStatus::Requested.as_str()).bind(&currency).bind(total).bind($at)
                        .execute(&mut *$tx).await?;
                    for (i, o) in r.orders.iter().enumerate() {
                        sqlx::query("INSERT INTO handler_payment_orders (order_id, payment_id, position, seller_id, amount_minor, currency, status) \
                                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING")
                            .bind(o.order_id.to_string()).bind(&$pid).bind(i32::try_from(i).unwrap_or(i32::MAX)).bind(o.seller_id.as_str())
                            .bind(o.amount.amount_minor()).bind(o.amount.currency().code()).bind(OrderStatus::Requested.as_str())
                            .execute(&mut *$tx).await?;
                    }
                    sqlx::query("INSERT INTO handler_risk_velocity (payment_id, buyer_id, currency, amount_minor, at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
                        .bind(&$pid).bind(r.buyer_id.as_str()).bind(&currency).bind(total).bind($env.occurred_at.as_millis())
                        .execute(&mut *$tx).await?;
                }
                // Compare-and-set on the status the domain's transition
                // starts from (`payment::apply`: risk decisions apply to a
                // requested payment only).
                Event::RiskApproved(_) => {
                    sqlx::query("UPDATE handler_payments SET status = $3, updated_us = $2 WHERE payment_id = $1 AND status = $4")
                        .bind(&$pid).bind($at).bind(PaymentStatus::Processing.as_str()).bind(PaymentStatus::Requested.as_str()).execute(&mut *$tx).await?;
                    sqlx::query("UPDATE handler_payment_orders SET status = $2 WHERE payment_id = $1 AND status = $3")
                        .bind(&$pid).bind(OrderStatus::Pending.as_str()).bind(OrderStatus::Requested.as_str()).execute(&mut *$tx).await?;
                }
                Event::RiskRejected(r) => {
                    sqlx::query("UPDATE handler_payments SET status = $5, rejection_rule = $2, rejection_reason = $3, updated_us = $4 WHERE payment_id = $1 AND status = $6")
                        .bind(&$pid).bind(&r.rule).bind(&r.reason).bind($at).bind(PaymentStatus::Rejected.as_str()).bind(PaymentStatus::Requested.as_str()).execute(&mut *$tx).await?;
                    sqlx::query("UPDATE handler_payment_orders SET status = $2 WHERE payment_id = $1 AND status = $3")
                        .bind(&$pid).bind(OrderStatus::Rejected.as_str()).bind(OrderStatus::Requested.as_str()).execute(&mut *$tx).await?;
                }
                _ => {}
            }
            None
        }
    }};
}
pub(crate) use apply_request_or_decision;

/// [`apply_status`], and in the same transaction the finished answers of
/// the requests whose events these are (the group commit's last step).
/// Returns the outcomes and the keys whose answer was stored (still owned).
///
/// Set-based: one statement records every event id as applied (dedup); a
/// payment decided in this batch (its `PaymentRequested` and risk decision
/// both new here) gets its rows in one statement per table; executor
/// outcomes and refunds are folded in memory in order (`status_fold`) and
/// written with one statement per table for each run of them. Only a
/// `PaymentRequested` or risk decision arriving apart is applied with its
/// own statements, in its place: the run before it is written first.
pub async fn apply_status_and_finish(
    db: &Db,
    events: &[&Envelope],
    finishes: &[crate::batch_sql::FinishRow],
) -> Result<
    (
        Vec<Outcome>,
        std::collections::HashSet<crate::batch_sql::KeyId>,
    ),
    sqlx::Error,
> {
    use crate::batch_sql::BatchSql;
    use std::collections::{HashMap, HashSet};
    let now = now_ms();
    let relevant = |env: &Envelope| {
        !matches!(
            env.event,
            Event::ReconciliationDiscrepancyFound(_)
                | Event::ReconciliationDiscrepancyResolved(_)
                | Event::ReconciliationRunCompleted(_)
        )
    };
    let ids: Vec<String> = events
        .iter()
        .filter(|e| relevant(e))
        .map(|e| e.event_id.to_string())
        .collect();
    let mut outcomes = Vec::with_capacity(events.len());
    let mut finished = HashSet::new();
    with_pool!(db, p => {
        let mut tx = p.begin_write().await?;
        let mut fresh = if ids.is_empty() { HashSet::new() } else { tx.fresh_events(&ids, now).await? };
        // Payments decided in this batch: (requested, risk) both fresh, the
        // request the payment's first fresh event here and the decision
        // the next one (their rows are inserted ahead of every other event:
        // only then is that the order they would have been applied in).
        let mut requested_at: HashMap<PaymentId, usize> = HashMap::new();
        let mut pairs: HashMap<usize, usize> = HashMap::new();
        // Each payment's latest fresh event so far (first occurrences).
        let mut last: HashMap<PaymentId, usize> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::new();
        for (i, env) in events.iter().enumerate() {
            let Some(pay) = env.payment_id else { continue };
            let id = env.event_id.to_string();
            if !relevant(env) || !fresh.contains(&id) || !seen.insert(id) {
                continue;
            }
            match &env.event {
                Event::PaymentRequested(_) if !last.contains_key(&pay) => {
                    requested_at.insert(pay, i);
                }
                Event::RiskApproved(_) | Event::RiskRejected(_) => {
                    if let Some(&r) = requested_at.get(&pay) && last.get(&pay) == Some(&r) {
                        pairs.insert(r, i);
                    }
                }
                _ => {}
            }
            last.insert(pay, i);
        }
        let mut set_based: HashSet<usize> = HashSet::new();
        let (mut pay_rows, mut order_rows) = (Vec::new(), Vec::new());
        for (&r, &k) in &pairs {
            if let Some((row, orders)) = decided_rows(events[r], events[k]) {
                pay_rows.push(row);
                order_rows.extend(orders);
                set_based.insert(r);
                set_based.insert(k);
            }
        }
        tx.insert_payments(&pay_rows, &order_rows).await?;
        // Indices of the executor outcomes and refunds not yet applied.
        let mut run: Vec<usize> = Vec::new();
        for (i, env) in events.iter().enumerate() {
            if !relevant(env) {
                outcomes.push(Outcome::Ignored);
                continue;
            }
            // The first occurrence of a fresh id applies; repeats are duplicates.
            if !fresh.remove(&env.event_id.to_string()) {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            if set_based.contains(&i) {
                outcomes.push(Outcome::Applied);
                continue;
            }
            let Some(payment) = env.payment_id else {
                outcomes.push(Outcome::rejected("missing_payment_id", format!("{} without a payment id", env.event_type())));
                continue;
            };
            if crate::status_fold::folds(&env.event) {
                // Decided when its run is applied (below), in this order.
                run.push(i);
                outcomes.push(Outcome::Applied);
                continue;
            }
            // The arms below read and write SQL directly: the run before
            // them is applied first, so every event sees the rows the
            // events before it left.
            apply_run(&mut *tx, events, &run, &mut outcomes).await?;
            run.clear();
            let pid = payment.to_string();
            let at = env.occurred_at.as_micros();
            // Executor outcomes and refunds are folded (above).
            if let Some(refused) = apply_request_or_decision!(tx, env, pid, at) {
                outcomes.push(refused);
                continue;
            }
            outcomes.push(Outcome::Applied);
        }
        apply_run(&mut *tx, events, &run, &mut outcomes).await?;
        if !finishes.is_empty() {
            finished = tx.finish(finishes).await?;
        }
        tx.commit().await?;
    });
    Ok((outcomes, finished))
}

/// Applies a run of executor outcomes and refunds (`run`: indices into
/// `events`, fresh, in order): reads the rows they touch, folds them in
/// memory (`status_fold::Fold`, one outcome each into `outcomes`), writes
/// what changed with one statement per table.
async fn apply_run<C: crate::batch_sql::BatchSql>(
    conn: &mut C,
    events: &[&Envelope],
    run: &[usize],
    outcomes: &mut [Outcome],
) -> Result<(), sqlx::Error> {
    use crate::status_fold::{Fold, Needs, Overflow};
    if run.is_empty() {
        return Ok(());
    }
    let mut needs = Needs::default();
    for &i in run {
        needs.add(events[i]);
    }
    let list = |s: &std::collections::BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
    let rows = if needs.is_empty() {
        crate::batch_sql::StatusRows::default()
    } else {
        conn.load_status(
            &list(&needs.payments),
            &list(&needs.orders),
            &list(&needs.refunds),
        )
        .await?
    };
    let mut fold = Fold::new(rows.payments, rows.orders, rows.refunds);
    for &i in run {
        match fold.apply(events[i]) {
            Ok(outcome) => outcomes[i] = outcome,
            // Money sums beyond i64: fail the way the per-event statements
            // would have (deterministic, so the consumer narrows the batch
            // down), by letting SQL add them.
            Err(Overflow { a, b }) => {
                return Err(conn.checked_add(a, b).await.err().unwrap_or_else(|| {
                    sqlx::Error::Protocol(format!("payment-status projection: {a} + {b} overflows"))
                }));
            }
        }
    }
    let writes = fold.writes();
    if !writes.is_empty() {
        conn.write_status(&writes).await?;
    }
    Ok(())
}

/// A payment as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PaymentView {
    pub payment_id: String,
    pub status: String,
    pub buyer_id: String,
    pub currency: String,
    pub total_minor: i64,
    pub rejection: Option<Rejection>,
    pub orders: Vec<OrderView>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    pub rule: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OrderView {
    pub order_id: String,
    pub seller_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub psp_reference: Option<String>,
    pub failure_reason: Option<String>,
    pub refunded_minor: i64,
}

type PaymentRow = (
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    i64,
    i64,
);
type OrderRow = (
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
);

/// The payment if it exists and belongs to `client`.
pub async fn get_payment(
    db: &Db,
    payment: &str,
    client: &ClientId,
) -> Result<Option<PaymentView>, sqlx::Error> {
    let row: Option<PaymentRow> = with_pool!(db, p => sqlx::query_as(
        "SELECT payment_id, status, buyer_id, currency, total_minor, rejection_rule, rejection_reason, created_us, updated_us \
         FROM handler_payments WHERE payment_id = $1 AND client_id = $2",
    ).bind(payment).bind(client.as_str()).fetch_optional(p).await?);
    let Some((payment_id, status, buyer_id, currency, total_minor, rule, reason, created, updated)) =
        row
    else {
        return Ok(None);
    };
    let orders: Vec<OrderRow> = with_pool!(db, p => sqlx::query_as(
        "SELECT order_id, seller_id, amount_minor, currency, status, psp_reference, failure_reason, refunded_minor \
         FROM handler_payment_orders WHERE payment_id = $1 ORDER BY position",
    ).bind(payment).fetch_all(p).await?);
    let ts = |us: i64| events::Timestamp::from_micros(us).to_string();
    Ok(Some(PaymentView {
        payment_id,
        status,
        buyer_id,
        currency,
        total_minor,
        rejection: rule.map(|rule| Rejection {
            rule,
            reason: reason.unwrap_or_default(),
        }),
        orders: orders
            .into_iter()
            .map(
                |(
                    order_id,
                    seller_id,
                    amount_minor,
                    currency,
                    status,
                    psp_reference,
                    failure_reason,
                    refunded_minor,
                )| OrderView {
                    order_id,
                    seller_id,
                    amount_minor,
                    currency,
                    status,
                    psp_reference,
                    failure_reason,
                    refunded_minor,
                },
            )
            .collect(),
        created_at: ts(created),
        updated_at: ts(updated),
    }))
}

/// An order's refundable state: (payment's client, status, amount, currency,
/// amount reserved by refunds that have not failed).
pub type RefundableRow = (String, String, i64, String, i64);

pub async fn refundable(
    db: &Db,
    payment: &str,
    order: &str,
) -> Result<Option<RefundableRow>, sqlx::Error> {
    Ok(with_pool!(db, p => sqlx::query_as(
        "SELECT pay.client_id, o.status, o.amount_minor, o.currency, \
                o.reserved_minor \
         FROM handler_payment_orders o JOIN handler_payments pay ON pay.payment_id = o.payment_id \
         WHERE o.payment_id = $1 AND o.order_id = $2",
    ).bind(payment).bind(order).fetch_optional(p).await?))
}

/// A refund as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RefundView {
    pub refund_id: String,
    pub payment_id: String,
    pub order_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub reason: String,
    pub failure: Option<String>,
}

pub async fn get_refund(db: &Db, refund: &str) -> Result<Option<RefundView>, sqlx::Error> {
    type Row = (
        String,
        String,
        String,
        i64,
        String,
        String,
        String,
        Option<String>,
    );
    let row: Option<Row> = with_pool!(db, p => sqlx::query_as(
        "SELECT refund_id, payment_id, order_id, amount_minor, currency, status, reason, failure FROM handler_refunds WHERE refund_id = $1",
    ).bind(refund).fetch_optional(p).await?);
    Ok(row.map(
        |(refund_id, payment_id, order_id, amount_minor, currency, status, reason, failure)| {
            RefundView {
                refund_id,
                payment_id,
                order_id,
                amount_minor,
                currency,
                status,
                reason,
                failure,
            }
        },
    ))
}
