//! The schema of the GPU Coordinator, as `sea-orm-migration` migrations that run on Postgres (the
//! distributed mode) and on SQLite (the embedded mode); where the two dialects differ, a migration
//! holds the SQL of each.
//!
//! The schema is small on purpose: one row per request (`requests`), one row holding the highest fence
//! ever issued and the last input handled (`fence`), and the messages not yet stored by JetStream
//! (`outbox`), and the lease of the one active coordinator (`leader`). The adapter `gpu_coordinator::adapters::postgres` reads and writes it; this crate
//! only shapes it. The SQL of a released migration is never edited (the SQLite branches were added beside
//! the Postgres SQL, unchanged, when the embedded mode came): a change is a new migration appended to
//! [`Migrator::migrations`].

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_requests_and_fence;
mod m20261126_000002_outbox_and_input_seq;
mod m20261128_000003_leader;
mod m20261128_000004_scoped_request_ids;
mod m20261129_000005_embedded_bus;
mod m20261206_000006_row_versions;
mod m20261206_000007_pause_ms;
mod m20261206_000008_reject_code;

/// Every migration of the schema, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_requests_and_fence::Migration),
            Box::new(m20261126_000002_outbox_and_input_seq::Migration),
            Box::new(m20261128_000003_leader::Migration),
            Box::new(m20261128_000004_scoped_request_ids::Migration),
            Box::new(m20261129_000005_embedded_bus::Migration),
            Box::new(m20261206_000006_row_versions::Migration),
            Box::new(m20261206_000007_pause_ms::Migration),
            Box::new(m20261206_000008_reject_code::Migration),
        ]
    }
}

/// Runs `sql` (any number of statements; none when empty).
/// Adds the nullable column `ddl` (`name type`) to `requests`: rows written before have none. SQLite has
/// no `ADD COLUMN IF NOT EXISTS` (the migration runs once anyway).
pub(crate) async fn add_request_column(
    manager: &SchemaManager<'_>,
    ddl: &str,
) -> Result<(), DbErr> {
    let sql = match manager.get_database_backend() {
        sea_orm_migration::sea_orm::DbBackend::Sqlite => {
            format!("ALTER TABLE requests ADD COLUMN {ddl};")
        }
        _ => format!("ALTER TABLE requests ADD COLUMN IF NOT EXISTS {ddl};"),
    };
    run(manager, &sql).await
}

/// Drops the column `name` of `requests`, undoing [`add_request_column`].
pub(crate) async fn drop_request_column(
    manager: &SchemaManager<'_>,
    name: &str,
) -> Result<(), DbErr> {
    let sql = match manager.get_database_backend() {
        sea_orm_migration::sea_orm::DbBackend::Sqlite => {
            format!("ALTER TABLE requests DROP COLUMN {name};")
        }
        _ => format!("ALTER TABLE requests DROP COLUMN IF EXISTS {name};"),
    };
    run(manager, &sql).await
}

pub(crate) async fn run(manager: &SchemaManager<'_>, sql: &str) -> Result<(), DbErr> {
    if sql.trim().is_empty() {
        return Ok(());
    }
    manager
        .get_connection()
        .execute_unprepared(sql)
        .await
        .map(|_| ())
}
