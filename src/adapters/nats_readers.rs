//! The readers the coordinator makes for services: on `<prefix>.reader.<svc>` a service asks for a
//! pull consumer on the output stream filtered to its own replies or control orders, and gets its name.
//!
//! Why the coordinator makes them: a consumer's configuration travels in the body of the JetStream API
//! call, which NATS permissions cannot look into, and a consumer with a `deliver_subject` is pushed by
//! nats-server onto that subject with the server's own rights. A service allowed to make its own
//! consumers could have its replies pushed onto another service's input subject (stored there as that
//! service's release) or the stream's history pushed onto another service's reply subject (read there
//! as a grant). So with per-service permissions nobody but the coordinator may make a consumer, and the
//! coordinator makes pull consumers only, filtered to the asker's own subjects (the asker is the last
//! token of the subject it could publish on), answered on the asker's inbox only.
//!
//! Every coordinator serves this, leader or standby, in one queue group: it decides nothing and needs no
//! state, so a reader can be opened while a standby takes over.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use gpu_coordinator_wire::{ReaderAnswer, ReaderAsk, ReaderTopic, Subjects};
use tokio_util::sync::CancellationToken;

/// The queue group every coordinator answers in: one answer a question.
const QUEUE: &str = "gpu-coordinator-readers";
/// How long to wait before subscribing again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// Answers reader questions until `stop`.
pub async fn serve(client: async_nats::Client, subjects: Subjects, stop: CancellationToken) {
    // Bounded: a consumer that nats-server does not answer for (its stream electing a leader, or,
    // with nats-server 2.9, placed on a server that is down) must not hold up the questions behind it.
    let js = crate::adapters::nats::api_context(&client);
    loop {
        let subscribed = client
            .queue_subscribe(subjects.reader("*"), QUEUE.to_owned())
            .await;
        let mut questions = match subscribed {
            Ok(questions) => questions,
            Err(e) => {
                tracing::warn!("cannot subscribe to {}: {e}", subjects.reader("*"));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => continue,
                }
            }
        };
        loop {
            let question = tokio::select! {
                () = stop.cancelled() => return,
                question = questions.next() => question,
            };
            let Some(question) = question else { break };
            answer(&client, &js, &subjects, question).await;
        }
    }
}

async fn answer(
    client: &async_nats::Client,
    js: &jetstream::Context,
    subjects: &Subjects,
    question: async_nats::Message,
) {
    let Some(reply_to) = question.reply else {
        return;
    };
    if !subjects.is_inbox(&reply_to) {
        tracing::warn!(
            "a reader question asks for its answer on {reply_to:?}, which is not an inbox: not \
             answered"
        );
        return;
    }
    let answer = match make(js, subjects, &question.subject, &question.payload).await {
        Ok(name) => ReaderAnswer {
            consumer: Some(name),
            stream: subjects.output_stream(),
            error: None,
        },
        Err(error) => ReaderAnswer {
            consumer: None,
            stream: subjects.output_stream(),
            error: Some(error),
        },
    };
    let body = serde_json::to_vec(&answer).expect("a reader answer always serializes");
    if let Err(e) = client.publish(reply_to, body.into()).await {
        tracing::warn!("answering a reader question: {e}");
    }
}

/// Makes the consumer `subject` (`<prefix>.reader.<svc>`) and `payload` ask for.
async fn make(
    js: &jetstream::Context,
    subjects: &Subjects,
    subject: &str,
    payload: &[u8],
) -> Result<String, String> {
    let svc = subject
        .strip_prefix(&format!("{}.reader.", subjects.prefix()))
        .filter(|svc| gpu_coordinator_wire::valid_service_id(svc))
        .ok_or_else(|| format!("{subject:?} does not name a service"))?;
    let ask: ReaderAsk = serde_json::from_slice(payload).map_err(|e| {
        format!("expected {{\"topic\": \"reply\" | \"control\", \"start_seq\": N}}: {e}")
    })?;
    let filter = match ask.topic {
        ReaderTopic::Reply => subjects.reply(svc),
        ReaderTopic::Control => subjects.control(svc),
    };
    // Random and never listed to services: a service may pull from any consumer it can name.
    let name = format!("r{:032x}", rand::random::<u128>());
    js.create_consumer_on_stream(
        gpu_coordinator_client::reader_config(Some(name.clone()), &filter, ask.start_seq.max(1)),
        subjects.output_stream(),
    )
    .await
    .map_err(|e| {
        format!(
            "cannot make a consumer on {}: {e}",
            subjects.output_stream()
        )
    })?;
    Ok(name)
}
