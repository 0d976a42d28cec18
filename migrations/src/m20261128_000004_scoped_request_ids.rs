//! Request ids scoped to their service: the coordinator now keeps a request as
//! `<service_id>` + U+001F + `<request_id>` (two services may use the same id). Rows written before
//! are given their scope here, so that their services find them by the ids they used.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

// SQLite spells `chr` and `strpos` as `char` and `instr`.
const SQLITE_UP: &str = r#"
UPDATE requests
   SET request_id = service_id || char(31) || request_id
 WHERE instr(request_id, char(31)) = 0;
"#;

const SQLITE_DOWN: &str = r#"
UPDATE requests
   SET request_id = substr(request_id, instr(request_id, char(31)) + 1)
 WHERE instr(request_id, char(31)) > 0;
"#;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
UPDATE requests
   SET request_id = service_id || chr(31) || request_id
 WHERE strpos(request_id, chr(31)) = 0;
"#;

const DOWN: &str = r#"
UPDATE requests
   SET request_id = substr(request_id, strpos(request_id, chr(31)) + 1)
 WHERE strpos(request_id, chr(31)) > 0;
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
