//! One active coordinator per deployment: the `leader` row is its lease (holder, term, expiry by the
//! server's clock), and every journal write is fenced by the writer's term.
//!
//! - `leader`: one row. A coordinator takes it when it is free or expired, raising `term`; the leader
//!   extends `expires_at` while it acts. Terms only rise.
//! - `coordinators`: every coordinator of the deployment, leader or standby, with when it was last seen,
//!   so that `status` can name the standbys.
//! - `gpu_coordinator_check_term(stored, mine)`: true when they are equal, else raises SQLSTATE `GC001`
//!   ("stale term"). The journal's batch statement calls it on the `leader` row, so that a batch written
//!   under a term that is no longer the leader's changes nothing and says why; the row lock it takes
//!   also orders it against a takeover.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::run;

// SQLite: nothing. An embedded coordinator leads by holding the lock on its data directory, and no
// other process writes its database.
const SQLITE_UP: &str = "";

const SQLITE_DOWN: &str = "";

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE IF NOT EXISTS leader (
    id          integer     PRIMARY KEY CHECK (id = 1),
    term        bigint      NOT NULL,
    holder      text        NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS coordinators (
    holder      text        PRIMARY KEY,
    seen_at     timestamptz NOT NULL
);

CREATE OR REPLACE FUNCTION gpu_coordinator_check_term(stored bigint, mine bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF stored IS DISTINCT FROM mine THEN
        RAISE EXCEPTION 'stale term %: the leader is in term %', mine, stored USING ERRCODE = 'GC001';
    END IF;
    RETURN true;
END
$$;
"#;

const DOWN: &str = r#"
DROP FUNCTION IF EXISTS gpu_coordinator_check_term(bigint, bigint);
DROP TABLE IF EXISTS coordinators;
DROP TABLE IF EXISTS leader;
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
