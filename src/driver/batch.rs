//! A batch of inputs: decoded and fed to the scheduler in one pass, its effects made durable and
//! published, then the inputs acknowledged.

use gpu_coordinator_core::Input;
use gpu_coordinator_wire::{decode_input, Inbound};

use super::publisher::Acknowledgement;
use super::{now_ms, Driver};
use crate::ports::Delivery;

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Batch {
    /// Every input handled (or acknowledged as handled before).
    Handled,
    /// Cut short before an input that came after a gap: read the inputs again from the last handled.
    Gap,
}

impl Driver {
    /// Feeds a batch of inputs to the scheduler, makes their effects durable and published, then
    /// acknowledges them.
    ///
    /// Inputs come in stream order, so one at or below the last handled is a redelivery. An input
    /// after a gap (its predecessor never came) ends the batch before it, once: the caller reads the
    /// inputs again from the last handled, and what the stream still holds of the gap comes in order
    /// (an input handled out of order would make its predecessor look handled). A gap found again at
    /// the same place is inputs the stream no longer holds (removed by `nats.max_age`, or purged):
    /// said loudly, and gone on from.
    pub(super) async fn handle_batch(&mut self, batch: Vec<Delivery>) -> anyhow::Result<Batch> {
        let taken = std::time::Instant::now();
        let (inputs, settle, outcome) = self.decode_batch(batch);
        // One scheduling pass for the whole batch.
        self.sched.handle_inputs(inputs);
        self.carry_out().await?;
        self.sample_settling_gpus();
        self.recorder
            .metrics()
            .observe_stage(crate::metrics::Stage::Batch, taken.elapsed());
        self.settle_batch(settle).await?;
        Ok(outcome)
    }

    /// The scheduler's inputs of a batch, each at the time it was stored, and the acknowledgement of
    /// every delivery; inputs handled before are only acknowledged, and a gap ends the batch before
    /// it (see [`Driver::handle_batch`]).
    fn decode_batch(
        &mut self,
        batch: Vec<Delivery>,
    ) -> (
        Vec<(Input, gpu_coordinator_core::Millis)>,
        Vec<Acknowledgement>,
        Batch,
    ) {
        let mut settle = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        let mut handled = self.position.handled;
        let mut outcome = Batch::Handled;
        for delivery in batch {
            if delivery.seq > handled + 1
                && handled > 0
                && self.gap_read_again(delivery.seq, handled)
            {
                outcome = Batch::Gap;
                break;
            }
            let Delivery {
                seq,
                stored_at,
                subject,
                content_type,
                payload,
                ack,
            } = delivery;
            if seq != 0 && seq <= handled {
                // Handled before (before a crash, or a redelivery in this very batch): acknowledge only.
                settle.push((ack, false));
                continue;
            }
            if seq != 0 {
                handled = seq;
                self.position.pending = Some(seq);
            }
            let input = self.decode(&subject, content_type.as_deref(), &payload, seq);
            settle.push((ack, matches!(input, Input::Invalid(_))));
            // At the time it was stored (never after now; the core takes a time before its latest
            // as that one, and matches an ACK without a fence by the time it was stored).
            let now = now_ms();
            let at = stored_at.map_or(now, |stored| stored.min(now));
            self.core_time(at);
            inputs.push((input, at));
        }
        (inputs, settle, outcome)
    }

    /// Input `seq` came after `handled`, its predecessor missing: the first time at this place, the
    /// inputs are read again (`true`); the next, the missing ones are said to be lost and the batch
    /// goes on (`false`).
    fn gap_read_again(&mut self, seq: u64, handled: u64) -> bool {
        if self.gap_checked != Some(handled) {
            tracing::warn!(
                "input #{seq} came after #{handled}: reading the inputs again from #{}",
                handled + 1
            );
            self.gap_checked = Some(handled);
            return true;
        }
        tracing::error!(
            "inputs #{}..#{} are no longer in the input stream and were never handled \
             (removed by nats.max_age, or purged): their senders got no answer",
            handled + 1,
            seq - 1
        );
        false
    }

    /// The scheduler's input for a message on `subject`: its request scoped to its service, or the
    /// rejection of a message that could not be accepted.
    fn decode(&self, subject: &str, content_type: Option<&str>, payload: &[u8], seq: u64) -> Input {
        match decode_input(&self.subjects, subject, content_type, payload, seq) {
            Ok(d) => Input::Inbound {
                input: scope(&d.service, d.input),
                service: d.service,
                encoding: d.encoding,
            },
            Err(mut rejection) => {
                tracing::warn!(subject = %subject, "rejected input: {}", rejection.error);
                if let (Some(service), Some(id)) = (&rejection.service, &rejection.request_id) {
                    rejection.request_id = Some(gpu_coordinator_core::scoped(service, id));
                }
                Input::Invalid(rejection)
            }
        }
    }

    /// A GPU now waits for NVML to see a paused holder's VRAM freed: sample it now, not at the
    /// next tick (`nvml.sample_ms`, a second by default).
    fn sample_settling_gpus(&self) {
        if let Some(feed) = &self.nvml {
            if feed.devices.keys().any(|gpu| self.sched.settling(gpu)) {
                feed.sample_now.notify_one();
            }
        }
    }

    /// Records the input position of a batch that wrote nothing, then acknowledges its inputs.
    async fn settle_batch(&mut self, mut settle: Vec<Acknowledgement>) -> anyhow::Result<()> {
        if let Some(seq) = self.position.pending.take() {
            // Nothing to write (every input in the batch was handled before): record it anyway, so
            // that the position survives.
            self.write_bookkeeping(Some(seq), false).await?;
        }
        // Acknowledged once the messages they caused are stored; by the last alone where that covers
        // the inputs before it (a rejected input needs no acknowledgement of its own: it is handled).
        if self.ports.input_log.acks_cover_earlier() {
            settle = settle
                .pop()
                .map(|(ack, _)| vec![(ack, false)])
                .unwrap_or_default();
        }
        self.publisher.acknowledge(settle).await
    }
}

/// `input` with its request id scoped to `service` (see [`gpu_coordinator_core::SCOPE`]).
fn scope(service: &str, mut input: Inbound) -> Inbound {
    let id = match &mut input {
        Inbound::Request(m) => m.request_id.as_mut(),
        Inbound::Release(m) => m.request_id.as_mut(),
        Inbound::Renew(m) => Some(&mut m.request_id),
        Inbound::Ack(m) => Some(&mut m.request_id),
        Inbound::Cancel(m) => Some(&mut m.request_id),
    };
    if let Some(id) = id {
        *id = gpu_coordinator_core::scoped(service, id);
    }
    input
}
