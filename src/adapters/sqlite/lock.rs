//! The leadership of an embedded coordinator: an exclusive lock (`flock`) on `<data dir>/lock`. The
//! process that holds it leads; a second coordinator started on the same directory stands by until the
//! first exits (the kernel drops the lock of a process that dies, `kill -9` included), so two never
//! write one database.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::clock::now_ms;
use crate::ports::{Leadership, PortError, Roster, Term};

/// The lock file in the data directory.
pub const LOCK_FILE: &str = "lock";

/// How often a standby tries the lock again.
const POLL: Duration = Duration::from_millis(200);

/// The lock on a data directory, as a [`Leadership`].
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    holder: String,
    /// The open, locked file while this process leads, with its term.
    held: Mutex<Option<(File, Term)>>,
}

impl DirLock {
    /// The lock of data directory `dir` (taken by [`Leadership::acquire`]).
    pub fn new(dir: &Path) -> DirLock {
        DirLock {
            path: dir.join(LOCK_FILE),
            holder: format!(
                "{}:{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
                std::process::id()
            ),
            held: Mutex::new(None),
        }
    }

    fn try_take(&self) -> Result<Option<Term>, PortError> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&self.path)
            .map_err(|e| PortError::msg(format!("cannot open {}: {e}", self.path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => {
                return Err(PortError::msg(format!(
                    "cannot lock {}: {e}",
                    self.path.display()
                )))
            }
        }
        // Terms rise with the clock, and past the last one written here whatever the clock says: after
        // a step back, a term below the last one would be refused by the lease store (which keeps the
        // highest term it saw) until the clock caught up again.
        let mut last = String::new();
        let _ = file.read_to_string(&mut last);
        let term = Term(now_ms().max(last_term(&last).map_or(0, |t| t.saturating_add(1))));
        // For a person who wonders who holds it, and for the next term; the lock itself is what counts.
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = writeln!(file, "{} term {}", self.holder, term.0);
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some((file, term));
        Ok(Some(term))
    }
}

/// The term in a lock file's `<holder> term <n>` line.
fn last_term(text: &str) -> Option<u64> {
    text.trim_end().rsplit_once(" term ")?.1.parse().ok()
}

#[async_trait]
impl Leadership for DirLock {
    /// Waits for the lock; answers at once when this process holds it already (the composition root
    /// takes it before it opens the database).
    async fn acquire(&self) -> Result<Term, PortError> {
        if let Some((_, term)) = self.held.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(*term);
        }
        let mut said = false;
        loop {
            if let Some(term) = self.try_take()? {
                return Ok(term);
            }
            if !said {
                tracing::warn!(
                    "another coordinator holds {}: standing by until it stops",
                    self.path.display()
                );
                said = true;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn lost(&self, _term: Term) {
        // A lock is held until this process lets it go or dies.
        std::future::pending::<()>().await
    }

    async fn release(&self, term: Term) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.as_ref().is_some_and(|(_, t)| *t == term) {
            // Closing the file drops the lock.
            *held = None;
        }
    }

    async fn leader(&self) -> Option<(Term, String)> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.as_ref().map(|(_, term)| (*term, self.holder.clone()))
    }

    /// The lock knows no standbys.
    fn roster(&self) -> Option<Roster> {
        None
    }

    /// Never refuses: a free lock is taken.
    fn refusal(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_directory_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let first = DirLock::new(dir.path());
        let second = DirLock::new(dir.path());
        let term = first.acquire().await.expect("the first takes the lock");
        assert_eq!(
            second.try_take().expect("no error"),
            None,
            "held by the first"
        );
        first.release(term).await;
        let later = second.try_take().expect("no error").expect("free again");
        assert!(later > term, "{later:?} after {term:?}");
    }

    /// The clock stepped back an hour since the last leader wrote its term: the next term is still
    /// above it, so the lease store, which refuses any term below the highest it saw, takes it.
    #[tokio::test]
    async fn a_term_rises_past_the_last_one_when_the_clock_stepped_back() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ahead = now_ms() + 3_600_000;
        std::fs::write(dir.path().join(LOCK_FILE), format!("box:42 term {ahead}\n"))
            .expect("the lock file is written");
        let lock = DirLock::new(dir.path());
        let term = lock.acquire().await.expect("the lock is free");
        assert_eq!(term, Term(ahead + 1));
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("readable");
        assert!(
            text.ends_with(&format!(" term {}\n", ahead + 1)),
            "{text:?}"
        );
        lock.release(term).await;
        // A lock file that says nothing readable: the clock alone.
        std::fs::write(dir.path().join(LOCK_FILE), "garbage").expect("written");
        let term = DirLock::new(dir.path()).acquire().await.expect("free");
        assert!(
            term.0 >= now_ms() - 60_000 && term.0 <= now_ms(),
            "{term:?}"
        );
    }
}
