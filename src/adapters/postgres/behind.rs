//! The write-behind journal (`database.write_behind = true`): a batch is durable once JetStream has
//! stored it in the journal stream (`<P>_JOURNAL`, subject `<p>.journal`), and Postgres is written
//! behind it, off the grant path.
//!
//! - [`Journal::write`] publishes the batch's rows ([`Rows`]) and returns on the PubAck; a task of this
//!   process then writes them to Postgres, what came within [`LINGER`] as one statement, and purges the
//!   stream up to what Postgres holds.
//! - [`Journal::take_over`] (a new leader, before it loads) writes what the stream holds to Postgres,
//!   then appends a marker with `Nats-Expected-Last-Sequence`; every write goes on from the sequence
//!   before it in the same way. A deposed leader's next write expects a sequence the marker took: the
//!   stream refuses it, and the driver hears [`Deposed`]. What a deposed leader wrote before the marker
//!   is read by the new one before it acts.
//! - A batch too big for one message goes as several, the last one marked; a group whose last message
//!   never came (a crash in between) was never acknowledged, and is skipped when read back.
//! - The writer task is the term's: [`Journal::take_over`] starts it, and [`Journal::stand_down`]
//!   stops it (and waits for it) before the leadership is released or handed on, so that it never
//!   purges the stream while the next leader reads it back. A graceful stop lets it write what it
//!   holds first; a term lost or given up stops it at once, and the next leader writes the rest.
//! - Writing the stream's content to Postgres in order, from its first message, is what writing the
//!   batches did, whatever Postgres already had: each request's row is set whole, unless Postgres
//!   holds a newer version of it (each row carries the number of the batch that made it), and the
//!   fence, the input position and the deletions only rise. A batch read back late (a cut-off
//!   leader's writer that purged the stream under the reader) takes nothing back.
//!
//! Durability is JetStream's: what nats-server acknowledged survives the crash of any process; a power
//! loss of its host can lose what it had not yet synced to disk (its `sync_interval`), as it can lose
//! the inputs themselves. Postgres alone keeps a commit through a power loss: the default.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use backon::BackoffBuilder as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::error::write_error;
use super::{Merged, PgError, PgStore, Rows};
use crate::ports::{Batch, Deposed, Journal, Loaded, PortError, Term};

/// How often the stream is purged of what Postgres holds.
const PURGE_EVERY: Duration = Duration::from_millis(100);

/// How long the writer gathers batches before it writes them to Postgres as one statement: on a busy
/// coordinator a few dozen statements a second, however many batches, instead of one per batch
/// competing with the grant path for the CPU and for Postgres. Postgres is this much further behind.
const LINGER: Duration = Duration::from_millis(20);

/// How many stored batches may wait for Postgres before a write waits for them: memory stays bounded
/// while Postgres is slow or away.
const WAITING: usize = 1024;

/// How long reading the stream back waits for the next message before it looks whether the rest was
/// purged.
const READ_WAIT: Duration = Duration::from_secs(1);

/// Room left in a message for its headers and framing, below the server's `max_payload`.
const HEADROOM: usize = 4096;

/// One message of the journal stream, as read: a batch's rows, or a part of them.
#[derive(Debug, Deserialize)]
struct Entry {
    /// The batch it belongs to (`<boot>-<number>`): the parts of one batch are consecutive.
    batch: String,
    /// The batch's last part: a batch is complete with it.
    last: bool,
    rows: Rows,
}

/// An [`Entry`] as written, its rows borrowed.
#[derive(Serialize)]
struct EntryRef<'a> {
    batch: &'a str,
    last: bool,
    rows: &'a Rows,
}

impl EntryRef<'_> {
    fn encode(&self) -> Result<Vec<u8>, PortError> {
        rmp_serde::to_vec_named(self).map_err(PortError::new)
    }
}

/// What went wrong in the journal stream.
#[derive(Debug, thiserror::Error)]
pub enum BehindError {
    #[error("cannot create or read the journal stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the journal stream {stream} did not store a batch")]
    Publish {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    #[error("a journal entry of {bytes} bytes does not fit in a NATS message ({limit} bytes)")]
    TooBig { bytes: usize, limit: usize },
    #[error("journal entry #{seq} of {stream} is unreadable: {detail}")]
    Corrupt {
        stream: String,
        seq: u64,
        detail: String,
    },
}

/// Where the writes stand.
/// A batch as the stream stored it, for the writer task: the sequence and the `Nats-Msg-Id` of its
/// last message, and its rows.
type Stored = (u64, String, Rows);

struct Head {
    /// The stream's last sequence as this journal left it: the next write expects it.
    last_seq: u64,
    /// The number of the next batch.
    next: u64,
    /// The `Nats-Msg-Id` of the message at `last_seq` that this journal appended (none yet).
    last_id: String,
    /// This journal's term, from [`Journal::take_over`].
    term: Option<Term>,
}

/// The journal: JetStream first, Postgres behind.
pub struct WriteBehind {
    pg: PgStore,
    js: jetstream::Context,
    stream: String,
    subject: String,
    /// The stream's replicas (`nats.replicas`).
    replicas: usize,
    /// Makes this process's batch ids unique.
    boot: String,
    /// The largest message the server takes.
    max_payload: usize,
    head: tokio::sync::Mutex<Head>,
    /// Whether a term starts a writer task (not in the tests that play a crash before it writes).
    writing: bool,
    /// The writer task of the term led now, if any, and its stored batches: their last stream
    /// sequence and rows. Bounded: a write waits while [`WAITING`] batches wait for Postgres.
    writer: tokio::sync::Mutex<Option<WriterTask>>,
    /// The last stream sequence Postgres holds, as the writer task says.
    applied: Arc<watch::Sender<u64>>,
    /// Set by the writer task when Postgres refused a write for a newer term.
    deposed: Arc<Mutex<Option<Deposed>>>,
    /// Why and when Postgres refused the writer task's last write for lack of space, until it takes
    /// one (reported for [`crate::storage::STALE`] at most after the last refusal).
    full: Arc<Mutex<Option<(String, std::time::Instant)>>>,
}

/// A running writer task and the way to it.
struct WriterTask {
    batches: mpsc::Sender<Stored>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a graceful stop lets the writer task write what it holds.
const FINISH_WAIT: Duration = Duration::from_secs(5);

impl WriteBehind {
    /// The journal on `pg` and the stream `stream` (subject `subject`) of `js`'s server, made if
    /// missing. Each term it leads runs a task that writes Postgres.
    pub async fn new(
        pg: PgStore,
        client: async_nats::Client,
        stream: String,
        subject: String,
    ) -> Result<WriteBehind, BehindError> {
        WriteBehind::open(pg, client, stream, subject, true, 1).await
    }

    /// [`WriteBehind::new`] with a stream of `replicas` replicas (`nats.replicas`): a batch is
    /// acknowledged once a majority of them stored it. A stream that exists with other replicas is
    /// updated to these.
    pub async fn replicated(
        pg: PgStore,
        client: async_nats::Client,
        stream: String,
        subject: String,
        replicas: usize,
    ) -> Result<WriteBehind, BehindError> {
        WriteBehind::open(pg, client, stream, subject, true, replicas).await
    }

    /// The same, without its writer task: what a process that dies before it writes Postgres leaves.
    /// For tests.
    #[doc(hidden)]
    pub async fn without_writer(
        pg: PgStore,
        client: async_nats::Client,
        stream: String,
        subject: String,
    ) -> Result<WriteBehind, BehindError> {
        WriteBehind::open(pg, client, stream, subject, false, 1).await
    }

    async fn open(
        pg: PgStore,
        client: async_nats::Client,
        stream: String,
        subject: String,
        writing: bool,
        replicas: usize,
    ) -> Result<WriteBehind, BehindError> {
        let max_payload = client.server_info().max_payload;
        let js = jetstream::new(client);
        let journal = WriteBehind {
            pg,
            js,
            stream,
            subject,
            replicas,
            boot: format!("{:016x}", rand::random::<u64>()),
            max_payload,
            head: tokio::sync::Mutex::new(Head {
                last_seq: 0,
                next: 1,
                term: None,
                last_id: String::new(),
            }),
            writing,
            writer: tokio::sync::Mutex::new(None),
            applied: Arc::new(watch::channel(0).0),
            deposed: Arc::default(),
            full: Arc::default(),
        };
        journal.ensure_stream().await?;
        Ok(journal)
    }

    /// Waits until Postgres holds every batch written so far.
    pub async fn caught_up(&self) {
        let written = self.head.lock().await.last_seq;
        let mut applied = self.applied.subscribe();
        let _ = applied.wait_for(|&seq| seq >= written).await;
    }

    /// Starts a writer task for the term being taken over, unless one runs (or none is wanted).
    async fn start_writer(&self, stream: stream::Stream) {
        let mut writer = self.writer.lock().await;
        if !self.writing || writer.is_some() {
            return;
        }
        let (batches, rx) = mpsc::channel(WAITING);
        self.applied.send_replace(0);
        let task = Writer {
            pg: self.pg.clone(),
            stream,
            applied: self.applied.clone(),
            deposed: self.deposed.clone(),
            full: self.full.clone(),
        };
        *writer = Some(WriterTask {
            batches,
            task: tokio::spawn(task.run(rx)),
        });
    }

    /// Stops the writer task, if one runs, and waits until it has: with `finish`, once it wrote
    /// what it holds (and purged the stream of it), for at most `FINISH_WAIT`; else at once. A
    /// task stopped before it wrote leaves those batches in the stream, for the next leader. A
    /// second call meanwhile waits for the first.
    async fn stop_writer(&self, finish: bool) {
        let mut writer = self.writer.lock().await;
        let Some(WriterTask { batches, mut task }) = writer.take() else {
            return;
        };
        drop(batches);
        if finish {
            if tokio::time::timeout(FINISH_WAIT, &mut task).await.is_ok() {
                return;
            }
            tracing::warn!(
                "Postgres did not take the last journal batches within {FINISH_WAIT:?}: they stay \
                 in the journal stream, for the next leader"
            );
        }
        task.abort();
        let _ = task.await;
    }

    /// Makes the stream if it is missing: file storage, nothing removed but by the writer's purges,
    /// and a full stream refuses a new batch rather than dropping an old one; with `nats.replicas`
    /// replicas, to which a stream that has others is updated (the rest of its settings kept).
    async fn ensure_stream(&self) -> Result<stream::Stream, BehindError> {
        let config = stream::Config {
            name: self.stream.clone(),
            subjects: vec![self.subject.clone()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            num_replicas: self.replicas,
            ..Default::default()
        };
        let stream = self
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| self.stream_error(e))?;
        let had = stream.cached_info().config.num_replicas.max(1);
        if had == self.replicas {
            return Ok(stream);
        }
        let config = stream::Config {
            num_replicas: self.replicas,
            ..stream.cached_info().config.clone()
        };
        self.js
            .update_stream(config)
            .await
            .map_err(|e| self.stream_error(e))?;
        tracing::warn!(
            "the journal stream {} had {had} replica(s): updated to {} (nats.replicas); waiting \
             until they are placed",
            self.stream,
            self.replicas
        );
        crate::adapters::nats::await_placed(&self.js, &self.stream, self.replicas).await;
        self.js
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.stream_error(e))
    }

    fn stream_error(&self, e: impl std::error::Error + Send + Sync + 'static) -> BehindError {
        BehindError::Stream {
            stream: self.stream.clone(),
            source: Box::new(e),
        }
    }

    /// Appends one batch's rows, in as many messages as they need, each expecting the sequence before
    /// it. Answers the last sequence.
    async fn append(&self, head: &mut Head, rows: &Rows) -> Result<u64, PortError> {
        let batch = format!("{}-{}", self.boot, head.next);
        let whole = EntryRef {
            batch: &batch,
            last: true,
            rows,
        }
        .encode()?;
        let payloads = if whole.len() <= self.max_payload.saturating_sub(HEADROOM) {
            vec![whole]
        } else {
            let parts = self.parts(rows.clone())?;
            let count = parts.len();
            parts
                .iter()
                .enumerate()
                .map(|(i, rows)| {
                    EntryRef {
                        batch: &batch,
                        last: i + 1 == count,
                        rows,
                    }
                    .encode()
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        for (i, payload) in payloads.into_iter().enumerate() {
            let id = format!("{batch}-{i}");
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.into())
                .message_id(id.clone())
                .expected_last_sequence(head.last_seq);
            let stored = match self.js.send_publish(self.subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(stored) => {
                    head.last_seq = stored.sequence;
                    head.last_id = id;
                }
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // Deleted, or a server that came back without it: made anew, numbered from its
                    // start, for the driver's next try. What it held and Postgres did not is in the
                    // writer task's hands.
                    if let Ok(mut stream) = self.ensure_stream().await {
                        if let Ok(info) = stream.info().await {
                            tracing::warn!(
                                "the journal stream {} was lost and is made anew",
                                self.stream
                            );
                            head.last_seq = info.state.last_sequence;
                            head.last_id.clear();
                        }
                    }
                    return Err(self.publish_error(head, e));
                }
                Err(e) => return Err(self.publish_error(head, e)),
            }
        }
        head.next += 1;
        Ok(head.last_seq)
    }

    /// A refused publish: [`Deposed`] when another writer appended since (a newer leader's marker).
    fn publish_error(
        &self,
        head: &Head,
        e: async_nats::jetstream::context::PublishError,
    ) -> PortError {
        if e.kind() == PublishErrorKind::WrongLastSequence {
            return PortError::new(Deposed {
                term: head.term.map_or(0, |t| t.0),
                detail: format!(
                    "the journal stream {} was written by another coordinator after #{}",
                    self.stream, head.last_seq
                ),
            });
        }
        PortError::new(BehindError::Publish {
            stream: self.stream.clone(),
            source: e,
        })
    }

    /// `rows` cut into parts that each fit in a message (one part, nearly always).
    fn parts(&self, rows: Rows) -> Result<Vec<Rows>, PortError> {
        let limit = self.max_payload.saturating_sub(HEADROOM);
        let size = rmp_serde::to_vec_named(&rows)
            .map_err(PortError::new)?
            .len();
        if size <= limit {
            return Ok(vec![rows]);
        }
        let (n, m) = (rows.requests.len(), rows.outbox.len());
        if n + m <= 1 {
            return Err(PortError::new(BehindError::TooBig { bytes: size, limit }));
        }
        // The first half of the rows, then the rest with the batch's own numbers.
        let mut second = rows;
        let first = Rows {
            requests: second.requests.drain(..n / 2).collect(),
            outbox: second.outbox.drain(..m / 2).collect(),
            term: second.term,
            ..Rows::default()
        };
        let mut parts = self.parts(first)?;
        parts.extend(self.parts(second)?);
        Ok(parts)
    }

    /// Every complete batch the stream holds, merged in order, and the stream's last sequence.
    async fn read_all(&self) -> Result<(Rows, u64), PortError> {
        let mut stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?;
        let state = stream
            .info()
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?
            .state
            .clone();
        if state.messages == 0 {
            return Ok((Rows::default(), state.last_sequence));
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| PortError::new(self.stream_error(e)))?;
        let mut all = Merged::default();
        // The parts of a batch whose last part has not come yet.
        let mut open: Option<(String, Rows)> = None;
        let mut seq = 0;
        while seq < state.last_sequence {
            let message = match tokio::time::timeout(READ_WAIT, messages.next()).await {
                Ok(next) => next
                    .ok_or_else(|| PortError::new(self.corrupt(seq + 1, "the stream ended early")))?
                    .map_err(|e| PortError::new(self.stream_error(e)))?,
                Err(_) => {
                    // Purged meanwhile (by an earlier leader's writer, once Postgres had it)?
                    let first = stream
                        .info()
                        .await
                        .map_err(|e| PortError::new(self.stream_error(e)))?
                        .state
                        .first_sequence;
                    if first > state.last_sequence {
                        break;
                    }
                    continue;
                }
            };
            seq = message
                .info()
                .map_err(|e| PortError::new(self.corrupt(seq + 1, &e.to_string())))?
                .stream_sequence;
            let entry: Entry = rmp_serde::from_slice(&message.payload)
                .map_err(|e| PortError::new(self.corrupt(seq, &e.to_string())))?;
            let rows = match open.take() {
                Some((batch, mut rows)) if batch == entry.batch => {
                    rows.then(entry.rows);
                    rows
                }
                Some((batch, _)) => {
                    skipped(&batch);
                    entry.rows
                }
                None => entry.rows,
            };
            if entry.last {
                all.push(rows);
            } else {
                open = Some((entry.batch, rows));
            }
        }
        if let Some((batch, _)) = open {
            skipped(&batch);
        }
        Ok((all.into_rows(), state.last_sequence))
    }

    fn corrupt(&self, seq: u64, detail: &str) -> BehindError {
        BehindError::Corrupt {
            stream: self.stream.clone(),
            seq,
            detail: detail.to_owned(),
        }
    }

    /// Hands a stored batch to the writer task, waiting while it has [`WAITING`] already (none
    /// without a writer task).
    async fn behind(&self, batch: Stored) {
        let behind = self
            .writer
            .lock()
            .await
            .as_ref()
            .map(|writer| writer.batches.clone());
        if let Some(behind) = behind {
            let _ = behind.send(batch).await;
        }
    }

    /// The writer task's refusal, if it was for `term`.
    fn deposed(&self, term: Option<Term>) -> Option<Deposed> {
        let deposed = self.deposed.lock().expect("not poisoned");
        deposed
            .as_ref()
            .filter(|d| Some(d.term) == term.map(|t| t.0))
            .cloned()
    }
}

/// Says that a batch whose last part never came is not written.
fn skipped(batch: &str) {
    tracing::warn!("journal batch {batch} never completed (a crash while it was written): skipped");
}

/// The task that writes Postgres behind the stream.
struct Writer {
    pg: PgStore,
    stream: stream::Stream,
    applied: Arc<watch::Sender<u64>>,
    deposed: Arc<Mutex<Option<Deposed>>>,
    full: Arc<Mutex<Option<(String, std::time::Instant)>>>,
}

impl Writer {
    /// Notes whether Postgres took the last write or refused it for lack of space (logged once an
    /// episode: the stream holds what Postgres does not, until [`WAITING`] batches wait).
    fn noted(&self, result: &Result<(), PgError>) {
        let mut full = self.full.lock().expect("not poisoned");
        match result {
            Ok(()) => {
                if full.take().is_some() {
                    tracing::info!("Postgres takes the journal's writes again: space was freed");
                }
            }
            Err(e) if crate::storage::is_full(e) => {
                let why = crate::retry::causes(e);
                if full.is_none() {
                    tracing::error!(
                        "Postgres is full: the journal written behind was refused for lack of space \
                         ({why}); the journal stream holds what Postgres does not, and the writer \
                         goes on by itself once space is freed"
                    );
                }
                *full = Some((why, std::time::Instant::now()));
            }
            Err(_) => {}
        }
    }

    /// Writes the batches in order, those waiting together, each until Postgres takes it (with
    /// backoff), until the journal closes. A batch refused for its term is dropped, and so are the
    /// later ones of that term: its driver hears that it was deposed, and a later term's batches (the
    /// same process leading again) are written.
    async fn run(self, mut batches: mpsc::Receiver<Stored>) {
        let mut purged_at = tokio::time::Instant::now();
        let (mut applied, mut purged) = (0, 0);
        // The `Nats-Msg-Id` of the message at `applied`.
        let mut applied_id = String::new();
        let mut deposed_term: Option<i64> = None;
        loop {
            // What Postgres holds leaves the stream at most PURGE_EVERY later, busy or idle, so that a
            // takeover has little to read back.
            let next = if applied > purged {
                tokio::time::timeout_at(purged_at + PURGE_EVERY, batches.recv())
                    .await
                    .ok()
            } else {
                Some(batches.recv().await)
            };
            let Some(next) = next else {
                purged = self.purge(applied, &applied_id, purged).await;
                purged_at = tokio::time::Instant::now();
                continue;
            };
            let Some((mut seq, mut id, first)) = next else {
                self.purge(applied, &applied_id, purged).await;
                return;
            };
            // What comes within LINGER goes in the same statement.
            let mut rows = Merged::new(first);
            let (mut merged, mut closed) = (1, false);
            let until = tokio::time::Instant::now() + LINGER;
            while merged < WAITING {
                match tokio::time::timeout_at(until, batches.recv()).await {
                    Ok(Some((later, later_id, more))) => {
                        rows.push(more);
                        (seq, id) = (later, later_id);
                        merged += 1;
                    }
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let rows = rows.into_rows();
            if rows.term.is_some() && rows.term <= deposed_term {
                continue;
            }
            let mut delays = crate::retry::backoff().build();
            let written = loop {
                let result = self.pg.write_rows(&rows).await;
                self.noted(&result);
                match result {
                    Ok(()) => break true,
                    Err(PgError::StaleTerm { term, detail, .. }) => {
                        tracing::warn!("writing the journal behind: deposed ({detail})");
                        deposed_term = rows.term;
                        *self.deposed.lock().expect("not poisoned") =
                            Some(Deposed { term, detail });
                        break false;
                    }
                    Err(e) => {
                        let wait = delays.next().unwrap_or(Duration::from_secs(5));
                        tracing::warn!("writing the journal behind: {e}; again in {wait:?}");
                        tokio::time::sleep(wait).await;
                    }
                }
            };
            if written {
                (applied, applied_id) = (seq, id);
                self.applied.send_replace(seq);
            }
            if closed {
                self.purge(applied, &applied_id, purged).await;
                return;
            }
            if written && purged_at.elapsed() >= PURGE_EVERY {
                purged = self.purge(applied, &applied_id, purged).await;
                purged_at = tokio::time::Instant::now();
            }
        }
    }

    /// Purges the stream of the sequences up to `applied` (Postgres holds them), if the message
    /// there is still `applied_id`; answers how far it is purged now.
    ///
    /// A stream lost at run time is made anew, numbered from its start again: its sequences up to
    /// `applied` are other batches, not yet in Postgres, or not there at all. A purge up to a
    /// sequence beyond its end would move its numbering on (so that the next append, expecting the
    /// end the journal knows, would be refused as if another coordinator had written), and one
    /// within it would remove batches Postgres does not hold. So the message at `applied` must be
    /// the one written, else nothing is purged, and that batch counts as done with.
    async fn purge(&self, applied: u64, applied_id: &str, purged: u64) -> u64 {
        if applied <= purged {
            return purged;
        }
        let there = match self.stream.get_raw_message(applied).await {
            Ok(message) => message
                .headers
                .get("Nats-Msg-Id")
                .is_some_and(|id| id.as_str() == applied_id),
            Err(e) => {
                tracing::debug!("reading the journal stream at {applied} before purging: {e}");
                false
            }
        };
        if !there {
            tracing::info!(
                "the journal stream no longer holds batch {applied_id} at {applied} (made anew \
                 since?): not purged"
            );
            return applied;
        }
        match self.stream.purge().sequence(applied + 1).await {
            Ok(_) => applied,
            Err(e) => {
                tracing::debug!("purging the journal stream: {e}");
                purged
            }
        }
    }
}

#[async_trait::async_trait]
impl Journal for WriteBehind {
    async fn migrate(&self) -> Result<(), PortError> {
        self.pg.migrate().await.map_err(PortError::new)?;
        self.ensure_stream().await.map_err(PortError::new)?;
        Ok(())
    }

    async fn take_over(&self, term: Term) -> Result<(), PortError> {
        let mut head = self.head.lock().await;
        head.term = Some(term);
        let stream = self.ensure_stream().await.map_err(PortError::new)?;
        loop {
            let (mut rows, last) = self.read_all().await?;
            rows.term = Some(i64::try_from(term.0).map_err(PortError::new)?);
            self.pg.write_rows(&rows).await.map_err(write_error)?;
            // The marker: from here on, a write of an earlier leader is refused.
            head.last_seq = last;
            let marker = Rows {
                term: rows.term,
                ..Rows::default()
            };
            match self.append(&mut head, &marker).await {
                Ok(_) => break,
                Err(e) if crate::ports::deposed_in(&e).is_some() => {
                    tracing::info!(
                        "the journal stream was written during the takeover: reading it again"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        // Postgres holds everything up to the marker: the term's writer goes on from there.
        self.start_writer(stream).await;
        self.behind((head.last_seq, head.last_id.clone(), Rows::default()))
            .await;
        Ok(())
    }

    async fn stand_down(&self, finish: bool) {
        self.stop_writer(finish).await;
    }

    async fn load(&self, retain_ended: usize) -> Result<Loaded, PortError> {
        self.pg
            .load_state(retain_ended)
            .await
            .map_err(PortError::new)
    }

    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError> {
        if let Some(deposed) = self.deposed(batch.term) {
            return Err(PortError::new(deposed));
        }
        if batch.is_empty() {
            // Nothing to store; a deposed writer hears it from the stream at its next batch, and
            // from the lease store, which is fenced by the term too.
            return Ok(());
        }
        let rows = self.pg.rows(batch).map_err(PortError::new)?;
        let mut head = self.head.lock().await;
        let seq = self.append(&mut head, &rows).await?;
        let id = head.last_id.clone();
        self.behind((seq, id, rows)).await;
        Ok(())
    }

    /// Straight on Postgres: deleting ended rows changes nothing the stream's batches bring back (a
    /// batch written behind that ends a request again writes its row again, itself ended).
    async fn trim_ended(&self, retain_ended: usize) -> Result<u64, PortError> {
        self.pg
            .trim_ended(retain_ended)
            .await
            .map_err(PortError::new)
    }

    async fn ping(&self) -> Result<(), PortError> {
        self.pg.ping().await.map_err(PortError::new)
    }

    fn full(&self) -> Option<String> {
        let full = self.full.lock().expect("not poisoned");
        full.as_ref()
            .filter(|(_, at)| at.elapsed() < crate::storage::STALE)
            .map(|(why, _)| format!("Postgres is full (out of disk space), written behind: {why}"))
    }

    /// Lets the writer task write what it has (as long as Postgres answers), then closes Postgres.
    async fn close(&self) {
        self.stop_writer(true).await;
        self.pg.close().await
    }
}
