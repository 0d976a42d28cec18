//! The first schema: `requests` (one row per request) and `fence` (the highest fence ever issued).
//!
//! Written as SQL rather than with the schema builder because the two read paths rely on partial indexes,
//! which the builder cannot express, and because the SQL is the schema a person reads in `psql`.
//!
//! - Every `u64` of the core is a `bigint` (milliseconds since the Unix epoch for instants); the adapter
//!   refuses values above `i64::MAX` rather than wrapping them.
//! - `phase`, `outcome` (the core's `End`) and `encoding` are text, with the names the core and the wire
//!   crate give them (`Phase::as_str`, `End::as_str`, `Encoding::as_str`).
//! - `requests_open_seq` makes "every request not ended, in arrival order" one index scan, however many
//!   ended rows the table keeps.
//! - `requests_ended_recent` makes "the N most recently ended" one backward index scan with a limit.
//! - `requests_fence` makes `max(fence)` an index read, a cross-check of the `fence` row at start.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

// SQLite takes the same SQL: its types name affinities, and it has partial indexes and `ON CONFLICT`.
const SQLITE_UP: &str = UP;

const SQLITE_DOWN: &str = DOWN;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE IF NOT EXISTS requests (
    request_id      text        PRIMARY KEY,
    service_id      text        NOT NULL,
    priority        smallint    NOT NULL,
    seq             bigint      NOT NULL,
    encoding        text        NOT NULL,
    vram_mb         bigint      NULL,
    gpu_pin         text        NULL,
    preemptible     boolean     NOT NULL,
    lease_ms        bigint      NOT NULL,
    requested_at    bigint      NOT NULL,
    timeout_at      bigint      NOT NULL,
    phase           text        NOT NULL,
    gpu             text        NULL,
    held_mb         bigint      NULL,
    fence           bigint      NULL,
    granted_at      bigint      NULL,
    expires_at      bigint      NULL,
    pause_deadline  bigint      NULL,
    paused_at       bigint      NULL,
    waited_ms       bigint      NULL,
    outcome         text        NULL,
    ended_at        bigint      NULL,
    detail          text        NULL,
    CONSTRAINT requests_seq_key UNIQUE (seq)
);

CREATE INDEX IF NOT EXISTS requests_open_seq
    ON requests (seq) WHERE phase <> 'ended';

CREATE INDEX IF NOT EXISTS requests_ended_recent
    ON requests (ended_at, seq) WHERE phase = 'ended';

CREATE INDEX IF NOT EXISTS requests_fence
    ON requests (fence) WHERE fence IS NOT NULL;

CREATE TABLE IF NOT EXISTS fence (
    id          integer     PRIMARY KEY CHECK (id = 1),
    max_fence   bigint      NOT NULL
);

INSERT INTO fence (id, max_fence) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS fence;
DROP TABLE IF EXISTS requests;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DbBackend::Sqlite => SQLITE_UP,
            _ => UP,
        };
        run(manager, sql).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let sql = match manager.get_database_backend() {
            DbBackend::Sqlite => SQLITE_DOWN,
            _ => DOWN,
        };
        run(manager, sql).await
    }
}
