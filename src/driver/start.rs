//! Starting the driver: wait for leadership, then restore what the journal and the lease store hold, and
//! publish again what the outbox kept from before a crash.

use gpu_coordinator_core::{Phase, Scheduler, Snapshot};
use tokio::sync::mpsc;

use super::effects::{publish, InputPosition, Outbox};
use super::publisher::Publisher;
use super::{now_ms, Command, Driver, Setup};
use crate::ports::{Loaded, Outbound, OutboxRow, Ports, Term};
use crate::retry::with_retry;

/// How many commands (status questions) may wait for the driver.
const COMMANDS: usize = 1024;

impl Driver {
    /// Restores, for leadership `term` (which the caller holds), the state persisted before: the requests,
    /// fences and input position from the journal, the live leases from the lease store. The messages
    /// the outbox kept are published again (under their ids: the bus stores each once). Every server is
    /// waited for with backoff.
    pub async fn start(
        setup: Setup,
        ports: Ports,
        term: Term,
    ) -> anyhow::Result<(Driver, mpsc::Receiver<Command>)> {
        let Setup {
            mut sched,
            subjects,
            recorder,
            nvml,
            mut nodes,
            retain_ended,
            status_limit,
            shutdown,
        } = setup;
        if let Some(feed) = nodes.as_mut() {
            feed.drop_stale().await;
        }
        let loaded = load_journal(&ports, term, retain_ended, &shutdown).await?;
        make_input_stream(&ports, loaded.input_seq, &shutdown).await?;
        republish_outbox(&ports, &loaded.outbox, &shutdown).await?;
        let (live_leases, stored_fence) = read_lease_store(&ports, term, &shutdown).await?;
        let outbox = Outbox::after(&loaded.outbox);
        let publisher = Publisher::start(
            (ports.input_log.clone(), ports.output_log.clone()),
            recorder.metrics().clone(),
            loaded.outbox.last().map(|row| row.id),
            shutdown.clone(),
        );
        let handled = loaded.input_seq;
        restore(&mut sched, loaded, live_leases, stored_fence);
        let output_log = ports.output_log.clone();
        let status = with_retry("subscribing to status", &shutdown, || {
            output_log.status_queries()
        })
        .await?;
        let (tx, rx) = mpsc::channel(COMMANDS);
        let mut driver = Driver {
            sched,
            ports,
            term,
            subjects,
            shutdown,
            commands: tx,
            recorder,
            nvml,
            nodes,
            position: InputPosition {
                handled,
                pending: None,
            },
            outbox,
            publisher,
            status_limit,
            retain_ended,
            trimming: Default::default(),
            time_floor: now_ms(),
            catching_up: None,
            gap_checked: None,
            status: Some(std::sync::Mutex::new(status)),
        };
        driver.carry_out().await?;
        Ok((driver, rx))
    }
}

/// Takes the journal over for `term` and loads what it holds: the requests (with at most
/// `retain_ended` ended ones), the fences, the input position and the outbox.
async fn load_journal(
    ports: &Ports,
    term: Term,
    retain_ended: usize,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Loaded> {
    let journal = ports.journal.clone();
    let began = std::time::Instant::now();
    with_retry("taking over the journal", shutdown, || {
        journal.take_over(term)
    })
    .await?;
    let loaded = with_retry("loading the queue from the journal", shutdown, || {
        journal.load(retain_ended)
    })
    .await?;
    tracing::info!(
        "loaded {} request(s) and {} outbox message(s) from the journal in {} ms",
        loaded.records.len(),
        loaded.outbox.len(),
        began.elapsed().as_millis()
    );
    Ok(loaded)
}

/// Makes the streams, the input stream numbered after `handled`, the last input handled.
async fn make_input_stream(
    ports: &Ports,
    handled: u64,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    // A missing input stream is made now, numbered after the last input handled, before anyone is
    // told that this coordinator answers.
    let input_log = ports.input_log.clone();
    with_retry("making the streams", shutdown, || {
        input_log.ensure_streams(Some(handled))
    })
    .await?;
    Ok(())
}

/// Publishes again the messages of `outbox` that the bus does not hold yet.
async fn republish_outbox(
    ports: &Ports,
    outbox: &[OutboxRow],
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    // Messages committed before a stop but perhaps not stored: published again, under their ids.
    if outbox.is_empty() {
        return Ok(());
    }
    let output_log = ports.output_log.clone();
    let ids: Vec<String> = outbox.iter().map(|r| r.msg_id.clone()).collect();
    // Those the bus already holds are not published again: past its duplicate window it
    // would store them twice.
    let stored = with_retry("reading the end of the output stream", shutdown, || {
        output_log.already_stored(&ids)
    })
    .await?;
    let again: Vec<Outbound> = outbox
        .iter()
        .filter(|row| !stored.contains(&row.msg_id))
        .map(OutboxRow::outbound)
        .collect();
    tracing::info!(
        "{} message(s) left from before the restart: {} already stored, {} published again",
        ids.len(),
        stored.len(),
        again.len()
    );
    publish(
        (ports.input_log.as_ref(), ports.output_log.as_ref()),
        &again,
        shutdown,
    )
    .await
}

/// Hands the scheduler what the journal (`loaded`) and the lease store (`live_leases`, `stored_fence`)
/// hold, its fences above both.
fn restore(
    sched: &mut Scheduler,
    loaded: Loaded,
    live_leases: Vec<gpu_coordinator_core::Lease>,
    stored_fence: gpu_coordinator_core::Fence,
) {
    let restoring = std::time::Instant::now();
    let restored = loaded
        .records
        .iter()
        .filter(|r| r.phase != Phase::Ended)
        .count();
    sched.restore(
        Snapshot {
            requests: loaded.records,
            max_fence: loaded.max_fence.max(stored_fence),
            leases: live_leases,
            max_arrival: loaded.max_arrival,
        },
        now_ms(),
    );
    tracing::info!(
        "restored {restored} live request(s) in {} ms; fences continue above {}",
        restoring.elapsed().as_millis(),
        sched.last_fence().0
    );
}

/// Claims `term` in the lease store (from then on it refuses the writes of any older term), then reads
/// its live leases and highest fence, and marks its epoch.
async fn read_lease_store(
    ports: &Ports,
    term: Term,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<(
    Vec<gpu_coordinator_core::Lease>,
    gpu_coordinator_core::Fence,
)> {
    let leases = ports.leases.clone();
    with_retry("claiming the term in the lease store", shutdown, || {
        leases.claim_term(term)
    })
    .await?;
    let live = with_retry("reading the lease store", shutdown, || leases.leases()).await?;
    let fence = with_retry("reading the fence from the lease store", shutdown, || {
        leases.max_fence()
    })
    .await?;
    with_retry("marking the lease store's epoch", shutdown, || {
        leases.ensure_epoch()
    })
    .await?;
    Ok((live, fence))
}
