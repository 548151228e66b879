//! Who calls the query API: a bearer API key from the payment handler's
//! key table (`handler_api_keys`, same database in deployments and in
//! `paystream up`). Keys are `psk_<key id>_<secret>`; only the secret's
//! SHA-256 is stored, compared in constant time; revoked keys
//! (`paystream clients revoke`) are refused. The role (`client` or
//! `operator`) comes from the key's row (handler migration 1020).

use sha2::{Digest, Sha256};
use storage::{Db, with_pool};

/// What a key may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Only its own client's payments, sellers and buyers.
    Client,
    /// Everything, including ledger-wide reads and verification.
    Operator,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub client_id: String,
    pub role: Role,
}

/// Key id and secret of a well-formed key (`psk_` + 16 hex + `_` + 64
/// hex, as `paystream clients create` issues them). Anything else is
/// refused without asking the database.
pub fn parse_key(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix("psk_")?.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Why a well-formed key could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key table (or its `role` column) does not exist here: the
    /// handler's migrations were not applied to this database.
    #[error(
        "the API key table handler_api_keys (with its role column) is missing in this database: {0}"
    )]
    KeyTableMissing(sqlx::Error),
    #[error("the API key table could not be read: {0}")]
    Db(sqlx::Error),
}

fn missing_schema(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            // PostgreSQL: undefined_table, undefined_column.
            matches!(d.code().as_deref(), Some("42P01" | "42703"))
                || d.message().contains("no such table")
                || d.message().contains("no such column")
        }
        _ => false,
    }
}

/// The caller a key belongs to, if it is valid and not revoked.
pub async fn authenticate(
    db: &Db,
    key_id: &str,
    secret: &str,
) -> Result<Option<Caller>, AuthError> {
    let row: Result<Option<(String, String, String)>, sqlx::Error> = with_pool!(db, p => sqlx::query_as(
        "SELECT client_id, secret_sha256, role FROM handler_api_keys WHERE key_id = $1 AND revoked_ms IS NULL",
    ).bind(key_id).fetch_optional(p).await);
    let row = row.map_err(|e| {
        if missing_schema(&e) {
            AuthError::KeyTableMissing(e)
        } else {
            AuthError::Db(e)
        }
    })?;
    let Some((client_id, stored, role)) = row else {
        return Ok(None);
    };
    let given = hex::encode(Sha256::digest(secret.as_bytes()));
    // Constant time: no early exit on the first differing byte.
    let same = runtime::secret::constant_time_eq(given.as_bytes(), stored.as_bytes());
    if !same || client_id.is_empty() {
        return Ok(None);
    }
    let role = match role.as_str() {
        "operator" => Role::Operator,
        "client" => Role::Client,
        // An unknown role grants nothing.
        _ => return Ok(None),
    };
    Ok(Some(Caller { client_id, role }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_bearer_keys_reach_the_database() {
        let key = format!("psk_{}_{}", "a".repeat(16), "0".repeat(64));
        assert_eq!(
            parse_key(&key),
            Some(("aaaaaaaaaaaaaaaa", &*"0".repeat(64)))
        );
        assert_eq!(parse_key("psk_short_secret"), None);
        assert_eq!(parse_key(&key.replace("psk_", "pk_")), None);
        assert_eq!(parse_key(&format!("{key}x")), None);
        assert_eq!(bearer(&format!("Bearer {key}")), Some(key.as_str()));
        assert_eq!(bearer(&format!("bearer  {key}")), Some(key.as_str()));
        assert_eq!(bearer(&format!("Basic {key}")), None);
        assert_eq!(bearer("Bearer "), None);
    }
}
