//! The embedded mode's durable store: one SQLite database (`coordinator.db` in the data directory),
//! through sea-orm, with the same schema and migrations as Postgres (`migrations/`).
//!
//! - [`SqliteJournal`] is the [`Journal`]: the requests, the highest fence, the input position and the
//!   outbox, each batch in one transaction.
//! - [`SqliteBus`] is the [`InputLog`](crate::ports::InputLog) and the
//!   [`OutputLog`](crate::ports::OutputLog) of a coordinator with no NATS: its input and output
//!   streams are two tables of the same database, and [`SqliteBus`] is also what the HTTP API
//!   submits inputs to and reads the outputs from ([`crate::ports::Gateway`]).
//! - [`DirLock`] is the [`Leadership`](crate::ports::Leadership): the coordinator that holds the lock
//!   on the data directory leads; a second one on the same directory stands by.
//!
//! The database runs in WAL mode with `synchronous = FULL`: a transaction is on disk when its commit
//! returns, so an input the API acknowledged, or a grant the coordinator answered, survives a `kill -9`
//! and a power cut alike.

mod bus;
mod local;
mod lock;

pub use bus::SqliteBus;
pub use local::{check_local, network_filesystem};
pub use lock::DirLock;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpu_coordinator_core::Fence;
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sea_orm::sqlx::{Database as SqlxDatabase, Sqlite, SqliteConnection, TransactionManager as _};
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, DbBackend, DbErr, SqlxSqliteConnector, Statement,
    TransactionTrait as _,
};

use super::sql::entities::{self, RowError};
use super::sql::last_of_each;
use crate::ports::{Batch, Journal, Loaded, PortError, Term};

/// The database file in the data directory.
pub const DB_FILE: &str = "coordinator.db";

/// How long a statement waits for another connection's write to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections in the pool: one writer at a time in SQLite, readers beside it (WAL).
const POOL: u32 = 4;

/// Rows per `INSERT`: 25 parameters each, well under SQLite's 32766 bind parameters.
const ROWS_PER_STATEMENT: usize = 500;

/// Outbox rows per `INSERT`: five parameters each.
const OUTBOX_PER_STATEMENT: usize = 2000;

/// Raises the stored fence and the last input handled when the batch has one, never lowering either
/// (but the position for a reset, `?3`: an input stream made anew).
const RAISE_FENCE: &str =
    "INSERT INTO fence (id, max_fence, input_seq) VALUES (1, ?1, COALESCE(?2, 0)) \
     ON CONFLICT (id) DO UPDATE SET max_fence = max(fence.max_fence, excluded.max_fence), \
     input_seq = CASE WHEN ?3 THEN COALESCE(?2, fence.input_seq) \
                 ELSE max(fence.input_seq, COALESCE(?2, fence.input_seq)) END";

/// The counters the driver starts from (as the Postgres journal's).
const COUNTERS: &str = "SELECT \
     max(COALESCE((SELECT max_fence FROM fence WHERE id = 1), 0), \
         COALESCE((SELECT max(fence) FROM requests), 0)) AS max_fence, \
     COALESCE((SELECT max(seq) FROM requests), 0) AS max_arrival, \
     COALESCE((SELECT input_seq FROM fence WHERE id = 1), 0) AS input_seq";

/// What went wrong with the SQLite database. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum SqliteError {
    #[error("cannot create the data directory {dir}")]
    CreateDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the SQLite database {file}")]
    Open {
        file: PathBuf,
        #[source]
        source: sea_orm::sqlx::Error,
    },
    #[error("migrating the schema of the SQLite database {file} failed")]
    Migrate {
        file: PathBuf,
        #[source]
        source: DbErr,
    },
    #[error("writing {records} request record(s) to the SQLite database {file} failed")]
    Write {
        file: PathBuf,
        records: usize,
        #[source]
        source: DbErr,
    },
    #[error("reading the SQLite database {file} failed")]
    Read {
        file: PathBuf,
        #[source]
        source: DbErr,
    },
    #[error("the SQLite database {file}: {row:?}")]
    Row { file: PathBuf, row: RowError },
    #[error(
        "the data directory {dir} (embedded.data_dir) is on {filesystem}, a network filesystem: the \
         lock that lets one coordinator at a time lead (flock) and SQLite's write-ahead log are not \
         reliable there, so two coordinators could write one database; put it on a local disk",
        dir = dir.display()
    )]
    NetworkFilesystem {
        dir: PathBuf,
        filesystem: &'static str,
    },
}

/// Commits `txn` when its `body` succeeded, else rolls it back at once: a transaction left to roll back
/// when its connection is next used would keep SQLite's write lock (after a full disk, say) and every
/// other writer would wait for it in vain. A commit that fails cannot be rolled back here (sea-orm's
/// `commit` takes the transaction): dropping it queues sqlx's ROLLBACK, and the pool's check
/// ([`outside_transaction`]) closes the connection if that leaves it inside a transaction.
pub(crate) async fn settle<T>(
    txn: sea_orm::DatabaseTransaction,
    body: Result<T, DbErr>,
) -> Result<T, DbErr> {
    match body {
        Ok(value) => match txn.commit().await {
            Ok(()) => Ok(value),
            Err(e) => Err(e),
        },
        Err(e) => {
            let _ = txn.rollback().await;
            Err(e)
        }
    }
}

/// Opens (creating it if need be) the database of data directory `dir`.
pub async fn open(dir: &Path) -> Result<(DatabaseConnection, PathBuf), SqliteError> {
    std::fs::create_dir_all(dir).map_err(|source| SqliteError::CreateDir {
        dir: dir.to_owned(),
        source,
    })?;
    check_local(dir)?;
    let file = dir.join(DB_FILE);
    let options = SqliteConnectOptions::new()
        .filename(&file)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(POOL)
        .after_release(|conn, _| Box::pin(outside_transaction(conn)))
        .connect_with(options)
        .await
        .map_err(|source| SqliteError::Open {
            file: file.clone(),
            source,
        })?;
    Ok((SqlxSqliteConnector::from_sqlx_sqlite_pool(pool), file))
}

/// Whether a connection given back to the pool is outside any transaction, by sqlx's count and by
/// SQLite's own: the pool keeps it only then, and closes it otherwise (closing rolls back whatever
/// SQLite still has open, and the pool opens a fresh connection when one is needed).
///
/// Why (sqlx 0.8.6, `sqlx-sqlite/src/connection/worker.rs`): sqlx counts a connection's transactions
/// itself (`transaction_depth`) and lowers the count only when its COMMIT or ROLLBACK succeeds. On a
/// full disk SQLite ends the transaction by itself (SQLITE_FULL rolls back the whole transaction, on a
/// statement or on COMMIT); the COMMIT fails, and so does the ROLLBACK that follows it (sea-orm's
/// `rollback`, or the one its `Drop` queues with `start_rollback`: "no transaction is active"), so the
/// connection goes back to the pool counted one deep while SQLite is in autocommit. Its next `begin`
/// is then `SAVEPOINT _sqlx_savepoint_1` (`begin_ansi_transaction_sql(1)` in
/// `sqlx-core/src/transaction.rs`), which starts a real transaction; its commit is `RELEASE
/// SAVEPOINT` and its rollback `ROLLBACK TO SAVEPOINT`, which undoes the writes but leaves the
/// transaction open with SQLite's write lock: every other connection then gets "database is locked"
/// for good, even once space is back, and this one's later "commits" only release savepoints inside
/// that transaction, never reaching the disk. With this check such a connection is closed when it is
/// given back, and the next transaction gets a fresh one.
///
/// This only reads state; it runs no ROLLBACK of its own, so it cannot race the one sqlx queued:
/// `lock_handle` is a command to the connection's worker, which runs commands in order, so by the time
/// the handle is ours the queued ROLLBACK has run and the count is final.
async fn outside_transaction(conn: &mut SqliteConnection) -> Result<bool, sea_orm::sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    // SAFETY: the handle is an open connection, locked for this task; sqlite3_get_autocommit only
    // reads a flag of it.
    let autocommit =
        unsafe { libsqlite3_sys::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) } != 0;
    drop(handle);
    let depth = <Sqlite as SqlxDatabase>::TransactionManager::get_transaction_depth(conn);
    let clean = autocommit && depth == 0;
    if !clean {
        tracing::warn!(
            "a SQLite connection came back inside a transaction (sqlx counts {depth} open, SQLite \
             says {}): closed rather than reused, so that it keeps no lock",
            if autocommit { "none" } else { "one" }
        );
    }
    Ok(clean)
}

/// The journal in SQLite.
#[derive(Debug, Clone)]
pub struct SqliteJournal {
    db: DatabaseConnection,
    file: PathBuf,
    /// Taken by every write of this process (the journal's and the embedded bus's): SQLite lets one
    /// writer in at a time, and one that finds the database locked sleeps in steps of milliseconds;
    /// waiting here instead takes the turn as soon as it is free.
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl SqliteJournal {
    /// Opens the database of data directory `dir` and brings its schema up to date.
    pub async fn open(dir: &Path) -> Result<SqliteJournal, SqliteError> {
        let (db, file) = open(dir).await?;
        let store = SqliteJournal {
            db,
            file,
            writes: Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The pool, shared with the embedded bus.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The turn to write, shared with the embedded bus.
    pub fn writes(&self) -> Arc<tokio::sync::Mutex<()>> {
        self.writes.clone()
    }

    /// Brings the schema up to date (the migrations of Postgres, in their SQLite dialect).
    pub async fn migrate(&self) -> Result<(), SqliteError> {
        Migrator::up(&self.db, None)
            .await
            .map_err(|source| SqliteError::Migrate {
                file: self.file.clone(),
                source,
            })
    }

    fn row_error(&self, row: RowError) -> SqliteError {
        SqliteError::Row {
            file: self.file.clone(),
            row,
        }
    }

    /// Writes one batch in one transaction. The batch's term is not checked: the lock on the data
    /// directory ([`DirLock`]) lets one coordinator at a time open it.
    pub async fn write(&self, batch: &Batch<'_>) -> Result<(), SqliteError> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows = last_of_each(batch.records)
            .into_iter()
            .map(entities::to_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.row_error(e))?;
        let big = |field, value| entities::bigint("", field, value).map_err(|e| self.row_error(e));
        let fence = big("max_fence", batch.max_fence.map_or(0, |f: Fence| f.0))?;
        let input_seq = batch
            .input_seq
            .map(|seq| big("input_seq", seq))
            .transpose()?;
        let published = batch
            .published_upto
            .map(|id| big("outbox id", id))
            .transpose()?;
        let fail = |source| SqliteError::Write {
            file: self.file.clone(),
            records: rows.len(),
            source,
        };
        let inserts = batch
            .outbox
            .chunks(OUTBOX_PER_STATEMENT)
            .map(|chunk| entities::insert_outbox(chunk, DbBackend::Sqlite))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.row_error(e))?;
        let _turn = self.writes.lock().await;
        let txn = self.db.begin().await.map_err(fail)?;
        let body = async {
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                txn.execute(entities::upsert_requests(chunk, DbBackend::Sqlite))
                    .await?;
            }
            for insert in inserts {
                txn.execute(insert).await?;
            }
            if let Some(upto) = published {
                txn.execute(Statement::from_sql_and_values(
                    DbBackend::Sqlite,
                    "DELETE FROM outbox WHERE id <= ?1",
                    [upto.into()],
                ))
                .await?;
            }
            txn.execute(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                RAISE_FENCE,
                [fence.into(), input_seq.into(), batch.input_reset.into()],
            ))
            .await
        }
        .await;
        settle(txn, body).await.map(|_| ()).map_err(fail)
    }

    /// Deletes a batch of the ended requests beyond the `retain_ended` most recent (see
    /// [`Journal::trim_ended`]), in one short transaction.
    pub async fn trim_ended(&self, retain_ended: usize) -> Result<u64, SqliteError> {
        let fail = |source| SqliteError::Write {
            file: self.file.clone(),
            records: 0,
            source,
        };
        let _turn = self.writes.lock().await;
        let txn = self.db.begin().await.map_err(fail)?;
        let deleted = entities::trim_ended(&txn, retain_ended).await;
        settle(txn, deleted).await.map_err(fail)
    }

    /// Reads what the driver needs at start, in one transaction (as [`super::postgres::PgJournal::load_state`]).
    pub async fn load_state(&self, retain_ended: usize) -> Result<Loaded, SqliteError> {
        let fail = |source| SqliteError::Read {
            file: self.file.clone(),
            source,
        };
        let txn = self.db.begin().await.map_err(fail)?;
        let stored = entities::read_journal(&txn, COUNTERS, retain_ended)
            .await
            .map_err(fail)?;
        txn.commit().await.map_err(fail)?;
        stored.into_loaded().map_err(|e| self.row_error(e))
    }
}

#[async_trait::async_trait]
impl Journal for SqliteJournal {
    /// Writes nothing behind: nothing to bring up to date, nor to fence off.
    async fn take_over(&self, _term: Term) -> Result<(), PortError> {
        Ok(())
    }

    /// Writes nothing behind: no writer to stop.
    async fn stand_down(&self, _finish: bool) {}

    async fn migrate(&self) -> Result<(), PortError> {
        SqliteJournal::migrate(self).await.map_err(PortError::new)
    }

    async fn load(&self, retain_ended: usize) -> Result<Loaded, PortError> {
        self.load_state(retain_ended).await.map_err(PortError::new)
    }

    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError> {
        SqliteJournal::write(self, batch)
            .await
            .map_err(PortError::new)
    }

    async fn trim_ended(&self, retain_ended: usize) -> Result<u64, PortError> {
        SqliteJournal::trim_ended(self, retain_ended)
            .await
            .map_err(PortError::new)
    }

    async fn ping(&self) -> Result<(), PortError> {
        self.db.ping().await.map_err(|source| {
            PortError::new(SqliteError::Read {
                file: self.file.clone(),
                source,
            })
        })
    }

    /// The file says nothing of its space before a write is refused (the caller's watch sees that).
    fn full(&self) -> Option<String> {
        None
    }

    async fn close(&self) {
        let _ = self.db.close_by_ref().await;
    }
}
