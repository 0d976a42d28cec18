//! The write-behind journal (`database.write_behind = true`), an adapter of its own decorating the
//! Postgres journal ([`PgJournal`]): a batch is durable once JetStream has stored it in the journal
//! stream (`<P>_JOURNAL`, subject `<p>.journal`), and Postgres is written behind it, off the grant
//! path, through the journal it decorates (its rows, each stamped with the number of its batch, and
//! their conditional upsert).
//!
//! - [`Journal::write`] publishes the batch's rows ([`Rows`]) and returns on the PubAck; a task of this
//!   process then writes them to Postgres, what came within `LINGER` (see [`writer`]) as one
//!   statement, and purges the stream up to what Postgres holds.
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

mod journal_stream;
mod writer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::sync::{mpsc, watch};

use crate::adapters::postgres::{write_error, PgJournal, Rows};
use crate::ports::{Batch, Deposed, Journal, Loaded, PortError, Term};
use writer::{Writer, WAITING};

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

/// A batch as the stream stored it, for the writer task: the sequence and the `Nats-Msg-Id` of its
/// last message, and its rows.
type Stored = (u64, String, Rows);

/// Where the writes stand.
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
    pg: PgJournal,
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
        pg: PgJournal,
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
        pg: PgJournal,
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
        pg: PgJournal,
        client: async_nats::Client,
        stream: String,
        subject: String,
    ) -> Result<WriteBehind, BehindError> {
        WriteBehind::open(pg, client, stream, subject, false, 1).await
    }

    async fn open(
        pg: PgJournal,
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
