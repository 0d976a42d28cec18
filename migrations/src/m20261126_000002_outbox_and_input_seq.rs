//! Exactly-once handling of inputs and outputs across crashes.
//!
//! - `fence.input_seq`: the stream sequence of the last input whose effects are committed. At start the
//!   coordinator reads its inputs again from the one after it, in order, and skips any it already
//!   handled.
//! - `outbox`: every message to publish (reply, control order, event), written in the same statement as
//!   the effects that caused it and deleted once JetStream has stored it. At start whatever is left is
//!   published again under its `msg_id` (`Nats-Msg-Id`), so a crash between the commit and the PubAck
//!   loses no message, and JetStream drops a copy it already has.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

// SQLite has no `ADD COLUMN IF NOT EXISTS` (the migration runs once anyway) and calls `bytea` `blob`.
const SQLITE_UP: &str = r#"
ALTER TABLE fence ADD COLUMN input_seq bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS outbox (
    id       bigint  PRIMARY KEY,
    msg_id   text    NOT NULL,
    subject  text    NOT NULL,
    msgpack  boolean NOT NULL,
    payload  blob    NOT NULL
);
"#;

const SQLITE_DOWN: &str = r#"
DROP TABLE IF EXISTS outbox;
ALTER TABLE fence DROP COLUMN input_seq;
"#;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
ALTER TABLE fence ADD COLUMN IF NOT EXISTS input_seq bigint NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS outbox (
    id       bigint  PRIMARY KEY,
    msg_id   text    NOT NULL,
    subject  text    NOT NULL,
    msgpack  boolean NOT NULL,
    payload  bytea   NOT NULL
);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS outbox;
ALTER TABLE fence DROP COLUMN IF EXISTS input_seq;
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
