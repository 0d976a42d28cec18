//! The embedded bus: the input and output streams of a coordinator that runs with no NATS, as two
//! tables of its SQLite database (the embedded mode). Postgres gets nothing: a deployment on Postgres
//! uses JetStream for its streams.
//!
//! - `bus_inputs`: every input, numbered by `seq` (never reused, so that the journal's input position
//!   names one input for good), with the instant it was stored. Inputs are removed once handled and
//!   committed.
//! - `bus_outputs`: every message the coordinator published (replies, control orders, events), once per
//!   `msg_id`, numbered by `seq`: the history that `GET /gpu/events` and `audit` replay, kept for
//!   `embedded.keep_ms`.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

const SQLITE_UP: &str = r#"
CREATE TABLE IF NOT EXISTS bus_inputs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    subject       text    NOT NULL,
    content_type  text    NULL,
    payload       blob    NOT NULL,
    stored_at     bigint  NOT NULL
);
CREATE TABLE IF NOT EXISTS bus_outputs (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id     text    NOT NULL UNIQUE,
    subject    text    NOT NULL,
    msgpack    boolean NOT NULL,
    payload    blob    NOT NULL,
    stored_at  bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS bus_outputs_stored_at ON bus_outputs (stored_at);
"#;

const SQLITE_DOWN: &str = r#"
DROP TABLE IF EXISTS bus_outputs;
DROP TABLE IF EXISTS bus_inputs;
"#;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Sqlite => run(manager, SQLITE_UP).await,
            _ => Ok(()),
        }
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        match manager.get_database_backend() {
            DbBackend::Sqlite => run(manager, SQLITE_DOWN).await,
            _ => Ok(()),
        }
    }
}
