//! Free-GPU grant latency through a real NATS client against a running coordinator.
//!
//! Drives CYCLES request -> grant -> release cycles (a plain publish, as `nats pub` does) and prints the
//! latency from publishing the request to receiving the `granted` reply, p50/p99/max, beside two
//! references measured in the same run: one raw NATS request-reply round trip, one plain publish into a
//! JetStream stream delivered through a pull consumer (the path of every input), one Postgres insert
//! commit and one Redis SET; and the floor they add up to (two JetStream deliveries, a round trip, a
//! commit, a Redis write), with the grant's ratio to it.
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench grant_latency`.

mod common;

use std::time::{Duration, Instant};

use gpu_coordinator::config::Config;
use sea_orm::{ConnectionTrait, Database, Statement};

const CYCLES: usize = 2_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tag = format!("bench{}", std::process::id());
    let (commit_grant, commit_cycle, commit_library) = coordinator(&tag, false).await?;
    let (behind_grant, behind_cycle, behind_library) =
        coordinator(&format!("{tag}b"), true).await?;
    let config = Config::default();
    // Reference 1: a raw NATS request-reply round trip on the same server.
    let raw = common::round_trips(&tag, CYCLES).await?;
    // Reference 2: a plain publish into a JetStream stream, delivered through a pull consumer (the
    // path every input takes before the coordinator sees it).
    let inbound = common::deliveries(&tag, CYCLES, || Duration::ZERO).await?;
    // Reference 3: one Postgres insert commit (autocommit) on the coordinators' Postgres (their
    // databases are gone with them; a commit costs the same in any database of the cluster).
    let db = Database::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
    let table = format!("bench_commit_{tag}");
    db.execute_unprepared(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (id bigserial primary key, v text)"
    ))
    .await?;
    let mut commit = Vec::with_capacity(CYCLES);
    for i in 0..CYCLES {
        let start = Instant::now();
        db.execute(Statement::from_string(
            db.get_database_backend(),
            format!("INSERT INTO {table} (v) VALUES ('{i}')"),
        ))
        .await?;
        commit.push(start.elapsed());
    }
    db.execute_unprepared(&format!("DROP TABLE {table}"))
        .await?;
    // Reference 4: one Redis SET on the coordinator's Redis.
    let redis = redis::Client::open(config.redis.url.as_str())?;
    let mut conn = redis.get_multiplexed_async_connection().await?;
    let key = format!("{tag}:bench-set");
    let mut set = Vec::with_capacity(CYCLES);
    for i in 0..CYCLES {
        let start = Instant::now();
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(i)
            .query_async(&mut conn)
            .await?;
        set.push(start.elapsed());
    }
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
    // Reference 5: a JetStream publish with its PubAck awaited (what the write-behind journal waits
    // for instead of the commit).
    let stored = common::pubacks(&tag, CYCLES).await?;
    println!("grant latency, {CYCLES} cycles on one GPU (figures from this run):");
    println!("- the journal committed to Postgres (default):");
    let granted = common::percentiles("request -> granted reply", commit_grant);
    common::percentiles("request -> released reply (cycle)", commit_cycle);
    common::percentiles("the same through the client library", commit_library);
    println!("- Postgres written behind the journal stream (database.write_behind):");
    let behind = common::percentiles("request -> granted reply", behind_grant);
    common::percentiles("request -> released reply (cycle)", behind_cycle);
    common::percentiles("the same through the client library", behind_library);
    println!("- references:");
    let raw = common::percentiles("raw NATS request-reply", raw);
    let inbound = common::percentiles("JetStream publish -> pull delivery", inbound);
    let commit = common::percentiles("Postgres insert commit", commit);
    let set = common::percentiles("Redis SET", set);
    let stored = common::percentiles("JetStream publish, PubAck awaited", stored);
    // The floor of a grant, as the sum of its servers' p50s: the request's publish and the reply's,
    // each stored and delivered (2x JetStream), a NATS round trip, a Postgres commit, a Redis write.
    let floor = inbound * 2 + raw + commit + set;
    println!(
        "floor (2x JetStream + NATS request-reply + Postgres commit + Redis SET, p50s): {:.3} ms; \
         grant p50 / floor: {:.2}",
        floor.as_secs_f64() * 1e3,
        granted.as_secs_f64() / floor.as_secs_f64()
    );
    let floor_behind = inbound * 2 + raw + stored + set;
    println!(
        "floor written behind (the same, a PubAck in place of the commit): {:.3} ms; \
         grant p50 / floor: {:.2}",
        floor_behind.as_secs_f64() * 1e3,
        behind.as_secs_f64() / floor_behind.as_secs_f64()
    );
    Ok(())
}

/// The grant, cycle and client-library latencies of a coordinator under `tag`, its journal as
/// `write_behind` says.
async fn coordinator(
    tag: &str,
    write_behind: bool,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
    let bench = common::Bench::start_with(
        tag,
        Config::default().queue.max_per_service,
        1,
        write_behind,
    )
    .await?;
    let config = bench.config.clone();
    let (grant, cycle) = common::Cycles::new(&bench.client, tag)
        .await?
        .run(CYCLES)
        .await?;

    // The same, through the client library (a Rust service's path: the request published into
    // JetStream with its PubAck awaited, the reply read through a pull consumer), back to back.
    let library = gpu_coordinator_client::Client::connect(&config.nats.url, tag, "lib").await?;
    let mut through_library = Vec::with_capacity(CYCLES / 4);
    for _ in 0..CYCLES / 4 {
        let start = Instant::now();
        let lease = library
            .request(gpu_coordinator_client::RequestOptions::new(1))
            .await?;
        through_library.push(start.elapsed());
        lease.release().await?;
    }
    bench.stop().await?;
    Ok((grant, cycle, through_library))
}
