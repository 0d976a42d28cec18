//! The task that writes Postgres behind the journal stream, and purges the stream of what Postgres
//! holds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream;
use backon::BackoffBuilder as _;
use tokio::sync::{mpsc, watch};

use super::Stored;
use crate::adapters::postgres::{Merged, PgError, PgJournal, Rows};
use crate::ports::Deposed;

/// How often the stream is purged of what Postgres holds.
const PURGE_EVERY: Duration = Duration::from_millis(100);

/// How long the writer gathers batches before it writes them to Postgres as one statement: on a busy
/// coordinator a few dozen statements a second, however many batches, instead of one per batch
/// competing with the grant path for the CPU and for Postgres. Postgres is this much further behind.
const LINGER: Duration = Duration::from_millis(20);

/// How many stored batches may wait for Postgres before a write waits for them: memory stays bounded
/// while Postgres is slow or away.
pub(super) const WAITING: usize = 1024;

/// What came within [`LINGER`] after `first`, up to [`WAITING`] batches, to go in the same statement:
/// the batches merged, with the stream sequence and the `Nats-Msg-Id` of the last one; and whether
/// the journal closed meanwhile.
async fn gather(first: Stored, batches: &mut mpsc::Receiver<Stored>) -> (Stored, bool) {
    let (mut seq, mut id, first) = first;
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
    ((seq, id, rows.into_rows()), closed)
}

/// The task that writes Postgres behind the stream.
pub(super) struct Writer {
    pub(super) pg: PgJournal,
    pub(super) stream: stream::Stream,
    pub(super) applied: Arc<watch::Sender<u64>>,
    pub(super) deposed: Arc<Mutex<Option<Deposed>>>,
    pub(super) full: Arc<Mutex<Option<(String, std::time::Instant)>>>,
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
    pub(super) async fn run(self, mut batches: mpsc::Receiver<Stored>) {
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
            let Some(first) = next else {
                self.purge(applied, &applied_id, purged).await;
                return;
            };
            let ((seq, id, rows), closed) = gather(first, &mut batches).await;
            if rows.term.is_some() && rows.term <= deposed_term {
                continue;
            }
            let written = self.write(&rows, &mut deposed_term).await;
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

    /// Writes `rows` until Postgres takes them (with backoff): whether it did. Not when Postgres
    /// refused them for their term: `deposed_term` is then theirs, and the journal's driver hears it.
    async fn write(&self, rows: &Rows, deposed_term: &mut Option<i64>) -> bool {
        let mut delays = crate::retry::backoff().build();
        loop {
            let result = self.pg.write_rows(rows).await;
            self.noted(&result);
            match result {
                Ok(()) => return true,
                Err(PgError::StaleTerm { term, detail, .. }) => {
                    tracing::warn!("writing the journal behind: deposed ({detail})");
                    *deposed_term = rows.term;
                    *self.deposed.lock().expect("not poisoned") = Some(Deposed { term, detail });
                    return false;
                }
                Err(e) => {
                    let wait = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!("writing the journal behind: {e}; again in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
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
