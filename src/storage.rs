//! A full store, as the coordinator sees it: a write refused for lack of space (a disk full under
//! SQLite or Postgres, JetStream's store or a stream's `max_bytes` exhausted, the embedded bus at
//! `embedded.max_bytes`).
//!
//! The journal, the output log and the gateway are wrapped ([`watch_journal`], [`watch_output_log`],
//! [`watch_gateway`]) so that every write they refuse for lack of space is logged once as an error and
//! noted in a [`Storage`]; `/readyz` and the status document say so (`storage_full`) until a write of
//! that store succeeds again, or no write failed for [`STALE`]. Nothing refused is acknowledged: the
//! driver retries its writes with backoff and goes on by itself once space comes back; an input refused
//! at its submission gets the error (HTTP 507).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::ports::{
    Batch, Gateway, Journal, Loaded, Outbound, OutputLog, PortError, PublishFailure, ReadFrom,
    StatusQueries, StoredStream, Term, Which,
};

/// How long a refusal is reported after the last one, when no write of that store was tried since.
pub const STALE: Duration = Duration::from_secs(60);

/// Postgres's SQLSTATE `disk_full` (class 53, insufficient resources): a table, index or temporary
/// file that cannot grow ("could not extend file ...: No space left on device"), in any language
/// the server speaks.
pub const PG_DISK_FULL: &str = "53100";

/// SQLite's primary result code `SQLITE_FULL`.
const SQLITE_FULL: &str = "13";

/// The JetStream error codes of a store out of space: the server's or account's store
/// (`insufficient resources`, 10023; `insufficient storage resources available`, 10047; the account's
/// limit, 10002).
const JETSTREAM_FULL: &[async_nats::jetstream::ErrorCode] = &[
    async_nats::jetstream::ErrorCode::INSUFFICIENT_RESOURCES,
    async_nats::jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED,
    async_nats::jetstream::ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
];

/// What the stores and servers say when they are out of space (compared in lower case, anywhere in
/// an error's chain of causes), where no code says it: the servers' English, and errors that went
/// through a sentence.
const FULL_MARKERS: &[&str] = &[
    // Linux, the embedded store's own files.
    "no space left on device",
    // SQLite: SQLITE_FULL.
    "database or disk is full",
    // Postgres: disk_full, a table or WAL file that cannot grow.
    "could not extend file",
    "could not write to file",
    "disk full",
    // JetStream: the server's store, or a stream's bytes.
    "insufficient storage",
    "insufficient resources",
    "maximum bytes exceeded",
    "storage resources exceeded",
    // The embedded bus at `embedded.max_bytes`.
    "embedded bus is full",
];

/// Whether `error` (or one of its causes) says a store is out of space: by its code where the
/// store gives one (Postgres's SQLSTATE, SQLite's result code, JetStream's error code), else by its
/// words.
pub fn is_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if coded_full(e) {
            return true;
        }
        let text = e.to_string().to_lowercase();
        if FULL_MARKERS.iter().any(|m| text.contains(m)) {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether `error` itself is a store's coded "out of space".
fn coded_full(error: &(dyn std::error::Error + 'static)) -> bool {
    use sea_orm::sqlx;
    if let Some(db) = error
        .downcast_ref::<sqlx::Error>()
        .and_then(sqlx::Error::as_database_error)
    {
        if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
            return pg.code() == PG_DISK_FULL;
        }
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            // The extended code's low byte is the primary one.
            return db
                .code()
                .and_then(|c| c.parse::<i64>().ok())
                .is_some_and(|c| (c & 0xff).to_string() == SQLITE_FULL);
        }
    }
    if let Some(pg) = error.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return pg.code() == PG_DISK_FULL;
    }
    if let Some(js) = error.downcast_ref::<async_nats::jetstream::Error>() {
        return JETSTREAM_FULL.contains(&js.error_code());
    }
    false
}

/// `error` and its causes, `outer: inner: root`.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    crate::retry::causes(error)
}

/// The stores found full, shared by the wrappers of one coordinator and read by `/readyz` and the
/// status document.
#[derive(Clone, Default)]
pub struct Storage {
    full: Arc<Mutex<BTreeMap<&'static str, (String, Instant)>>>,
}

impl Storage {
    /// Notes the outcome of a write to `store`: a refusal for lack of space is noted (and logged once
    /// until it clears); a success clears it.
    pub fn noted<T>(&self, store: &'static str, result: &Result<T, PortError>) {
        match result {
            Ok(_) => self.clear(store),
            Err(e) if is_full(e) => self.refused(store, &describe(e)),
            Err(_) => {}
        }
    }

    fn refused(&self, store: &'static str, why: &str) {
        let mut full = crate::sync::lock(&self.full);
        let first = !full.contains_key(store);
        full.insert(store, (why.to_owned(), Instant::now()));
        if first {
            tracing::error!(
                "{store} is full: a write was refused for lack of space ({why}); nothing refused is \
                 acknowledged, and the coordinator goes on by itself once space is freed"
            );
        }
    }

    fn clear(&self, store: &'static str) {
        if crate::sync::lock(&self.full).remove(store).is_some() {
            tracing::info!("{store} takes writes again: space was freed");
        }
    }

    /// Why a store is full, if one is: `None` when every store took its last write.
    pub fn problem(&self) -> Option<String> {
        let full = crate::sync::lock(&self.full);
        let reasons: Vec<String> = full
            .iter()
            .filter(|(_, (_, at))| at.elapsed() < STALE)
            .map(|(store, (why, _))| format!("{store} is full (out of disk space): {why}"))
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
}

/// The journal, its writes watched for lack of space under the name `store`.
pub fn watch_journal(
    journal: Arc<dyn Journal>,
    store: &'static str,
    storage: Storage,
) -> Arc<dyn Journal> {
    Arc::new(Watched {
        inner: journal,
        store,
        storage,
    })
}

/// The output log (the driver's side of the bus), its publishes watched for lack of space under the
/// name `store`.
pub fn watch_output_log(
    output_log: Arc<dyn OutputLog>,
    store: &'static str,
    storage: Storage,
) -> Arc<dyn OutputLog> {
    Arc::new(Watched {
        inner: output_log,
        store,
        storage,
    })
}

/// The gateway (the HTTP API's side), its submissions watched for lack of space under `store`.
pub fn watch_gateway(
    gateway: Arc<dyn Gateway>,
    store: &'static str,
    storage: Storage,
) -> Arc<dyn Gateway> {
    Arc::new(Watched {
        inner: gateway,
        store,
        storage,
    })
}

struct Watched<T: ?Sized> {
    inner: Arc<T>,
    store: &'static str,
    storage: Storage,
}

#[async_trait]
impl Journal for Watched<dyn Journal> {
    async fn migrate(&self) -> Result<(), PortError> {
        self.inner.migrate().await
    }
    async fn load(&self, retain_ended: usize) -> Result<Loaded, PortError> {
        self.inner.load(retain_ended).await
    }
    async fn take_over(&self, term: Term) -> Result<(), PortError> {
        self.inner.take_over(term).await
    }
    async fn stand_down(&self, finish: bool) {
        self.inner.stand_down(finish).await
    }
    async fn write(&self, batch: &Batch<'_>) -> Result<(), PortError> {
        let result = self.inner.write(batch).await;
        self.storage.noted(self.store, &result);
        result
    }
    async fn trim_ended(&self, retain_ended: usize) -> Result<u64, PortError> {
        let result = self.inner.trim_ended(retain_ended).await;
        self.storage.noted(self.store, &result);
        result
    }
    async fn ping(&self) -> Result<(), PortError> {
        self.inner.ping().await
    }
    fn full(&self) -> Option<String> {
        // And what the journal knows of its own (a store it writes behind).
        let reasons: Vec<String> = [self.storage.problem(), self.inner.full()]
            .into_iter()
            .flatten()
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

#[async_trait]
impl OutputLog for Watched<dyn OutputLog> {
    async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        pipelined: bool,
    ) -> Result<(), PublishFailure> {
        let result = self.inner.publish_in_order(outputs, pipelined).await;
        match &result {
            Ok(()) => self.storage.clear(self.store),
            Err(failure) if is_full(&failure.error) => {
                self.storage.refused(self.store, &describe(&failure.error))
            }
            Err(_) => {}
        }
        result
    }
    async fn already_stored(&self, msg_ids: &[String]) -> Result<HashSet<String>, PortError> {
        self.inner.already_stored(msg_ids).await
    }
    fn connected(&self) -> bool {
        self.inner.connected()
    }
    async fn status_queries(&self) -> Result<StatusQueries, PortError> {
        self.inner.status_queries().await
    }
    async fn flush(&self) -> Result<(), PortError> {
        self.inner.flush().await
    }
}

#[async_trait]
impl Gateway for Watched<dyn Gateway> {
    async fn submit(&self, subject: &str, payload: Vec<u8>) -> Result<(), PortError> {
        let result = self.inner.submit(subject, payload).await;
        self.storage.noted(self.store, &result);
        // While a store is full its other writers fail too, not always with its words (SQLite answers
        // "database is locked" to the writers behind a commit refused for space): the sender is told
        // the cause.
        result.map_err(|e| match self.storage.problem() {
            Some(problem) if !is_full(&e) => {
                PortError::msg(format!("{problem}; this input: {}", describe(&e)))
            }
            _ => e,
        })
    }
    async fn follow(&self, filter: &str, from: ReadFrom) -> Result<StoredStream, PortError> {
        self.inner.follow(filter, from).await
    }
    async fn last_seq(&self, which: Which) -> Result<u64, PortError> {
        self.inner.last_seq(which).await
    }
    async fn history(
        &self,
        which: Which,
        filter: &str,
        from: ReadFrom,
    ) -> Result<StoredStream, PortError> {
        self.inner.history(which, filter, from).await
    }
    fn answers(&self) -> &dyn crate::ports::Answers {
        self.inner.answers()
    }
    async fn health(&self) -> Result<(), String> {
        self.inner.health().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_stores_are_recognised_by_what_they_say() {
        for text in [
            "error returned from database: database or disk is full",
            "could not extend file \"base/16384/2619\": No space left on device",
            "insufficient storage resources available",
            "maximum bytes exceeded",
            "the embedded bus is full: 1073741824 bytes of inputs not yet handled",
        ] {
            assert!(is_full(&PortError::msg(text)), "{text}");
        }
        assert!(!is_full(&PortError::msg("connection refused")));
    }

    /// JetStream's refusals are known by their code, whatever their words.
    #[test]
    fn full_jetstream_stores_are_recognised_by_their_code() {
        let refusal = |err_code: u64| {
            let error: async_nats::jetstream::Error = serde_json::from_value(serde_json::json!({
                "code": 503, "err_code": err_code, "description": "keine Ressourcen"
            }))
            .expect("an API error");
            async_nats::jetstream::context::PublishError::with_source(
                async_nats::jetstream::context::PublishErrorKind::Other,
                error,
            )
        };
        assert!(is_full(&PortError::new(refusal(10023))));
        assert!(is_full(&PortError::new(refusal(10047))));
        assert!(!is_full(&PortError::new(refusal(10058))));
    }

    #[test]
    fn a_refusal_is_reported_until_a_write_succeeds() {
        let storage = Storage::default();
        assert_eq!(storage.problem(), None);
        storage.noted::<()>("SQLite", &Err(PortError::msg("database or disk is full")));
        storage.noted::<()>("NATS", &Err(PortError::msg("connection refused")));
        let why = storage.problem().expect("reported");
        assert!(
            why.contains("SQLite is full") && !why.contains("NATS"),
            "{why}"
        );
        storage.noted("SQLite", &Ok(()));
        assert_eq!(storage.problem(), None);
    }
}
