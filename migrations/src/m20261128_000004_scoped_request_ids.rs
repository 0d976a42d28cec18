//! Request ids scoped to their service: the coordinator now keeps a request as
//! `<service_id>` + U+001F + `<request_id>` (two services may use the same id). Rows written before
//! are given their scope here, so that their services find them by the ids they used.

use sea_orm_migration::prelude::*;

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
        manager
            .get_connection()
            .execute_unprepared(UP)
            .await
            .map(|_| ())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(DOWN)
            .await
            .map(|_| ())
    }
}
