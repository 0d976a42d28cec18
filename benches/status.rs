//! The status document with a long queue: how long `<prefix>.status` (NATS), `GET /gpu/status` and
//! `GET /metrics` take, and how large the document is, with QUEUED requests waiting.
//!
//! Starts a coordinator of its own on the shared servers, holds its one GPU, queues QUEUED requests
//! from 20 services (a plain JetStream publish each), waits until all are queued, then asks ROUNDS
//! times each way and prints p50/p99/max. Removes its streams and database at the end.
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench status` (`-- 20000` for another
//! queue length).

mod common;

use std::time::{Duration, Instant};

use gpu_coordinator_wire::{StatusDoc, Subjects};

const ROUNDS: usize = 200;
const SERVICES: usize = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let queued: usize = common::number_arg(100_000);
    let tag = format!("benchstatus{}", std::process::id());
    let bench = common::Bench::start(&tag, queued).await?;
    let (http, client) = (bench.http.clone(), bench.client.clone());
    let subjects = Subjects::new(&tag).map_err(anyhow::Error::msg)?;
    let status = |body: &'static str| {
        let client = client.clone();
        let subject = subjects.status();
        async move {
            let msg = client.request(subject, body.into()).await?;
            anyhow::Ok(serde_json::from_slice::<StatusDoc>(&msg.payload)?)
        }
    };

    // The GPU is held, so that everything after it queues.
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        subjects.request("holder"),
        r#"{"request_id":"holder","priority":0,"lease_ms":3600000}"#.into(),
    )
    .await?
    .await?;
    let fill = Instant::now();
    common::fill_queue(&js, &subjects, queued, SERVICES).await?;
    let published = fill.elapsed();
    loop {
        // While the coordinator works through the inputs a status question may wait its turn.
        if let Ok(doc) = status("").await {
            if doc.queue_total as usize >= queued {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "{queued} requests queued: published in {:.1} s, all handled after {:.1} s",
        published.as_secs_f64(),
        fill.elapsed().as_secs_f64()
    );

    let http_client = reqwest::Client::new();
    let mut over_nats = Vec::with_capacity(ROUNDS);
    let mut over_http = Vec::with_capacity(ROUNDS);
    let mut metrics = Vec::with_capacity(ROUNDS);
    let mut size = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let msg = client.request(subjects.status(), "".into()).await?;
        over_nats.push(start.elapsed());
        size = msg.payload.len();
        let start = Instant::now();
        let body = http_client
            .get(format!("{http}/gpu/status"))
            .send()
            .await?
            .bytes()
            .await?;
        over_http.push(start.elapsed());
        anyhow::ensure!(!body.is_empty());
        let start = Instant::now();
        http_client
            .get(format!("{http}/metrics"))
            .send()
            .await?
            .bytes()
            .await?;
        metrics.push(start.elapsed());
    }
    println!("status with {queued} queued (document {size} bytes, figures from this run):");
    common::percentiles("<prefix>.status over NATS", over_nats);
    common::percentiles("GET /gpu/status", over_http);
    common::percentiles("GET /metrics", metrics);

    bench.stop().await?;
    Ok(())
}
