//! The publishing stage: messages of committed batches go to the bus, and then their inputs are
//! acknowledged, in a task of their own, in the order the driver hands them over. The driver goes on
//! to the next batch (scheduling it, committing it) while the bus stores the last one's messages: the
//! journal write of one batch overlaps the publishes of the one before.
//!
//! Nothing is published before it is committed (the driver hands over only committed batches), and
//! nothing is acknowledged before the messages it caused are stored (one queue, in order). A crash
//! loses nothing: what was handed over is in the journal's outbox until the bus stored it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::effects::publish;
use crate::metrics::{Metrics, Stage};
use crate::ports::{Ack, InputLog, Outbound, OutputLog};

/// How many committed batches may wait for the bus before the driver waits with them: a bus that is
/// away stops the intake soon.
const QUEUE: usize = 16;

/// One input's acknowledgement: `true` ends its redelivery for good (it was invalid).
pub(super) type Acknowledgement = (Ack, bool);

enum Work {
    /// Messages under their outbox ids; `last` is the highest id among them; `handed`: when the
    /// driver handed them over.
    Publish {
        outputs: Vec<Outbound>,
        last: u64,
        handed: std::time::Instant,
    },
    /// Inputs whose effects are committed and, once what came before is stored, published.
    Acknowledge(Vec<Acknowledgement>),
    /// Answered once everything handed over before is done.
    #[cfg(test)]
    Done(tokio::sync::oneshot::Sender<()>),
}

/// The handle the driver keeps of its publishing task.
pub(super) struct Publisher {
    tx: Option<mpsc::Sender<Work>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Outbox rows up to this id are stored by the bus (0: none yet).
    stored_upto: Arc<AtomicU64>,
}

impl Publisher {
    /// Starts the task; `stored_upto`: the outbox rows already stored (those published again at start).
    /// Each batch's publish is timed in `metrics`; `input_log` makes the streams anew before a retry.
    pub fn start(
        (input_log, output_log): (Arc<dyn InputLog>, Arc<dyn OutputLog>),
        metrics: Arc<Metrics>,
        stored_upto: Option<u64>,
        shutdown: CancellationToken,
    ) -> Publisher {
        let (tx, mut rx) = mpsc::channel::<Work>(QUEUE);
        let stored = Arc::new(AtomicU64::new(stored_upto.unwrap_or(0)));
        let task = tokio::spawn({
            let stored = stored.clone();
            async move {
                while let Some(work) = rx.recv().await {
                    match work {
                        Work::Publish {
                            outputs,
                            last,
                            handed,
                        } => {
                            publish(
                                (input_log.as_ref(), output_log.as_ref()),
                                &outputs,
                                &shutdown,
                            )
                            .await?;
                            metrics.observe_stage(Stage::Publish, handed.elapsed());
                            stored.fetch_max(last, Ordering::SeqCst);
                        }
                        Work::Acknowledge(acks) => {
                            for (ack, terminate) in acks {
                                if let Err(e) = ack(terminate).await {
                                    tracing::warn!(
                                        "acknowledging an input failed (it will be redelivered and \
                                         answered again): {e}"
                                    );
                                }
                            }
                        }
                        #[cfg(test)]
                        Work::Done(done) => {
                            let _ = done.send(());
                        }
                    }
                }
                anyhow::Ok(())
            }
        });
        Publisher {
            tx: Some(tx),
            task: Some(task),
            stored_upto: stored,
        }
    }

    /// The outbox rows the bus stored: up to this id.
    pub fn stored_upto(&self) -> Option<u64> {
        match self.stored_upto.load(Ordering::SeqCst) {
            0 => None,
            id => Some(id),
        }
    }

    /// Hands over the messages of a committed batch (outbox ids up to `last`).
    pub async fn publish(&mut self, outputs: Vec<Outbound>, last: u64) -> anyhow::Result<()> {
        self.send(Work::Publish {
            outputs,
            last,
            handed: std::time::Instant::now(),
        })
        .await
    }

    /// Hands over inputs to acknowledge once what was handed over before is stored.
    pub async fn acknowledge(&mut self, acks: Vec<Acknowledgement>) -> anyhow::Result<()> {
        if acks.is_empty() {
            return Ok(());
        }
        self.send(Work::Acknowledge(acks)).await
    }

    /// Waits until everything handed over is published and acknowledged.
    #[cfg(test)]
    pub async fn done(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Work::Done(tx))
            .await
            .expect("the publishing task runs");
        rx.await.expect("the publishing task answers");
    }

    async fn send(&mut self, work: Work) -> anyhow::Result<()> {
        let sent = match &self.tx {
            Some(tx) => tx.send(work).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The task ended: only by giving up on the bus at shutdown.
        match self.task.take() {
            Some(task) => match task.await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(anyhow::anyhow!("the publishing task ended")),
                Err(e) => Err(anyhow::anyhow!("the publishing task failed: {e}")),
            },
            None => Err(anyhow::anyhow!("the publishing task ended")),
        }
    }

    /// Waits, at most `wait`, until everything handed over is published and acknowledged; then the
    /// task ends (it is stopped if it has not finished by then).
    pub async fn finish(&mut self, wait: Duration) {
        self.tx = None;
        let Some(mut task) = self.task.take() else {
            return;
        };
        match tokio::time::timeout(wait, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("publishing: {e:#}"),
            Ok(Err(e)) => tracing::warn!("the publishing task failed: {e}"),
            Err(_) => {
                tracing::warn!("the bus did not take the last messages within {wait:?}");
                task.abort();
            }
        }
    }
}

impl Drop for Publisher {
    /// A driver that ends without [`Publisher::finish`] (deposed, or gone with its process) publishes
    /// nothing more: what it committed is in the outbox, for the next term to publish.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
