//! The embedded bus: the input and output streams as two tables of the SQLite database
//! (`bus_inputs`, `bus_outputs`), for a coordinator with no NATS.
//!
//! - An input is stored by the HTTP API ([`Gateway::submit`](crate::ports::Gateway::submit)) in its
//!   own transaction, numbered by `seq`: once `submit` returns it is on disk, and the driver reads
//!   it in `seq` order (a commit is what makes a row visible, and SQLite commits one writer at a
//!   time, so `seq` order is commit order and a reader never sees an input before an earlier one).
//! - The driver's outputs are stored once per `msg_id` (`ON CONFLICT DO NOTHING`): the outbox's
//!   replays after a crash store nothing twice, however late.
//! - Readers of the outputs (SSE streams, the HTTP calls waiting for a reply) get new rows from an
//!   in-process broadcast once they are committed, and read the table itself to catch up (at start,
//!   after a gap, or when they fell behind the broadcast): nothing committed is missed.

mod gateway;
mod read;
mod room;
#[cfg(test)]
mod tests;

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use gpu_coordinator_client::AnswerReader;
use gpu_coordinator_wire::{EventKind, Subjects};
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait as _,
};
use tokio::sync::{broadcast, watch};

use super::{SqliteError, SqliteJournal};
use crate::clock::now_ms;
use crate::ports::{
    Delivery, InputLog, Inputs, Outbound, OutputLog, PortError, PublishFailure, ReadFrom, Settle,
    StatusQueries, Stored, Which,
};
use crate::sync::lock;
use read::{feed_answers, last_seq, next_wait, read_rows};
use room::{row_bytes, stored_bytes};

/// Rows read per query when catching up.
const PAGE: i64 = 512;

/// New outputs kept for readers that are behind; one further behind reads the table.
const BROADCAST: usize = 4096;
/// The streams of the embedded bus, in the SQLite database of the journal.
#[derive(Clone)]
pub struct SqliteBus {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    file: PathBuf,
    /// The turn to write, shared with the journal ([`SqliteJournal::writes`]).
    writes: Arc<tokio::sync::Mutex<()>>,
    /// How long handled inputs and outputs are kept (`embedded.keep_ms`).
    keep_ms: u64,
    /// The most bytes both tables keep (`embedded.max_bytes`).
    max_bytes: u64,
    /// The bytes both tables keep now, as [`row_bytes`] counts them (changed under the write turn).
    used: AtomicU64,
    /// The last input the coordinator handled, as it last said (`trim_inputs`): those up to it may go.
    handled: AtomicU64,
    /// The last input stored: wakes the driver's input stream.
    input_end: watch::Sender<u64>,
    /// Outputs as they are committed.
    outputs: broadcast::Sender<Stored>,
    /// Which opening of the inputs is current: an older one's stream ends.
    generation: AtomicU64,
    reconnects: watch::Sender<u64>,
    answers: AnswerReader,
    /// Since the inputs' last read that failed, across reopenings of the inputs (the driver reopens
    /// them on each error): how long to wait before the next error is answered.
    inputs_failing: std::sync::Mutex<Option<backon::ExponentialBackoff>>,
}

fn table(which: Which) -> &'static str {
    match which {
        Which::Inputs => "bus_inputs",
        Which::Outputs => "bus_outputs",
    }
}

impl SqliteBus {
    /// The bus in `store`'s database (its schema already migrated), for the subjects of `subjects`.
    /// Starts routing the replies and `requested` events to
    /// [`Gateway::answers`](crate::ports::Gateway::answers).
    pub async fn open(
        store: &SqliteJournal,
        subjects: &Subjects,
        keep_ms: u64,
        max_bytes: u64,
    ) -> Result<SqliteBus, SqliteError> {
        let db = store.connection().clone();
        let file = store.file().to_owned();
        let used = stored_bytes(&db)
            .await
            .map_err(|source| SqliteError::Read {
                file: file.clone(),
                source,
            })?;
        let last_input =
            last_seq(&db, Which::Inputs)
                .await
                .map_err(|source| SqliteError::Read {
                    file: file.clone(),
                    source,
                })?;
        let (answers, feed) = AnswerReader::fed(subjects);
        let bus = SqliteBus {
            inner: Arc::new(Inner {
                db,
                file,
                writes: store.writes(),
                keep_ms,
                max_bytes,
                used: AtomicU64::new(used),
                handled: AtomicU64::new(0),
                input_end: watch::channel(last_input).0,
                outputs: broadcast::channel(BROADCAST).0,
                generation: AtomicU64::new(0),
                reconnects: watch::channel(0).0,
                answers,
                inputs_failing: std::sync::Mutex::default(),
            }),
        };
        let answers = bus
            .follow_outputs(
                vec![
                    subjects.reply("*"),
                    subjects.event(EventKind::Requested, "*"),
                ],
                ReadFrom::New,
            )
            .await
            .map_err(|source| SqliteError::Read {
                file: store.file().to_owned(),
                source,
            })?;
        tokio::spawn(feed_answers(answers, feed));
        Ok(bus)
    }

    fn port_error(&self, source: DbErr) -> PortError {
        PortError::new(SqliteError::Read {
            file: self.inner.file.clone(),
            source,
        })
    }
}

#[async_trait]
impl InputLog for SqliteBus {
    /// Every input is acknowledged by itself.
    fn acks_cover_earlier(&self) -> bool {
        false
    }

    /// Numbers the inputs after `inputs_after` when the table is behind it (a journal that handled
    /// inputs of another bus): a default request id never names an older request.
    async fn ensure_streams(&self, inputs_after: Option<u64>) -> Result<(), PortError> {
        let Some(after) = inputs_after else {
            return Ok(());
        };
        let db = &self.inner.db;
        if last_seq(db, Which::Inputs)
            .await
            .map_err(|e| self.port_error(e))?
            >= after
        {
            return Ok(());
        }
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let _turn = self.inner.writes.lock().await;
        let txn = db.begin().await.map_err(|e| self.port_error(e))?;
        for sql in [
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'bus_inputs', ?1 \
             WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'bus_inputs')",
            "UPDATE sqlite_sequence SET seq = max(seq, ?1) WHERE name = 'bus_inputs'",
        ] {
            txn.execute(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                sql,
                [after.into()],
            ))
            .await
            .map_err(|e| self.port_error(e))?;
        }
        txn.commit().await.map_err(|e| self.port_error(e))?;
        self.inner
            .input_end
            .send_modify(|end| *end = (*end).max(after as u64));
        Ok(())
    }

    async fn input_position(&self, handled: u64) -> Result<u64, PortError> {
        let last = last_seq(&self.inner.db, Which::Inputs)
            .await
            .map_err(|e| self.port_error(e))?;
        Ok(if handled > last { 0 } else { handled })
    }

    async fn input_end(&self) -> Result<u64, PortError> {
        Ok(*self.inner.input_end.borrow())
    }

    /// Removes the handled inputs and the outputs older than `embedded.keep_ms`, and, past 80% of
    /// `embedded.max_bytes`, the oldest handled inputs and outputs down to 70%.
    async fn trim_inputs(&self, handled: u64) -> Result<u64, PortError> {
        self.inner.handled.fetch_max(handled, Ordering::SeqCst);
        let before = i64::try_from(now_ms().saturating_sub(self.inner.keep_ms)).unwrap_or(0);
        let handled = i64::try_from(handled).unwrap_or(i64::MAX);
        let mut removed = 0;
        let _turn = self.inner.writes.lock().await;
        let max = self.inner.max_bytes;
        if self.inner.used.load(Ordering::SeqCst) > max / 10 * 8 {
            removed += self
                .make_room(max / 10 * 7)
                .await
                .map_err(|e| self.port_error(e))?;
        }
        for (sql, values) in [
            (
                "DELETE FROM bus_inputs WHERE seq <= ?1 AND stored_at < ?2",
                vec![handled.into(), before.into()],
            ),
            (
                "DELETE FROM bus_outputs WHERE stored_at < ?1",
                vec![before.into()],
            ),
        ] {
            removed += self
                .inner
                .db
                .execute(Statement::from_sql_and_values(
                    DbBackend::Sqlite,
                    sql,
                    values,
                ))
                .await
                .map_err(|e| self.port_error(e))?
                .rows_affected();
        }
        if removed > 0 {
            let used = stored_bytes(&self.inner.db)
                .await
                .map_err(|e| self.port_error(e))?;
            self.inner.used.store(used, Ordering::SeqCst);
        }
        Ok(removed)
    }

    async fn open_inputs(&self, after: u64) -> Result<Inputs, PortError> {
        let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let bus = self.clone();
        let state = (
            after,
            VecDeque::<Stored>::new(),
            bus.inner.input_end.subscribe(),
        );
        let stream = futures::stream::unfold(state, move |(mut cursor, mut buffer, mut end)| {
            let bus = bus.clone();
            async move {
                loop {
                    if bus.inner.generation.load(Ordering::SeqCst) != generation {
                        return None;
                    }
                    if let Some(m) = buffer.pop_front() {
                        cursor = m.seq;
                        return Some((Ok(bus.delivery(m)), (cursor, buffer, end)));
                    }
                    end.borrow_and_update();
                    match read_rows(&bus.inner.db, Which::Inputs, cursor, PAGE).await {
                        Ok(rows) if rows.is_empty() => {
                            *lock(&bus.inner.inputs_failing) = None;
                            if end.changed().await.is_err() {
                                return None;
                            }
                        }
                        Ok(rows) => {
                            *lock(&bus.inner.inputs_failing) = None;
                            buffer.extend(rows);
                        }
                        Err(e) => {
                            // The driver reopens the inputs on an error, and reads again.
                            let wait = next_wait(&mut lock(&bus.inner.inputs_failing));
                            tokio::time::sleep(wait).await;
                            return Some((Err(bus.port_error(e)), (cursor, buffer, end)));
                        }
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    fn reconnects(&self) -> watch::Receiver<u64> {
        self.inner.reconnects.subscribe()
    }
}

#[async_trait]
impl OutputLog for SqliteBus {
    /// In this process: nothing to be cut off from.
    fn connected(&self) -> bool {
        true
    }

    async fn already_stored(&self, msg_ids: &[String]) -> Result<HashSet<String>, PortError> {
        let mut found = HashSet::new();
        // One query per few hundred ids, well under SQLite's bind parameters.
        for chunk in msg_ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let rows = self
                .inner
                .db
                .query_all(Statement::from_sql_and_values(
                    DbBackend::Sqlite,
                    format!("SELECT msg_id FROM bus_outputs WHERE msg_id IN ({marks})"),
                    chunk.iter().map(|id| id.clone().into()),
                ))
                .await
                .map_err(|e| self.port_error(e))?;
            for row in rows {
                found.insert(
                    row.try_get::<String>("", "msg_id")
                        .map_err(|e| self.port_error(e))?,
                );
            }
        }
        Ok(found)
    }

    async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        _pipelined: bool,
    ) -> Result<(), PublishFailure> {
        let fail = |e: DbErr| PublishFailure {
            stored: 0,
            error: self.port_error(e),
        };
        let at = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let _turn = self.inner.writes.lock().await;
        // Past `embedded.max_bytes` the oldest history goes (as a full output stream drops its
        // oldest); the coordinator's own outputs are never refused for it.
        let size: u64 = outputs
            .iter()
            .map(|o| row_bytes(&o.subject, o.payload.len()))
            .sum();
        let max = self.inner.max_bytes;
        if self.inner.used.load(Ordering::SeqCst) + size > max {
            self.make_room(max.saturating_sub(size))
                .await
                .map_err(fail)?;
        }
        let txn = self.inner.db.begin().await.map_err(fail)?;
        let mut inserted = Vec::new();
        let body = async {
            for out in outputs {
                // `query_all`, not `query_one`: see `submit` (here inside the transaction, whose
                // COMMIT reports a failure anyway, but a write is read to its end everywhere).
                let row = txn
                    .query_all(Statement::from_sql_and_values(
                        DbBackend::Sqlite,
                        "INSERT INTO bus_outputs (msg_id, subject, msgpack, payload, stored_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (msg_id) DO NOTHING RETURNING seq",
                        [
                            out.msg_id.clone().into(),
                            out.subject.clone().into(),
                            (out.encoding.content_type().is_some()).into(),
                            out.payload.to_vec().into(),
                            at.into(),
                        ],
                    ))
                    .await?
                    .into_iter()
                    .next();
                if let Some(seq) = row.and_then(|r| r.try_get::<i64>("", "seq").ok()) {
                    inserted.push(Stored {
                        seq: u64::try_from(seq).unwrap_or(0),
                        subject: out.subject.clone(),
                        content_type: out.encoding.content_type().map(str::to_owned),
                        payload: out.payload.clone(),
                        stored_at: u64::try_from(at).ok(),
                    });
                }
            }
            Ok(())
        }
        .await;
        super::settle(txn, body).await.map_err(fail)?;
        let added: u64 = inserted
            .iter()
            .map(|m| row_bytes(&m.subject, m.payload.len()))
            .sum();
        self.inner.used.fetch_add(added, Ordering::SeqCst);
        for m in inserted {
            // Nobody listening is fine: readers catch up from the table.
            let _ = self.inner.outputs.send(m);
        }
        Ok(())
    }

    /// No `<prefix>.status` questions come without NATS: the HTTP API asks the driver itself.
    async fn status_queries(&self) -> Result<StatusQueries, PortError> {
        Ok(futures::stream::pending().boxed())
    }

    async fn flush(&self) -> Result<(), PortError> {
        Ok(())
    }
}

impl SqliteBus {
    fn delivery(&self, m: Stored) -> Delivery {
        Delivery {
            seq: m.seq,
            stored_at: m.stored_at,
            subject: m.subject,
            content_type: m.content_type,
            payload: m.payload,
            // Nothing to settle: the journal's input position is what says an input was handled.
            ack: Box::new(|_terminate| -> Settle { Box::pin(async { Ok(()) }) }),
        }
    }
}
