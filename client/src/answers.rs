//! The reader of the coordinator's answers that its HTTP API waits on ([`AnswerReader`]): the
//! routers of [`crate::router`] on every service's replies and `requested` events, opened while HTTP
//! calls come; or, in the embedded mode, fed by hand.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpu_coordinator_wire::codec::Encoding;
use gpu_coordinator_wire::Subjects;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::router::{decode_encoded, wait_ready, Readiness, Route, Router, Routes};
use crate::ClientError;

/// How long an [`AnswerReader`] keeps its consumers after the last [`AnswerReader::listen`] once
/// nobody waits any more. A coordinator that no HTTP call waits on reads none of its answers back: on
/// a busy bus those are three more deliveries per request (the `requested` event, the grant, the
/// release), which cost the server and the coordinator as much as a share of the requests.
pub const ANSWERS_IDLE: Duration = Duration::from_secs(30);

/// The coordinator's answers to any number of services, read through JetStream consumers on the output
/// stream (one per filter subject, as a [`crate::Client`] reads its own), handed to whoever waits for a
/// service's request id. This is what the coordinator's HTTP API waits on.
///
/// The consumers are opened by the first [`AnswerReader::listen`] and closed again when no route has
/// been held for [`ANSWERS_IDLE`]: whoever listens before publishing an input and waits for
/// [`AnswerReader::ready`] misses nothing, whether they were open or not.
pub struct AnswerReader {
    routes: Arc<Routes>,
    /// `None` for a reader fed by hand.
    consumers: Option<Arc<Consumers>>,
    shutdown: CancellationToken,
}

/// What opens the consumers of an [`AnswerReader`], and whether they are open.
struct Consumers {
    nats: async_nats::Client,
    subjects: Subjects,
    filters: Vec<String>,
    routes: Arc<Routes>,
    /// The reader's: cancelled when it is dropped.
    shutdown: CancellationToken,
    idle: Duration,
    open: Mutex<Option<Open>>,
}

/// Consumers being read.
struct Open {
    ready: Vec<watch::Receiver<Readiness>>,
    stop: CancellationToken,
    /// The last [`AnswerReader::listen`] (or the opening).
    used: tokio::time::Instant,
}

impl Consumers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        self.open
            .lock()
            .expect("the answer reader's lock is never poisoned")
    }

    /// Runs `f` on the open consumers, under the lock (so that they cannot close meanwhile), opening
    /// them first when they are not, and marks them used.
    fn with_open<R>(&self, f: impl FnOnce(&Open) -> R) -> R {
        let mut open = self.lock();
        let open = open.get_or_insert_with(|| {
            let stop = self.shutdown.child_token();
            let ready = self
                .filters
                .iter()
                .map(|filter| {
                    Router {
                        nats: self.nats.clone(),
                        subjects: self.subjects.clone(),
                        filter: filter.clone(),
                        routes: Arc::clone(&self.routes),
                        reconnects: None,
                        shutdown: stop.clone(),
                    }
                    .spawn()
                })
                .collect();
            tracing::debug!(filters = ?self.filters, "opening the consumers of answers");
            Open {
                ready,
                stop,
                used: tokio::time::Instant::now(),
            }
        });
        open.used = tokio::time::Instant::now();
        f(open)
    }

    /// Closes the consumers if nobody waits and none was asked for within the idle time before `now`.
    fn close_idle(&self, now: tokio::time::Instant) -> bool {
        let mut open = self.lock();
        let idle = open
            .as_ref()
            .is_some_and(|o| now >= o.used + self.idle && self.routes.is_empty());
        if idle {
            if let Some(o) = open.take() {
                tracing::debug!(filters = ?self.filters, "closing the idle consumers of answers");
                o.stop.cancel();
            }
        }
        idle
    }
}

impl AnswerReader {
    /// A reader of `filters` (subjects of the output stream, wildcards allowed, e.g.
    /// `<prefix>.reply.*`), each read from the stream's next message on whenever the reader opens.
    pub fn start(
        nats: async_nats::Client,
        subjects: &Subjects,
        filters: &[String],
    ) -> AnswerReader {
        let routes = Arc::new(Routes::default());
        let shutdown = CancellationToken::new();
        let consumers = Arc::new(Consumers {
            nats,
            subjects: subjects.clone(),
            filters: filters.to_vec(),
            routes: Arc::clone(&routes),
            shutdown: shutdown.clone(),
            idle: ANSWERS_IDLE,
            open: Mutex::new(None),
        });
        tokio::spawn({
            let consumers = Arc::clone(&consumers);
            async move {
                let mut tick = tokio::time::interval(consumers.idle / 4);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        () = consumers.shutdown.cancelled() => return,
                        now = tick.tick() => { consumers.close_idle(now); }
                    }
                }
            }
        });
        AnswerReader {
            routes,
            consumers: Some(consumers),
            shutdown,
        }
    }

    /// A reader fed by hand rather than by consumers: the coordinator's embedded mode hands every
    /// output message to the returned [`AnswerFeed`]. Ready at once.
    pub fn fed(subjects: &Subjects) -> (AnswerReader, AnswerFeed) {
        let routes = Arc::new(Routes::default());
        let feed = AnswerFeed {
            routes: Arc::clone(&routes),
            prefix: subjects.prefix().to_owned(),
        };
        let reader = AnswerReader {
            routes,
            consumers: None,
            shutdown: CancellationToken::new(),
        };
        (reader, feed)
    }

    /// Routes what comes about `request_id` of `service` to the returned [`Route`], until it is
    /// dropped, beside any other waiter for it; opens the consumers if they are closed. Listen
    /// before publishing the input, then wait for [`AnswerReader::ready`].
    pub fn listen(&self, service: &str, request_id: &str) -> Route {
        let listen = || self.routes.listen(service, request_id);
        match &self.consumers {
            // Under the lock, so that the consumers cannot close between the route and its use.
            Some(consumers) => consumers.with_open(|_| listen()),
            None => listen(),
        }
    }

    /// Waits until every consumer is open (from then on nothing stored is missed), at most `wait`;
    /// opens them if they are closed.
    pub async fn ready(&self, wait: Duration) -> Result<(), ClientError> {
        let ready = match &self.consumers {
            Some(consumers) => consumers.with_open(|open| open.ready.clone()),
            None => Vec::new(),
        };
        wait_ready(&ready, tokio::time::Instant::now() + wait).await
    }

    /// Whether the consumers are open (a reader fed by hand has none).
    pub fn is_reading(&self) -> bool {
        self.consumers
            .as_ref()
            .is_some_and(|consumers| consumers.lock().is_some())
    }

    /// Closes the consumers now if nobody waits and nothing listened within [`ANSWERS_IDLE`] before
    /// `now`, as the reader does by itself every quarter of that; says whether it closed them.
    pub fn close_idle(&self, now: tokio::time::Instant) -> bool {
        self.consumers
            .as_ref()
            .is_some_and(|consumers| consumers.close_idle(now))
    }
}

/// What feeds an [`AnswerReader::fed`] reader: every output message, in stream order.
#[derive(Clone)]
pub struct AnswerFeed {
    routes: Arc<Routes>,
    prefix: String,
}

impl AnswerFeed {
    /// Routes one output message to whoever waits for its request (a subject that is not a reply,
    /// order or event is ignored).
    pub fn feed(&self, subject: &str, encoding: Encoding, payload: &[u8]) {
        match decode_encoded(&self.prefix, subject, encoding, payload) {
            Some((service, Ok(incoming))) => self.routes.dispatch(&service, incoming),
            Some((_, Err(e))) => tracing::warn!(subject, "an undecodable answer: {e}"),
            None => {}
        }
    }
}

impl Drop for AnswerReader {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
