//! What goes wrong talking to PostgreSQL, and how a failure is told apart: a refusal for a stale term,
//! a missing database, a database another process created first.

use sea_orm::sqlx;
use sea_orm::{DbErr, RuntimeErr};

use crate::ports::{Deposed, PortError};

/// The SQLSTATE `gpu_coordinator_check_term` raises.
const STALE_TERM: &str = "GC001";

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

/// A failed write as the port says it: a refusal for a stale term is [`Deposed`], which the driver does
/// not retry.
pub(crate) fn write_error(e: PgError) -> PortError {
    match e {
        PgError::StaleTerm { term, detail, .. } => PortError::new(Deposed { term, detail }),
        other => PortError::new(other),
    }
}

/// The refusal's message when `error` is the stale-term error of `gpu_coordinator_check_term`.
pub(super) fn stale_term(error: &DbErr) -> Option<String> {
    let (DbErr::Exec(RuntimeErr::SqlxError(sqlx::Error::Database(db)))
    | DbErr::Query(RuntimeErr::SqlxError(sqlx::Error::Database(db)))) = error
    else {
        return None;
    };
    (db.code().as_deref() == Some(STALE_TERM)).then(|| db.message().to_owned())
}

/// SQLSTATE 3D000 `invalid_catalog_name`: the database named in the URL does not exist.
pub(super) fn is_missing_database(e: &DbErr) -> bool {
    matches!(
        e,
        DbErr::Conn(RuntimeErr::SqlxError(sqlx::Error::Database(d))) if d.code().as_deref() == Some("3D000")
    )
}

/// Another process created the database first: 42P04 `duplicate_database`, or 23505 `unique_violation`
/// when both creations raced past the existence check.
pub(super) fn is_concurrent_creation(e: &sqlx::Error) -> bool {
    matches!(
        e.as_database_error().and_then(|d| d.code()).as_deref(),
        Some("42P04") | Some("23505")
    )
}
