//! The client against a real, private nats-server, with the test playing the coordinator: it reads the
//! inputs the client stores in `<PREFIX>_INPUT` and publishes replies and orders into
//! `<PREFIX>_OUTPUT` by hand. So these tests check the client's side of the wire contract (subjects,
//! fences, message ids, the consumer on the output stream across a NATS restart) without the
//! coordinator, which this crate cannot depend on. The same behaviours against the real coordinator
//! are tested in the root crate's `tests/it/`.
//!
//! Each test starts its own nats-server (`gpu-coordinator-test-support`: `$NATS_SERVER`, else
//! `nats-server` on the `PATH`, else `/usr/sbin/nats-server`) on a free port with a temporary store,
//! removed on drop, and some put a [`Proxy`] in front of it to cut the client off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use gpu_coordinator_client::{
    Client, ClientError, Lease, LeaseEvent, LeasePhase, RequestOptions, Worker,
};
use gpu_coordinator_test_support::{NatsServer, Proxy};
use gpu_coordinator_wire::{Control, ControlAction, Outcome, Reply, Subjects};
use serde_json::Value;
use tokio::sync::mpsc;

/// How long any one expected thing may take.
const WAIT: Duration = Duration::from_secs(30);
const SVC: &str = "svc";

// ----- the test as the coordinator -----------------------------------------------------------------

/// An input the client stored.
#[derive(Debug)]
struct Seen {
    kind: String,
    msg_id: Option<String>,
    body: Value,
}

impl Seen {
    fn request_id(&self) -> String {
        self.body["request_id"]
            .as_str()
            .expect("a request_id")
            .to_owned()
    }
}

struct Fake {
    js: jetstream::Context,
    subjects: Subjects,
    inputs: mpsc::UnboundedReceiver<Seen>,
}

impl Fake {
    /// Creates the streams the way the coordinator does and reads the input stream.
    async fn start(url: &str, prefix: &str) -> Fake {
        let nats = async_nats::connect(url).await.expect("connect");
        let js = jetstream::new(nats);
        let subjects = Subjects::new(prefix).unwrap();
        for (name, subjects) in [
            (subjects.input_stream(), subjects.input_subjects()),
            (subjects.output_stream(), subjects.output_subjects()),
        ] {
            js.create_or_update_stream(stream::Config {
                name,
                subjects,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .expect("create stream");
        }
        let (tx, inputs) = mpsc::unbounded_channel();
        tokio::spawn(read_inputs(js.clone(), subjects.input_stream(), tx));
        Fake {
            js,
            subjects,
            inputs,
        }
    }

    /// The next input of `kind`, skipping others (renewals, mostly).
    async fn next(&mut self, kind: &str) -> Seen {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.inputs.recv())
                .await
                .unwrap_or_else(|_| panic!("no `{kind}` input came"))
                .expect("the input reader runs");
            if seen.kind == kind {
                return seen;
            }
        }
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let attempt = async {
                self.js
                    .publish(subject.clone(), payload.clone().into())
                    .await?
                    .await
            };
            match attempt.await {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("fake coordinator: publish failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("fake coordinator: publish failed: {e}"),
            }
        }
    }

    async fn reply(&self, reply: Reply) {
        let payload = serde_json::to_vec(&reply).unwrap();
        self.publish(self.subjects.reply(SVC), payload).await;
    }

    async fn control(&self, control: Control) {
        let payload = serde_json::to_vec(&control).unwrap();
        self.publish(self.subjects.control(SVC), payload).await;
    }

    async fn grant(&self, request_id: &str, fence: u64, lease_ms: u64) {
        let mut reply = Reply::new(request_id, Outcome::Granted);
        reply.gpu = Some("gpu0".into());
        reply.fence = Some(fence);
        reply.lease_ms = Some(lease_ms);
        reply.vram_mb = Some(1_000);
        reply.waited_ms = Some(5);
        self.reply(reply).await;
    }
}

/// Forwards every input of the stream, surviving a server restart (durable consumer, file storage).
async fn read_inputs(js: jetstream::Context, stream: String, tx: mpsc::UnboundedSender<Seen>) {
    loop {
        let messages = async {
            let stream = js.get_stream(&stream).await.map_err(|e| e.to_string())?;
            let consumer: consumer::PullConsumer = stream
                .get_or_create_consumer(
                    "fake",
                    consumer::pull::Config {
                        durable_name: Some("fake".into()),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            consumer
                .stream()
                .heartbeat(Duration::from_secs(1))
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| e.to_string())
        };
        let mut messages = match messages.await {
            Ok(messages) => messages,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let Ok(message) = message else { break };
            let kind = message
                .subject
                .as_str()
                .split('.')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            let msg_id = message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_owned());
            let body = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
            let _ = message.ack().await;
            if tx.send(Seen { kind, msg_id, body }).is_err() {
                return;
            }
        }
    }
}

fn control(action: ControlAction, request_id: &str, fence: u64) -> Control {
    Control {
        action,
        request_id: request_id.to_owned(),
        fence,
        deadline_ms: Some(5_000),
        reason: "a test".into(),
        lease_ms: None,
        expires_at: None,
        gpu: None,
    }
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen in time"))
}

/// `client.request(options)` in a task of its own, so that the test can answer as the coordinator
/// while it waits.
fn ask(
    client: &Client,
    options: RequestOptions,
) -> tokio::task::JoinHandle<Result<Lease, ClientError>> {
    let client = client.clone();
    tokio::spawn(async move { client.request(options).await })
}

// ----- the tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn grant_renew_release() {
    let server = NatsServer::start();
    let mut fake = Fake::start(&server.url(), "gpu").await;
    let client = Client::connect(&server.url(), "gpu", SVC).await.unwrap();

    let request = ask(&client, RequestOptions::new(0).vram_mb(1_000).lease_ms(300));
    let seen = fake.next("request").await;
    let request_id = seen.request_id();
    assert_eq!(seen.body["priority"], 0);
    assert_eq!(seen.body["vram_mb"], 1_000);
    assert_eq!(seen.body["service_id"], SVC);
    assert!(seen
        .msg_id
        .unwrap()
        .starts_with(&format!("{request_id}:request:")));
    fake.grant(&request_id, 5, 300).await;
    let lease = within("the grant", request).await.unwrap().unwrap();
    assert_eq!(lease.request_id(), request_id);
    assert_eq!(lease.fence(), 5);
    assert_eq!(lease.gpu(), "gpu0");
    assert_eq!(lease.phase(), LeasePhase::Active);
    assert_eq!(lease.waited(), Some(Duration::from_millis(5)));

    // It renews itself with its fence, each renewal under a message id of its own.
    let mut events = lease.events();
    let first = fake.next("renew").await;
    assert_eq!(first.body["request_id"], request_id.as_str());
    assert_eq!(first.body["fence"], 5);
    let mut renewed = Reply::new(&request_id, Outcome::Renewed);
    renewed.lease_ms = Some(300);
    fake.reply(renewed).await;
    within("the renewed event", async {
        while !matches!(events.recv().await, Some(LeaseEvent::Renewed { .. })) {}
    })
    .await;
    let second = fake.next("renew").await;
    assert_ne!(first.msg_id, second.msg_id);

    // release() waits for `released`.
    let release = tokio::spawn(lease.release());
    let seen = fake.next("release").await;
    assert_eq!(seen.body["request_id"], request_id.as_str());
    assert_eq!(seen.body["fence"], 5);
    assert!(!release.is_finished());
    fake.reply(Reply::new(&request_id, Outcome::Released)).await;
    within("the release", release).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_release_that_crossed_a_resume_ends_the_resumed_lease() {
    let server = NatsServer::start();
    let mut fake = Fake::start(&server.url(), "gpu").await;
    let client = Client::connect(&server.url(), "gpu", SVC).await.unwrap();
    let request = ask(&client, RequestOptions::new(2).lease_ms(60_000));
    let request_id = fake.next("request").await.request_id();
    fake.grant(&request_id, 5, 60_000).await;
    let lease = within("the grant", request).await.unwrap().unwrap();

    // The coordinator resumed the request under fence 8 (after a pause this lease has not heard of
    // yet) when the release under 5 came: it rejects that one, naming the current fence.
    let release = tokio::spawn(lease.release());
    assert_eq!(fake.next("release").await.body["fence"], 5);
    let mut stale = Reply::new(&request_id, Outcome::Rejected);
    stale.error = Some(format!(
        "stale fence 5: the current fence of request `{request_id}` is 8"
    ));
    stale.fence = Some(8);
    fake.reply(stale).await;
    let again = fake.next("release").await;
    assert_eq!(again.body["request_id"], request_id.as_str());
    assert_eq!(again.body["fence"], 8);
    assert!(!release.is_finished());
    fake.reply(Reply::new(&request_id, Outcome::Released)).await;
    within("the release", release).await.unwrap().unwrap();
}

#[tokio::test]
async fn rejections_and_timeouts_are_errors() {
    let server = NatsServer::start();
    let mut fake = Fake::start(&server.url(), "gpu").await;
    let client = Client::connect(&server.url(), "gpu", SVC).await.unwrap();

    let request = ask(&client, RequestOptions::new(0).gpu("gpu9"));
    let seen = fake.next("request").await;
    let mut rejected = Reply::new(seen.request_id(), Outcome::Rejected);
    rejected.error = Some("field `gpu`: no GPU `gpu9` is managed here".into());
    fake.reply(rejected).await;
    let error = within("the rejection", request).await.unwrap().unwrap_err();
    assert!(
        matches!(&error, ClientError::Rejected { error, .. } if error.contains("gpu9")),
        "{error}"
    );

    let request = ask(&client, RequestOptions::new(2).timeout_ms(100));
    let seen = fake.next("request").await;
    fake.reply(Reply::new(seen.request_id(), Outcome::TimedOut))
        .await;
    let error = within("the timeout", request).await.unwrap().unwrap_err();
    assert!(matches!(error, ClientError::TimedOut), "{error}");

    // Invalid requests are refused before anything is sent.
    let error = client
        .request(RequestOptions::new(0).lease_ms(0))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::InvalidRequest(e) if e.contains("lease_ms")),
        "{error}"
    );
}

#[tokio::test]
async fn dropping_a_request_or_a_lease_releases_it() {
    let server = NatsServer::start();
    let mut fake = Fake::start(&server.url(), "gpu").await;
    let client = Client::connect(&server.url(), "gpu", SVC).await.unwrap();

    // A request nobody waits for any more is withdrawn, whatever state it is in.
    let abandoned = ask(&client, RequestOptions::new(2));
    let seen = fake.next("request").await;
    abandoned.abort();
    let release = fake.next("release").await;
    assert_eq!(release.body["request_id"], seen.request_id().as_str());
    assert_eq!(release.body.get("fence"), None);

    // A dropped lease releases itself with its fence.
    let request = ask(&client, RequestOptions::new(0).lease_ms(60_000));
    let seen = fake.next("request").await;
    fake.grant(&seen.request_id(), 11, 60_000).await;
    let lease = within("the grant", request).await.unwrap().unwrap();
    drop(lease);
    let release = fake.next("release").await;
    assert_eq!(release.body["request_id"], seen.request_id().as_str());
    assert_eq!(release.body["fence"], 11);
}

#[tokio::test]
async fn worker_pauses_acks_resumes_and_sees_revoke() {
    let server = NatsServer::start();
    let mut fake = Fake::start(&server.url(), "gpu").await;
    let client = Client::connect(&server.url(), "gpu", SVC).await.unwrap();

    let paused = Arc::new(AtomicBool::new(false));
    let resumed_on = Arc::new(std::sync::Mutex::new(None));
    let worker = Worker::new(&client)
        .on_pause({
            let paused = paused.clone();
            move |order| {
                let paused = paused.clone();
                async move {
                    assert_eq!(order.fence, 5);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    paused.store(true, Ordering::SeqCst);
                }
            }
        })
        .on_resume({
            let resumed_on = resumed_on.clone();
            move |order| {
                let resumed_on = resumed_on.clone();
                async move {
                    *resumed_on.lock().unwrap() = Some((order.gpu, order.fence));
                }
            }
        });
    let request = tokio::spawn({
        let worker = worker.clone();
        async move {
            worker
                .request(RequestOptions::new(2).lease_ms(60_000))
                .await
        }
    });
    let seen = fake.next("request").await;
    let request_id = seen.request_id();
    fake.grant(&request_id, 5, 60_000).await;
    let lease = within("the grant", request).await.unwrap().unwrap();
    let mut events = lease.events();

    // pause -> on_pause -> ack `paused` with the fence, after the handler returned.
    fake.control(control(ControlAction::Pause, &request_id, 5))
        .await;
    let ack = fake.next("ack").await;
    assert!(
        paused.load(Ordering::SeqCst),
        "acknowledged before on_pause returned"
    );
    assert_eq!(ack.body["action"], "paused");
    assert_eq!(ack.body["fence"], 5);
    assert_eq!(ack.body["request_id"], request_id.as_str());
    within("the paused phase", async {
        while lease.phase() != LeasePhase::Paused {
            events.recv().await;
        }
    })
    .await;

    // resume -> new fence and GPU -> on_resume -> ack `resumed` -> renewals under the new fence.
    let mut resume = control(ControlAction::Resume, &request_id, 8);
    resume.gpu = Some("gpu1".into());
    resume.lease_ms = Some(300);
    fake.control(resume).await;
    let ack = fake.next("ack").await;
    assert_eq!(ack.body["action"], "resumed");
    assert_eq!(ack.body["fence"], 8);
    assert_eq!(*resumed_on.lock().unwrap(), Some(("gpu1".to_owned(), 8)));
    within("being active again", lease.active()).await.unwrap();
    assert_eq!(lease.fence(), 8);
    assert_eq!(lease.gpu(), "gpu1");
    let renew = fake.next("renew").await;
    assert_eq!(renew.body["fence"], 8);

    // revoke, then restart: both reach the user; the lease stops renewing.
    fake.control(control(ControlAction::Revoke, &request_id, 8))
        .await;
    fake.control(control(ControlAction::Restart, &request_id, 8))
        .await;
    within("the revoke", lease.revoked()).await;
    assert!(lease.is_revoked());
    within("the restart event", async {
        while !matches!(events.recv().await, Some(LeaseEvent::Restart { .. })) {}
    })
    .await;
    assert!(matches!(lease.active().await, Err(ClientError::Revoked)));
    assert!(matches!(lease.release().await, Err(ClientError::Revoked)));
}

#[tokio::test]
async fn a_grant_and_an_order_published_across_a_nats_restart_arrive() {
    let mut server = NatsServer::start();
    let mut fake = Fake::start(&server.url(), "gpu").await;
    let client = Client::connect(&server.url(), "gpu", SVC).await.unwrap();

    let request = ask(&client, RequestOptions::new(1).lease_ms(600));
    let seen = fake.next("request").await;
    let request_id = seen.request_id();

    // The server goes away with the client's consumer (kept in memory); the grant is published as
    // soon as it is back, likely before the client has reconnected.
    server = tokio::task::spawn_blocking(move || {
        server.restart_gracefully();
        server
    })
    .await
    .unwrap();
    fake.grant(&request_id, 21, 600).await;
    let lease = within("the grant after the restart", request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.fence(), 21);
    let renew = fake.next("renew").await;
    assert_eq!(renew.body["fence"], 21);

    // Once more, with an order: the revoke published right after the restart reaches the lease.
    server = tokio::task::spawn_blocking(move || {
        server.restart_gracefully();
        server
    })
    .await
    .unwrap();
    fake.control(control(ControlAction::Revoke, &request_id, 21))
        .await;
    within("the revoke after the restart", lease.revoked()).await;
    drop(server);
}

#[tokio::test]
async fn a_grant_and_an_order_published_while_the_client_is_cut_off_arrive() {
    let server = NatsServer::start();
    let mut fake = Fake::start(&server.url(), "gpu").await;
    let proxy = Proxy::start(server.port).await;
    let client = Client::connect(&proxy.url(), "gpu", SVC).await.unwrap();
    let disconnected = || async {
        let nats = client.nats().expect("a NATS client");
        while nats.connection_state() == async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };

    let request = ask(&client, RequestOptions::new(1).lease_ms(600));
    let seen = fake.next("request").await;
    let request_id = seen.request_id();

    // The grant is stored while the client is away (a core subscription would never see it).
    proxy.cut();
    within("the disconnect", disconnected()).await;
    fake.grant(&request_id, 31, 600).await;
    proxy.restore();
    let lease = within("the grant after the reconnect", request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.fence(), 31);

    // The same for an order.
    proxy.cut();
    within("the disconnect", disconnected()).await;
    fake.control(control(ControlAction::Revoke, &request_id, 31))
        .await;
    proxy.restore();
    within("the revoke after the reconnect", lease.revoked()).await;
}

/// The consumers on the output stream of the fake coordinator.
#[cfg(feature = "server")]
async fn output_consumers(fake: &Fake) -> usize {
    let mut stream = fake
        .js
        .get_stream(fake.subjects.output_stream())
        .await
        .expect("the output stream");
    stream
        .info()
        .await
        .expect("stream info")
        .state
        .consumer_count
}

/// The coordinator's reader of every service's answers (the `server` feature, which the workspace's
/// coordinator crate turns on).
#[cfg(feature = "server")]
#[tokio::test]
async fn the_reader_of_answers_reads_only_while_someone_waits() {
    use gpu_coordinator_client::{AnswerReader, Incoming, ANSWERS_IDLE};
    let server = NatsServer::start();
    let fake = Fake::start(&server.url(), "gpu").await;
    let nats = async_nats::connect(server.url()).await.unwrap();
    let reader = AnswerReader::start(nats, &fake.subjects, &[fake.subjects.reply("*")]);
    // Nobody has waited yet: nothing is read.
    assert!(!reader.is_reading());
    assert_eq!(output_consumers(&fake).await, 0);

    let mut route = reader.listen(SVC, "a");
    within("the reader open", reader.ready(WAIT)).await.unwrap();
    assert!(reader.is_reading());
    assert_eq!(output_consumers(&fake).await, 1);
    fake.grant("a", 1, 1_000).await;
    let Some(Incoming::Reply(reply)) = within("the grant", route.recv()).await else {
        panic!("the grant is routed");
    };
    assert_eq!(
        (reply.request_id.as_str(), reply.outcome),
        ("a", Outcome::Granted)
    );

    // Kept while a route is held, however long ago it was made, and for the idle time after.
    let later = tokio::time::Instant::now() + ANSWERS_IDLE * 100;
    assert!(!reader.close_idle(later));
    drop(route);
    assert!(!reader.close_idle(tokio::time::Instant::now()));
    assert!(reader.is_reading());
    assert!(reader.close_idle(later));
    assert!(!reader.is_reading());
    within("the consumer deleted", async {
        while output_consumers(&fake).await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Listening opens it again, from the stream's next message: what was stored while it was
    // closed is not handed on (nobody waited for it), what comes after is.
    fake.grant("b", 2, 1_000).await;
    let mut route = reader.listen(SVC, "b");
    within("the reader open again", reader.ready(WAIT))
        .await
        .unwrap();
    fake.reply(Reply::new("b", Outcome::Released)).await;
    let Some(Incoming::Reply(reply)) = within("the release", route.recv()).await else {
        panic!("the release is routed");
    };
    assert_eq!(
        (reply.request_id.as_str(), reply.outcome),
        ("b", Outcome::Released)
    );
    drop(reader);
    within("the consumer deleted with the reader", async {
        while output_consumers(&fake).await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
