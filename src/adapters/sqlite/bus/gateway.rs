//! The embedded bus as the HTTP API's [`Gateway`]: inputs stored as they are submitted, the outputs
//! followed and read back.

use std::sync::atomic::Ordering;

use async_trait::async_trait;
use sea_orm::{ConnectionTrait as _, DbBackend, Statement};

use super::read::last_seq;
use super::room::row_bytes;
use super::{SqliteBus, SqliteError};
use crate::clock::now_ms;
use crate::ports::{Answers, Gateway, PortError, ReadFrom, StoredStream, Which};

/// An input refused because the embedded bus keeps `embedded.max_bytes` of inputs not yet handled.
#[derive(Debug, thiserror::Error)]
#[error(
    "the embedded bus is full: {used} of its {max} bytes (embedded.max_bytes) hold inputs the \
     coordinator has not handled yet; the input was not stored"
)]
struct BusFull {
    used: u64,
    max: u64,
}

#[async_trait]
impl Gateway for SqliteBus {
    async fn submit(&self, subject: &str, payload: Vec<u8>) -> Result<(), PortError> {
        let at = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let size = row_bytes(subject, payload.len());
        let write_error = |source| {
            PortError::new(SqliteError::Write {
                file: self.inner.file.clone(),
                records: 0,
                source,
            })
        };
        let turn = self.inner.writes.lock().await;
        let max = self.inner.max_bytes;
        if self.inner.used.load(Ordering::SeqCst) + size > max {
            self.make_room(max.saturating_sub(size))
                .await
                .map_err(write_error)?;
            let used = self.inner.used.load(Ordering::SeqCst);
            if used + size > max {
                return Err(PortError::new(BusFull { used, max }));
            }
        }
        // `query_all`, not `query_one`, which would acknowledge an input that is not stored: outside
        // a transaction the INSERT commits when the statement ends, and `query_one` (sqlx's
        // `fetch_optional`) stops at the first row and resets the statement, ignoring what the reset
        // says (sqlx-sqlite 0.8.6, `ExecuteIter`'s `Drop`: `self.statement.reset().ok()`). On a full
        // disk that commit fails and the row is gone, yet the row RETURNING gave was already read.
        // Read to its end, the statement's last step carries the commit's error.
        let row = self
            .inner
            .db
            .query_all(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "INSERT INTO bus_inputs (subject, content_type, payload, stored_at) \
                 VALUES (?1, NULL, ?2, ?3) RETURNING seq",
                [subject.into(), payload.into(), at.into()],
            ))
            .await
            .map_err(write_error)?
            .into_iter()
            .next();
        self.inner.used.fetch_add(size, Ordering::SeqCst);
        drop(turn);
        if let Some(seq) = row
            .and_then(|r| r.try_get::<i64>("", "seq").ok())
            .and_then(|s| u64::try_from(s).ok())
        {
            self.inner
                .input_end
                .send_modify(|end| *end = (*end).max(seq));
        }
        Ok(())
    }

    async fn follow(&self, filter: &str, from: ReadFrom) -> Result<StoredStream, PortError> {
        self.follow_outputs(vec![filter.to_owned()], from)
            .await
            .map_err(|e| self.port_error(e))
    }

    async fn history(
        &self,
        which: Which,
        filter: &str,
        from: ReadFrom,
    ) -> Result<StoredStream, PortError> {
        self.read_history(which, filter.to_owned(), from)
            .await
            .map_err(|e| self.port_error(e))
    }

    async fn last_seq(&self, which: Which) -> Result<u64, PortError> {
        last_seq(&self.inner.db, which)
            .await
            .map_err(|e| self.port_error(e))
    }

    fn answers(&self) -> &dyn Answers {
        &self.inner.answers
    }

    async fn health(&self) -> Result<(), String> {
        Ok(())
    }
}
