//! The streams: made or updated to the `[nats]` settings (replicas too), the input stream numbered
//! after the journal's last input, and the output stream's end read back for what is stored.

use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use super::{Cause, NatsBus, NatsError, PLACEMENT_WAIT};

impl NatsBus {
    /// Creates or updates `<PREFIX>_OUTPUT` and `<PREFIX>_INPUT` (limits retention, file storage).
    ///
    /// A missing input stream is made only when `inputs_after` is given (the last input the journal
    /// handled), and then numbers its inputs after it: a default request id `<svc>-<stream sequence>`
    /// never names an older request, and the journal's position stays meaningful. Without it (at start,
    /// before the journal is read) a missing input stream is left for the driver to make.
    pub async fn ensure_streams(&self, inputs_after: Option<u64>) -> Result<(), NatsError> {
        let output = self.stream_config(
            self.subjects.output_stream(),
            self.subjects.output_subjects(),
            // Full: the oldest history goes; the coordinator's publishes never block on it.
            stream::DiscardPolicy::Old,
        );
        self.create_or_update(output).await?;
        let input = self.stream_config(
            self.subjects.input_stream(),
            self.subjects.input_subjects(),
            // Full: a new input is refused at publish (its publisher gets the error), and none that
            // was accepted is dropped before it is handled.
            stream::DiscardPolicy::New,
        );
        let exists = match self.api.get_stream(&input.name).await {
            Ok(_) => true,
            Err(e) if stream_missing(&e.kind()) => false,
            Err(e) => return Err(self.stream_error(&input.name, e.into())),
        };
        match (exists, inputs_after) {
            (true, _) | (false, Some(0)) => self.create_or_update(input).await,
            (false, Some(after)) => self.create_numbered(input, after).await,
            (false, None) => Ok(()),
        }
    }

    fn stream_config(
        &self,
        name: String,
        subjects: Vec<String>,
        discard: stream::DiscardPolicy,
    ) -> stream::Config {
        let limits = self.limits;
        stream::Config {
            name,
            subjects,
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            max_messages: limits.max_messages,
            max_message_size: limits.max_message_size,
            discard,
            duplicate_window: Duration::from_secs(120),
            num_replicas: limits.replicas,
            ..Default::default()
        }
    }

    /// Makes the stream, or updates it to `config` unless it has those settings already: its replicas
    /// too, which JetStream changes in place (a stream going from 1 to 3 replicas is copied to two
    /// more servers). An update that changes nothing is not sent: while a stream's replicas catch up
    /// after such a change, JetStream leaves another update unanswered.
    async fn create_or_update(&self, config: stream::Config) -> Result<(), NatsError> {
        let name = config.name.clone();
        let had = match self.api.get_stream(&name).await {
            Ok(stream) => Some(stream.cached_info().config.clone()),
            Err(e) if stream_missing(&e.kind()) => None,
            // Not answered (the stream elects a leader), say: tried again, rather than sent an
            // update that waits as long.
            Err(e) => return Err(self.stream_error(&name, e.into())),
        };
        if had.as_ref().is_some_and(|had| same_settings(had, &config)) {
            return Ok(());
        }
        let replicas = config.num_replicas;
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(|source| self.stream_error(&name, source.into()))?;
        if let Some(had) = had.map(|had| had.num_replicas.max(1)) {
            if had != replicas.max(1) {
                tracing::warn!(
                    "stream {name} had {had} replica(s): updated to {replicas} (nats.replicas); \
                     waiting until they are placed"
                );
                await_placed(&self.js, &name, replicas.max(1)).await;
            }
        }
        Ok(())
    }

    /// A stream that could not be made or updated; when JetStream could not place its replicas, the
    /// error says that `nats.replicas` asks for them.
    fn stream_error(&self, stream: &str, source: Cause) -> NatsError {
        let text = source.to_string();
        let placement = [
            "peers",
            "insufficient resources",
            "non-clustered",
            "replicas",
        ]
        .iter()
        .any(|what| text.contains(what));
        if placement && self.limits.replicas > 1 {
            return NatsError::Stream {
                stream: stream.to_owned(),
                source: format!(
                    "JetStream cannot place its {} replicas (nats.replicas): {text}",
                    self.limits.replicas
                )
                .into(),
            };
        }
        NatsError::Stream {
            stream: stream.to_owned(),
            source,
        }
    }

    /// Refuses `nats.replicas` above the number of servers the NATS cluster has, by the server's own
    /// word: a server that is not clustered keeps one copy of a stream; a clustered one announces its
    /// cluster's servers to clients (`connect_urls` of its INFO). A cluster whose servers are not
    /// announced (`no_advertise`) is left to JetStream, which refuses a stream it cannot place.
    ///
    /// A server of the cluster that is down is not announced: when the streams exist with these
    /// replicas already, that is a server away (the streams go on with a majority of theirs), not a
    /// mistake, and the start goes on with a warning.
    pub async fn check_replicas(&self) -> Result<(), NatsError> {
        let wanted = self.limits.replicas;
        if wanted <= 1 {
            return Ok(());
        }
        let info = self.client.server_info();
        let servers: std::collections::BTreeSet<&str> =
            info.connect_urls.iter().map(String::as_str).collect();
        let (cluster, count) = match &info.cluster {
            None => {
                return Err(NatsError::Replicas(format!(
                    "nats.replicas = {wanted}, but the NATS server {} ({}:{}) is not part of a \
                     cluster: it keeps one copy of a stream. Set nats.replicas = 1, or run \
                     nats-server clustered (--cluster, --routes) and list its servers in nats.url",
                    info.server_name, info.host, info.port
                )))
            }
            Some(_) if servers.is_empty() => return Ok(()),
            Some(cluster) => (cluster, servers.len()),
        };
        if wanted <= count {
            return Ok(());
        }
        let mut have = Vec::new();
        for name in [self.subjects.input_stream(), self.subjects.output_stream()] {
            if let Ok(stream) = self.api.get_stream(&name).await {
                have.push(stream.cached_info().config.num_replicas);
            }
        }
        let listed = servers.into_iter().collect::<Vec<_>>().join(", ");
        if have.len() == 2 && have.iter().all(|&n| n == wanted) {
            tracing::warn!(
                "the NATS cluster {cluster} announces {count} server(s) now ({listed}), fewer than \
                 the {wanted} replicas of the streams (nats.replicas): a server is away; the \
                 streams go on while a majority of their replicas is up"
            );
            return Ok(());
        }
        Err(NatsError::Replicas(format!(
            "nats.replicas = {wanted}, but the NATS cluster {cluster} has {count} server(s) \
             ({listed}): a stream cannot have more replicas than the cluster has servers. Set \
             nats.replicas to {count} or less, or start the servers that are missing"
        )))
    }

    /// Which of `msg_ids` the output stream holds among its last messages. They are the last messages a
    /// coordinator published (the outbox keeps a message only until the bus stored it, and a restart
    /// publishes what it kept before anything new), so if stored they are at the stream's end: the
    /// last `msg_ids.len()` messages, and a margin for a deposed leader's last publishes.
    pub async fn already_stored(
        &self,
        msg_ids: &[String],
    ) -> Result<std::collections::HashSet<String>, NatsError> {
        const MARGIN: u64 = 256;
        let mut found = std::collections::HashSet::new();
        let (mut stream, fail) = self.stream_named(self.subjects.output_stream()).await?;
        let state = Self::state_of(&mut stream, &fail).await?;
        if msg_ids.is_empty() || state.messages == 0 {
            return Ok(found);
        }
        let from = state
            .last_sequence
            .saturating_sub(msg_ids.len() as u64 + MARGIN)
            .max(state.first_sequence)
            .max(1);
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| fail(e.into()))?;
        let mut messages = reader.messages().await.map_err(|e| fail(e.into()))?;
        let wanted: std::collections::HashSet<&str> = msg_ids.iter().map(String::as_str).collect();
        // Nothing within a few seconds (the last message removed meanwhile): what was read is the answer.
        while let Ok(Some(next)) =
            tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        {
            let msg = next.map_err(|e| fail(e.into()))?;
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(u64::MAX);
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str());
            if let Some(id) = id.filter(|id| wanted.contains(id)) {
                found.insert(id.to_owned());
            }
            if seq >= state.last_sequence {
                break;
            }
        }
        Ok(found)
    }

    /// Makes the input stream anew with its first input numbered `after + 1`: created on a subject
    /// nobody publishes to, emptied up to that sequence (which moves an empty stream's numbering), then
    /// given its subjects. Until then publishers find no stream and retry.
    async fn create_numbered(&self, config: stream::Config, after: u64) -> Result<(), NatsError> {
        let name = config.name.clone();
        let fail = |source: Cause| self.stream_error(&name, source);
        let aside = stream::Config {
            subjects: vec![format!("{}._numbering", self.subjects.prefix())],
            ..config.clone()
        };
        let created = self
            .js
            .create_stream(aside)
            .await
            .map_err(|e| fail(e.into()))?;
        created
            .purge()
            .sequence(after + 1)
            .await
            .map_err(|e| fail(e.into()))?;
        self.js
            .update_stream(config)
            .await
            .map_err(|e| fail(e.into()))?;
        tracing::warn!(
            "stream {name} was missing: made anew, numbering its inputs from #{} (after the last \
             input handled)",
            after + 1
        );
        Ok(())
    }

    /// One of the coordinator's streams, and how to word a failure about reading it.
    pub(super) async fn stream_named(
        &self,
        name: String,
    ) -> Result<(stream::Stream, impl Fn(Cause) -> NatsError), NatsError> {
        let stream = self.api.get_stream(&name).await;
        let fail = move |source: Cause| NatsError::Consumer {
            stream: name.clone(),
            source,
        };
        let stream = stream.map_err(|e| fail(e.into()))?;
        Ok((stream, fail))
    }

    /// A stream's state now.
    pub(super) async fn state_of(
        stream: &mut stream::Stream,
        fail: &impl Fn(Cause) -> NatsError,
    ) -> Result<stream::State, NatsError> {
        Ok(stream
            .info()
            .await
            .map_err(|e| fail(e.into()))?
            .state
            .clone())
    }
}

/// Waits, for at most [`PLACEMENT_WAIT`], until the stream `name` has a leader and `replicas - 1`
/// other replicas that are current. Right after its replicas changed, JetStream elects the stream's
/// leader anew, and a consumer made or removed meanwhile is not answered (the call waits for its
/// whole timeout).
pub async fn await_placed(js: &jetstream::Context, name: &str, replicas: usize) {
    let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
    loop {
        let placed = match js.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.cluster.as_ref().map_or(replicas == 1, |cluster| {
                    cluster.leader.is_some()
                        && cluster.replicas.len() + 1 == replicas
                        && cluster.replicas.iter().all(|peer| peer.current)
                }),
                Err(_) => false,
            },
            Err(_) => false,
        };
        if placed {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "stream {name}: its {replicas} replica(s) are not all placed and current after \
                 {PLACEMENT_WAIT:?}; going on"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a stream configured as `had` has every setting the coordinator gives it in `wanted`.
fn same_settings(had: &stream::Config, wanted: &stream::Config) -> bool {
    had.subjects == wanted.subjects
        && had.retention == wanted.retention
        && had.storage == wanted.storage
        && had.max_age == wanted.max_age
        && had.max_bytes == wanted.max_bytes
        && had.max_messages == wanted.max_messages
        && had.max_message_size == wanted.max_message_size
        && had.discard == wanted.discard
        && had.duplicate_window == wanted.duplicate_window
        && had.num_replicas.max(1) == wanted.num_replicas.max(1)
}

/// Whether a stream lookup's error says the stream does not exist.
fn stream_missing(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}
