//! A minimal chat-like service: asks for a GPU at priority 0, does its work, releases the GPU.
//!
//! `cargo run --example chat -- [NATS_URL] [PREFIX]`; without arguments, `$GPU_COORDINATOR_NATS__URL`
//! and `$GPU_COORDINATOR_NATS__PREFIX` (the coordinator's own), else `nats://127.0.0.1:4222` and `gpu`.

use std::time::Duration;

use gpu_coordinator_client::{Client, ClientError, RequestOptions};

/// The argument at `position`, else the environment variable `env`, else `default`.
fn setting(position: usize, env: &str, default: &str) -> String {
    std::env::args()
        .nth(position)
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt::init();
    let url = setting(1, "GPU_COORDINATOR_NATS__URL", "nats://127.0.0.1:4222");
    let prefix = setting(2, "GPU_COORDINATOR_NATS__PREFIX", "gpu");
    let client = Client::connect(&url, &prefix, "chat").await?;

    // Priority 0 preempts background work and is never preempted itself.
    let options = RequestOptions::new(0).vram_mb(8_000).timeout_ms(10_000);
    let lease = match client.request(options).await {
        Ok(lease) => lease,
        Err(ClientError::TimedOut) => {
            eprintln!("no GPU within 10 s; try again later");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let waited = lease.waited().unwrap_or_default();
    println!(
        "granted {} (fence {}) after {waited:?}",
        lease.gpu(),
        lease.fence()
    );

    // The work, a stand-in for generating an answer; it stops at once if the lease is revoked.
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(3)) => println!("answer generated"),
        () = lease.revoked() => {
            eprintln!("the lease was revoked: answer dropped");
            return Ok(());
        }
    }
    lease.release().await?;
    println!("released");
    Ok(())
}
