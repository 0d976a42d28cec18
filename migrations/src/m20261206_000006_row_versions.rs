//! Rows that never go back: each request row carries the number of the batch that wrote it
//! (`requests.version`), and `fence.version` the highest such number written, from which a new leader
//! numbers its batches on. A row is overwritten only by one of at least its version, so an older
//! batch written again late (a write-behind journal read back at a takeover while the earlier
//! leader's writer still ran) cannot put an older state over a newer one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

// SQLite has no `ADD COLUMN IF NOT EXISTS` (the migration runs once anyway).
const SQLITE_UP: &str = r#"
ALTER TABLE requests ADD COLUMN version bigint;
ALTER TABLE fence ADD COLUMN version bigint NOT NULL DEFAULT 0;
"#;

const SQLITE_DOWN: &str = r#"
ALTER TABLE fence DROP COLUMN version;
ALTER TABLE requests DROP COLUMN version;
"#;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
ALTER TABLE requests ADD COLUMN IF NOT EXISTS version bigint;
ALTER TABLE fence ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
"#;

const DOWN: &str = r#"
ALTER TABLE fence DROP COLUMN IF EXISTS version;
ALTER TABLE requests DROP COLUMN IF EXISTS version;
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
