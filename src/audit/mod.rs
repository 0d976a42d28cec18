//! `gpu-coordinator audit`: replays the output stream (`<PREFIX>_OUTPUT`) of a deployment and checks that
//! its history kept the rules ([`check`]): never two holders beyond a GPU's capacity, a whole-GPU holder
//! alone, fences strictly rising, no grant while a holder is pausing, every request ended at most once,
//! every `granted` reply with its event. Which requests asked for a whole GPU comes from the input stream.
//!
//! It reads the streams through ordered consumers up to their last message at the start of the audit, so
//! it can run beside a live coordinator; it never writes.

pub mod check;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use gpu_coordinator_wire::{codec, decode_input, Encoding, Inbound, Subjects};

use crate::adapters::nats::content_type;
use crate::config::Config;
use check::{Checker, Output, Record, Summary, Violation};

/// How long the audit waits for the next message of a stream before it calls the stream read.
const IDLE: Duration = Duration::from_secs(5);

/// Where the replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Since {
    /// The first message kept.
    #[default]
    Start,
    /// The first message stored at or after this instant (Unix milliseconds).
    At(u64),
}

impl Since {
    /// `--since`: an RFC 3339 instant, or a span back from now such as `90s`, `15m`, `2h`, `7d`.
    pub fn parse(text: &str, now_ms: u64) -> Result<Since, String> {
        let text = text.trim();
        let units = [
            ("ms", 1),
            ("s", 1_000),
            ("m", 60_000),
            ("h", 3_600_000),
            ("d", 86_400_000),
        ];
        for (suffix, ms) in units {
            if let Some(n) = text.strip_suffix(suffix) {
                if let Ok(n) = n.parse::<u64>() {
                    return Ok(Since::At(now_ms.saturating_sub(n.saturating_mul(ms))));
                }
            }
        }
        gpu_coordinator_wire::time::parse_rfc3339(text)
            .map(Since::At)
            .ok_or_else(|| {
                format!(
                    "--since {text:?}: expected an RFC 3339 instant (2026-11-28T18:00:00Z) or a span \
                     back from now (90s, 15m, 2h, 7d)"
                )
            })
    }
}

/// The GPU capacities the audit checks against: the configured `[[gpus]]`, else the default GPU.
fn capacities(config: &Config) -> HashMap<String, u64> {
    crate::app::gpus::inventory(config)
        .into_iter()
        .map(|g| (g.id.into_string(), g.total_mb))
        .collect()
}

/// Replays the deployment's history and checks it: `Ok(Ok(summary))` when every rule held,
/// `Ok(Err(violation))` at the first one broken, `Err` when the history cannot be read.
pub async fn run(config: &Config, since: Since) -> anyhow::Result<Result<Summary, Violation>> {
    let subjects = Subjects::new(&config.nats.prefix)
        .map_err(anyhow::Error::msg)
        .context("nats.prefix")?;
    let client = crate::adapters::nats::options(&config.nats)
        .await?
        .name("gpu-coordinator audit")
        .connect(&config.nats.url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {}",
                gpu_coordinator_client::redact(&config.nats.url)
            )
        })?;
    let js = jetstream::new(client);
    let (whole, stored) = stored_requests(&js, &subjects).await?;
    let mut checker = Checker::new(capacities(config), whole).with_stored(stored);
    let mut verdict = Ok(());
    read_stream(&js, &subjects.output_stream(), since, |seq, msg| {
        if verdict.is_err() {
            return;
        }
        if let Some(output) = decode_output(&subjects, &msg) {
            verdict = checker.feed(Record {
                seq,
                subject: msg.subject.to_string(),
                output,
            });
        }
    })
    .await?;
    Ok(verdict.and_then(|()| checker.finish()))
}

/// The ids of the requests in the input stream that named no `vram_mb` (a whole GPU), and of all the
/// valid requests there.
async fn stored_requests(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> anyhow::Result<(HashSet<String>, HashSet<String>)> {
    let (mut whole, mut stored) = (HashSet::new(), HashSet::new());
    read_stream(js, &subjects.input_stream(), Since::Start, |seq, msg| {
        let ct = content_type(msg.headers.as_ref());
        if let Ok(decoded) = decode_input(subjects, msg.subject.as_str(), ct, &msg.payload, seq) {
            if let Inbound::Request(request) = decoded.input {
                if let Some(id) = request.request_id {
                    let id = gpu_coordinator_core::scoped(&decoded.service, &id);
                    if request.vram_mb.is_none() {
                        whole.insert(id.clone());
                    }
                    stored.insert(id);
                }
            }
        }
    })
    .await?;
    Ok((whole, stored))
}

/// An output message decoded, or `None` for one that is not the coordinator's (the audit reports what
/// it cannot read as a warning, and goes on).
fn decode_output(subjects: &Subjects, msg: &async_nats::Message) -> Option<Output> {
    let encoding = Encoding::from_content_type(content_type(msg.headers.as_ref()));
    let subject = msg.subject.as_str();
    let rest = subject.strip_prefix(subjects.prefix())?.strip_prefix('.')?;
    let decoded = if rest.starts_with("reply.") {
        codec::decode(encoding, &msg.payload).map(Output::Reply)
    } else if rest.starts_with("control.") {
        codec::decode(encoding, &msg.payload).map(Output::Control)
    } else if rest.starts_with("event.") {
        codec::decode(encoding, &msg.payload).map(Output::Event)
    } else {
        return None;
    };
    // The service is the subject's last token (`reply.<svc>`, `control.<svc>`, `event.<kind>.<svc>`).
    let service = subject.rsplit('.').next().unwrap_or_default();
    match decoded {
        Ok(output) => Some(output.scoped(service)),
        Err(e) => {
            tracing::warn!("{subject}: not a message of the contract ({e}); skipped");
            None
        }
    }
}

/// Hands every message of `stream` from `since` up to its last message at the start, in order, to
/// `each` with its stream sequence.
async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    since: Since,
    mut each: impl FnMut(u64, async_nats::Message),
) -> anyhow::Result<()> {
    let mut handle = js
        .get_stream(stream)
        .await
        .with_context(|| format!("cannot read stream {stream}"))?;
    let state = handle
        .info()
        .await
        .with_context(|| format!("cannot read stream {stream}"))?
        .state
        .clone();
    if state.messages == 0 {
        return Ok(());
    }
    let deliver_policy = match since {
        Since::Start => consumer::DeliverPolicy::All,
        Since::At(ms) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
                .context("--since is out of range")?,
        },
    };
    let ordered = handle
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy,
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot open a reader on stream {stream}"))?;
    let mut messages = ordered
        .messages()
        .await
        .with_context(|| format!("cannot read stream {stream}"))?;
    loop {
        let next = match tokio::time::timeout(IDLE, messages.next()).await {
            Ok(Some(next)) => next.with_context(|| format!("reading stream {stream}"))?,
            // Nothing more within the wait (a start time past the last message, say): done.
            Ok(None) | Err(_) => return Ok(()),
        };
        let seq = next.info().map(|i| i.stream_sequence).unwrap_or(0);
        let (msg, _acker) = next.split();
        each(seq, msg);
        if seq >= state.last_sequence {
            return Ok(());
        }
    }
}
