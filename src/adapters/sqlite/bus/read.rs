//! Reading the tables of the embedded bus: a reader of the outputs that catches up from the table
//! and then follows the broadcast, the history of either stream, and the rows themselves.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt as _};
use gpu_coordinator_client::AnswerFeed;
use gpu_coordinator_wire::codec::MSGPACK_CONTENT_TYPE;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement};
use tokio::sync::broadcast;

use super::{table, SqliteBus, PAGE};
use crate::ports::{subject_matches, PortError, ReadFrom, Stored, StoredStream, Which};
use crate::retry::backoff;

impl SqliteBus {
    /// The outputs on any of `filters` from `from` on, endless (see the module's doc).
    pub(super) async fn follow_outputs(
        &self,
        filters: Vec<String>,
        from: ReadFrom,
    ) -> Result<StoredStream, DbErr> {
        // Subscribed before the start is read: what is committed meanwhile is in the broadcast.
        let rx = self.inner.outputs.subscribe();
        let db = self.inner.db.clone();
        let cursor = start(&db, Which::Outputs, from).await?;
        let state = Follow {
            db,
            filters,
            cursor,
            rx,
            buffer: VecDeque::new(),
            from_table: true,
            failing: None,
        };
        Ok(futures::stream::unfold(state, |mut state| async move {
            state.next().await.map(|item| (item, state))
        })
        .boxed())
    }

    /// The messages of `which` on `filter` from `from` up to the last stored now.
    pub(super) async fn read_history(
        &self,
        which: Which,
        filter: String,
        from: ReadFrom,
    ) -> Result<StoredStream, DbErr> {
        let db = self.inner.db.clone();
        let end = last_seq(&db, which).await?;
        let cursor = start(&db, which, from).await?;
        let pages = futures::stream::try_unfold(cursor, move |cursor| {
            let db = db.clone();
            async move {
                if cursor >= end {
                    return Ok(None);
                }
                let rows = read_rows(&db, which, cursor, PAGE).await?;
                let Some(last) = rows.last().map(|r| r.seq) else {
                    return Ok(None);
                };
                let rows: Vec<Stored> = rows.into_iter().filter(|r| r.seq <= end).collect();
                Ok(Some((
                    futures::stream::iter(rows.into_iter().map(Ok)),
                    last,
                )))
            }
        });
        let bus = self.clone();
        Ok(pages
            .map_err(move |e| bus.port_error(e))
            .try_flatten()
            .try_filter(move |m| std::future::ready(subject_matches(&filter, &m.subject)))
            .boxed())
    }
}

/// Hands every reply and `requested` event to the answers reader.
pub(super) async fn feed_answers(mut outputs: StoredStream, feed: AnswerFeed) {
    while let Some(next) = outputs.next().await {
        match next {
            Ok(m) => feed.feed(&m.subject, m.encoding(), &m.payload),
            Err(e) => tracing::warn!("reading the embedded bus's outputs: {e}"),
        }
    }
}

/// A reader of the outputs: the table to catch up, the broadcast once caught up.
pub(super) struct Follow {
    db: DatabaseConnection,
    filters: Vec<String>,
    /// The last output seen.
    cursor: u64,
    rx: broadcast::Receiver<Stored>,
    buffer: VecDeque<Stored>,
    from_table: bool,
    /// Since the last read that failed: how long to wait before the next error is answered.
    failing: Option<backon::ExponentialBackoff>,
}

/// The next wait of `failing` (started on a first failure), as [`backoff`] spaces a server's retries:
/// a reader that answered each error at once would be asked again at once, and spin on a database
/// that keeps failing.
pub(super) fn next_wait(failing: &mut Option<backon::ExponentialBackoff>) -> Duration {
    use backon::BackoffBuilder as _;
    failing
        .get_or_insert_with(|| backoff().build())
        .next()
        .unwrap_or(Duration::from_secs(5))
}

impl Follow {
    async fn next(&mut self) -> Option<Result<Stored, PortError>> {
        loop {
            if let Some(m) = self.buffer.pop_front() {
                if m.seq <= self.cursor {
                    continue;
                }
                self.cursor = m.seq;
                if self.filters.iter().any(|f| subject_matches(f, &m.subject)) {
                    return Some(Ok(m));
                }
                continue;
            }
            if self.from_table {
                match read_rows(&self.db, Which::Outputs, self.cursor, PAGE).await {
                    Ok(rows) if rows.is_empty() => {
                        self.failing = None;
                        self.from_table = false;
                    }
                    Ok(rows) => {
                        self.failing = None;
                        self.buffer.extend(rows);
                    }
                    Err(e) => {
                        // Read again at the next call, after a wait.
                        tokio::time::sleep(next_wait(&mut self.failing)).await;
                        return Some(Err(PortError::msg(format!(
                            "reading the embedded bus's outputs: {e}"
                        ))));
                    }
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(m) if m.seq <= self.cursor => {}
                Ok(m) if m.seq == self.cursor + 1 => self.buffer.push_back(m),
                // A gap (a row committed out of the broadcast's order) or a reader left behind:
                // the table has every row.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.from_table = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The position a read starts after.
pub(super) async fn start(
    db: &DatabaseConnection,
    which: Which,
    from: ReadFrom,
) -> Result<u64, DbErr> {
    Ok(match from {
        ReadFrom::Start => 0,
        ReadFrom::After(seq) => seq,
        ReadFrom::New => last_seq(db, which).await?,
        ReadFrom::Since(ms) => {
            let sql = format!(
                "SELECT min(seq) AS seq FROM {} WHERE stored_at >= ?1",
                table(which)
            );
            let first = db
                .query_one(Statement::from_sql_and_values(
                    DbBackend::Sqlite,
                    sql,
                    [i64::try_from(ms).unwrap_or(i64::MAX).into()],
                ))
                .await?
                .and_then(|row| row.try_get::<Option<i64>>("", "seq").ok().flatten());
            match first {
                Some(seq) => u64::try_from(seq).unwrap_or(0).saturating_sub(1),
                None => last_seq(db, which).await?,
            }
        }
    })
}

/// The last position ever given in `which` (kept by `AUTOINCREMENT` when rows are removed).
pub(super) async fn last_seq(
    db: &impl sea_orm::ConnectionTrait,
    which: Which,
) -> Result<u64, DbErr> {
    let row = db
        .query_one(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            "SELECT seq FROM sqlite_sequence WHERE name = ?1",
            [table(which).into()],
        ))
        .await?;
    Ok(row
        .and_then(|r| r.try_get::<i64>("", "seq").ok())
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0))
}

/// Up to `limit` rows of `which` after `cursor`, in order.
pub(super) async fn read_rows(
    db: &DatabaseConnection,
    which: Which,
    cursor: u64,
    limit: i64,
) -> Result<Vec<Stored>, DbErr> {
    let sql = match which {
        Which::Inputs => {
            "SELECT seq, subject, content_type, payload, stored_at FROM bus_inputs \
             WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        }
        Which::Outputs => {
            "SELECT seq, subject, msgpack, payload, stored_at FROM bus_outputs \
             WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        }
    };
    let rows = db
        .query_all(Statement::from_sql_and_values(
            DbBackend::Sqlite,
            sql,
            [
                i64::try_from(cursor).unwrap_or(i64::MAX).into(),
                limit.into(),
            ],
        ))
        .await?;
    rows.iter().map(|row| stored(row, which)).collect()
}

pub(super) fn stored(row: &QueryResult, which: Which) -> Result<Stored, DbErr> {
    let content_type = match which {
        Which::Inputs => row.try_get::<Option<String>>("", "content_type")?,
        Which::Outputs => row
            .try_get::<bool>("", "msgpack")?
            .then(|| MSGPACK_CONTENT_TYPE.to_owned()),
    };
    Ok(Stored {
        seq: u64::try_from(row.try_get::<i64>("", "seq")?).unwrap_or(0),
        subject: row.try_get("", "subject")?,
        content_type,
        payload: Bytes::from(row.try_get::<Vec<u8>>("", "payload")?),
        stored_at: u64::try_from(row.try_get::<i64>("", "stored_at")?).ok(),
    })
}
