//! The embedded bus: the input and output streams as two tables of the SQLite database
//! (`bus_inputs`, `bus_outputs`), for a coordinator with no NATS.
//!
//! - An input is stored by the HTTP API ([`Gateway::submit`]) in its own transaction, numbered by
//!   `seq`: once `submit` returns it is on disk, and the driver reads it in `seq` order (a commit is
//!   what makes a row visible, and SQLite commits one writer at a time, so `seq` order is commit
//!   order and a reader never sees an input before an earlier one).
//! - The driver's outputs are stored once per `msg_id` (`ON CONFLICT DO NOTHING`): the outbox's
//!   replays after a crash store nothing twice, however late.
//! - Readers of the outputs (SSE streams, the HTTP calls waiting for a reply) get new rows from an
//!   in-process broadcast once they are committed, and read the table itself to catch up (at start,
//!   after a gap, or when they fell behind the broadcast): nothing committed is missed.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt as _};
use gpu_coordinator_client::{AnswerFeed, AnswerReader};
use gpu_coordinator_wire::codec::MSGPACK_CONTENT_TYPE;
use gpu_coordinator_wire::{EventKind, Subjects};
use sea_orm::{
    ConnectionTrait as _, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement,
    TransactionTrait as _,
};
use tokio::sync::{broadcast, watch};

use super::{SqliteError, SqliteStore};
use crate::clock::now_ms;
use crate::ports::{
    subject_matches, Bus, Delivery, Gateway, Inputs, Outbound, PortError, PublishFailure, ReadFrom,
    Settle, StatusQueries, Stored, StoredStream, Which,
};
use crate::retry::backoff;
use crate::sync::lock;

/// Rows read per query when catching up.
const PAGE: i64 = 512;

/// New outputs kept for readers that are behind; one further behind reads the table.
const BROADCAST: usize = 4096;

/// What a row costs beside its payload and subject, as `embedded.max_bytes` counts it.
const ROW_BYTES: u64 = 64;

/// Rows deleted per statement when making room.
const ROOM_PAGE: i64 = 256;

/// The size of every row, as `embedded.max_bytes` counts it (the SQL of [`row_bytes`]).
const ROW_SIZE_SQL: &str = "length(payload) + length(subject) + 64";

/// A row's size as `embedded.max_bytes` counts it.
fn row_bytes(subject: &str, payload: usize) -> u64 {
    payload as u64 + subject.len() as u64 + ROW_BYTES
}

/// The streams of the embedded bus, in the SQLite database of the journal.
#[derive(Clone)]
pub struct SqliteBus {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    file: PathBuf,
    /// The turn to write, shared with the journal ([`SqliteStore::writes`]).
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
    /// Starts routing the replies and `requested` events to [`Gateway::answers`].
    pub async fn open(
        store: &SqliteStore,
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

    /// The outputs on any of `filters` from `from` on, endless (see the module's doc).
    async fn follow_outputs(
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
    async fn read_history(
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

/// The bytes both tables keep, as [`row_bytes`] counts them.
async fn stored_bytes(db: &DatabaseConnection) -> Result<u64, DbErr> {
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
    async fn make_room(&self, target: u64) -> Result<u64, DbErr> {
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

/// Hands every reply and `requested` event to the answers reader.
async fn feed_answers(mut outputs: StoredStream, feed: AnswerFeed) {
    while let Some(next) = outputs.next().await {
        match next {
            Ok(m) => feed.feed(&m.subject, m.encoding(), &m.payload),
            Err(e) => tracing::warn!("reading the embedded bus's outputs: {e}"),
        }
    }
}

/// A reader of the outputs: the table to catch up, the broadcast once caught up.
struct Follow {
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
fn next_wait(failing: &mut Option<backon::ExponentialBackoff>) -> Duration {
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
async fn start(db: &DatabaseConnection, which: Which, from: ReadFrom) -> Result<u64, DbErr> {
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
async fn last_seq(db: &impl sea_orm::ConnectionTrait, which: Which) -> Result<u64, DbErr> {
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
async fn read_rows(
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

fn stored(row: &QueryResult, which: Which) -> Result<Stored, DbErr> {
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

#[async_trait]
impl Bus for SqliteBus {
    /// In this process: nothing to be cut off from.
    fn connected(&self) -> bool {
        true
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

    fn reconnects(&self) -> watch::Receiver<u64> {
        self.inner.reconnects.subscribe()
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

    fn answers(&self) -> &AnswerReader {
        &self.inner.answers
    }

    async fn health(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_coordinator_wire::Encoding;

    fn out(msg_id: &str) -> Outbound {
        Outbound {
            subject: "gpu.reply.chat".into(),
            encoding: Encoding::Json,
            payload: Bytes::from_static(b"{}"),
            msg_id: msg_id.into(),
        }
    }

    /// A store and its bus in a new temporary directory (removed when the first is dropped).
    async fn open_bus() -> (tempfile::TempDir, SqliteStore, SqliteBus) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = SqliteStore::open(dir.path()).await.expect("a store");
        let subjects = Subjects::new("gpu").expect("a prefix");
        let bus = SqliteBus::open(&store, &subjects, 60_000, 1 << 30)
            .await
            .expect("a bus");
        (dir, store, bus)
    }

    /// A reader whose reads fail (its table gone) waits before it answers each error, longer each
    /// time, rather than being asked again at once in a spin; once the table is back it goes on.
    #[tokio::test]
    async fn a_failing_reader_waits_between_errors_and_goes_on_after() {
        let (_dir, store, bus) = open_bus().await;
        bus.publish_in_order(&[out("a")], true)
            .await
            .expect("stored");
        let mut reader = bus
            .follow_outputs(vec!["gpu.>".into()], ReadFrom::Start)
            .await
            .expect("a reader");
        let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
        store
            .connection()
            .execute_unprepared(&rename("bus_outputs", "bus_outputs_away"))
            .await
            .expect("the table taken away");
        for least in [Duration::from_millis(50), Duration::from_millis(100)] {
            let began = std::time::Instant::now();
            let next = reader.next().await.expect("the reader goes on");
            assert!(next.is_err(), "the table is away: {next:?}");
            assert!(
                began.elapsed() >= least,
                "an error answered after {:?}, before the backoff's {least:?}",
                began.elapsed()
            );
        }
        store
            .connection()
            .execute_unprepared(&rename("bus_outputs_away", "bus_outputs"))
            .await
            .expect("the table back");
        let stored = reader
            .next()
            .await
            .expect("the reader goes on")
            .expect("read again");
        assert_eq!((stored.seq, stored.subject.as_str()), (1, "gpu.reply.chat"));
    }

    #[tokio::test]
    async fn outputs_are_stored_once_per_msg_id_and_known_after() {
        let (_dir, _store, bus) = open_bus().await;
        bus.publish_in_order(&[out("a"), out("b")], true)
            .await
            .expect("stored");
        bus.publish_in_order(&[out("a")], true)
            .await
            .expect("stored again");
        let ids: Vec<String> = ["a", "b", "c"].map(String::from).into();
        assert_eq!(
            bus.already_stored(&ids).await.expect("read"),
            HashSet::from(["a".to_owned(), "b".to_owned()])
        );
        let kept: Vec<_> = bus
            .history(Which::Outputs, "gpu.>", ReadFrom::Start)
            .await
            .expect("read")
            .collect()
            .await;
        assert_eq!(kept.len(), 2, "a published twice is stored once");
    }
}
