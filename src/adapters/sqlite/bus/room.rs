//! The size limit of the embedded bus (`embedded.max_bytes`): what a row costs, what both tables
//! keep, and the rows deleted to make room.

use std::sync::atomic::Ordering;

use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, DbErr, Statement};

use super::SqliteBus;

/// What a row costs beside its payload and subject, as `embedded.max_bytes` counts it.
const ROW_BYTES: u64 = 64;

/// Rows deleted per statement when making room.
const ROOM_PAGE: i64 = 256;

/// The size of every row, as `embedded.max_bytes` counts it (the SQL of [`row_bytes`]).
const ROW_SIZE_SQL: &str = "length(payload) + length(subject) + 64";

/// A row's size as `embedded.max_bytes` counts it.
pub(super) fn row_bytes(subject: &str, payload: usize) -> u64 {
    payload as u64 + subject.len() as u64 + ROW_BYTES
}

/// The bytes both tables keep, as [`row_bytes`] counts them.
pub(super) async fn stored_bytes(db: &DatabaseConnection) -> Result<u64, DbErr> {
    let sql = format!(
        "SELECT COALESCE((SELECT sum({ROW_SIZE_SQL}) FROM bus_inputs), 0) \
         + COALESCE((SELECT sum({ROW_SIZE_SQL}) FROM bus_outputs), 0) AS used"
    );
    let row = db
        .query_one(Statement::from_string(DbBackend::Sqlite, sql))
        .await?;
    Ok(row
        .and_then(|r| r.try_get::<i64>("", "used").ok())
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0))
}

impl SqliteBus {
    /// Deletes rows until the tables keep at most `target` bytes: the handled inputs first, oldest
    /// first, then the oldest outputs (history). Inputs not yet handled are never deleted. Returns how
    /// many rows went. Called with the write turn held.
    pub(super) async fn make_room(&self, target: u64) -> Result<u64, DbErr> {
        let inner = &self.inner;
        let handled = i64::try_from(inner.handled.load(Ordering::SeqCst)).unwrap_or(i64::MAX);
        let mut removed = 0;
        for (table, bound) in [("bus_inputs", Some(handled)), ("bus_outputs", None)] {
            while inner.used.load(Ordering::SeqCst) > target {
                let sql = format!(
                    "DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} \
                     WHERE seq <= ?1 ORDER BY seq LIMIT ?2) RETURNING {ROW_SIZE_SQL} AS size"
                );
                let rows = inner
                    .db
                    .query_all(Statement::from_sql_and_values(
                        DbBackend::Sqlite,
                        sql,
                        [bound.unwrap_or(i64::MAX).into(), ROOM_PAGE.into()],
                    ))
                    .await?;
                if rows.is_empty() {
                    break;
                }
                removed += rows.len() as u64;
                let freed: u64 = rows
                    .iter()
                    .filter_map(|r| r.try_get::<i64>("", "size").ok())
                    .map(|n| u64::try_from(n).unwrap_or(0))
                    .sum();
                inner
                    .used
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                        Some(u.saturating_sub(freed))
                    })
                    .ok();
            }
        }
        Ok(removed)
    }
}
