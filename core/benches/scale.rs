//! How an input's cost grows with the queue: `cargo bench -p gpu-coordinator-core --bench scale`.
//!
//! Queues n requests behind a holder, then times single inputs: a new request at the tail, a cancel
//! in the middle, a release that grants the head, a timeout firing; and a restart's restore of the
//! queue's records into a new scheduler. The module docs promise O(log n)
//! per input; the figures for 1,000 and 100,000 queued requests, and their ratio, show it.
//!
//! Two shapes: one GPU; and two GPUs where every queued request is too big for the smaller one, which
//! stays open during the scheduling pass.
//!
//! And `[services.<id>]` quotas (filter `services`): 100 services on 4 GPUs, each holding a lease and
//! with its share of the queue, timed without quotas, with a guarantee and a cap for each service
//! (half of them at their cap), and with guarantees above what each holds (every service under its
//! guarantee, so the guarantees' pass looks at each one every input), in the same run, with ratios.

use std::hint::black_box;
use std::time::{Duration, Instant};

use gpu_coordinator_core::{
    Action, GpuSpec, Input, Millis, SchedConfig, Scheduler, ServicePolicies, ServicePolicy,
    Snapshot,
};
use gpu_coordinator_wire::{CancelMsg, Encoding, Inbound, Outcome, ReleaseMsg, RequestMsg};

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

    /// [`Bench::drain`], keeping the first granted reply's service and request id.
    fn drain_granted(&mut self) -> Option<(String, String)> {
        let mut granted = None;
        while let Some(action) = self.sched.poll_action() {
            if let Action::Reply { service, reply, .. } = &action {
                if reply.outcome == Outcome::Granted && granted.is_none() {
                    granted = Some((service.to_string(), reply.request_id.to_string()));
                }
            }
            black_box(action);
            self.actions += 1;
        }
        granted
    }

    fn request(
        &mut self,
        service: &str,
        id: &str,
        priority: u8,
        vram_mb: Option<u64>,
        timeout_ms: u64,
    ) {
        self.input(
            service,
            Inbound::Request(request_msg(service, id, priority, vram_mb, timeout_ms)),
        );
    }
}

/// A request that never pauses (no preemption churn in the figures).
fn request_msg(
    service: &str,
    id: &str,
    priority: u8,
    vram_mb: Option<u64>,
    timeout_ms: u64,
) -> RequestMsg {
    RequestMsg {
        host: None,
        request_id: Some(id.to_string()),
        service_id: Some(service.to_string()),
        priority,
        timeout_ms: Some(timeout_ms),
        lease_ms: Some(3_600_000),
        vram_mb,
        gpu: None,
        preemptible: Some(false),
        pause_ms: None,
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

/// Services of the quota bench.
const SERVICES: usize = 100;
/// What each service holds, and what each queued request asks for, in MB.
const LEASE_MB: u64 = 3_200;

/// 100 services on 4 GPUs of 80,000 MB, each holding one lease of 3,200 MB (the GPUs are full), and n
/// requests queued behind them round-robin over the services (3,200 MB each, priorities 1-3), and M
/// in the middle that time out one per millisecond. With [`Quotas::Caps`], each service has
/// `guaranteed_vram_mb = 3000` (it borrows 200) and `max_vram_mb` 3,200 (the even ones: at their cap,
/// their requests are passed over) or 8,000 (the odd ones); with [`Quotas::Hungry`],
/// `guaranteed_vram_mb = 3300` and no cap: every service is under its guarantee with requests waiting,
/// none of which fits within it. Times the same inputs as [`run`]; a release grants the first request
/// that fits in grant order (with caps, under its service's cap).
/// The `[services]` of a quota bench run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quotas {
    None,
    Caps,
    Hungry,
}

fn run_services(n: usize, quotas: Quotas) -> Figures {
    let services: Vec<String> = (0..SERVICES).map(|i| format!("s{i}")).collect();
    let config = || SchedConfig {
        lease_max_ms: 3_600_000,
        default_timeout_ms: NEVER_MS,
        retain_ended: 10_000,
        max_per_service: usize::MAX,
        services: match quotas {
            Quotas::None => ServicePolicies::default(),
            Quotas::Caps | Quotas::Hungry => ServicePolicies {
                named: services
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        let policy = if quotas == Quotas::Caps {
                            ServicePolicy {
                                guaranteed_vram_mb: 3_000,
                                max_vram_mb: Some(if i % 2 == 0 { LEASE_MB } else { 8_000 }),
                                ..ServicePolicy::default()
                            }
                        } else {
                            ServicePolicy {
                                guaranteed_vram_mb: 3_300,
                                ..ServicePolicy::default()
                            }
                        };
                        (id.clone(), policy)
                    })
                    .collect(),
                others: Some(ServicePolicy::default()),
            },
        },
        ..SchedConfig::default()
    };
    let gpus = || -> Vec<GpuSpec> {
        (0..4)
            .map(|g| GpuSpec {
                id: format!("g{g}").into(),
                total_mb: 80_000,
            })
            .collect()
    };
    let mut b = Bench {
        sched: Scheduler::new(config(), gpus()),
        now: T0,
        actions: 0,
    };
    let vram = Some(LEASE_MB);
    let start = Instant::now();
    for (i, svc) in services.iter().enumerate() {
        b.request(svc, &format!("h{i}"), 0, vram, NEVER_MS);
    }
    assert_eq!(b.sched.leases().len(), SERVICES, "every service holds");
    for i in 0..n {
        let svc = &services[i % SERVICES];
        b.request(svc, &format!("q{i}"), 1 + (i % 3) as u8, vram, NEVER_MS);
    }
    for j in 0..M {
        let svc = &services[j % SERVICES];
        b.request(svc, &format!("t{j}"), 2, vram, 60_000 + j as u64);
    }
    let setup = start.elapsed();
    assert_eq!(b.sched.live_count(), n + M + SERVICES);

    let ids = (0..SERVICES)
        .map(|i| format!("h{i}"))
        .chain((0..n).map(|i| format!("q{i}")))
        .chain((0..M).map(|j| format!("t{j}")));
    let snapshot = Snapshot {
        requests: ids
            .map(|id| b.sched.record(&id).expect("a live request").clone())
            .collect(),
        max_fence: b.sched.last_fence(),
        leases: b.sched.leases(),
        max_arrival: (n + M + SERVICES) as u64,
    };
    let mut restarted = Scheduler::new(config(), gpus());
    let start = Instant::now();
    restarted.restore(snapshot, b.now);
    let restore = start.elapsed();
    drop(restarted);
    let mut kinds = Vec::new();

    let start = Instant::now();
    for k in 0..M {
        let svc = &services[k % SERVICES];
        b.request(svc, &format!("tail{k}"), 3, vram, NEVER_MS);
    }
    kinds.push(("request at the tail", start.elapsed() / M as u32));

    let start = Instant::now();
    for k in 0..M {
        let i = n / 2 + k - M / 2;
        let id = format!("q{i}");
        b.input(
            &services[i % SERVICES],
            Inbound::Cancel(CancelMsg { request_id: id }),
        );
    }
    kinds.push(("cancel in the middle", start.elapsed() / M as u32));

    let start = Instant::now();
    for j in 0..M {
        b.now = T0 + 60_000 + j as u64;
        b.sched.handle_timeout(b.now);
        b.drain();
    }
    kinds.push(("timeout firing", start.elapsed() / M as u32));

    // Each release grants the next request that fits; the one granted releases next.
    let mut holder = (services[1].clone(), "h1".to_string());
    let start = Instant::now();
    for _ in 0..M {
        b.now += 1;
        b.sched.handle_input(
            Input::Inbound {
                service: holder.0.clone(),
                encoding: Encoding::Json,
                input: Inbound::Release(ReleaseMsg {
                    request_id: Some(holder.1.clone()),
                    fence: None,
                }),
            },
            b.now,
        );
        holder = b.drain_granted().unwrap_or_else(|| {
            let gpus = b.sched.status(b.now).gpus;
            let free: Vec<(String, u64, usize)> = gpus
                .iter()
                .map(|g| (g.id.to_string(), g.free_mb, g.holders.len()))
                .collect();
            panic!("a release of {holder:?} granted nothing ({quotas:?}): {free:?}")
        });
    }
    kinds.push(("release granting the head", start.elapsed() / M as u32));
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

/// The quota bench: per size, the figures without quotas and with, run one after the other in the
/// same process, and their ratio.
fn services_table(sizes: &[usize]) {
    println!(
        "\n{SERVICES} services on 4 GPUs, each holding a lease — µs per input: without quotas; with a \
         guarantee and a cap for each service (half at their cap); with every service under its \
         guarantee (none of its requests within it)"
    );
    for &n in sizes {
        let plain = run_services(n, Quotas::None);
        let caps = run_services(n, Quotas::Caps);
        let hungry = run_services(n, Quotas::Hungry);
        println!(
            "{:<28}{:>12}{:>12}{:>8}{:>12}{:>8}",
            format!("{n} queued"),
            "no quotas",
            "caps",
            "ratio",
            "under g.",
            "ratio"
        );
        let row = |kind: &str, a: f64, b: f64, c: f64| {
            println!(
                "{kind:<28}{a:>12.2}{b:>12.2}{:>7.2}x{c:>12.2}{:>7.2}x",
                b / a,
                c / a
            );
        };
        for (k, (kind, _)) in plain.kinds.iter().enumerate() {
            let [a, b, c] = [&plain, &caps, &hungry].map(|f| us(f.kinds[k].1));
            row(kind, a, b, c);
        }
        let per = |d: Duration| us(d) / (n + M + SERVICES) as f64;
        let [a, b, c] = [&plain, &caps, &hungry].map(|f| per(f.setup));
        row("setup per request", a, b, c);
        let [a, b, c] = [&plain, &caps, &hungry].map(|f| per(f.restore));
        row("restore per request", a, b, c);
    }
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
    if filter
        .as_ref()
        .is_none_or(|f| "services".contains(f.as_str()))
    {
        // The cancels take M from the middle of the queue and the releases grant M more: a queue of
        // 10,000 or more keeps requests under their cap to grant.
        let big: Vec<usize> = sizes.iter().copied().filter(|&n| n >= 10_000).collect();
        services_table(&big);
    }
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
