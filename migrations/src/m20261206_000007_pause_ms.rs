//! A request's `pause_ms` hint (how long its holder says it takes to pause), kept with its row so
//! that a restart or a takeover breaks ties between victims as the coordinator before it did.
//! Nullable: rows written before it, and requests that give no hint, have none.

use sea_orm_migration::prelude::*;

use crate::{add_request_column, drop_request_column};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_request_column(manager, "pause_ms bigint").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_request_column(manager, "pause_ms").await
    }
}
