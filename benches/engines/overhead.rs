//! Parts 1 and 2: the sidecar's overhead on a small request, and on the time to a stream's first
//! chunk, each beside direct calls to the same fake engine.

use std::time::Duration;

use gpu_coordinator_test_support::engines::FakeGpu;

use crate::measure::{first_chunk, line, ms, quantile, small, small_body, stalls};
use crate::relay::nodelay_front;
use crate::setup::{engine, fake, Running};
use crate::{Mode, Row, GOAL_FIRST_CHUNK_MS, GOAL_OVERHEAD_MS, GPU_MB};

/// Parts 1 and 2: one coordinator, three sidecars held awake: one in front of an engine that answers
/// at once (part 1), two in front of engines that stream their first token 10 ms after their headers,
/// one of them as the fakes serve (Nagle's algorithm on) and one behind [`nodelay_front`] (part 2).
pub(super) async fn proxy_overhead(
    mode: Mode,
    tag: &str,
    n: usize,
    streams: usize,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let gpu = FakeGpu::start(GPU_MB).await;
    // chunks 0: the answer is made at once (each chunk, even 0 ms apart, is a tokio sleep that
    // ends on the timer's next 1 ms tick).
    let quick = fake(&gpu, "quick", 1_000, 0, Duration::ZERO).await;
    let raw = fake(&gpu, "raw", 1_000, 1, Duration::from_millis(10)).await;
    let fronted = fake(&gpu, "fronted", 1_000, 1, Duration::from_millis(10)).await;
    let fronted_url = nodelay_front(&fronted.url()).await?;
    let sidecars = vec![
        engine("quick", &quick.url(), 1, 1_000),
        engine("raw", &raw.url(), 1, 1_000),
        engine("fronted", &fronted_url, 1, 1_000),
    ];
    let proxies: Vec<String> = sidecars
        .iter()
        .map(|s| format!("http://{}", s.listen))
        .collect();
    let coordinator = Running::start(tag, mode, sidecars, &gpu, 1_000).await?;
    let direct = reqwest::Client::new();
    let proxied = reqwest::Client::new();
    // The first request through each sidecar asks for the GPU and wakes its engine; from then on the
    // lease is held (idle_ms is an hour).
    small(&proxied, &proxies[0]).await?;
    for proxy in &proxies[1..] {
        let url = format!("{proxy}/v1/completions");
        first_chunk(&proxied, &url, &small_body(true)).await?;
    }
    anyhow::ensure!(
        quick.awake() && raw.awake() && fronted.awake(),
        "the engines are awake"
    );

    let clients = Clients { direct, proxied };
    clients
        .small_requests(&quick.url(), &proxies[0], n, rows)
        .await?;
    // 2. Streamed, to the first chunk: the headline against the engine that answers as a real
    // server does; then the fake as it is served, whose own Nagle stalls the direct path.
    for (what, engine_url, proxy, goal) in [
        (
            "engine with TCP_NODELAY (the fake behind the relay)",
            fronted_url.clone(),
            &proxies[2],
            true,
        ),
        (
            "the fake as served (Nagle on)",
            raw.url(),
            &proxies[1],
            false,
        ),
    ] {
        let urls = (
            format!("{engine_url}/v1/completions"),
            format!("{proxy}/v1/completions"),
        );
        let first = FirstChunk {
            what,
            goal,
            streams,
        };
        clients.first_chunks(&first, &urls, rows).await?;
    }
    clients.spaced_first_chunks(&proxies[2], streams).await?;
    anyhow::ensure!(
        [&quick, &raw, &fronted]
            .iter()
            .all(|e| e.refused_asleep() == 0),
        "nothing reached an engine asleep"
    );
    coordinator.stop().await
}

/// The two sides of a comparison, each on a keep-alive connection of its own.
struct Clients {
    /// Straight to the engine.
    direct: reqwest::Client,
    /// Through the sidecar.
    proxied: reqwest::Client,
}

/// One engine of part 2: what it is, whether it is held to the goal, and how many streams.
struct FirstChunk {
    what: &'static str,
    goal: bool,
    streams: usize,
}

impl Clients {
    /// Part 1, small requests: `n` to `engine` and through `proxy`, interleaved, after a warm-up of
    /// each connection.
    async fn small_requests(
        &self,
        engine: &str,
        proxy: &str,
        n: usize,
        rows: &mut Vec<Row>,
    ) -> anyhow::Result<()> {
        let (direct, proxied) = (&self.direct, &self.proxied);
        for _ in 0..100 {
            small(direct, engine).await?;
            small(proxied, proxy).await?;
        }
        let (mut straight, mut through) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            straight.push(ms(small(direct, engine).await?));
            through.push(ms(small(proxied, proxy).await?));
        }
        println!(
            "\n1. small non-streamed POST /v1/completions (fake vLLM answering at once: chunk_delay 0, no tokens), interleaved"
        );
        let a = line("direct to the engine", &straight);
        let b = line("through the sidecar", &through);
        let diffs: Vec<f64> = through.iter().zip(&straight).map(|(t, s)| t - s).collect();
        line("pairwise difference (proxied - direct)", &diffs);
        println!("p50 difference: {:+.3} ms", b - a);
        rows.push(Row {
            figure: "proxy overhead per small request, p50".into(),
            goal: format!("<= {GOAL_OVERHEAD_MS} ms above direct"),
            measured: format!("{:+.3} ms (direct {a:.3}, proxied {b:.3} ms; n={n})", b - a),
            met: Some(b - a <= GOAL_OVERHEAD_MS),
        });
        Ok(())
    }

    /// Part 2 for one engine: streamed completions to `urls` (the engine's, the sidecar's), timed to
    /// their first chunk, interleaved, after a warm-up.
    async fn first_chunks(
        &self,
        first: &FirstChunk,
        (engine_url, proxy_url): &(String, String),
        rows: &mut Vec<Row>,
    ) -> anyhow::Result<()> {
        let (direct, proxied) = (&self.direct, &self.proxied);
        let FirstChunk {
            what,
            goal,
            streams,
        } = *first;
        let body = small_body(true);
        for _ in 0..20 {
            first_chunk(direct, engine_url, &body).await?;
            first_chunk(proxied, proxy_url, &body).await?;
        }
        let (mut straight, mut through) =
            (Vec::with_capacity(streams), Vec::with_capacity(streams));
        for _ in 0..streams {
            straight.push(ms(first_chunk(direct, engine_url, &body).await?));
            through.push(ms(first_chunk(proxied, proxy_url, &body).await?));
        }
        println!(
            "\n2. time to the first chunk of a streamed completion (first token 10 ms after the \
             headers), {what}, interleaved"
        );
        let a = line("direct to the engine", &straight);
        let b = line("through the sidecar", &through);
        let (a90, b90) = (quantile(&straight, 0.9), quantile(&through, 0.9));
        println!(
            "p50 difference {:+.3} ms, p90 difference {:+.3} ms; 30 ms or more: {} direct, {} proxied",
            b - a,
            b90 - a90,
            stalls(&straight),
            stalls(&through)
        );
        rows.push(Row {
            figure: format!("time to first streamed chunk, {what}, p50 / p90"),
            goal: format!("<= {GOAL_FIRST_CHUNK_MS} ms above direct"),
            measured: format!(
                "{:+.3} / {:+.3} ms (direct {a:.3} / {a90:.3}, proxied {b:.3} / {b90:.3} ms; n={streams})",
                b - a,
                b90 - a90
            ),
            met: goal.then_some(b - a <= GOAL_FIRST_CHUNK_MS),
        });
        Ok(())
    }

    /// The same through the sidecar at `proxy`, each request more than the kernel's delayed-ACK time
    /// (40 ms) after the last answer: the client's connection then leaves its request-response mode
    /// and acknowledges the headers at once, so a stall above is Nagle's on the sidecar's socket.
    async fn spaced_first_chunks(&self, proxy: &str, streams: usize) -> anyhow::Result<()> {
        let body = small_body(true);
        let proxy_url = format!("{proxy}/v1/completions");
        let spaced_n = streams.min(100);
        let mut spaced = Vec::with_capacity(spaced_n);
        for _ in 0..spaced_n {
            tokio::time::sleep(Duration::from_millis(60)).await;
            spaced.push(ms(first_chunk(&self.proxied, &proxy_url, &body).await?));
        }
        line(
            "through the sidecar, each 60 ms after the last answer",
            &spaced,
        );
        println!("30 ms or more: {} of {spaced_n}", stalls(&spaced));
        Ok(())
    }
}
