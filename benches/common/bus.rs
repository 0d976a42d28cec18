//! The machine's NATS as the benches use it: publishing in windows of awaited PubAcks, streams of a
//! measurement's own ([`Scratch`]), the bus's own figures (its ceiling, round trips, deliveries,
//! PubAcks), and what a coordinator has stored.

/// Publishes `queued` requests (`q0`, `q1`, ...; priorities 1 to 3, services `svc0`..) into the input
/// stream, as [`publish_all`] does.
pub async fn fill_queue(
    js: &async_nats::jetstream::Context,
    subjects: &gpu_coordinator_wire::Subjects,
    queued: usize,
    services: usize,
) -> anyhow::Result<()> {
    publish_all(js, queued, |i| {
        (
            subjects.request(&format!("svc{}", i % services)),
            format!(
                r#"{{"request_id":"q{i}","priority":{},"timeout_ms":3600000}}"#,
                1 + i % 3
            ),
            format!("q{i}"),
        )
    })
    .await
}

/// Publishes `count` messages, `message(i)` answering the subject, body and message id of the i-th, in
/// windows of 1,000 awaited PubAcks; a message whose PubAck does not come is published again under
/// the same message id (stored once).
pub async fn publish_all(
    js: &async_nats::jetstream::Context,
    count: usize,
    message: impl Fn(usize) -> (String, String, String),
) -> anyhow::Result<()> {
    let publish = |i: usize| {
        let (subject, body, id) = message(i);
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(id);
        js.send_publish(subject, publish)
    };
    for window in (0..count).collect::<Vec<_>>().chunks(1_000) {
        let mut acks = Vec::with_capacity(window.len());
        for &i in window {
            acks.push((i, publish(i).await?));
        }
        for (i, ack) in acks {
            let mut tries = 0;
            let mut result = ack.await.map(|_| ()).map_err(anyhow::Error::from);
            while result.is_err() && tries < 10 {
                tries += 1;
                result = match publish(i).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
            }
            result.map_err(|e| anyhow::anyhow!("publishing message {i}: {e}"))?;
        }
    }
    Ok(())
}

/// A stream of a reference measurement's own (file storage, as the coordinator's): `<TAG>_<WHAT>` on
/// subject `<tag>.<what>`.
pub struct Scratch {
    js: async_nats::jetstream::Context,
    stream: async_nats::jetstream::stream::Stream,
    pub subject: String,
}

impl Scratch {
    pub async fn create(
        js: &async_nats::jetstream::Context,
        tag: &str,
        what: &str,
    ) -> anyhow::Result<Scratch> {
        let subject = format!("{tag}.{what}");
        let stream = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: format!("{}_{}", tag.to_uppercase(), what.to_uppercase()),
                subjects: vec![subject.clone()],
                ..Default::default()
            })
            .await?;
        Ok(Scratch {
            js: js.clone(),
            stream,
            subject,
        })
    }

    /// Its messages, through a pull consumer that acknowledges none (as the client library reads
    /// its answers).
    pub async fn read(&self) -> anyhow::Result<async_nats::jetstream::consumer::pull::Stream> {
        use async_nats::jetstream::consumer;
        let consumer = self
            .stream
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        Ok(consumer.messages().await?)
    }

    pub async fn delete(self) -> anyhow::Result<()> {
        self.js
            .delete_stream(&self.stream.cached_info().config.name)
            .await?;
        Ok(())
    }
}

/// The bus's own ceiling on this machine: `count` messages of about a request's size published into a
/// stream of their own (file storage, as the coordinator's) as [`publish_all`] does, while a pull
/// consumer reads them; answers the messages stored and delivered per second. Every input and output
/// of the coordinator takes this path at least once, so a figure that needs M messages can go no
/// faster than this divided by M.
pub async fn bus_ceiling(
    client: &async_nats::Client,
    tag: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let js = async_nats::jetstream::new(client.clone());
    let scratch = Scratch::create(&js, tag, "ceiling").await?;
    let mut messages = scratch.read().await?;
    let start = std::time::Instant::now();
    let reader = tokio::spawn(async move {
        for _ in 0..count {
            next_message(&mut messages).await?;
        }
        anyhow::Ok(())
    });
    publish_all(&js, count, |i| {
        (
            scratch.subject.clone(),
            format!(r#"{{"request_id":"c{i}","priority":1,"timeout_ms":3600000}}"#),
            format!("c{i}"),
        )
    })
    .await?;
    reader.await??;
    let rate = count as f64 / start.elapsed().as_secs_f64();
    scratch.delete().await?;
    Ok(rate)
}

/// `samples` NATS request-reply round trips through an echo responder on the machine's server.
pub async fn round_trips(tag: &str, samples: usize) -> anyhow::Result<Vec<std::time::Duration>> {
    use futures::StreamExt;
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let subject = format!("{tag}.echo");
    let mut echo = client.subscribe(subject.clone()).await?;
    let responder = client.clone();
    let echoing = tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = std::time::Instant::now();
        client.request(subject.clone(), "x".into()).await?;
        times.push(start.elapsed());
    }
    echoing.abort();
    Ok(times)
}

/// `samples` plain publishes into a stream of their own, each timed until a pull consumer delivers it
/// (the path of every input into the coordinator, and of every answer out to the client library),
/// after `pause()` each.
pub async fn deliveries(
    tag: &str,
    samples: usize,
    mut pause: impl FnMut() -> std::time::Duration,
) -> anyhow::Result<Vec<std::time::Duration>> {
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let js = async_nats::jetstream::new(client.clone());
    let scratch = Scratch::create(&js, tag, "delivery").await?;
    let mut messages = scratch.read().await?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let wait = pause();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let start = std::time::Instant::now();
        client.publish(scratch.subject.clone(), "x".into()).await?;
        next_message(&mut messages).await?;
        times.push(start.elapsed());
    }
    drop(messages);
    scratch.delete().await?;
    Ok(times)
}

/// `samples` publishes of a journal-sized message (300 bytes) into a stream of their own, each timed
/// until its PubAck: what the write-behind journal waits for in place of a Postgres commit.
pub async fn pubacks(tag: &str, samples: usize) -> anyhow::Result<Vec<std::time::Duration>> {
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let js = async_nats::jetstream::new(client);
    let scratch = Scratch::create(&js, tag, "puback").await?;
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = std::time::Instant::now();
        js.publish(scratch.subject.clone(), "x".repeat(300).into())
            .await?
            .await?;
        times.push(start.elapsed());
    }
    scratch.delete().await?;
    Ok(times)
}

/// The next message of a pull consumer's stream; a missed idle heartbeat (the server slow to send one
/// while the machine is loaded) is only a warning there, and the stream goes on.
pub async fn next_message(
    messages: &mut async_nats::jetstream::consumer::pull::Stream,
) -> anyhow::Result<async_nats::jetstream::Message> {
    use async_nats::jetstream::consumer::pull::MessagesErrorKind;
    use futures::StreamExt;
    loop {
        match messages.next().await {
            Some(Ok(message)) => return Ok(message),
            Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => continue,
            Some(Err(e)) => return Err(e.into()),
            None => anyhow::bail!("the consumer ended"),
        }
    }
}

/// The messages the coordinator under `tag` has stored so far: its input, output and journal
/// streams' last sequence numbers added up (a purge of the journal keeps its numbering).
pub async fn stored_messages(client: &async_nats::Client, tag: &str) -> anyhow::Result<u64> {
    let subjects = gpu_coordinator_wire::Subjects::new(tag).map_err(anyhow::Error::msg)?;
    let js = async_nats::jetstream::new(client.clone());
    let mut total = 0;
    for name in [
        subjects.input_stream(),
        subjects.output_stream(),
        subjects.journal_stream(),
    ] {
        if let Ok(mut stream) = js.get_stream(&name).await {
            total += stream.info().await?.state.last_sequence;
        }
    }
    Ok(total)
}
