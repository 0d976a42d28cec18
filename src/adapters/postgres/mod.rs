//! The durable queue: every request's [`RequestRecord`] and the highest fence issued, in PostgreSQL.
//!
//! This module owns the translation between the core's records and the rows of `migrations/` (`requests`,
//! one row per request, and `fence`, one row). It must not decide anything: what is written, and when,
//! comes from the core's `Persist` and `PersistFence` actions through the driver, and what [`PgStore::load`]
//! returns goes back to the core unchanged.
//!
//! - [`PgStore::apply`] writes a batch as one statement (one transaction), so the batch is durable entirely or not at all;
//!   the driver acknowledges the batch's inputs to JetStream only after it returns `Ok`.
//! - Nothing goes back, whatever order batches arrive in: the stored fence and the input position only
//!   rise (`GREATEST`; the position is lowered only by a reset, for an input stream made anew), and a
//!   request's row is overwritten only by a row of at least its version (the number of the batch
//!   that made it, which rises across terms: each store numbers its batches from above the highest
//!   it read at [`PgStore::migrate`] and [`PgStore::load_state`]).
//! - [`PgStore::load`] reads from one snapshot (repeatable read), so the requests and the fence agree.
//! - The core's `u64`s are stored as `bigint`: a value above `i64::MAX` is refused ([`PgError::OutOfRange`])
//!   rather than wrapped, and a stored value the core cannot represent is reported ([`PgError::Corrupt`]).

mod behind;
pub(crate) mod entities;
mod hosts;
mod leader;

pub use crate::ports::{Batch, Loaded, OutboxRow};
pub use behind::{BehindError, WriteBehind};
pub use entities::{fence, request, RowError};
pub use hosts::Primary;
pub use leader::{forget_unseen, presence_file, PgLeadership, FORGET_AFTER_TTLS};

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use gpu_coordinator_core::{Fence, RequestRecord};

use crate::ports::{Deposed, Journal, PortError, Term};
use crate::telemetry::redact_url;
use futures::TryStreamExt as _;
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::{self, postgres::PgConnectOptions, Connection as _, Executor as _, Row as _};
use sea_orm::{
    ConnectOptions, ConnectionTrait as _, Database, DatabaseConnection, DbBackend, DbErr,
    RuntimeErr, Statement, TransactionTrait as _,
};

/// How long opening a connection, or waiting for a free one in the pool, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The same wait, for a pool on one of several hosts: a pool keeps trying a host that refuses
/// connections until this runs out, and only then does its caller look for a promoted standby.
const FAILOVER_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// Raises the stored fence, the input position (but for a reset: an input stream made anew) and the
/// highest row version written; never lowers them, whatever order batches arrive in. `{fence}`,
/// `{input_seq}` (null: unchanged), `{reset}` and `{version}` (null: none) stand for the batch's
/// values.
const RAISE_FENCE: &str = "INSERT INTO fence (id, max_fence, input_seq, version) \
     VALUES (1, {fence}, COALESCE({input_seq}, 0), COALESCE({version}, 0)) \
     ON CONFLICT (id) DO UPDATE SET max_fence = GREATEST(fence.max_fence, EXCLUDED.max_fence), \
     input_seq = CASE WHEN {reset} THEN COALESCE({input_seq}, fence.input_seq) \
                 ELSE GREATEST(fence.input_seq, {input_seq}) END, \
     version = GREATEST(fence.version, {version})";

/// Overwrites a request's row only with one of at least its version: an older batch written late
/// leaves a newer row as it is. A row without a version (written unnumbered) is overwritten, and
/// overwrites.
const NEWER_ROW: &str = "requests.version IS NULL OR EXCLUDED.version IS NULL \
     OR requests.version <= EXCLUDED.version";

/// Fences a batch by the writer's term: locks the `leader` row and raises SQLSTATE `GC001` when its term
/// is another (see the migration that made `gpu_coordinator_check_term`).
const CHECK_TERM: &str =
    "UPDATE leader SET term = term WHERE id = 1 AND gpu_coordinator_check_term(term, $1) RETURNING term";

/// The SQLSTATE `gpu_coordinator_check_term` raises.
const STALE_TERM: &str = "GC001";

/// The counters the driver starts from: the highest fence (the `fence` row, and the requests' own in
/// case), the highest arrival number (an index read on the unique `seq`), the last input handled.
const COUNTERS: &str = "SELECT \
     GREATEST(COALESCE((SELECT max_fence FROM fence WHERE id = 1), 0), \
              COALESCE((SELECT max(fence) FROM requests), 0)) AS max_fence, \
     COALESCE((SELECT max(seq) FROM requests), 0) AS max_arrival, \
     COALESCE((SELECT input_seq FROM fence WHERE id = 1), 0) AS input_seq, \
     COALESCE((SELECT version FROM fence WHERE id = 1), 0) AS version";

/// The highest row version written.
const VERSION: &str = "SELECT COALESCE((SELECT version FROM fence WHERE id = 1), 0) AS version";

/// A [`PgStore`] that does not know the highest version written yet: it writes its rows unnumbered.
const UNSEEDED: i64 = i64::MIN;

/// Serialises concurrent `migrate` calls (several coordinators starting at once) on one database.
const MIGRATION_LOCK_KEY: i64 = 0x6770_755f_636f_6f72; // "gpu_coor"

/// What went wrong talking to PostgreSQL. Each message names the server (`user@host:port/database`, never
/// the password) and the operation that failed; the cause is the error's `source`.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The database URL does not parse.
    #[error("invalid PostgreSQL URL {url}")]
    InvalidUrl {
        /// The URL, password removed.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    /// The list of hosts in the database URL does not parse.
    #[error("invalid PostgreSQL URL: {detail}")]
    InvalidHosts { detail: String },
    /// None of the hosts the database URL names takes writes now (the primary gone, no standby
    /// promoted yet).
    #[error("no writable PostgreSQL host among those database.url names: {detail}")]
    NoPrimary { detail: String },
    /// No connection to the database could be opened.
    #[error("cannot connect to PostgreSQL at {server}")]
    Connect {
        server: String,
        #[source]
        source: DbErr,
    },
    /// The database was missing and could not be created (through the `postgres` database).
    #[error("database {database:?} is missing at {server} and could not be created")]
    CreateDatabase {
        server: String,
        database: String,
        #[source]
        source: sqlx::Error,
    },
    /// Running the schema migrations failed.
    #[error("migrating the schema of PostgreSQL at {server} failed")]
    Migrate {
        server: String,
        #[source]
        source: DbErr,
    },
    /// Writing a batch (records and fence) failed; nothing of the batch was committed.
    #[error("writing {records} request record(s) to PostgreSQL at {server} failed")]
    Write {
        server: String,
        records: usize,
        #[source]
        source: DbErr,
    },
    /// The batch was written under a leadership term that is no longer the leader's: nothing of it was
    /// committed, and the writer must stop acting.
    #[error("PostgreSQL at {server} refused a write of term {term}: {detail}")]
    StaleTerm {
        server: String,
        term: u64,
        detail: String,
    },
    /// Reading the requests or the fence failed.
    #[error("loading the requests from PostgreSQL at {server} failed")]
    Read {
        server: String,
        #[source]
        source: DbErr,
    },
    /// The server did not answer a ping.
    #[error("PostgreSQL at {server} does not answer")]
    Ping {
        server: String,
        #[source]
        source: DbErr,
    },
    /// A value to write does not fit a `bigint`; nothing was written.
    #[error("cannot write request {request_id:?} to PostgreSQL at {server}: {field} = {value} exceeds a bigint")]
    OutOfRange {
        server: String,
        request_id: String,
        field: &'static str,
        value: u64,
    },
    /// A stored row does not translate back into a record (a negative number, an unknown phase).
    #[error("request {request_id:?} stored in PostgreSQL at {server} is unreadable: {detail}")]
    Corrupt {
        server: String,
        request_id: String,
        detail: String,
    },
}

/// The columns of `requests`, in the order of [`RequestColumns`], with each one's type for `unnest`.
const REQUEST_COLUMNS: [(&str, &str); 25] = [
    ("request_id", "text"),
    ("service_id", "text"),
    ("priority", "smallint"),
    ("seq", "bigint"),
    ("encoding", "text"),
    ("vram_mb", "bigint"),
    ("gpu_pin", "text"),
    ("preemptible", "boolean"),
    ("lease_ms", "bigint"),
    ("requested_at", "bigint"),
    ("timeout_at", "bigint"),
    ("phase", "text"),
    ("gpu", "text"),
    ("held_mb", "bigint"),
    ("fence", "bigint"),
    ("granted_at", "bigint"),
    ("expires_at", "bigint"),
    ("pause_deadline", "bigint"),
    ("paused_at", "bigint"),
    ("waited_ms", "bigint"),
    ("outcome", "text"),
    ("ended_at", "bigint"),
    ("detail", "text"),
    ("pause_ms", "bigint"),
    ("reject_code", "text"),
];

/// `request_id, service_id, ...`: the columns of [`REQUEST_COLUMNS`], in order.
fn column_names() -> String {
    REQUEST_COLUMNS.map(|(name, _)| name).join(", ")
}

/// The batch statement under a term ([`CHECK_TERM`] as its first part); its parameters are the term, then
/// those of [`WRITE_BATCH`].
static WRITE_BATCH_FENCED: LazyLock<String> = LazyLock::new(|| write_batch(true));

/// The batch statement, unfenced. Its parameters: one array per column of `requests` (see
/// [`RequestColumns`]), then the rows' versions; the outbox's five columns as arrays; the outbox ids to delete (from, up to; both
/// null for none); the fence to raise to; the last input handled (null: unchanged); whether that
/// position is a reset (an input stream made anew), which may lower it.
static WRITE_BATCH: LazyLock<String> = LazyLock::new(|| write_batch(false));

/// The text of [`WRITE_BATCH`] or [`WRITE_BATCH_FENCED`]: data-modifying CTEs, which commit or fail
/// together.
fn write_batch(fenced: bool) -> String {
    let mut next = 0;
    let mut param = || {
        next += 1;
        format!("${next}")
    };
    let mut parts = Vec::new();
    if fenced {
        parts.push(format!("t AS ({})", CHECK_TERM.replace("$1", &param())));
    }
    let arrays = REQUEST_COLUMNS.map(|(_, ty)| format!("{}::{ty}[]", param()));
    let versions = format!("{}::bigint[]", param());
    let updates = REQUEST_COLUMNS[1..]
        .iter()
        .map(|(c, _)| format!("{c} = EXCLUDED.{c}"));
    parts.push(format!(
        "r AS (INSERT INTO requests ({}, version) SELECT * FROM unnest({}, {versions}) \
         ON CONFLICT (request_id) DO UPDATE SET {}, version = EXCLUDED.version WHERE {NEWER_ROW})",
        column_names(),
        arrays.join(", "),
        updates.collect::<Vec<_>>().join(", ")
    ));
    let outbox =
        ["bigint", "text", "text", "boolean", "bytea"].map(|ty| format!("{}::{ty}[]", param()));
    parts.push(format!(
        "o AS (INSERT INTO outbox (id, msg_id, subject, msgpack, payload) SELECT * FROM unnest({}) \
         ON CONFLICT (id) DO NOTHING)",
        outbox.join(", ")
    ));
    // The outbox rows JetStream has stored, from the last id deleted on: the rows below it are gone, and
    // a range from the table's start would walk the index entries of every dead row not yet vacuumed (a
    // cost that grows with the traffic).
    let (from, upto) = (param(), param());
    parts.push(format!(
        "d AS (DELETE FROM outbox WHERE id > {from}::bigint AND id <= {upto}::bigint)"
    ));
    let (fence, input_seq, reset) = (param(), param(), param());
    let raise = RAISE_FENCE
        .replace("{fence}", &format!("{fence}::bigint"))
        .replace("{input_seq}", &format!("{input_seq}::bigint"))
        .replace("{reset}", &format!("{reset}::boolean"))
        .replace(
            "{version}",
            &format!("(SELECT max(v) FROM unnest({versions}) AS v)"),
        );
    format!("WITH {} {raise}", parts.join(", "))
}

/// Every request not ended, in arrival order: the columns of [`REQUEST_COLUMNS`], in order, for
/// [`request_row`]. `'ended'` is literal, to match the partial index `requests_open_seq`.
static SELECT_OPEN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM requests WHERE {} ORDER BY seq",
        column_names(),
        entities::OPEN
    )
});

/// The `$1` most recently ended requests, the most recent first (one backward scan of
/// `requests_ended_recent`).
static SELECT_ENDED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM requests WHERE {} ORDER BY ended_at DESC, seq DESC LIMIT $1",
        column_names(),
        entities::ENDED
    )
});

/// A row of [`SELECT_OPEN`] or [`SELECT_ENDED`], its columns read by position.
fn request_row(row: &sqlx::postgres::PgRow) -> Result<request::Model, sqlx::Error> {
    Ok(request::Model {
        request_id: row.try_get(0)?,
        service_id: row.try_get(1)?,
        priority: row.try_get(2)?,
        seq: row.try_get(3)?,
        encoding: row.try_get(4)?,
        vram_mb: row.try_get(5)?,
        gpu_pin: row.try_get(6)?,
        preemptible: row.try_get(7)?,
        lease_ms: row.try_get(8)?,
        requested_at: row.try_get(9)?,
        timeout_at: row.try_get(10)?,
        phase: row.try_get(11)?,
        gpu: row.try_get(12)?,
        held_mb: row.try_get(13)?,
        fence: row.try_get(14)?,
        granted_at: row.try_get(15)?,
        expires_at: row.try_get(16)?,
        pause_deadline: row.try_get(17)?,
        paused_at: row.try_get(18)?,
        waited_ms: row.try_get(19)?,
        outcome: row.try_get(20)?,
        ended_at: row.try_get(21)?,
        detail: row.try_get(22)?,
        pause_ms: row.try_get(23)?,
        reject_code: row.try_get(24)?,
        version: None,
    })
}

/// Request rows as one vector per column, in the order of [`REQUEST_COLUMNS`], then their versions.
#[derive(Default)]
struct RequestColumns<'a> {
    request_id: Vec<&'a str>,
    service_id: Vec<&'a str>,
    priority: Vec<i16>,
    seq: Vec<i64>,
    encoding: Vec<&'a str>,
    vram_mb: Vec<Option<i64>>,
    gpu_pin: Vec<Option<&'a str>>,
    preemptible: Vec<bool>,
    lease_ms: Vec<i64>,
    requested_at: Vec<i64>,
    timeout_at: Vec<i64>,
    phase: Vec<&'a str>,
    gpu: Vec<Option<&'a str>>,
    held_mb: Vec<Option<i64>>,
    fence: Vec<Option<i64>>,
    granted_at: Vec<Option<i64>>,
    expires_at: Vec<Option<i64>>,
    pause_deadline: Vec<Option<i64>>,
    paused_at: Vec<Option<i64>>,
    waited_ms: Vec<Option<i64>>,
    outcome: Vec<Option<&'a str>>,
    ended_at: Vec<Option<i64>>,
    detail: Vec<Option<&'a str>>,
    pause_ms: Vec<Option<i64>>,
    reject_code: Vec<Option<&'a str>>,
    version: Vec<Option<i64>>,
}

impl<'a> RequestColumns<'a> {
    /// The columns of `rows`, borrowing their text.
    fn of(rows: &'a [request::Model]) -> RequestColumns<'a> {
        let mut c = RequestColumns::default();
        for r in rows {
            c.request_id.push(&r.request_id);
            c.service_id.push(&r.service_id);
            c.priority.push(r.priority);
            c.seq.push(r.seq);
            c.encoding.push(&r.encoding);
            c.vram_mb.push(r.vram_mb);
            c.gpu_pin.push(r.gpu_pin.as_deref());
            c.preemptible.push(r.preemptible);
            c.lease_ms.push(r.lease_ms);
            c.requested_at.push(r.requested_at);
            c.timeout_at.push(r.timeout_at);
            c.phase.push(&r.phase);
            c.gpu.push(r.gpu.as_deref());
            c.held_mb.push(r.held_mb);
            c.fence.push(r.fence);
            c.granted_at.push(r.granted_at);
            c.expires_at.push(r.expires_at);
            c.pause_deadline.push(r.pause_deadline);
            c.paused_at.push(r.paused_at);
            c.waited_ms.push(r.waited_ms);
            c.outcome.push(r.outcome.as_deref());
            c.ended_at.push(r.ended_at);
            c.detail.push(r.detail.as_deref());
            c.pause_ms.push(r.pause_ms);
            c.reject_code.push(r.reject_code.as_deref());
            c.version.push(r.version);
        }
        c
    }

    /// `query` with the columns bound, in order.
    fn bind(self, query: PgQuery<'a>) -> PgQuery<'a> {
        query
            .bind(self.request_id)
            .bind(self.service_id)
            .bind(self.priority)
            .bind(self.seq)
            .bind(self.encoding)
            .bind(self.vram_mb)
            .bind(self.gpu_pin)
            .bind(self.preemptible)
            .bind(self.lease_ms)
            .bind(self.requested_at)
            .bind(self.timeout_at)
            .bind(self.phase)
            .bind(self.gpu)
            .bind(self.held_mb)
            .bind(self.fence)
            .bind(self.granted_at)
            .bind(self.expires_at)
            .bind(self.pause_deadline)
            .bind(self.paused_at)
            .bind(self.waited_ms)
            .bind(self.outcome)
            .bind(self.ended_at)
            .bind(self.detail)
            .bind(self.pause_ms)
            .bind(self.reject_code)
            .bind(self.version)
    }
}

/// A statement with its arguments, on Postgres.
type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// A batch as the rows [`PgStore::write_rows`] writes: what [`PgStore::rows`] makes of a [`Batch`], and
/// what the write-behind journal keeps in JetStream until Postgres has it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rows {
    /// One row per request, the later of two with one `request_id` winning.
    pub requests: Vec<request::Model>,
    /// The fence to raise the stored one to (0: none).
    pub max_fence: i64,
    /// The last input handled, if the batch moves it: only raised, but for `input_reset`.
    pub input_seq: Option<i64>,
    /// `input_seq` may lower the stored position: the input stream was made anew. (Absent from the
    /// journal stream's older entries.)
    #[serde(default)]
    pub input_reset: bool,
    /// Messages to keep until the bus stored them.
    pub outbox: Vec<OutboxRow>,
    /// Outbox rows up to this id are deleted.
    pub published_upto: Option<i64>,
    /// The writer's term (`None`: unfenced).
    pub term: Option<i64>,
}

impl Rows {
    /// Whether writing it would change nothing (but check the term).
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
            && self.max_fence == 0
            && self.input_seq.is_none()
            && self.outbox.is_empty()
            && self.published_upto.is_none()
    }

    /// `later` written after `self`, as one batch: what writing both in order leaves (see [`Merged`]).
    pub fn then(&mut self, later: Rows) {
        let mut merged = Merged::new(std::mem::take(self));
        merged.push(later);
        *self = merged.into_rows();
    }
}

/// Batches merged as they come, in the order they were written: what writing them one after the other
/// leaves, as one batch. A request's later row wins, the fence and the deletions take the highest, the
/// input position the later's, and the outbox rows that a later deletion covers are not written at all.
/// Each batch costs its own rows, however many came before it.
#[derive(Debug, Default)]
pub struct Merged {
    rows: Rows,
    /// Where each request's row is in `rows.requests`.
    at: std::collections::HashMap<String, usize>,
}

impl Merged {
    /// Starts with the first batch.
    pub fn new(first: Rows) -> Merged {
        let at = first
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| (r.request_id.clone(), i))
            .collect();
        Merged { rows: first, at }
    }

    /// Adds the batch written next.
    pub fn push(&mut self, later: Rows) {
        let rows = &mut self.rows;
        for row in later.requests {
            match self.at.get(&row.request_id) {
                Some(&i) => rows.requests[i] = row,
                None => {
                    self.at.insert(row.request_id.clone(), rows.requests.len());
                    rows.requests.push(row);
                }
            }
        }
        rows.max_fence = rows.max_fence.max(later.max_fence);
        rows.input_seq = later.input_seq.or(rows.input_seq);
        // A reset among them: the last position is numbered in the stream made anew.
        rows.input_reset |= later.input_reset;
        rows.outbox.extend(later.outbox);
        rows.published_upto = rows.published_upto.max(later.published_upto);
        rows.term = later.term.or(rows.term);
    }

    /// The batches as one.
    pub fn into_rows(self) -> Rows {
        let mut rows = self.rows;
        if let Some(upto) = rows.published_upto {
            rows.outbox
                .retain(|row| i64::try_from(row.id).map_or(true, |id| id > upto));
        }
        rows
    }
}

/// The requests table, the fence row and the outbox of one PostgreSQL database: the [`Journal`].
#[derive(Debug, Clone)]
pub struct PgStore {
    /// The pool on the primary, moved when it goes away (`database.url` naming several hosts).
    primary: Primary,
    /// The outbox rows up to this id are deleted (0 at start: from the first).
    deleted_upto: Arc<std::sync::atomic::AtomicI64>,
    /// The version of the last batch numbered: the highest written when read at [`PgStore::migrate`]
    /// and [`PgStore::load_state`] (a new leader loads after the last leader's writes), then one more
    /// per batch. [`UNSEEDED`] before either: rows go unnumbered.
    version: Arc<std::sync::atomic::AtomicI64>,
}

impl PgStore {
    /// Opens a pool on `url`. When the database does not exist, creates it through the `postgres` database
    /// of the same server (if the role may), tolerating another process creating it at the same moment.
    /// A URL that names several hosts (`postgres://user@h1:5432,h2:5433/db`) opens the pool on the one
    /// that takes writes, and moves it to another when that one goes (see [`Primary`]).
    pub async fn connect(url: &str) -> Result<PgStore, PgError> {
        let urls =
            crate::urls::postgres_hosts(url).map_err(|detail| PgError::InvalidHosts { detail })?;
        let primary = if urls.len() > 1 {
            Primary::connect(urls).await?
        } else {
            let (db, server) = open_pool(url, CONNECT_TIMEOUT).await?;
            Primary::fixed(db, server)
        };
        Ok(PgStore {
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

    /// Writes one batch atomically (see [`PgStore::write_rows`]), its outbox rows bound where they are.
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

    /// [`PgStore::rows`] without the outbox rows; its request rows carry the batch's version.
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

    /// [`PgStore::write_rows`] with `outbox` as the outbox rows (those of `rows` are not looked at).
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

    /// Reads what the core needs at start (see [`PgStore::load_state`]): the records and the highest
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
        // Rows are decoded as they arrive, while the server sends the next ones.
        let mut rows = Vec::new();
        let mut open = sqlx::query(&SELECT_OPEN).fetch(&mut *txn);
        while let Some(row) = open.try_next().await.map_err(fail)? {
            rows.push(request_row(&row).map_err(fail)?);
        }
        drop(open);
        if retain_ended > 0 {
            let limit = i64::try_from(retain_ended).unwrap_or(i64::MAX);
            let mut ended = sqlx::query(&SELECT_ENDED)
                .bind(limit)
                .fetch_all(&mut *txn)
                .await
                .map_err(fail)?
                .iter()
                .map(request_row)
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            ended.reverse();
            rows.append(&mut ended);
        }
        let counters = sqlx::query(COUNTERS)
            .fetch_one(&mut *txn)
            .await
            .map_err(fail)?;
        let counter = |name: &str| counters.try_get::<i64, _>(name).map_err(fail);
        let (max_fence, max_arrival, input_seq) = (
            counter("max_fence")?,
            counter("max_arrival")?,
            counter("input_seq")?,
        );
        let version = counter("version")?;
        let outbox = sqlx::query(entities::OUTBOX)
            .fetch_all(&mut *txn)
            .await
            .map_err(fail)?
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
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(fail)?;
        txn.commit().await.map_err(fail)?;
        self.seed_version(version);
        // Deletions go on from the first row kept: a standby promoted after it missed the last
        // deletions holds rows below the last id this store deleted.
        if let Some(first) = outbox.first() {
            let below = i64::try_from(first.id)
                .unwrap_or(i64::MAX)
                .saturating_sub(1);
            self.deleted_upto
                .fetch_min(below, std::sync::atomic::Ordering::Relaxed);
        }
        entities::StoredJournal {
            rows,
            max_fence,
            max_arrival,
            input_seq,
            outbox,
        }
        .into_loaded()
        .map_err(|e| self.row_error(e))
    }

    /// Checks that the server answers.
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

/// Opens the pool. Statement logging is off: the driver logs batches, and a line per statement would drown
/// everything else.
async fn open(url: &str, acquire: Duration) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options
        .connect_timeout(CONNECT_TIMEOUT)
        .acquire_timeout(acquire)
        .sqlx_logging(false);
    Database::connect(options).await
}

/// The options of a URL of one host.
fn options_of(url: &str) -> Result<PgConnectOptions, PgError> {
    url.parse().map_err(|source| PgError::InvalidUrl {
        url: redact_url(url),
        source,
    })
}

/// `postgres://user@host:port/database`, for messages.
fn server_name(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options
            .get_database()
            .unwrap_or_else(|| options.get_username())
    )
}

/// A pool on the one host of `url`, and the server's name; `acquire` bounds each wait for a
/// connection. When the database does not exist, creates it through the `postgres` database of the
/// same server (if the role may), tolerating another process creating it at the same moment.
async fn open_pool(url: &str, acquire: Duration) -> Result<(DatabaseConnection, String), PgError> {
    let options = options_of(url)?;
    let database = options
        .get_database()
        .unwrap_or_else(|| options.get_username())
        .to_owned();
    let server = server_name(&options);
    let db = match open(url, acquire).await {
        Ok(db) => db,
        Err(e) if is_missing_database(&e) => {
            create_database(&options, &database, &server).await?;
            open(url, acquire)
                .await
                .map_err(|source| PgError::Connect {
                    server: server.clone(),
                    source,
                })?
        }
        Err(source) => return Err(PgError::Connect { server, source }),
    };
    Ok((db, server))
}

/// `CREATE DATABASE` through the server's `postgres` database.
async fn create_database(
    options: &PgConnectOptions,
    database: &str,
    server: &str,
) -> Result<(), PgError> {
    let fail = |source| PgError::CreateDatabase {
        server: server.to_owned(),
        database: database.to_owned(),
        source,
    };
    let admin =
        sqlx::ConnectOptions::disable_statement_logging(options.clone().database("postgres"));
    let mut conn = sqlx::PgConnection::connect_with(&admin)
        .await
        .map_err(fail)?;
    let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
    let created = conn.execute(create.as_str()).await;
    // The database exists either way; a failed close only leaks a connection the server will reap.
    let _ = conn.close().await;
    match created {
        Ok(_) => {
            tracing::info!(%server, "created the database");
            Ok(())
        }
        Err(e) if is_concurrent_creation(&e) => Ok(()),
        Err(e) => Err(fail(e)),
    }
}

/// SQLSTATE 3D000 `invalid_catalog_name`: the database named in the URL does not exist.
fn is_missing_database(e: &DbErr) -> bool {
    matches!(
        e,
        DbErr::Conn(RuntimeErr::SqlxError(sqlx::Error::Database(d))) if d.code().as_deref() == Some("3D000")
    )
}

/// Another process created the database first: 42P04 `duplicate_database`, or 23505 `unique_violation`
/// when both creations raced past the existence check.
fn is_concurrent_creation(e: &sqlx::Error) -> bool {
    matches!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("42P04") | Some("23505")
    )
}

/// The last record of each `request_id`, in the order of their last appearance: one statement cannot
/// update the same row twice.
pub(crate) fn last_of_each(records: &[RequestRecord]) -> Vec<&RequestRecord> {
    let mut seen = HashSet::with_capacity(records.len());
    let mut last: Vec<&RequestRecord> = records
        .iter()
        .rev()
        .filter(|r| seen.insert(r.request_id.as_str()))
        .collect();
    last.reverse();
    last
}

/// A failed write as the port says it: a refusal for a stale term is [`Deposed`], which the driver does
/// not retry.
fn write_error(e: PgError) -> PortError {
    match e {
        PgError::StaleTerm { term, detail, .. } => PortError::new(Deposed { term, detail }),
        other => PortError::new(other),
    }
}

/// The refusal's message when `error` is the stale-term error of `gpu_coordinator_check_term`.
fn stale_term(error: &DbErr) -> Option<String> {
    let (DbErr::Exec(RuntimeErr::SqlxError(sqlx::Error::Database(db)))
    | DbErr::Query(RuntimeErr::SqlxError(sqlx::Error::Database(db)))) = error
    else {
        return None;
    };
    (db.code().as_deref() == Some(STALE_TERM)).then(|| db.message().to_owned())
}

#[async_trait::async_trait]
impl Journal for PgStore {
    /// Writes nothing behind: nothing to bring up to date, nor to fence off.
    async fn take_over(&self, _term: Term) -> Result<(), PortError> {
        Ok(())
    }

    /// Writes nothing behind: no writer to stop.
    async fn stand_down(&self, _finish: bool) {}

    async fn migrate(&self) -> Result<(), PortError> {
        PgStore::migrate(self).await.map_err(PortError::new)
    }

    async fn load(&self, retain_ended: usize) -> Result<Loaded, PortError> {
        self.load_state(retain_ended).await.map_err(PortError::new)
    }

    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError> {
        PgStore::write(self, batch).await.map_err(write_error)
    }

    async fn trim_ended(&self, retain_ended: usize) -> Result<u64, PortError> {
        PgStore::trim_ended(self, retain_ended)
            .await
            .map_err(PortError::new)
    }

    async fn ping(&self) -> Result<(), PortError> {
        PgStore::ping(self).await.map_err(PortError::new)
    }

    async fn close(&self) {
        PgStore::close(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_coordinator_core::Phase;

    /// A request row of `id` in `phase` (the fields left out are null).
    fn row(id: &str, phase: &str) -> request::Model {
        serde_json::from_value(serde_json::json!({
            "request_id": id, "service_id": "s", "priority": 1, "seq": 1, "encoding": "json",
            "preemptible": true, "lease_ms": 1, "requested_at": 1, "timeout_at": 2, "phase": phase,
        }))
        .expect("a row")
    }

    fn outbox(id: u64) -> OutboxRow {
        OutboxRow {
            id,
            msg_id: format!("m{id}"),
            subject: "gpu.reply.s".into(),
            msgpack: false,
            payload: vec![],
        }
    }

    /// Two batches merged are what writing them in order leaves.
    #[test]
    fn rows_merged_are_the_later_batch_written_over_the_earlier() {
        let mut merged = Rows {
            requests: vec![row("a", "queued"), row("b", "queued")],
            max_fence: 7,
            input_seq: Some(10),
            input_reset: false,
            outbox: vec![outbox(1), outbox(2), outbox(3)],
            published_upto: None,
            term: Some(1),
        };
        merged.then(Rows {
            requests: vec![row("c", "queued"), row("a", "active")],
            max_fence: 5,
            input_seq: None,
            input_reset: false,
            outbox: vec![outbox(4)],
            published_upto: Some(2),
            term: Some(1),
        });
        assert_eq!(
            merged.requests,
            [row("a", "active"), row("b", "queued"), row("c", "queued")],
            "a request's later row wins, in its first place"
        );
        assert_eq!(merged.max_fence, 7, "the fence only rises");
        assert_eq!(
            merged.input_seq,
            Some(10),
            "a batch without a position keeps it"
        );
        assert_eq!(
            merged.outbox,
            [outbox(3), outbox(4)],
            "rows the later deletion covers are not written"
        );
        merged.then(Rows {
            input_seq: Some(12),
            published_upto: Some(1),
            ..Rows::default()
        });
        assert_eq!(
            (merged.input_seq, merged.published_upto),
            (Some(12), Some(2)),
            "the position is the later's, the deletion the highest"
        );
        merged.then(Rows {
            input_seq: Some(3),
            input_reset: true,
            ..Rows::default()
        });
        merged.then(Rows {
            input_seq: Some(4),
            ..Rows::default()
        });
        assert_eq!(
            (merged.input_seq, merged.input_reset),
            (Some(4), true),
            "a reset among them sets the later position as it is"
        );
    }

    /// Many batches merged as they come are the same as merged two at a time, a deletion in the
    /// middle covering outbox rows of the batches before it and not those after.
    #[test]
    fn batches_merged_as_they_come_are_the_pairwise_merge() {
        let batch = |i: u64| Rows {
            requests: vec![
                row(
                    &format!("r{}", i % 7),
                    if i.is_multiple_of(2) {
                        "queued"
                    } else {
                        "active"
                    },
                ),
                row(&format!("n{i}"), "queued"),
            ],
            max_fence: i64::try_from(i % 5).unwrap(),
            input_seq: (!i.is_multiple_of(3)).then(|| i64::try_from(i).unwrap()),
            input_reset: false,
            outbox: vec![outbox(2 * i + 1), outbox(2 * i + 2)],
            published_upto: (i == 20).then_some(30),
            term: Some(1),
        };
        let mut merged = Merged::new(batch(0));
        let mut pairwise = batch(0);
        for i in 1..40 {
            merged.push(batch(i));
            pairwise.then(batch(i));
        }
        let merged = merged.into_rows();
        assert_eq!(merged, pairwise);
        assert_eq!(merged.requests.len(), 7 + 40, "one row per request");
        assert_eq!(merged.outbox.first().map(|r| r.id), Some(31));
        assert_eq!(merged.input_seq, Some(38));
    }

    /// The write-behind journal keeps rows in MessagePack: a row's `pause_ms` goes through it, and
    /// an entry written before the column existed reads back without one.
    #[test]
    fn a_rows_pause_hint_goes_through_the_journal_stream_and_older_entries_have_none() {
        let hinted = request::Model {
            pause_ms: Some(1_500),
            ..row("a", "active")
        };
        let rows = Rows {
            requests: vec![hinted, row("b", "queued")],
            ..Rows::default()
        };
        let bytes = rmp_serde::to_vec_named(&rows).expect("encodes");
        assert_eq!(
            rmp_serde::from_slice::<Rows>(&bytes).expect("decodes"),
            rows
        );

        let mut older = serde_json::to_value(Rows {
            requests: vec![row("c", "queued")],
            ..Rows::default()
        })
        .expect("rows as a map");
        for request in older["requests"].as_array_mut().expect("a list") {
            request
                .as_object_mut()
                .expect("a map")
                .remove("pause_ms")
                .expect("the field is there to remove");
        }
        let bytes = rmp_serde::to_vec_named(&older).expect("encodes");
        let read: Rows = rmp_serde::from_slice(&bytes).expect("an older entry decodes");
        assert_eq!(read.requests, [row("c", "queued")]);
        assert_eq!(read.requests[0].pause_ms, None);
    }

    #[test]
    fn the_literal_phase_is_the_core_s() {
        assert_eq!(
            entities::OPEN,
            format!("\"requests\".\"phase\" <> '{}'", Phase::Ended.as_str())
        );
        assert_eq!(
            entities::ENDED,
            format!("\"requests\".\"phase\" = '{}'", Phase::Ended.as_str())
        );
    }
}
