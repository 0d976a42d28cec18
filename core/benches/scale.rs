//! How an input's cost grows with the queue: `cargo bench -p gpu-coordinator-core --bench scale`.
//!
//! Queues n requests behind a holder, then times single inputs: a new request at the tail, a cancel
//! in the middle, a release that grants the head, a timeout firing; and a restart's restore of the
//! queue's records into a new scheduler. The module docs promise O(log n)
//! per input; the figures for 1,000 and 100,000 queued requests, and their ratio, show it.
//!
//! Two shapes: one GPU; and two GPUs where every queued request is too big for the smaller one, which
//! stays open during the scheduling pass.

use std::hint::black_box;
use std::time::{Duration, Instant};

use gpu_coordinator_core::{GpuSpec, Input, Millis, SchedConfig, Scheduler, Snapshot};
use gpu_coordinator_wire::{CancelMsg, Encoding, Inbound, ReleaseMsg, RequestMsg};

/// Inputs timed of each kind.
const M: usize = 1_000;
const T0: Millis = 1_700_000_000_000;
/// Queued requests never time out on their own during the run.
const NEVER_MS: u64 = 1_000_000_000;

struct Bench {
    sched: Scheduler,
    now: Millis,
    actions: usize,
}

impl Bench {
    fn input(&mut self, service: &str, input: Inbound) {
        self.sched.handle_input(
            Input::Inbound {
                service: service.to_string(),
                encoding: Encoding::Json,
                input,
            },
            self.now,
        );
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(action) = self.sched.poll_action() {
            black_box(action);
            self.actions += 1;
        }
    }

    fn request(
        &mut self,
        service: &str,
        id: &str,
        priority: u8,
        vram_mb: Option<u64>,
        timeout_ms: u64,
    ) {
        let msg = RequestMsg {
            request_id: Some(id.to_string()),
            service_id: Some(service.to_string()),
            priority,
            timeout_ms: Some(timeout_ms),
            lease_ms: Some(3_600_000),
            vram_mb,
            gpu: None,
            preemptible: Some(false),
            pause_ms: None,
        };
        self.input(service, Inbound::Request(msg));
    }
}

struct Shape {
    name: &'static str,
    gpus: &'static [(&'static str, u64)],
    /// VRAM of the holder and of every queued request.
    holder_mb: u64,
    queued_mb: u64,
}

/// Time per input of each kind, the setup, and a restart's restore of the same queue.
struct Figures {
    setup: Duration,
    restore: Duration,
    kinds: Vec<(&'static str, Duration)>,
}

fn run(shape: &Shape, n: usize) -> Figures {
    let config = || SchedConfig {
        lease_max_ms: 3_600_000,
        default_timeout_ms: NEVER_MS,
        retain_ended: 10_000,
        // One service queues them all.
        max_per_service: usize::MAX,
        ..SchedConfig::default()
    };
    let gpus = || -> Vec<GpuSpec> {
        shape
            .gpus
            .iter()
            .map(|&(id, total_mb)| GpuSpec {
                id: id.to_string().into(),
                total_mb,
            })
            .collect()
    };
    let mut b = Bench {
        sched: Scheduler::new(config(), gpus()),
        now: T0,
        actions: 0,
    };
    let vram = Some(shape.queued_mb);

    // The holder, then n requests behind it at priorities 1-3, and M in the middle (priority 2) that
    // time out one per millisecond.
    let start = Instant::now();
    b.request("hold", "h0", 0, Some(shape.holder_mb), NEVER_MS);
    for i in 0..n {
        b.request("svc", &format!("q{i}"), 1 + (i % 3) as u8, vram, NEVER_MS);
    }
    for j in 0..M {
        b.request("svc", &format!("t{j}"), 2, vram, 60_000 + j as u64);
    }
    let setup = start.elapsed();
    assert_eq!(b.sched.live_count(), n + M + 1);

    // What a restart does with the same queue: the records as the journal returns them, restored.
    let ids = std::iter::once("h0".to_string())
        .chain((0..n).map(|i| format!("q{i}")))
        .chain((0..M).map(|j| format!("t{j}")));
    let snapshot = Snapshot {
        requests: ids
            .map(|id| b.sched.record(&id).expect("a live request").clone())
            .collect(),
        max_fence: b.sched.last_fence(),
        leases: b.sched.leases(),
        max_arrival: (n + M + 1) as u64,
    };
    let mut restarted = Scheduler::new(config(), gpus());
    let start = Instant::now();
    restarted.restore(snapshot, b.now);
    let restore = start.elapsed();
    assert_eq!(restarted.live_count(), n + M + 1);
    drop(restarted);
    let mut kinds = Vec::new();

    // A new request at the tail.
    let start = Instant::now();
    for k in 0..M {
        b.request("svc", &format!("tail{k}"), 3, vram, NEVER_MS);
    }
    kinds.push(("request at the tail", start.elapsed() / M as u32));

    // A cancel in the middle of the queue.
    let start = Instant::now();
    for k in 0..M {
        let id = format!("q{}", n / 2 + k - M / 2);
        b.input("svc", Inbound::Cancel(CancelMsg { request_id: id }));
    }
    kinds.push(("cancel in the middle", start.elapsed() / M as u32));

    // A timeout firing: one request each millisecond.
    let start = Instant::now();
    for j in 0..M {
        b.now = T0 + 60_000 + j as u64;
        b.sched.handle_timeout(b.now);
        b.drain();
    }
    kinds.push(("timeout firing", start.elapsed() / M as u32));
    assert_eq!(b.sched.live_count(), n + M + 1 + M - M - M);

    // A release that grants the head: each holder in turn releases, the next is granted.
    let mut holder = ("hold".to_string(), "h0".to_string());
    let granted_before = b.sched.last_fence();
    let start = Instant::now();
    for _ in 0..M {
        b.now += 1;
        b.input(
            &holder.0,
            Inbound::Release(ReleaseMsg {
                request_id: Some(holder.1.clone()),
                fence: None,
            }),
        );
        let head = b
            .sched
            .leases()
            .into_iter()
            .next()
            .expect("the head was granted");
        holder = (head.service_id.into_string(), head.request_id.into_string());
    }
    kinds.push(("release granting the head", start.elapsed() / M as u32));
    assert!(b.sched.last_fence().0 >= granted_before.0 + M as u64);
    black_box(b.actions);
    Figures {
        setup,
        restore,
        kinds,
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One line of the table: `label`, then `value` of `part` of each size's figures, with `decimals`.
fn print_row(
    label: &str,
    figures: &[(usize, Figures)],
    part: impl Fn(&Figures) -> Duration,
    (value, decimals): (impl Fn(usize, Duration) -> f64, usize),
) {
    print!("{label:<28}");
    for (n, f) in figures {
        print!("{:>14.decimals$}", value(*n, part(f)));
    }
    println!();
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter may follow.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let sizes: Vec<usize> = std::env::var("SCALE_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 100_000]);
    let shapes = [
        Shape {
            name: "one GPU",
            gpus: &[("g0", 80_000)],
            holder_mb: 80_000,
            queued_mb: 40_000,
        },
        Shape {
            name: "two GPUs, the small one unusable by the queue",
            gpus: &[("big", 80_000), ("small", 24_000)],
            holder_mb: 80_000,
            queued_mb: 40_000,
        },
    ];
    for shape in &shapes {
        if filter
            .as_ref()
            .is_some_and(|f| !shape.name.contains(f.as_str()))
        {
            continue;
        }
        println!(
            "\n{} — µs per input ({M} inputs of each kind: the same figure is their total in ms)",
            shape.name
        );
        let figures: Vec<(usize, Figures)> = sizes.iter().map(|&n| (n, run(shape, n))).collect();
        print!("{:<28}", "queued");
        for (n, _) in &figures {
            print!("{:>14}", n);
        }
        if figures.len() > 1 {
            print!("{:>10}", "ratio");
        }
        println!();
        let first = &figures[0].1;
        let last = &figures[figures.len() - 1].1;
        for (k, (kind, _)) in first.kinds.iter().enumerate() {
            print!("{kind:<28}");
            for (_, f) in &figures {
                print!("{:>14.2}", us(f.kinds[k].1));
            }
            if figures.len() > 1 {
                print!("{:>9.1}x", us(last.kinds[k].1) / us(first.kinds[k].1));
            }
            println!();
        }
        let per_request = (|n: usize, d: Duration| us(d) / (n + M + 1) as f64, 2);
        let total_ms = (|_: usize, d: Duration| d.as_secs_f64() * 1e3, 1);
        print_row("setup per request", &figures, |f| f.setup, per_request);
        print_row("setup total (ms)", &figures, |f| f.setup, total_ms);
        print_row("restore per request", &figures, |f| f.restore, per_request);
        print_row("restore total (ms)", &figures, |f| f.restore, total_ms);
    }
}
