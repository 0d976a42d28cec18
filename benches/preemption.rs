//! Chat time-to-GPU under a background load, the coordinator beside a FIFO lock, and the preemption
//! overhead, all in one run:
//!
//! - **The coordinator**: K background workers (priority 2, the whole GPU, built on the client
//!   library's `Worker`) each transcribe CHUNK-long chunks while they hold the GPU; on `pause` a worker
//!   finishes its chunk and ACKs. A chat service (priority 0) asks for the GPU at random instants,
//!   holds it CHAT_HOLD, and releases. Printed: chat time-to-GPU (request to `granted`), and the
//!   preemption overhead: from the moment the paused worker sends its ACK to the chat's grant, beside
//!   the same chat request's grant on a free GPU (the path an ACK and a grant both take).
//! - **A FIFO lock** (`pg_advisory_lock`, whose waiters are served in arrival order): the same K
//!   workers take the lock for one chunk at a time; chat waits in line behind them.
//!
//! The chat waits at most one chunk plus the overhead with the coordinator, whatever K; behind a FIFO
//! lock its wait grows with K. `--csv FILE` also writes the figures (for `scripts/plot_benchmarks.py`).
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench preemption [-- --csv FILE]`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpu_coordinator_client::{Client, RequestOptions, Worker};
use rand::{rngs::StdRng, Rng, SeedableRng};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};
use tokio_util::sync::CancellationToken;

const CHUNK: Duration = Duration::from_millis(50);
const CHAT_HOLD: Duration = Duration::from_millis(5);
const WORKERS: [usize; 3] = [1, 4, 16];
const CHAT_SAMPLES: usize = 40;
const FIFO_SAMPLES: usize = 20;

fn p(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort();
    samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)].as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let csv = args
        .iter()
        .position(|a| a == "--csv")
        .and_then(|i| args.get(i + 1).cloned());
    println!(
        "chunk {} ms, chat holds {} ms; {} cores",
        CHUNK.as_millis(),
        CHAT_HOLD.as_millis(),
        std::thread::available_parallelism()?
    );
    let mut rows =
        vec!["workers,coordinator_p50_ms,coordinator_p99_ms,fifo_p50_ms,fifo_p99_ms".to_owned()];
    let mut overheads = Vec::new();
    for k in WORKERS {
        let (mut waits, mut overhead) = coordinator_under_load(k).await?;
        let mut fifo = fifo_under_load(k).await?;
        let (c50, c99, f50, f99) = (
            p(&mut waits, 0.5),
            p(&mut waits, 0.99),
            p(&mut fifo, 0.5),
            p(&mut fifo, 0.99),
        );
        println!(
            "{k:>2} background workers: chat time-to-GPU p50 {c50:>7.1} ms p99 {c99:>7.1} ms (coordinator) | \
             {f50:>7.1} ms p99 {f99:>7.1} ms (pg_advisory_lock, FIFO)"
        );
        rows.push(format!("{k},{c50:.2},{c99:.2},{f50:.2},{f99:.2}"));
        overheads.append(&mut overhead);
    }
    common::percentiles("preemption overhead: ACK sent -> chat granted", overheads);
    // The reference: the same chat request through the same client library on a free GPU (no
    // worker holds it), from its request to its grant.
    let (free, _) = coordinator_under_load(0).await?;
    common::percentiles("reference: the chat's grant on a free GPU", free);
    let delivery = common::percentiles(
        "reference: a JetStream publish -> its delivery, after the same pauses",
        {
            // After pauses like the chat's between its requests (the path of the paused worker's
            // ACK into the coordinator, and of the grant out to the chat).
            let mut rng = StdRng::seed_from_u64(7);
            let tag = format!("benchp{}d", std::process::id());
            common::deliveries(&tag, CHAT_SAMPLES, || {
                Duration::from_millis(rng.random_range(60..160))
            })
            .await?
        },
    );
    println!(
        "  the overhead carries two such deliveries (the ACK in, the grant out) and a durable write \
         between: {:.2} ms before the write",
        2.0 * delivery.as_secs_f64() * 1e3
    );
    if let Some(file) = csv {
        std::fs::write(&file, rows.join("\n") + "\n")?;
        println!("wrote {file}");
    }
    Ok(())
}

/// Chat's waits and the preemption overheads with `k` background workers on the coordinator.
async fn coordinator_under_load(k: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let tag = format!("benchp{}k{k}", std::process::id());
    let bench = common::Bench::start(&tag, 10_000).await?;
    let url = bench.config.nats.url.clone();
    let stop = CancellationToken::new();
    // When the last paused worker sent its ACK.
    let acked: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..k {
        let client = Client::connect(&url, &tag, &format!("bg{w}")).await?;
        let (stop, acked) = (stop.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            let busy = Arc::new(tokio::sync::Mutex::new(()));
            let worker = Worker::new(&client).on_pause({
                let (busy, acked) = (busy.clone(), acked.clone());
                move |_| {
                    let (busy, acked) = (busy.clone(), acked.clone());
                    async move {
                        let _chunk = busy.lock().await;
                        *acked.lock().expect("lock") = Some(Instant::now());
                    }
                }
            });
            let lease = worker
                .request(RequestOptions::new(2).lease_ms(60_000).timeout_ms(600_000))
                .await?;
            while !stop.is_cancelled() {
                tokio::select! {
                    active = lease.active() => active?,
                    () = stop.cancelled() => break,
                }
                let _chunk = busy.lock().await;
                tokio::time::sleep(CHUNK).await;
            }
            lease.release().await?;
            anyhow::Ok(())
        }));
    }
    // Let the first worker hold the GPU and the others queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chat = Client::connect(&url, &tag, "chat").await?;
    let mut rng = StdRng::seed_from_u64(7);
    let (mut waits, mut overheads) = (Vec::new(), Vec::new());
    for _ in 0..CHAT_SAMPLES {
        tokio::time::sleep(Duration::from_millis(rng.random_range(60..160))).await;
        *acked.lock().expect("lock") = None;
        let asked = Instant::now();
        let lease = chat
            .request(RequestOptions::new(0).preemptible(false).timeout_ms(60_000))
            .await?;
        let granted = Instant::now();
        waits.push(granted - asked);
        if let Some(ack) = *acked.lock().expect("lock") {
            if ack >= asked {
                overheads.push(granted - ack);
            }
        }
        tokio::time::sleep(CHAT_HOLD).await;
        lease.release().await?;
    }
    stop.cancel();
    for w in workers {
        w.await??;
    }
    bench.stop().await?;
    Ok((waits, overheads))
}

/// Chat's waits behind `k` workers that take `pg_advisory_lock` one chunk at a time.
async fn fifo_under_load(k: usize) -> anyhow::Result<Vec<Duration>> {
    const KEY: i64 = 0x6270_7265_656d;
    // One connection each: an advisory lock belongs to the session that took it.
    let connect = || {
        let mut options =
            sea_orm::ConnectOptions::new("postgres://postgres@127.0.0.1:5432/postgres");
        options.max_connections(1).min_connections(1);
        Database::connect(options)
    };
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..k {
        let db = connect().await?;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                exec(&db, "SELECT pg_advisory_lock($1)", KEY).await?;
                tokio::time::sleep(CHUNK).await;
                exec(&db, "SELECT pg_advisory_unlock($1)", KEY).await?;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chat = connect().await?;
    let mut rng = StdRng::seed_from_u64(7);
    let mut waits = Vec::new();
    for _ in 0..FIFO_SAMPLES {
        tokio::time::sleep(Duration::from_millis(rng.random_range(60..160))).await;
        let asked = Instant::now();
        exec(&chat, "SELECT pg_advisory_lock($1)", KEY).await?;
        waits.push(asked.elapsed());
        tokio::time::sleep(CHAT_HOLD).await;
        exec(&chat, "SELECT pg_advisory_unlock($1)", KEY).await?;
    }
    stop.cancel();
    for w in workers {
        w.await??;
    }
    Ok(waits)
}

async fn exec(db: &DatabaseConnection, sql: &str, key: i64) -> anyhow::Result<()> {
    db.execute(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        [key.into()],
    ))
    .await?;
    Ok(())
}
