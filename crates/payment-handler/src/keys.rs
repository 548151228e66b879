//! The API keys in memory: authenticating a request costs no database work.
//!
//! The handler keeps a copy of every key that is not revoked (key id →
//! client and SHA-256 of the secret; never the secret), reloaded when it is
//! older than [`REFRESH`] (so a revocation is honoured within seconds) and,
//! for a key id it does not know, at most once per [`MISS_RELOAD_MIN`] (so a
//! key created a moment ago works at once, while a flood of made-up keys
//! costs at most a few reloads per second instead of a query per request).
//! The copy is as large as the key table (clients × their keys).

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use storage::{Db, with_pool};
use tokio::sync::Mutex;

/// Reload the copy when it is older than this (revocations take effect).
pub const REFRESH: Duration = Duration::from_secs(2);
/// An unknown key id reloads the copy at most this often.
pub const MISS_RELOAD_MIN: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct Copy {
    /// key id → (client id, hex SHA-256 of the secret).
    keys: HashMap<String, (String, String)>,
    loaded_at: Option<Instant>,
}

/// The handler's copy of the API keys.
#[derive(Debug, Default)]
pub struct KeyDirectory {
    copy: Mutex<Copy>,
    reloads: AtomicU64,
}

impl KeyDirectory {
    /// How often the copy was loaded from the database (all the database
    /// work authentication did).
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    async fn reload(&self, copy: &mut Copy, db: &Db) -> Result<(), sqlx::Error> {
        self.reloads.fetch_add(1, Ordering::Relaxed);
        let rows: Vec<(String, String, String)> = with_pool!(db, p => sqlx::query_as(
            "SELECT key_id, client_id, secret_sha256 FROM handler_api_keys WHERE revoked_ms IS NULL",
        ).fetch_all(p).await?);
        copy.keys = rows
            .into_iter()
            .map(|(id, client, digest)| (id, (client, digest)))
            .collect();
        copy.loaded_at = Some(Instant::now());
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
        let Some((key_id, secret)) = token
            .strip_prefix("psk_")
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(None);
        };
        let mut copy = self.copy.lock().await;
        if copy.loaded_at.is_none_or(|t| t.elapsed() > REFRESH) {
            self.reload(&mut copy, db).await?;
        }
        if !copy.keys.contains_key(key_id)
            && copy.loaded_at.is_none_or(|t| t.elapsed() > MISS_RELOAD_MIN)
        {
            self.reload(&mut copy, db).await?;
        }
        let Some((client, stored)) = copy.keys.get(key_id) else {
            return Ok(None);
        };
        let given = hex::encode(Sha256::digest(secret.as_bytes()));
        // Constant-time comparison: no early exit on the first differing byte.
        let same = given.len() == stored.len()
            && given
                .bytes()
                .zip(stored.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        Ok(if same {
            events::ClientId::parse(client).ok()
        } else {
            None
        })
    }
}
