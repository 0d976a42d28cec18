//! A rejected request's reason code (`RejectCode`, e.g. `over_service_limit`), kept with its row so
//! that a repeated request is answered with the code it was first rejected with, after a restart too.
//! Nullable: every request that was not rejected, and rows written before it, have none.

use sea_orm_migration::prelude::*;

use crate::{add_request_column, drop_request_column};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_request_column(manager, "reject_code text").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_request_column(manager, "reject_code").await
    }
}
