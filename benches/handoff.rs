//! Handoff latency: a holder releases, the next in line is granted. The coordinator beside the locks a
//! user would otherwise use, all measured in the same run on the same machine:
//!
//! - the coordinator: the time from publishing `release` (a plain NATS publish) to receiving the waiting
//!   request's `granted` reply, with `[queued]` more requests waiting behind it (default 0);
//! - `pg_advisory_lock`: the time from `pg_advisory_unlock` on one connection to `pg_advisory_lock`
//!   returning on the other, which was blocked in it;
//! - Redis `SET NX PX`, the waiter polling every 1 ms and every 10 ms: from the holder's `DEL` to the
//!   waiter's successful `SET`;
//! - `flock(2)` on a file: from the holder's unlock to the blocked waiter's return;
//! - the floor of the coordinator's handoff written behind, from its servers measured in the same run:
//!   a JetStream delivery (the release in), a PubAck (the journal), half a NATS round trip (the grant
//!   out to the waiter's subscription).
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench handoff [-- queued]`.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use gpu_coordinator_wire::{Outcome, Reply};
use sea_orm::{ConnectionTrait, Database, Statement};

const CYCLES: usize = 500;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let queued: usize = common::number_arg(0);
    let coordinator = coordinator_handoff(queued, false).await?;
    let behind = coordinator_handoff(queued, true).await?;
    let advisory = advisory_lock_handoff().await?;
    let redis_1 = redis_poll_handoff(Duration::from_millis(1)).await?;
    let redis_10 = redis_poll_handoff(Duration::from_millis(10)).await?;
    let flock = flock_handoff()?;
    let tag = format!("hand{}f", std::process::id());
    let inbound = common::deliveries(&tag, CYCLES, || Duration::ZERO).await?;
    let pubacks = common::pubacks(&tag, CYCLES).await?;
    let round_trips = common::round_trips(&tag, CYCLES).await?;
    println!("\nhandoff p50, this run:");
    let c = common::percentiles(&format!("coordinator ({queued} more queued)"), coordinator);
    let b = common::percentiles(
        &format!("coordinator, Postgres written behind ({queued} more queued)"),
        behind,
    );
    let a = common::percentiles("pg_advisory_lock", advisory);
    common::percentiles("Redis SET NX, polled every 1 ms", redis_1);
    common::percentiles("Redis SET NX, polled every 10 ms", redis_10);
    common::percentiles("flock", flock);
    println!(
        "coordinator / pg_advisory_lock: {:.2}; written behind / pg_advisory_lock: {:.2}",
        c.as_secs_f64() / a.as_secs_f64(),
        b.as_secs_f64() / a.as_secs_f64()
    );
    // The floor of a handoff written behind, as the sum of its servers' p50s: the release stored and
    // delivered to the coordinator, the journal's PubAck, the grant carried one way to the waiter.
    let inbound = common::percentiles("reference: JetStream publish -> pull delivery", inbound);
    let puback = common::percentiles("reference: JetStream publish, PubAck awaited", pubacks);
    let round_trip = common::percentiles("reference: NATS request-reply", round_trips);
    let floor = inbound + puback + round_trip / 2;
    println!(
        "floor written behind (a JetStream delivery + a PubAck + half a NATS round trip): {:.3} ms; \
         written behind / floor: {:.2}; floor / pg_advisory_lock: {:.2}",
        floor.as_secs_f64() * 1e3,
        b.as_secs_f64() / floor.as_secs_f64(),
        floor.as_secs_f64() / a.as_secs_f64()
    );
    Ok(())
}

/// Two requests of the whole GPU take turns: the holder releases, the waiter is granted; `queued`
/// requests of a third service wait behind them all along. The journal as `write_behind` says.
async fn coordinator_handoff(queued: usize, write_behind: bool) -> anyhow::Result<Vec<Duration>> {
    let tag = format!("hand{}{}", std::process::id(), u8::from(write_behind));
    let bench = common::Bench::start_with(&tag, queued.max(1), 1, write_behind).await?;
    let client = bench.client.clone();
    let mut replies = client.subscribe(format!("{tag}.reply.*")).await?;
    let mut queued_events = client.subscribe(format!("{tag}.event.queued.*")).await?;
    client.flush().await?;
    let js = async_nats::jetstream::new(client.clone());
    // The ones that wait all along: least urgent, never granted during the run.
    for i in 0..queued {
        let body = format!(r#"{{"request_id":"q{i}","priority":9,"timeout_ms":3600000}}"#);
        js.publish(format!("{tag}.request.queue"), body.into())
            .await?
            .await?;
    }
    // a-0 holds; each cycle: the other asks (queued), the holder releases, the other is granted.
    client
        .publish(
            format!("{tag}.request.a"),
            r#"{"request_id":"a-0","priority":1}"#.into(),
        )
        .await?;
    let mut holder = granted(&mut replies, "a-0").await;
    let mut holder_svc = "a";
    let mut samples = Vec::with_capacity(CYCLES);
    let stages = common::batch_stages(&bench.http).await?;
    for i in 1..=CYCLES {
        let svc = if holder_svc == "a" { "b" } else { "a" };
        let id = format!("{svc}-{i}");
        client
            .publish(
                format!("{tag}.request.{svc}"),
                format!(r#"{{"request_id":"{id}","priority":1}}"#).into(),
            )
            .await?;
        // Queued behind the holder before the release is sent.
        loop {
            let msg = queued_events.next().await.expect("events");
            let event: serde_json::Value = serde_json::from_slice(&msg.payload)?;
            if event["request_id"] == id.as_str() {
                break;
            }
        }
        let start = Instant::now();
        client
            .publish(
                format!("{tag}.release.{holder_svc}"),
                format!(
                    r#"{{"request_id":"{}","fence":{}}}"#,
                    holder.request_id,
                    holder.fence.unwrap_or(0)
                )
                .into(),
            )
            .await?;
        holder = granted(&mut replies, &id).await;
        samples.push(start.elapsed());
        holder_svc = svc;
    }
    common::print_stage_means(
        &format!(
            "where the time went ({})",
            common::journal_mode(write_behind)
        ),
        &stages,
        &common::batch_stages(&bench.http).await?,
    );
    let _ = bench.stop().await;
    Ok(samples)
}

/// The next `granted` reply to `id`.
async fn granted(replies: &mut async_nats::Subscriber, id: &str) -> Reply {
    loop {
        let msg = replies.next().await.expect("replies");
        let reply: Reply = serde_json::from_slice(&msg.payload).expect("a reply");
        if reply.request_id == id && reply.outcome == Outcome::Granted {
            return reply;
        }
    }
}

async fn advisory_lock_handoff() -> anyhow::Result<Vec<Duration>> {
    // One connection each: an advisory lock belongs to the session that took it.
    let connect = || {
        let mut options =
            sea_orm::ConnectOptions::new("postgres://postgres@127.0.0.1:5432/postgres");
        options.max_connections(1).min_connections(1);
        Database::connect(options)
    };
    let (first, second) = (connect().await?, connect().await?);
    let lock = |on: &sea_orm::DatabaseConnection, sql: &'static str| {
        let on = on.clone();
        async move {
            on.execute(Statement::from_string(on.get_database_backend(), sql))
                .await
                .map(|_| ())
        }
    };
    lock(&first, "SELECT pg_advisory_lock(424242)").await?;
    let (mut holder, mut waiter) = (first, second);
    let mut samples = Vec::with_capacity(CYCLES);
    for _ in 0..CYCLES {
        let blocked = tokio::spawn({
            let waiter = waiter.clone();
            async move {
                lock(&waiter, "SELECT pg_advisory_lock(424242)").await?;
                Ok::<_, sea_orm::DbErr>(Instant::now())
            }
        });
        // Let the waiter block in the server.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        lock(&holder, "SELECT pg_advisory_unlock(424242)").await?;
        let acquired = blocked.await??;
        samples.push(acquired.saturating_duration_since(start));
        std::mem::swap(&mut holder, &mut waiter);
    }
    lock(&holder, "SELECT pg_advisory_unlock(424242)").await?;
    Ok(samples)
}

async fn redis_poll_handoff(every: Duration) -> anyhow::Result<Vec<Duration>> {
    let client = redis::Client::open("redis://127.0.0.1:6379")?;
    let mut holder = client.get_multiplexed_async_connection().await?;
    let waiter = client.get_multiplexed_async_connection().await?;
    let key = format!("handoff-bench-{}", std::process::id());
    let mut samples = Vec::with_capacity(CYCLES / 5);
    for _ in 0..CYCLES / 5 {
        let taken: bool = redis::cmd("SET")
            .arg(&key)
            .arg("holder")
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async::<Option<String>>(&mut holder)
            .await?
            .is_some();
        assert!(taken, "the lock is free between cycles");
        let polling = tokio::spawn({
            let (mut waiter, key) = (waiter.clone(), key.clone());
            async move {
                loop {
                    let got: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg("waiter")
                        .arg("NX")
                        .arg("PX")
                        .arg(30_000)
                        .query_async(&mut waiter)
                        .await?;
                    if got.is_some() {
                        return Ok::<_, redis::RedisError>(Instant::now());
                    }
                    tokio::time::sleep(every).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(15)).await;
        let start = Instant::now();
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut holder).await?;
        let acquired = polling.await??;
        samples.push(acquired.saturating_duration_since(start));
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut holder).await?;
    }
    Ok(samples)
}

// `File::lock` is newer than the crate's declared minimum Rust; benches run on the toolchain at hand.
#[allow(clippy::incompatible_msrv)]
fn flock_handoff() -> anyhow::Result<Vec<Duration>> {
    let path = std::env::temp_dir().join(format!("handoff-bench-{}.lock", std::process::id()));
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
    };
    let (holder, waiter) = (open()?, open()?);
    let mut samples = Vec::with_capacity(CYCLES);
    let (mut holder, mut waiter) = (holder, waiter);
    holder.lock()?;
    for _ in 0..CYCLES {
        let (tx, rx) = std::sync::mpsc::channel();
        let blocked = std::thread::spawn(move || {
            waiter.lock().expect("flock");
            let _ = tx.send(Instant::now());
            waiter
        });
        std::thread::sleep(Duration::from_millis(2));
        let start = Instant::now();
        holder.unlock()?;
        let acquired = rx.recv()?;
        samples.push(acquired.saturating_duration_since(start));
        let got = blocked.join().expect("the waiter thread");
        waiter = holder;
        holder = got;
    }
    holder.unlock()?;
    let _ = std::fs::remove_file(&path);
    Ok(samples)
}
