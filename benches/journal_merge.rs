//! Merging journal batches, as the write-behind journal does when it reads the journal stream back at a
//! takeover and when Postgres comes back after batches waited for it: `N` batches of 20 requests each
//! merged as they come (one index of the request rows, kept), beside the same batches merged two at a
//! time with `Rows::then` (an index built afresh at each batch, as the merge did before). No server.
//!
//! `cargo bench --bench journal_merge [-- N]` (default 2,000).

mod common;

use std::time::Instant;

use gpu_coordinator::adapters::postgres::{Merged, Rows};

fn main() -> anyhow::Result<()> {
    let batches: usize = common::number_arg(2_000);
    let row = |id: String| -> anyhow::Result<_> {
        Ok(serde_json::from_value(serde_json::json!({
            "request_id": id, "service_id": "svc", "priority": 1, "seq": 1, "encoding": "json",
            "preemptible": true, "lease_ms": 30_000, "requested_at": 1, "timeout_at": 2,
            "phase": "queued",
        }))?)
    };
    let mut all = Vec::with_capacity(batches);
    for b in 0..batches {
        all.push(Rows {
            requests: (0..20)
                .map(|i| row(format!("r{b}-{i}")))
                .collect::<anyhow::Result<_>>()?,
            ..Rows::default()
        });
    }

    let start = Instant::now();
    let mut merged = Merged::default();
    for batch in all.clone() {
        merged.push(batch);
    }
    let merged = merged.into_rows();
    let as_they_come = start.elapsed();

    let start = Instant::now();
    let mut pairwise = Rows::default();
    for batch in all {
        pairwise.then(batch);
    }
    let two_at_a_time = start.elapsed();

    assert_eq!(merged, pairwise, "both merges leave the same rows");
    println!(
        "{batches} batches of 20 requests ({} rows): merged as they come {:.1} ms; two at a time \
         {:.1} ms ({:.0}x)",
        merged.requests.len(),
        as_they_come.as_secs_f64() * 1e3,
        two_at_a_time.as_secs_f64() * 1e3,
        two_at_a_time.as_secs_f64() / as_they_come.as_secs_f64()
    );
    Ok(())
}
