//! Takeover after `kill -9` of the leader: two `gpu-coordinator serve` processes of one prefix, the
//! leader killed, and the time from the kill to the first grant of a request published right after it.
//! Repeated ROUNDS times (the survivor leads the next round beside a fresh standby); prints p50 and max.
//!
//! Needs Postgres, Redis and NATS on loopback: `cargo bench --bench takeover`.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpu_coordinator_wire::{Reply, StatusDoc};

const ROUNDS: usize = 10;

/// A coordinator process of the bench's prefix.
fn serve(tag: &str) -> common::Serving {
    let child = common::serve_command(tag)
        .env("RUST_LOG", "error")
        .stderr(Stdio::null())
        .spawn()
        .expect("start gpu-coordinator serve");
    common::Serving(child)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tag = format!("takeover{}", std::process::id());
    let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    let mut replies = client.subscribe(format!("{tag}.reply.bench")).await?;
    let mut leader = serve(&tag);
    // The first one leads once it answers status; the second stands by.
    loop {
        let asked = client.request(format!("{tag}.status"), "".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), asked).await {
            break;
        }
    }
    let mut standby = serve(&tag);
    let mut samples = Vec::new();
    for round in 0..ROUNDS {
        // The leader lists the standby once it stands by.
        loop {
            let asked = client.request(format!("{tag}.status"), "".into());
            if let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_millis(500), asked).await {
                let doc: StatusDoc = serde_json::from_slice(&msg.payload)?;
                let mine = format!("-{}-", standby.id());
                if doc
                    .leader
                    .is_some_and(|l| l.standbys.iter().any(|h| h.contains(&mine)))
                {
                    break;
                }
            }
        }
        leader.kill();
        let killed = Instant::now();
        let id = format!("r{round}");
        let body =
            format!(r#"{{"request_id":"{id}","priority":1,"vram_mb":100,"lease_ms":600000}}"#);
        client
            .publish(format!("{tag}.request.bench"), body.into())
            .await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), replies.next())
                .await?
                .expect("replies");
            let reply: Reply = serde_json::from_slice(&msg.payload)?;
            if reply.request_id == id {
                samples.push(killed.elapsed());
                let release = format!(r#"{{"request_id":"{id}"}}"#);
                client
                    .publish(format!("{tag}.release.bench"), release.into())
                    .await?;
                break;
            }
        }
        leader = std::mem::replace(&mut standby, serve(&tag));
    }
    drop((leader, standby));
    samples.sort();
    println!(
        "first grant after kill -9 of the leader, {} kills: p50 {:.0} ms, max {:.0} ms (leader.ttl_ms 1000)",
        samples.len(),
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
    );
    Ok(())
}
