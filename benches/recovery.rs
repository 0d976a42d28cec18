//! Recovery and memory with a long queue: `gpu-coordinator serve` as its own process (release build)
//! on the machine's Postgres, Redis and NATS. A holder takes the GPU, QUEUED requests queue behind it;
//! then the process is killed with SIGKILL and started again, the holder's release is published at
//! once, and the time from the kill to the first queued request's grant is printed, with the
//! process's resident memory idle and with the queue. Beside the ingest, the bus's own ceiling: the
//! messages each queued request stored (its input, its `requested` and `queued` events, the
//! journal's share written behind) against the messages per second NATS alone stores and delivers.
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench recovery [-- QUEUED]`.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use gpu_coordinator_wire::{Outcome, Reply, StatusDoc, Subjects};

const SERVICES: usize = 20;

fn serve(tag: &str, queued: usize) -> anyhow::Result<common::Serving> {
    Ok(common::Serving(
        common::serve_command(tag)
            .env("GPU_COORDINATOR_QUEUE__MAX_PER_SERVICE", queued.to_string())
            .env(
                "RUST_LOG",
                std::env::var("GPU_BENCH_SERVE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()?,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let queued: usize = common::number_arg(100_000);
    let tag = format!("benchrec{}", std::process::id());
    let subjects = Subjects::new(&tag).map_err(anyhow::Error::msg)?;
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let mut child = serve(&tag, queued)?;
    common::wait_status(&client, &tag).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = common::rss_mb(child.id());

    let mut holder_replies = client.subscribe(subjects.reply("holder")).await?;
    let mut bulk_replies = client.subscribe(subjects.reply("svc0")).await?;
    client.flush().await?;
    let js = async_nats::jetstream::new(client.clone());
    js.publish(
        subjects.request("holder"),
        r#"{"request_id":"holder","priority":0,"lease_ms":3600000}"#.into(),
    )
    .await?
    .await?;
    let fence = loop {
        let msg = holder_replies.next().await.expect("replies");
        let reply: Reply = serde_json::from_slice(&msg.payload)?;
        if reply.outcome == Outcome::Granted {
            break reply.fence.expect("a fence");
        }
    };
    let stored = common::stored_messages(&client, &tag).await?;
    let fill = Instant::now();
    common::fill_queue(&js, &subjects, queued, SERVICES).await?;
    loop {
        let asked = client.request(subjects.status(), "".into());
        if let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_secs(2), asked).await {
            if serde_json::from_slice::<StatusDoc>(&msg.payload)?.queue_total as usize >= queued {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ingest = fill.elapsed().as_secs_f64();
    println!(
        "{queued} requests queued behind a holder, all handled {ingest:.2} s after the first was \
         published: {:.0} requests/s (status asked every 50 ms)",
        queued as f64 / ingest
    );
    let full = common::rss_mb(child.id());
    let per_request =
        (common::stored_messages(&client, &tag).await? - stored) as f64 / queued as f64;
    let ceiling = common::bus_ceiling(&client, &format!("{tag}c"), queued).await?;
    println!(
        "{per_request:.2} messages stored a queued request; the bus alone stores and delivers \
         {ceiling:.0} messages/s, so it allows {:.0} requests/s",
        ceiling / per_request
    );

    child.kill();
    let killed = Instant::now();
    let mut child = serve(&tag, queued)?;
    js.publish(
        subjects.release("holder"),
        format!(r#"{{"request_id":"holder","fence":{fence}}}"#).into(),
    )
    .await?
    .await?;
    // The head of the queue: the first request of priority 1, `q0` of `svc0`.
    let first = loop {
        let msg = bulk_replies.next().await.expect("replies");
        let reply: Reply = serde_json::from_slice(&msg.payload)?;
        if reply.outcome == Outcome::Granted {
            break killed.elapsed();
        }
    };
    let after = common::rss_mb(child.id());
    println!(
        "kill -9 with {queued} queued -> first grant after the restart: {:.0} ms",
        first.as_secs_f64() * 1e3
    );
    println!(
        "RSS of `serve`: {idle:.1} MB idle, {full:.1} MB with {queued} queued, {after:.1} MB after the restart"
    );
    child.kill();
    common::forget(&client, &tag).await;
    Ok(())
}
