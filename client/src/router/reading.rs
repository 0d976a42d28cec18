//! One router: the task that keeps a consumer on the output stream open (made by a coordinator or by
//! the client), reads it, and makes it anew from the last sequence it handed on when it fails or NATS
//! reconnects.

use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use gpu_coordinator_wire::{ReaderAnswer, ReaderAsk, ReaderTopic, Subjects};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{decode_incoming, Readiness, Routes};

/// How long the server keeps a consumer nobody pulls from (the client is gone).
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(60);
/// The pull requests' expiry and idle heartbeat: two missed heartbeats and the consumer is recreated.
/// On a NATS cluster the consumer goes with the server that holds it while this connection stays
/// up: only the missing heartbeats tell, within two of them.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a call that looks the output stream up or makes a consumer waits for its answer. On a
/// NATS cluster, JetStream does not answer such calls while the stream elects a new leader (after its
/// server went away, a few seconds), nor, with nats-server 2.9, when it placed the new consumer on a
/// server that is down: the call is then made again after this, rather than after the connection's
/// request timeout (10 s).
const API_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a coordinator may take to answer a question for a reader (it makes the consumer, within
/// its own bound of 3 s).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the connection state is looked at, to catch reconnects that no callback reports.
const STATE_POLL: Duration = Duration::from_millis(250);
/// Backoff between failed attempts to open the consumer.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A consumer that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);

/// Everything a router task needs.
pub(crate) struct Router {
    pub(crate) nats: async_nats::Client,
    pub(crate) subjects: Subjects,
    /// The one subject this router reads: a service's reply or control subject, or a wildcard.
    pub(crate) filter: String,
    pub(crate) routes: Arc<Routes>,
    /// Bumped on every (re)connect, when this client made the connection; `None` otherwise, and then
    /// the connection state is polled.
    pub(crate) reconnects: Option<watch::Receiver<u64>>,
    pub(crate) shutdown: CancellationToken,
}

impl Router {
    /// Starts the router task; the receiver says when it is ready.
    pub(crate) fn spawn(self) -> watch::Receiver<Readiness> {
        let (ready_tx, ready_rx) = watch::channel(Readiness::Starting(None));
        tokio::spawn(self.run(ready_tx));
        ready_rx
    }

    /// Reads the output stream until shutdown: a consumer at a time, each made anew (from right
    /// after the last message handed on) when it fails or NATS reconnects.
    async fn run(self, ready: watch::Sender<Readiness>) {
        let js = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(self.nats.clone());
        let mut reading = Reading {
            stream_name: self.subjects.output_stream(),
            router: self,
            js,
            next_seq: None,
            backoff: BACKOFF_MIN,
        };
        loop {
            let Some((consumer_name, mut messages)) = reading.open_consumer(&ready).await else {
                return;
            };
            let filter = &reading.router.filter;
            tracing::debug!(consumer = consumer_name, start = ?reading.next_seq, "reading {filter}");
            ready.send_if_modified(|r| {
                let changed = *r != Readiness::Ready;
                *r = Readiness::Ready;
                changed
            });
            let opened_at = tokio::time::Instant::now();
            let Some(why) = reading.read(&mut messages).await else {
                delete_consumer(&reading.js, &reading.stream_name, consumer_name);
                return;
            };
            drop(messages);
            delete_consumer(&reading.js, &reading.stream_name, consumer_name);
            if !reading.reopen_after(why, opened_at).await {
                return;
            }
        }
    }
}

/// A router at work: the consumer it reads, and where and when the next one starts.
struct Reading {
    router: Router,
    js: jetstream::Context,
    stream_name: String,
    /// The stream sequence to start the next consumer at: right after the last message handed on.
    next_seq: Option<u64>,
    /// How long to wait before the next attempt after a failure.
    backoff: Duration,
}

impl Reading {
    /// Opens the next consumer, retrying with backoff (and telling `ready` why while it is not
    /// ready yet); `None` on shutdown.
    async fn open_consumer(
        &mut self,
        ready: &watch::Sender<Readiness>,
    ) -> Option<(String, consumer::pull::Stream)> {
        let shutdown = self.router.shutdown.clone();
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            // A reconnect from here on means the new consumer may have missed a delivery.
            if let Some(reconnects) = self.router.reconnects.as_mut() {
                reconnects.borrow_and_update();
            }
            let opened = tokio::select! {
                () = shutdown.cancelled() => return None,
                opened = open(
                    &self.js,
                    &self.router.subjects,
                    &self.stream_name,
                    &self.router.filter,
                    &mut self.next_seq,
                ) => opened,
            };
            match opened {
                Ok(opened) => return Some(opened),
                Err(error) => {
                    tracing::warn!("cannot read the coordinator's answers: {error}; retrying");
                    ready.send_if_modified(|r| match r {
                        Readiness::Starting(e) => {
                            *e = Some(error);
                            true
                        }
                        Readiness::Ready => false,
                    });
                    if !self.back_off().await {
                        return None;
                    }
                }
            }
        }
    }

    /// Hands on what the consumer delivers until it must be replaced (and why); `None` on shutdown.
    async fn read(&mut self, messages: &mut consumer::pull::Stream) -> Option<Reopen> {
        let mut connected = self.router.nats.connection_state() == State::Connected;
        let mut poll = tokio::time::interval(STATE_POLL);
        let mut expected_consumer_seq = 1;
        loop {
            let reconnects = &mut self.router.reconnects;
            let reconnected = async {
                match reconnects.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = self.router.shutdown.cancelled() => return None,
                () = reconnected => return Some(Reopen::Reconnected),
                _ = poll.tick() => {
                    let now = self.router.nats.connection_state() == State::Connected;
                    if now && !connected {
                        return Some(Reopen::Reconnected);
                    }
                    connected = now;
                }
                message = messages.next() => match message {
                    Some(Ok(message)) => {
                        if let Err(why) = self.hand_on(&message, &mut expected_consumer_seq) {
                            return Some(why);
                        }
                    }
                    Some(Err(e)) => return Some(Reopen::Failed(e.to_string())),
                    None => {
                        return Some(Reopen::Failed(
                            "the consumer's message stream ended".to_owned(),
                        ))
                    }
                },
            }
        }
    }

    /// Hands one delivered message to whoever waits for it, after checking that no delivery before
    /// it was lost (else: the consumer must be replaced).
    fn hand_on(
        &mut self,
        message: &jetstream::Message,
        expected_consumer_seq: &mut u64,
    ) -> Result<(), Reopen> {
        let (stream_seq, consumer_seq) = match message.info() {
            Ok(info) => (info.stream_sequence, info.consumer_sequence),
            Err(e) => {
                tracing::warn!("a message without JetStream metadata: {e}");
                return Ok(());
            }
        };
        if consumer_seq != *expected_consumer_seq {
            return Err(Reopen::Failed(format!(
                "a delivery was lost (consumer sequence {consumer_seq}, expected \
                 {expected_consumer_seq})"
            )));
        }
        *expected_consumer_seq += 1;
        self.next_seq = Some(stream_seq + 1);
        match decode_incoming(
            self.router.subjects.prefix(),
            message.subject.as_str(),
            message.headers.as_ref(),
            &message.payload,
        ) {
            Some((service, Ok(incoming))) => self.router.routes.dispatch(&service, incoming),
            Some((_, Err(error))) => tracing::warn!(
                subject = message.subject.as_str(),
                "cannot read a message from the coordinator: {error}"
            ),
            None => {}
        }
        Ok(())
    }

    /// Waits before the next consumer as `why` asks (`opened_at`: when the one replaced was made);
    /// false on shutdown.
    async fn reopen_after(&mut self, why: Reopen, opened_at: tokio::time::Instant) -> bool {
        let filter = &self.router.filter;
        match why {
            Reopen::Reconnected => {
                tracing::debug!("NATS reconnected: recreating the consumer on {filter}");
                self.backoff = BACKOFF_MIN;
                true
            }
            Reopen::Failed(error) => {
                tracing::debug!("recreating the consumer on {filter}: {error}");
                // A consumer that failed soon after it was made backs off, so that a lasting
                // failure does not spin.
                if opened_at.elapsed() > STABLE {
                    self.backoff = BACKOFF_MIN;
                }
                self.back_off().await
            }
        }
    }

    /// Sleeps the backoff and doubles it (up to [`BACKOFF_MAX`]); false on shutdown.
    async fn back_off(&mut self) -> bool {
        tokio::select! {
            () = self.router.shutdown.cancelled() => return false,
            () = tokio::time::sleep(self.backoff) => {}
        }
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        true
    }
}

/// Why a consumer is replaced.
enum Reopen {
    /// The connection came back: a delivery may have been lost while it was down.
    Reconnected,
    /// The consumer failed.
    Failed(String),
}

/// Creates the consumer at `next_seq` (or, the first time, at the stream's next sequence) and starts
/// pulling from it.
async fn open(
    js: &jetstream::Context,
    subjects: &Subjects,
    stream_name: &str,
    filter: &str,
    next_seq: &mut Option<u64>,
) -> Result<(String, consumer::pull::Stream), String> {
    let stream = js.get_stream(stream_name).await.map_err(|e| {
        format!(
            "the output stream `{stream_name}` is not available ({e}): is NATS up, and does the \
             coordinator run with this prefix?"
        )
    })?;
    let state = &stream.cached_info().state;
    let start = match *next_seq {
        None => state.last_sequence + 1,
        Some(next) if next > state.last_sequence + 1 => {
            // Sequences only go back when the stream was deleted and made anew: read it all again
            // (only ids this client waits for are handed on).
            tracing::warn!(
                "the stream `{stream_name}` was reset (its last sequence is {}, this client had read \
                 up to {}); reading it from its start",
                state.last_sequence,
                next - 1
            );
            state.first_sequence.max(1)
        }
        Some(next) => next,
    };
    *next_seq = Some(start);
    let name = match own_topic(subjects, filter) {
        Some((topic, svc)) => match ask_coordinator(js, subjects, topic, svc, start).await? {
            Some(name) => name,
            None => make_consumer(js, &stream, stream_name, filter, start).await?,
        },
        None => make_consumer(js, &stream, stream_name, filter, start).await?,
    };
    let consumer: consumer::PullConsumer = stream
        .get_consumer(&name)
        .await
        .map_err(|e| format!("cannot find the consumer made on `{stream_name}`: {e}"))?;
    let messages = consumer
        .stream()
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| format!("cannot pull from a consumer on `{stream_name}`: {e}"))?;
    Ok((name, messages))
}

/// The topic and service of `filter` when it is one service's replies or control orders.
fn own_topic<'a>(subjects: &Subjects, filter: &'a str) -> Option<(ReaderTopic, &'a str)> {
    let rest = filter.strip_prefix(subjects.prefix())?.strip_prefix('.')?;
    let (topic, svc) = rest.split_once('.')?;
    let topic = match topic {
        "reply" => ReaderTopic::Reply,
        "control" => ReaderTopic::Control,
        _ => return None,
    };
    gpu_coordinator_wire::valid_service_id(svc).then_some((topic, svc))
}

/// Asks a coordinator to make the consumer (`<prefix>.reader.<svc>`): with per-service permissions a
/// service may not make consumers itself (a consumer's deliver subject cannot be checked by NATS
/// permissions, see the coordinator's `nats_readers`). `None` when no coordinator answers the subject
/// (none runs, or an older one): the client then makes the consumer itself.
async fn ask_coordinator(
    js: &jetstream::Context,
    subjects: &Subjects,
    topic: ReaderTopic,
    svc: &str,
    start: u64,
) -> Result<Option<String>, String> {
    let ask = ReaderAsk {
        topic,
        start_seq: start,
    };
    let body = serde_json::to_vec(&ask).expect("a reader question always serializes");
    let subject = subjects.reader(svc);
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(ASK_TIMEOUT));
    match js.client().send_request(subject.clone(), request).await {
        Ok(message) => {
            let answer: ReaderAnswer = serde_json::from_slice(&message.payload)
                .map_err(|e| format!("the coordinator's answer on {subject} is not one: {e}"))?;
            match (answer.consumer, answer.error) {
                (Some(name), _) => Ok(Some(name)),
                (None, error) => Err(format!(
                    "the coordinator made no reader on {subject}: {}",
                    error.unwrap_or_default()
                )),
            }
        }
        Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(None),
        Err(e) => Err(format!(
            "asking a coordinator for a reader on {subject}: {e}"
        )),
    }
}

/// Makes the consumer with this client's own rights (NATS without per-service permissions, or the
/// coordinator's own readers).
async fn make_consumer(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    stream_name: &str,
    filter: &str,
    start: u64,
) -> Result<String, String> {
    // Random and never listed to services: with per-service permissions a service may pull from any
    // consumer it can name, so the name is what keeps another service from reading this one's
    // orders. A name also makes the library create it on the subject that carries its filter.
    let name = js
        .client()
        .new_inbox()
        .rsplit('.')
        .next()
        .map(str::to_owned);
    let consumer = stream
        .create_consumer(reader_config(name, filter, start))
        .await
        .map_err(|e| {
            format!(
                "cannot create a consumer on `{stream_name}` ({e}); with per-service NATS \
                 permissions a coordinator must be running to make it"
            )
        })?;
    Ok(consumer.cached_info().name.clone())
}

/// The configuration of a reader of the coordinator's answers: a pull consumer (never a push one)
/// filtered to `filter`, delivering from stream sequence `start`, without acknowledgements, gone by
/// itself when nobody pulls from it. What the client makes itself and what a coordinator makes for it
/// on `<prefix>.reader.<svc>`.
pub fn reader_config(name: Option<String>, filter: &str, start: u64) -> consumer::pull::Config {
    consumer::pull::Config {
        name,
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start,
        },
        ack_policy: consumer::AckPolicy::None,
        filter_subject: filter.to_owned(),
        inactive_threshold: INACTIVE_THRESHOLD,
        memory_storage: true,
        num_replicas: 1,
        ..Default::default()
    }
}

/// Deletes a consumer that is no longer read, in the background (it also goes by itself after
/// [`INACTIVE_THRESHOLD`]).
fn delete_consumer(js: &jetstream::Context, stream_name: &str, consumer_name: String) {
    let js = js.clone();
    let stream_name = stream_name.to_owned();
    tokio::spawn(async move {
        let _ = js
            .delete_consumer_from_stream(&consumer_name, &stream_name)
            .await;
    });
}
