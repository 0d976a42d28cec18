//! The timed requests (a small completion, a stream to its first chunk) and the quantiles the parts
//! print.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub(super) fn small_body(stream: bool) -> Value {
    json!({"model": "m", "prompt": "hello", "max_tokens": 8, "stream": stream})
}

/// One small non-streamed completion at `base`, timed to the end of its body.
pub(super) async fn small(client: &reqwest::Client, base: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let response = client
        .post(format!("{base}/v1/completions"))
        .json(&small_body(false))
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    let took = start.elapsed();
    anyhow::ensure!(
        status.is_success(),
        "{base}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(took)
}

/// One streamed request of `body` to `url`, timed from the send to its first body chunk; the rest is
/// read to the end, so that the connection is kept for the next one.
pub(super) async fn first_chunk(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut response = client.post(url).json(body).send().await?;
    let status = response.status();
    let mut first = None;
    let mut text = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if first.is_none() && !chunk.is_empty() {
            first = Some(start.elapsed());
        }
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text);
    anyhow::ensure!(status.is_success(), "{url}: {status} {text}");
    anyhow::ensure!(
        text.contains("[DONE]"),
        "{url}: the stream ended early: {text}"
    );
    first.ok_or_else(|| anyhow::anyhow!("{url}: an empty stream"))
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p` quantile of `samples` (ms), nearest rank; what is not a number (a figure a round could
/// not read) is left out.
pub(super) fn quantile(samples: &[f64], p: f64) -> f64 {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Prints p50/p90/p99 of `samples` (ms) after `name`; answers the p50.
pub(super) fn line(name: &str, samples: &[f64]) -> f64 {
    println!(
        "{name:<52} n={:<5} p50={:>8.3} ms  p90={:>8.3} ms  p99={:>8.3} ms",
        samples.iter().filter(|v| v.is_finite()).count(),
        quantile(samples, 0.50),
        quantile(samples, 0.90),
        quantile(samples, 0.99),
    );
    quantile(samples, 0.50)
}

/// How many samples (ms) took 30 ms or more: a chunk that waited for a delayed ACK (40 ms).
pub(super) fn stalls(samples: &[f64]) -> usize {
    samples.iter().filter(|t| **t >= 30.0).count()
}
