//! A request's `pause_ms` hint (how long its holder says it takes to pause), kept with its row so
//! that a restart or a takeover breaks ties between victims as the coordinator before it did.
//! Nullable: rows written before it, and requests that give no hint, have none.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

// SQLite has no `ADD COLUMN IF NOT EXISTS` (the migration runs once anyway).
const SQLITE_UP: &str = "ALTER TABLE requests ADD COLUMN pause_ms bigint;";

const SQLITE_DOWN: &str = "ALTER TABLE requests DROP COLUMN pause_ms;";

const UP: &str = "ALTER TABLE requests ADD COLUMN IF NOT EXISTS pause_ms bigint;";

const DOWN: &str = "ALTER TABLE requests DROP COLUMN IF EXISTS pause_ms;";

#[derive(DeriveMigrationName)]
pub struct Migration;

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
