//! The client library (`gpu-coordinator-client`) against a real coordinator: leases that renew
//! themselves, release and drop, preemption through a `Worker`, errors, reused request ids,
//! MessagePack, and a NATS restart under a held lease.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use gpu_coordinator::config::Config;
use gpu_coordinator_client::{
    Client, ClientError, Encoding, Lease, LeaseEvent, LeaseEvents, LeasePhase, PauseOrder,
    RequestOptions, ResumeOrder, Worker,
};
use gpu_coordinator_wire::{HolderState, Outcome};
use tokio::sync::Notify;

use crate::support::{
    eventually, nats_port, test_config, unique, Coordinator, NatsServer, Probe, Seen, DEADLINE,
};

/// A client of the coordinator configured by `config`, as the service `svc`.
async fn connect(config: &Config, svc: &str) -> Client {
    Client::connect(&config.nats.url, &config.nats.prefix, svc)
        .await
        .expect("connect the client")
}

/// A request id unique to this run.
pub(crate) fn request_id(tag: &str) -> String {
    unique(tag).replace('_', "-")
}

/// The next lease event that matches `pred`, within [`DEADLINE`]. A `Revoked` event that does not
/// match fails the test at once: no test here expects a lease to be lost silently.
pub(crate) async fn next_event(
    events: &mut LeaseEvents,
    what: &str,
    pred: impl Fn(&LeaseEvent) -> bool,
) -> LeaseEvent {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if pred(&event) => return event,
            Ok(Some(event @ LeaseEvent::Revoked { .. })) => {
                panic!("waiting for {what}, the lease was revoked: {event:?}; before: {skipped:?}")
            }
            Ok(Some(event)) => skipped.push(event),
            Ok(None) => panic!("waiting for {what}, the lease ended; events: {skipped:?}"),
            Err(_) => panic!("no {what} within {DEADLINE:?}; events meanwhile: {skipped:?}"),
        }
    }
}

pub(crate) fn is_renewed(event: &LeaseEvent) -> bool {
    matches!(event, LeaseEvent::Renewed { .. })
}

/// Awaits a spawned request, within [`DEADLINE`].
pub(crate) async fn joined<T>(what: &str, task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(DEADLINE, task)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("{what} panicked: {e}"))
}

/// A reply of the probe for this request id with this outcome (any encoding).
fn reply_of(request_id: &str, outcome: &str) -> impl Fn(&Seen) -> bool {
    let (request_id, outcome) = (request_id.to_owned(), outcome.to_owned());
    move |s| {
        s.subject.contains(".reply.")
            && s.str("request_id") == Some(request_id.as_str())
            && s.str("outcome") == Some(outcome.as_str())
    }
}

/// A lease of 300 ms held for more than three lease lengths: renewed again and again, never revoked,
/// its expiry moving forward, and the coordinator shows it held throughout.
#[tokio::test]
async fn lease_renews_itself_for_longer_than_its_length() {
    let config = test_config("cl_renew", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let client = connect(&config, "renewer").await;
    let lease = client
        .request(RequestOptions::new(1).vram_mb(4_000).lease_ms(300))
        .await
        .expect("granted");
    assert_eq!(lease.gpu(), "0");
    assert_eq!(lease.vram_mb(), Some(4_000));
    assert_eq!(lease.lease_length(), Duration::from_millis(300));
    let fence = lease.fence();
    let mut events = lease.events();
    let first_expiry = lease.expires_at();
    let held_since = Instant::now();

    let mut renewals = 0;
    let mut last_expiry = first_expiry;
    while renewals < 3 || held_since.elapsed() < Duration::from_millis(3 * 300 + 100) {
        let LeaseEvent::Renewed { expires_at } =
            next_event(&mut events, "a renewal", is_renewed).await
        else {
            unreachable!()
        };
        assert!(
            expires_at >= last_expiry,
            "the expiry never goes back: {expires_at:?} after {last_expiry:?}"
        );
        last_expiry = expires_at;
        renewals += 1;
    }
    assert!(
        last_expiry >= first_expiry + Duration::from_millis(3 * 300),
        "held for more than three lease lengths, the expiry moved by as much: {first_expiry:?} -> \
         {last_expiry:?}"
    );
    assert!(lease.expires_at() >= last_expiry);
    assert!(!lease.is_revoked());
    assert_eq!(lease.phase(), LeasePhase::Active);
    assert_eq!(lease.fence(), fence, "renewals keep the fence");

    let status = client.status().await.expect("status");
    let holders = &status.gpus[0].holders;
    assert_eq!(holders.len(), 1, "{status:?}");
    assert_eq!(holders[0].request_id, lease.request_id());
    assert_eq!(holders[0].fence, fence);
    assert_eq!(holders[0].state, HolderState::Active);

    lease.release().await.expect("released");
    drop(client);
    coordinator.stop().await.expect("a clean stop");
}

/// Starts a whole-GPU request from a second client that must wait, and returns it once the
/// coordinator has queued it.
async fn queued_request(
    config: &Config,
    probe: &mut Probe,
    svc: &str,
) -> (
    String,
    tokio::task::JoinHandle<Result<Lease, ClientError>>,
    Client,
) {
    let client = connect(config, svc).await;
    let id = request_id("waiter");
    let task = tokio::spawn({
        let client = client.clone();
        let options = RequestOptions::new(1).request_id(id.clone());
        async move { client.request(options).await }
    });
    probe.event("queued", Some(&id)).await;
    (id, task, client)
}

/// `release()` answers Ok, and the request queued behind the lease is granted.
#[tokio::test]
async fn release_hands_the_gpu_to_the_next_request() {
    let config = test_config("cl_release", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let holder = connect(&config, "holder").await;
    let lease = holder
        .request(RequestOptions::new(1))
        .await
        .expect("granted");
    let first_fence = lease.fence();
    let first_id = lease.request_id().to_owned();

    let (waiter_id, waiter, _waiter_client) = queued_request(&config, &mut probe, "waiter").await;
    assert!(!waiter.is_finished(), "the GPU is not free yet");

    lease.release().await.expect("release answers Ok");
    probe.reply(&first_id, "released").await;
    let next = joined("the queued request", waiter)
        .await
        .expect("the queued request is granted");
    assert_eq!(next.request_id(), waiter_id);
    assert!(next.fence() > first_fence);
    next.release().await.expect("released");
    coordinator.stop().await.expect("a clean stop");
}

/// Dropping a lease releases it: the request queued behind it is granted.
#[tokio::test]
async fn dropping_a_lease_frees_the_gpu() {
    let config = test_config("cl_drop", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let holder = connect(&config, "holder").await;
    let lease = holder
        .request(RequestOptions::new(1).lease_ms(60_000))
        .await
        .expect("granted");
    let first_fence = lease.fence();
    let first_id = lease.request_id().to_owned();

    let (waiter_id, waiter, _waiter_client) = queued_request(&config, &mut probe, "waiter").await;
    assert!(!waiter.is_finished(), "the GPU is not free yet");

    drop(lease);
    // Released long before its 60 s lease could have run out.
    let released = probe.event("released", Some(&first_id)).await;
    assert_eq!(released.fence, Some(first_fence));
    let next = joined("the queued request", waiter)
        .await
        .expect("the queued request is granted after the drop");
    assert_eq!(next.request_id(), waiter_id);
    assert!(next.fence() > first_fence);
    next.release().await.expect("released");
    coordinator.stop().await.expect("a clean stop");
}

/// What a worker's handlers saw.
#[derive(Default)]
pub(crate) struct HandlerLog {
    pub(crate) pauses: Vec<PauseOrder>,
    /// When `on_pause` returned.
    pub(crate) pause_returned: Option<Instant>,
    pub(crate) resumes: Vec<ResumeOrder>,
    pub(crate) resume_returned: Option<Instant>,
}

/// A worker whose handlers take `pause_work` to pause and record what they saw.
pub(crate) fn recording_worker(
    client: &Client,
    pause_work: Duration,
    seen: &Arc<Mutex<HandlerLog>>,
) -> Worker {
    let (on_pause_seen, on_resume_seen) = (Arc::clone(seen), Arc::clone(seen));
    Worker::new(client)
        .on_pause(move |order| {
            let seen = Arc::clone(&on_pause_seen);
            async move {
                seen.lock().unwrap().pauses.push(order);
                // The current unit of work finishes, the VRAM is freed.
                tokio::time::sleep(pause_work).await;
                seen.lock().unwrap().pause_returned = Some(Instant::now());
            }
        })
        .on_resume(move |order| {
            let seen = Arc::clone(&on_resume_seen);
            async move {
                seen.lock().unwrap().resumes.push(order);
                seen.lock().unwrap().resume_returned = Some(Instant::now());
            }
        })
}

/// A worker at priority 2 holds the whole GPU; a chat at priority 0 needs it. `on_pause` runs and the
/// ACK comes only after it returned; the chat is granted under a higher fence; after the chat the
/// worker resumes under a still higher fence, which its lease takes on and renews under.
#[tokio::test]
async fn worker_pauses_for_chat_and_resumes_after_it() {
    let config = test_config("cl_preempt", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let asr = connect(&config, "asr").await;
    let seen = Arc::new(Mutex::new(HandlerLog::default()));
    let worker = recording_worker(&asr, Duration::from_millis(300), &seen);
    let lease = worker
        .request(RequestOptions::new(2).lease_ms(600))
        .await
        .expect("the worker is granted");
    let worker_id = lease.request_id().to_owned();
    let worker_fence = lease.fence();
    let mut events = lease.events();

    let chat_client = connect(&config, "chat").await;
    let chat_task = tokio::spawn({
        let chat_client = chat_client.clone();
        async move { chat_client.request(RequestOptions::new(0)).await }
    });

    probe.event("preempting", Some(&worker_id)).await;
    let pausing = next_event(&mut events, "pausing", |e| {
        matches!(e, LeaseEvent::Pausing { .. })
    })
    .await;
    assert!(
        matches!(&pausing, LeaseEvent::Pausing { fence, deadline, .. }
            if *fence == worker_fence && *deadline == Some(Duration::from_millis(10_000))),
        "{pausing:?}"
    );
    // The coordinator takes the pause only once the handler is done.
    probe.event("paused", Some(&worker_id)).await;
    let returned = seen
        .lock()
        .unwrap()
        .pause_returned
        .expect("on_pause returned before the coordinator had the pause ACK");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.pauses.len(), 1);
        assert_eq!(seen.pauses[0].request_id, worker_id);
        assert_eq!(seen.pauses[0].fence, worker_fence);
        assert!(
            seen.pauses[0].reason.contains("chat"),
            "{:?}",
            seen.pauses[0]
        );
    }
    let paused = next_event(&mut events, "paused", |e| {
        matches!(e, LeaseEvent::Paused { .. })
    })
    .await;
    assert_eq!(
        paused,
        LeaseEvent::Paused {
            fence: worker_fence
        }
    );
    assert_eq!(lease.phase(), LeasePhase::Paused);

    let chat = joined("the chat request", chat_task)
        .await
        .expect("the chat is granted");
    assert!(returned <= Instant::now());
    let chat_fence = chat.fence();
    assert!(chat_fence > worker_fence, "{chat_fence} > {worker_fence}");
    let status = chat_client.status().await.expect("status");
    assert_eq!(status.gpus[0].holders.len(), 1);
    assert_eq!(status.gpus[0].holders[0].request_id, chat.request_id());
    assert!(status.paused.iter().any(|p| p.request_id == worker_id));

    chat.release().await.expect("the chat releases");
    let resumed = next_event(&mut events, "resumed", |e| {
        matches!(e, LeaseEvent::Resumed { .. })
    })
    .await;
    let LeaseEvent::Resumed { fence, gpu } = resumed else {
        unreachable!()
    };
    assert!(fence > chat_fence, "{fence} > {chat_fence}");
    assert_eq!(gpu, "0");
    assert_eq!(lease.fence(), fence, "the lease took on the new fence");
    assert_eq!(lease.phase(), LeasePhase::Active);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.resumes.len(), 1);
        assert_eq!(seen.resumes[0].fence, fence);
        assert!(seen.resume_returned.is_some());
    }
    let resumed_event = probe.event("resumed", Some(&worker_id)).await;
    assert_eq!(resumed_event.fence, Some(fence));

    // Renewed under the new fence: the coordinator accepts it.
    next_event(&mut events, "a renewal after the resume", is_renewed).await;
    let renewed = probe
        .expect("a renewal under the new fence", |s| {
            reply_of(&worker_id, "renewed")(s) && s.json["fence"] == fence
        })
        .await;
    assert_eq!(renewed.reply().fence, Some(fence));
    assert!(!probe.drain_and_find(reply_of(&worker_id, "rejected")));
    lease.release().await.expect("the worker releases");
    coordinator.stop().await.expect("a clean stop");
}

/// A pause handler that outlasts the ACK deadline: the coordinator revokes the lease when it runs out
/// (the pausing lease is not renewed), which `revoked()` reports, and gives the GPU on.
#[tokio::test]
async fn pause_handler_past_the_deadline_is_revoked() {
    let mut config = test_config("cl_slowpause", &[("0", 24_000)]);
    config.preemption.ack_deadline_ms = 300;
    config.lease.default_ms = 1_000;
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let asr = connect(&config, "asr").await;
    let go_on = Arc::new(Notify::new());
    let worker = Worker::new(&asr).on_pause({
        let go_on = Arc::clone(&go_on);
        move |_order| {
            let go_on = Arc::clone(&go_on);
            // Far past the deadline: it returns only when the test says so.
            async move { go_on.notified().await }
        }
    });
    let lease = worker
        .request(RequestOptions::new(2))
        .await
        .expect("granted");
    let worker_id = lease.request_id().to_owned();
    let mut events = lease.events();

    let chat_client = connect(&config, "chat").await;
    let chat_task = tokio::spawn({
        let chat_client = chat_client.clone();
        async move { chat_client.request(RequestOptions::new(0)).await }
    });
    next_event(&mut events, "pausing", |e| {
        matches!(e, LeaseEvent::Pausing { .. })
    })
    .await;
    tokio::time::timeout(DEADLINE, lease.revoked())
        .await
        .expect("the lease is revoked once the ACK deadline passed");
    assert!(lease.is_revoked());
    assert_eq!(lease.phase(), LeasePhase::Revoked);
    let revoke = probe.control(&worker_id, "revoke").await;
    assert!(revoke.reason.contains("no pause ACK"), "{}", revoke.reason);
    let revoked = next_event(&mut events, "revoked", |e| {
        matches!(e, LeaseEvent::Revoked { .. })
    })
    .await;
    assert!(matches!(revoked, LeaseEvent::Revoked { reason } if reason.contains("no pause ACK")));
    let active = lease.active().await;
    assert!(matches!(active, Err(ClientError::Revoked)), "{active:?}");

    let chat = joined("the chat request", chat_task)
        .await
        .expect("the chat is granted after the revoke");
    let chat_id = chat.request_id().to_owned();
    // The handler finishes late: no ACK goes out for a revoked lease.
    go_on.notify_one();
    assert!(matches!(lease.release().await, Err(ClientError::Revoked)));
    chat.release().await.expect("the chat releases");
    probe.reply(&chat_id, "released").await;
    assert!(!probe.drain_and_find(|s| {
        s.str("request_id") == Some(worker_id.as_str())
            && (s.subject.contains(".event.paused.") || s.str("outcome") == Some("rejected"))
    }));
    coordinator.stop().await.expect("a clean stop");
}

/// `timeout_ms` while the GPU is busy: `TimedOut`. A GPU that does not exist: `Rejected`, naming it.
#[tokio::test]
async fn timeouts_and_rejections_are_errors() {
    let config = test_config("cl_errors", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let holder = connect(&config, "holder").await;
    let lease = holder
        .request(RequestOptions::new(0).preemptible(false))
        .await
        .expect("granted");

    let client = connect(&config, "impatient").await;
    let started = Instant::now();
    let timed_out = client.request(RequestOptions::new(2).timeout_ms(100)).await;
    assert!(
        matches!(timed_out, Err(ClientError::TimedOut)),
        "{timed_out:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the coordinator's timed_out answered, not the client's own grace: {:?}",
        started.elapsed()
    );

    let rejected = client.request(RequestOptions::new(2).gpu("nope")).await;
    match rejected {
        Err(ClientError::Rejected { code, error }) => {
            assert_eq!(code, Some(gpu_coordinator_wire::RejectCode::UnknownGpu));
            assert!(error.contains("`nope`"), "{error}");
            assert!(error.contains("gpu"), "{error}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(!lease.is_revoked());
    lease.release().await.expect("released");
    coordinator.stop().await.expect("a clean stop");
}

/// A request id used again while its lease is held: the same lease (same fence); by the same client,
/// an error before anything is sent; once released: `Ended(Released)`.
#[tokio::test]
async fn reused_request_id_answers_the_current_state() {
    let config = test_config("cl_reuse", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let first = connect(&config, "svc").await;
    let id = request_id("reused");
    let options = RequestOptions::new(1)
        .request_id(id.clone())
        .lease_ms(60_000);
    let lease = first.request(options.clone()).await.expect("granted");
    let fence = lease.fence();

    // The same client holds it already: refused locally.
    let local = first.request(options.clone()).await;
    assert!(
        matches!(&local, Err(ClientError::DuplicateRequestId(reused)) if *reused == id),
        "{local:?}"
    );

    // Another instance of the service (a restarted process) gets the lease it still holds.
    let second = connect(&config, "svc").await;
    let again = second
        .request(options.clone())
        .await
        .expect("granted again");
    assert_eq!(again.request_id(), id);
    assert_eq!(again.fence(), fence, "the same lease, not a second grant");
    assert_eq!(again.gpu(), lease.gpu());
    let status = first.status().await.expect("status");
    assert_eq!(status.gpus[0].holders.len(), 1, "{status:?}");

    let mut again_events = again.events();
    lease.release().await.expect("released");
    // The other handle hears of it.
    next_event(&mut again_events, "released", |e| {
        matches!(e, LeaseEvent::Released)
    })
    .await;
    assert_eq!(again.phase(), LeasePhase::Released);
    drop(again);

    for client in [&first, &second] {
        let ended = client.request(options.clone()).await;
        assert!(
            matches!(ended, Err(ClientError::Ended(Outcome::Released))),
            "{ended:?}"
        );
    }
    let status = first.status().await.expect("status");
    assert!(status.gpus[0].holders.is_empty(), "{status:?}");
    assert!(status.queue.is_empty(), "{status:?}");
    coordinator.stop().await.expect("a clean stop");
}

/// A whole request, renew and release cycle in MessagePack: the coordinator answers in MessagePack.
#[tokio::test]
async fn msgpack_client_cycle() {
    let config = test_config("cl_msgpack", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let client = connect(&config, "packer")
        .await
        .with_encoding(Encoding::MsgPack);
    let lease = client
        .request(RequestOptions::new(1).vram_mb(2_000).lease_ms(600))
        .await
        .expect("granted");
    let id = lease.request_id().to_owned();
    let fence = lease.fence();
    let mut events = lease.events();
    next_event(&mut events, "a renewal", is_renewed).await;
    lease.release().await.expect("released");

    for outcome in ["granted", "renewed", "released"] {
        let seen = probe
            .expect(&format!("{outcome} in MessagePack"), reply_of(&id, outcome))
            .await;
        assert_eq!(
            seen.encoding,
            Encoding::MsgPack,
            "{outcome}: {:?}",
            seen.json
        );
        assert_eq!(seen.reply().fence, Some(fence), "{outcome}");
    }
    assert!(!probe.drain_and_find(|s| {
        s.str("request_id") == Some(id.as_str()) && s.encoding != Encoding::MsgPack
    }));
    assert!(!probe.drain_and_find(reply_of(&id, "rejected")));
    let status = client.status().await.expect("status in MessagePack");
    assert!(status.gpus[0].holders.is_empty());
    coordinator.stop().await.expect("a clean stop");
}

/// NATS restarts under a held lease: the client renews across it and is not revoked; afterwards a
/// new request is granted and a preemption goes through, so no grant or order was lost.
#[tokio::test]
async fn lease_survives_a_nats_restart() {
    let mut server = NatsServer::start();
    let mut config = test_config("cl_natsrestart", &[("0", 24_000)]);
    config.nats.url = server.url();
    let coordinator = Coordinator::start(config.clone()).await;
    let holder = connect(&config, "holder").await;
    let lease = holder
        .request(RequestOptions::new(1).vram_mb(8_000).lease_ms(2_000))
        .await
        .expect("granted");
    let fence = lease.fence();
    let mut events = lease.events();
    next_event(&mut events, "a renewal before the restart", is_renewed).await;

    let server_task = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    });
    let server = joined("the nats-server restart", server_task).await;
    let (restarted_at, restarted) = (SystemTime::now(), Instant::now());
    // A renewal stored after the restart: its expiry is a whole lease length past it.
    let mut events = lease.events();
    next_event(&mut events, "a renewal after the restart", |e| {
        matches!(e, LeaseEvent::Renewed { expires_at }
            if *expires_at >= restarted_at + Duration::from_millis(2_000 - 1))
    })
    .await;
    // The readers follow the reconnect at once; waiting for missed pull heartbeats (4 s) instead
    // would leave orders undelivered for that long.
    assert!(
        restarted.elapsed() < Duration::from_secs(8),
        "the renewal came {:?} after the restart",
        restarted.elapsed()
    );
    assert!(!lease.is_revoked());
    assert_eq!(lease.fence(), fence);

    // A second client's request is granted alongside.
    let other = connect(&config, "other").await;
    let other_lease = other
        .request(RequestOptions::new(1).vram_mb(8_000).timeout_ms(10_000))
        .await
        .expect("a new request after the restart is granted");
    assert!(other_lease.fence() > fence);
    other_lease.release().await.expect("released");

    // A preemption: the worker's pause order, its ACK, the chat's grant and the resume all arrive.
    let seen = Arc::new(Mutex::new(HandlerLog::default()));
    let worker_client = connect(&config, "asr").await;
    let worker = recording_worker(&worker_client, Duration::from_millis(50), &seen);
    let work = worker
        .request(RequestOptions::new(2).vram_mb(16_000).timeout_ms(10_000))
        .await
        .expect("the worker is granted");
    let mut work_events = work.events();
    let chat_client = connect(&config, "chat").await;
    let chat = chat_client
        .request(RequestOptions::new(0).vram_mb(16_000).timeout_ms(10_000))
        .await
        .expect("the chat is granted after the worker paused");
    assert!(seen.lock().unwrap().pause_returned.is_some());
    let chat_fence = chat.fence();
    assert!(chat_fence > work.fence());
    chat.release().await.expect("the chat releases");
    let resumed = next_event(&mut work_events, "the worker's resume", |e| {
        matches!(e, LeaseEvent::Resumed { .. })
    })
    .await;
    assert!(matches!(resumed, LeaseEvent::Resumed { fence, .. } if fence > chat_fence));
    work.release().await.expect("the worker releases");

    assert!(!lease.is_revoked(), "the first lease was held throughout");
    let status = eventually("the status after the restart", || {
        let holder = holder.clone();
        async move { holder.status().await.ok() }
    })
    .await;
    assert_eq!(status.gpus[0].holders.len(), 1, "{status:?}");
    assert_eq!(status.gpus[0].holders[0].request_id, lease.request_id());
    lease.release().await.expect("released");
    coordinator.stop().await.expect("a clean stop");
    drop(server);
}

/// A client cut off from NATS gives its lease up on its own, and tells the code holding it, before
/// the coordinator revokes the lease and grants the GPU to someone else.
#[tokio::test]
async fn a_client_cut_off_gives_its_lease_up_before_the_gpu_is_granted_on() {
    let config = test_config("client_cutoff", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let proxy = gpu_coordinator_test_support::Proxy::start(nats_port()).await;
    let cut_off = Client::connect(&proxy.url(), &config.nats.prefix, "a")
        .await
        .expect("connect through the proxy");
    let lease = cut_off
        .request(RequestOptions::new(1).lease_ms(5_000))
        .await
        .expect("granted");
    let other = connect(&config, "b").await;
    proxy.cut();
    let lost = tokio::spawn({
        let revoked = lease.revoked();
        async move {
            revoked.await;
            Instant::now()
        }
    });
    let granted = other
        .request(RequestOptions::new(1).timeout_ms(30_000))
        .await
        .expect("b is granted once a's lease expired at the coordinator");
    let granted_at = Instant::now();
    let lost_at = tokio::time::timeout(DEADLINE, lost)
        .await
        .expect("a gave its lease up")
        .expect("the task ran");
    assert!(
        lost_at < granted_at,
        "a still believed it held the GPU when b was granted it"
    );
    assert!(lease.is_revoked());
    drop(granted);
    coordinator.stop().await.expect("stops cleanly");
}
