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

/// How taking or releasing the run lock fails. A lock held by another run
/// is [`LockError::HeldPostgres`] / [`LockError::HeldSqlite`], whose
/// messages say where to look.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("opening the lock connection")]
    Connect(#[source] sqlx::Error),
    #[error("taking the advisory lock")]
    Take(#[source] sqlx::Error),
    #[error(
        "another rebuild/reset of {projection} is running (PostgreSQL advisory lock {key} is held; \
         see pg_locks where locktype = 'advisory'); wait for it to finish"
    )]
    HeldPostgres { projection: &'static str, key: i64 },
    #[error(
        "another rebuild/reset of {projection} is running (lock file {} exists, written by \
         process {pid}); if no such process runs any more (a run killed hard), remove the file \
         and try again",
        path.display()
    )]
    HeldSqlite {
        projection: &'static str,
        path: PathBuf,
        pid: String,
    },
    /// The SQLite database's file could not be found.
    #[error(transparent)]
    Shadow(#[from] crate::shadow::SqliteFileError),
    #[error("writing the lock file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the lock file {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("releasing the advisory lock")]
    Release(#[source] sqlx::Error),
    #[error("closing the lock connection")]
    Close(#[source] sqlx::Error),
    #[error("removing the lock file {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RunLock {
    /// Takes the lock of `projection` on the live database `db` (reached
    /// at `url`), or refuses at once if another run holds it.
    pub async fn acquire(db: &Db, url: &str, projection: Projection) -> Result<RunLock, LockError> {
        match db {
            Db::Postgres(_) => {
                let mut conn = sqlx::PgConnection::connect(url)
                    .await
                    .map_err(LockError::Connect)?;
                let key = advisory_key(projection);
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(LockError::Take)?;
                if !got {
                    let _ = conn.close().await;
                    return Err(LockError::HeldPostgres {
                        projection: projection.as_str(),
                        key,
                    });
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
                            .map_err(|source| LockError::Write {
                                path: path.clone(),
                                source,
                            })?;
                        Ok(RunLock {
                            held: Held::Sqlite { path },
                        })
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let pid = std::fs::read_to_string(&path).unwrap_or_default();
                        Err(LockError::HeldSqlite {
                            projection: projection.as_str(),
                            pid: pid.trim().to_owned(),
                            path,
                        })
                    }
                    Err(source) => Err(LockError::Create { path, source }),
                }
            }
        }
    }

    /// Releases the lock.
    pub async fn release(mut self) -> Result<(), LockError> {
        match std::mem::replace(&mut self.held, Held::Released) {
            Held::Released => Ok(()),
            Held::Postgres { conn, key } => {
                if let Some(mut c) = conn {
                    sqlx::query("SELECT pg_advisory_unlock($1)")
                        .bind(key)
                        .execute(&mut c)
                        .await
                        .map_err(LockError::Release)?;
                    c.close().await.map_err(LockError::Close)?;
                }
                Ok(())
            }
            Held::Sqlite { path } => match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(LockError::Remove { path, source }),
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
