//! The driver on the in-memory ports: the order of its effects, recovery from a crash at each of them,
//! and the reconciliation of the lease store, all without a server.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use gpu_coordinator_core::{Fence, GpuSpec, Lease, Phase, SchedConfig, Scheduler};
use gpu_coordinator_wire::{Encoding, Subjects};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{now_ms, Command, Driver, Setup};
use crate::adapters::memory::{Crash, Faults, MemBus, MemJournal, MemLeases, Step, Trace};
use crate::metrics::{Metrics, Recorder};
use crate::ports::{AlwaysLeader, Ports};

mod lease_store;
use lease_store::asr_request;

const GPU_MB: u64 = 24_000;

/// In-memory adapters sharing one trace and one set of faults: what a restarted process finds again.
struct Rig {
    trace: Trace,
    faults: Faults,
    journal: MemJournal,
    leases: MemLeases,
    bus: MemBus,
}

impl Rig {
    fn new() -> Rig {
        let trace = Trace::default();
        let faults = Faults::default();
        Rig {
            journal: MemJournal::new(trace.clone(), faults.clone()),
            leases: MemLeases::new(trace.clone(), faults.clone()),
            bus: MemBus::new(trace.clone(), faults.clone()),
            trace,
            faults,
        }
    }

    fn ports(&self) -> Ports {
        let bus = std::sync::Arc::new(self.bus.clone());
        Ports {
            journal: std::sync::Arc::new(self.journal.clone()),
            leases: std::sync::Arc::new(self.leases.clone()),
            input_log: bus.clone(),
            output_log: bus,
            leadership: std::sync::Arc::new(AlwaysLeader),
        }
    }

    /// A driver started over these adapters, as a process (re)starting would.
    async fn driver(&self, shutdown: &CancellationToken) -> (Driver, mpsc::Receiver<Command>) {
        let setup = Setup {
            sched: Scheduler::new(
                SchedConfig::default(),
                vec![GpuSpec {
                    id: "0".into(),
                    total_mb: GPU_MB,
                }],
            ),
            subjects: Subjects::new("gpu").expect("a valid prefix"),
            recorder: Recorder::new(Metrics::new()),
            nvml: None,
            nodes: None,
            retain_ended: 1_000,
            status_limit: 100,
            shutdown: shutdown.clone(),
        };
        Driver::start(setup, self.ports(), crate::ports::Term(1))
            .await
            .expect("starts on in-memory ports")
    }

    /// A driver running its loop in a task.
    async fn spawn(&self, shutdown: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let (driver, commands) = self.driver(shutdown).await;
        tokio::spawn(async move {
            driver.run(commands).await.expect("the loop ends cleanly");
        })
    }

    fn push(&self, kind: &str, svc: &str, body: Value) -> u64 {
        self.bus
            .push(&format!("gpu.{kind}.{svc}"), body.to_string().into_bytes())
    }

    /// The published messages as `(subject, request_id, what, fence)`, `what` being the reply's outcome,
    /// the order's action or the event's kind.
    fn messages(&self) -> Vec<(String, String, String, Option<u64>)> {
        self.bus
            .published()
            .iter()
            .map(|m| {
                let v: Value = serde_json::from_slice(&m.payload).expect("JSON messages");
                let what = ["outcome", "action", "kind"]
                    .iter()
                    .find_map(|f| v.get(*f).and_then(Value::as_str))
                    .unwrap_or_default()
                    .to_owned();
                (
                    m.subject.clone(),
                    v["request_id"].as_str().unwrap_or_default().to_owned(),
                    what,
                    v["fence"].as_u64(),
                )
            })
            .collect()
    }

    /// Each request's phase, end and fence, as the journal holds them, by the ids their services used
    /// (the journal keeps them scoped).
    fn outcome(&self) -> Vec<(String, Phase, Option<String>, Option<Fence>)> {
        self.journal
            .records()
            .into_iter()
            .map(|r| {
                (
                    gpu_coordinator_core::unscoped(&r.request_id).to_owned(),
                    r.phase,
                    r.end.map(|e| e.as_str().to_owned()),
                    r.fence,
                )
            })
            .collect()
    }
}

/// Waits for `check` to hold, looking every millisecond, at most 10 s.
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A preemption from start to end, plus an input that is not valid: a background holder is paused for an
/// urgent request, ACKs, gets the GPU back when the urgent one releases, and releases.
fn preemption_story() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2}),
        ),
        (
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0}),
        ),
        (
            "ack",
            "asr",
            json!({"request_id": "asr-1", "action": "paused"}),
        ),
        ("renew", "chat", json!({"request_id": "nobody"})),
        ("release", "chat", json!({"request_id": "chat-1"})),
        (
            "ack",
            "asr",
            json!({"request_id": "asr-1", "action": "resumed"}),
        ),
        ("release", "asr", json!({"request_id": "asr-1"})),
    ]
}

/// Pushes `inputs` one at a time, each once the one before was acknowledged (as services that wait for
/// their answers: one batch each), until `stop` says so. Returns the sequences pushed.
async fn push_each(rig: &Rig, inputs: &[(&str, &str, Value)], stop: impl Fn() -> bool) -> Vec<u64> {
    let mut pushed = Vec::new();
    for (kind, svc, body) in inputs {
        let seq = rig.push(kind, svc, body.clone());
        pushed.push(seq);
        until("the input acknowledged", || rig.bus.acked(seq) || stop()).await;
        if stop() {
            break;
        }
    }
    pushed
}

#[tokio::test]
async fn effects_are_durable_before_they_are_published_and_published_before_acknowledged() {
    let rig = Rig::new();
    let shutdown = CancellationToken::new();
    let task = rig.spawn(&shutdown).await;
    let inputs = push_each(&rig, &preemption_story(), || false).await;
    assert_eq!(inputs.len(), preemption_story().len());
    shutdown.cancel();
    task.await.expect("the driver task ends");

    let mut written: Vec<String> = Vec::new();
    let mut published: Vec<String> = Vec::new();
    let mut position = 0;
    for step in rig.trace.steps() {
        match step {
            Step::Write {
                input_seq, msg_ids, ..
            } => {
                written.extend(msg_ids);
                position = position.max(input_seq.unwrap_or(0));
            }
            Step::Publish { msg_id, .. } => {
                assert!(
                    written.contains(&msg_id),
                    "{msg_id} published before the journal held it"
                );
                published.push(msg_id);
            }
            Step::Ack { seq, terminate } => {
                assert!(
                    seq <= position,
                    "input {seq} acknowledged before its position was written"
                );
                let unpublished: Vec<_> =
                    written.iter().filter(|m| !published.contains(m)).collect();
                assert!(
                    unpublished.is_empty(),
                    "input {seq} acknowledged before {unpublished:?} were published"
                );
                // Only the renew of an unknown request is valid JSON about nobody: rejected, not ended.
                assert!(!terminate, "input {seq} was terminated");
            }
            Step::Lease { .. } => {}
        }
    }
    let what: Vec<(String, String)> = rig
        .messages()
        .into_iter()
        .filter(|(subject, ..)| !subject.starts_with("gpu.event."))
        .map(|(subject, id, what, _)| (format!("{subject} {id}"), what))
        .collect();
    let expected = [
        ("gpu.reply.asr asr-1", "granted"),
        ("gpu.control.asr asr-1", "pause"),
        ("gpu.reply.chat chat-1", "granted"),
        ("gpu.reply.chat nobody", "rejected"),
        ("gpu.reply.chat chat-1", "released"),
        ("gpu.control.asr asr-1", "resume"),
        ("gpu.reply.asr asr-1", "released"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(what, expected);
    assert!(rig.leases.live().is_empty(), "every lease was released");
}

#[tokio::test]
async fn a_crash_at_any_effect_recovers_to_the_same_state() {
    // The story once without a crash: what it publishes and leaves in the journal.
    let baseline = Rig::new();
    let shutdown = CancellationToken::new();
    let task = baseline.spawn(&shutdown).await;
    let story = preemption_story();
    push_each(&baseline, &story, || false).await;
    shutdown.cancel();
    task.await.expect("the driver task ends");
    let effects = baseline.faults.effects();
    let (messages, outcome) = (baseline.messages(), baseline.outcome());
    assert!(effects > 20, "the story has {effects} effects");

    for at in 0..effects {
        for after in [false, true] {
            let rig = Rig::new();
            rig.faults.set(Some(Crash { at, after }));
            let first = CancellationToken::new();
            let task = rig.spawn(&first).await;
            let pushed = push_each(&rig, &story, || rig.faults.crashed()).await;
            // The process dies where it stalled; a new one starts over what it left.
            task.abort();
            let _ = task.await;
            rig.faults.set(None);
            let case = format!("crash at effect {at} (after: {after})");
            let second = CancellationToken::new();
            let task = rig.spawn(&second).await;
            // The input the crash interrupted comes again; the rest of the story follows.
            if let Some(&interrupted) = pushed.last() {
                until(&format!("{case}: the interrupted input handled"), || {
                    rig.journal.input_seq() >= interrupted
                })
                .await;
            }
            let rest = push_each(&rig, &story[pushed.len()..], || false).await;
            // An input acknowledged before the crash or not, its effects are what count: the last one
            // journaled and every message out.
            let last = rest.last().or(pushed.last()).copied().unwrap_or_default();
            until(&format!("{case}: the story played to its end"), || {
                rig.journal.input_seq() >= last && rig.messages().len() >= messages.len()
            })
            .await;
            second.cancel();
            task.await.expect("the driver task ends");
            assert_eq!(rig.messages(), messages, "{case}: published messages");
            assert_eq!(rig.outcome(), outcome, "{case}: the journal");
            assert!(rig.leases.live().is_empty(), "{case}: a lease left");
        }
    }
}

/// A driver that handled `inputs` (bodies for `gpu.<kind>.<svc>`) by hand, without its loop.
async fn handled(rig: &Rig, inputs: &[(&str, &str, Value)]) -> Driver {
    let shutdown = CancellationToken::new();
    let (mut driver, _commands) = rig.driver(&shutdown).await;
    feed(rig, &mut driver, inputs).await;
    driver
}

/// Hands `driver` these inputs as one batch, as its loop would.
async fn feed(rig: &Rig, driver: &mut Driver, inputs: &[(&str, &str, Value)]) {
    for (kind, svc, body) in inputs {
        rig.push(kind, svc, body.clone());
    }
    let mut stream = crate::ports::InputLog::open_inputs(&rig.bus, driver.position.handled)
        .await
        .expect("inputs open");
    let mut batch = Vec::new();
    for _ in inputs {
        batch.push(stream.next().await.expect("an input").expect("a delivery"));
    }
    driver.handle_batch(batch).await.expect("handled");
    driver.publisher.done().await;
}

/// Requests `r1`, `r2`, `r3` of `s`, pushed (inputs 1 to 3) and delivered, in that order.
async fn three_requests(rig: &Rig, after: u64) -> Vec<crate::ports::Delivery> {
    for id in ["r1", "r2", "r3"] {
        rig.push(
            "request",
            "s",
            json!({"request_id": id, "priority": 1, "vram_mb": 1000}),
        );
    }
    let mut stream = crate::ports::InputLog::open_inputs(&rig.bus, after)
        .await
        .expect("inputs open");
    let mut delivered = Vec::new();
    while let Some(Some(Ok(d))) = stream.next().now_or_never() {
        delivered.push(d);
    }
    delivered
}

#[tokio::test]
async fn an_input_after_a_gap_is_read_again_in_order_not_skipped_past() {
    use super::batch::Batch;

    let rig = Rig::new();
    let shutdown = CancellationToken::new();
    let (mut driver, _commands) = rig.driver(&shutdown).await;
    let mut delivered = three_requests(&rig, 0).await;
    assert_eq!(delivered.len(), 3);
    let third = delivered.pop().expect("input 3");
    let _second = delivered.pop().expect("input 2");
    let first = delivered.pop().expect("input 1");
    // Input 2 is not delivered (reordered, or delivered to an earlier reader): input 3 comes after 1.
    let outcome = driver
        .handle_batch(vec![first, third])
        .await
        .expect("handled");
    assert_eq!(outcome, Batch::Gap);
    assert_eq!(
        driver.position.handled, 1,
        "input 3 is not taken past the gap"
    );
    // Read again from the last handled: 2 then 3, in order.
    let mut stream = crate::ports::InputLog::open_inputs(&rig.bus, driver.position.handled)
        .await
        .expect("inputs open");
    let mut again = Vec::new();
    while let Some(Some(Ok(d))) = stream.next().now_or_never() {
        again.push(d);
    }
    let outcome = driver.handle_batch(again).await.expect("handled");
    assert_eq!(outcome, Batch::Handled);
    assert_eq!(driver.position.handled, 3);
    driver.publisher.done().await;
    let granted: Vec<String> = rig
        .messages()
        .into_iter()
        .filter(|(subject, _, what, _)| subject == "gpu.reply.s" && what == "granted")
        .map(|(_, id, ..)| id)
        .collect();
    assert_eq!(
        granted,
        vec!["r1", "r2", "r3"],
        "each request once, in order"
    );
}

#[tokio::test]
async fn timers_wait_for_the_inputs_stored_before_them() {
    let rig = Rig::new();
    let mut driver = handled(&rig, &[asr_request()]).await;
    let before = now_ms();
    let at = driver.inputs_caught_up().await.expect("nothing waits");
    assert!(
        at >= before,
        "timers may fire at the time the bus was asked"
    );
    // A renewal is stored, not yet handled: what is due now waits for it.
    rig.push("renew", "asr", json!({"request_id": "asr-1"}));
    assert!(driver.inputs_caught_up().await.is_none());
    assert!(driver
        .catching_up_left()
        .is_some_and(|left| left > Duration::ZERO));
    let mut stream = crate::ports::InputLog::open_inputs(&rig.bus, driver.position.handled)
        .await
        .expect("inputs open");
    let renew = stream.next().await.expect("an input").expect("a delivery");
    // Another is stored while the first is handled: the timers wait for it too.
    rig.push("renew", "asr", json!({"request_id": "asr-1"}));
    driver.handle_batch(vec![renew]).await.expect("handled");
    assert_eq!(driver.catching_up_left(), Some(Duration::ZERO));
    assert!(
        driver.inputs_caught_up().await.is_none(),
        "the bus is asked again once the inputs waited for are handled"
    );
    let renew = stream.next().await.expect("an input").expect("a delivery");
    driver.handle_batch(vec![renew]).await.expect("handled");
    // Handled, and nothing more stored: the timers go on at once.
    assert_eq!(driver.catching_up_left(), Some(Duration::ZERO));
    assert!(driver.inputs_caught_up().await.is_some());
    assert!(driver.catching_up_left().is_none());
}

#[tokio::test]
async fn status_questions_are_answered_in_their_encoding() {
    let rig = Rig::new();
    let shutdown = CancellationToken::new();
    let task = rig.spawn(&shutdown).await;
    let granted = rig.push(
        "request",
        "asr",
        json!({"request_id": "asr-1", "priority": 2}),
    );
    until("the request handled", || rig.bus.acked(granted)).await;
    let mut answer = None;
    for _ in 0..1000 {
        answer = rig.bus.status(Encoding::MsgPack).await;
        if answer.is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let doc: gpu_coordinator_wire::StatusDoc =
        rmp_serde::from_slice(&answer.expect("a status answer")).expect("MessagePack status");
    let json = serde_json::to_value(&doc).expect("the document serializes");
    assert_eq!(json["gpus"][0]["holders"][0]["request_id"], "asr-1");
    shutdown.cancel();
    task.await.expect("the driver task ends");
}

#[tokio::test]
async fn a_deposed_driver_stops_and_publishes_nothing_more() {
    let rig = Rig::new();
    let shutdown = CancellationToken::new();
    let (driver, commands) = rig.driver(&shutdown).await;
    assert_eq!(driver.term(), crate::ports::Term(1));
    let task = tokio::spawn(driver.run(commands));
    let first = rig.push(
        "request",
        "asr",
        json!({"request_id": "asr-1", "priority": 2}),
    );
    until("the first request handled", || rig.bus.acked(first)).await;
    let published = rig.bus.published().len();
    // Another coordinator takes over in term 2: this one's next write is refused.
    rig.journal.lead(crate::ports::Term(2));
    let second = rig.push(
        "request",
        "chat",
        json!({"request_id": "chat-1", "priority": 0}),
    );
    let stopped = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the driver stops by itself")
        .expect("the driver task does not panic");
    let error = stopped.expect_err("it stops because it was deposed");
    assert!(crate::retry::is_deposed(&error), "{error:#}");
    assert_eq!(
        rig.bus.published().len(),
        published,
        "nothing published after"
    );
    assert!(
        !rig.bus.acked(second),
        "the input is left for the new leader"
    );
    assert!(
        rig.journal
            .records()
            .iter()
            .all(|r| r.request_id != "chat-1"),
        "nothing of it written"
    );
}

/// The publishing stage: while the bus has not stored a batch's messages, the loop commits the next
/// batch; no input is acknowledged before the messages it caused are stored, and the messages go out
/// in the order of the batches.
#[tokio::test]
async fn the_next_batch_commits_while_the_bus_stores_the_last_ones_messages() {
    let rig = Rig::new();
    let shutdown = CancellationToken::new();
    let task = rig.spawn(&shutdown).await;
    rig.bus.hold_publishing(true);
    let journaled = |id: &str| rig.outcome().iter().any(|(r, ..)| r == id);
    let first = rig.push(
        "request",
        "asr",
        json!({"request_id": "asr-1", "priority": 2, "vram_mb": 8000}),
    );
    until("the first batch committed", || journaled("asr-1")).await;
    let second = rig.push(
        "request",
        "tts",
        json!({"request_id": "tts-1", "priority": 2, "vram_mb": 8000}),
    );
    until("the next batch committed meanwhile", || journaled("tts-1")).await;
    assert!(rig.bus.published().is_empty(), "nothing stored yet");
    assert!(
        !rig.bus.acked(first) && !rig.bus.acked(second),
        "no input acknowledged before its messages are stored"
    );
    rig.bus.hold_publishing(false);
    until("both inputs acknowledged", || {
        rig.bus.acked(first) && rig.bus.acked(second)
    })
    .await;
    let granted: Vec<String> = rig
        .messages()
        .into_iter()
        .filter(|(subject, _, what, _)| subject.starts_with("gpu.reply.") && what == "granted")
        .map(|(_, id, ..)| id)
        .collect();
    assert_eq!(granted, ["asr-1", "tts-1"], "in the order of the batches");
    shutdown.cancel();
    task.await.expect("the driver task ends");
}

/// A driver that stops no longer listens for status questions while it waits for the bus and the
/// journal: a question asked then is refused at once (over NATS: no responders), not left unanswered
/// for the asker's whole timeout.
#[tokio::test]
async fn a_stopping_driver_leaves_no_status_question_unanswered() {
    let rig = Rig::new();
    let shutdown = CancellationToken::new();
    let (driver, commands) = rig.driver(&shutdown).await;
    let asker = driver.commands.clone();
    let task = tokio::spawn(driver.run(commands));
    // A batch whose messages the bus does not store: the stop waits for them (2 s at most).
    rig.bus.hold_publishing(true);
    rig.push(
        "request",
        "asr",
        json!({"request_id": "asr-1", "priority": 2}),
    );
    until("the batch committed", || {
        rig.outcome().iter().any(|(r, ..)| r == "asr-1")
    })
    .await;
    shutdown.cancel();
    let answer = tokio::time::timeout(Duration::from_secs(1), rig.bus.status(Encoding::Json))
        .await
        .expect("a question to a stopping driver is not left waiting");
    assert!(answer.is_none(), "a stopping driver answers no question");
    // The same for a command (the HTTP status): refused at once, so that it says "not leading".
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = asker
        .send(Command::Status(Default::default(), tx))
        .await
        .is_ok();
    let answer = tokio::time::timeout(Duration::from_secs(1), rx)
        .await
        .expect("a command to a stopping driver is not left waiting");
    assert!(
        !sent && answer.is_err(),
        "a stopping driver answers no command"
    );
    assert!(!task.is_finished(), "asked while the driver was stopping");
    rig.bus.hold_publishing(false);
    task.await
        .expect("the driver task ends")
        .expect("the loop ends cleanly");
}
