//! A `database.url` that names several hosts, in libpq's form `postgres://user@h1:5432,h2:5433/db`:
//! a primary and its standbys. sqlx parses one host per URL, so the list is split here into one URL per
//! host ([`hosts`](crate::urls::postgres_hosts)), and [`Primary`] holds a pool on the one that is writable (`pg_is_in_recovery()` is
//! false).
//!
//! When a call fails, its caller asks [`Primary::recheck`]: the host in use is probed, and if it is
//! gone or no longer writable (a standby was promoted in its place), the others are, and the pool is
//! replaced by one on the first writable host; the caller's retry (the driver's `with_retry`) then
//! reaches the new primary. Nothing is lost by the move only if the standby had every commit: with
//! synchronous replication (`synchronous_standby_names` on the primary). [`Primary`] warns when the
//! primary reports none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use backon::Retryable as _;

use sea_orm::sqlx::{self, postgres::PgConnectOptions, Connection as _, Row as _};
use sea_orm::DatabaseConnection;

use super::connect::{
    open_pool, options_of, server_name, CONNECT_TIMEOUT, FAILOVER_ACQUIRE_TIMEOUT,
};
use super::error::PgError;
use crate::retry::backoff;
use crate::telemetry::redact_url;

/// The pool on the writable host of those `database.url` names; it moves to another host when that one
/// goes away. Cheap to clone: the clones share the pool.
#[derive(Clone)]
pub struct Primary(Arc<Inner>);

struct Inner {
    /// One URL per host (empty for a pool given as it is, which never moves).
    urls: Vec<String>,
    current: RwLock<Current>,
    /// One recheck at a time: the others find the pool already moved.
    switching: tokio::sync::Mutex<()>,
    /// Whether a search for a writable host runs in the background.
    looking: AtomicBool,
}

#[derive(Clone)]
struct Current {
    db: DatabaseConnection,
    /// `postgres://user@host:port/database`, for messages.
    server: String,
    /// Which of the URLs it is on.
    index: usize,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("server", &self.server())
            .field("hosts", &self.0.urls.len().max(1))
            .finish()
    }
}

impl From<DatabaseConnection> for Primary {
    /// A pool as it is: it never moves.
    fn from(db: DatabaseConnection) -> Primary {
        Primary::fixed(db, "postgres".to_owned())
    }
}

impl Primary {
    /// `db` on `server`, never moved.
    pub(super) fn fixed(db: DatabaseConnection, server: String) -> Primary {
        Primary(Arc::new(Inner {
            urls: Vec::new(),
            current: RwLock::new(Current {
                db,
                server,
                index: 0,
            }),
            switching: tokio::sync::Mutex::new(()),
            looking: AtomicBool::new(false),
        }))
    }

    /// A pool on the first writable host of `urls` (several); an error when none is writable now
    /// (the primary gone and no standby promoted yet: the caller waits and tries again).
    pub(super) async fn connect(urls: Vec<String>) -> Result<Primary, PgError> {
        let (index, db, server) = writable_of(&urls, None).await?;
        let primary = Primary(Arc::new(Inner {
            urls,
            current: RwLock::new(Current { db, server, index }),
            switching: tokio::sync::Mutex::new(()),
            looking: AtomicBool::new(false),
        }));
        primary.warn_if_asynchronous().await;
        Ok(primary)
    }

    /// The pool on the primary, as it is now.
    pub fn db(&self) -> DatabaseConnection {
        self.current().db
    }

    /// The primary's name, `postgres://user@host:port/database`.
    pub fn server(&self) -> String {
        self.current().server
    }

    /// How many hosts `database.url` names.
    pub fn hosts(&self) -> usize {
        self.0.urls.len().max(1)
    }

    fn current(&self) -> Current {
        self.0
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// After a call failed: when the host in use is gone or no longer writable, moves the pool to the
    /// first host that is. Nothing to do for one host (its pool reconnects by itself) or when the host
    /// in use still is the primary. When no host is writable yet, keeps looking in the background.
    pub async fn recheck(&self) {
        if self.0.urls.len() < 2 {
            return;
        }
        if !self.look(true).await {
            self.keep_looking();
        }
    }

    /// Whether the pool is on a writable host: it was, or it moved to one. `loud`: a host that is
    /// gone, with none writable, is a warning (else a debug line).
    async fn look(&self, loud: bool) -> bool {
        let _one = self.0.switching.lock().await;
        let current = self.current();
        let why = match probe(&self.0.urls[current.index]).await {
            Ok(true) => return true,
            Ok(false) => "a standby now (in recovery)".to_owned(),
            Err(e) => e,
        };
        match writable_of(&self.0.urls, Some(current.index)).await {
            Ok((index, db, server)) => {
                tracing::warn!(
                    "Postgres: the primary is now {server}; {} is {why}",
                    current.server
                );
                *self.0.current.write().unwrap_or_else(|p| p.into_inner()) =
                    Current { db, server, index };
                // The calls waiting on the old pool fail at once, and their retries come here.
                tokio::spawn(async move {
                    let _ = current.db.close().await;
                });
                self.warn_if_asynchronous().await;
                true
            }
            Err(e) if loud => {
                tracing::warn!("Postgres: {} is {why}; {e}", current.server);
                false
            }
            Err(e) => {
                tracing::debug!("Postgres: {} is {why}; {e}", current.server);
                false
            }
        }
    }

    /// Looks again with the driver's backoff until a host is writable (a standby promoted), so that
    /// the pool moves as soon as one is rather than at the next failed call. One search at a time; it
    /// ends with the last clone of this `Primary`.
    fn keep_looking(&self) {
        if self.0.looking.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = Arc::downgrade(&self.0);
        tokio::spawn(async move {
            let found = || async {
                match inner.upgrade().map(Primary) {
                    Some(primary) if !primary.look(false).await => Err(()),
                    // Found, or nobody uses this pool any more.
                    _ => Ok(()),
                }
            };
            let _ = found.retry(backoff()).await;
            if let Some(inner) = inner.upgrade() {
                inner.looking.store(false, Ordering::SeqCst);
            }
        });
    }

    /// Warns when the primary does not wait for a standby before it acknowledges a commit
    /// (`synchronous_standby_names` empty, or `synchronous_commit` `off` or `local`): a batch
    /// acknowledged just before a failover may then be missing on the promoted standby.
    async fn warn_if_asynchronous(&self) {
        let current = self.current();
        let settings = sqlx::query(
            "SELECT current_setting('synchronous_standby_names'), \
             current_setting('synchronous_commit')",
        )
        .fetch_one(current.db.get_postgres_connection_pool())
        .await
        .and_then(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<String, _>(1)?)));
        match settings {
            Ok((names, commit))
                if names.trim().is_empty() || ["off", "local"].contains(&commit.as_str()) =>
            {
                tracing::warn!(
                    "database.url names {} hosts, but the primary {} does not wait for a standby \
                     before it acknowledges a commit (synchronous_standby_names = {names:?}, \
                     synchronous_commit = {commit}): a batch acknowledged just before a failover may \
                     be missing on the promoted standby. Set synchronous_standby_names on the primary.",
                    self.hosts(),
                    current.server
                );
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(
                "reading synchronous_standby_names on {}: {e}",
                current.server
            ),
        }
    }
}

/// Whether the host of `url` takes writes (`pg_is_in_recovery()` is false), through one connection of
/// its own, not a pool: a host that refuses is known at once. The error says why it cannot be asked.
async fn probe(url: &str) -> Result<bool, String> {
    let asked = async {
        let options: PgConnectOptions = url.parse()?;
        let mut conn = sqlx::PgConnection::connect_with(&options).await?;
        let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok::<_, sqlx::Error>(!standby)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, asked).await {
        Ok(Ok(writable)) => Ok(writable),
        Ok(Err(e)) => Err(format!("unreachable ({e})")),
        Err(_) => Err(format!(
            "unreachable (no answer within {CONNECT_TIMEOUT:?})"
        )),
    }
}

/// A pool on the first writable host of `urls`, starting after `after` (which is tried last): its
/// index, pool and name. The error says what each host is.
async fn writable_of(
    urls: &[String],
    after: Option<usize>,
) -> Result<(usize, DatabaseConnection, String), PgError> {
    let start = after.map_or(0, |i| i + 1);
    let mut seen = Vec::new();
    for index in (0..urls.len()).map(|i| (start + i) % urls.len()) {
        let url = &urls[index];
        let name = options_of(url).map_or_else(|_| redact_url(url), |o| server_name(&o));
        match probe(url).await {
            Ok(true) => match open_pool(url, FAILOVER_ACQUIRE_TIMEOUT).await {
                Ok((db, server)) => return Ok((index, db, server)),
                Err(e) => seen.push(format!("{name}: {e}")),
            },
            Ok(false) => seen.push(format!("{name}: a standby (in recovery)")),
            // The database may be missing: a pool makes it, on a writable host.
            Err(e) if e.contains("3D000") || e.contains("does not exist") => {
                match open_pool(url, FAILOVER_ACQUIRE_TIMEOUT).await {
                    Ok((db, server)) if probe(url).await == Ok(true) => {
                        return Ok((index, db, server))
                    }
                    Ok((db, _)) => {
                        let _ = db.close().await;
                        seen.push(format!("{name}: a standby (in recovery)"));
                    }
                    Err(e) => seen.push(format!("{name}: {e}")),
                }
            }
            Err(e) => seen.push(format!("{name}: {e}")),
        }
    }
    Err(PgError::NoPrimary {
        detail: seen.join("; "),
    })
}
