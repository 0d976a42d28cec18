//! A minimal preemptible worker at priority 2: works in chunks, frees the GPU when paused, reloads
//! when resumed. `cargo run --example worker -- [NATS_URL] [PREFIX]` (defaults as in `chat.rs`).

use std::{sync::Arc, time::Duration};

use gpu_coordinator_client::{Client, RequestOptions, Worker};
use tokio::sync::Mutex;

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
    let client = Client::connect(&url, &prefix, "transcriber").await?;

    // The model in VRAM, `None` while paused. A chunk holds the lock: `on_pause` waits for it.
    let model: Arc<Mutex<Option<String>>> = Arc::default();
    let (on_pause, on_resume) = (model.clone(), model.clone());
    let worker = Worker::new(&client)
        .on_pause(move |order| {
            let model = on_pause.clone();
            async move {
                model.lock().await.take(); // frees the VRAM; the ACK follows when this returns
                println!("paused: {}", order.reason);
            }
        })
        .on_resume(move |order| {
            let model = on_resume.clone();
            async move {
                *model.lock().await = Some(format!("model on {}", order.gpu));
                println!("resumed on {} with fence {}", order.gpu, order.fence);
            }
        });
    let options = RequestOptions::new(2).vram_mb(4_000);
    let lease = worker.request(options).await?;
    *model.lock().await = Some(format!("model on {}", lease.gpu()));

    for chunk in 0..20 {
        // Waits while paused (an error once revoked), then holds the model for one chunk.
        let _model = loop {
            lease.active().await?;
            let guard = model.lock().await;
            if guard.is_some() {
                break guard; // else it was paused meanwhile
            }
        };
        tokio::time::sleep(Duration::from_millis(500)).await; // the chunk's work on the GPU
        println!("chunk {chunk} done under fence {}", lease.fence());
    }
    lease.release().await?;
    Ok(())
}
