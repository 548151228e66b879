//! The API keys in memory: authenticating a request costs no query of its
//! own.
//!
//! The handler keeps a copy of every key that is not revoked (key id →
//! client and SHA-256 of the secret; never the secret). A request whose key
//! id is in the copy is decided from memory. The copy is reloaded when it is
//! older than [`REFRESH`] (a revocation takes effect within seconds), and
//! when a request names a key id it does not hold: then the request waits
//! for a reload that starts after it arrived (so a key created a moment
//! before works), and reloads are at least [`MISS_RELOAD_MIN`] apart and
//! shared by every request waiting for one (so a flood of made-up keys costs
//! at most a few queries per second, and each such request waits). The
//! copy is as large as the key table (clients × their keys).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use storage::{Db, with_pool};

/// Reload the copy when it is older than this (revocations take effect).
pub const REFRESH: Duration = Duration::from_secs(2);
/// Reloads for unknown key ids are at least this far apart.
pub const MISS_RELOAD_MIN: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct Copy {
    /// key id → (client id, hex SHA-256 of the secret).
    keys: HashMap<String, (String, String)>,
    /// When the query that made this copy started.
    started: Option<Instant>,
}

/// The handler's copy of the API keys.
#[derive(Debug, Default)]
pub struct KeyDirectory {
    copy: RwLock<Arc<Copy>>,
    reload: tokio::sync::Mutex<()>,
    reloads: AtomicU64,
}

impl KeyDirectory {
    /// How often the copy was loaded from the database (all the database
    /// work authentication did).
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> Arc<Copy> {
        self.copy.read().map(|c| Arc::clone(&c)).unwrap_or_default()
    }

    /// Makes sure the copy was loaded by a query that started after
    /// `arrived` (one query for everybody waiting, spaced out).
    async fn reload_after(&self, db: &Db, arrived: Instant) -> Result<(), sqlx::Error> {
        let _one_at_a_time = self.reload.lock().await;
        let last = self.snapshot().started;
        if last.is_some_and(|t| t >= arrived) {
            return Ok(()); // somebody reloaded for us meanwhile
        }
        if let Some(t) = last {
            let since = t.elapsed();
            if since < MISS_RELOAD_MIN {
                tokio::time::sleep(MISS_RELOAD_MIN - since).await;
            }
        }
        let started = Instant::now();
        self.reloads.fetch_add(1, Ordering::Relaxed);
        let rows: Vec<(String, String, String)> = with_pool!(db, p => sqlx::query_as(
            "SELECT key_id, client_id, secret_sha256 FROM handler_api_keys WHERE revoked_ms IS NULL",
        ).fetch_all(p).await?);
        let copy = Copy {
            keys: rows
                .into_iter()
                .map(|(id, client, digest)| (id, (client, digest)))
                .collect(),
            started: Some(started),
        };
        if let Ok(mut c) = self.copy.write() {
            *c = Arc::new(copy);
        }
        Ok(())
    }

    /// The client whose key `token` (`psk_<key id>_<secret>`) is, if it is
    /// a key that is not revoked. Malformed tokens are refused without any
    /// lookup.
    pub async fn authenticate(
        &self,
        db: &Db,
        token: &str,
    ) -> Result<Option<events::ClientId>, sqlx::Error> {
        let Some((key_id, secret)) = crate::store::split_api_key(token) else {
            return Ok(None);
        };
        let arrived = Instant::now();
        let mut copy = self.snapshot();
        if copy.started.is_none_or(|t| t.elapsed() > REFRESH) || !copy.keys.contains_key(key_id) {
            self.reload_after(db, arrived).await?;
            copy = self.snapshot();
        }
        let Some((client, stored)) = copy.keys.get(key_id) else {
            return Ok(None);
        };
        Ok(if crate::store::secret_matches(secret, stored) {
            events::ClientId::parse(client).ok()
        } else {
            None
        })
    }
}
