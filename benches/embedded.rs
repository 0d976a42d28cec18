//! The embedded mode as a single-box user runs it: `gpu-coordinator serve --embedded` as its own
//! process (release build), driven over HTTP. Prints the free-GPU grant latency (POST /gpu/request ->
//! `granted`, then a release, CYCLES times), the process's resident memory idle and after the cycles,
//! and, measured in the same run, the floor of the path: one SQLite insert commit in WAL mode with
//! `synchronous = FULL` (a grant takes three: the input, the journal batch, the outputs).
//!
//! Needs no server: `cargo bench --bench embedded [-- CYCLES]`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sea_orm::sqlx::{ConnectOptions as _, Connection as _, Executor as _};
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cycles: usize = common::number_arg(2_000);
    let dir = std::env::temp_dir().join(format!("gpu-bench-embedded-{}", std::process::id()));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .args(["serve", "--embedded", "--data-dir"])
        .arg(&dir)
        .env("GPU_COORDINATOR_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("GPU_COORDINATOR_NVML__ENABLED", "false")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(res) = http.get(format!("{base}/gpu/status")).send().await {
            if res.status().is_success() {
                break;
            }
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "no status");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "machine: {} cores; data directory {}",
        std::thread::available_parallelism()?,
        dir.display()
    );
    println!(
        "first status {:.0} ms after the start",
        started.elapsed().as_secs_f64() * 1e3
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = common::rss_mb(child.id());

    let mut grants = Vec::with_capacity(cycles);
    let mut whole = Vec::with_capacity(cycles);
    for i in 0..cycles {
        let start = Instant::now();
        let granted: Value = http
            .post(format!("{base}/gpu/request"))
            .json(&json!({"service_id": "bench", "request_id": format!("r{i}"), "priority": 1}))
            .send()
            .await?
            .json()
            .await?;
        grants.push(start.elapsed());
        anyhow::ensure!(granted["outcome"] == "granted", "{granted}");
        let released: Value = http
            .post(format!("{base}/gpu/release"))
            .json(
                &json!({"service_id": "bench", "request_id": format!("r{i}"),
                          "fence": granted["fence"]}),
            )
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(released["outcome"] == "released", "{released}");
        whole.push(start.elapsed());
    }
    let after = common::rss_mb(child.id());
    common::percentiles("embedded: HTTP request -> granted", grants);
    common::percentiles("embedded: request -> granted -> released", whole);

    // The floor, in the same run: one insert commit with the coordinator's settings.
    let floor_file = dir.join("floor.db");
    let mut conn = SqliteConnectOptions::new()
        .filename(&floor_file)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await?;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, v BLOB)")
        .await?;
    let mut commits = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        let start = Instant::now();
        conn.execute("INSERT INTO t (v) VALUES (x'00112233')")
            .await?;
        commits.push(start.elapsed());
    }
    conn.close().await?;
    common::percentiles("floor: SQLite insert commit (WAL, FULL)", commits);
    println!("RSS of `serve --embedded`: {idle:.1} MB idle, {after:.1} MB after {cycles} cycles");

    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
