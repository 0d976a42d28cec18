//! The [`Journal`] on one PostgreSQL database: [`PgJournal`] connects, migrates, writes batches, loads
//! what the driver starts from and trims the ended requests.

use std::sync::Arc;

use futures::TryStreamExt as _;
use gpu_coordinator_core::{Fence, RequestRecord};
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::{self, Row as _};
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement,
    TransactionTrait as _,
};

use super::connect::{open_pool, CONNECT_TIMEOUT};
use super::error::{stale_term, write_error, PgError};
use super::rows::Rows;
use super::sql::{
    request_row, RequestColumns, CHECK_TERM, COUNTERS, SELECT_ENDED, SELECT_OPEN, VERSION,
    WRITE_BATCH, WRITE_BATCH_FENCED,
};
use super::Primary;
use crate::adapters::sql::entities::{self, request, RowError};
use crate::adapters::sql::last_of_each;
use crate::ports::{Batch, Journal, Loaded, OutboxRow, PortError, Term};

/// A [`PgJournal`] that does not know the highest version written yet: it writes its rows unnumbered.
const UNSEEDED: i64 = i64::MIN;

/// Serialises concurrent `migrate` calls (several coordinators starting at once) on one database.
const MIGRATION_LOCK_KEY: i64 = 0x6770_755f_636f_6f72; // "gpu_coor"

/// The requests table, the fence row and the outbox of one PostgreSQL database: the [`Journal`].
#[derive(Debug, Clone)]
pub struct PgJournal {
    /// The pool on the primary, moved when it goes away (`database.url` naming several hosts).
    primary: Primary,
    /// The outbox rows up to this id are deleted (0 at start: from the first).
    deleted_upto: Arc<std::sync::atomic::AtomicI64>,
    /// The version of the last batch numbered: the highest written when read at [`PgJournal::migrate`]
    /// and [`PgJournal::load_state`] (a new leader loads after the last leader's writes), then one more
    /// per batch. [`UNSEEDED`] before either: rows go unnumbered.
    version: Arc<std::sync::atomic::AtomicI64>,
}

impl PgJournal {
    /// Opens a pool on `url`. When the database does not exist, creates it through the `postgres` database
    /// of the same server (if the role may), tolerating another process creating it at the same moment.
    /// A URL that names several hosts (`postgres://user@h1:5432,h2:5433/db`) opens the pool on the one
    /// that takes writes, and moves it to another when that one goes (see [`Primary`]).
    pub async fn connect(url: &str) -> Result<PgJournal, PgError> {
        let urls =
            crate::urls::postgres_hosts(url).map_err(|detail| PgError::InvalidHosts { detail })?;
        let primary = if urls.len() > 1 {
            Primary::connect(urls).await?
        } else {
            let (db, server) = open_pool(url, CONNECT_TIMEOUT).await?;
            Primary::fixed(db, server)
        };
        Ok(PgJournal {
            primary,
            deleted_upto: Arc::default(),
            version: Arc::new(std::sync::atomic::AtomicI64::new(UNSEEDED)),
        })
    }

    /// The primary's name, `postgres://user@host:port/database`, for messages.
    fn server(&self) -> String {
        self.primary.server()
    }

    /// `result`, the host moved from first when it failed in a way a gone primary explains.
    async fn moved<T>(&self, result: Result<T, PgError>) -> Result<T, PgError> {
        if let Err(
            PgError::Connect { .. }
            | PgError::Read { .. }
            | PgError::Write { .. }
            | PgError::Migrate { .. }
            | PgError::Ping { .. }
            | PgError::CreateDatabase { .. },
        ) = &result
        {
            self.primary.recheck().await;
        }
        result
    }

    /// Brings the schema up to date. Safe to run on every start and from several processes at once.
    pub async fn migrate(&self) -> Result<(), PgError> {
        let migrated = self.migrate_once().await;
        self.moved(migrated).await
    }

    async fn migrate_once(&self) -> Result<(), PgError> {
        let fail = |source| PgError::Migrate {
            server: self.server(),
            source,
        };
        let db = self.primary.db();
        let txn = db.begin().await.map_err(fail)?;
        txn.execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [MIGRATION_LOCK_KEY.into()],
        ))
        .await
        .map_err(fail)?;
        Migrator::up(&txn, None).await.map_err(fail)?;
        txn.commit().await.map_err(fail)?;
        let version = sqlx::query(VERSION)
            .fetch_one(db.get_postgres_connection_pool())
            .await
            .and_then(|row| row.try_get::<i64, _>(0))
            .map_err(|e| fail(DbErr::Query(RuntimeErr::SqlxError(e))))?;
        self.seed_version(version);
        Ok(())
    }

    /// Numbers the batches from above `stored`, the highest version written, unless they already are.
    fn seed_version(&self, stored: i64) {
        self.version
            .fetch_max(stored, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next batch's version (`None` while unseeded).
    fn next_version(&self) -> Option<i64> {
        self.version
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |v| (v != UNSEEDED).then(|| v.saturating_add(1)),
            )
            .ok()
            .map(|v| v.saturating_add(1))
    }

    /// Writes one batch in one transaction: upserts every record (when a `request_id` appears twice, the
    /// later record wins) and raises the stored fence to `max_fence`.
    pub async fn apply(
        &self,
        records: &[RequestRecord],
        max_fence: Option<Fence>,
    ) -> Result<(), PgError> {
        self.write(&Batch {
            records,
            max_fence,
            ..Batch::default()
        })
        .await
    }

    /// Writes one batch atomically (see [`PgJournal::write_rows`]), its outbox rows bound where they are.
    pub async fn write(&self, batch: &Batch<'_>) -> Result<(), PgError> {
        if batch.is_empty() && batch.term.is_none() {
            return Ok(());
        }
        let rows = self.numbered(batch)?;
        self.execute(&rows, batch.outbox).await
    }

    /// The batch as the rows it writes: each request's last record, the numbers as `bigint`s (a value
    /// that does not fit is refused here, before anything is written), the outbox rows copied.
    pub fn rows(&self, batch: &Batch<'_>) -> Result<Rows, PgError> {
        Ok(Rows {
            outbox: batch.outbox.to_vec(),
            ..self.numbered(batch)?
        })
    }

    /// [`PgJournal::rows`] without the outbox rows; its request rows carry the batch's version.
    fn numbered(&self, batch: &Batch<'_>) -> Result<Rows, PgError> {
        let version = self.next_version();
        Ok(Rows {
            requests: last_of_each(batch.records)
                .into_iter()
                .map(|r| self.to_row(r).map(|row| request::Model { version, ..row }))
                .collect::<Result<Vec<_>, _>>()?,
            max_fence: self.bigint("", "max_fence", batch.max_fence.map_or(0, |f| f.0))?,
            input_seq: batch
                .input_seq
                .map(|seq| self.bigint("", "input_seq", seq))
                .transpose()?,
            input_reset: batch.input_reset && batch.input_seq.is_some(),
            outbox: Vec::new(),
            published_upto: batch
                .published_upto
                .map(|id| self.bigint("", "outbox id", id))
                .transpose()?,
            term: batch
                .term
                .map(|t| self.bigint("", "term", t.0))
                .transpose()?,
        })
    }

    /// Writes rows atomically, as one statement ([`WRITE_BATCH`], or [`WRITE_BATCH_FENCED`] under a
    /// term): the requests (one row each), the highest fence and the last input handled (both only
    /// raised), the new outbox rows (one already there is kept), and the deletion of the outbox rows
    /// already published. The rows travel as one array per column, so the statement's text is the same
    /// whatever the batch's size: each connection prepares it once, and no batch is too big for one
    /// statement.
    pub async fn write_rows(&self, rows: &Rows) -> Result<(), PgError> {
        self.execute(rows, &rows.outbox).await
    }

    /// [`PgJournal::write_rows`] with `outbox` as the outbox rows (those of `rows` are not looked at).
    async fn execute(&self, rows: &Rows, outbox: &[OutboxRow]) -> Result<(), PgError> {
        let written = self.execute_once(rows, outbox).await;
        self.moved(written).await
    }

    async fn execute_once(&self, rows: &Rows, outbox: &[OutboxRow]) -> Result<(), PgError> {
        let outbox_ids = outbox
            .iter()
            .map(|row| self.bigint("", "outbox id", row.id))
            .collect::<Result<Vec<_>, _>>()?;
        let n_rows = rows.requests.len();
        let fail = |source: sqlx::Error| {
            let source = DbErr::Exec(RuntimeErr::SqlxError(source));
            match (rows.term, stale_term(&source)) {
                (Some(term), Some(detail)) => PgError::StaleTerm {
                    server: self.server(),
                    term: term as u64,
                    detail,
                },
                _ => PgError::Write {
                    server: self.server(),
                    records: n_rows,
                    source,
                },
            }
        };
        let db = self.primary.db();
        let pool = db.get_postgres_connection_pool();
        if rows.is_empty() && outbox.is_empty() {
            // Nothing to write but the term to check: the lease changes that follow are this term's.
            if rows.term.is_some() {
                sqlx::query(CHECK_TERM)
                    .bind(rows.term)
                    .execute(pool)
                    .await
                    .map_err(fail)?;
            }
            return Ok(());
        }
        let deleted_upto = self.deleted_upto.load(std::sync::atomic::Ordering::Relaxed);
        let columns = RequestColumns::of(&rows.requests);
        let query = match rows.term {
            Some(term) => sqlx::query(WRITE_BATCH_FENCED.as_str()).bind(term),
            None => sqlx::query(WRITE_BATCH.as_str()),
        };
        columns
            .bind(query)
            .bind(outbox_ids)
            .bind(outbox.iter().map(|r| r.msg_id.as_str()).collect::<Vec<_>>())
            .bind(
                outbox
                    .iter()
                    .map(|r| r.subject.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(outbox.iter().map(|r| r.msgpack).collect::<Vec<_>>())
            .bind(
                outbox
                    .iter()
                    .map(|r| r.payload.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(rows.published_upto.map(|upto| deleted_upto.min(upto)))
            .bind(rows.published_upto)
            .bind(rows.max_fence)
            .bind(rows.input_seq)
            .bind(rows.input_reset)
            .execute(pool)
            .await
            .map_err(fail)?;
        if let Some(upto) = rows.published_upto {
            self.deleted_upto
                .fetch_max(upto, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads what the core needs at start (see [`PgJournal::load_state`]): the records and the highest
    /// fence.
    pub async fn load(&self, retain_ended: usize) -> Result<(Vec<RequestRecord>, Fence), PgError> {
        let state = self.load_state(retain_ended).await?;
        Ok((state.records, state.max_fence))
    }

    /// Reads what the driver needs at start, from one snapshot: every request not ended, in `seq` order,
    /// then the `retain_ended` most recently ended ones (oldest first); the highest fence ever recorded;
    /// the highest arrival number; the last input handled; and the outbox, in order.
    pub async fn load_state(&self, retain_ended: usize) -> Result<Loaded, PgError> {
        let loaded = self.load_once(retain_ended).await;
        self.moved(loaded).await
    }

    async fn load_once(&self, retain_ended: usize) -> Result<Loaded, PgError> {
        let fail = |source: sqlx::Error| PgError::Read {
            server: self.server(),
            source: DbErr::Query(RuntimeErr::SqlxError(source)),
        };
        let db = self.primary.db();
        let mut txn = db
            .get_postgres_connection_pool()
            .begin()
            .await
            .map_err(fail)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *txn)
            .await
            .map_err(fail)?;
        let rows = read_requests(&mut txn, retain_ended).await.map_err(fail)?;
        let counters = read_counters(&mut txn).await.map_err(fail)?;
        let outbox = read_outbox(&mut txn).await.map_err(fail)?;
        txn.commit().await.map_err(fail)?;
        self.seed_version(counters.version);
        self.delete_from(&outbox);
        entities::StoredJournal {
            rows,
            max_fence: counters.max_fence,
            max_arrival: counters.max_arrival,
            input_seq: counters.input_seq,
            outbox,
        }
        .into_loaded()
        .map_err(|e| self.row_error(e))
    }

    /// Deletions go on from the first row of `outbox` (the outbox as loaded): a standby promoted
    /// after it missed the last deletions holds rows below the last id this store deleted.
    fn delete_from(&self, outbox: &[OutboxRow]) {
        if let Some(first) = outbox.first() {
            let below = i64::try_from(first.id)
                .unwrap_or(i64::MAX)
                .saturating_sub(1);
            self.deleted_upto
                .fetch_min(below, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Deletes a batch of the ended requests beyond the `retain_ended` most recent (see
    /// [`Journal::trim_ended`]), in one short transaction.
    pub async fn trim_ended(&self, retain_ended: usize) -> Result<u64, PgError> {
        let fail = |source| PgError::Write {
            server: self.server(),
            records: 0,
            source,
        };
        let trimmed = async {
            let txn = self.primary.db().begin().await.map_err(fail)?;
            let deleted = entities::trim_ended(&txn, retain_ended)
                .await
                .map_err(fail)?;
            txn.commit().await.map_err(fail)?;
            Ok(deleted)
        }
        .await;
        self.moved(trimmed).await
    }

    /// Checks that the server answers.
    pub async fn ping(&self) -> Result<(), PgError> {
        let pinged = self
            .primary
            .db()
            .ping()
            .await
            .map_err(|source| PgError::Ping {
                server: self.server(),
                source,
            });
        self.moved(pinged).await
    }

    /// Closes the pool, waiting for the connections in use to come back. Later calls fail.
    pub async fn close(&self) {
        // Closing a sqlx pool cannot fail; the `Result` is sea-orm's signature for every backend.
        let _ = self.primary.db().close().await;
    }

    /// The pool on the primary now, for what this module does not cover (health checks, tests).
    pub fn connection(&self) -> DatabaseConnection {
        self.primary.db()
    }

    /// The pool on the primary, wherever it moves: for the leadership, which lives in the same
    /// database.
    pub fn primary(&self) -> Primary {
        self.primary.clone()
    }

    fn bigint(&self, request_id: &str, field: &'static str, value: u64) -> Result<i64, PgError> {
        entities::bigint(request_id, field, value).map_err(|e| self.row_error(e))
    }

    fn to_row(&self, r: &RequestRecord) -> Result<request::Model, PgError> {
        entities::to_row(r).map_err(|e| self.row_error(e))
    }

    fn row_error(&self, e: RowError) -> PgError {
        match e {
            RowError::OutOfRange {
                request_id,
                field,
                value,
            } => PgError::OutOfRange {
                server: self.server(),
                request_id,
                field,
                value,
            },
            RowError::Corrupt { request_id, detail } => PgError::Corrupt {
                server: self.server(),
                request_id,
                detail,
            },
        }
    }
}

/// The counters [`COUNTERS`] reads, as stored.
struct Counters {
    max_fence: i64,
    max_arrival: i64,
    input_seq: i64,
    version: i64,
}

/// Every request not ended, in `seq` order, then the `retain_ended` most recently ended ones (oldest
/// first), read on `conn` (the load's transaction).
async fn read_requests(
    conn: &mut sqlx::PgConnection,
    retain_ended: usize,
) -> Result<Vec<request::Model>, sqlx::Error> {
    // Rows are decoded as they arrive, while the server sends the next ones.
    let mut rows = Vec::new();
    let mut open = sqlx::query(&SELECT_OPEN).fetch(&mut *conn);
    while let Some(row) = open.try_next().await? {
        rows.push(request_row(&row)?);
    }
    drop(open);
    if retain_ended > 0 {
        let limit = i64::try_from(retain_ended).unwrap_or(i64::MAX);
        let mut ended = sqlx::query(&SELECT_ENDED)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(request_row)
            .collect::<Result<Vec<_>, _>>()?;
        ended.reverse();
        rows.append(&mut ended);
    }
    Ok(rows)
}

/// The counters the driver starts from, read on `conn` (the load's transaction).
async fn read_counters(conn: &mut sqlx::PgConnection) -> Result<Counters, sqlx::Error> {
    let counters = sqlx::query(COUNTERS).fetch_one(&mut *conn).await?;
    let counter = |name: &str| counters.try_get::<i64, _>(name);
    Ok(Counters {
        max_fence: counter("max_fence")?,
        max_arrival: counter("max_arrival")?,
        input_seq: counter("input_seq")?,
        version: counter("version")?,
    })
}

/// The outbox, in order, read on `conn` (the load's transaction).
async fn read_outbox(conn: &mut sqlx::PgConnection) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query(entities::OUTBOX)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| {
            Ok(OutboxRow {
                id: u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0),
                msg_id: row.try_get(1)?,
                subject: row.try_get(2)?,
                msgpack: row.try_get(3)?,
                payload: row.try_get(4)?,
            })
        })
        .collect()
}

#[async_trait::async_trait]
impl Journal for PgJournal {
    /// Writes nothing behind: nothing to bring up to date, nor to fence off.
    async fn take_over(&self, _term: Term) -> Result<(), PortError> {
        Ok(())
    }

    /// Writes nothing behind: no writer to stop.
    async fn stand_down(&self, _finish: bool) {}

    async fn migrate(&self) -> Result<(), PortError> {
        PgJournal::migrate(self).await.map_err(PortError::new)
    }

    async fn load(&self, retain_ended: usize) -> Result<Loaded, PortError> {
        self.load_state(retain_ended).await.map_err(PortError::new)
    }

    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError> {
        PgJournal::write(self, batch).await.map_err(write_error)
    }

    async fn trim_ended(&self, retain_ended: usize) -> Result<u64, PortError> {
        PgJournal::trim_ended(self, retain_ended)
            .await
            .map_err(PortError::new)
    }

    async fn ping(&self) -> Result<(), PortError> {
        PgJournal::ping(self).await.map_err(PortError::new)
    }

    /// Postgres says nothing of its space before a write is refused (the caller's watch sees that).
    fn full(&self) -> Option<String> {
        None
    }

    async fn close(&self) {
        PgJournal::close(self).await
    }
}
