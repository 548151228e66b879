//! One rebuild or reset of a projection at a time.
//!
//! Both use a shadow with a fixed name (`ops_shadow_<name>`, `<db
//! file>.ops-shadow-<name>`) and move the same group's offsets, so two runs
//! for the same projection would destroy each other's work. A run holds a
//! lock from before planning until it ends:
//!
//! - PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) keyed by
//!   a hash of the projection name, on a dedicated connection held until
//!   the end. If the process dies, the connection closes and PostgreSQL
//!   releases the lock by itself.
//! - SQLite: a lock file next to the database, `<db file>.ops-lock-<name>`,
//!   created exclusively (`create_new`) with the process id in it and
//!   removed at the end. A process killed hard leaves it behind: the error
//!   names the file and the pid so an operator can check and remove it.

use crate::shadow::sqlite_file;
use anyhow::Context as _;
use projections::Projection;
use sqlx::Connection as _;
use std::io::Write as _;
use std::path::PathBuf;
use storage::Db;

/// Held while a rebuild or reset of one projection runs; released by
/// [`RunLock::release`] (or, if dropped, by closing the connection /
/// removing the file).
#[derive(Debug)]
pub struct RunLock {
    held: Held,
}

#[derive(Debug)]
enum Held {
    Postgres {
        conn: Option<sqlx::PgConnection>,
        key: i64,
    },
    Sqlite {
        path: PathBuf,
    },
    Released,
}

/// The advisory lock key of `projection` (FNV-1a of a fixed prefix and
/// the name, so it is stable across versions and processes).
pub fn advisory_key(projection: Projection) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("paystream-ops-rebuild:{}", projection.as_str()).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_be_bytes(h.to_be_bytes())
}

/// The lock file of `projection` for the SQLite database at `main`.
pub fn lock_file(main: &std::path::Path, projection: Projection) -> PathBuf {
    let mut name = main.as_os_str().to_owned();
    name.push(format!(".ops-lock-{}", projection.as_str()));
    PathBuf::from(name)
}

fn busy(projection: Projection) -> String {
    format!(
        "another rebuild/reset of {} is running",
        projection.as_str()
    )
}

impl RunLock {
    /// Takes the lock of `projection` on the live database `db` (reached
    /// at `url`), or refuses at once if another run holds it.
    pub async fn acquire(db: &Db, url: &str, projection: Projection) -> anyhow::Result<RunLock> {
        match db {
            Db::Postgres(_) => {
                let mut conn = sqlx::PgConnection::connect(url)
                    .await
                    .context("opening the lock connection")?;
                let key = advisory_key(projection);
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut conn)
                    .await
                    .context("taking the advisory lock")?;
                if !got {
                    let _ = conn.close().await;
                    anyhow::bail!(
                        "{} (PostgreSQL advisory lock {key} is held; see pg_locks where \
                         locktype = 'advisory'); wait for it to finish",
                        busy(projection)
                    );
                }
                Ok(RunLock {
                    held: Held::Postgres {
                        conn: Some(conn),
                        key,
                    },
                })
            }
            Db::Sqlite(_) => {
                let path = lock_file(&sqlite_file(db).await?, projection);
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(mut f) => {
                        writeln!(f, "{}", std::process::id())
                            .and_then(|()| f.sync_all())
                            .with_context(|| format!("writing the lock file {}", path.display()))?;
                        Ok(RunLock {
                            held: Held::Sqlite { path },
                        })
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let pid = std::fs::read_to_string(&path).unwrap_or_default();
                        anyhow::bail!(
                            "{} (lock file {} exists, written by process {}); if no such \
                             process runs any more (a run killed hard), remove the file and \
                             try again",
                            busy(projection),
                            path.display(),
                            pid.trim()
                        )
                    }
                    Err(e) => {
                        Err(e).with_context(|| format!("creating the lock file {}", path.display()))
                    }
                }
            }
        }
    }

    /// Releases the lock.
    pub async fn release(mut self) -> anyhow::Result<()> {
        match std::mem::replace(&mut self.held, Held::Released) {
            Held::Released => Ok(()),
            Held::Postgres { conn, key } => {
                if let Some(mut c) = conn {
                    sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(key)
                        .execute(&mut c)
                        .await
                        .context("releasing the advisory lock")?;
                    c.close().await.context("closing the lock connection")?;
                }
                Ok(())
            }
            Held::Sqlite { path } => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => {
                    Err(e).with_context(|| format!("removing the lock file {}", path.display()))
                }
            },
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // PostgreSQL: dropping the connection ends the session, which
        // releases the advisory lock. SQLite: remove the file.
        if let Held::Sqlite { path } = &self.held {
            let _ = std::fs::remove_file(path);
        }
    }
}
