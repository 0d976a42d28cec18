//! The client library over the coordinator's HTTP API (`Client::connect_http`), against a real
//! coordinator in the embedded and the distributed mode: grants, renewals and releases, a `Worker`
//! paused and resumed through the SSE control stream, an order stored while that stream was cut,
//! a withdrawn request, and the errors a service gets for a bad request or a bad token.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpu_coordinator_client::{Client, ClientError, LeaseEvent, LeasePhase, RequestOptions};
use gpu_coordinator_test_support::{free_port, Proxy};
use gpu_coordinator_wire::{HolderState, RejectCode};

use crate::client::{is_renewed, joined, next_event, recording_worker, request_id, HandlerLog};
use crate::support::{embedded_config, eventually, test_config, Coordinator, Probe};

/// A client of `coordinator`'s HTTP API as the service `svc`, without a token.
async fn connect(coordinator: &Coordinator, svc: &str) -> Client {
    Client::connect_http(&coordinator.url(""), svc, None)
        .await
        .expect("connect the client over HTTP")
}

/// Polls the status (over HTTP, as `client`) until `check` holds; returns that status.
async fn status_until(
    client: &Client,
    what: &str,
    check: impl Fn(&gpu_coordinator_wire::StatusDoc) -> bool,
) -> gpu_coordinator_wire::StatusDoc {
    let check = &check;
    eventually(what, || async move {
        client.status().await.ok().filter(|status| check(status))
    })
    .await
}

/// A lease granted over HTTP renews itself (the replies of its POSTs reach the lease), shows in the
/// status, and its release hands the GPU to the request queued behind it, under a higher fence.
async fn grant_renew_and_release(coordinator: &Coordinator) {
    let holder = connect(coordinator, "holder").await;
    assert!(holder.nats().is_none());
    let lease = holder
        .request(
            RequestOptions::new(1)
                .vram_mb(16_000)
                .lease_ms(600)
                .timeout_ms(10_000),
        )
        .await
        .expect("granted over HTTP");
    assert_eq!(lease.gpu(), "0");
    assert_eq!(lease.vram_mb(), Some(16_000));
    assert_eq!(lease.lease_length(), Duration::from_millis(600));
    assert!(lease.usable());
    let first_fence = lease.fence();
    let mut events = lease.events();
    next_event(&mut events, "a renewal over HTTP", is_renewed).await;
    next_event(&mut events, "a second renewal over HTTP", is_renewed).await;
    assert_eq!(lease.phase(), LeasePhase::Active);
    assert_eq!(lease.fence(), first_fence, "renewals keep the fence");

    let status = holder.status().await.expect("the status over HTTP");
    let holders = &status.gpus[0].holders;
    assert_eq!(holders.len(), 1, "{status:?}");
    assert_eq!(holders[0].request_id, lease.request_id());
    assert_eq!(holders[0].fence, first_fence);
    assert_eq!(holders[0].state, HolderState::Active);

    // A second service waits behind it.
    let waiter = connect(coordinator, "waiter").await;
    let waiter_id = request_id("waiter");
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        let options = RequestOptions::new(1)
            .vram_mb(16_000)
            .timeout_ms(20_000)
            .request_id(waiter_id.clone());
        async move { waiter.request(options).await }
    });
    status_until(&holder, "the waiter is queued", |s| {
        s.queue.iter().any(|q| q.request_id == waiter_id)
    })
    .await;
    assert!(!waiting.is_finished(), "the GPU is not free yet");

    lease.release().await.expect("released over HTTP");
    let next = joined("the queued request", waiting)
        .await
        .expect("the queued request is granted once the first is released");
    assert_eq!(next.request_id(), waiter_id);
    assert!(next.fence() > first_fence);
    next.release().await.expect("released over HTTP");
    let status = status_until(&holder, "the GPU is free", |s| s.gpus[0].holders.is_empty()).await;
    assert!(status.queue.is_empty(), "{status:?}");
}

#[tokio::test]
async fn http_grant_and_release_in_the_embedded_mode() {
    let config = embedded_config("clh_embedded", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config).await;
    grant_renew_and_release(&coordinator).await;
    coordinator.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn http_grant_and_release_in_the_distributed_mode() {
    let config = test_config("clh_distributed", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    grant_renew_and_release(&coordinator).await;
    // The same story is on the output stream, as for a NATS client.
    probe.event("granted", None).await;
    probe.event("released", None).await;
    coordinator.stop().await.expect("a clean stop");
}

/// A worker over HTTP holds the GPU; a more urgent request needs it. The pause comes on the SSE
/// stream, `on_pause` runs, its ACK goes through (the urgent request is granted, not after a
/// revoke), and once the urgent one is released the resume comes and `on_resume` runs.
#[tokio::test]
async fn http_worker_is_paused_for_an_urgent_request_and_resumed_after_it() {
    let config = embedded_config("clh_preempt", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config).await;
    let asr = connect(&coordinator, "asr").await;
    let seen = Arc::new(Mutex::new(HandlerLog::default()));
    let worker = recording_worker(&asr, Duration::from_millis(100), &seen);
    let lease = worker
        .request(RequestOptions::new(2).vram_mb(20_000).timeout_ms(10_000))
        .await
        .expect("the worker is granted");
    let worker_id = lease.request_id().to_owned();
    let worker_fence = lease.fence();
    let mut events = lease.events();

    let chat_client = connect(&coordinator, "chat").await;
    let chat = tokio::spawn({
        let chat_client = chat_client.clone();
        async move {
            chat_client
                .request(RequestOptions::new(0).vram_mb(8_000).timeout_ms(15_000))
                .await
        }
    });
    let pausing = next_event(&mut events, "the pause order", |e| {
        matches!(e, LeaseEvent::Pausing { .. })
    })
    .await;
    assert!(
        matches!(&pausing, LeaseEvent::Pausing { fence, .. } if *fence == worker_fence),
        "{pausing:?}"
    );
    next_event(&mut events, "paused", |e| {
        matches!(e, LeaseEvent::Paused { .. })
    })
    .await;
    let chat = joined("the urgent request", chat)
        .await
        .expect("the urgent request is granted after the ACK");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.pauses.len(), 1);
        assert_eq!(seen.pauses[0].request_id, worker_id);
        assert!(seen.pause_returned.is_some(), "on_pause ran to its end");
    }
    assert!(chat.fence() > worker_fence);
    assert!(!lease.is_revoked(), "paused by its ACK, not revoked");
    assert_eq!(lease.phase(), LeasePhase::Paused);
    let status = chat_client.status().await.expect("status");
    assert!(
        status.paused.iter().any(|p| p.request_id == worker_id),
        "{status:?}"
    );

    let chat_fence = chat.fence();
    chat.release().await.expect("the urgent request releases");
    let resumed = next_event(&mut events, "the resume", |e| {
        matches!(e, LeaseEvent::Resumed { .. })
    })
    .await;
    let LeaseEvent::Resumed { fence, gpu } = resumed else {
        unreachable!()
    };
    assert!(fence > chat_fence, "{fence} > {chat_fence}");
    assert_eq!(gpu, "0");
    assert_eq!(lease.fence(), fence);
    assert_eq!(lease.phase(), LeasePhase::Active);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.resumes.len(), 1);
        assert_eq!(seen.resumes[0].fence, fence);
        assert!(seen.resume_returned.is_some());
    }
    lease.release().await.expect("the worker releases");
    coordinator.stop().await.expect("a clean stop");
}

/// A coordinator, and a worker of `asr` holding its GPU whose HTTP connections go through a proxy
/// the test can cut, with what its handlers saw.
struct Behind {
    coordinator: Coordinator,
    probe: Probe,
    proxy: Proxy,
    seen: Arc<Mutex<HandlerLog>>,
    lease: gpu_coordinator_client::Lease,
}

impl Behind {
    async fn start(tag: &str) -> Behind {
        let config = test_config(tag, &[("0", 24_000)]);
        let coordinator = Coordinator::start(config.clone()).await;
        let probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
        let proxy = Proxy::start(coordinator.http_addr.port()).await;
        let asr = Client::connect_http(&format!("http://127.0.0.1:{}", proxy.port), "asr", None)
            .await
            .expect("connect through the proxy");
        let seen = Arc::new(Mutex::new(HandlerLog::default()));
        let worker = recording_worker(&asr, Duration::from_millis(50), &seen);
        let lease = worker
            .request(RequestOptions::new(2).timeout_ms(10_000))
            .await
            .expect("the worker is granted");
        Behind {
            coordinator,
            probe,
            proxy,
            seen,
            lease,
        }
    }
}

/// The control stream of a worker is cut (a proxy between it and the coordinator) while it is
/// paused; the resume is stored meanwhile. Once the proxy lets it through again, the stream
/// reconnects with `Last-Event-ID` and the resume is delivered: `on_resume` runs.
#[tokio::test]
async fn a_control_order_stored_while_the_stream_was_cut_comes_after_the_reconnect() {
    let Behind {
        coordinator,
        mut probe,
        proxy,
        seen,
        lease,
    } = Behind::start("clh_cut").await;
    let worker_id = lease.request_id().to_owned();
    let mut events = lease.events();

    // A first preemption while the stream is up: the pause is the last order it saw.
    let chat_client = connect(&coordinator, "chat").await;
    let chat = chat_client
        .request(RequestOptions::new(0).timeout_ms(15_000))
        .await
        .expect("the urgent request is granted after the worker paused");
    next_event(&mut events, "paused", |e| {
        matches!(e, LeaseEvent::Paused { .. })
    })
    .await;

    proxy.cut();
    chat.release().await.expect("the urgent request releases");
    let resume = probe.control(&worker_id, "resume").await;
    assert_eq!(
        lease.phase(),
        LeasePhase::Paused,
        "the resume cannot have come through the cut"
    );
    assert!(seen.lock().unwrap().resumes.is_empty());

    proxy.restore();
    let resumed = next_event(&mut events, "the resume after the reconnect", |e| {
        matches!(e, LeaseEvent::Resumed { .. })
    })
    .await;
    assert!(
        matches!(&resumed, LeaseEvent::Resumed { fence, .. } if *fence == resume.fence),
        "{resumed:?}"
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.resumes.len(), 1, "delivered once");
        assert_eq!(seen.resumes[0].fence, resume.fence);
    }
    assert_eq!(lease.phase(), LeasePhase::Active);
    lease.release().await.expect("the worker releases");
    coordinator.stop().await.expect("a clean stop");
}

/// The stream is cut before any order came: the first event's id (the position the stream
/// started after) is what the reconnect resumes from, so a pause stored meanwhile still comes.
#[tokio::test]
async fn a_first_order_stored_while_the_stream_was_cut_comes_after_the_reconnect() {
    let Behind {
        coordinator,
        mut probe,
        proxy,
        seen,
        lease,
    } = Behind::start("clh_cut_first").await;
    let worker_id = lease.request_id().to_owned();

    proxy.cut();
    let chat_client = connect(&coordinator, "chat").await;
    let chat = tokio::spawn(async move {
        chat_client
            .request(RequestOptions::new(0).timeout_ms(15_000))
            .await
    });
    probe.control(&worker_id, "pause").await;
    assert_eq!(
        lease.phase(),
        LeasePhase::Active,
        "the pause cannot have come through the cut"
    );

    proxy.restore();
    let chat = chat
        .await
        .expect("the chat task")
        .expect("the chat is granted once the worker paused after the reconnect");
    assert_eq!(
        seen.lock().unwrap().pauses.len(),
        1,
        "the pause was delivered, once"
    );
    chat.release().await.expect("the chat releases");
    coordinator.stop().await.expect("a clean stop");
}

/// A request over HTTP whose future is dropped while it waits is withdrawn: it leaves the queue,
/// and the GPU is not granted to it when it frees up.
#[tokio::test]
async fn dropping_a_pending_http_request_withdraws_it() {
    let config = embedded_config("clh_drop", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config).await;
    let holder = connect(&coordinator, "holder").await;
    let lease = holder
        .request(RequestOptions::new(0).preemptible(false).timeout_ms(10_000))
        .await
        .expect("granted");

    let waiter = connect(&coordinator, "waiter").await;
    let id = request_id("dropped");
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        let options = RequestOptions::new(1)
            .timeout_ms(60_000)
            .request_id(id.clone());
        async move { waiter.request(options).await }
    });
    status_until(&holder, "the request is queued", |s| {
        s.queue.iter().any(|q| q.request_id == id)
    })
    .await;
    waiting.abort();
    assert!(
        waiting.await.is_err_and(|e| e.is_cancelled()),
        "the future was dropped while it waited"
    );
    status_until(&holder, "the dropped request leaves the queue", |s| {
        s.queue.is_empty()
    })
    .await;

    lease.release().await.expect("released");
    let status = status_until(&holder, "the GPU is free", |s| s.gpus[0].holders.is_empty()).await;
    assert!(
        status.queue.is_empty() && status.paused.is_empty(),
        "{status:?}"
    );
    coordinator.stop().await.expect("a clean stop");
}

/// What a service gets wrong gives an error that says what: a token the coordinator does not know
/// or another service's (at connect, naming the URL), a field out of range (before anything is
/// sent), a GPU that does not exist (the coordinator's rejection), and a request that waits past
/// its `timeout_ms`. The service's own token works.
#[tokio::test]
async fn bad_requests_and_bad_tokens_over_http_are_clear_errors() {
    let mut config = test_config("clh_errors", &[("0", 24_000)]);
    config.http.tokens = [("tok-chat", "chat"), ("tok-asr", "asr")]
        .into_iter()
        .map(|(t, s)| (t.to_string(), s.to_string()))
        .collect();
    let coordinator = Coordinator::start(config).await;
    let base = coordinator.url("");

    let unknown = Client::connect_http(&base, "chat", Some("not-a-token")).await;
    match unknown {
        Err(ClientError::HttpConnect { url, detail }) => {
            assert_eq!(url, format!("{base}/gpu/control/chat"));
            assert!(detail.contains("bearer token is not valid"), "{detail}");
            assert!(detail.contains("401"), "{detail}");
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    let missing = Client::connect_http(&base, "chat", None).await;
    assert!(
        matches!(&missing, Err(ClientError::HttpConnect { detail, .. }) if detail.contains("Bearer")),
        "{missing:?}"
    );
    let another = Client::connect_http(&base, "chat", Some("tok-asr")).await;
    assert!(
        matches!(&another, Err(ClientError::HttpConnect { detail, .. })
            if detail.contains("`asr`") && detail.contains("403")),
        "{another:?}"
    );

    let chat = Client::connect_http(&base, "chat", Some("tok-chat"))
        .await
        .expect("the service's own token");
    let zero = chat.request(RequestOptions::new(1).vram_mb(0)).await;
    assert!(
        matches!(&zero, Err(ClientError::InvalidRequest(e)) if e.contains("vram_mb")),
        "{zero:?}"
    );
    let nope = chat
        .request(RequestOptions::new(1).gpu("nope").timeout_ms(10_000))
        .await;
    assert!(
        matches!(&nope, Err(ClientError::Rejected { code: Some(RejectCode::UnknownGpu), error })
            if error.contains("`nope`")),
        "{nope:?}"
    );

    let lease = chat
        .request(RequestOptions::new(0).preemptible(false).timeout_ms(10_000))
        .await
        .expect("granted with the service's own token");
    let asr = Client::connect_http(&base, "asr", Some("tok-asr"))
        .await
        .expect("asr's own token");
    let timed_out = asr.request(RequestOptions::new(2).timeout_ms(100)).await;
    assert!(
        matches!(timed_out, Err(ClientError::TimedOut)),
        "{timed_out:?}"
    );
    // A token sees its own service's entries only.
    let status = asr.status().await.expect("status with asr's token");
    assert!(status.gpus[0].holders.is_empty(), "{status:?}");
    let status = chat.status().await.expect("status with chat's token");
    assert_eq!(status.gpus[0].holders[0].request_id, lease.request_id());
    lease.release().await.expect("released");
    coordinator.stop().await.expect("a clean stop");
}

/// A coordinator that does not answer: `connect_http` gives up after its bounded wait, naming the
/// URL.
#[tokio::test]
async fn connecting_to_a_coordinator_that_does_not_answer_names_its_url() {
    let base = format!("http://127.0.0.1:{}", free_port());
    let started = std::time::Instant::now();
    let error = Client::connect_http(&base, "chat", None)
        .await
        .expect_err("nothing listens there");
    let waited = started.elapsed();
    assert!(
        matches!(&error, ClientError::HttpConnect { url, .. } if url.starts_with(&base)),
        "{error:?}"
    );
    assert!(error.to_string().contains(&base), "{error}");
    assert!(
        waited < Duration::from_secs(20),
        "the wait is bounded: {waited:?}"
    );
}
