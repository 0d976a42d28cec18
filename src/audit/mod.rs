//! `gpu-coordinator audit`: replays the output stream (`<PREFIX>_OUTPUT`) of a deployment and checks that
//! its history kept the rules ([`check`]): never two holders beyond a GPU's capacity, a whole-GPU holder
//! alone, fences strictly rising, no grant while a holder is pausing, every request ended at most once,
//! every `granted` reply with its event. Which requests asked for a whole GPU comes from the input stream.
//!
//! It reads the streams (JetStream's, or the embedded bus's tables) through the
//! [`Gateway`](crate::ports::Gateway) the composition root opens for it ([`crate::app::audit`]), up to
//! their last message at the start of the audit, so it can run beside a live coordinator; it never
//! writes.

pub mod check;

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use futures::StreamExt;
use gpu_coordinator_wire::{codec, decode_input, Inbound, Subjects};

use crate::ports::{Gateway, ReadFrom, Stored, Which};
use check::{Checker, Output, Record};
pub use check::{Summary, Violation};

/// Where the replay starts (also where the HTTP API's event streams start, from `?since=`).
pub use gpu_coordinator_wire::time::Since;

/// Checks the history `gateway` keeps from `since`: `Ok(Ok(summary))` when every rule held,
/// `Ok(Err(violation))` at the first one broken, `Err` when the history cannot be read. `capacities`
/// are the configured GPUs' sizes (a fleet's come with its events). `policies` are the `[services]`
/// the coordinator ran with: a request that named no `vram_mb` got its service's `default_vram_mb`,
/// not the whole GPU.
pub async fn check_history(
    gateway: &dyn Gateway,
    subjects: &Subjects,
    capacities: HashMap<String, u64>,
    policies: &gpu_coordinator_core::ServicePolicies,
    since: Since,
) -> anyhow::Result<Result<Summary, Violation>> {
    let (whole, stored) = stored_requests(gateway, subjects, policies).await?;
    let mut checker = Checker::new(capacities, whole).with_stored(stored);
    let from = match since {
        Since::Start => ReadFrom::Start,
        Since::At(ms) => ReadFrom::Since(ms),
    };
    let mut outputs = gateway
        .history(Which::Outputs, &format!("{}.>", subjects.prefix()), from)
        .await
        .context("cannot read the output stream")?;
    while let Some(msg) = outputs.next().await {
        let msg = msg.context("reading the output stream")?;
        if let Some(output) = decode_output(subjects, &msg) {
            if let Err(violation) = checker.feed(Record {
                seq: msg.seq,
                subject: msg.subject.clone(),
                output,
            }) {
                return Ok(Err(violation));
            }
        }
    }
    Ok(checker.finish())
}

/// The ids of the requests in the input stream that named no `vram_mb` and whose service has no
/// `default_vram_mb` (a whole GPU), and of all the valid requests there.
async fn stored_requests(
    gateway: &dyn Gateway,
    subjects: &Subjects,
    policies: &gpu_coordinator_core::ServicePolicies,
) -> anyhow::Result<(HashSet<String>, HashSet<String>)> {
    let (mut whole, mut stored) = (HashSet::new(), HashSet::new());
    let mut inputs = gateway
        .history(
            Which::Inputs,
            &format!("{}.>", subjects.prefix()),
            ReadFrom::Start,
        )
        .await
        .context("cannot read the input stream")?;
    while let Some(msg) = inputs.next().await {
        let msg = msg.context("reading the input stream")?;
        let ct = msg.content_type.as_deref();
        if let Ok(decoded) = decode_input(subjects, &msg.subject, ct, &msg.payload, msg.seq) {
            if let Inbound::Request(request) = decoded.input {
                if let Some(id) = request.request_id {
                    let id = gpu_coordinator_core::scoped(&decoded.service, &id);
                    let default_vram = policies
                        .get(&decoded.service)
                        .and_then(|p| p.default_vram_mb);
                    if request.vram_mb.or(default_vram).is_none() {
                        whole.insert(id.clone());
                    }
                    stored.insert(id);
                }
            }
        }
    }
    Ok((whole, stored))
}

/// An output message decoded, or `None` for one that is not the coordinator's (the audit reports what
/// it cannot read as a warning, and goes on).
fn decode_output(subjects: &Subjects, msg: &Stored) -> Option<Output> {
    let encoding = msg.encoding();
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
