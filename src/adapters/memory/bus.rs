//! The bus in memory: an input stream read from a position (past the acknowledged floor, as JetStream's
//! consumer), an output stream that stores each `msg_id` once, and status questions.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use gpu_coordinator_wire::Encoding;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::{lock, stall, Faults, Step, Trace, Verdict};
use crate::ports::{
    Delivery, InputLog, Inputs, Outbound, OutputLog, PortError, PublishFailure, Settle,
    StatusQueries, StatusQuery,
};

/// One input in the stream.
#[derive(Debug, Clone)]
struct Stored {
    subject: String,
    content_type: Option<String>,
    payload: Bytes,
}

#[derive(Debug, Default)]
struct BusState {
    /// The input stream; sequence `i + 1` is at index `i`.
    inputs: Vec<Stored>,
    /// Acknowledged (or terminated) input sequences.
    acked: HashSet<u64>,
    /// Which opening of the inputs is current: an older one's stream ends.
    generation: u64,
    /// Every message stored, in order, once per `msg_id`.
    published: Vec<Outbound>,
    msg_ids: HashSet<String>,
}

/// An [`InputLog`] and an [`OutputLog`] in memory: an input stream and an output stream with
/// duplicate detection.
#[derive(Clone)]
pub struct MemBus {
    state: Arc<Mutex<BusState>>,
    /// Wakes the input stream when an input arrives or the inputs are reopened.
    arrived: Arc<Notify>,
    reconnects: Arc<watch::Sender<u64>>,
    status: Arc<Mutex<Option<mpsc::Sender<StatusQuery>>>>,
    trace: Trace,
    faults: Faults,
    /// While `true`, publishing waits (a bus slow to store).
    held: Arc<watch::Sender<bool>>,
}

impl MemBus {
    /// A bus recording into `trace`, subject to `faults`.
    pub fn new(trace: Trace, faults: Faults) -> MemBus {
        MemBus {
            state: Arc::default(),
            arrived: Arc::new(Notify::new()),
            reconnects: Arc::new(watch::channel(0).0),
            status: Arc::default(),
            trace,
            faults,
            held: Arc::new(watch::channel(false).0),
        }
    }

    /// Holds every publish until called again with `false`: a bus that is slow to store.
    pub fn hold_publishing(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Appends an input (JSON) to the stream; answers its sequence.
    pub fn push(&self, subject: &str, payload: impl Into<Bytes>) -> u64 {
        let seq = {
            let mut state = lock(&self.state);
            state.inputs.push(Stored {
                subject: subject.to_owned(),
                content_type: None,
                payload: payload.into(),
            });
            state.inputs.len() as u64
        };
        self.arrived.notify_waiters();
        seq
    }

    /// Every message stored so far, in order.
    pub fn published(&self) -> Vec<Outbound> {
        lock(&self.state).published.clone()
    }

    /// Whether input `seq` was acknowledged.
    pub fn acked(&self, seq: u64) -> bool {
        lock(&self.state).acked.contains(&seq)
    }

    /// Asks the driver for its status document.
    pub async fn status(&self, encoding: Encoding) -> Option<Vec<u8>> {
        let asker = lock(&self.status).clone()?;
        let (tx, rx) = oneshot::channel();
        let respond = Box::new(move |payload: Vec<u8>| -> Settle {
            Box::pin(async move {
                let _ = tx.send(payload);
                Ok(())
            })
        });
        asker
            .send(StatusQuery {
                encoding,
                page: Default::default(),
                respond,
            })
            .await
            .ok()?;
        rx.await.ok()
    }

    /// Says a reconnect happened.
    pub fn reconnect(&self) {
        self.reconnects.send_modify(|n| *n += 1);
    }

    /// The delivery of input `seq`, if the stream has it and its opening is still current.
    fn delivery(&self, seq: u64, generation: u64) -> Option<Option<Delivery>> {
        let state = lock(&self.state);
        if state.generation != generation {
            return Some(None);
        }
        let stored = state.inputs.get(seq as usize - 1)?.clone();
        let bus = self.clone();
        Some(Some(Delivery {
            seq,
            stored_at: None,
            subject: stored.subject,
            content_type: stored.content_type,
            payload: stored.payload,
            ack: Box::new(move |terminate| -> Settle {
                Box::pin(async move {
                    let verdict = bus.faults.next();
                    if let Verdict::StallBefore = verdict {
                        return stall().await;
                    }
                    lock(&bus.state).acked.insert(seq);
                    bus.trace.push(Step::Ack { seq, terminate });
                    if let Verdict::StallAfter = verdict {
                        return stall().await;
                    }
                    Ok(())
                })
            }),
        }))
    }
}

#[async_trait]
impl InputLog for MemBus {
    async fn ensure_streams(&self, _inputs_after: Option<u64>) -> Result<(), PortError> {
        Ok(())
    }

    async fn input_end(&self) -> Result<u64, PortError> {
        Ok(lock(&self.state).inputs.len() as u64)
    }

    /// Without limits: keeps every input.
    async fn trim_inputs(&self, _handled: u64) -> Result<u64, PortError> {
        Ok(0)
    }

    /// Every input is acknowledged by itself.
    fn acks_cover_earlier(&self) -> bool {
        false
    }

    /// As JetStream's consumer: past what the journal handled and past the acknowledged floor (every
    /// input up to it acknowledged), from the start when the stream is shorter than the position.
    async fn input_position(&self, handled: u64) -> Result<u64, PortError> {
        let state = lock(&self.state);
        let last = state.inputs.len() as u64;
        let floor = (1..=last)
            .take_while(|seq| state.acked.contains(seq))
            .last()
            .unwrap_or(0);
        let after = handled.max(floor);
        Ok(if after > last { 0 } else { after })
    }

    async fn open_inputs(&self, after: u64) -> Result<Inputs, PortError> {
        let generation = {
            let mut state = lock(&self.state);
            state.generation += 1;
            state.generation
        };
        self.arrived.notify_waiters();
        let bus = self.clone();
        let stream = futures::stream::unfold(after + 1, move |seq| {
            let bus = bus.clone();
            async move {
                loop {
                    let notified = bus.arrived.notified();
                    match bus.delivery(seq, generation) {
                        Some(Some(delivery)) => return Some((Ok(delivery), seq + 1)),
                        Some(None) => return None,
                        None => notified.await,
                    }
                }
            }
        });
        Ok(stream.boxed())
    }

    fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.subscribe()
    }
}

#[async_trait]
impl OutputLog for MemBus {
    /// In this process: nothing to be cut off from (the tests cut it off by their faults).
    fn connected(&self) -> bool {
        true
    }

    /// Detects duplicates forever (by `msg_id`): none need to be looked up.
    async fn already_stored(&self, _msg_ids: &[String]) -> Result<HashSet<String>, PortError> {
        Ok(HashSet::new())
    }

    async fn publish_in_order(
        &self,
        outputs: &[Outbound],
        _pipelined: bool,
    ) -> Result<(), PublishFailure> {
        // Never closed: the sender lives in `self`.
        let _ = self.held.subscribe().wait_for(|held| !held).await;
        for out in outputs {
            let verdict = self.faults.next();
            if let Verdict::StallBefore = verdict {
                return stall().await;
            }
            {
                let mut state = lock(&self.state);
                if state.msg_ids.insert(out.msg_id.clone()) {
                    state.published.push(out.clone());
                }
            }
            self.trace.push(Step::Publish {
                msg_id: out.msg_id.clone(),
                subject: out.subject.clone(),
            });
            if let Verdict::StallAfter = verdict {
                return stall().await;
            }
        }
        Ok(())
    }

    async fn status_queries(&self) -> Result<StatusQueries, PortError> {
        let (tx, rx) = mpsc::channel(16);
        *lock(&self.status) = Some(tx);
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }

    async fn flush(&self) -> Result<(), PortError> {
        Ok(())
    }
}
