//! A rejected request's reason code (`RejectCode`, e.g. `over_service_limit`), kept with its row so
//! that a repeated request is answered with the code it was first rejected with, after a restart too.
//! Nullable: every request that was not rejected, and rows written before it, have none.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

// SQLite has no `ADD COLUMN IF NOT EXISTS` (the migration runs once anyway).
const SQLITE_UP: &str = "ALTER TABLE requests ADD COLUMN reject_code text;";

const SQLITE_DOWN: &str = "ALTER TABLE requests DROP COLUMN reject_code;";

const UP: &str = "ALTER TABLE requests ADD COLUMN IF NOT EXISTS reject_code text;";

const DOWN: &str = "ALTER TABLE requests DROP COLUMN IF EXISTS reject_code;";

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
