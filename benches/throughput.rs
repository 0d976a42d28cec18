//! Throughput: 64 services on 4 GPUs, each looping request -> grant -> release through the client
//! library (whole-GPU requests, so four hold at a time), for SECONDS; printed in cycles per second
//! beside the same loop on `pg_advisory_lock` (64 sessions, one lock per GPU) in the same run, and
//! beside the bus's own ceiling: the messages a cycle stores (its request, release, replies and
//! events, and the journal's share written behind) against the messages per second that NATS alone
//! stores and delivers on this machine.
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench throughput [-- SECONDS]`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_coordinator_client::{Client, RequestOptions};
use sea_orm::{ConnectionTrait, Database, Statement};

const SERVICES: usize = 64;
const GPUS: usize = 4;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = common::number_arg(10);
    let run = Duration::from_secs(seconds);
    let mut coordinator = Vec::new();
    for write_behind in [false, true] {
        coordinator.push((write_behind, coordinator_cycles(run, write_behind).await?));
    }

    let advisory = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SERVICES {
        let mut options =
            sea_orm::ConnectOptions::new("postgres://postgres@127.0.0.1:5432/postgres");
        options.max_connections(1).min_connections(1);
        let db = Database::connect(options).await?;
        let advisory = advisory.clone();
        let key = 0x7468_0000_i64 + (s % GPUS) as i64;
        tasks.push(tokio::spawn(async move {
            let sql = |f: &str| {
                Statement::from_sql_and_values(
                    db.get_database_backend(),
                    format!("SELECT {f}($1)"),
                    [key.into()],
                )
            };
            while start.elapsed() < run {
                db.execute(sql("pg_advisory_lock")).await?;
                db.execute(sql("pg_advisory_unlock")).await?;
                advisory.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let reference = advisory.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let bus = async_nats::connect("nats://127.0.0.1:4222").await?;
    let ceiling =
        common::bus_ceiling(&bus, &format!("bencht{}c", std::process::id()), 100_000).await?;
    println!(
        "{SERVICES} services, {GPUS} GPUs, {seconds} s each, {} cores:",
        std::thread::available_parallelism()?
    );
    for (write_behind, (cycles, messages)) in coordinator {
        println!(
            "  coordinator, {:<24} {cycles:>9.0} cycles/s (ratio to pg_advisory_lock {:.2}); \
             {messages:.1} messages stored a cycle, so the bus alone allows {:.0} cycles/s",
            common::journal_mode(write_behind),
            cycles / reference,
            ceiling / messages
        );
    }
    println!("  pg_advisory_lock {:>33.0} cycles/s", reference);
    println!("  the bus alone {ceiling:>36.0} messages/s stored and delivered");
    Ok(())
}

/// The coordinator's cycles per second over `run`, its journal as `write_behind` says, and the
/// messages it stored a cycle.
async fn coordinator_cycles(run: Duration, write_behind: bool) -> anyhow::Result<(f64, f64)> {
    let tag = format!("bencht{}{}", std::process::id(), u8::from(write_behind));
    let bench = common::Bench::start_with(&tag, 10_000, GPUS, write_behind).await?;
    let mut clients = Vec::new();
    for s in 0..SERVICES {
        clients.push(Client::connect(&bench.config.nats.url, &tag, &format!("svc{s}")).await?);
    }
    let cycles = Arc::new(AtomicU64::new(0));
    let stored = common::stored_messages(&bench.client, &tag).await?;
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let cycles = cycles.clone();
            tokio::spawn(async move {
                while start.elapsed() < run {
                    let lease = client
                        .request(RequestOptions::new(1).lease_ms(30_000).timeout_ms(120_000))
                        .await?;
                    lease.release().await?;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let done = cycles.load(Ordering::Relaxed);
    let coordinator = done as f64 / start.elapsed().as_secs_f64();
    let stored = common::stored_messages(&bench.client, &tag).await? - stored;
    bench.stop().await?;
    Ok((coordinator, stored as f64 / done.max(1) as f64))
}
